//! Decayed and gated linear attention (RetNet's fixed decay per head; GLA's data-dependent
//! gates; the core of Mamba-2's SSD), causal, no feature map and no denominator:
//! $$S_t = \mathrm{Diag}(e^{g_t})\\,S_{t-1} + k_t v_t^\top,\qquad o_t = S_t^\top (\text{scale}\cdot q_t),$$
//! with log-gates $g_t \le 0$ per feature (GLA) or one per head for every step (RetNet,
//! $\gamma = e^{g}$), and scale $1/\sqrt{D}$ by default. Equivalently, with $B_t = \sum_{s \le t} g_s$,
//! $o_t = \sum_{j \le t} \sum_d \text{scale}\\,q_{td} k_{jd} e^{B_{td} - B_{jd}} v_j$.
//!
//! **Chunked** ([`CHUNK`] steps, `G` the in-chunk cumulative sum of g): row i of a chunk is
//! $(\text{scale}\\,q_i \odot e^{G_i}) S_{\text{start}} + \sum_{j \le i} A_{ij} v_j$ with
//! $A_{ij} = \sum_d \text{scale}\\,q_{id} k_{jd} e^{G_{id} - G_{jd}}$, and
//! $S_{\text{next}} = e^{G_\text{last}} \odot S_{\text{start}} + \sum_j (k_j \odot e^{G_\text{last} - G_j}) v_j^\top$.
//! Every decay factor is at most 1: across sub-blocks of a chunk a pair's decay is a product
//! through the first step of the later sub-block, inside one each difference $G_i - G_j$ is
//! taken in log space (never $e^{G_i}\cdot e^{-G_j}$, which overflows and, even where it does
//! not, magnifies the rounding of its arguments).
//!
//! **Backward**: dq, dk, dv through the same chunks (queries front to back with the states,
//! keys back to front with the state gradients), and the gates from the closed form:
//! $\partial L/\partial B_{td} = q_{td}\\,dq_{td} - k_{td}\\,dk_{td}$, then
//! $dg_{sd} = \sum_{t \ge s} \partial L/\partial B_{td}$.

use super::{axpy, gemm, heads, write_out, Dims};
use crate::error::{AttnError, Result};
use crate::real::Real;
use crate::simd::{Isa, Kernels};
use crate::view::{View, ViewMut};
use rayon::prelude::*;

/// Steps per chunk, as [`linear::CHUNK`](super::linear::CHUNK).
pub const CHUNK: usize = 64;

/// How the state decays.
#[derive(Clone, Copy, Debug)]
pub enum Decay<'a> {
    /// One log-decay per key/value head, the same every step (RetNet: `g = ln γ`), `[Hkv]`.
    PerHead(&'a [f32]),
    /// A log-gate per step and feature (GLA), `[B, Hkv, N, D]`.
    Gates(View<'a>),
}

/// The options of [`forward`] and [`backward`].
#[derive(Clone, Copy, Debug)]
pub struct Gated<'a> {
    pub decay: Decay<'a>,
    /// Multiplies q; `None` is $1/\sqrt{D}$.
    pub scale: Option<f32>,
    /// The instruction set of the products (default: the fastest this CPU has).
    pub isa: Isa,
}

impl<'a> Gated<'a> {
    /// Gated attention with `decay` and the default scale and instruction set.
    pub fn new(decay: Decay<'a>) -> Self {
        Self {
            decay,
            scale: None,
            isa: Isa::best(),
        }
    }

    fn check(&self, q: &View, k: &View, v: &View) -> Result<Dims> {
        let dims = Dims::of(q, k, v)?;
        if dims.nq != dims.nk {
            return Err(AttnError::ConflictingOptions {
                a: "gated linear attention",
                b: "Nq ≠ Nk",
                reason: "it is causal: query t reads the state after key t",
            });
        }
        let bad = |x: f32| !(x.is_finite() && x <= 0.0);
        match self.decay {
            Decay::PerHead(g) => {
                crate::error::expect_len("decay", g.len(), dims.hkv)?;
                if let Some(&x) = g.iter().find(|&&x| bad(x)) {
                    return Err(AttnError::InvalidOption {
                        option: "decay",
                        value: x as f64,
                        reason: "log-decays must be finite and ≤ 0",
                    });
                }
            }
            Decay::Gates(g) => {
                crate::error::expect_shape(
                    "gates",
                    g.shape(),
                    [dims.b, dims.hkv, dims.nk, dims.d],
                )?;
                if let Some(x) = g.try_to_vec()?.into_iter().find(|&x| bad(x)) {
                    return Err(AttnError::InvalidOption {
                        option: "gates",
                        value: x as f64,
                        reason: "log-gates must be finite and ≤ 0",
                    });
                }
            }
        }
        if let Some(s) = self.scale.filter(|s| !s.is_finite()) {
            return Err(AttnError::InvalidOption {
                option: "scale",
                value: s as f64,
                reason: "must be finite",
            });
        }
        Ok(dims)
    }

