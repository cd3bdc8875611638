//! Linear attention (Katharopoulos et al., 2020): the softmax kernel $e^{q\cdot k}$ replaced by
//! $\phi(q)\cdot\phi(k)$ with the positive feature map $\phi(x) = \mathrm{elu}(x) + 1$, so the
//! sums over keys factorise and cost O(N) instead of O(N²):
//! $$o_i = \frac{\phi(q_i)^\top \sum_j \phi(k_j)\\,v_j^\top}{\phi(q_i)^\top \sum_j \phi(k_j) + \varepsilon}.$$
//! There is no $1/\sqrt{D}$, and $\varepsilon = 10^{-6}$ is added after the dot product, as
//! fast-transformers does. Key padding zeroes $\phi(k_j)$.
//!
//! **Causal** ($j \le i$, `Nq = Nk`) is computed chunk by chunk ([`CHUNK`] queries): inside a
//! chunk the pairs $j \le i$ as a masked product, before it through the running state
//! $S = \sum_{j<\text{chunk}} \phi(k_j) v_j^\top$ (`D × Dv`) and $z = \sum \phi(k_j)$, never an
//! `N × D × Dv` tensor. [`LinearState`] is the same recurrence one token at a time, for decoding.
//! States are summed in f32: the denominators grow like N (about $4\cdot10^6$ at N = 64k, D = 32),
//! well inside f32's range and relative precision.
//!
//! **Backward**, with $a_i = \phi(q_i)$, $b_j = \phi(k_j)$, $o_i = n_i / \delta_i$:
//! $dn_i = do_i/\delta_i$, $d\delta_i = -(do_i\cdot o_i)/\delta_i$;
//! $da_i = S\\,dn_i + z\\,d\delta_i$ (the sums seen by $i$), $db_j = dS\\,v_j + dz$ and
//! $dv_j = dS^\top b_j$ with $dS = \sum_i a_i\\,dn_i^\top$, $dz = \sum_i a_i\\,d\delta_i$ over the
//! queries that see $j$; then through $\phi' (x) = 1$ for $x > 0$, else $e^x$. The causal form runs
//! the queries front to back (their states) and the keys back to front (the gradient states).

use super::kernelized::{head_backward, head_forward, keys_back_all, Features, Guard, Rule};
use super::{axpy, dot, heads, write_out, Dims};
use crate::error::{AttnError, Result};
use crate::real::Real;
use crate::simd::{Isa, Kernels};
use crate::view::{View, ViewMut};
use rayon::prelude::*;

pub use super::kernelized::CHUNK;

/// The denominator's ε, added after the dot product.
pub const EPS: f32 = 1e-6;

/// The options of [`forward`] and [`backward`].
#[derive(Clone, Copy, Debug)]
pub struct Linear<'a> {
    /// Prefix sums only: query `i` sees keys `j ≤ i` (needs `Nq = Nk`).
    pub causal: bool,
    /// Added to every denominator (default [`EPS`]).
    pub eps: f32,
    /// The keys each batch row may use, `B × Nk` row-major (`true` = use): padding.
    pub key_mask: Option<&'a [bool]>,
    /// The instruction set of the products (default: the fastest this CPU has).
    pub isa: Isa,
}

impl Default for Linear<'_> {
    fn default() -> Self {
        Self {
            causal: false,
            eps: EPS,
            key_mask: None,
            isa: Isa::best(),
        }
    }
}

/// $\phi(x) = \mathrm{elu}(x) + 1$.
#[inline]
pub fn phi(x: f32) -> f32 {
    if x > 0.0 {
        x + 1.0
    } else {
        x.exp()
    }
}

/// `out ← φ(x)`, the exponentials on the instruction set's vector exp; rows hidden by `mask`
/// (one flag per row of `width`) are 0.
fn phi_into(kern: &Kernels, x: &[f32], width: usize, mask: Option<&[bool]>, out: &mut [f32]) {
    let out = &mut out[..x.len()];
    for (e, &v) in out.iter_mut().zip(x) {
        *e = v.min(0.0);
    }
    // SAFETY: `out` holds `out.len()` elements.
    unsafe { (kern.exp_sum)(out.as_mut_ptr(), out.len(), 1.0, 0.0) };
    for (e, &v) in out.iter_mut().zip(x) {
        *e = if v > 0.0 { v + 1.0 } else { *e };
    }
    if let Some(m) = mask {
        for (row, &keep) in out.chunks_exact_mut(width).zip(m) {
            if !keep {
                row.fill(0.0);
            }
        }
    }
}

