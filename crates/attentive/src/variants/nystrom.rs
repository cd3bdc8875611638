//! Nyströmformer (Xiong et al., 2021): softmax attention approximated through `m` landmarks,
//! $$O = \mathrm{softmax}(Q\tilde K^\top)\\;Z\\;\mathrm{softmax}(\tilde Q K^\top)\\,V,
//!   \qquad Z \approx \mathrm{softmax}(\tilde Q\tilde K^\top)^{+},$$
//! where q and k are each scaled by $D^{-1/4}$, the landmarks $\tilde Q$, $\tilde K$ are the means
//! of `m` contiguous segments (`N` a multiple of `m`), and `Z` is the iterative pseudo-inverse
//! $Z \leftarrow \tfrac14 Z\big(13I - AZ(15I - AZ(7I - AZ))\big)$ from
//! $Z_0 = A^\top / \max_j \sum_i A_{ij}$. The paper's code takes that maximum over the whole
//! batch, so one sequence's output depends on the others; here it is taken per matrix. Six
//! iterations (the default) have not converged on random inputs; twenty reach the true
//! pseudo-inverse. With `m = N` and enough iterations this is exact softmax attention.
//!
//! The backward runs through every step, the iterations included (their intermediates are kept:
//! a few `m × m` matrices each), and through the maximum of $Z_0$ to its column.

use super::{gemm, heads, transpose, Dims};
use crate::error::{AttnError, Result};
use crate::real::Real;
use crate::simd::{Isa, Kernels};
use crate::view::{View, ViewMut};
use rayon::prelude::*;

/// The paper's iterations of the pseudo-inverse.
pub const ITERATIONS: usize = 6;

/// The options of [`forward`] and [`backward`].
#[derive(Clone, Copy, Debug)]
pub struct Nystrom {
    /// Landmarks `m` (dividing `N`).
    pub landmarks: usize,
    /// Iterations of the pseudo-inverse.
    pub iterations: usize,
    /// The instruction set of the products (default: the fastest this CPU has).
    pub isa: Isa,
}

impl Nystrom {
    /// `m` landmarks, the paper's six iterations.
    pub fn new(landmarks: usize) -> Self {
        Self {
            landmarks,
            iterations: ITERATIONS,
            isa: Isa::best(),
        }
    }

    fn check(&self, q: &View, k: &View, v: &View) -> Result<Dims> {
        let dims = Dims::of(q, k, v)?;
        let m = self.landmarks;
        if m == 0 || dims.nq % m != 0 || dims.nk % m != 0 {
            return Err(AttnError::InvalidOption {
                option: "landmarks",
                value: m as f64,
                reason: "the landmarks must divide the queries and the keys into equal segments",
            });
        }
        Ok(dims)
    }
}

/// Row-wise softmax in place (`cols` wide).
fn softmax_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            z += *v;
        }
        row.iter_mut().for_each(|v| *v /= z);
    }
}

/// `dX = Y ⊙ (dY − rowsum(dY ⊙ Y))` in place of `dy`.
fn softmax_rows_back(y: &[f32], dy: &mut [f32], cols: usize) {
    for (yr, dr) in y.chunks_exact(cols).zip(dy.chunks_exact_mut(cols)) {
        let s = super::dot(yr, dr);
        for (d, &yv) in dr.iter_mut().zip(yr) {
            *d = yv * (*d - s);
        }
    }
}

/// Means of `m` contiguous segments of the rows of `x` (`n × w`).
fn segment_means(x: &[f32], (n, w): (usize, usize), m: usize) -> Vec<f32> {
    let seg = n / m;
    let mut out = vec![0.0f32; m * w];
    for (r, row) in x.chunks_exact(w).enumerate() {
        super::axpy(
            &mut out[r / seg * w..(r / seg + 1) * w],
            1.0 / seg as f32,
            row,
        );
    }
    out
}

/// `C (a × c) = A (a × b) · B (b × c)`, all row-major.
fn mm(kern: &Kernels, a: &[f32], b: &[f32], (r, k, c): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0.0f32; r * c];
    gemm(kern, (r, k, c), a, (k, 1), b, c, &mut out, c, false);
    out
}

/// `Aᵀ·B` for `A` (`k × r`) and `B` (`k × c`).
fn mtm(kern: &Kernels, a: &[f32], b: &[f32], (r, k, c): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0.0f32; r * c];
    gemm(kern, (r, k, c), a, (1, r), b, c, &mut out, c, false);
    out
}