    /// Every key/value head's log-gates, `[B·Hkv][N × D]` row-major.
    fn gates(&self, dims: &Dims) -> Result<Vec<f32>> {
        let Dims { b, hkv, nk, d, .. } = *dims;
        match self.decay {
            Decay::PerHead(g) => {
                let n = crate::view::elements([b, hkv, nk, d]).unwrap_or(usize::MAX);
                crate::check_memory("gates", n, 4)?;
                Ok((0..b * hkv)
                    .flat_map(|bh| std::iter::repeat_n(g[bh % hkv], nk * d))
                    .collect())
            }
            Decay::Gates(g) => Ok(heads(&g)?.into_owned()),
        }
    }
}

/// One key/value head's rows and its log-gates, all `n` steps.
#[derive(Clone, Copy)]
struct Head<'a> {
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    d: usize,
    dv: usize,
}

/// Steps per sub-block of a chunk's pair weights. Across sub-blocks a pair's decay
/// $e^{G_i - G_j}$ is the product $e^{G_i - G_r}\\,e^{G_r - G_j}$ through the first step `r` of
/// `i`'s sub-block, both factors ≤ 1 (so a large factor never multiplies a small one, whose
/// argument's rounding it would magnify); inside a sub-block each difference is taken directly.
const SUB: usize = 16;

/// `x ← eˣ` on the instruction set's vector exp.
fn exp_all(kern: &Kernels, x: &mut [f32]) {
    // SAFETY: `x` holds `x.len()` elements.
    unsafe { (kern.exp_sum)(x.as_mut_ptr(), x.len(), 1.0, 0.0) };
}

/// A chunk's decays: `G`, the in-chunk cumulative log-gates (in f64: differences of long sums
/// keep their digits), and the factors the products need, each ≤ 1.
struct Chunk {
    m: usize,
    d: usize,
    cum: Vec<f64>,
    /// $e^{G_i}$, `m × d`.
    from_start: Vec<f32>,
    /// $e^{G_\text{last} - G_j}$, `m × d`.
    to_end: Vec<f32>,
    /// $e^{G_\text{last}}$, `d`.
    last: Vec<f32>,
    /// $e^{G_i - G_j}$ for `j ≤ i` in one sub-block: sub-block `b`, rows `li ≥ lj` at
    /// `(b·T + li(li+1)/2 + lj)·d` with `T = SUB(SUB+1)/2`.
    diag: Vec<f32>,
}

impl Chunk {
    fn new(kern: &Kernels, g: &[f32], d: usize) -> Self {
        let m = g.len() / d;
        let mut cum: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        for i in 1..m {
            for c in 0..d {
                cum[i * d + c] += cum[(i - 1) * d + c];
            }
        }
        let at = |i: usize, c: usize| cum[i * d + c];
        let mut from_start: Vec<f32> = cum.iter().map(|&x| x as f32).collect();
        exp_all(kern, &mut from_start);
        let mut to_end: Vec<f32> = (0..m * d)
            .map(|x| (at(m - 1, x % d) - cum[x]) as f32)
            .collect();
        exp_all(kern, &mut to_end);
        let mut last: Vec<f32> = (0..d).map(|c| at(m - 1, c) as f32).collect();
        exp_all(kern, &mut last);
        let tri = SUB * (SUB + 1) / 2;
        let mut diag = vec![0.0f32; m.div_ceil(SUB) * tri * d];
        for i in 0..m {
            let (b, li) = (i / SUB, i % SUB);
            for lj in 0..=li {
                let j = b * SUB + lj;
                let o = (b * tri + li * (li + 1) / 2 + lj) * d;
                for c in 0..d {
                    diag[o + c] = (at(i, c) - at(j, c)) as f32;
                }
            }
        }
        exp_all(kern, &mut diag);
        Self {
            m,
            d,
            cum,
            from_start,
            to_end,
            last,
            diag,
        }
    }

