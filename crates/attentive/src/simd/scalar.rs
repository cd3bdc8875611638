//! The one-lane instruction set: plain Rust arithmetic, always built, the reference the
//! vector sets are tested against.

use super::*;

/// The one-lane path: plain Rust arithmetic, `f32::exp` from the standard library.
#[derive(Clone, Copy)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 1;
    const NV: usize = 4;
    type V = f32;
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn load_part(_: *const f32, _: usize) -> f32 {
        0.0
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
    }
    #[inline(always)]
    unsafe fn store_part(_: *mut f32, _: f32, _: usize) {}
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> f32 {
        (*p).to_f32()
    }
    #[inline(always)]
    unsafe fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    unsafe fn max(a: f32, b: f32) -> f32 {
        a.max(b)
    }
    #[inline(always)]
    unsafe fn reduce_add(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn reduce_max(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn exp(v: f32) -> f32 {
        if v < expc::LO {
            0.0
        } else {
            v.exp()
        }
    }
    #[inline(always)]
    unsafe fn transpose_block(src: *const f32, _: usize, dst: *mut f32, _: usize) {
        *dst = *src
    }
    #[inline(always)]
    unsafe fn dot(a: *const f32, b: *const f32, k: usize) -> f32 {
        let mut s = 0.0f64;
        for t in 0..k {
            s += *a.add(t) as f64 * *b.add(t) as f64;
        }
        s as f32
    }
}

mod scalar_table {
    use super::*;
    kernel_table!(SCALAR, Scalar, prefetch 0,);
}
pub(crate) use scalar_table::SCALAR;
