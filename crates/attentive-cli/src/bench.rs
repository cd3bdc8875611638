//! `attentive bench`: the fused kernel (or a variant) timed on drawn inputs, GFLOP/s against
//! the ceiling, peak memory, thread scaling, and `--serve` for an interleaving driver.

use super::*;

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Batch size B.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Query heads Hq.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Key/value heads (default: --heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Query sequence length.
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    /// Key sequence length (default: --seq).
    #[arg(long)]
    kv_seq: Option<usize>,
    /// Features per head D (of queries, keys and values).
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Causal mask, aligned top-left or bottom-right.
    #[arg(long, value_enum)]
    causal: Option<CausalArg>,
    #[arg(long, value_parser = parse_window, help = WINDOW_HELP, allow_hyphen_values = true)]
    window: Option<(usize, usize)>,
    /// Structured sparse pattern; --help lists each rule.
    #[arg(long, value_parser = parse_pattern, long_help = PATTERN_HELP)]
    pattern: Option<Pattern>,
    /// Time forward plus backward.
    #[arg(long)]
    backward: bool,
    /// Store K and V as f16 (a KV cache at half the memory; forward only).
    #[arg(long, conflicts_with = "backward")]
    half_kv: bool,
    /// Timed repetitions (default: as many as fit in about two seconds, at least 3).
    #[arg(long)]
    iters: Option<usize>,
    /// Print the result as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// Read the inputs from DIR/q.npy, k.npy, v.npy (and do.npy with --backward), [B, H, N, D]
    /// f32, instead of drawing them; their shapes replace --batch, --heads, --seq and --dim.
    #[arg(long, value_name = "DIR")]
    inputs: Option<PathBuf>,
    /// Time on request, for a driver that interleaves another implementation with this one: read
    /// commands from stdin, one per line. `run` runs once and prints the seconds it took;
    /// `save DIR` runs once more and writes o.npy (and dq.npy, dk.npy, dv.npy with --backward)
    /// into DIR; `rss` prints the peak resident set size in bytes; `quit` or end of input stops.
    #[arg(long)]
    serve: bool,
    /// Thread scaling: time the same call with 1, 2, 4, … threads up to every core (and every
    /// core itself), and report each count's speedup over one thread and its parallel
    /// efficiency (speedup / threads).
    #[arg(long, conflicts_with = "serve")]
    scaling: bool,
    /// Time a variant instead of exact attention, its parameters drawn: performer 256 features,
    /// linformer k = 256, gla gates in [−0.1, 0], nystrom --landmarks (64), adaptive-span
    /// z = ½ of --max-span (1024) with a ramp of 32, lsh 2 rounds of 2N/C buckets in chunks of
    /// --bucket-size (64) with keys = queries, luong-local half-width 10. lsh's distance is from
    /// its own dense form (one chunk), the others' from softmax attention.
    #[arg(long, value_enum, conflicts_with_all = ["serve", "scaling", "half_kv", "inputs", "window", "pattern"])]
    variant: Option<variant::Variant>,
    /// nystrom's landmarks.
    #[arg(long, default_value_t = 64)]
    landmarks: usize,
    /// adaptive-span's largest span.
    #[arg(long, default_value_t = 1024)]
    max_span: usize,
    /// lsh's chunk length.
    #[arg(long, default_value_t = 64)]
    bucket_size: usize,
    /// Force an instruction set (default: the fastest this CPU runs), to compare them.
    #[arg(long, value_enum)]
    isa: Option<IsaArg>,
}