    /// The sub-blocks `[b0, b1)`.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.m.div_ceil(SUB)).map(|b| (b * SUB, ((b + 1) * SUB).min(self.m)))
    }

    /// $e^{G_i - G_j}$ of a pair in one sub-block (`j ≤ i`), `d` wide.
    fn within(&self, i: usize, j: usize) -> &[f32] {
        let (b, li, lj) = (i / SUB, i % SUB, j % SUB);
        let o = (b * (SUB * (SUB + 1) / 2) + li * (li + 1) / 2 + lj) * self.d;
        &self.diag[o..o + self.d]
    }

    /// $e^{G_i - G_r}$ for the rows `r0..r1` (`after`: rows at or after `r`), or
    /// $e^{G_r - G_i}$ (rows at or before `r`): factors ≤ 1, `d` per row.
    fn factors(&self, kern: &Kernels, (r0, r1): (usize, usize), r: usize, after: bool) -> Vec<f32> {
        let d = self.d;
        let mut e: Vec<f32> = (r0 * d..r1 * d)
            .map(|t| {
                let (gi, gr) = (self.cum[t], self.cum[r * d + t % d]);
                (if after { gi - gr } else { gr - gi }) as f32
            })
            .collect();
        exp_all(kern, &mut e);
        e
    }

    /// Rows `r0..r1` of `x` times [`Chunk::factors`].
    fn scaled(
        &self,
        kern: &Kernels,
        x: &[f32],
        rows: (usize, usize),
        r: usize,
        after: bool,
    ) -> Vec<f32> {
        let mut e = self.factors(kern, rows, r, after);
        let d = self.d;
        e.iter_mut()
            .zip(&x[rows.0 * d..rows.1 * d])
            .for_each(|(e, x)| *e *= x);
        e
    }

    /// `pair (m × m, row stride CHUNK) ← A_ij = Σ_c x_ic y_jc e^{G_ic − G_jc}` for `j ≤ i`, 0 above.
    fn pairs(&self, kern: &Kernels, x: &[f32], y: &[f32], pair: &mut [f32]) {
        let (m, d) = (self.m, self.d);
        for i in 0..m {
            pair[i * CHUNK..i * CHUNK + m].fill(0.0);
        }
        let mut yt = vec![0.0f32; d * SUB];
        for (i0, i1) in self.blocks() {
            let xi = self.scaled(kern, x, (i0, i1), i0, true);
            for (j0, j1) in self.blocks().take_while(|&(_, j1)| j1 <= i0) {
                let yj = self.scaled(kern, y, (j0, j1), i0, false);
                super::transpose(&yj, (j1 - j0, d), &mut yt);
                let out = &mut pair[i0 * CHUNK + j0..];
                gemm(
                    kern,
                    (i1 - i0, d, j1 - j0),
                    &xi,
                    (d, 1),
                    &yt,
                    j1 - j0,
                    out,
                    CHUNK,
                    false,
                );
            }
            for i in i0..i1 {
                for j in i0..=i {
                    let e = self.within(i, j);
                    let (xr, yr) = (&x[i * d..(i + 1) * d], &y[j * d..(j + 1) * d]);
                    pair[i * CHUNK + j] = (0..d).map(|c| xr[c] * yr[c] * e[c]).sum();
                }
            }
        }
    }

    /// `out_i += Σ_{j ≤ i} P_ij (y_j ⊙ e^{G_i − G_j})` for the lower-triangular `pair` P.
    fn apply_rows(&self, kern: &Kernels, pair: &[f32], y: &[f32], out: &mut [f32]) {
        let d = self.d;
        for (i0, i1) in self.blocks() {
            let mut acc = vec![0.0f32; (i1 - i0) * d];
            for (j0, j1) in self.blocks().take_while(|&(_, j1)| j1 <= i0) {
                let yj = self.scaled(kern, y, (j0, j1), i0, false);
                let p = &pair[i0 * CHUNK + j0..];
                gemm(
                    kern,
                    (i1 - i0, j1 - j0, d),
                    p,
                    (CHUNK, 1),
                    &yj,
                    d,
                    &mut acc,
                    d,
                    true,
                );
            }
            let post = self.factors(kern, (i0, i1), i0, true);
            for ((o, a), p) in out[i0 * d..i1 * d].iter_mut().zip(&acc).zip(&post) {
                *o += a * p;
            }
            for i in i0..i1 {
                for j in i0..=i {
                    let w = pair[i * CHUNK + j];
                    let e = self.within(i, j);
                    let (o, yr) = (&mut out[i * d..(i + 1) * d], &y[j * d..(j + 1) * d]);
                    for c in 0..d {
                        o[c] += w * yr[c] * e[c];
                    }
                }
            }
        }
    }

    /// `out_j += Σ_{i ≥ j} P_ij (y_i ⊙ e^{G_i − G_j})` for the lower-triangular `pair` P.
    fn apply_cols(&self, kern: &Kernels, pair: &[f32], y: &[f32], out: &mut [f32]) {
        let d = self.d;
        for (i0, i1) in self.blocks() {
            let yi = self.scaled(kern, y, (i0, i1), i0, true);
            for (j0, j1) in self.blocks().take_while(|&(_, j1)| j1 <= i0) {
                let mut acc = vec![0.0f32; (j1 - j0) * d];
                let p = &pair[i0 * CHUNK + j0..];
                gemm(
                    kern,
                    (j1 - j0, i1 - i0, d),
                    p,
                    (1, CHUNK),
                    &yi,
                    d,
                    &mut acc,
                    d,
                    false,
                );
                let post = self.factors(kern, (j0, j1), i0, false);
                for ((o, a), p) in out[j0 * d..j1 * d].iter_mut().zip(&acc).zip(&post) {
                    *o += a * p;
                }
            }
            for i in i0..i1 {
                for j in i0..=i {
                    let w = pair[i * CHUNK + j];
                    let e = self.within(i, j);
                    let (o, yr) = (&mut out[j * d..(j + 1) * d], &y[i * d..(i + 1) * d]);
                    for c in 0..d {
                        o[c] += w * yr[c] * e[c];
                    }
                }
            }
        }
    }
}

