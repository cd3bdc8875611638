//! `attentive attend --variant NAME`: attention other than softmax over a mask, on the same .npy
//! inputs and outputs as the exact kernel, with every learned matrix or random draw passed in as
//! `--param NAME=FILE.npy`, so anyone with numpy can check a variant against another
//! implementation.

use crate::error::CliError;
use crate::npy;
use attentive::variants::{
    adaptive_span, additive, gated, linear, linformer, lsh, nystrom, performer,
};
use attentive::{View, ViewMut};
use std::path::PathBuf;

/// The variants `attend` runs.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Variant {
    /// Linear attention (Katharopoulos et al. 2020), φ = elu + 1, ε = 1e-6 after the dot
    /// product; --causal for prefix sums. No parameters.
    Linear,
    /// Gated linear attention (GLA) or RetNet's decay, causal, no denominator:
    /// S_t = e^{g_t} ⊙ S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ(q_t/√D). --param gates=[B, Hkv, N, D] (log-gates
    /// ≤ 0), or --param decay=[Hkv] (one log-decay per head).
    Gla,
    /// Performer FAVOR+, as performer-pytorch's softmax_kernel (feature ε 1e-4, per-row query
    /// stabiliser, per-head key stabiliser; causal: none). --param features=[m, D].
    Performer,
    /// Linformer: K′ = Eᵀ K, V′ = Fᵀ V, softmax(Q K′ᵀ/√D) V′. --param e=[N, k] and optionally
    /// f=[N, k] (else F = E); no causal form.
    Linformer,
    /// Adaptive attention span: causal softmax times the ramp clamp((R + z·S − (i − j))/R, 0, 1),
    /// renormalised. --param z=[Hq] (span fractions in [0, 1]), --max-span S, --ramp R.
    AdaptiveSpan,
    /// Bahdanau: vᵀ tanh(W_q q + W_k k), softmax over the keys. --param w_q=[A, Dq] w_k=[A, Dk] v=[A].
    Additive,
    /// Luong dot: q·k (no scale), softmax over the keys.
    LuongDot,
    /// Luong general: qᵀ W k. --param w=[Dq, Dk].
    LuongGeneral,
    /// Luong concat: vᵀ tanh(W [q; k]). --param w=[A, Dq + Dk] v=[A].
    LuongConcat,
    /// Nyströmformer: landmarks as segment means, the iterative pseudo-inverse (6 iterations,
    /// its initial scale per matrix). --landmarks M (dividing N).
    Nystrom,
    /// Reformer LSH attention, shared QK (q and k the same tensor), as the HF port computes it.
    /// --param rotations=[n_hashes, D, n_buckets/2], --bucket-size C (dividing N).
    Lsh,
    /// Luong local-p: a predicted centre p = N·σ(v_pᵀ tanh(W_p q)), the softmax over the keys
    /// within --half-width D of it times a Gaussian (σ = D/2). --param w_p=[A, Dq] v_p=[A], and
    /// w=[Dq, Dk] for the general score (dot without it).
    LuongLocal,
}

