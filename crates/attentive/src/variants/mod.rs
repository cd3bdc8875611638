//! Attention that is not softmax over a mask: each variant is different math, so each has a
//! module of its own, with its forward and backward side by side and its naive oracle beside
//! them (re-exported in [`reference::variants`](crate::reference::variants)).
//!
//! * [`linear`] — linear attention (Katharopoulos et al., 2020), $\phi = \mathrm{elu} + 1$:
//!   non-causal, causal chunk by chunk, and the recurrent step for decoding.
//!
//! Tensors enter as [`View`]s, as for the exact kernel: `q [B, Hq, Nq, D]`,
//! `k [B, Hkv, Nk, D]`, `v [B, Hkv, Nk, Dv]`, any strides, `Hq` a multiple of `Hkv`.

pub mod linear;

use crate::error::{AttnError, Result};
use crate::view::View;

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
        let ([b, hq, nq, d], [_, hkv, nk, _], [.., dv]) = (q.shape(), k.shape(), v.shape());
        crate::problem::expect_shape("k", k.shape(), [b, hkv, nk, d])?;
        crate::problem::expect_shape("v", v.shape(), [b, hkv, nk, dv])?;
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

/// Each `[b, h]` head of `x` as `rows × width` row-major blocks, one after another.
pub(crate) fn heads(x: &View) -> Vec<f32> {
    x.to_vec()
}

/// `Σ a_c·b_c` with eight independent sums, so it vectorises.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = ra.iter().zip(rb).fold(0.0f32, |s, (x, y)| x.mul_add(*y, s));
    for l in acc {
        s += l;
    }
    s
}

/// `y += alpha·x`.
#[inline]
pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = alpha.mul_add(*x, *y);
    }
}