/// `out ← g·φ′(x)` with `p = φ(x)`: φ′ is 1 for `x > 0`, else `eˣ = φ(x)`.
fn times_dphi(out: &mut [f32], g: &[f32], x: &[f32], p: &[f32]) {
    for (((o, &g), &x), &p) in out.iter_mut().zip(g).zip(x).zip(p) {
        *o = g * if x > 0.0 { 1.0 } else { p };
    }
}

impl Linear<'_> {
    fn check(&self, q: &View, k: &View, v: &View) -> Result<Dims> {
        let dims = Dims::of(q, k, v)?;
        if self.causal && dims.nq != dims.nk {
            return Err(AttnError::ConflictingOptions {
                a: "causal",
                b: "Nq ≠ Nk",
                reason: "causal linear attention pairs query i with keys 0..=i",
            });
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(AttnError::InvalidOption {
                option: "eps",
                value: self.eps as f64,
                reason: "must be finite and not negative",
            });
        }
        if let Some(m) = self.key_mask {
            crate::error::expect_len("key_mask", m.len(), dims.b * dims.nk)?;
        }
        Ok(dims)
    }

    fn rule(&self) -> Rule {
        Rule {
            causal: self.causal,
            guard: Guard::Eps(self.eps),
        }
    }
}

/// The feature map φ = elu + 1 of one head's queries (`nq × d`) and keys (`nk × d`).
struct Elu<'a> {
    q: &'a [f32],
    k: &'a [f32],
    mask: Option<&'a [bool]>,
    d: usize,
}

impl Features for Elu<'_> {
    fn width(&self) -> usize {
        self.d
    }

    fn nq(&self) -> usize {
        self.q.len() / self.d
    }

    fn nk(&self) -> usize {
        self.k.len() / self.d
    }

    fn queries(&self, kern: &Kernels, (r0, r1): (usize, usize), out: &mut [f32]) {
        phi_into(kern, &self.q[r0 * self.d..r1 * self.d], self.d, None, out);
    }

    fn keys(&self, kern: &Kernels, (r0, r1): (usize, usize), out: &mut [f32]) {
        let mask = self.mask.map(|m| &m[r0..r1]);
        phi_into(kern, &self.k[r0 * self.d..r1 * self.d], self.d, mask, out);
    }

    fn queries_back(
        &self,
        _: &Kernels,
        (r0, r1): (usize, usize),
        a: &[f32],
        da: &[f32],
        dq: &mut [f32],
    ) {
        times_dphi(dq, da, &self.q[r0 * self.d..r1 * self.d], a);
    }

    fn keys_back(
        &self,
        _: &Kernels,
        (r0, r1): (usize, usize),
        b: &[f32],
        db: &[f32],
        dk: &mut [f32],
    ) {
        times_dphi(dk, db, &self.k[r0 * self.d..r1 * self.d], b);
        // A hidden key's φ is the constant 0, so its gradient is too.
        if let Some(m) = self.mask {
            for (row, &keep) in dk.chunks_exact_mut(self.d).zip(&m[r0..r1]) {
                if !keep {
                    row.fill(0.0);
                }
            }
        }
    }
}

/// Linear attention of `q` over `k`, `v` into `out` (`[B, Hq, Nq, Dv]`).
///
/// ```
/// use attentive::variants::linear::{forward, Linear};
/// use attentive::{View, ViewMut};
/// // One query, two keys: weights φ(q)·φ(k_j) = 2·2 + 1·1 = 5 and 2·1 + 1·2 = 4.
/// let q = [1.0f32, 0.0];
/// let k = [1.0f32, 0.0, 0.0, 1.0];
/// let v = [9.0f32, 0.0];
/// let mut o = [0.0f32];
/// forward(View::contiguous(&q, &[1, 1, 1, 2]).unwrap(), View::contiguous(&k, &[1, 1, 2, 2]).unwrap(),
///     View::contiguous(&v, &[1, 1, 2, 1]).unwrap(), &Linear::default(),
///     &mut ViewMut::contiguous(&mut o, [1, 1, 1, 1]).unwrap()).unwrap();
/// assert!((o[0] - 5.0).abs() < 1e-5); // (5·9 + 4·0) / 9
/// ```
///
/// # Errors
/// Shapes that disagree, an empty dimension, query heads not a multiple of key/value heads,
/// `causal` with `Nq ≠ Nk`, a negative or non-finite `eps`, a key mask of the wrong length, an
/// instruction set this CPU lacks.
pub fn forward(q: View, k: View, v: View, opts: &Linear, out: &mut ViewMut) -> Result<()> {
    let dims = opts.check(&q, &k, &v)?;
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
    write_out(out, |o| {
        o.par_chunks_mut(nq * dv).enumerate().for_each(|(bh, o)| {
            let (bi, h) = (bh / hq, bh % hq);
            let kv = bi * dims.hkv + h / dims.group();
            let head = Elu {
                q: &qh[bh * nq * d..][..nq * d],
                k: &kh[kv * nk * d..][..nk * d],
                mask: opts.key_mask.map(|m| &m[bi * nk..(bi + 1) * nk]),
                d,
            };
            head_forward(
                kern,
                &head,
                &vh[kv * nk * dv..][..nk * dv],
                opts.rule(),
                o,
                None,
            );
        })
    });
    Ok(())
}

