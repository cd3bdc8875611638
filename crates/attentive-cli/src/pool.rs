//! `attentive pool`: hierarchical attention pooling (HAN, Yang et al. 2016) on .npy files. It
//! pools rather than attends query by query, so it has a command of its own: a document's words
//! into sentence vectors and the sentences into a document vector, or one level of groups.

use crate::error::CliError;
use crate::npy;
use crate::outdir;
use attentive::variants::han::{self, Level, LevelGrads};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct PoolArgs {
    /// The rows to pool, float32: [DOCS, SENTENCES, WORDS, D] pools words, then sentences
    /// (weights --param w_word, b_word, c_word, w_sent, b_sent, c_sent); [GROUPS, N, D] pools
    /// one level (--param w, b, c). Each level: u_t = tanh(W h_t + b), α = softmax_t(u_t·c) over
    /// the visible rows, s = Σ α_t h_t; W [A, D], b [A], c [A]. A group with no visible row
    /// pools to 0 (and a sentence with no word is hidden from the document).
    #[arg(long)]
    h: PathBuf,
    /// Which rows are real, bool, the shape of h without D (true = visible).
    #[arg(long)]
    mask: Option<PathBuf>,
    /// A level's weight, NAME=FILE.npy (float32); repeat for each.
    #[arg(long = "param", value_name = "NAME=FILE.npy", value_parser = crate::variant::parse_param)]
    params: Vec<(String, PathBuf)>,
    /// Where the pooled vectors go: [DOCS, D] or [GROUPS, D].
    #[arg(long)]
    out: PathBuf,
    /// Where the sentence vectors go, [DOCS, SENTENCES, D] (documents only).
    #[arg(long)]
    sentences: Option<PathBuf>,
    /// Where the (word-level) weights α go, the shape of h without D.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Where the sentence-level weights go, [DOCS, SENTENCES] (documents only).
    #[arg(long)]
    sentence_weights: Option<PathBuf>,
    /// The gradient of a loss with respect to the output, shaped as --out: gradients with
    /// respect to h (--dh) and to the weights (--d-param) are written.
    #[arg(long)]
    grad_out: Option<PathBuf>,
    /// Where ∂L/∂h goes (with --grad-out).
    #[arg(long, requires = "grad_out")]
    dh: Option<PathBuf>,
    /// Where a weight's gradient goes, NAME=FILE.npy (with --grad-out); repeat for several.
    #[arg(long = "d-param", value_name = "NAME=FILE.npy", value_parser = crate::variant::parse_param, requires = "grad_out")]
    d_params: Vec<(String, PathBuf)>,
}

