//! Encoder–decoder attention before the Transformer: Bahdanau's additive score and Luong's dot,
//! general and concat scores, each followed by a softmax over the keys (padding hidden) and a
//! weighted sum of the values:
//! $$\alpha_{ij} = \mathrm{softmax}\_j\\,e_{ij},\qquad o_i = \sum_j \alpha_{ij} v_j,$$
//! * additive (Bahdanau): $e_{ij} = v^\top\tanh(W_q q_i + W_k k_j)$, `W_q [A, Dq]`, `W_k [A, Dk]`,
//!   `v [A]`, with $W_k K$ computed once;
//! * Luong dot: $e_{ij} = q_i\cdot k_j$ (no scale);
//! * Luong general: $e_{ij} = q_i^\top W k_j$, `W [Dq, Dk]`: the fused kernel over $\tilde k_j = W k_j$;
//! * Luong concat: $e_{ij} = v^\top\tanh(W[q_i; k_j])$, `W [A, Dq + Dk]`: additive with `W` split.
//!
//! **Local-p** (Luong et al., 2015, [`Local`]) puts any of these scores under a learned window:
//! each query predicts a real centre $p_i = N_k\\,\sigma(v_p^\top\tanh(W_p q_i))$, the softmax
//! runs over the keys $j$ with $|j - p_i| \le D$ (positions from 0), and its weights are then
//! multiplied, not renormalised, by $\exp(-(j - p_i)^2/2\sigma^2)$, $\sigma = D/2$:
//! $$o_i = \sum_{|j - p_i|\le D} \alpha_{ij}\\,e^{-(j-p_i)^2/2\sigma^2}\\,v_j.$$
//! The centre gets its gradient through the Gaussian only (the window's ends are integers),
//! and from it $W_p$, $v_p$ and $q_i$. Every key's score is still formed (cost `O(Nk)` a
//! query, not `O(D)`).
//!
//! A row whose keys are all hidden gives output 0 and zero gradients (OpenNMT's −∞ masking
//! gives NaN there). Gradients reach q, k, v and every weight: for the additive form, with
//! $g_{ija} = \partial L/\partial e_{ij}\\,v_a(1 - \tanh^2 u_{ija})$, $dW_q = \sum_i (\sum_j g_{ij})q_i^\top$,
//! $dW_k = \sum_j(\sum_i g_{ij})k_j^\top$ and $dv = \sum_{ij}\partial L/\partial e_{ij}\tanh u_{ij}$.

use super::{heads, write_out, Dims};
use crate::error::{AttnError, Result};
use crate::real::Real;
use crate::view::{View, ViewMut};
use rayon::prelude::*;

/// The score.
#[derive(Clone, Copy, Debug)]
pub enum Score<'a> {
    /// Bahdanau: $v^\top\tanh(W_q q + W_k k)$; `w_q [A, Dq]`, `w_k [A, Dk]`, `v [A]`.
    Additive {
        w_q: &'a [f32],
        w_k: &'a [f32],
        v: &'a [f32],
    },
    /// Luong dot: $q\cdot k$.
    Dot,
    /// Luong general: $q^\top W k$, `w [Dq, Dk]`.
    General { w: &'a [f32] },
    /// Luong concat: $v^\top\tanh(W[q; k])$, `w [A, Dq + Dk]`, `v [A]`.
    Concat { w: &'a [f32], v: &'a [f32] },
}

/// The options of [`forward`] and [`backward`].
#[derive(Clone, Copy, Debug)]
pub struct Additive<'a> {
    pub score: Score<'a>,
    /// The keys each batch row may use, `B × Nk` row-major (`true` = use): padding.
    pub key_mask: Option<&'a [bool]>,
    /// Luong's local-p window; `None` is global attention.
    pub local: Option<Local<'a>>,
}

impl<'a> Additive<'a> {
    /// Global attention with `score`, no padding.
    pub fn new(score: Score<'a>) -> Self {
        Self {
            score,
            key_mask: None,
            local: None,
        }
    }
}

/// Luong's local-p window: a predicted centre and a Gaussian over `[p − D, p + D]`.
#[derive(Clone, Copy, Debug)]
pub struct Local<'a> {
    /// $W_p$, `[A_p, Dq]` row-major.
    pub w_p: &'a [f32],
    /// $v_p$, `[A_p]`.
    pub v_p: &'a [f32],
    /// The half-width `D`.
    pub half_width: usize,
    /// The Gaussian's σ; `None` is `D/2`.
    pub sigma: Option<f32>,
}

