//! Linformer (Wang et al., 2020): keys and values projected along the sequence to `k` rows,
//! then exact softmax attention over those,
//! $$K' = E^\top K,\quad V' = F^\top V,\qquad O = \mathrm{softmax}\big(\text{scale}\cdot QK'^\top\big)V',$$
//! with $E, F \in \mathbb{R}^{N\times k}$ shared by every head (lucidrains' form; `F = E` when only
//! `E` is given, his `share_kv`) and scale $1/\sqrt{D}$. The projections fix the sequence length
//! to `N`, and mixing positions before attention has no causal form: none is offered.
//!
//! The attention itself runs on the fused kernel over the `k` projected rows; the backward
//! takes its dK′, dV′ back through the projections: $dK = E\\,dK'$, $dE = \sum_{b,h} K\\,dK'^\top$
//! (and likewise for V and F).

use super::{gemm, heads, transpose, Dims};
use crate::error::{AttnError, Result};
use crate::options::Options;
use crate::real::Real;
use crate::simd::{Isa, Kernels};
use crate::view::{View, ViewMut};
use rayon::prelude::*;

/// The options of [`forward`] and [`backward`].
#[derive(Clone, Copy, Debug)]
pub struct Linformer<'a> {
    /// E, `N × k` row-major.
    pub e: &'a [f32],
    /// F, `N × k`; `None` shares E.
    pub f: Option<&'a [f32]>,
    /// Projected length `k`.
    pub k: usize,
    /// Multiplies q·k′; `None` is $1/\sqrt{D}$.
    pub scale: Option<f32>,
    /// The instruction set of the projections (default: the fastest this CPU has).
    pub isa: Isa,
}

impl<'a> Linformer<'a> {
    /// Projections E (and F) of `k` columns, the default scale.
    pub fn new(e: &'a [f32], f: Option<&'a [f32]>, k: usize) -> Self {
        Self {
            e,
            f,
            k,
            scale: None,
            isa: Isa::best(),
        }
    }

    fn check(&self, q: &View, k: &View, v: &View) -> Result<Dims> {
        let dims = Dims::of(q, k, v)?;
        if self.k == 0 {
            return Err(AttnError::InvalidOption {
                option: "k",
                value: 0.0,
                reason: "the projected length must be at least 1",
            });
        }
        for (name, p) in [("e", Some(self.e)), ("f", self.f)] {
            let Some(p) = p else { continue };
            crate::error::expect_len(name, p.len(), dims.nk * self.k)?;
            if let Some(&x) = p.iter().find(|x| !x.is_finite()) {
                return Err(AttnError::InvalidOption {
                    option: "projection",
                    value: x as f64,
                    reason: "E and F must be finite",
                });
            }
        }
        Ok(dims)
    }

    fn f(&self) -> &'a [f32] {
        self.f.unwrap_or(self.e)
    }
}

/// `Pᵀ·X` for every head: `x` is `[heads][N × w]`, `p` is `N × k`; gives `[heads][k × w]`.
fn project(kern: &Kernels, p: &[f32], x: &[f32], (n, k, w): (usize, usize, usize)) -> Vec<f32> {
    let heads = x.len() / (n * w);
    let mut out = vec![0.0f32; heads * k * w];
    out.par_chunks_mut(k * w)
        .zip(x.par_chunks(n * w))
        .for_each(|(o, xh)| {
            gemm(kern, (k, n, w), p, (1, k), xh, w, o, w, false);
        });
    out
}

/// Linformer attention of `q` over `k`, `v` into `out` (`[B, Hq, Nq, Dv]`).
///
/// ```
/// use attentive::variants::linformer::{forward, Linformer};
/// use attentive::{View, ViewMut};
/// // E = F = I (k = N): exactly softmax attention.
/// let (n, d) = (3, 2);
/// let x = [0.1f32, 0.2, 0.3, -0.1, 0.5, 0.0];
/// let eye = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
/// let v = View::contiguous(&x, &[1, 1, n, d]).unwrap();
/// let mut o = [0.0f32; 6];
/// forward(v, v, v, &Linformer::new(&eye, None, n), &mut ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap()).unwrap();
/// let mut want = [0.0f32; 6];
/// attentive::forward(v, v, v, &attentive::Options::new(), &mut ViewMut::contiguous(&mut want, [1, 1, n, d]).unwrap(), None).unwrap();
/// assert!(o.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));
/// ```
///
/// # Errors
/// Shapes that disagree, an empty dimension, query heads not a multiple of key/value heads,
/// `k = 0`, E or F not `N × k` or not finite, an instruction set this CPU lacks.
pub fn forward(q: View, k: View, v: View, opts: &Linformer, out: &mut ViewMut) -> Result<()> {
    let dims = opts.check(&q, &k, &v)?;
    let kern = opts.isa.kernels()?;
    let Dims {
        b, hkv, nk, d, dv, ..
    } = dims;
    let kp = project(kern, opts.e, &heads(&k)?, (nk, opts.k, d)); //   [B, Hkv, k, D]
    let vp = project(kern, opts.f(), &heads(&v)?, (nk, opts.k, dv)); // [B, Hkv, k, Dv]
    let kv = View::contiguous(&kp, &[b, hkv, opts.k, d])?;
    let vv = View::contiguous(&vp, &[b, hkv, opts.k, dv])?;
    let mut o = Options::new().isa(opts.isa);
    o.scale = opts.scale;
    crate::forward(q, kv, vv, &o, out, None)
}

