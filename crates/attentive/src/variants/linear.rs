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

use super::{axpy, dot, heads, Dims};
use crate::error::{AttnError, Result};
use crate::reference::Real;
use crate::view::{View, ViewMut};
use rayon::prelude::*;

/// Queries per chunk of the causal form: a chunk's φ(Q), φ(K) and V rows (3 × 64 × 64 floats,
/// 48 KiB at D = Dv = 64) and its 64 × 64 pair weights stay within L2 beside the `D × Dv` state.
pub const CHUNK: usize = 64;

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
}

impl Default for Linear<'_> {
    fn default() -> Self {
        Self {
            causal: false,
            eps: EPS,
            key_mask: None,
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

/// $\phi'(x)$.
#[inline]
fn dphi(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else {
        x.exp()
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
            crate::problem::expect_len("key_mask", m.len(), dims.b * dims.nk)?;
        }
        Ok(dims)
    }
}

/// One head's φ(K) (`nk × d`), zero where the mask hides a key.
fn phi_keys(k: &[f32], d: usize, mask: Option<&[bool]>) -> Vec<f32> {
    let mut b: Vec<f32> = k.iter().map(|&x| phi(x)).collect();
    if let Some(m) = mask {
        for (row, &keep) in b.chunks_exact_mut(d).zip(m) {
            if !keep {
                row.fill(0.0);
            }
        }
    }
    b
}

/// Row `i` of the attention's numerator and denominator (before ε) from the state `(s, z)` of
/// the keys before the chunk and the chunk's own keys `0..=upto` (`bc`, `vc`).
#[allow(clippy::too_many_arguments)]
#[inline]
fn row_from(
    a: &[f32],
    (s, z): (&[f32], &[f32]),
    (bc, vc): (&[f32], &[f32]),
    upto: usize,
    dims: (usize, usize),
    num: &mut [f32],
    pair: &mut [f32],
) -> f32 {
    let (d, dv) = dims;
    num.fill(0.0);
    for (c, &ac) in a.iter().enumerate() {
        axpy(num, ac, &s[c * dv..(c + 1) * dv]);
    }
    let mut den = dot(a, z);
    for j in 0..upto {
        let w = dot(a, &bc[j * d..(j + 1) * d]);
        pair[j] = w;
        den += w;
        axpy(num, w, &vc[j * dv..(j + 1) * dv]);
    }
    den
}

/// `s += Σ_j b_j v_jᵀ`, `z += Σ_j b_j` over the rows of `bc`, `vc`.
fn add_to_state(s: &mut [f32], z: &mut [f32], bc: &[f32], vc: &[f32], (d, dv): (usize, usize)) {
    for (b, v) in bc.chunks_exact(d).zip(vc.chunks_exact(dv)) {
        for (c, &bcv) in b.iter().enumerate() {
            axpy(&mut s[c * dv..(c + 1) * dv], bcv, v);
        }
        axpy(z, 1.0, b);
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
/// `causal` with `Nq ≠ Nk`, a negative or non-finite `eps`, a key mask of the wrong length.
pub fn forward(q: View, k: View, v: View, opts: &Linear, out: &mut ViewMut) -> Result<()> {
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
    crate::problem::expect_shape("out", out.shape(), [b, hq, nq, dv])?;
    let (qh, kh, vh) = (heads(&q), heads(&k), heads(&v));
    let mut o = vec![0.0f32; b * hq * nq * dv]; //                           [B, Hq, Nq, Dv]
    o.par_chunks_mut(nq * dv).enumerate().for_each(|(bh, o)| {
        let (bi, h) = (bh / hq, bh % hq);
        let kv = bi * dims.hkv + h / dims.group();
        let mask = opts.key_mask.map(|m| &m[bi * nk..(bi + 1) * nk]);
        let bk = phi_keys(&kh[kv * nk * d..][..nk * d], d, mask);
        let vv = &vh[kv * nk * dv..][..nk * dv];
        let a: Vec<f32> = qh[bh * nq * d..][..nq * d]
            .iter()
            .map(|&x| phi(x))
            .collect();
        head_forward(&a, &bk, vv, opts, (d, dv), o, None);
    });
    let mut rows = o.chunks_exact(dv);
    out.for_each_row(|_, _, _, row| row.copy_from_slice(rows.next().expect("one row each")));
    Ok(())
}

/// One head: `a = φ(Q)` (`n × d`), `bk = φ(K)`, `v`; writes `o` and, when asked, each row's
/// denominator.
fn head_forward(
    a: &[f32],
    bk: &[f32],
    v: &[f32],
    opts: &Linear,
    (d, dv): (usize, usize),
    o: &mut [f32],
    mut dens: Option<&mut [f32]>,
) {
    let (mut s, mut z) = (vec![0.0f32; d * dv], vec![0.0f32; d]);
    let mut pair = vec![0.0f32; CHUNK];
    if !opts.causal {
        add_to_state(&mut s, &mut z, bk, v, (d, dv));
        for (i, (ai, oi)) in a.chunks_exact(d).zip(o.chunks_exact_mut(dv)).enumerate() {
            let den = row_from(ai, (&s, &z), (&[], &[]), 0, (d, dv), oi, &mut pair) + opts.eps;
            oi.iter_mut().for_each(|x| *x /= den);
            if let Some(ds) = dens.as_deref_mut() {
                ds[i] = den;
            }
        }
        return;
    }
    let n = a.len() / d;
    for c0 in (0..n).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(n);
        let (bc, vc) = (&bk[c0 * d..c1 * d], &v[c0 * dv..c1 * dv]);
        for i in c0..c1 {
            let oi = &mut o[i * dv..(i + 1) * dv];
            let ai = &a[i * d..(i + 1) * d];
            let den = row_from(ai, (&s, &z), (bc, vc), i - c0 + 1, (d, dv), oi, &mut pair);
            let den = den + opts.eps;
            oi.iter_mut().for_each(|x| *x /= den);
            if let Some(ds) = dens.as_deref_mut() {
                ds[i] = den;
            }
        }
        add_to_state(&mut s, &mut z, bc, vc, (d, dv));
    }
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
    let Dims {
        b,
        hq,
        hkv,
        nq,
        nk,
        d,
        dv: dvd,
    } = dims;
    crate::problem::expect_shape("d_o", d_o.shape(), [b, hq, nq, dvd])?;
    crate::problem::expect_shape("dq", dq.shape(), [b, hq, nq, d])?;
    crate::problem::expect_shape("dk", dk.shape(), [b, hkv, nk, d])?;
    crate::problem::expect_shape("dv", dv.shape(), [b, hkv, nk, dvd])?;
    let (qh, kh, vh, doh) = (heads(&q), heads(&k), heads(&v), heads(&d_o));
    let group = dims.group();
    // Per (b, kv head): its query heads' dQ rows, and its dK, dV rows.
    let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * hkv)
        .into_par_iter()
        .map(|bk_i| {
            let bi = bk_i / hkv;
            let mask = opts.key_mask.map(|m| &m[bi * nk..(bi + 1) * nk]);
            let kx = &kh[bk_i * nk * d..][..nk * d];
            let bkm = phi_keys(kx, d, mask);
            let vv = &vh[bk_i * nk * dvd..][..nk * dvd];
            let (mut dqs, mut dkb, mut dvs) = (
                vec![0.0f32; group * nq * d],
                vec![0.0f32; nk * d],
                vec![0.0f32; nk * dvd],
            );
            for g in 0..group {
                let bh = bi * hq + (bk_i % hkv) * group + g;
                let qx = &qh[bh * nq * d..][..nq * d];
                let a: Vec<f32> = qx.iter().map(|&x| phi(x)).collect();
                let dout = &doh[bh * nq * dvd..][..nq * dvd];
                let dqg = &mut dqs[g * nq * d..][..nq * d];
                head_backward(&a, &bkm, vv, dout, opts, (d, dvd), dqg, &mut dkb, &mut dvs);
                for (x, &qv) in dqg.iter_mut().zip(qx) {
                    *x *= dphi(qv);
                }
            }
            // dk = db ⊙ φ'(k); a hidden key's φ is the constant 0.
            for (j, (row, krow)) in dkb.chunks_exact_mut(d).zip(kx.chunks_exact(d)).enumerate() {
                if mask.is_some_and(|m| !m[j]) {
                    row.fill(0.0);
                } else {
                    row.iter_mut().zip(krow).for_each(|(x, &kv)| *x *= dphi(kv));
                }
            }
            (dqs, dkb, dvs)
        })
        .collect();
    dq.for_each_row(|bi, h, i, row| {
        let (kvh, g) = (h / group, h % group);
        row.copy_from_slice(&per[bi * hkv + kvh].0[(g * nq + i) * d..][..d]);
    });
    dk.for_each_row(|bi, h, j, row| row.copy_from_slice(&per[bi * hkv + h].1[j * d..][..d]));
    dv.for_each_row(|bi, h, j, row| row.copy_from_slice(&per[bi * hkv + h].2[j * dvd..][..dvd]));
    Ok(())
}

/// One query head's share of the gradients: `da` (into `dq`, before φ′), and `db`, `dv` added to
/// `dkb`, `dvs`.
#[allow(clippy::too_many_arguments)]
fn head_backward(
    a: &[f32],
    bk: &[f32],
    v: &[f32],
    d_o: &[f32],
    opts: &Linear,
    (d, dv): (usize, usize),
    da: &mut [f32],
    dkb: &mut [f32],
    dvs: &mut [f32],
) {
    let (nq, nk) = (a.len() / d, bk.len() / d);
    // The forward again, for o and the denominators.
    let (mut o, mut den) = (vec![0.0f32; nq * dv], vec![0.0f32; nq]);
    head_forward(a, bk, v, opts, (d, dv), &mut o, Some(&mut den));
    // dn_i = do_i / δ_i; dδ_i = −(do_i·o_i) / δ_i                       (nq × dv), (nq)
    let mut dn = vec![0.0f32; nq * dv];
    let mut dden = vec![0.0f32; nq];
    for i in 0..nq {
        let (doi, oi) = (&d_o[i * dv..(i + 1) * dv], &o[i * dv..(i + 1) * dv]);
        dden[i] = -dot(doi, oi) / den[i];
        for (x, &g) in dn[i * dv..(i + 1) * dv].iter_mut().zip(doi) {
            *x = g / den[i];
        }
    }
    let (mut s, mut z) = (vec![0.0f32; d * dv], vec![0.0f32; d]);
    if !opts.causal {
        add_to_state(&mut s, &mut z, bk, v, (d, dv));
        // da_i = S·dn_i + z·dδ_i
        for i in 0..nq {
            let dai = &mut da[i * d..(i + 1) * d];
            for (c, x) in dai.iter_mut().enumerate() {
                *x = dot(&s[c * dv..(c + 1) * dv], &dn[i * dv..(i + 1) * dv]) + z[c] * dden[i];
            }
        }
        // dS = Σ_i a_i dn_iᵀ, dz = Σ_i a_i dδ_i; db_j = dS·v_j + dz, dv_j = dSᵀ·b_j
        let (mut ds, mut dz) = (vec![0.0f32; d * dv], vec![0.0f32; d]);
        for i in 0..nq {
            let ai = &a[i * d..(i + 1) * d];
            for (c, &ac) in ai.iter().enumerate() {
                axpy(&mut ds[c * dv..(c + 1) * dv], ac, &dn[i * dv..(i + 1) * dv]);
            }
            axpy(&mut dz, dden[i], ai);
        }
        for j in 0..nk {
            key_grads(j, (&ds, &dz), bk, v, (d, dv), dkb, dvs);
        }
        return;
    }
    // Queries front to back: da_i = S·dn_i + z·dδ_i + Σ_{j ≤ i in the chunk} (v_j·dn_i + dδ_i)·b_j
    for c0 in (0..nq).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(nq);
        for i in c0..c1 {
            let dni = &dn[i * dv..(i + 1) * dv];
            let dai = &mut da[i * d..(i + 1) * d];
            for (c, x) in dai.iter_mut().enumerate() {
                *x = dot(&s[c * dv..(c + 1) * dv], dni) + z[c] * dden[i];
            }
            for j in c0..=i {
                let g = dot(&v[j * dv..(j + 1) * dv], dni) + dden[i];
                axpy(dai, g, &bk[j * d..(j + 1) * d]);
            }
        }
        add_to_state(
            &mut s,
            &mut z,
            &bk[c0 * d..c1 * d],
            &v[c0 * dv..c1 * dv],
            (d, dv),
        );
    }
    // Keys back to front: the gradient state (dS, dz) of the queries after the chunk, then the
    // chunk's own pairs i ≥ j.
    let (mut ds, mut dz) = (vec![0.0f32; d * dv], vec![0.0f32; d]);
    let last = (nq - 1) / CHUNK * CHUNK;
    for c0 in (0..=last).rev().step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(nq);
        for j in c0..c1 {
            key_grads(j, (&ds, &dz), bk, v, (d, dv), dkb, dvs);
            let (bj, vj) = (&bk[j * d..(j + 1) * d], &v[j * dv..(j + 1) * dv]);
            for i in j..c1 {
                let (ai, dni) = (&a[i * d..(i + 1) * d], &dn[i * dv..(i + 1) * dv]);
                let g = dot(vj, dni) + dden[i];
                axpy(&mut dkb[j * d..(j + 1) * d], g, ai);
                axpy(&mut dvs[j * dv..(j + 1) * dv], dot(ai, bj), dni);
            }
        }
        for i in c0..c1 {
            let ai = &a[i * d..(i + 1) * d];
            for (c, &ac) in ai.iter().enumerate() {
                axpy(&mut ds[c * dv..(c + 1) * dv], ac, &dn[i * dv..(i + 1) * dv]);
            }
            axpy(&mut dz, dden[i], ai);
        }
    }
}

