//! SIMD micro-kernels, chosen at run time: AVX-512, AVX2+FMA, and a scalar path that is always
//! built and tested.
//!
//! Each instruction set implements the small [`Simd`] trait; the kernels (`gemm`, the
//! row reductions and the exponential) are written once, generically, marked `#[inline(always)]`,
//! and instantiated inside a `#[target_feature]` wrapper per instruction set, so the intrinsics
//! are inlined into code compiled for that set. A [`Kernels`] table of those wrappers is picked once
//! per call from what the CPU reports.
//!
//! Here: [`Isa`], the trait, the table and the macro that fills it. The kernels, each with its
//! operation's description: `gemm` (the tiled products, transposes and row copies), `dots`
//! (f64-summed dot products of a few queries, the decode), `softmax` (the online softmax and
//! the softmax gradient), `class` (a strided pattern's extra keys). The instruction sets:
//! `scalar` (always built) and `x86` (AVX-512, AVX2+FMA).

use crate::error::{AttnError, Result};
use half::f16;

/// An instruction set the kernels can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 with Intel's AMX tiles: the fused forward's two products (QKᵀ and P·V) run on
    /// the tiles from three bf16 parts of each f32, to f32 accuracy (see the `amx` module);
    /// everything else as [`Isa::Avx512`].
    Amx,
    /// 512-bit vectors, 32 registers.
    Avx512,
    /// 256-bit vectors with fused multiply-add, 16 registers.
    Avx2,
    /// Plain Rust, one lane: the portable path every other path is tested against.
    Scalar,
}

impl Isa {
    /// Whether this CPU can run the instruction set.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Isa::Avx512.available() && crate::amx::available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest instruction set this CPU runs.
    pub fn best() -> Isa {
        [Isa::Amx, Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Scalar)
    }

    /// Every instruction set this CPU runs, fastest first.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Amx, Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .filter(|isa| isa.available())
            .collect()
    }

    pub(crate) fn kernels(self) -> Result<&'static Kernels> {
        if !self.available() {
            return Err(AttnError::IsaUnavailable { isa: self });
        }
        Ok(match self {
            Isa::Scalar => &SCALAR,
            // AMX cores are Intel's.
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => &x86::AVX512_XEON,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if x86::intel() => &x86::AVX512_XEON,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => &x86::AVX512,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => &x86::AVX2,
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("checked by available()"),
        })
    }
}

/// One vector register's worth of f32 lanes and the operations the kernels need.
pub(crate) trait Simd: Copy {
    const LANES: usize;
    /// Vectors of output columns per register block; rows per block are [`MR`].
    const NV: usize;
    type V: Copy;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// Loads the first `n < LANES` lanes, zero-filling the rest, without touching memory past them.
    unsafe fn load_part(p: *const f32, n: usize) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn store_part(p: *mut f32, v: Self::V, n: usize);
    /// `LANES` f16 values widened to f32 (exactly).
    unsafe fn load_f16(p: *const f16) -> Self::V;
    /// `a · b + c`, fused.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn reduce_add(v: Self::V) -> f32;
    unsafe fn reduce_max(v: Self::V) -> f32;
    /// $e^x$ lane-wise for the $x \le 0$ of a softmax (a logit less its row's maximum or
    /// log-sum-exp); exactly 0 for $x < -87.3$ (and for $-\infty$). Up to $x = 2^{22}$ an
    /// overflowing result is $+\infty$ (or, on some paths, the largest float).
    unsafe fn exp(v: Self::V) -> Self::V;
    /// `dst[c·ldd + r] = src[r·lds + c]` for a block of `LANES × LANES`.
    unsafe fn transpose_block(src: *const f32, lds: usize, dst: *mut f32, ldd: usize);
    /// `Σ_t a[t]·b[t]` over `k` elements, the products (exact in f64) summed in f64 lane-wise
    /// and rounded to f32 once.
    unsafe fn dot(a: *const f32, b: *const f32, k: usize) -> f32;
    /// [`Simd::dot`] of `a` with four rows at once, each the same bits as its own `dot`: four
    /// independent chains hide the FMA latency that bounds one.
    #[inline(always)]
    unsafe fn dot4(a: *const f32, b: [*const f32; 4], k: usize) -> [f32; 4] {
        b.map(|b| Self::dot(a, b, k))
    }
    /// [`Simd::dot4`] of `a` with four f16 rows, each widened in registers (the bits of `dot4`
    /// on the widened rows), where the instruction set does it directly; `None` otherwise.
    #[inline(always)]
    unsafe fn dot4_f16(_a: *const f32, _b: [*const f16; 4], _k: usize) -> Option<[f32; 4]> {
        None
    }
    /// [`Simd::exp`] of four vectors, the same bits: where the instruction set has one, each
    /// step is taken on all four before the next, so that the four chains of dependent steps
    /// (about 50 cycles each) overlap without relying on the core's scheduler to find them.
    #[inline(always)]
    unsafe fn exp4(v: [Self::V; 4]) -> [Self::V; 4] {
        v.map(|x| Self::exp(x))
    }
}