/// Resident set size now and its high-water mark, in bytes (Linux; 0 elsewhere).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Bytes of this process's memory on transparent huge pages now (Linux; 0 elsewhere).
fn huge_pages() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    rollup
        .lines()
        .find(|l| l.starts_with("AnonHugePages:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub(crate) fn bench(a: BenchArgs) -> Result<(), CliError> {
    if let Some(which) = a.variant {
        return bench_variant(&a, which);
    }
    let (b, hq, d) = (a.batch, a.heads, a.dim);
    let hkv = a.kv_heads.unwrap_or(hq);
    let (nq, nk) = (a.seq, a.kv_seq.unwrap_or(a.seq));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    // Inputs and outputs live on huge pages where the system offers them, as NumPy's and
    // PyTorch's large arrays do (`HugeVec`): the peers of bench/compare.py read theirs so.
    let mut fill = |n: usize| -> Result<HugeVec<f32>, CliError> {
        let mut x = HugeVec::zeroed(n)?;
        for y in x.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *y = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        }
        Ok(x)
    };
    let zeros = |n: usize| HugeVec::<f32>::zeroed(n);
    let (qs, ks, q, k, v, d_o) = if let Some(dir) = &a.inputs {
        let read = |name: &str| -> Result<(HugeVec<f32>, [usize; 4]), CliError> {
            let x = npy::read_f32(&dir.join(name))?;
            let shape = rank4(name, &x)?;
            Ok((HugeVec::from_slice(&x.data)?, shape))
        };
        let ((q, qs), (k, ks), (v, vs)) = (read("q.npy")?, read("k.npy")?, read("v.npy")?);
        let (d_o, dos) = if a.backward {
            read("do.npy")?
        } else {
            (zeros(q.len())?, qs)
        };
        for (name, shape, want, of) in [("v.npy", vs, ks, "k.npy"), ("do.npy", dos, qs, "q.npy")] {
            if shape != want {
                return Err(CliError::Input {
                    what: name.into(),
                    reason: format!("shape {shape:?} differs from {of}'s {want:?}"),
                });
            }
        }
        (qs, ks, q, k, v, d_o)
    } else {
        let (qs, ks) = ([b, hq, nq, d], [b, hkv, nk, d]);
        let (q, k) = (fill(count(&qs)?)?, fill(count(&ks)?)?);
        let (v, d_o) = (fill(count(&ks)?)?, fill(count(&qs)?)?);
        (qs, ks, q, k, v, d_o)
    };
    let ([b, hq, nq, d], [_, hkv, nk, _]) = (qs, ks);
    let mut o = zeros(q.len())?;
    let mut lse = zeros(count(&[b, hq, nq])?)?;
    let (mut dq, mut dk, mut dv) = if a.backward {
        (zeros(q.len())?, zeros(k.len())?, zeros(v.len())?)
    } else {
        (zeros(0)?, zeros(0)?, zeros(0)?)
    };
    let mut opts = Options::new();
    opts.causal = a.causal.map(Into::into);
    if let Some((l, r)) = a.window {
        opts = opts.window(l, r);
    }
    opts.pattern = a.pattern.as_ref();
    opts.isa = a.isa.map(Into::into);
    let (qv, kv, vv) = (
        View::contiguous(&q, &qs)?,
        View::contiguous(&k, &ks)?,
        View::contiguous(&v, &ks)?,
    );
    let to_half = |x: &[f32]| -> Result<HugeVec<f16>, CliError> {
        let mut h = HugeVec::zeroed(if a.half_kv { x.len() } else { 0 })?;
        for (h, &y) in h.iter_mut().zip(x) {
            *h = f16::from_f32(y);
        }
        Ok(h)
    };
    let (k16, v16) = (to_half(&k)?, to_half(&v)?);
    // Touch every output page now, so the baseline counts outputs as well as inputs.
    for buf in [&mut o, &mut lse, &mut dq, &mut dk, &mut dv] {
        buf.fill(1.0);
    }
    let (base_rss, _) = rss();
    // One call (forward, and backward with --backward), timed; `save` writes its outputs.
    let mut run = |save: Option<&std::path::Path>| -> Result<f64, CliError> {
        let t = Instant::now();
        let out = &mut ViewMut::contiguous(&mut o, qs)?;
        if a.half_kv {
            let (k, v) = (View::contiguous(&k16, &ks)?, View::contiguous(&v16, &ks)?);
            forward_half_kv(qv, k, v, &opts, out, Some(&mut lse))?;
        } else {
            forward(qv, kv, vv, &opts, out, Some(&mut lse))?;
        }
        if a.backward {
            backward(
                qv,
                kv,
                vv,
                View::contiguous(&o, &qs)?,
                &lse,
                View::contiguous(&d_o, &qs)?,
                &opts,
                &mut ViewMut::contiguous(&mut dq, qs)?,
                &mut ViewMut::contiguous(&mut dk, ks)?,
                &mut ViewMut::contiguous(&mut dv, ks)?,
            )?;
        }
        let elapsed = t.elapsed().as_secs_f64();
        if let Some(dir) = save {
            npy::write_f32(&dir.join("o.npy"), &qs, &o)?;
            if a.backward {
                npy::write_f32(&dir.join("dq.npy"), &qs, &dq)?;
                npy::write_f32(&dir.join("dk.npy"), &ks, &dk)?;
                npy::write_f32(&dir.join("dv.npy"), &ks, &dv)?;
            }
        }
        Ok(elapsed)
    };
    if a.serve {
        return serve(&mut run);
    }
    // A first call, then as many as fit in about two seconds (or --iters), sorted.
    let measure = |run: &mut dyn FnMut(Option<&std::path::Path>) -> Result<f64, CliError>| {
        let first = run(None)?;
        let iters = a
            .iters
            .unwrap_or_else(|| ((2.0 / first.max(1e-9)) as usize).clamp(3, 1000));
        let mut times: Vec<f64> = (0..iters).map(|_| run(None)).collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        Ok::<_, CliError>(times)
    };
    let pairs = visible_pairs(qv, kv, &opts)?;
    let flops_per_pair = if a.backward { 14 } else { 4 } * d as u64;
    let flops = (pairs * flops_per_pair) as f64;
    if a.scaling {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut counts: Vec<usize> = std::iter::successors(Some(1), |&t| Some(2 * t))
            .take_while(|&t| t < cores)
            .collect();
        counts.push(cores);
        let mut rows = Vec::new();
        for &t in &counts {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .map_err(|e| CliError::Input {
                    what: "thread pool".into(),
                    reason: e.to_string(),
                })?;
            let times = pool.install(|| measure(&mut run))?;
            let median = times[times.len() / 2];
            let one: f64 = rows.first().map_or(median, |&(_, m)| m);
            let speedup = one / median;
            out!(
                "{t:>3} threads: median {:9.3} ms, {:8.1} GFLOP/s, speedup {speedup:5.2}x, parallel efficiency {:5.1}%",
                median * 1e3,
                flops / median / 1e9,
                100.0 * speedup / t as f64,
            );
            rows.push((t, median));
        }
        if a.json {
            let j: Vec<_> = rows
                .iter()
                .map(|&(t, m)| {
                    serde_json::json!({
                        "threads": t, "median_ms": m * 1e3,
                        "gflops": flops / m / 1e9,
                        "speedup": rows[0].1 / m, "efficiency": rows[0].1 / m / t as f64,
                    })
                })
                .collect();
            out!("{}", serde_json::json!({ "scaling": j }));
        }
        return Ok(());
    }
    let times = measure(&mut run)?;
    let (iters, median) = (times.len(), times[times.len() / 2]);
    let (_, peak) = rss();
    let gflops = flops / median / 1e9;
    // K and V read once: what bounds a decoding step.
    let kv_bytes = (k.len() + v.len()) * if a.half_kv { 2 } else { 4 };
    let kv_gbps = kv_bytes as f64 / median / 1e9;
    let mb = |x: u64| x as f64 / (1024.0 * 1024.0);
    let isa = format!("{:?}", opts.isa.unwrap_or_else(attentive::Isa::best));
    out!(
        "attention B={b} Hq={hq} Hkv={hkv} Nq={nq} Nk={nk} D={d}{}{}{}{}{}: median {:.3} ms over {iters} runs, {gflops:.1} GFLOP/s, K and V read at {kv_gbps:.1} GB/s, peak RSS {:.1} MB ({:.1} MB beyond inputs and outputs), {} threads, {isa}",
        a.causal.map_or(String::new(), |c| format!(" causal={}", c.to_possible_value().unwrap().get_name())),
        a.window.map_or(String::new(), |(l, r)| {
            let side = |x: usize| if x == usize::MAX { "inf".to_string() } else { x.to_string() };
            format!(" window={},{}", side(l), side(r))
        }),
        a.pattern.as_ref().map_or(String::new(), |p| format!(" pattern={p}")),
        if a.half_kv { " f16 K/V" } else { "" },
        if a.backward { " forward+backward" } else { " forward" },
        median * 1e3,
        mb(peak),
        mb(peak.saturating_sub(base_rss)),
        rayon::current_num_threads(),
    );
    if a.json {
        let j = serde_json::json!({
            "batch": b, "heads": hq, "kv_heads": hkv, "seq": nq, "kv_seq": nk, "dim": d,
            "causal": a.causal.map(|c| c.to_possible_value().unwrap().get_name().to_string()),
            "window": a.window.map(|(l, r)| [l, r]),
            "pattern": a.pattern.as_ref().map(|p| p.to_string()),
            "backward": a.backward, "half_kv": a.half_kv, "kv_gbps": kv_gbps, "threads": rayon::current_num_threads(), "iters": iters, "isa": isa,
            "median_ms": median * 1e3, "min_ms": times[0] * 1e3, "gflops": gflops,
            "pairs": pairs, "peak_rss_mb": mb(peak), "extra_rss_mb": mb(peak.saturating_sub(base_rss)),
            "huge_pages_mb": mb(huge_pages()),
        });
        out!("{j}");
    }
    Ok(())
}