impl Local<'_> {
    fn sigma(&self) -> f32 {
        self.sigma.unwrap_or(self.half_width as f32 / 2.0)
    }

    /// Each query row's centre `p` (`nq`) and its `tanh(W_p q)` (`nq × A_p`).
    fn centres(&self, q: &[f32], dq: usize, nk: usize) -> (Vec<f32>, Vec<f32>) {
        let a = self.v_p.len();
        let th: Vec<f32> = q
            .chunks_exact(dq)
            .flat_map(|qi| (0..a).map(move |c| super::dot(&self.w_p[c * dq..][..dq], qi).tanh()))
            .collect();
        let p = th
            .chunks_exact(a)
            .map(|t| nk as f32 / (1.0 + (-super::dot(self.v_p, t)).exp()))
            .collect();
        (p, th)
    }

    /// Hides the keys outside `[p − D, p + D]`.
    fn window(&self, row: &mut [f32], p: f32) {
        for (j, x) in row.iter_mut().enumerate() {
            if (j as f32 - p).abs() > self.half_width as f32 {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    /// The Gaussian at key `j` for centre `p`.
    fn gauss(&self, j: usize, p: f32) -> f32 {
        let (t, s) = (j as f32 - p, self.sigma());
        (-t * t / (2.0 * s * s)).exp()
    }
}

/// Gradients of the score's weights, shaped as the weights (empty where a score has none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreGrads {
    /// `dW_q` (additive), `dW` (general, concat).
    pub w: Vec<f32>,
    /// `dW_k` (additive).
    pub w_k: Vec<f32>,
    /// `dv` (additive, concat).
    pub v: Vec<f32>,
    /// `dW_p` (local-p).
    pub w_p: Vec<f32>,
    /// `dv_p` (local-p).
    pub v_p: Vec<f32>,
}

/// The additive form's pieces, whatever the score's name: `W_q` and `W_k` as strided rows.
#[derive(Clone, Copy)]
struct Tanh<'a> {
    /// Row `a` of W_q at `w_q[a·stride..][..dq]`, of W_k at `w_k[a·stride..][..dk]`.
    w_q: &'a [f32],
    w_k: &'a [f32],
    stride: usize,
    v: &'a [f32],
    a: usize,
}

impl<'a> Additive<'a> {
    fn check(&self, q: &View, k: &View, v: &View) -> Result<Dims> {
        let dims = Dims::of_cross(q, k, v)?;
        let (dq, dk) = (dims.d, k.shape()[3]);
        let finite = |name: &'static str, x: &[f32]| match x.iter().find(|x| !x.is_finite()) {
            Some(&bad) => Err(AttnError::InvalidOption {
                option: name,
                value: bad as f64,
                reason: "score weights must be finite",
            }),
            None => Ok(()),
        };
        match self.score {
            Score::Additive { w_q, w_k, v } => {
                let a = v.len();
                if a == 0 {
                    return Err(AttnError::LengthMismatch {
                        tensor: "v",
                        expected: 1,
                        got: 0,
                    });
                }
                crate::error::expect_len("w_q", w_q.len(), a * dq)?;
                crate::error::expect_len("w_k", w_k.len(), a * dk)?;
                finite("w_q", w_q)?;
                finite("w_k", w_k)?;
                finite("v", v)?;
            }
            Score::Dot => {
                if dq != dk {
                    return Err(AttnError::ShapeMismatch {
                        tensor: "k",
                        expected: vec![dims.b, dims.hkv, dims.nk, dq],
                        got: k.shape().to_vec(),
                    });
                }
            }
            Score::General { w } => {
                crate::error::expect_len("w", w.len(), dq * dk)?;
                finite("w", w)?;
            }
            Score::Concat { w, v } => {
                if v.is_empty() {
                    return Err(AttnError::LengthMismatch {
                        tensor: "v",
                        expected: 1,
                        got: 0,
                    });
                }
                crate::error::expect_len("w", w.len(), v.len() * (dq + dk))?;
                finite("w", w)?;
                finite("v", v)?;
            }
        }
        if let Some(m) = self.key_mask {
            crate::error::expect_len("key_mask", m.len(), dims.b * dims.nk)?;
        }
        if let Some(l) = self.local {
            if l.v_p.is_empty() {
                return Err(AttnError::LengthMismatch {
                    tensor: "v_p",
                    expected: 1,
                    got: 0,
                });
            }
            crate::error::expect_len("w_p", l.w_p.len(), l.v_p.len() * dq)?;
            finite("w_p", l.w_p)?;
            finite("v_p", l.v_p)?;
            let sigma = l.sigma();
            if !(sigma > 0.0 && sigma.is_finite()) {
                return Err(AttnError::InvalidOption {
                    option: "sigma",
                    value: sigma as f64,
                    reason: "the window's Gaussian needs a positive, finite sigma (half-width at least 1)",
                });
            }
        }
        Ok(dims)
    }

    fn tanh(&self, dq: usize) -> Option<Tanh<'a>> {
        match self.score {
            Score::Additive { w_q, w_k, v } => Some(Tanh {
                w_q,
                w_k,
                stride: 0,
                v,
                a: v.len(),
            }),
            Score::Concat { w, v } => Some(Tanh {
                w_q: w,
                w_k: &w[dq..],
                stride: w.len() / v.len(),
                v,
                a: v.len(),
            }),
            _ => None,
        }
    }
}