/// Gradients of linear attention: given the forward's inputs and `d_o` (`[B, Hq, Nq, Dv]`),
/// writes dQ, dK and dV (dK, dV summed over each group of query heads).
///
/// # Errors
/// As [`forward`], and gradients of the wrong shape.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: View,
    k: View,
    v: View,
    d_o: View,
    opts: &Linear,
    dq: &mut ViewMut,
    dk: &mut ViewMut,
    dv: &mut ViewMut,
) -> Result<()> {
    let dims = opts.check(&q, &k, &v)?;
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
    let elu = |bi: usize, kv: usize, q| Elu {
        q,
        k: &kh[kv * nk * d..][..nk * d],
        mask: opts.key_mask.map(|m| &m[bi * nk..(bi + 1) * nk]),
        d,
    };
    super::backward_by_kv_head(
        dims,
        d,
        (dq, dk, dv),
        |bi, kv, bh, grads| {
            let head = elu(bi, kv, &qh[bh * nq * d..][..nq * d]);
            let (vv, dout) = (
                &vh[kv * nk * dvd..][..nk * dvd],
                &doh[bh * nq * dvd..][..nq * dvd],
            );
            head_backward(kern, &head, vv, dout, opts.rule(), grads);
        },
        |bi, kv, db, dk| keys_back_all(kern, &elu(bi, kv, &[]), db, dk),
    )
}

/// The causal recurrence one token at a time, for decoding: $S \mathrel{+}= \phi(k)v^\top$,
/// $z \mathrel{+}= \phi(k)$, $o = \phi(q)^\top S / (\phi(q)\cdot z + \varepsilon)$. One state per
/// (batch row, head); it holds `D × Dv + D` floats whatever the length.
///
/// ```
/// use attentive::variants::linear::LinearState;
/// let mut s = LinearState::new(2, 1);
/// s.push(&[1.0, 0.0], &[9.0]).unwrap();
/// s.push(&[0.0, 1.0], &[0.0]).unwrap();
/// let mut o = [0.0];
/// s.read(&[1.0, 0.0], 1e-6, &mut o).unwrap();
/// assert!((o[0] - 5.0).abs() < 1e-5);
/// ```
#[derive(Clone, Debug)]
pub struct LinearState {
    d: usize,
    dv: usize,
    s: Vec<f32>,
    z: Vec<f32>,
    len: usize,
}

impl LinearState {
    /// An empty state for keys of width `d` and values of width `dv`.
    pub fn new(d: usize, dv: usize) -> Self {
        Self {
            d,
            dv,
            s: vec![0.0; d * dv],
            z: vec![0.0; d],
            len: 0,
        }
    }

    /// Tokens pushed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No token pushed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds one key and its value.
    ///
    /// # Errors
    /// [`AttnError::LengthMismatch`] for a key not `d` or a value not `dv` long.
    pub fn push(&mut self, k: &[f32], v: &[f32]) -> Result<()> {
        crate::error::expect_len("k", k.len(), self.d)?;
        crate::error::expect_len("v", v.len(), self.dv)?;
        let b: Vec<f32> = k.iter().map(|&x| phi(x)).collect();
        for (c, &bc) in b.iter().enumerate() {
            axpy(&mut self.s[c * self.dv..(c + 1) * self.dv], bc, v);
        }
        axpy(&mut self.z, 1.0, &b);
        self.len += 1;
        Ok(())
    }