/// `bench --serve`: answers `run`, `save DIR`, `rss` and `quit` on stdin (see [`BenchArgs`]).
/// `bench --variant`: the variant's forward (and backward) on drawn inputs and parameters, timed
/// as the exact kernel is (a first call, then about two seconds of calls, the median), with the
/// peak resident memory beyond the inputs.
fn bench_variant(a: &BenchArgs, which: variant::Variant) -> Result<(), CliError> {
    let (b, hq, d) = (a.batch, a.heads, a.dim);
    let hkv = a.kv_heads.unwrap_or(hq);
    let n = a.seq;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut draw = |len: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                lo + (hi - lo) * ((state >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    };
    let (qs, ks) = ([b, hq, n, d], [b, hkv, n, d]);
    let lsh = which == variant::Variant::Lsh;
    let q = draw(qs.iter().product(), -1.0, 1.0);
    // lsh shares queries and keys.
    let k = if lsh {
        q.clone()
    } else {
        draw(ks.iter().product(), -1.0, 1.0)
    };
    let (v, d_o) = (
        draw(ks.iter().product(), -1.0, 1.0),
        draw(qs.iter().product(), -1.0, 1.0),
    );
    let arr = |shape: Vec<usize>, data: Vec<f32>| npy::Array { shape, data };
    let kp = 256;
    let params: Vec<(String, npy::Array<f32>)> = match which {
        variant::Variant::Gla => vec![(
            "gates".into(),
            arr(ks.to_vec(), draw(ks.iter().product(), -0.1, 0.0)),
        )],
        variant::Variant::Performer => vec![(
            "features".into(),
            arr(
                vec![kp, d],
                attentive::variants::performer::draw_features(kp, d, 1),
            ),
        )],
        variant::Variant::Linformer => vec![(
            "e".into(),
            arr(vec![n, kp], draw(n * kp, -1.0 / 16.0, 1.0 / 16.0)),
        )],
        variant::Variant::AdaptiveSpan => vec![("z".into(), arr(vec![hq], vec![0.5; hq]))],
        variant::Variant::Additive => vec![
            ("w_q".into(), arr(vec![d, d], draw(d * d, -0.1, 0.1))),
            ("w_k".into(), arr(vec![d, d], draw(d * d, -0.1, 0.1))),
            ("v".into(), arr(vec![d], draw(d, -1.0, 1.0))),
        ],
        variant::Variant::LuongGeneral => {
            vec![("w".into(), arr(vec![d, d], draw(d * d, -0.1, 0.1)))]
        }
        variant::Variant::LuongConcat => vec![
            ("w".into(), arr(vec![d, 2 * d], draw(2 * d * d, -0.1, 0.1))),
            ("v".into(), arr(vec![d], draw(d, -1.0, 1.0))),
        ],
        variant::Variant::LuongLocal => vec![
            ("w_p".into(), arr(vec![d, d], draw(d * d, -0.1, 0.1))),
            ("v_p".into(), arr(vec![d], draw(d, -1.0, 1.0))),
        ],
        variant::Variant::Lsh => {
            let buckets = (2 * n / a.bucket_size.max(1)).max(2) / 2 * 2;
            let rot = attentive::variants::lsh::draw_rotations(2, d, buckets, 1);
            vec![("rotations".into(), arr(vec![2, d, buckets / 2], rot))]
        }
        _ => Vec::new(),
    };
    let rule = variant::Rule {
        causal: a.causal.is_some(),
        max_span: Some(a.max_span),
        ramp: 32,
        landmarks: Some(a.landmarks),
        bucket_size: Some(a.bucket_size),
        half_width: 10,
    };
    let (base_rss, _) = rss();
    let run = || -> Result<f64, CliError> {
        let t = Instant::now();
        let grads = a.backward.then_some((&d_o[..], qs));
        variant::compute(which, &params, rule, (&q, qs), (&k, ks), (&v, ks), grads)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let first = run()?;
    let iters = a
        .iters
        .unwrap_or_else(|| ((2.0 / first.max(1e-9)) as usize).clamp(3, 1000));
    let mut times: Vec<f64> = (0..iters).map(|_| run()).collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let (_, peak) = rss();
    // How far the output is from exact softmax attention of the same causality on the same
    // inputs (relative Frobenius norm), up to 16 384 positions (exact attention's cost).
    let error = if n <= 16_384 {
        let got = variant::compute(which, &params, rule, (&q, qs), (&k, ks), (&v, ks), None)?.o;
        let mut want = vec![0.0f32; got.len()];
        if lsh {
            let dense = variant::Rule {
                bucket_size: Some(n),
                ..rule
            };
            want = variant::compute(which, &params, dense, (&q, qs), (&k, ks), (&v, ks), None)?.o;
        } else {
            let mut opts = Options::new();
            opts.causal = a.causal.map(Into::into);
            let (qv, kv, vv) = (
                View::contiguous(&q, &qs)?,
                View::contiguous(&k, &ks)?,
                View::contiguous(&v, &ks)?,
            );
            forward(
                qv,
                kv,
                vv,
                &opts,
                &mut ViewMut::contiguous(&mut want, qs)?,
                None,
            )?;
        }
        let num: f64 = got
            .iter()
            .zip(&want)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|y| (*y as f64).powi(2)).sum();
        Some((num / den).sqrt())
    } else {
        None
    };
    let mb = |x: u64| x as f64 / (1024.0 * 1024.0);
    let name = which
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    out!(
        "{name} B={b} Hq={hq} Hkv={hkv} N={n} D={d}{}{}: median {:.3} ms over {iters} runs, peak RSS {:.1} MB ({:.1} MB beyond the inputs), {} threads{}",
        if a.causal.is_some() { " causal" } else { "" },
        if a.backward { " forward+backward" } else { " forward" },
        median * 1e3,
        mb(peak),
        mb(peak.saturating_sub(base_rss)),
        rayon::current_num_threads(),
        error.map_or(String::new(), |e| format!(
            ", {e:.3e} from {} (relative)",
            if lsh { "its one-chunk form" } else { "softmax attention" }
        )),
    );
    if a.json {
        out!(
            "{}",
            serde_json::json!({
                "variant": name, "batch": b, "heads": hq, "kv_heads": hkv, "seq": n, "dim": d,
                "error_vs_softmax": error,
                "causal": a.causal.is_some(), "backward": a.backward, "iters": iters,
                "median_ms": median * 1e3, "min_ms": times[0] * 1e3, "peak_rss_mb": mb(peak),
                "extra_rss_mb": mb(peak.saturating_sub(base_rss)), "threads": rayon::current_num_threads(),
            })
        );
    }
    Ok(())
}

fn serve(
    run: &mut dyn FnMut(Option<&std::path::Path>) -> Result<f64, CliError>,
) -> Result<(), CliError> {
    use std::io::{BufRead, Write};
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| CliError::Input {
            what: "stdin".into(),
            reason: e.to_string(),
        })?;
        let line = line.trim();
        let reply = match line {
            "" => continue,
            "run" => format!("{}", run(None)?),
            "rss" => format!("{}", rss().1),
            "quit" => break,
            _ => match line.strip_prefix("save ") {
                Some(dir) => format!("{}", run(Some(std::path::Path::new(dir.trim())))?),
                None => {
                    return Err(CliError::Input {
                        what: "stdin".into(),
                        reason: format!("unknown command {line:?} (run, save DIR, rss, quit)"),
                    })
                }
            },
        };
        writeln!(out, "{reply}")
            .and_then(|_| out.flush())
            .map_err(|e| CliError::Input {
                what: "stdout".into(),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}