/// Gradients of Linformer: dQ, dK, dV and, when given, dE and dF (`N × k`, summed over batch and
/// heads; with F shared, `d_e` receives both and `d_f` must be `None`).
///
/// # Errors
/// As [`forward`], gradients of the wrong shape, `d_f` with F shared.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: View,
    k: View,
    v: View,
    d_o: View,
    opts: &Linformer,
    (dq, dk, dv): (&mut ViewMut, &mut ViewMut, &mut ViewMut),
    d_e: Option<&mut [f32]>,
    d_f: Option<&mut [f32]>,
) -> Result<()> {
    let dims = opts.check(&q, &k, &v)?;
    let kern = opts.isa.kernels()?;
    let Dims {
        b,
        hq,
        hkv,
        nq,
        nk,
        d,
        dv: dvd,
    } = dims;
    let kp_len = opts.k;
    crate::error::expect_shape("d_o", d_o.shape(), [b, hq, nq, dvd])?;
    crate::error::expect_shape("dk", dk.shape(), [b, hkv, nk, d])?;
    crate::error::expect_shape("dv", dv.shape(), [b, hkv, nk, dvd])?;
    if opts.f.is_none() && d_f.is_some() {
        return Err(AttnError::ConflictingOptions {
            a: "d_f",
            b: "F shared with E",
            reason: "the shared projection's gradient goes to d_e",
        });
    }
    for (name, g) in [("d_e", d_e.as_deref()), ("d_f", d_f.as_deref())] {
        if let Some(g) = g {
            crate::error::expect_len(name, g.len(), nk * kp_len)?;
        }
    }
    let (kh, vh) = (heads(&k)?, heads(&v)?);
    let kp = project(kern, opts.e, &kh, (nk, kp_len, d));
    let vp = project(kern, opts.f(), &vh, (nk, kp_len, dvd));
    let (kv, vv) = (
        View::contiguous(&kp, &[b, hkv, kp_len, d])?,
        View::contiguous(&vp, &[b, hkv, kp_len, dvd])?,
    );
    let mut o = Options::new().isa(opts.isa);
    o.scale = opts.scale;
    let mut out = vec![0.0f32; b * hq * nq * dvd];
    let mut lse = vec![0.0f32; b * hq * nq];
    crate::forward(
        q,
        kv,
        vv,
        &o,
        &mut ViewMut::contiguous(&mut out, [b, hq, nq, dvd])?,
        Some(&mut lse),
    )?;
    let (mut dkp, mut dvp) = (vec![0.0f32; kp.len()], vec![0.0f32; vp.len()]);
    crate::backward(
        q,
        kv,
        vv,
        View::contiguous(&out, &[b, hq, nq, dvd])?,
        &lse,
        d_o,
        &o,
        dq,
        &mut ViewMut::contiguous(&mut dkp, [b, hkv, kp_len, d])?,
        &mut ViewMut::contiguous(&mut dvp, [b, hkv, kp_len, dvd])?,
    )?;
    // dK = E·dK′, dV = F·dV′ per head.
    let back = |p: &[f32], dxp: &[f32], w: usize| -> Vec<f32> {
        let mut dx = vec![0.0f32; b * hkv * nk * w];
        dx.par_chunks_mut(nk * w)
            .zip(dxp.par_chunks(kp_len * w))
            .for_each(|(o, g)| {
                gemm(kern, (nk, kp_len, w), p, (kp_len, 1), g, w, o, w, false);
            });
        dx
    };
    let (dks, dvs) = (back(opts.e, &dkp, d), back(opts.f(), &dvp, dvd));
    let mut it = dks.chunks_exact(d);
    dk.for_each_row(|_, _, _, row| row.copy_from_slice(it.next().expect("one row each")));
    let mut it = dvs.chunks_exact(dvd);
    dv.for_each_row(|_, _, _, row| row.copy_from_slice(it.next().expect("one row each")));
    // dP = Σ_heads X·dX′ᵀ (N × k)
    let grad_p = |x: &[f32], dxp: &[f32], w: usize, into: &mut [f32]| {
        let mut t = vec![0.0f32; w * kp_len];
        for (xh, gh) in x.chunks_exact(nk * w).zip(dxp.chunks_exact(kp_len * w)) {
            transpose(gh, (kp_len, w), &mut t);
            gemm(
                kern,
                (nk, w, kp_len),
                xh,
                (w, 1),
                &t,
                kp_len,
                into,
                kp_len,
                true,
            );
        }
    };
    if let Some(de) = d_e {
        de.fill(0.0);
        grad_p(&kh, &dkp, d, de);
        if opts.f.is_none() {
            grad_p(&vh, &dvp, dvd, de);
        }
    }
    if let Some(df) = d_f {
        df.fill(0.0);
        grad_p(&vh, &dvp, dvd, df);
    }
    Ok(())
}

