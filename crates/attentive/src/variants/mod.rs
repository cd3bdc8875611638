//! Attention that is not softmax over a mask: each variant is different math, so each has a
//! module of its own, with its forward and backward side by side and its naive oracle beside
//! them (re-exported in [`reference::variants`](crate::reference::variants)).
//!
//! * [`linear`] — linear attention (Katharopoulos et al., 2020), $\phi = \mathrm{elu} + 1$:
//!   non-causal, causal chunk by chunk, and the recurrent step for decoding.
//! * [`gated`] — decayed and gated linear attention (RetNet, GLA): a decaying state, no
//!   denominator, through the same chunks.
//! * [`additive`] — Bahdanau's additive and Luong's dot, general and concat scores, for
//!   encoder–decoder attention.
//! * [`adaptive_span`] — adaptive attention span: a learned soft ramp per head, a score rule
//!   on the fused causal kernel with a window skipping the tiles beyond the span.
//! * [`han`] — hierarchical attention pooling (words, then sentences) with learned context
//!   vectors.
//! * [`linformer`] — Linformer: keys and values projected along the sequence, then exact
//!   softmax over the projected rows on the fused kernel.
//! * [`nystrom`] — Nyströmformer: landmarks and the iterative pseudo-inverse.
//! * [`lsh`] — Reformer's LSH attention: shared queries and keys hashed by random rotations,
//!   sorted by bucket, and attended chunk by chunk.
//! * [`performer`] — Performer's FAVOR+: softmax estimated with positive orthogonal random
//!   features, on the same feature-map machinery as linear attention.
//!
//! Tensors enter as [`View`]s, as for the exact kernel: `q [B, Hq, Nq, D]`,
//! `k [B, Hkv, Nk, D]`, `v [B, Hkv, Nk, Dv]`, any strides, `Hq` a multiple of `Hkv`.

pub mod adaptive_span;
pub mod additive;
pub mod gated;
pub mod han;
pub(crate) mod kernelized;
pub mod linear;
pub mod linformer;
pub mod lsh;
pub mod nystrom;
pub mod performer;

use crate::error::{AttnError, Result};
use crate::simd::{Gemm, Kernels};
use crate::view::{View, ViewMut};
use rayon::prelude::*;
use std::borrow::Cow;

/// The sizes of a call, checked once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
    pub dv: usize,
}

impl Dims {
    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.hq / self.hkv
    }

    /// Checks `q`, `k`, `v` against each other: no empty dimension, one batch, one key count,
    /// one feature width for queries and keys, query heads a multiple of key/value heads.
    pub fn of(q: &View, k: &View, v: &View) -> Result<Dims> {
        let dims = Self::of_cross(q, k, v)?;
        crate::error::expect_shape("k", k.shape(), [dims.b, dims.hkv, dims.nk, dims.d])?;
        Ok(dims)
    }

    /// [`Dims::of`] where keys may be another width than queries (`d` is the queries').
    pub fn of_cross(q: &View, k: &View, v: &View) -> Result<Dims> {
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            let s = t.shape();
            if let Some(dim) = s.iter().position(|&x| x == 0) {
                return Err(AttnError::EmptyDimension {
                    tensor: name,
                    dim,
                    shape: s.to_vec(),
                });
            }
        }
        let ([b, hq, nq, d], [_, hkv, nk, dk], [.., dv]) = (q.shape(), k.shape(), v.shape());
        crate::error::expect_shape("k", k.shape(), [b, hkv, nk, dk])?;
        crate::error::expect_shape("v", v.shape(), [b, hkv, nk, dv])?;
        if hq % hkv != 0 {
            return Err(AttnError::HeadsNotDivisible {
                q_heads: hq,
                kv_heads: hkv,
            });
        }
        Ok(Dims {
            b,
            hq,
            hkv,
            nq,
            nk,
            d,
            dv,
        })
    }
}

/// Each `[b, h]` head of `x` as `rows × width` row-major blocks, one after another: the
/// view's own elements when it is stored so, else a copy.
/// Refuses, as [`View::try_to_vec`] does, a copy that would not fit in memory.
pub(crate) fn heads<'a>(x: &View<'a>) -> Result<Cow<'a, [f32]>> {
    match crate::view::elements(x.shape()) {
        Some(len) if crate::view::is_row_major(x.shape(), x.strides()) => {
            Ok(Cow::Borrowed(&x.data()[..len]))
        }
        _ => x.try_to_vec().map(Cow::Owned),
    }
}