/// The kernels of one instruction set.
pub(crate) struct Kernels {
    /// See [`Gemm`].
    pub gemm: unsafe fn(&Gemm),
    /// [`Gemm`] with B stored as f16.
    pub gemm_f16: unsafe fn(&Gemm<f16>),
    /// `max_c x[c]` over `n` elements (−∞ for none).
    pub max: unsafe fn(x: *const f32, n: usize) -> f32,
    /// `x[c] ← exp(scale·x[c] − m)` and returns `Σ_c x[c]`. The product is rounded before the
    /// subtraction, so the element whose rounded scaled score is `m` gets exactly 1.
    pub exp_sum: unsafe fn(x: *mut f32, n: usize, scale: f32, m: f32) -> f32,
    /// `x[c] ← a·x[c]`.
    pub scale: unsafe fn(x: *mut f32, n: usize, a: f32),
    /// `x[c] ← a·x[c] + y[c]` (one rounding): folds a tile's partial product into an
    /// accumulator, so long sums are summed in blocks of one tile rather than as one chain.
    pub scale_add: unsafe fn(x: *mut f32, y: *const f32, n: usize, a: f32),
    /// See [`Transpose`].
    pub transpose: unsafe fn(&Transpose),
    /// See [`OnlineSoftmax`].
    pub online_softmax: unsafe fn(&OnlineSoftmax),
    /// See [`Dots`].
    pub dots: unsafe fn(&Dots),
    /// [`Dots`] with B stored as f16.
    pub dots_f16: unsafe fn(&Dots<f16>),
    /// `dst[c] ← src[c]` widened from f16 to f32 (exact), for `n` elements.
    pub widen: unsafe fn(src: *const f16, dst: *mut f32, n: usize),
    /// `ds[c] ← (p[c]·(ds[c] − d))·scale`: the softmax gradient of one row, from the weights
    /// `p`, `dP` in `ds` and the row's `D = rowsum(dO∘O)`.
    pub softmax_grad: unsafe fn(p: *const f32, ds: *mut f32, n: usize, d: f32, scale: f32),
    /// `Σ_c a[c]·b[c]` over `n` elements as one fused multiply-add chain in column order (see
    /// `fma_chain_generic`).
    pub fma_chain: unsafe fn(a: *const f32, b: *const f32, n: usize) -> f32,
    /// See [`ClassKeys`].
    pub class_keys: unsafe fn(&ClassKeys),
    /// Lanes per vector: the rows [`ClassKeys`] takes at once.
    pub lanes: usize,
}

/// Asks the cache for the `bytes` from `p` on (a hint: it reads nothing and cannot fault).
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn prefetch<T>(p: *const T, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address; no memory is read.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.cast::<i8>().wrapping_add(off),
            )
        };
    }
}

/// Constants of the vector exponentials. AVX2's is Cephes `expf`: $e^x = 2^n e^r$ with $n =
/// \mathrm{round}(x \log_2 e)$ and $r = x - n \ln 2$ split in two parts for exactness, $e^r$ by a
/// degree-7 polynomial on $|r| \le \ln 2 / 2$ (about 1 ulp). AVX-512's reduces by sixteenths of
/// $\ln 2$ instead and takes $2^{j/16}$ from a table (`exp_n`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod expc {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
    /// Below this, $e^x$ underflows f32's normal range: the result is flushed to exactly 0.
    pub const LO: f32 = -87.336_55;
    /// Above this, $e^x$ overflows; inputs are clamped (softmax arguments are ≤ 0 anyway).
    pub const HI: f32 = 88.376_26;
}

/// Instantiates every generic kernel for one instruction set inside `#[target_feature]` wrappers.
macro_rules! kernel_table {
    ($name:ident, $S:ty, prefetch $pf:expr, $($feat:literal),*) => {
        mod wrappers {
            use super::*;
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn gemm(g: &Gemm) { gemm_generic::<$S, f32, $pf>(g) }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn gemm_f16(g: &Gemm<f16>) { gemm_generic::<$S, f16, $pf>(g) }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn max(x: *const f32, n: usize) -> f32 { max_generic::<$S>(x, n) }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn exp_sum(x: *mut f32, n: usize, s: f32, m: f32) -> f32 {
                exp_sum_generic::<$S>(x, n, s, m)
            }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn scale(x: *mut f32, n: usize, a: f32) { scale_generic::<$S>(x, n, a) }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn scale_add(x: *mut f32, y: *const f32, n: usize, a: f32) {
                scale_add_generic::<$S>(x, y, n, a)
            }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn transpose(t: &Transpose) { transpose_generic::<$S>(t) }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn softmax_grad(p: *const f32, ds: *mut f32, n: usize, d: f32, s: f32) {
                softmax_grad_generic::<$S>(p, ds, n, d, s)
            }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn fma_chain(a: *const f32, b: *const f32, n: usize) -> f32 {
                fma_chain_generic(a, b, n)
            }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn dots(g: &Dots) { dots_generic::<$S>(g) }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn dots_f16(g: &Dots<f16>) { dots_f16_generic::<$S>(g) }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn widen(s: *const f16, d: *mut f32, n: usize) {
                widen_generic::<$S>(s, d, n)
            }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn class_keys(c: &ClassKeys) { class_keys_generic::<$S>(c) }
            $(#[target_feature(enable = $feat)])*
            pub(super) unsafe fn online_softmax(t: &OnlineSoftmax) {
                online_softmax_generic::<$S>(t)
            }
        }
        pub(crate) static $name: Kernels = Kernels {
            gemm: wrappers::gemm,
            gemm_f16: wrappers::gemm_f16,
            max: wrappers::max,
            exp_sum: wrappers::exp_sum,
            scale: wrappers::scale,
            scale_add: wrappers::scale_add,
            transpose: wrappers::transpose,
            online_softmax: wrappers::online_softmax,
            dots: wrappers::dots,
            dots_f16: wrappers::dots_f16,
            softmax_grad: wrappers::softmax_grad,
            fma_chain: wrappers::fma_chain,
            widen: wrappers::widen,
            class_keys: wrappers::class_keys,
            lanes: <$S>::LANES,
        };
    };
}

mod class;
mod dots;
mod gemm;
mod scalar;
mod softmax;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use class::*;
pub(crate) use dots::*;
pub(crate) use gemm::*;
use scalar::*;
pub(crate) use softmax::*;
