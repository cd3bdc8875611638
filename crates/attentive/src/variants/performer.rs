//! Performer's FAVOR+ (Choromanski et al., 2021): softmax attention estimated with positive
//! random features, in linear time. With $x' = x\cdot D^{-1/4}$ and random features
//! $\omega_1\dots\omega_m$ (rows of `W`, `m × D`),
//! $$\phi(x)\_f = m^{-1/2}\big(e^{\omega_f\cdot x' - \lVert x'\rVert^2/2 - s} + \varepsilon_f\big),\qquad \varepsilon_f = 10^{-4},$$
//! and $o_i = \phi(q_i)^\top\sum_j \phi(k_j) v_j^\top / \phi(q_i)^\top\sum_j\phi(k_j)$, whose
//! weights estimate $e^{q_i\cdot k_j/\sqrt D}$ up to a factor per row. This is exactly
//! performer-pytorch's `softmax_kernel`: the stabiliser `s` is each query row's largest
//! $\omega_f\cdot x'$, and for keys the largest over all of a head's keys and features; it is
//! held constant in the backward (their code detaches it). A denominator with $|\delta| \le 10^{-6}$
//! gets $2\cdot10^{-6}$ added.
//!
//! **Causal** prefix sums as for linear attention. A key stabiliser over all positions would
//! make position i's output depend on later keys (performer-pytorch's causal form does exactly
//! that), so causal keys get none: `s = 0`, and keys whose exponent would pass 80 (where
//! $e^x$ nears f32's range) are refused rather than overflowed.
//!
//! Never compare FAVOR+ with exact softmax at a tight tolerance: its error grows like
//! $e^{\lVert q\rVert^2 + \lVert k\rVert^2}$ and falls like $1/\sqrt m$. [`draw_features`] draws the
//! orthogonal random features from a seed; they can equally be passed in.

use super::kernelized::{head_backward, head_forward, keys_back_all, Features, Guard, Rule};
use super::{gemm, heads, write_out, Dims};
use crate::error::{AttnError, Result};
use crate::real::Real;
use crate::simd::{Isa, Kernels};
use crate::view::{View, ViewMut};
use rayon::prelude::*;

/// The feature stabiliser's ε.
pub const FEATURE_EPS: f32 = 1e-4;

/// The largest key exponent causal FAVOR+ accepts (it has no key stabiliser).
pub const MAX_EXPONENT: f32 = 80.0;

/// The options of [`forward`] and [`backward`].
#[derive(Clone, Copy, Debug)]
pub struct Performer<'a> {
    /// The random features ω, `m × D` row-major, shared by every head.
    pub features: &'a [f32],
    /// Prefix sums only: query `i` sees keys `j ≤ i` (needs `Nq = Nk`).
    pub causal: bool,
    /// The keys each batch row may use, `B × Nk` row-major (`true` = use): padding.
    pub key_mask: Option<&'a [bool]>,
    /// The instruction set of the products (default: the fastest this CPU has).
    pub isa: Isa,
}

impl<'a> Performer<'a> {
    /// FAVOR+ with these features (`m × D`), not causal.
    pub fn new(features: &'a [f32]) -> Self {
        Self {
            features,
            causal: false,
            key_mask: None,
            isa: Isa::best(),
        }
    }

    fn check(&self, q: &View, k: &View, v: &View) -> Result<(Dims, usize)> {
        let dims = Dims::of(q, k, v)?;
        if self.causal && dims.nq != dims.nk {
            return Err(AttnError::ConflictingOptions {
                a: "causal",
                b: "Nq ≠ Nk",
                reason: "causal FAVOR+ pairs query i with keys 0..=i",
            });
        }
        let m = self.features.len() / dims.d;
        if m == 0 || self.features.len() != m * dims.d {
            return Err(AttnError::LengthMismatch {
                tensor: "features",
                expected: dims.d * m.max(1),
                got: self.features.len(),
            });
        }
        if let Some(&x) = self.features.iter().find(|x| !x.is_finite()) {
            return Err(AttnError::InvalidOption {
                option: "features",
                value: x as f64,
                reason: "random features must be finite",
            });
        }
        if let Some(mask) = self.key_mask {
            crate::error::expect_len("key_mask", mask.len(), dims.b * dims.nk)?;
        }
        Ok((dims, m))
    }
}