/// Gated linear attention of `q` over `k`, `v` into `out` (`[B, Hq, N, Dv]`).
///
/// ```
/// use attentive::variants::gated::{forward, Decay, Gated};
/// use attentive::{View, ViewMut};
/// // One feature, decay γ = ½: o₁ = q₁(½·k₀v₀ + k₁v₁) with scale 1.
/// let (q, k, v) = ([1.0f32, 1.0], [1.0f32, 1.0], [4.0f32, 2.0]);
/// let g = [0.5f32.ln()];
/// let mut o = [0.0f32; 2];
/// fn x(s: &[f32]) -> View<'_> { View::contiguous(s, &[1, 1, 2, 1]).unwrap() }
/// let opts = Gated { scale: Some(1.0), ..Gated::new(Decay::PerHead(&g)) };
/// forward(x(&q), x(&k), x(&v), &opts, &mut ViewMut::contiguous(&mut o, [1, 1, 2, 1]).unwrap()).unwrap();
/// assert!((o[0] - 4.0).abs() < 1e-6 && (o[1] - 4.0).abs() < 1e-5);
/// ```
///
/// # Errors
/// Shapes that disagree, an empty dimension, `Nq ≠ Nk`, query heads not a multiple of key/value
/// heads, decays of the wrong length or shape, a log-decay that is positive or not finite, a
/// non-finite scale, an instruction set this CPU lacks.
pub fn forward(q: View, k: View, v: View, opts: &Gated, out: &mut ViewMut) -> Result<()> {
    let dims = opts.check(&q, &k, &v)?;
    let kern = opts.isa.kernels()?;
    let Dims {
        b, hq, nq, d, dv, ..
    } = dims;
    crate::error::expect_shape("out", out.shape(), [b, hq, nq, dv])?;
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let (qh, kh, vh, gh) = (heads(&q)?, heads(&k)?, heads(&v)?, opts.gates(&dims)?);
    write_out(out, |o| {
        o.par_chunks_mut(nq * dv).enumerate().for_each(|(bh, o)| {
            let kv = bh / hq * dims.hkv + bh % hq / dims.group();
            let head = Head {
                k: &kh[kv * nq * d..][..nq * d],
                v: &vh[kv * nq * dv..][..nq * dv],
                g: &gh[kv * nq * d..][..nq * d],
                d,
                dv,
            };
            let qs: Vec<f32> = qh[bh * nq * d..][..nq * d]
                .iter()
                .map(|x| x * scale)
                .collect();
            head_forward(kern, head, &qs, o);
        })
    });
    Ok(())
}