/// `A·Bᵀ` for `A` (`r × k`) and `B` (`c × k`).
fn mmt(kern: &Kernels, a: &[f32], b: &[f32], (r, k, c): (usize, usize, usize)) -> Vec<f32> {
    let mut bt = vec![0.0f32; k * c];
    transpose(b, (c, k), &mut bt);
    mm(kern, a, &bt, (r, k, c))
}

/// One iteration's matrices: `Z`, `P = AZ`, `T1 = 7I − P`, `T2 = 15I − P·T1`, `T3 = 13I − P·T2`.
struct Step {
    z: Vec<f32>,
    p: Vec<f32>,
    t1: Vec<f32>,
    t2: Vec<f32>,
    t3: Vec<f32>,
}

fn eye_minus(c: f32, x: &[f32], m: usize) -> Vec<f32> {
    let mut out: Vec<f32> = x.iter().map(|v| -v).collect();
    (0..m).for_each(|i| out[i * m + i] += c);
    out
}

/// The pseudo-inverse iterations from `A` (`m × m`): the result, and each step for the backward.
fn pinv(
    kern: &Kernels,
    a: &[f32],
    m: usize,
    iterations: usize,
) -> (Vec<f32>, Vec<Step>, usize, f32) {
    // Z₀ = Aᵀ / max_j Σ_i A_ij
    let colsum: Vec<f32> = (0..m).map(|j| (0..m).map(|i| a[i * m + j]).sum()).collect();
    let (jmax, cmax) = colsum
        .iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |acc, (j, &c)| if c > acc.1 { (j, c) } else { acc },
        );
    let mut z = vec![0.0f32; m * m];
    transpose(a, (m, m), &mut z);
    z.iter_mut().for_each(|x| *x /= cmax);
    let mut steps = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let p = mm(kern, a, &z, (m, m, m));
        let t1 = eye_minus(7.0, &p, m);
        let t2 = eye_minus(15.0, &mm(kern, &p, &t1, (m, m, m)), m);
        let t3 = eye_minus(13.0, &mm(kern, &p, &t2, (m, m, m)), m);
        let next: Vec<f32> = mm(kern, &z, &t3, (m, m, m))
            .iter()
            .map(|x| 0.25 * x)
            .collect();
        steps.push(Step { z, p, t1, t2, t3 });
        z = next;
    }
    (z, steps, jmax, cmax)
}

/// One head's forward pieces.
struct Head {
    qs: Vec<f32>,
    ks: Vec<f32>,
    ql: Vec<f32>,
    kl: Vec<f32>,
    f: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    z: Vec<f32>,
    steps: Vec<Step>,
    jmax: usize,
    cmax: f32,
    w: Vec<f32>,
    y: Vec<f32>,
}

fn head_forward(
    kern: &Kernels,
    opts: &Nystrom,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (d, dv): (usize, usize),
) -> (Vec<f32>, Head) {
    let (nq, nk, m) = (q.len() / d, k.len() / d, opts.landmarks);
    let c = (d as f32).powf(-0.25);
    let qs: Vec<f32> = q.iter().map(|x| x * c).collect();
    let ks: Vec<f32> = k.iter().map(|x| x * c).collect();
    let (ql, kl) = (
        segment_means(&qs, (nq, d), m),
        segment_means(&ks, (nk, d), m),
    );
    // F = softmax(Q K̃ᵀ), A = softmax(Q̃ K̃ᵀ), B = softmax(Q̃ Kᵀ)          (nq, m), (m, m), (m, nk)
    let mut f = mmt(kern, &qs, &kl, (nq, d, m));
    let mut a = mmt(kern, &ql, &kl, (m, d, m));
    let mut b = mmt(kern, &ql, &ks, (m, d, nk));
    softmax_rows(&mut f, m);
    softmax_rows(&mut a, m);
    softmax_rows(&mut b, nk);
    let (z, steps, jmax, cmax) = pinv(kern, &a, m, opts.iterations);
    // O = F·(Z·(B·V))                                                    (nq, dv)
    let w = mm(kern, &b, v, (m, nk, dv));
    let y = mm(kern, &z, &w, (m, m, dv));
    let o = mm(kern, &f, &y, (nq, m, dv));
    (
        o,
        Head {
            qs,
            ks,
            ql,
            kl,
            f,
            a,
            b,
            z,
            steps,
            jmax,
            cmax,
            w,
            y,
        },
    )
}