/// Writes `f`'s row-major result into `out`: in place when `out` is stored row-major, else
/// through a buffer.
pub(crate) fn write_out(out: &mut ViewMut, f: impl FnOnce(&mut [f32])) {
    if let Some(data) = out.row_major_mut() {
        return f(data);
    }
    let [b, h, n, w] = out.shape();
    let mut buf = vec![0.0f32; b * h * n * w];
    f(&mut buf);
    let mut rows = buf.chunks_exact(w);
    out.for_each_row(|_, _, _, row| row.copy_from_slice(rows.next().expect("one row each")));
}

/// `Σ a_c·b_c` with eight independent sums, so it vectorises. (Multiply then add: `mul_add`
/// is a library call where the build's target has no FMA.)
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ra.iter().zip(rb).fold(0.0f32, |s, (x, y)| s + x * y);
    for l in acc {
        s += l;
    }
    s
}

/// `y += alpha·x`.
#[inline]
pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `C (m × n) ← [C +] A·B` on the engine's matrix micro-kernel: A is `m × k`, element (r, t) at
/// `r·a_rs + t·a_ks` (so Aᵀ of a row-major matrix is a stride swap); B row-major `k × n` with row
/// stride `ldb`; C row-major with row stride `ldc`.
///
/// # Panics
/// When a slice is too short for its matrix (a bug of the caller, never of the input).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    kern: &Kernels,
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    (a_rs, a_ks): (usize, usize),
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_ks, "A is too short");
        assert!(ldb >= n && b.len() >= (k - 1) * ldb + n, "B is too short");
    }
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "C is too short");
    // SAFETY: the asserts keep every element the product reads (A through its two strides, the
    // k rows of B) and writes (the m rows of C) inside `a`, `b` and `c`; the micro-kernel masks
    // its loads and stores at the row ends.
    unsafe {
        (kern.gemm)(&Gemm {
            m,
            n,
            k,
            a: a.as_ptr(),
            a_rs,
            a_ks,
            b: b.as_ptr(),
            ldb,
            b_vs: kern.lanes,
            c: c.as_mut_ptr(),
            ldc,
            accumulate,
            bias: std::ptr::null(),
            join: std::ptr::null(),
        })
    }
}

/// `dst (cols × rows) ← srcᵀ` for row-major `src` (`rows × cols`).
pub(crate) fn transpose(src: &[f32], (rows, cols): (usize, usize), dst: &mut [f32]) {
    for (r, row) in src.chunks_exact(cols).take(rows).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            dst[c * rows + r] = x;
        }
    }
}

/// `z += Σ_r x_r` over the rows of `x` (`width` wide).
pub(crate) fn add_rows(z: &mut [f32], x: &[f32], width: usize) {
    for row in x.chunks_exact(width) {
        axpy(z, 1.0, row);
    }
}

/// The backward's outer loop of a feature-map variant: per (batch row, key/value head), in
/// parallel, `per_head(b, kv, bh, (dq, db, dv))` for each query head `bh` of the group (its dQ
/// rows written; the key features' gradient `db`, `nk × f`, and dV rows added), then
/// `keys_back(b, kv, db, dk)` once. `kv` and `bh` index the flat `B·Hkv` and `B·Hq` heads.
/// Writes dQ, dK and dV.
#[allow(clippy::type_complexity)]
pub(crate) fn backward_by_kv_head(
    dims: Dims,
    f: usize,
    (dq, dk, dv): (&mut ViewMut, &mut ViewMut, &mut ViewMut),
    per_head: impl Fn(usize, usize, usize, (&mut [f32], &mut [f32], &mut [f32])) + Sync,
    keys_back: impl Fn(usize, usize, &[f32], &mut [f32]) + Sync,
) -> Result<()> {
    let Dims {
        b,
        hq,
        hkv,
        nq,
        nk,
        d,
        dv: dvd,
    } = dims;
    crate::error::expect_shape("dq", dq.shape(), [b, hq, nq, d])?;
    crate::error::expect_shape("dk", dk.shape(), [b, hkv, nk, d])?;
    crate::error::expect_shape("dv", dv.shape(), [b, hkv, nk, dvd])?;
    let group = dims.group();
    let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * hkv)
        .into_par_iter()
        .map(|kv| {
            let bi = kv / hkv;
            let mut dqs = vec![0.0f32; group * nq * d];
            let (mut db, mut dvs) = (vec![0.0f32; nk * f], vec![0.0f32; nk * dvd]);
            for (g, dqg) in dqs.chunks_exact_mut(nq * d).enumerate() {
                let bh = bi * hq + kv % hkv * group + g;
                per_head(bi, kv, bh, (dqg, &mut db, &mut dvs));
            }
            let mut dks = vec![0.0f32; nk * d];
            keys_back(bi, kv, &db, &mut dks);
            (dqs, dks, dvs)
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