/// The long help of `--variant`.
pub const HELP: &str = "Attention other than softmax over a mask. Each variant's parameters come as \
--param NAME=FILE.npy (float32):
  linear     φ = elu + 1, o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q_i)·Σ_j φ(k_j) + 1e-6); --causal for
             prefix sums. No parameters.
  gla        causal, S_t = e^{g_t} ⊙ S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ q_t / √D. --param gates=[B, Hkv, N, D]
             (log-gates ≤ 0, GLA) or --param decay=[Hkv] (one log-decay per head, RetNet).
  performer  FAVOR+, exactly performer-pytorch's softmax_kernel (x' = x·D^(−1/4), feature ε 1e-4,
             per-row query stabiliser, per-head key stabiliser, none when causal).
             --param features=[m, D] (the random features ω).
  linformer  K′ = Eᵀ K, V′ = Fᵀ V along the sequence, then softmax(Q K′ᵀ / √D) V′ (lucidrains' form).
             --param e=[N, k], optionally --param f=[N, k] (F = E without it). No causal form.
  adaptive-span  causal softmax weights times the ramp m(x) = clamp((R + z·S − x)/R, 0, 1) of the
             distance x = i − j, renormalised (Sukhbaatar et al.). --param z=[Hq] (each head's span
             fraction, clamped to [0, 1]); --max-span S; --ramp R (default 32).
  additive   Bahdanau: e_ij = vᵀ tanh(W_q q_i + W_k k_j), softmax over j, Σ α_ij v_j.
             --param w_q=[A, Dq] w_k=[A, Dk] v=[A].
  luong-dot  e_ij = q_i·k_j (no scale).
  luong-general  e_ij = q_iᵀ W k_j. --param w=[Dq, Dk].
  luong-concat   e_ij = vᵀ tanh(W [q_i; k_j]). --param w=[A, Dq + Dk] v=[A].
             (A row whose keys are all hidden gives 0. Keys may be another width than queries.)
  nystrom    softmax(Q K̃ᵀ) Z softmax(Q̃ Kᵀ) V, q and k scaled by D^(−1/4), landmarks Q̃, K̃ the means of M
             contiguous segments, Z six iterations of the pseudo-inverse from Aᵀ / max colsum(A)
             (taken per matrix, not over the batch). --landmarks M, dividing N.
  lsh        Reformer, as the HF port: queries and keys one tensor x (give the same file as q and
             k), keys x·rsqrt(mean(x²) + 1e-6)/√D, logits x_i·k̂_j unscaled; each round's buckets
             argmax([xR; −xR]); positions sorted stably by bucket, rounds laid end to end, chunks
             of C attending to themselves and the chunk before (circularly); the self-match
             −1e5, with --causal later keys −1e9; rounds combined by their log-sum-exp. N ≤ C is
             dense attention. --param rotations=[n_hashes, D, n_buckets/2]; --bucket-size C
             (dividing N: pad the sequence). dq holds x's whole gradient, dk is zero.
  luong-local  local-p (Luong et al. 2015): p_i = Nk·σ(v_pᵀ tanh(W_p q_i)); softmax over the keys j
             (from 0) with |j − p_i| ≤ D, each weight times exp(−(j − p_i)²/2σ²), σ = D/2, not
             renormalised. --param w_p=[A, Dq] v_p=[A], and w=[Dq, Dk] for the general score
             (dot without it); --half-width D (default 10).
Gradients (--grad-out) are with respect to q, k and v; gla's also with respect to its gates or
decay, linformer's with respect to E (holding F's too when shared), adaptive-span's with respect
to z, the additive and Luong scores' with respect to their weights (w_q, w_k, v, w, w_p, v_p),
written with --d-param NAME=FILE.npy.";