/// Nyström attention of `q` over `k`, `v` into `out` (`[B, Hq, Nq, Dv]`).
///
/// ```
/// use attentive::variants::nystrom::{forward, Nystrom};
/// use attentive::{View, ViewMut};
/// // One landmark: every query reads the keys through the same one row of weights.
/// let x = [0.2f32, -0.1, 0.4, 0.3];
/// let v = View::contiguous(&x, &[1, 1, 4, 1]).unwrap();
/// let mut o = [0.0f32; 4];
/// forward(v, v, v, &Nystrom::new(1), &mut ViewMut::contiguous(&mut o, [1, 1, 4, 1]).unwrap()).unwrap();
/// assert!(o.iter().all(|&y| (y - o[0]).abs() < 1e-6) && (-0.1..=0.4).contains(&o[0]));
/// ```
///
/// # Errors
/// Shapes that disagree, an empty dimension, query heads not a multiple of key/value heads,
/// landmarks that do not divide the queries and keys, an instruction set this CPU lacks.
pub fn forward(q: View, k: View, v: View, opts: &Nystrom, out: &mut ViewMut) -> Result<()> {
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
    super::write_out(out, |o| {
        o.par_chunks_mut(nq * dv).enumerate().for_each(|(bh, o)| {
            let kv = bh / hq * dims.hkv + bh % hq / dims.group();
            let rows = (
                &qh[bh * nq * d..][..nq * d],
                &kh[kv * nk * d..][..nk * d],
                &vh[kv * nk * dv..][..nk * dv],
            );
            o.copy_from_slice(&head_forward(kern, opts, rows, (d, dv)).0);
        })
    });
    Ok(())
}

/// Gradients of Nyström attention with respect to q, k and v (through the pseudo-inverse's
/// iterations), given `d_o`.
///
/// # Errors
/// As [`forward`], and gradients of the wrong shape.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: View,
    k: View,
    v: View,
    d_o: View,
    opts: &Nystrom,
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
    super::backward_by_kv_head(
        dims,
        d,
        (dq, dk, dv),
        |_, kv, bh, (dqr, dkr, dvr)| {
            let rows = (
                &qh[bh * nq * d..][..nq * d],
                &kh[kv * nk * d..][..nk * d],
                &vh[kv * nk * dvd..][..nk * dvd],
            );
            head_backward(
                kern,
                opts,
                rows,
                &doh[bh * nq * dvd..][..nq * dvd],
                (d, dvd),
                (dqr, dkr, dvr),
            );
        },
        |_, _, db, dk| dk.copy_from_slice(db),
    )
}