/// One query head (`qs`: scaled queries) over its key/value head: writes `o`.
fn head_forward(kern: &Kernels, h: Head, qs: &[f32], o: &mut [f32]) {
    let (d, dv) = (h.d, h.dv);
    let n = qs.len() / d;
    let mut s = vec![0.0f32; d * dv];
    let mut pair = vec![0.0f32; CHUNK * CHUNK];
    for c0 in (0..n).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(n);
        let ch = Chunk::new(kern, &h.g[c0 * d..c1 * d], d);
        let m = ch.m;
        let (qc, kc, vc) = (
            &qs[c0 * d..c1 * d],
            &h.k[c0 * d..c1 * d],
            &h.v[c0 * dv..c1 * dv],
        );
        let oc = &mut o[c0 * dv..c1 * dv];
        // O_c = (q ⊙ e^{G})·S + tril(A)·V_c                                (m, dv)
        let qe: Vec<f32> = qc.iter().zip(&ch.from_start).map(|(q, e)| q * e).collect();
        gemm(kern, (m, d, dv), &qe, (d, 1), &s, dv, oc, dv, false);
        ch.pairs(kern, qc, kc, &mut pair);
        gemm(kern, (m, m, dv), &pair, (CHUNK, 1), vc, dv, oc, dv, true);
        // S ← e^{G_last} ⊙ S + (K_c ⊙ e^{G_last − G})ᵀ·V_c                  (d, dv)
        advance(kern, &mut s, &ch, kc, vc, (d, dv));
    }
}

/// `S ← e^{G_last} ⊙ S + (k ⊙ e^{G_last − G})ᵀ·v` over a chunk.
fn advance(
    kern: &Kernels,
    s: &mut [f32],
    ch: &Chunk,
    kc: &[f32],
    vc: &[f32],
    (d, dv): (usize, usize),
) {
    for (row, f) in s.chunks_exact_mut(dv).zip(&ch.last) {
        row.iter_mut().for_each(|x| *x *= f);
    }
    let kd: Vec<f32> = kc.iter().zip(&ch.to_end).map(|(k, e)| k * e).collect();
    gemm(kern, (d, ch.m, dv), &kd, (1, d), vc, dv, s, dv, true);
}