/// Rows of `x` (`n × D`) projected: `p = x'·Wᵀ` (`n × m`) and `diag = ‖x'‖²/2`, `x' = x·D^{-1/4}`.
fn project(kern: &Kernels, x: &[f32], wt: &[f32], (d, m): (usize, usize)) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / d;
    let c = (d as f32).powf(-0.25);
    let xs: Vec<f32> = x.iter().map(|v| v * c).collect();
    let mut p = vec![0.0f32; n * m];
    gemm(kern, (n, d, m), &xs, (d, 1), wt, m, &mut p, m, false);
    let diag = xs.chunks_exact(d).map(|r| super::dot(r, r) / 2.0).collect();
    (p, diag)
}

/// FAVOR+ features of one head.
struct Favor<'a> {
    q: &'a [f32],
    k: &'a [f32],
    mask: Option<&'a [bool]>,
    /// ω (`m × D`) and ωᵀ (`D × m`).
    w: &'a [f32],
    wt: &'a [f32],
    d: usize,
    m: usize,
    /// The keys' stabiliser.
    key_stab: f32,
}

impl Favor<'_> {
    /// `out ← m^{-1/2}(exp(p − diag − s) + ε)` for rows of `x`; `s` per row (queries) or fixed.
    fn map(&self, kern: &Kernels, x: &[f32], stab: Option<f32>, out: &mut [f32]) {
        let m = self.m;
        let (p, diag) = project(kern, x, self.wt, (self.d, m));
        let out = &mut out[..p.len()];
        for ((o, p), dg) in out.chunks_exact_mut(m).zip(p.chunks_exact(m)).zip(&diag) {
            let s = stab.unwrap_or_else(|| p.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            for (o, &x) in o.iter_mut().zip(p) {
                *o = x - dg - s;
            }
        }
        // SAFETY: `out` holds `out.len()` elements.
        unsafe { (kern.exp_sum)(out.as_mut_ptr(), out.len(), 1.0, 0.0) };
        let r = (m as f32).powf(-0.5);
        out.iter_mut().for_each(|o| *o = r * (*o + FEATURE_EPS));
    }

    /// `dx ← c·(g·W) − c²·x·Σ_f g_f` with `g = (φ − rε) ⊙ dφ`: the stabiliser held constant.
    fn back(&self, kern: &Kernels, x: &[f32], phi: &[f32], dphi: &[f32], dx: &mut [f32]) {
        let (d, m) = (self.d, self.m);
        let n = x.len() / d;
        let (c, r) = ((d as f32).powf(-0.25), (m as f32).powf(-0.5));
        let g: Vec<f32> = phi[..n * m]
            .iter()
            .zip(dphi)
            .map(|(p, dp)| (p - r * FEATURE_EPS) * dp)
            .collect();
        gemm(kern, (n, m, d), &g, (m, 1), self.w, d, dx, d, false);
        for ((row, xr), gr) in dx
            .chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .zip(g.chunks_exact(m))
        {
            let sg: f32 = gr.iter().sum();
            for (o, &xv) in row.iter_mut().zip(xr) {
                *o = c * *o - c * c * xv * sg;
            }
        }
    }
}

impl Features for Favor<'_> {
    fn width(&self) -> usize {
        self.m
    }

    fn nq(&self) -> usize {
        self.q.len() / self.d
    }

    fn nk(&self) -> usize {
        self.k.len() / self.d
    }

    fn queries(&self, kern: &Kernels, (r0, r1): (usize, usize), out: &mut [f32]) {
        self.map(kern, &self.q[r0 * self.d..r1 * self.d], None, out);
    }

    fn keys(&self, kern: &Kernels, (r0, r1): (usize, usize), out: &mut [f32]) {
        self.map(
            kern,
            &self.k[r0 * self.d..r1 * self.d],
            Some(self.key_stab),
            out,
        );
        if let Some(mask) = self.mask {
            for (row, &keep) in out.chunks_exact_mut(self.m).zip(&mask[r0..r1]) {
                if !keep {
                    row.fill(0.0);
                }
            }
        }
    }

    fn queries_back(
        &self,
        kern: &Kernels,
        (r0, r1): (usize, usize),
        a: &[f32],
        da: &[f32],
        dq: &mut [f32],
    ) {
        self.back(kern, &self.q[r0 * self.d..r1 * self.d], a, da, dq);
    }

    fn keys_back(
        &self,
        kern: &Kernels,
        (r0, r1): (usize, usize),
        b: &[f32],
        db: &[f32],
        dk: &mut [f32],
    ) {
        self.back(kern, &self.k[r0 * self.d..r1 * self.d], b, db, dk);
        // A hidden key's features are the constant 0, so its gradient is too.
        if let Some(mask) = self.mask {
            for (row, &keep) in dk.chunks_exact_mut(self.d).zip(&mask[r0..r1]) {
                if !keep {
                    row.fill(0.0);
                }
            }
        }
    }
}