impl Tanh<'_> {
    fn row_q(&self, a: usize, dq: usize) -> &[f32] {
        let s = if self.stride == 0 { dq } else { self.stride };
        &self.w_q[a * s..a * s + dq]
    }
    fn row_k(&self, a: usize, dk: usize) -> &[f32] {
        let s = if self.stride == 0 { dk } else { self.stride };
        &self.w_k[a * s..a * s + dk]
    }
    /// Each row of `x` projected by W_k (`keys`) or W_q: `n × A`.
    fn project(&self, x: &[f32], d: usize, keys: bool) -> Vec<f32> {
        x.chunks_exact(d)
            .flat_map(|r| {
                (0..self.a).map(move |a| {
                    let w = if keys {
                        self.row_k(a, d)
                    } else {
                        self.row_q(a, d)
                    };
                    super::dot(w, r)
                })
            })
            .collect()
    }
}

/// The output rows of one head from its scores `e` (`nq × nk`, hidden keys already −∞): the
/// weights written back into `e` (0 for a row with no visible key) and `o`. With `local`, each
/// row's softmax is then multiplied by its window's Gaussian (centres `p`).
fn softmax_out(
    e: &mut [f32],
    v: &[f32],
    (nk, dv): (usize, usize),
    o: &mut [f32],
    local: Option<(&Local, &[f32])>,
) {
    for (i, (row, oi)) in e
        .chunks_exact_mut(nk)
        .zip(o.chunks_exact_mut(dv))
        .enumerate()
    {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        oi.fill(0.0);
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let mut z = 0.0f32;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            z += *x;
        }
        for (j, x) in row.iter_mut().enumerate() {
            *x /= z;
            if let Some((l, p)) = local {
                *x *= l.gauss(j, p[i]);
            }
            super::axpy(oi, *x, &v[j * dv..(j + 1) * dv]);
        }
    }
}

/// Additive or Luong attention of `q` (`[B, Hq, Nq, Dq]`) over `k` (`[B, Hkv, Nk, Dk]`) and `v`
/// into `out`; with `weights` (`[B, Hq, Nq, Nk]`), also the attention weights.
///
/// ```
/// use attentive::variants::additive::{forward, Additive, Score};
/// use attentive::{View, ViewMut};
/// // Dot scores 0 and ln 3 for the two keys: weights ¼ and ¾.
/// let q = [1.0f32];
/// let k = [0.0f32, 3f32.ln()];
/// let v = [4.0f32, 8.0];
/// let mut o = [0.0f32];
/// let opts = Additive::new(Score::Dot);
/// forward(View::contiguous(&q, &[1, 1, 1, 1]).unwrap(), View::contiguous(&k, &[1, 1, 2, 1]).unwrap(),
///     View::contiguous(&v, &[1, 1, 2, 1]).unwrap(), &opts,
///     &mut ViewMut::contiguous(&mut o, [1, 1, 1, 1]).unwrap(), None).unwrap();
/// assert!((o[0] - 7.0).abs() < 1e-5);
/// ```
///
/// # Errors
/// Shapes that disagree, an empty dimension, query heads not a multiple of key/value heads,
/// weights of the wrong size or not finite, a key mask of the wrong length.
pub fn forward(
    q: View,
    k: View,
    v: View,
    opts: &Additive,
    out: &mut ViewMut,
    weights: Option<&mut [f32]>,
) -> Result<()> {
    let dims = opts.check(&q, &k, &v)?;
    let Dims {
        b,
        hq,
        nq,
        nk,
        d: dq,
        dv,
        ..
    } = dims;
    let dk = k.shape()[3];
    crate::error::expect_shape("out", out.shape(), [b, hq, nq, dv])?;
    if let Some(w) = weights.as_deref() {
        crate::error::expect_len("weights", w.len(), b * hq * nq * nk)?;
    }
    let (qh, kh, vh) = (heads(&q)?, heads(&k)?, heads(&v)?);
    let ktilde = general_keys(opts, &kh, (dq, dk));
    let mut probs = vec![0.0f32; b * hq * nq * nk]; //                     [B, Hq, Nq, Nk]
    write_out(out, |o| {
        o.par_chunks_mut(nq * dv)
            .zip(probs.par_chunks_mut(nq * nk))
            .enumerate()
            .for_each(|(bh, (o, e))| {
                let (bi, h) = (bh / hq, bh % hq);
                let kv = bi * dims.hkv + h / dims.group();
                let qr = &qh[bh * nq * dq..][..nq * dq];
                let kr = &kh[kv * nk * dk..][..nk * dk];
                let mask = opts.key_mask.map(|m| &m[bi * nk..(bi + 1) * nk]);
                scores(
                    opts,
                    (
                        qr,
                        kr,
                        ktilde.as_deref().map(|t| &t[kv * nk * dq..][..nk * dq]),
                    ),
                    (dq, dk),
                    mask,
                    e,
                );
                let centres = opts.local.map(|l| {
                    let (p, _) = l.centres(qr, dq, nk);
                    for (row, &pi) in e.chunks_exact_mut(nk).zip(&p) {
                        l.window(row, pi);
                    }
                    (l, p)
                });
                let local = centres.as_ref().map(|(l, p)| (l, &p[..]));
                softmax_out(e, &vh[kv * nk * dv..][..nk * dv], (nk, dv), o, local);
            })
    });
    if let Some(w) = weights {
        w.copy_from_slice(&probs);
    }
    Ok(())
}