/// One query head: `dq` written, `dk` and `dv` added.
fn head_backward(
    kern: &Kernels,
    opts: &Nystrom,
    (q, k, v): (&[f32], &[f32], &[f32]),
    d_o: &[f32],
    (d, dv): (usize, usize),
    (dq, dk, dvs): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (nq, nk, m) = (q.len() / d, k.len() / d, opts.landmarks);
    let (_, h) = head_forward(kern, opts, (q, k, v), (d, dv));
    // O = F·Y: dF = dO·Yᵀ, dY = Fᵀ·dO; Y = Z·W: dZ = dY·Wᵀ, dW = Zᵀ·dY; W = B·V: dB = dW·Vᵀ, dV = Bᵀ·dW
    let mut d_f = mmt(kern, d_o, &h.y, (nq, dv, m));
    let dy = mtm(kern, &h.f, d_o, (m, nq, dv));
    let mut dz = mmt(kern, &dy, &h.w, (m, dv, m));
    let dw = mtm(kern, &h.z, &dy, (m, m, dv));
    let mut d_b = mmt(kern, &dw, v, (m, dv, nk));
    let dvh = mtm(kern, &h.b, &dw, (nk, m, dv));
    dvs.iter_mut().zip(&dvh).for_each(|(x, y)| *x += y);
    // Back through the iterations: Z' = ¼ Z T3, T3 = 13I − P T2, T2 = 15I − P T1, T1 = 7I − P, P = A Z
    let mut da = vec![0.0f32; m * m];
    for s in h.steps.iter().rev() {
        let g: Vec<f32> = dz.iter().map(|x| 0.25 * x).collect(); //       ∂L/∂(Z·T3)
        let mut dz_prev = mmt(kern, &g, &s.t3, (m, m, m));
        let dt3 = mtm(kern, &s.z, &g, (m, m, m));
        // T3 = 13I − P·T2: dP −= dT3·T2ᵀ, dT2 = −Pᵀ·dT3
        let mut dp: Vec<f32> = mmt(kern, &dt3, &s.t2, (m, m, m))
            .iter()
            .map(|x| -x)
            .collect();
        let dt2: Vec<f32> = mtm(kern, &s.p, &dt3, (m, m, m))
            .iter()
            .map(|x| -x)
            .collect();
        // T2 = 15I − P·T1: dP −= dT2·T1ᵀ, dT1 = −Pᵀ·dT2
        mmt(kern, &dt2, &s.t1, (m, m, m))
            .iter()
            .zip(dp.iter_mut())
            .for_each(|(x, y)| *y -= x);
        // T1 = 7I − P with dT1 = −Pᵀ·dT2: dP −= dT1, that is dP += Pᵀ·dT2
        let pt_dt2 = mtm(kern, &s.p, &dt2, (m, m, m));
        dp.iter_mut().zip(&pt_dt2).for_each(|(y, x)| *y += x);
        // P = A·Z: dA += dP·Zᵀ, dZ += Aᵀ·dP
        mmt(kern, &dp, &s.z, (m, m, m))
            .iter()
            .zip(da.iter_mut())
            .for_each(|(x, y)| *y += x);
        mtm(kern, &h.a, &dp, (m, m, m))
            .iter()
            .zip(dz_prev.iter_mut())
            .for_each(|(x, y)| *y += x);
        dz = dz_prev;
    }
    // Z₀ = Aᵀ / c, c = Σ_i A_{i, jmax}: dA += dZ₀ᵀ / c; dc = −Σ dZ₀ ⊙ Aᵀ / c², to column jmax
    let mut dzt = vec![0.0f32; m * m];
    transpose(&dz, (m, m), &mut dzt);
    let mut dc = 0.0f32;
    for i in 0..m * m {
        da[i] += dzt[i] / h.cmax;
        dc -= dzt[i] * h.a[i] / (h.cmax * h.cmax);
    }
    for i in 0..m {
        da[i * m + h.jmax] += dc;
    }
    // Through the softmaxes, then S = X·Yᵀ products back to the scaled q, k and landmarks.
    softmax_rows_back(&h.f, &mut d_f, m);
    softmax_rows_back(&h.a, &mut da, m);
    softmax_rows_back(&h.b, &mut d_b, nk);
    let mut dqs = mm(kern, &d_f, &h.kl, (nq, m, d)); //                   (nq, d)
    let mut dkl = mtm(kern, &d_f, &h.qs, (m, nq, d)); //                  (m, d)
    let mut dql = mm(kern, &da, &h.kl, (m, m, d));
    mtm(kern, &da, &h.ql, (m, m, d))
        .iter()
        .zip(dkl.iter_mut())
        .for_each(|(x, y)| *y += x);
    mm(kern, &d_b, &h.ks, (m, nk, d))
        .iter()
        .zip(dql.iter_mut())
        .for_each(|(x, y)| *y += x);
    let mut dks = mtm(kern, &d_b, &h.ql, (nk, m, d)); //                  (nk, d)
                                                      // Landmarks are segment means.
    let (sq, sk) = (nq / m, nk / m);
    for (r, row) in dqs.chunks_exact_mut(d).enumerate() {
        super::axpy(row, 1.0 / sq as f32, &dql[r / sq * d..(r / sq + 1) * d]);
    }
    for (r, row) in dks.chunks_exact_mut(d).enumerate() {
        super::axpy(row, 1.0 / sk as f32, &dkl[r / sk * d..(r / sk + 1) * d]);
    }
    let c = (d as f32).powf(-0.25);
    dq.iter_mut().zip(&dqs).for_each(|(x, y)| *x = y * c);
    dk.iter_mut().zip(&dks).for_each(|(x, y)| *x += y * c);
}

/// The oracle: the same function by naive matrix arithmetic in `T`. Its gradients are central
/// differences of itself in f64 in the tests, so it gives the output only. Generic over the
/// float type: `f64` is the oracle, `f32` the naive baseline.
pub mod oracle {
    use super::*;

    type M<T> = Vec<Vec<T>>;