/// Gradients of gated linear attention: dQ, dK, dV (dK and dV summed over each group of query
/// heads), and when `d_decay` is given, the decay's: `[Hkv]` for [`Decay::PerHead`] (summed over
/// the batch), `[B, Hkv, N, D]` row-major for [`Decay::Gates`].
///
/// # Errors
/// As [`forward`], gradients of the wrong shape, a `d_decay` of the wrong length.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: View,
    k: View,
    v: View,
    d_o: View,
    opts: &Gated,
    dq: &mut ViewMut,
    dk: &mut ViewMut,
    dv: &mut ViewMut,
    d_decay: Option<&mut [f32]>,
) -> Result<()> {
    let dims = opts.check(&q, &k, &v)?;
    let kern = opts.isa.kernels()?;
    let Dims {
        b,
        hq,
        hkv,
        nq: n,
        d,
        dv: dvd,
        ..
    } = dims;
    crate::error::expect_shape("d_o", d_o.shape(), [b, hq, n, dvd])?;
    crate::error::expect_shape("dq", dq.shape(), [b, hq, n, d])?;
    crate::error::expect_shape("dk", dk.shape(), [b, hkv, n, d])?;
    crate::error::expect_shape("dv", dv.shape(), [b, hkv, n, dvd])?;
    if let Some(g) = d_decay.as_deref() {
        let want = match opts.decay {
            Decay::PerHead(_) => hkv,
            Decay::Gates(_) => b * hkv * n * d,
        };
        crate::error::expect_len("d_decay", g.len(), want)?;
    }
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let (qh, kh, vh, doh, gh) = (
        heads(&q)?,
        heads(&k)?,
        heads(&v)?,
        heads(&d_o)?,
        opts.gates(&dims)?,
    );
    let group = dims.group();
    // Per (b, kv head): dQ of its query heads, dK, dV, and ∂L/∂B (n × d).
    type Part = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    let per: Vec<Part> = (0..b * hkv)
        .into_par_iter()
        .map(|kv| {
            let head = Head {
                k: &kh[kv * n * d..][..n * d],
                v: &vh[kv * n * dvd..][..n * dvd],
                g: &gh[kv * n * d..][..n * d],
                d,
                dv: dvd,
            };
            let mut dqs = vec![0.0f32; group * n * d];
            let (mut dks, mut dvs) = (vec![0.0f32; n * d], vec![0.0f32; n * dvd]);
            let mut db = vec![0.0f32; n * d];
            for gi in 0..group {
                let bh = kv / hkv * hq + kv % hkv * group + gi;
                let qx = &qh[bh * n * d..][..n * d];
                let qs: Vec<f32> = qx.iter().map(|x| x * scale).collect();
                let dout = &doh[bh * n * dvd..][..n * dvd];
                let dqg = &mut dqs[gi * n * d..][..n * d];
                head_backward(kern, head, &qs, dout, (dqg, &mut dks, &mut dvs));
                // ∂L/∂B += q ⊙ dq (dq with respect to the unscaled q)
                for ((x, &qv), g) in dqg.iter_mut().zip(qx).zip(db.iter_mut()) {
                    *x *= scale;
                    *g += qv * *x;
                }
            }
            for ((g, &kv), &dkv) in db.iter_mut().zip(head.k).zip(&dks) {
                *g -= kv * dkv;
            }
            (dqs, dks, dvs, db)
        })
        .collect();
    dq.for_each_row(|bi, h, i, row| {
        let (kvh, g) = (h / group, h % group);
        row.copy_from_slice(&per[bi * hkv + kvh].0[(g * n + i) * d..][..d]);
    });
    dk.for_each_row(|bi, h, j, row| row.copy_from_slice(&per[bi * hkv + h].1[j * d..][..d]));
    dv.for_each_row(|bi, h, j, row| row.copy_from_slice(&per[bi * hkv + h].2[j * dvd..][..dvd]));
    if let Some(out) = d_decay {
        out.fill(0.0);
        for (kv, part) in per.iter().enumerate() {
            // dg_s = Σ_{t ≥ s} ∂L/∂B_t: a suffix sum over the steps.
            let mut suffix = vec![0.0f32; d];
            for t in (0..n).rev() {
                axpy(&mut suffix, 1.0, &part.3[t * d..(t + 1) * d]);
                match opts.decay {
                    Decay::Gates(_) => out[(kv * n + t) * d..][..d].copy_from_slice(&suffix),
                    Decay::PerHead(_) => out[kv % hkv] += suffix.iter().sum::<f32>(),
                }
            }
        }
    }
    Ok(())
}