/// The oracle: the projections and softmax attention over their rows, one term at a time, with
/// the gradients of every input and of E and F (`d_e` holds both when F is shared). Generic
/// over the float type: `f64` is the oracle, `f32` the naive baseline.
pub mod oracle {
    use super::*;

    /// `(o, dq, dk, dv, d_e, d_f)`, row-major (`d_f` empty when F is shared).
    pub type Out<T> = (Vec<T>, Vec<T>, Vec<T>, Vec<T>, Vec<T>, Vec<T>);

    /// # Errors
    /// As [`forward`].
    #[allow(clippy::needless_range_loop)] // term by term, as the definition reads
    pub fn linformer<T: Real>(
        q: View,
        k: View,
        v: View,
        d_o: View,
        opts: &Linformer,
    ) -> Result<Out<T>> {
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
        let kp = opts.k;
        let scale = f(opts.scale.unwrap_or(1.0 / (d as f32).sqrt()));
        let (e, fm) = (opts.e, opts.f());
        let group = dims.group();
        let mut o = vec![T::ZERO; b * hq * nq * dv];
        let mut dq = vec![T::ZERO; b * hq * nq * d];
        let mut dk = vec![T::ZERO; b * hkv * nk * d];
        let mut dvv = vec![T::ZERO; b * hkv * nk * dv];
        let mut de = vec![T::ZERO; nk * kp];
        let mut df = vec![T::ZERO; nk * kp];
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / group;
                // K′ = Eᵀ K, V′ = Fᵀ V                                     (k, D), (k, Dv)
                let kpr: Vec<Vec<T>> = (0..kp)
                    .map(|r| {
                        (0..d)
                            .map(|c| {
                                (0..nk).fold(T::ZERO, |s, t| {
                                    s + f(e[t * kp + r]) * f(k.at(bi, kh, t, c))
                                })
                            })
                            .collect()
                    })
                    .collect();
                let vpr: Vec<Vec<T>> = (0..kp)
                    .map(|r| {
                        (0..dv)
                            .map(|c| {
                                (0..nk).fold(T::ZERO, |s, t| {
                                    s + f(fm[t * kp + r]) * f(v.at(bi, kh, t, c))
                                })
                            })
                            .collect()
                    })
                    .collect();
                let (mut dkp, mut dvp) = (vec![vec![T::ZERO; d]; kp], vec![vec![T::ZERO; dv]; kp]);
                for i in 0..nq {
                    let s: Vec<T> = (0..kp)
                        .map(|r| {
                            (0..d).fold(T::ZERO, |a, c| a + f(q.at(bi, h, i, c)) * kpr[r][c])
                                * scale
                        })
                        .collect();
                    let m = s.iter().fold(T::NEG_INF, |a, &x| if x > a { x } else { a });
                    let ex: Vec<T> = s.iter().map(|&x| (x - m).exp()).collect();
                    let z = ex.iter().fold(T::ZERO, |a, &x| a + x);
                    let p: Vec<T> = ex.iter().map(|&x| x * z.recip()).collect();
                    let row = (bi * hq + h) * nq + i;
                    for c in 0..dv {
                        o[row * dv + c] = (0..kp).fold(T::ZERO, |a, r| a + p[r] * vpr[r][c]);
                    }
                    let g: Vec<T> = (0..dv).map(|c| f(d_o.at(bi, h, i, c))).collect();
                    let dp: Vec<T> = (0..kp)
                        .map(|r| (0..dv).fold(T::ZERO, |a, c| a + g[c] * vpr[r][c]))
                        .collect();
                    let dd = (0..kp).fold(T::ZERO, |a, r| a + p[r] * dp[r]);
                    for r in 0..kp {
                        let ds = p[r] * (dp[r] - dd) * scale;
                        for c in 0..d {
                            dq[row * d + c] = dq[row * d + c] + ds * kpr[r][c];
                            dkp[r][c] = dkp[r][c] + ds * f(q.at(bi, h, i, c));
                        }
                        for c in 0..dv {
                            dvp[r][c] = dvp[r][c] + p[r] * g[c];
                        }
                    }
                }
                for t in 0..nk {
                    let at = (bi * hkv + kh) * nk + t;
                    for r in 0..kp {
                        for c in 0..d {
                            dk[at * d + c] = dk[at * d + c] + f(e[t * kp + r]) * dkp[r][c];
                            de[t * kp + r] = de[t * kp + r] + f(k.at(bi, kh, t, c)) * dkp[r][c];
                        }
                        for c in 0..dv {
                            dvv[at * dv + c] = dvv[at * dv + c] + f(fm[t * kp + r]) * dvp[r][c];
                            let to = if opts.f.is_some() { &mut df } else { &mut de };
                            to[t * kp + r] = to[t * kp + r] + f(v.at(bi, kh, t, c)) * dvp[r][c];
                        }
                    }
                }
            }
        }
        if opts.f.is_none() {
            df.clear();
        }
        Ok((o, dq, dk, dvv, de, df))
    }
}