/// Key `j`'s gradient from a gradient state: `db_j += dS·v_j + dz`, `dv_j += dSᵀ·b_j`.
fn key_grads(
    j: usize,
    (ds, dz): (&[f32], &[f32]),
    bk: &[f32],
    v: &[f32],
    (d, dv): (usize, usize),
    dkb: &mut [f32],
    dvs: &mut [f32],
) {
    let (bj, vj) = (&bk[j * d..(j + 1) * d], &v[j * dv..(j + 1) * dv]);
    let dbj = &mut dkb[j * d..(j + 1) * d];
    for (c, x) in dbj.iter_mut().enumerate() {
        *x += dot(&ds[c * dv..(c + 1) * dv], vj) + dz[c];
    }
    let dvj = &mut dvs[j * dv..(j + 1) * dv];
    for (c, &bc) in bj.iter().enumerate() {
        axpy(dvj, bc, &ds[c * dv..(c + 1) * dv]);
    }
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
        crate::problem::expect_len("k", k.len(), self.d)?;
        crate::problem::expect_len("v", v.len(), self.dv)?;
        let b: Vec<f32> = k.iter().map(|&x| phi(x)).collect();
        add_to_state(&mut self.s, &mut self.z, &b, v, (self.d, self.dv));
        self.len += 1;
        Ok(())
    }

    /// The attention of query `q` over every key pushed, into `out` (`dv`).
    ///
    /// # Errors
    /// [`AttnError::LengthMismatch`] for a query or output of the wrong length.
    pub fn read(&self, q: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
        crate::problem::expect_len("q", q.len(), self.d)?;
        crate::problem::expect_len("out", out.len(), self.dv)?;
        let a: Vec<f32> = q.iter().map(|&x| phi(x)).collect();
        let mut pair = [0.0f32; 1];
        let den = row_from(
            &a,
            (&self.s, &self.z),
            (&[], &[]),
            0,
            (self.d, self.dv),
            out,
            &mut pair,
        );
        let den = den + eps;
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
        crate::problem::expect_shape("d_o", d_o.shape(), [b, hq, nq, dv])?;
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