/// Each key/value head's stabiliser: the largest `ω·k'` over its visible keys (non-causal), or
/// 0 after checking that no exponent passes [`MAX_EXPONENT`] (causal).
fn key_stabs(
    kern: &Kernels,
    opts: &Performer,
    kh: &[f32],
    wt: &[f32],
    dims: &Dims,
    m: usize,
) -> Result<Vec<f32>> {
    let (nk, d) = (dims.nk, dims.d);
    let per: Vec<(f32, f32)> = (0..dims.b * dims.hkv)
        .into_par_iter()
        .map(|kv| {
            let mask = opts.key_mask.map(|mk| &mk[kv / dims.hkv * nk..][..nk]);
            let (mut top, mut top_exp) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for (r0, r1) in super::kernelized::chunks(nk) {
                let (p, diag) = project(
                    kern,
                    &kh[(kv * nk + r0) * d..(kv * nk + r1) * d],
                    wt,
                    (d, m),
                );
                for (j, (row, dg)) in p.chunks_exact(m).zip(&diag).enumerate() {
                    if mask.is_some_and(|mk| !mk[r0 + j]) {
                        continue;
                    }
                    for &x in row {
                        top = top.max(x);
                        top_exp = top_exp.max(x - dg);
                    }
                }
            }
            (top, top_exp)
        })
        .collect();
    if opts.causal {
        if let Some(&(_, e)) = per.iter().find(|&&(_, e)| e > MAX_EXPONENT) {
            return Err(AttnError::InvalidOption {
                option: "keys",
                value: e as f64,
                reason: "causal FAVOR+ has no key stabiliser (one would read the future): a key exponent ω·k′ − ‖k′‖²/2 past 80 overflows; scale the keys down",
            });
        }
        return Ok(vec![0.0; per.len()]);
    }
    // A head with every key hidden: any finite stabiliser (its features are 0).
    Ok(per
        .iter()
        .map(|&(t, _)| if t.is_finite() { t } else { 0.0 })
        .collect())
}

/// FAVOR+ attention of `q` over `k`, `v` into `out` (`[B, Hq, Nq, Dv]`).
///
/// ```
/// use attentive::variants::performer::{draw_features, forward, Performer};
/// use attentive::{View, ViewMut};
/// let (n, d) = (4, 8);
/// let x: Vec<f32> = (0..n * d).map(|i| ((i * 37) % 11) as f32 / 40.0).collect();
/// let w = draw_features(256, d, 7);
/// let v = View::contiguous(&x, &[1, 1, n, d]).unwrap();
/// let mut o = vec![0.0f32; n * d];
/// forward(v, v, v, &Performer::new(&w), &mut ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap()).unwrap();
/// // Weights are positive and normalised: each output lies within the values' range.
/// assert!(o.iter().all(|&y| (0.0..=0.25).contains(&y)));
/// ```
///
/// # Errors
/// Shapes that disagree, an empty dimension, `causal` with `Nq ≠ Nk`, features not `m × D` or
/// not finite, a key mask of the wrong length, causal keys too large for no stabiliser, an
/// instruction set this CPU lacks.
pub fn forward(q: View, k: View, v: View, opts: &Performer, out: &mut ViewMut) -> Result<()> {
    let (dims, m) = opts.check(&q, &k, &v)?;
    let kern = opts.isa.kernels()?;
    let Dims {
        b,
        hq,
        nq,
        nk,
        d,
        dv,
        ..
    } = dims;
    crate::error::expect_shape("out", out.shape(), [b, hq, nq, dv])?;
    let (qh, kh, vh) = (heads(&q)?, heads(&k)?, heads(&v)?);
    let mut wt = vec![0.0f32; d * m];
    super::transpose(opts.features, (m, d), &mut wt);
    let stabs = key_stabs(kern, opts, &kh, &wt, &dims, m)?;
    let rule = Rule {
        causal: opts.causal,
        guard: Guard::Small,
    };
    write_out(out, |o| {
        o.par_chunks_mut(nq * dv).enumerate().for_each(|(bh, o)| {
            let (bi, h) = (bh / hq, bh % hq);
            let kv = bi * dims.hkv + h / dims.group();
            let head = Favor {
                q: &qh[bh * nq * d..][..nq * d],
                k: &kh[kv * nk * d..][..nk * d],
                mask: opts.key_mask.map(|mk| &mk[bi * nk..(bi + 1) * nk]),
                w: opts.features,
                wt: &wt,
                d,
                m,
                key_stab: stabs[kv],
            };
            head_forward(kern, &head, &vh[kv * nk * dv..][..nk * dv], rule, o, None);
        })
    });
    Ok(())
}