fn input(what: impl Into<String>, reason: impl ToString) -> CliError {
    CliError::Input {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// The weights of one level, named `w`, `b`, `c` with a suffix (none, `_word` or `_sent`).
struct Weights {
    w: npy::Array<f32>,
    b: npy::Array<f32>,
    c: npy::Array<f32>,
}

impl Weights {
    fn level(&self) -> Level<'_> {
        Level {
            w: &self.w.data,
            b: &self.b.data,
            c: &self.c.data,
        }
    }
}

pub fn pool(a: PoolArgs) -> Result<(), CliError> {
    let h = npy::read_f32(&a.h)?;
    let doc = match h.shape.len() {
        4 => true,
        3 => false,
        _ => {
            return Err(input(
                "--h",
                format!(
                    "expected [DOCS, SENTENCES, WORDS, D] or [GROUPS, N, D], got shape {:?}",
                    h.shape
                ),
            ))
        }
    };
    let suffixes: &[&str] = if doc { &["_word", "_sent"] } else { &[""] };
    let known: Vec<String> = suffixes
        .iter()
        .flat_map(|s| ["w", "b", "c"].map(|n| format!("{n}{s}")))
        .collect();
    for (name, _) in a.params.iter().chain(&a.d_params) {
        if !known.contains(name) {
            return Err(input(
                format!("--param {name}"),
                format!("this input takes {}", known.join(", ")),
            ));
        }
    }
    let load = |name: &str| -> Result<npy::Array<f32>, CliError> {
        let (_, path) = a
            .params
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| input("--param", format!("needs {name}=FILE.npy")))?;
        npy::read_f32(path)
    };
    let levels: Vec<Weights> = suffixes
        .iter()
        .map(|s| {
            Ok(Weights {
                w: load(&format!("w{s}"))?,
                b: load(&format!("b{s}"))?,
                c: load(&format!("c{s}"))?,
            })
        })
        .collect::<Result<_, CliError>>()?;
    let rows = &h.shape[..h.shape.len() - 1];
    let mask = match &a.mask {
        Some(p) => {
            let m = npy::read_bool(p)?;
            if m.shape != rows {
                return Err(input(
                    "--mask",
                    format!("shape {:?}: expected {rows:?}", m.shape),
                ));
            }
            Some(m.data)
        }
        None => None,
    };
    let d = h.shape[h.shape.len() - 1];
    let grad = a.grad_out.as_deref().map(npy::read_f32).transpose()?;
    type Saved = Vec<(PathBuf, Vec<usize>, Vec<f32>)>;
    let mut saved: Saved = Vec::new();
    let mut grads: Vec<(String, Vec<f32>)> = Vec::new();
    let d_h = if doc {
        let dims = (h.shape[0], h.shape[1], h.shape[2], d);
        let (word, sent) = (levels[0].level(), levels[1].level());
        let (out, sv, wa, sa) = han::document(&h.data, dims, mask.as_deref(), (&word, &sent))?;
        saved.push((a.out.clone(), vec![dims.0, d], out));
        for (path, shape, data) in [
            (&a.sentences, vec![dims.0, dims.1, d], sv),
            (&a.weights, rows.to_vec(), wa),
            (&a.sentence_weights, vec![dims.0, dims.1], sa),
        ] {
            if let Some(p) = path {
                saved.push((p.clone(), shape, data));
            }
        }
        match &grad {
            Some(g) => {
                expect_shape("--grad-out", &g.shape, &[dims.0, d])?;
                let (dh, wg, sg) = han::document_backward(
                    &h.data,
                    dims,
                    mask.as_deref(),
                    (&word, &sent),
                    &g.data,
                )?;
                grads.extend(named(wg, "_word"));
                grads.extend(named(sg, "_sent"));
                Some(dh)
            }
            None => None,
        }
    } else {
        if a.sentences.is_some() || a.sentence_weights.is_some() {
            return Err(input(
                "--sentences / --sentence-weights",
                "are outputs of a document ([DOCS, SENTENCES, WORDS, D]), not of one level",
            ));
        }
        let dims = (h.shape[0], h.shape[1], d);
        let level = levels[0].level();
        let (out, alpha) = han::pool(&h.data, dims, mask.as_deref(), &level)?;
        saved.push((a.out.clone(), vec![dims.0, d], out));
        if let Some(p) = &a.weights {
            saved.push((p.clone(), rows.to_vec(), alpha));
        }
        match &grad {
            Some(g) => {
                expect_shape("--grad-out", &g.shape, &[dims.0, d])?;
                let (dh, lg) = han::pool_backward(&h.data, dims, mask.as_deref(), &level, &g.data)?;
                grads.extend(named(lg, ""));
                Some(dh)
            }
            None => None,
        }
    };
    if let (Some(dh), Some(p)) = (d_h, &a.dh) {
        saved.push((p.clone(), h.shape.clone(), dh));
    }
    // Each weight's shape as it was read, by name.
    let shapes: Vec<(String, Vec<usize>)> = suffixes
        .iter()
        .zip(&levels)
        .flat_map(|(s, l)| {
            [
                (format!("w{s}"), l.w.shape.clone()),
                (format!("b{s}"), l.b.shape.clone()),
                (format!("c{s}"), l.c.shape.clone()),
            ]
        })
        .collect();
    for (name, path) in &a.d_params {
        let find = |v: &[(String, Vec<usize>)]| v.iter().position(|(n, _)| n == name);
        let (g, shape) = match (
            grads.iter().find(|(n, _)| n == name),
            find(&shapes).map(|i| &shapes[i].1),
        ) {
            (Some((_, g)), Some(shape)) => (g.clone(), shape.clone()),
            _ => unreachable!("names checked above"),
        };
        saved.push((path.clone(), shape, g));
    }
    let outputs: Vec<(&Path, outdir::Write)> = saved
        .iter()
        .map(|(p, shape, data)| -> (&Path, outdir::Write) {
            (
                p.as_path(),
                Box::new(move |tmp: &Path| npy::write_f32(tmp, shape, data)),
            )
        })
        .collect();
    outdir::files(outputs)
}

/// A level's gradients by their parameter names.
fn named(g: LevelGrads, suffix: &str) -> [(String, Vec<f32>); 3] {
    [
        (format!("w{suffix}"), g.w),
        (format!("b{suffix}"), g.b),
        (format!("c{suffix}"), g.c),
    ]
}

fn expect_shape(what: &str, got: &[usize], want: &[usize]) -> Result<(), CliError> {
    if got == want {
        Ok(())
    } else {
        Err(input(what, format!("shape {got:?}: expected {want:?}")))
    }
}