/// One query head's gradients (`qs` scaled): `dq` (with respect to the scaled q) written, `dk`
/// and `dv` added.
fn head_backward(
    kern: &Kernels,
    h: Head,
    qs: &[f32],
    d_o: &[f32],
    (dq, dk, dvs): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (d, dv) = (h.d, h.dv);
    let n = qs.len() / d;
    let mut pair = vec![0.0f32; CHUNK * CHUNK];
    let mut st = vec![0.0f32; dv * d];
    let starts: Vec<usize> = (0..n).step_by(CHUNK).collect();
    // Queries front to back: dq_i = e^{G_i} ⊙ (S·do_i) + Σ_{j ≤ i} (do_i·v_j) k_j ⊙ e^{G_i − G_j}
    let mut s = vec![0.0f32; d * dv];
    for &c0 in &starts {
        let c1 = (c0 + CHUNK).min(n);
        let ch = Chunk::new(kern, &h.g[c0 * d..c1 * d], d);
        let m = ch.m;
        let (kc, vc, doc) = (
            &h.k[c0 * d..c1 * d],
            &h.v[c0 * dv..c1 * dv],
            &d_o[c0 * dv..c1 * dv],
        );
        let dqc = &mut dq[c0 * d..c1 * d];
        super::transpose(&s, (d, dv), &mut st);
        gemm(kern, (m, dv, d), doc, (dv, 1), &st, d, dqc, d, false);
        for (x, e) in dqc.iter_mut().zip(&ch.from_start) {
            *x *= e;
        }
        // P_ij = do_i·v_j for j ≤ i; dq_i += Σ_j P_ij (k_j ⊙ e^{G_i − G_j})
        weighted_pairs(kern, &ch, doc, vc, dv, &mut pair);
        ch.apply_rows(kern, &pair, kc, dqc);
        advance(kern, &mut s, &ch, kc, vc, (d, dv));
    }
    // Keys back to front, dS the gradient of the state after the chunk:
    // dk_j = Σ_{i ≥ j} P_ij (q_i ⊙ e^{G_i − G_j}) + e^{G_last − G_j} ⊙ (dS·v_j)
    // dv_j = Σ_{i ≥ j} A_ij do_i + (k_j ⊙ e^{G_last − G_j})ᵀ·dS
    let mut ds = vec![0.0f32; d * dv];
    for &c0 in starts.iter().rev() {
        let c1 = (c0 + CHUNK).min(n);
        let ch = Chunk::new(kern, &h.g[c0 * d..c1 * d], d);
        let m = ch.m;
        let (qc, kc, vc) = (
            &qs[c0 * d..c1 * d],
            &h.k[c0 * d..c1 * d],
            &h.v[c0 * dv..c1 * dv],
        );
        let doc = &d_o[c0 * dv..c1 * dv];
        let (dkc, dvc) = (&mut dk[c0 * d..c1 * d], &mut dvs[c0 * dv..c1 * dv]);
        super::transpose(&ds, (d, dv), &mut st);
        let mut from_state = vec![0.0f32; m * d];
        gemm(
            kern,
            (m, dv, d),
            vc,
            (dv, 1),
            &st,
            d,
            &mut from_state,
            d,
            false,
        );
        for ((x, f), e) in dkc.iter_mut().zip(&from_state).zip(&ch.to_end) {
            *x += f * e;
        }
        weighted_pairs(kern, &ch, doc, vc, dv, &mut pair);
        ch.apply_cols(kern, &pair, qc, dkc);
        let kd: Vec<f32> = kc.iter().zip(&ch.to_end).map(|(k, e)| k * e).collect();
        gemm(kern, (m, d, dv), &kd, (d, 1), &ds, dv, dvc, dv, true);
        ch.pairs(kern, qc, kc, &mut pair);
        gemm(kern, (m, m, dv), &pair, (1, CHUNK), doc, dv, dvc, dv, true);
        // dS_before = e^{G_last} ⊙ dS + (q ⊙ e^{G})ᵀ·dO_c
        for (row, f) in ds.chunks_exact_mut(dv).zip(&ch.last) {
            row.iter_mut().for_each(|x| *x *= f);
        }
        let qe: Vec<f32> = qc.iter().zip(&ch.from_start).map(|(q, e)| q * e).collect();
        gemm(kern, (d, m, dv), &qe, (1, d), doc, dv, &mut ds, dv, true);
    }
}

/// `pair (m × m, row stride CHUNK) ← P_ij = do_i·v_j` for `j ≤ i`, 0 above.
fn weighted_pairs(
    kern: &Kernels,
    ch: &Chunk,
    doc: &[f32],
    vc: &[f32],
    dv: usize,
    pair: &mut [f32],
) {
    let m = ch.m;
    let mut vt = vec![0.0f32; dv * m];
    super::transpose(vc, (m, dv), &mut vt);
    gemm(kern, (m, dv, m), doc, (dv, 1), &vt, m, pair, CHUNK, false);
    for i in 0..m {
        pair[i * CHUNK + i + 1..i * CHUNK + m].fill(0.0);
    }
}

/// The oracle: gated linear attention by its recurrence for the output, and its closed form
/// $o_t = \sum_{j \le t}\sum_d \text{scale}\\,q_{td}k_{jd}e^{B_{td} - B_{jd}} v_j$ for the gradients,
/// one term at a time. Generic over the float type: `f64` is the oracle, `f32` the naive baseline.
pub mod oracle {
    use super::*;

    /// `(o, dq, dk, dv, d_decay)`, row-major; `d_decay` as [`backward`] gives it.
    pub type Out<T> = (Vec<T>, Vec<T>, Vec<T>, Vec<T>, Vec<T>);