    /// The attention of query `q` over every key pushed, into `out` (`dv`).
    ///
    /// # Errors
    /// [`AttnError::LengthMismatch`] for a query or output of the wrong length.
    pub fn read(&self, q: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
        crate::error::expect_len("q", q.len(), self.d)?;
        crate::error::expect_len("out", out.len(), self.dv)?;
        let a: Vec<f32> = q.iter().map(|&x| phi(x)).collect();
        out.fill(0.0);
        for (c, &ac) in a.iter().enumerate() {
            axpy(out, ac, &self.s[c * self.dv..(c + 1) * self.dv]);
        }
        let den = dot(&a, &self.z) + eps;
        out.iter_mut().for_each(|x| *x /= den);
        Ok(())
    }
}

/// The oracle: linear attention in its quadratic form, one pair at a time,
/// $A_{ij} = \phi(q_i)\cdot\phi(k_j)$ (0 for a hidden key or, causal, $j > i$),
/// $o_i = \sum_j A_{ij} v_j / (\sum_j A_{ij} + \varepsilon)$, with its gradients
/// $dA_{ij} = do_i\cdot(v_j - o_i)/\delta_i$, $da_i = \sum_j dA_{ij} b_j$, $db_j = \sum_i dA_{ij} a_i$,
/// $dv_j = \sum_i A_{ij}\\,do_i/\delta_i$. Generic over the float type: `f64` is the oracle, `f32`
/// the naive baseline of the accuracy rule.
pub mod oracle {
    use super::*;

    /// `(o, dq, dk, dv)`: the output and, given `d_o`, the gradients, row-major.
    pub type Out<T> = (Vec<T>, Vec<T>, Vec<T>, Vec<T>);

    /// The output and gradients of [`forward`] / [`backward`],
    /// naively. `d_o` may be any tensor of the output's shape (zeros for the output alone).
    ///
    /// # Errors
    /// As [`forward`].
    #[allow(clippy::needless_range_loop)] // pair by pair, as the definition reads
    pub fn linear<T: Real>(q: View, k: View, v: View, d_o: View, opts: &Linear) -> Result<Out<T>> {
        let dims = opts.check(&q, &k, &v)?;
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
        let phi = |x: f32| -> T {
            let x = f(x);
            if x > T::ZERO {
                x + T::ONE
            } else {
                x.exp()
            }
        };
        let dphi = |x: f32| -> T {
            let x = f(x);
            if x > T::ZERO {
                T::ONE
            } else {
                x.exp()
            }
        };
        let eps = f(opts.eps);
        let group = dims.group();
        let mut o = vec![T::ZERO; b * hq * nq * dv];
        let mut dq = vec![T::ZERO; b * hq * nq * d];
        let mut dk = vec![T::ZERO; b * hkv * nk * d];
        let mut dvv = vec![T::ZERO; b * hkv * nk * dv];
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / group;
                let visible = |i: usize, j: usize| {
                    opts.key_mask.is_none_or(|m| m[bi * nk + j]) && (!opts.causal || j <= i)
                };
                for i in 0..nq {
                    let a: Vec<T> = (0..nk)
                        .map(|j| match visible(i, j) {
                            true => (0..d).fold(T::ZERO, |s, c| {
                                s + phi(q.at(bi, h, i, c)) * phi(k.at(bi, kh, j, c))
                            }),
                            false => T::ZERO,
                        })
                        .collect();
                    let den = a.iter().fold(T::ZERO, |s, &x| s + x) + eps;
                    let row = (bi * hq + h) * nq + i;
                    for c in 0..dv {
                        let num = (0..nk).fold(T::ZERO, |s, j| s + a[j] * f(v.at(bi, kh, j, c)));
                        o[row * dv + c] = num * den.recip();
                    }
                    let doi: Vec<T> = (0..dv).map(|c| f(d_o.at(bi, h, i, c))).collect();
                    for j in 0..nk {
                        if !visible(i, j) {
                            continue;
                        }
                        let da = (0..dv).fold(T::ZERO, |s, c| {
                            s + doi[c] * (f(v.at(bi, kh, j, c)) - o[row * dv + c])
                        }) * den.recip();
                        let kj = (bi * hkv + kh) * nk + j;
                        for c in 0..d {
                            let (qc, kc) = (q.at(bi, h, i, c), k.at(bi, kh, j, c));
                            dq[row * d + c] = dq[row * d + c] + da * phi(kc) * dphi(qc);
                            dk[kj * d + c] = dk[kj * d + c] + da * phi(qc) * dphi(kc);
                        }
                        for c in 0..dv {
                            dvv[kj * dv + c] = dvv[kj * dv + c] + a[j] * doi[c] * den.recip();
                        }
                    }
                }
            }
        }
        Ok((o, dq, dk, dvv))
    }
}