/// General's `k̃ = W k` for every key/value head (`[B·Hkv][Nk × Dq]`); `None` for other scores.
fn general_keys(opts: &Additive, kh: &[f32], (dq, dk): (usize, usize)) -> Option<Vec<f32>> {
    let Score::General { w } = opts.score else {
        return None;
    };
    Some(
        kh.chunks_exact(dk)
            .flat_map(|kr| (0..dq).map(move |a| super::dot(&w[a * dk..(a + 1) * dk], kr)))
            .collect(),
    )
}

/// One head's scores `e` (`nq × nk`), −∞ at hidden keys.
fn scores(
    opts: &Additive,
    (qr, kr, ktilde): (&[f32], &[f32], Option<&[f32]>),
    (dq, dk): (usize, usize),
    mask: Option<&[bool]>,
    e: &mut [f32],
) {
    let nk = kr.len() / dk;
    match opts.tanh(dq) {
        Some(t) => {
            let (pq, pk) = (t.project(qr, dq, false), t.project(kr, dk, true));
            for (i, row) in e.chunks_exact_mut(nk).enumerate() {
                let ui = &pq[i * t.a..(i + 1) * t.a];
                for (j, x) in row.iter_mut().enumerate() {
                    let uj = &pk[j * t.a..(j + 1) * t.a];
                    *x = (0..t.a).map(|a| t.v[a] * (ui[a] + uj[a]).tanh()).sum();
                }
            }
        }
        None => {
            let keys = ktilde.unwrap_or(kr);
            for (qi, row) in qr.chunks_exact(dq).zip(e.chunks_exact_mut(nk)) {
                for (x, kj) in row.iter_mut().zip(keys.chunks_exact(dq)) {
                    *x = super::dot(qi, kj);
                }
            }
        }
    }
    if let Some(m) = mask {
        for row in e.chunks_exact_mut(nk) {
            for (x, &keep) in row.iter_mut().zip(m) {
                if !keep {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Gradients of [`forward`]: dQ, dK, dV (dK and dV summed over each group of query heads) and
/// the score's weights' (summed over batch and heads).
///
/// # Errors
/// As [`forward`], and gradients of the wrong shape.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: View,
    k: View,
    v: View,
    d_o: View,
    opts: &Additive,
    dq: &mut ViewMut,
    dk: &mut ViewMut,
    dv: &mut ViewMut,
) -> Result<ScoreGrads> {
    let dims = opts.check(&q, &k, &v)?;
    let Dims {
        b,
        hq,
        hkv,
        nq,
        nk,
        d: dqd,
        dv: dvd,
    } = dims;
    let dkd = k.shape()[3];
    crate::error::expect_shape("d_o", d_o.shape(), [b, hq, nq, dvd])?;
    crate::error::expect_shape("dq", dq.shape(), [b, hq, nq, dqd])?;
    crate::error::expect_shape("dk", dk.shape(), [b, hkv, nk, dkd])?;
    crate::error::expect_shape("dv", dv.shape(), [b, hkv, nk, dvd])?;
    let (qh, kh, vh, doh) = (heads(&q)?, heads(&k)?, heads(&v)?, heads(&d_o)?);
    let ktilde = general_keys(opts, &kh, (dqd, dkd));
    let group = dims.group();
    let tanh = opts.tanh(dqd);
    let a = tanh.map_or(0, |t| t.a);
    // Per query head: dQ rows, dK and dV contributions, and the weights' gradients.
    struct Part {
        dq: Vec<f32>,
        dk: Vec<f32>,
        dv: Vec<f32>,
        /// dW_q, dW_k, dv (additive, concat) or dW (general, in `wq`).
        wq: Vec<f32>,
        wk: Vec<f32>,
        va: Vec<f32>,
        /// dW_p, dv_p (local-p).
        wp: Vec<f32>,
        vp: Vec<f32>,
    }
    let parts: Vec<Part> = (0..b * hq)
        .into_par_iter()
        .map(|bh| {
            let (bi, h) = (bh / hq, bh % hq);
            let kv = bi * hkv + h / group;
            let qr = &qh[bh * nq * dqd..][..nq * dqd];
            let kr = &kh[kv * nk * dkd..][..nk * dkd];
            let vr = &vh[kv * nk * dvd..][..nk * dvd];
            let dor = &doh[bh * nq * dvd..][..nq * dvd];
            let kt = ktilde.as_deref().map(|t| &t[kv * nk * dqd..][..nk * dqd]);
            let mask = opts.key_mask.map(|m| &m[bi * nk..(bi + 1) * nk]);
            let mut p = vec![0.0f32; nq * nk];
            let mut o = vec![0.0f32; nq * dvd];
            scores(opts, (qr, kr, kt), (dqd, dkd), mask, &mut p);
            let centres = opts.local.map(|l| {
                let (c, th) = l.centres(qr, dqd, nk);
                for (row, &ci) in p.chunks_exact_mut(nk).zip(&c) {
                    l.window(row, ci);
                }
                (l, c, th)
            });
            softmax_out(&mut p, vr, (nk, dvd), &mut o, None); // p = α, the softmax
                                                              // With the Gaussian g (1 when global), w = α∘g: dV = wᵀ dO; dα_ij = g_ij dO_i·v_j;
                                                              // dE_ij = α_ij (dα_ij − Σ_j α_ij dα_ij); the centre's dp_i = Σ_j w_ij dO_i·v_j (j − p_i)/σ².
            let mut dvp = vec![0.0f32; nk * dvd];
            let mut de = vec![0.0f32; nq * nk];
            let mut dcentre = vec![0.0f32; nq];
            for i in 0..nq {
                let doi = &dor[i * dvd..(i + 1) * dvd];
                let mut di = 0.0f32;
                for j in 0..nk {
                    let a = p[i * nk + j];
                    if a == 0.0 {
                        continue;
                    }
                    let g = centres.as_ref().map_or(1.0, |(l, c, _)| l.gauss(j, c[i]));
                    let dvj = super::dot(doi, &vr[j * dvd..(j + 1) * dvd]);
                    super::axpy(&mut dvp[j * dvd..(j + 1) * dvd], a * g, doi);
                    de[i * nk + j] = g * dvj;
                    di += a * g * dvj;
                    if let Some((l, c, _)) = &centres {
                        let sigma = l.sigma();
                        dcentre[i] += a * g * dvj * (j as f32 - c[i]) / (sigma * sigma);
                    }
                }
                for (e, &a) in de[i * nk..(i + 1) * nk].iter_mut().zip(&p[i * nk..]) {
                    *e = a * (*e - di);
                }
            }
            let (mut dqp, mut dkp) = (vec![0.0f32; nq * dqd], vec![0.0f32; nk * dkd]);
            let (mut wq, mut wk, mut va) = (Vec::new(), Vec::new(), Vec::new());
            match tanh {
                Some(t) => {
                    let (pq, pk) = (t.project(qr, dqd, false), t.project(kr, dkd, true));
                    // G_q[i, a] = Σ_j g_ija, G_k[j, a] = Σ_i g_ija, dv_a = Σ dE tanh(u)
                    let (mut gq, mut gk) = (vec![0.0f32; nq * a], vec![0.0f32; nk * a]);
                    va = vec![0.0f32; a];
                    for i in 0..nq {
                        for j in 0..nk {
                            let g = de[i * nk + j];
                            if g == 0.0 {
                                continue;
                            }
                            for c in 0..a {
                                let th = (pq[i * a + c] + pk[j * a + c]).tanh();
                                va[c] += g * th;
                                let x = g * t.v[c] * (1.0 - th * th);
                                gq[i * a + c] += x;
                                gk[j * a + c] += x;
                            }
                        }
                    }
                    // dq_i = Σ_a G_q[i,a] W_q[a]; dW_q[a] = Σ_i G_q[i,a] q_i (likewise for keys)
                    wq = vec![0.0f32; a * dqd];
                    wk = vec![0.0f32; a * dkd];
                    for c in 0..a {
                        let (rq, rk) = (t.row_q(c, dqd), t.row_k(c, dkd));
                        for i in 0..nq {
                            let g = gq[i * a + c];
                            super::axpy(&mut dqp[i * dqd..(i + 1) * dqd], g, rq);
                            super::axpy(
                                &mut wq[c * dqd..(c + 1) * dqd],
                                g,
                                &qr[i * dqd..(i + 1) * dqd],
                            );
                        }
                        for j in 0..nk {
                            let g = gk[j * a + c];
                            super::axpy(&mut dkp[j * dkd..(j + 1) * dkd], g, rk);
                            super::axpy(
                                &mut wk[c * dkd..(c + 1) * dkd],
                                g,
                                &kr[j * dkd..(j + 1) * dkd],
                            );
                        }
                    }
                }
                None => {
                    // e = q·k̃: dq = dE·K̃, dk̃ = dEᵀ·Q; general: dk = Wᵀ dk̃, dW = Σ_j dk̃_j k_jᵀ
                    let keys = kt.unwrap_or(kr);
                    let mut dkt = vec![0.0f32; nk * dqd];
                    for i in 0..nq {
                        for j in 0..nk {
                            let g = de[i * nk + j];
                            if g == 0.0 {
                                continue;
                            }
                            super::axpy(
                                &mut dqp[i * dqd..(i + 1) * dqd],
                                g,
                                &keys[j * dqd..(j + 1) * dqd],
                            );
                            super::axpy(
                                &mut dkt[j * dqd..(j + 1) * dqd],
                                g,
                                &qr[i * dqd..(i + 1) * dqd],
                            );
                        }
                    }
                    match opts.score {
                        Score::General { w } => {
                            wq = vec![0.0f32; dqd * dkd];
                            for j in 0..nk {
                                for r in 0..dqd {
                                    let g = dkt[j * dqd + r];
                                    super::axpy(
                                        &mut dkp[j * dkd..(j + 1) * dkd],
                                        g,
                                        &w[r * dkd..(r + 1) * dkd],
                                    );
                                    super::axpy(
                                        &mut wq[r * dkd..(r + 1) * dkd],
                                        g,
                                        &kr[j * dkd..(j + 1) * dkd],
                                    );
                                }
                            }
                        }
                        _ => dkp = dkt,
                    }
                }
            }
            // The centre p = Nk·σ(z), z = v_p·tanh(W_p q): dz = dp·p(1 − p/Nk).
            let (mut wp, mut vp) = (Vec::new(), Vec::new());
            if let Some((l, c, th)) = &centres {
                let ap = l.v_p.len();
                wp = vec![0.0f32; ap * dqd];
                vp = vec![0.0f32; ap];
                for i in 0..nq {
                    let dz = dcentre[i] * c[i] * (1.0 - c[i] / nk as f32);
                    let qi = &qr[i * dqd..(i + 1) * dqd];
                    for a in 0..ap {
                        let t = th[i * ap + a];
                        vp[a] += dz * t;
                        let du = dz * l.v_p[a] * (1.0 - t * t);
                        super::axpy(&mut wp[a * dqd..(a + 1) * dqd], du, qi);
                        super::axpy(
                            &mut dqp[i * dqd..(i + 1) * dqd],
                            du,
                            &l.w_p[a * dqd..][..dqd],
                        );
                    }
                }
            }
            Part {
                dq: dqp,
                dk: dkp,
                dv: dvp,
                wq,
                wk,
                va,
                wp,
                vp,
            }
        })
        .collect();
    // Sum the groups' key and value gradients and every head's weight gradients, in head order.
    let (mut dks, mut dvs) = (
        vec![0.0f32; b * hkv * nk * dkd],
        vec![0.0f32; b * hkv * nk * dvd],
    );
    let mut grads = ScoreGrads::default();
    for (bh, part) in parts.iter().enumerate() {
        let kv = bh / hq * hkv + bh % hq / group;
        let add = |to: &mut [f32], from: &[f32]| to.iter_mut().zip(from).for_each(|(x, y)| *x += y);
        add(&mut dks[kv * nk * dkd..][..nk * dkd], &part.dk);
        add(&mut dvs[kv * nk * dvd..][..nk * dvd], &part.dv);
        for (to, from) in [
            (&mut grads.w, &part.wq),
            (&mut grads.w_k, &part.wk),
            (&mut grads.v, &part.va),
            (&mut grads.w_p, &part.wp),
            (&mut grads.v_p, &part.vp),
        ] {
            if to.is_empty() {
                to.resize(from.len(), 0.0);
            }
            add(to, from);
        }
    }
    if let Score::Concat { w, v } = opts.score {
        // W = [W_q | W_k]: interleave the two halves back into rows of Dq + Dk.
        let (wq, wk) = (std::mem::take(&mut grads.w), std::mem::take(&mut grads.w_k));
        grads.w = (0..v.len())
            .flat_map(|c| {
                wq[c * dqd..(c + 1) * dqd]
                    .iter()
                    .chain(&wk[c * dkd..(c + 1) * dkd])
                    .copied()
            })
            .collect();
        debug_assert_eq!(grads.w.len(), w.len());
    }
    let mut rows = parts.iter().flat_map(|p| p.dq.chunks_exact(dqd));
    dq.for_each_row(|_, _, _, row| row.copy_from_slice(rows.next().expect("one row each")));
    let mut rows = dks.chunks_exact(dkd);
    dk.for_each_row(|_, _, _, row| row.copy_from_slice(rows.next().expect("one row each")));
    let mut rows = dvs.chunks_exact(dvd);
    dv.for_each_row(|_, _, _, row| row.copy_from_slice(rows.next().expect("one row each")));
    Ok(grads)
}

/// The oracle: every score and its gradients one term at a time. Generic over the float type:
/// `f64` is the oracle, `f32` the naive baseline.
pub mod oracle {
    use super::*;

    /// `(o, dq, dk, dv, [dW or dW_q, dW_k, dv, dW_p, dv_p])`, row-major.
    pub type Out<T> = (Vec<T>, Vec<T>, Vec<T>, Vec<T>, [Vec<T>; 5]);

    /// # Errors
    /// As [`forward`].
    #[allow(clippy::needless_range_loop)] // term by term, as the definition reads
    pub fn additive<T: Real>(
        q: View,
        k: View,
        v: View,
        d_o: View,
        opts: &Additive,
    ) -> Result<Out<T>> {
        let dims = opts.check(&q, &k, &v)?;
        let Dims {
            b,
            hq,
            hkv,
            nq,
            nk,
            d: dq,
            dv,
        } = dims;
        let dk = k.shape()[3];
        crate::error::expect_shape("d_o", d_o.shape(), [b, hq, nq, dv])?;
        let f = T::from_f32;
        let group = dims.group();
        // (W_q row a, W_k row a, v_a) as closures over the score's own layout.
        type Entry<'x, T> = Box<dyn Fn(usize, usize) -> T + 'x>;
        let (a_len, wq_at, wk_at, va): (usize, Entry<T>, Entry<T>, Vec<T>) = match opts.score {
            Score::Additive { w_q, w_k, v } => (
                v.len(),
                Box::new(move |a, c| f(w_q[a * dq + c])),
                Box::new(move |a, c| f(w_k[a * dk + c])),
                v.iter().map(|&x| f(x)).collect(),
            ),
            Score::Concat { w, v } => (
                v.len(),
                Box::new(move |a, c| f(w[a * (dq + dk) + c])),
                Box::new(move |a, c| f(w[a * (dq + dk) + dq + c])),
                v.iter().map(|&x| f(x)).collect(),
            ),
            _ => (
                0,
                Box::new(|_, _| T::ZERO),
                Box::new(|_, _| T::ZERO),
                Vec::new(),
            ),
        };
        let general = match opts.score {
            Score::General { w } => Some(w),
            _ => None,
        };
        let mut o = vec![T::ZERO; b * hq * nq * dv];
        let mut gq = vec![T::ZERO; b * hq * nq * dq];
        let mut gk = vec![T::ZERO; b * hkv * nk * dk];
        let mut gv = vec![T::ZERO; b * hkv * nk * dv];
        let (mut w1, mut w2, mut w3) = match (opts.score, general) {
            (_, Some(_)) => (vec![T::ZERO; dq * dk], Vec::new(), Vec::new()),
            (Score::Dot, _) => (Vec::new(), Vec::new(), Vec::new()),
            _ => (
                vec![T::ZERO; a_len * dq],
                vec![T::ZERO; a_len * dk],
                vec![T::ZERO; a_len],
            ),
        };
        let (mut wp, mut vp) = match opts.local {
            Some(l) => (vec![T::ZERO; l.w_p.len()], vec![T::ZERO; l.v_p.len()]),
            None => (Vec::new(), Vec::new()),
        };
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / group;
                let qa = |i: usize, c: usize| f(q.at(bi, h, i, c));
                let ka = |j: usize, c: usize| f(k.at(bi, kh, j, c));
                for i in 0..nq {
                    // Local-p: tanh(W_p q_i), the centre, the Gaussian at each key.
                    let (th, centre) = match opts.local {
                        Some(l) => {
                            let th: Vec<T> = (0..l.v_p.len())
                                .map(|a| {
                                    (0..dq)
                                        .fold(T::ZERO, |s, c| s + f(l.w_p[a * dq + c]) * qa(i, c))
                                        .tanh()
                                })
                                .collect();
                            let z = th
                                .iter()
                                .zip(l.v_p)
                                .fold(T::ZERO, |s, (&t, &v)| s + f(v) * t);
                            (th, f(nk as f32) * (T::ONE + (-z).exp()).recip())
                        }
                        None => (Vec::new(), T::ZERO),
                    };
                    let sigma = f(opts.local.map_or(1.0, |l| l.sigma()));
                    let gauss = |j: usize| match opts.local {
                        Some(_) => {
                            let t = f(j as f32) - centre;
                            (-(t * t) * (f(2.0) * sigma * sigma).recip()).exp()
                        }
                        None => T::ONE,
                    };
                    let in_window = |j: usize| {
                        opts.local.is_none_or(|l| {
                            let t = f(j as f32) - centre;
                            let hw = f(l.half_width as f32);
                            t <= hw && -t <= hw
                        })
                    };
                    let vis =
                        |j: usize| opts.key_mask.is_none_or(|m| m[bi * nk + j]) && in_window(j);
                    // e_ij, and for the tanh forms u_ija
                    let u = |j: usize, a: usize| {
                        (0..dq).fold(T::ZERO, |s, c| s + wq_at(a, c) * qa(i, c))
                            + (0..dk).fold(T::ZERO, |s, c| s + wk_at(a, c) * ka(j, c))
                    };
                    let e: Vec<T> = (0..nk)
                        .map(|j| match (opts.score, general) {
                            (_, Some(w)) => (0..dq).fold(T::ZERO, |s, r| {
                                s + qa(i, r)
                                    * (0..dk).fold(T::ZERO, |t, c| t + f(w[r * dk + c]) * ka(j, c))
                            }),
                            (Score::Dot, _) => {
                                (0..dq).fold(T::ZERO, |s, c| s + qa(i, c) * ka(j, c))
                            }
                            _ => (0..a_len).fold(T::ZERO, |s, a| s + va[a] * u(j, a).tanh()),
                        })
                        .collect();
                    let m = (0..nk)
                        .filter(|&j| vis(j))
                        .map(|j| e[j])
                        .fold(T::NEG_INF, |a, x| if x > a { x } else { a });
                    if m == T::NEG_INF {
                        continue;
                    }
                    let ex: Vec<T> = (0..nk)
                        .map(|j| if vis(j) { (e[j] - m).exp() } else { T::ZERO })
                        .collect();
                    let z = ex.iter().fold(T::ZERO, |s, &x| s + x);
                    let p: Vec<T> = ex.iter().map(|&x| x * z.recip()).collect();
                    let row = (bi * hq + h) * nq + i;
                    for c in 0..dv {
                        o[row * dv + c] = (0..nk)
                            .fold(T::ZERO, |s, j| s + p[j] * gauss(j) * f(v.at(bi, kh, j, c)));
                    }
                    let g: Vec<T> = (0..dv).map(|c| f(d_o.at(bi, h, i, c))).collect();
                    let dd = (0..dv).fold(T::ZERO, |s, c| s + g[c] * o[row * dv + c]);
                    let mut dcentre = T::ZERO;
                    for j in 0..nk {
                        if !vis(j) {
                            continue;
                        }
                        let kj = (bi * hkv + kh) * nk + j;
                        for c in 0..dv {
                            gv[kj * dv + c] = gv[kj * dv + c] + p[j] * gauss(j) * g[c];
                        }
                        let gvj = (0..dv).fold(T::ZERO, |s, c| s + g[c] * f(v.at(bi, kh, j, c)));
                        dcentre = dcentre
                            + p[j]
                                * gauss(j)
                                * gvj
                                * (f(j as f32) - centre)
                                * (sigma * sigma).recip();
                        let de = p[j] * (gauss(j) * gvj - dd);
                        match (opts.score, general) {
                            (_, Some(w)) => {
                                for r in 0..dq {
                                    for c in 0..dk {
                                        let wv = f(w[r * dk + c]);
                                        gq[row * dq + r] = gq[row * dq + r] + de * wv * ka(j, c);
                                        gk[kj * dk + c] = gk[kj * dk + c] + de * qa(i, r) * wv;
                                        w1[r * dk + c] = w1[r * dk + c] + de * qa(i, r) * ka(j, c);
                                    }
                                }
                            }
                            (Score::Dot, _) => {
                                for c in 0..dq {
                                    gq[row * dq + c] = gq[row * dq + c] + de * ka(j, c);
                                    gk[kj * dk + c] = gk[kj * dk + c] + de * qa(i, c);
                                }
                            }
                            _ => {
                                for a in 0..a_len {
                                    let th = u(j, a).tanh();
                                    w3[a] = w3[a] + de * th;
                                    let x = de * va[a] * (T::ONE - th * th);
                                    for c in 0..dq {
                                        gq[row * dq + c] = gq[row * dq + c] + x * wq_at(a, c);
                                        w1[a * dq + c] = w1[a * dq + c] + x * qa(i, c);
                                    }
                                    for c in 0..dk {
                                        gk[kj * dk + c] = gk[kj * dk + c] + x * wk_at(a, c);
                                        w2[a * dk + c] = w2[a * dk + c] + x * ka(j, c);
                                    }
                                }
                            }
                        }
                    }
                    if let Some(l) = opts.local {
                        // centre = Nk·σ(z): dz = dcentre·centre·(1 − centre/Nk)
                        let dz = dcentre * centre * (T::ONE - centre * f(nk as f32).recip());
                        for a in 0..l.v_p.len() {
                            vp[a] = vp[a] + dz * th[a];
                            let du = dz * f(l.v_p[a]) * (T::ONE - th[a] * th[a]);
                            for c in 0..dq {
                                wp[a * dq + c] = wp[a * dq + c] + du * qa(i, c);
                                gq[row * dq + c] = gq[row * dq + c] + du * f(l.w_p[a * dq + c]);
                            }
                        }
                    }
                }
            }
        }
        if let Score::Concat { .. } = opts.score {
            // [dW_q | dW_k] as rows of Dq + Dk.
            w1 = (0..a_len)
                .flat_map(|a| {
                    w1[a * dq..(a + 1) * dq]
                        .iter()
                        .chain(&w2[a * dk..(a + 1) * dk])
                        .copied()
                        .collect::<Vec<_>>()
                })
                .collect();
            w2 = Vec::new();
        }
        Ok((o, gq, gk, gv, [w1, w2, w3, wp, vp]))
    }
}