/// Gradients of FAVOR+ with respect to q, k and v (the stabilisers held constant), given
/// `d_o` (`[B, Hq, Nq, Dv]`).
///
/// # Errors
/// As [`forward`], and gradients of the wrong shape.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: View,
    k: View,
    v: View,
    d_o: View,
    opts: &Performer,
    dq: &mut ViewMut,
    dk: &mut ViewMut,
    dv: &mut ViewMut,
) -> Result<()> {
    let (dims, m) = opts.check(&q, &k, &v)?;
    let kern = opts.isa.kernels()?;
    let Dims {
        b,
        hq,
        nq,
        nk,
        d,
        dv: dvd,
        ..
    } = dims;
    crate::error::expect_shape("d_o", d_o.shape(), [b, hq, nq, dvd])?;
    let (qh, kh, vh, doh) = (heads(&q)?, heads(&k)?, heads(&v)?, heads(&d_o)?);
    let mut wt = vec![0.0f32; d * m];
    super::transpose(opts.features, (m, d), &mut wt);
    let stabs = key_stabs(kern, opts, &kh, &wt, &dims, m)?;
    let rule = Rule {
        causal: opts.causal,
        guard: Guard::Small,
    };
    let favor = |bi: usize, kv: usize, q| Favor {
        q,
        k: &kh[kv * nk * d..][..nk * d],
        mask: opts.key_mask.map(|mk| &mk[bi * nk..(bi + 1) * nk]),
        w: opts.features,
        wt: &wt,
        d,
        m,
        key_stab: stabs[kv],
    };
    super::backward_by_kv_head(
        dims,
        m,
        (dq, dk, dv),
        |bi, kv, bh, grads| {
            let head = favor(bi, kv, &qh[bh * nq * d..][..nq * d]);
            let (vv, dout) = (
                &vh[kv * nk * dvd..][..nk * dvd],
                &doh[bh * nq * dvd..][..nq * dvd],
            );
            head_backward(kern, &head, vv, dout, rule, grads);
        },
        |bi, kv, db, dk| keys_back_all(kern, &favor(bi, kv, &[]), db, dk),
    )
}

/// `m` orthogonal random features for width `d`, drawn from `seed`, as performer-pytorch's
/// `gaussian_orthogonal_random_matrix` with `scaling = 0`: blocks of `d` rows, each the
/// orthonormal rows of a Gaussian `d × d` matrix (Gram–Schmidt in f64), the last block cut to
/// what remains, then each row scaled to the norm of an independent Gaussian `d`-vector.
///
/// ```
/// let w = attentive::variants::performer::draw_features(5, 4, 1);
/// assert_eq!(w.len(), 20);
/// // Rows of one block are orthogonal.
/// let dot: f32 = (0..4).map(|c| w[c] * w[4 + c]).sum();
/// assert!(dot.abs() < 1e-4);
/// ```
pub fn draw_features(m: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = Gauss::new(seed);
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(m);
    while rows.len() < m {
        let mut block: Vec<Vec<f64>> = Vec::with_capacity(d);
        while block.len() < d {
            let mut x: Vec<f64> = (0..d).map(|_| rng.next()).collect();
            for b in &block {
                let p: f64 = x.iter().zip(b).map(|(a, c)| a * c).sum();
                x.iter_mut().zip(b).for_each(|(a, c)| *a -= p * c);
            }
            let norm = x.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm > 1e-6 {
                block.push(x.iter().map(|a| a / norm).collect());
            }
        }
        rows.extend(block.into_iter().take(m - rows.len()));
    }
    rows.iter()
        .flat_map(|r| {
            let scale = (0..d).map(|_| rng.next().powi(2)).sum::<f64>().sqrt();
            r.iter().map(move |x| (x * scale) as f32)
        })
        .collect()
}