    /// # Errors
    /// As [`forward`].
    #[allow(clippy::needless_range_loop)] // term by term, as the definition reads
    pub fn gated<T: Real>(q: View, k: View, v: View, d_o: View, opts: &Gated) -> Result<Out<T>> {
        let dims = opts.check(&q, &k, &v)?;
        let Dims {
            b,
            hq,
            hkv,
            nq: n,
            d,
            dv,
            ..
        } = dims;
        crate::error::expect_shape("d_o", d_o.shape(), [b, hq, n, dv])?;
        let f = T::from_f32;
        let scale = f(opts.scale.unwrap_or(1.0 / (d as f32).sqrt()));
        let g = opts.gates(&dims)?;
        let group = dims.group();
        let mut o = vec![T::ZERO; b * hq * n * dv];
        let mut dq = vec![T::ZERO; b * hq * n * d];
        let mut dk = vec![T::ZERO; b * hkv * n * d];
        let mut dvv = vec![T::ZERO; b * hkv * n * dv];
        let mut dbig = vec![T::ZERO; b * hkv * n * d];
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / group;
                let kv = bi * hkv + kh;
                // B_t = Σ_{s ≤ t} g_s                                           (n, d)
                let mut cum = vec![T::ZERO; n * d];
                for t in 0..n {
                    for c in 0..d {
                        let prev = if t == 0 {
                            T::ZERO
                        } else {
                            cum[(t - 1) * d + c]
                        };
                        cum[t * d + c] = prev + f(g[(kv * n + t) * d + c]);
                    }
                }
                // The recurrence: S_t = e^{g_t} ⊙ S_{t−1} + k_t v_tᵀ; o_t = S_tᵀ (scale·q_t)
                let mut s = vec![T::ZERO; d * dv];
                for t in 0..n {
                    for c in 0..d {
                        let decay = f(g[(kv * n + t) * d + c]).exp();
                        for e in 0..dv {
                            s[c * dv + e] = decay * s[c * dv + e]
                                + f(k.at(bi, kh, t, c)) * f(v.at(bi, kh, t, e));
                        }
                    }
                    for e in 0..dv {
                        let x = (0..d).fold(T::ZERO, |acc, c| {
                            acc + scale * f(q.at(bi, h, t, c)) * s[c * dv + e]
                        });
                        o[((bi * hq + h) * n + t) * dv + e] = x;
                    }
                }
                // The closed form's gradients, term by term.
                for t in 0..n {
                    for j in 0..=t {
                        let p = (0..dv).fold(T::ZERO, |acc, e| {
                            acc + f(d_o.at(bi, h, t, e)) * f(v.at(bi, kh, j, e))
                        });
                        let mut a = T::ZERO;
                        for c in 0..d {
                            let w = (cum[t * d + c] - cum[j * d + c]).exp();
                            let (qv, kv_) = (f(q.at(bi, h, t, c)), f(k.at(bi, kh, j, c)));
                            let term = scale * qv * kv_ * w;
                            a = a + term;
                            let (qi, ki) = (((bi * hq + h) * n + t) * d + c, (kv * n + j) * d + c);
                            dq[qi] = dq[qi] + p * scale * kv_ * w;
                            dk[ki] = dk[ki] + p * scale * qv * w;
                            // ∂/∂B_t of the term is +term·p, ∂/∂B_j is −term·p (cancel at j = t)
                            dbig[(kv * n + t) * d + c] = dbig[(kv * n + t) * d + c] + term * p;
                            dbig[(kv * n + j) * d + c] = dbig[(kv * n + j) * d + c] - term * p;
                        }
                        for e in 0..dv {
                            let at = (kv * n + j) * dv + e;
                            dvv[at] = dvv[at] + a * f(d_o.at(bi, h, t, e));
                        }
                    }
                }
            }
        }
        // dg_s = Σ_{t ≥ s} ∂L/∂B_t
        let per_head = matches!(opts.decay, Decay::PerHead(_));
        let mut dg = vec![T::ZERO; if per_head { hkv } else { b * hkv * n * d }];
        for kv in 0..b * hkv {
            for c in 0..d {
                let mut suffix = T::ZERO;
                for t in (0..n).rev() {
                    suffix = suffix + dbig[(kv * n + t) * d + c];
                    if per_head {
                        dg[kv % hkv] = dg[kv % hkv] + suffix;
                    } else {
                        dg[(kv * n + t) * d + c] = suffix;
                    }
                }
            }
        }
        Ok((o, dq, dk, dvv, dg))
    }
}