/// `NAME=PATH`.
pub fn parse_param(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NAME=FILE.npy"))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

fn input(what: impl Into<String>, reason: impl ToString) -> CliError {
    CliError::Input {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// What a variant's call produced: the output, and with a gradient of it, dQ, dK, dV and each
/// parameter's gradient, by name, with its shape.
pub struct Computed {
    pub o: Vec<f32>,
    pub grads: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    pub d_params: Vec<(&'static str, Vec<usize>, Vec<f32>)>,
}

/// Runs `variant` on `q`, `k`, `v` (row-major, shapes given), with `d_o` for gradients.
#[allow(clippy::too_many_arguments)]
pub fn run(
    variant: Variant,
    params: &[(String, PathBuf)],
    rule: Rule,
    q: (&[f32], [usize; 4]),
    k: (&[f32], [usize; 4]),
    v: (&[f32], [usize; 4]),
    d_o: Option<(&[f32], [usize; 4])>,
) -> Result<Computed, CliError> {
    let known = variant.params();
    let mut loaded = Vec::new();
    for (name, path) in params {
        if !known.contains(&name.as_str()) {
            return Err(input(
                format!("--param {name}"),
                format!(
                    "{variant:?} takes {}",
                    if known.is_empty() {
                        "no parameters".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        loaded.push((name.clone(), npy::read_f32(path)?));
    }
    compute(variant, &loaded, rule, q, k, v, d_o)
}

/// The variants' own flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rule {
    /// `--causal`.
    pub causal: bool,
    /// adaptive-span's `--max-span`.
    pub max_span: Option<usize>,
    /// adaptive-span's `--ramp`.
    pub ramp: usize,
    /// nystrom's `--landmarks`.
    pub landmarks: Option<usize>,
    /// lsh's `--bucket-size`.
    pub bucket_size: Option<usize>,
    /// luong-local's `--half-width`.
    pub half_width: usize,
}

impl Variant {
    /// The names of its parameters.
    pub fn params(self) -> &'static [&'static str] {
        match self {
            Variant::Linear | Variant::LuongDot | Variant::Nystrom => &[],
            Variant::Gla => &["gates", "decay"],
            Variant::Performer => &["features"],
            Variant::Linformer => &["e", "f"],
            Variant::AdaptiveSpan => &["z"],
            Variant::Additive => &["w_q", "w_k", "v"],
            Variant::LuongGeneral => &["w"],
            Variant::LuongConcat => &["w", "v"],
            Variant::Lsh => &["rotations"],
            Variant::LuongLocal => &["w_p", "v_p", "w"],
        }
    }
}

/// [`run`] with the parameters in memory.
#[allow(clippy::too_many_arguments)]
pub fn compute(
    variant: Variant,
    loaded: &[(String, npy::Array<f32>)],
    rule: Rule,
    (q, qs): (&[f32], [usize; 4]),
    (k, ks): (&[f32], [usize; 4]),
    (v, vs): (&[f32], [usize; 4]),
    d_o: Option<(&[f32], [usize; 4])>,
) -> Result<Computed, CliError> {
    let known = variant.params();
    let Rule {
        causal,
        max_span,
        ramp,
        landmarks,
        ..
    } = rule;
    let param = |name: &str| loaded.iter().find(|(n, _)| n == name).map(|(_, a)| a);
    let (qv, kv, vv) = (
        View::contiguous(q, &qs)?,
        View::contiguous(k, &ks)?,
        View::contiguous(v, &vs)?,
    );
    let os = [qs[0], qs[1], qs[2], vs[3]];
    let mut o = vec![0.0f32; os.iter().product()];
    let mut grads = d_o.map(|_| {
        (
            vec![0.0f32; qs.iter().product()],
            vec![0.0f32; ks.iter().product()],
            vec![0.0f32; vs.iter().product()],
        )
    });
    let mut d_params = Vec::new();
    let dov = d_o.map(|(x, s)| View::contiguous(x, &s)).transpose()?;
    macro_rules! views {
        ($g:expr) => {
            (
                &mut ViewMut::contiguous(&mut $g.0, qs)?,
                &mut ViewMut::contiguous(&mut $g.1, ks)?,
                &mut ViewMut::contiguous(&mut $g.2, vs)?,
            )
        };
    }
    let mut out = ViewMut::contiguous(&mut o, os)?;
    match variant {
        Variant::Linear => {
            let opts = linear::Linear {
                causal,
                ..Default::default()
            };
            linear::forward(qv, kv, vv, &opts, &mut out)?;
            if let (Some(g), Some(d)) = (grads.as_mut(), dov) {
                let (a, b, c) = views!(g);
                linear::backward(qv, kv, vv, d, &opts, a, b, c)?;
            }
        }
        Variant::Gla => {
            if !causal {
                return Err(input("--variant gla", "is causal only: give --causal"));
            }
            let decay = match (param("gates"), param("decay")) {
                (Some(g), None) => gated::Decay::Gates(View::contiguous(&g.data, &g.shape)?),
                (None, Some(d)) => gated::Decay::PerHead(&d.data),
                _ => return Err(input(
                    "--variant gla",
                    "needs --param gates=FILE.npy [B, Hkv, N, D] or --param decay=FILE.npy [Hkv]",
                )),
            };
            let opts = gated::Gated::new(decay);
            gated::forward(qv, kv, vv, &opts, &mut out)?;
            if let (Some(g), Some(d)) = (grads.as_mut(), dov) {
                let (name, p) = match param("gates") {
                    Some(p) => ("gates", p),
                    None => ("decay", param("decay").expect("checked above")),
                };
                let mut dg = vec![0.0f32; p.data.len()];
                let (a, b, c) = views!(g);
                gated::backward(qv, kv, vv, d, &opts, a, b, c, Some(&mut dg))?;
                d_params.push((name, p.shape.clone(), dg));
            }
        }
        Variant::Performer => {
            let w = param("features").ok_or_else(|| {
                input(
                    "--variant performer",
                    "needs --param features=FILE.npy [m, D]",
                )
            })?;
            if w.shape.len() != 2 || w.shape[1] != qs[3] {
                return Err(input(
                    "--param features",
                    format!("shape {:?}: expected [m, {}]", w.shape, qs[3]),
                ));
            }
            let opts = performer::Performer {
                causal,
                ..performer::Performer::new(&w.data)
            };
            performer::forward(qv, kv, vv, &opts, &mut out)?;
            if let (Some(g), Some(d)) = (grads.as_mut(), dov) {
                let (a, b, c) = views!(g);
                performer::backward(qv, kv, vv, d, &opts, a, b, c)?;
            }
        }
        Variant::AdaptiveSpan => {
            let z = param("z")
                .ok_or_else(|| input("--variant adaptive-span", "needs --param z=FILE.npy [Hq]"))?;
            let max_span =
                max_span.ok_or_else(|| input("--variant adaptive-span", "needs --max-span S"))?;
            let span = adaptive_span::AdaptiveSpan {
                current: &z.data,
                max_span,
                ramp,
            };
            let mut lse = vec![0.0f32; qs[0] * qs[1] * qs[2]];
            adaptive_span::forward(qv, kv, vv, &span, &mut out, Some(&mut lse))?;
            if let (Some(g), Some(d)) = (grads.as_mut(), dov) {
                let mut dz = vec![0.0f32; z.data.len()];
                let (a, b, c) = views!(g);
                let ov = View::contiguous(&o, &os)?;
                adaptive_span::backward(qv, kv, vv, (ov, &lse), d, &span, (a, b, c), &mut dz)?;
                d_params.push(("z", z.shape.clone(), dz));
            }
        }
        Variant::Additive
        | Variant::LuongDot
        | Variant::LuongGeneral
        | Variant::LuongConcat
        | Variant::LuongLocal => {
            if causal {
                return Err(input(
                    format!("--variant {variant:?}"),
                    "is encoder–decoder attention: no causal form",
                ));
            }
            let need = |name: &str| {
                param(name).map(|a| &a.data[..]).ok_or_else(|| {
                    input(
                        format!("--variant {variant:?}"),
                        format!(
                            "needs --param {}",
                            known
                                .iter()
                                .filter(|&&n| !(variant == Variant::LuongLocal && n == "w"))
                                .map(|n| format!("{n}=FILE.npy"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        ),
                    )
                })
            };
            let score = match variant {
                Variant::Additive => additive::Score::Additive {
                    w_q: need("w_q")?,
                    w_k: need("w_k")?,
                    v: need("v")?,
                },
                Variant::LuongDot => additive::Score::Dot,
                Variant::LuongGeneral => additive::Score::General { w: need("w")? },
                Variant::LuongLocal => match param("w") {
                    Some(w) => additive::Score::General { w: &w.data },
                    None => additive::Score::Dot,
                },
                _ => additive::Score::Concat {
                    w: need("w")?,
                    v: need("v")?,
                },
            };
            let local = match variant {
                Variant::LuongLocal => Some(additive::Local {
                    w_p: need("w_p")?,
                    v_p: need("v_p")?,
                    half_width: rule.half_width,
                    sigma: None,
                }),
                _ => None,
            };
            let opts = additive::Additive {
                score,
                key_mask: None,
                local,
            };
            additive::forward(qv, kv, vv, &opts, &mut out, None)?;
            if let (Some(g), Some(d)) = (grads.as_mut(), dov) {
                let (a, b, c) = views!(g);
                let wg = additive::backward(qv, kv, vv, d, &opts, a, b, c)?;
                let shape = |name: &str| param(name).map(|a| a.shape.clone()).unwrap_or_default();
                let names: &[(&'static str, Vec<f32>)] = match variant {
                    Variant::Additive => &[("w_q", wg.w), ("w_k", wg.w_k), ("v", wg.v)],
                    Variant::LuongGeneral => &[("w", wg.w)],
                    Variant::LuongConcat => &[("w", wg.w), ("v", wg.v)],
                    Variant::LuongLocal if param("w").is_some() => {
                        &[("w", wg.w), ("w_p", wg.w_p), ("v_p", wg.v_p)]
                    }
                    Variant::LuongLocal => &[("w_p", wg.w_p), ("v_p", wg.v_p)],
                    _ => &[],
                };
                for (name, g) in names {
                    d_params.push((name, shape(name), g.clone()));
                }
            }
        }
        Variant::Nystrom => {
            if causal {
                return Err(input(
                    "--variant nystrom",
                    "has no causal form (its landmarks mix positions)",
                ));
            }
            let m = landmarks.ok_or_else(|| input("--variant nystrom", "needs --landmarks M"))?;
            let opts = nystrom::Nystrom::new(m);
            nystrom::forward(qv, kv, vv, &opts, &mut out)?;
            if let (Some(g), Some(d)) = (grads.as_mut(), dov) {
                let (a, b, c) = views!(g);
                nystrom::backward(qv, kv, vv, d, &opts, a, b, c)?;
            }
        }
        Variant::Linformer => {
            if causal {
                return Err(input(
                    "--variant linformer",
                    "has no causal form (its projections mix positions)",
                ));
            }
            let e = param("e")
                .ok_or_else(|| input("--variant linformer", "needs --param e=FILE.npy [N, k]"))?;
            for (name, p) in [("e", Some(e)), ("f", param("f"))] {
                if let Some(p) = p {
                    if p.shape.len() != 2 || p.shape[0] != ks[2] || p.shape != e.shape {
                        return Err(input(
                            format!("--param {name}"),
                            format!(
                                "shape {:?}: expected [{}, k], E and F alike",
                                p.shape, ks[2]
                            ),
                        ));
                    }
                }
            }
            let opts =
                linformer::Linformer::new(&e.data, param("f").map(|f| &f.data[..]), e.shape[1]);
            linformer::forward(qv, kv, vv, &opts, &mut out)?;
            if let (Some(g), Some(d)) = (grads.as_mut(), dov) {
                let mut de = vec![0.0f32; e.data.len()];
                let (a, b, c) = views!(g);
                linformer::backward(qv, kv, vv, d, &opts, (a, b, c), Some(&mut de), None)?;
                d_params.push(("e", e.shape.clone(), de));
            }
        }
        Variant::Lsh => {
            if k != q || ks != qs {
                return Err(input(
                    "--variant lsh",
                    "shares queries and keys (Reformer): give the same tensor as q and k",
                ));
            }
            let r = param("rotations").ok_or_else(|| {
                input(
                    "--variant lsh",
                    "needs --param rotations=FILE.npy [n_hashes, D, n_buckets/2]",
                )
            })?;
            if r.shape.len() != 3 || r.shape[1] != qs[3] || r.shape[0] == 0 || r.shape[2] == 0 {
                return Err(input(
                    "--param rotations",
                    format!(
                        "shape {:?}: expected [n_hashes, {}, n_buckets/2]",
                        r.shape, qs[3]
                    ),
                ));
            }
            let c = rule
                .bucket_size
                .ok_or_else(|| input("--variant lsh", "needs --bucket-size C"))?;
            let opts = lsh::Lsh::new(&r.data, r.shape[0], 2 * r.shape[2], c).causal(causal);
            lsh::forward(qv, vv, &opts, &mut out)?;
            if let (Some(g), Some(d)) = (grads.as_mut(), dov) {
                let (a, _, c) = views!(g);
                lsh::backward(qv, vv, d, &opts, a, c)?;
            }
        }
    }
    Ok(Computed { o, grads, d_params })
}