/// Standard normal draws from a seed: splitmix64 and Box–Muller, in f64.
pub(crate) struct Gauss {
    state: u64,
    spare: Option<f64>,
}

impl Gauss {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x9e37_79b9_7f4a_7c15,
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn next(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * v;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

/// The oracle: FAVOR+ pair by pair, $A_{ij} = \phi(q_i)\cdot\phi(k_j)$, with the same stabilisers
/// (or given ones), and its gradients through the features with the stabilisers constant.
/// Generic over the float type: `f64` is the oracle, `f32` the naive baseline.
pub mod oracle {
    use super::*;

    /// `(o, dq, dk, dv)`, row-major.
    pub type Out<T> = (Vec<T>, Vec<T>, Vec<T>, Vec<T>);

    /// The stabilisers the oracle used: each query row's (`[B, Hq, Nq]`) and each key/value
    /// head's (`[B, Hkv]`).
    pub type Stabs<T> = (Vec<T>, Vec<T>);

    /// # Errors
    /// As [`forward`].
    pub fn performer<T: Real>(
        q: View,
        k: View,
        v: View,
        d_o: View,
        opts: &Performer,
    ) -> Result<Out<T>> {
        performer_with(q, k, v, d_o, opts, None).map(|(out, _)| out)
    }

    /// [`performer`] with the stabilisers given instead of computed (finite differences hold
    /// them still, as the backward does), and those used.
    ///
    /// # Errors
    /// As [`forward`].
    #[allow(clippy::needless_range_loop)] // pair by pair, as the definition reads
    pub fn performer_with<T: Real>(
        q: View,
        k: View,
        v: View,
        d_o: View,
        opts: &Performer,
        stabs: Option<&Stabs<T>>,
    ) -> Result<(Out<T>, Stabs<T>)> {
        let (dims, m) = opts.check(&q, &k, &v)?;
        let Dims {
            b,
            hq,
            hkv,
            nq,
            nk,
            d,
            dv,
        } = dims;
        crate::error::expect_shape("d_o", d_o.shape(), [b, hq, nq, dv])?;
        let f = T::from_f32;
        let c = f((d as f32).powf(-0.25));
        let r = f((m as f32).powf(-0.5));
        let eps = f(FEATURE_EPS);
        let w = |i: usize, t: usize| f(opts.features[i * d + t]);
        // p_f = ω_f·x', diag = ‖x'‖²/2
        let proj = |x: &dyn Fn(usize) -> T| -> (Vec<T>, T) {
            let p = (0..m)
                .map(|i| (0..d).fold(T::ZERO, |s, t| s + w(i, t) * c * x(t)))
                .collect();
            let diag = (0..d).fold(T::ZERO, |s, t| s + c * x(t) * c * x(t)) * f(0.5);
            (p, diag)
        };
        let group = dims.group();
        // Stabilisers: the keys' per head (none when causal), the queries' per row.
        let mut k_stab = vec![T::ZERO; b * hkv];
        let mut q_stab = vec![T::ZERO; b * hq * nq];
        for bi in 0..b {
            for kh in 0..hkv {
                let mut top = T::NEG_INF;
                for j in 0..nk {
                    if opts.key_mask.is_some_and(|mk| !mk[bi * nk + j]) {
                        continue;
                    }
                    let (p, _) = proj(&|t| f(k.at(bi, kh, j, t)));
                    top = p.into_iter().fold(top, |a, x| if x > a { x } else { a });
                }
                if !opts.causal && top > T::NEG_INF {
                    k_stab[bi * hkv + kh] = top;
                }
            }
            for h in 0..hq {
                for i in 0..nq {
                    let (p, _) = proj(&|t| f(q.at(bi, h, i, t)));
                    q_stab[(bi * hq + h) * nq + i] =
                        p.into_iter()
                            .fold(T::NEG_INF, |a, x| if x > a { x } else { a });
                }
            }
        }
        if let Some((qs, ks)) = stabs {
            q_stab.clone_from(qs);
            k_stab.clone_from(ks);
        }
        // φ of a row, with its stabiliser; and e_f = exp(p − diag − s).
        let phi = |x: &dyn Fn(usize) -> T, s: T| -> (Vec<T>, Vec<T>) {
            let (p, diag) = proj(x);
            let e: Vec<T> = p.iter().map(|&pf| (pf - diag - s).exp()).collect();
            (e.iter().map(|&e| r * (e + eps)).collect(), e)
        };
        let mut o = vec![T::ZERO; b * hq * nq * dv];
        let mut dq = vec![T::ZERO; b * hq * nq * d];
        let mut dk = vec![T::ZERO; b * hkv * nk * d];
        let mut dvv = vec![T::ZERO; b * hkv * nk * dv];
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / group;
                let kv = bi * hkv + kh;
                let keys: Vec<(Vec<T>, Vec<T>)> = (0..nk)
                    .map(|j| phi(&|t| f(k.at(bi, kh, j, t)), k_stab[kv]))
                    .collect();
                let mut dbs = vec![vec![T::ZERO; m]; nk];
                for i in 0..nq {
                    let row = (bi * hq + h) * nq + i;
                    let (a, _) = phi(&|t| f(q.at(bi, h, i, t)), q_stab[row]);
                    let vis = |j: usize| {
                        opts.key_mask.is_none_or(|mk| mk[bi * nk + j]) && (!opts.causal || j <= i)
                    };
                    let aw: Vec<T> = (0..nk)
                        .map(|j| match vis(j) {
                            true => (0..m).fold(T::ZERO, |s, t| s + a[t] * keys[j].0[t]),
                            false => T::ZERO,
                        })
                        .collect();
                    let mut den = aw.iter().fold(T::ZERO, |s, &x| s + x);
                    let tiny = f(1e-6);
                    if den <= tiny && -den <= tiny {
                        den = den + f(2e-6);
                    }
                    for e in 0..dv {
                        let num = (0..nk).fold(T::ZERO, |s, j| s + aw[j] * f(v.at(bi, kh, j, e)));
                        o[row * dv + e] = num * den.recip();
                    }
                    let mut da = vec![T::ZERO; m];
                    for j in 0..nk {
                        if !vis(j) {
                            continue;
                        }
                        let g = (0..dv).fold(T::ZERO, |s, e| {
                            s + f(d_o.at(bi, h, i, e)) * (f(v.at(bi, kh, j, e)) - o[row * dv + e])
                        }) * den.recip();
                        for t in 0..m {
                            da[t] = da[t] + g * keys[j].0[t];
                            dbs[j][t] = dbs[j][t] + g * a[t];
                        }
                        for e in 0..dv {
                            let at = (kv * nk + j) * dv + e;
                            dvv[at] = dvv[at] + aw[j] * f(d_o.at(bi, h, i, e)) * den.recip();
                        }
                    }
                    // dq = c·Σ_f g_f ω_f − c²·q·Σ_f g_f, g_f = r·e_f·da_f
                    let (_, e) = phi(&|t| f(q.at(bi, h, i, t)), q_stab[row]);
                    let g: Vec<T> = (0..m).map(|t| r * e[t] * da[t]).collect();
                    let sg = g.iter().fold(T::ZERO, |s, &x| s + x);
                    for t in 0..d {
                        let x = f(q.at(bi, h, i, t));
                        let wg = (0..m).fold(T::ZERO, |s, u| s + g[u] * w(u, t));
                        dq[row * d + t] = c * wg - c * c * x * sg;
                    }
                }
                for j in 0..nk {
                    if opts.key_mask.is_some_and(|mk| !mk[bi * nk + j]) {
                        continue;
                    }
                    let g: Vec<T> = (0..m).map(|t| r * keys[j].1[t] * dbs[j][t]).collect();
                    let sg = g.iter().fold(T::ZERO, |s, &x| s + x);
                    for t in 0..d {
                        let x = f(k.at(bi, kh, j, t));
                        let wg = (0..m).fold(T::ZERO, |s, u| s + g[u] * w(u, t));
                        let at = (kv * nk + j) * d + t;
                        dk[at] = dk[at] + c * wg - c * c * x * sg;
                    }
                }
            }
        }
        Ok(((o, dq, dk, dvv), (q_stab, k_stab)))
    }
}