    fn mul<T: Real>(a: &M<T>, b: &M<T>) -> M<T> {
        (0..a.len())
            .map(|i| {
                (0..b[0].len())
                    .map(|j| (0..b.len()).fold(T::ZERO, |s, t| s + a[i][t] * b[t][j]))
                    .collect()
            })
            .collect()
    }

    fn softmax<T: Real>(x: M<T>) -> M<T> {
        x.into_iter()
            .map(|r| {
                let m = r.iter().fold(T::NEG_INF, |a, &v| if v > a { v } else { a });
                let e: Vec<T> = r.iter().map(|&v| (v - m).exp()).collect();
                let z = e.iter().fold(T::ZERO, |a, &v| a + v);
                e.into_iter().map(|v| v * z.recip()).collect()
            })
            .collect()
    }

    /// The pseudo-inverse iterations of `a`.
    pub fn pinv<T: Real>(a: &[Vec<T>], iterations: usize) -> Vec<Vec<T>> {
        let m = a.len();
        let cmax = (0..m)
            .map(|j| (0..m).fold(T::ZERO, |s, i| s + a[i][j]))
            .fold(T::NEG_INF, |x, c| if c > x { c } else { x });
        let mut z: M<T> = (0..m)
            .map(|i| (0..m).map(|j| a[j][i] * cmax.recip()).collect())
            .collect();
        let a = a.to_vec();
        let eye_minus = |c: f64, x: &M<T>| -> M<T> {
            (0..m)
                .map(|i| {
                    (0..m)
                        .map(|j| {
                            if i == j {
                                T::from_f64(c) - x[i][j]
                            } else {
                                -x[i][j]
                            }
                        })
                        .collect()
                })
                .collect()
        };
        for _ in 0..iterations {
            let p = mul(&a, &z);
            let t1 = eye_minus(7.0, &p);
            let t2 = eye_minus(15.0, &mul(&p, &t1));
            let t3 = eye_minus(13.0, &mul(&p, &t2));
            z = mul(&z, &t3)
                .into_iter()
                .map(|r| r.into_iter().map(|x| T::from_f64(0.25) * x).collect())
                .collect();
        }
        z
    }

    /// The output `[B, Hq, Nq, Dv]`, row-major.
    ///
    /// # Errors
    /// As [`forward`].
    pub fn nystrom<T: Real>(q: View, k: View, v: View, opts: &Nystrom) -> Result<Vec<T>> {
        let dims = opts.check(&q, &k, &v)?;
        let Dims {
            b,
            hq,
            nq,
            nk,
            d,
            dv,
            ..
        } = dims;
        let m = opts.landmarks;
        let c = T::from_f64((d as f64).powf(-0.25));
        let f = T::from_f32;
        let mut o = Vec::with_capacity(b * hq * nq * dv);
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / dims.group();
                let qs: M<T> = (0..nq)
                    .map(|i| (0..d).map(|t| f(q.at(bi, h, i, t)) * c).collect())
                    .collect();
                let ks: M<T> = (0..nk)
                    .map(|j| (0..d).map(|t| f(k.at(bi, kh, j, t)) * c).collect())
                    .collect();
                let means = |x: &M<T>, n: usize| -> M<T> {
                    let seg = n / m;
                    (0..m)
                        .map(|s| {
                            (0..d)
                                .map(|t| {
                                    (0..seg).fold(T::ZERO, |a, r| a + x[s * seg + r][t])
                                        * T::from_f64(1.0 / seg as f64)
                                })
                                .collect()
                        })
                        .collect()
                };
                let (ql, kl) = (means(&qs, nq), means(&ks, nk));
                let tr = |x: &M<T>| -> M<T> {
                    (0..x[0].len())
                        .map(|j| x.iter().map(|r| r[j]).collect())
                        .collect()
                };
                let fm = softmax(mul(&qs, &tr(&kl)));
                let am = softmax(mul(&ql, &tr(&kl)));
                let bm = softmax(mul(&ql, &tr(&ks)));
                let z = pinv(&am, opts.iterations);
                let vm: M<T> = (0..nk)
                    .map(|j| (0..dv).map(|t| f(v.at(bi, kh, j, t))).collect())
                    .collect();
                let out = mul(&fm, &mul(&z, &mul(&bm, &vm)));
                o.extend(out.into_iter().flatten());
            }
        }
        Ok(o)
    }
}
