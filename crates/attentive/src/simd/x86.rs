//! AVX-512 and AVX2+FMA: the [`Simd`] trait on their intrinsics, and the kernel tables built
//! from them (one per vendor where the best code differs).

use super::expc::*;
use super::*;
use std::arch::x86_64::*;

#[derive(Clone, Copy)]
pub(crate) struct Avx512;

/// The bits of $2^{j/16}$ for $j = 0, …, 15$, each rounded to the nearest f32.
#[repr(align(64))]
struct Exp2Table([u32; 16]);
static EXP2_16: Exp2Table = Exp2Table([
    0x3f80_0000u32,
    0x3f85_aac3,
    0x3f8b_95c2,
    0x3f91_c3d3,
    0x3f98_37f0,
    0x3f9e_f532,
    0x3fa5_fed7,
    0x3fad_583f,
    0x3fb5_04f3,
    0x3fbd_08a4,
    0x3fc5_672a,
    0x3fce_248c,
    0x3fd7_44fd,
    0x3fe0_ccdf,
    0x3fea_c0c7,
    0x3ff5_257d,
]);
/// 1.5·2¹⁹: adding it to a float of magnitude below 2¹⁸ rounds it to a multiple of 1/16,
/// and the low four bits of the sum's significand are that multiple's sixteenths mod 16.
const ROUND16: f32 = 786_432.0;

/// $e^x$ of `N` vectors, each step taken on all of them before the next (so that their
/// chains of dependent steps overlap). With $k = \mathrm{round}(16 x \log_2 e)$,
/// $j = k \bmod 16$ and $r = x - (k/16) \ln 2$ (two parts, the first product exact),
/// $$e^x = 2^{\lfloor k/16 \rfloor}\\, T_j\\, e^r,\qquad T_j = 2^{j/16},\quad |r| \le \ln 2 / 32,$$
/// with $T_j$ picked from a register by `vpermps` (the sum's low bits are its index) and
/// $e^r = 1 + r + r^2/2 + r^3/6$ (the next term is below $9.3 \cdot 10^{-9}$). Error: at
/// most $T_j$'s rounding plus the last one, $1.2 \cdot 10^{-7}$ relative. Against a
/// degree-7 polynomial, 7 multiplications and additions where there were 11: on AMD Zen 5
/// the softmax's exponential pass takes 6.2 cycles per vector instead of 8.0.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn exp_n<const N: usize>(x: [__m512; N]) -> [__m512; N] {
    // Lanes to keep: x ≥ LO, or NaN (as `!(x < LO)`, in one comparison). Above HI the
    // scaling below overflows to +∞, which is e^x rounded. NaN stays NaN: `max` returns
    // its second operand when either is NaN.
    let keep = x.map(|x| _mm512_cmp_ps_mask(x, _mm512_set1_ps(LO), _CMP_NLT_UQ));
    let x = x.map(|x| _mm512_max_ps(_mm512_set1_ps(LO), x));
    let magic = _mm512_set1_ps(ROUND16);
    let s = x.map(|x| _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), magic));
    let k = s.map(|s| _mm512_sub_ps(s, magic));
    let mut r = x;
    for i in 0..N {
        r[i] = _mm512_fnmadd_ps(k[i], _mm512_set1_ps(LN2_HI), r[i]);
    }
    for i in 0..N {
        r[i] = _mm512_fnmadd_ps(k[i], _mm512_set1_ps(LN2_LO), r[i]);
    }
    // The table is 16 floats on a 64-byte line, as the aligned load needs.
    let table = _mm512_load_ps(EXP2_16.0.as_ptr().cast());
    let t = s.map(|s| _mm512_permutexvar_ps(_mm512_castps_si512(s), table));
    // T·e^r = T + (T·r)·(1 + r·(1/2 + r/6)).
    let mut p = [_mm512_set1_ps(1.0 / 6.0); N];
    for i in 0..N {
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(0.5));
    }
    for i in 0..N {
        p[i] = _mm512_fmadd_ps(p[i], r[i], _mm512_set1_ps(1.0));
    }
    std::array::from_fn(|i| {
        let y = _mm512_fmadd_ps(_mm512_mul_ps(t[i], r[i]), p[i], t[i]);
        // y·2^⌊k/16⌋, 0 where the lane is not kept.
        _mm512_maskz_scalef_ps(keep[i], y, k[i])
    })
}

impl Simd for Avx512 {
    const LANES: usize = 16;
    const NV: usize = 4;
    type V = __m512;
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> __m512 {
        _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, v: __m512, n: usize) {
        _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, v)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn reduce_add(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline(always)]
    unsafe fn reduce_max(v: __m512) -> f32 {
        _mm512_reduce_max_ps(v)
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        exp_n([x])[0]
    }
    #[inline(always)]
    unsafe fn exp4(x: [__m512; 4]) -> [__m512; 4] {
        exp_n(x)
    }
    #[inline(always)]
    unsafe fn dot(a: *const f32, b: *const f32, k: usize) -> f32 {
        // Sixteen floats per step as two halves of eight f64 lanes (two accumulators for
        // the FMA latency); the last step loads only the elements left.
        let (mut x, mut y) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let mut t = 0;
        while t < k {
            let m = if k - t >= 16 {
                u16::MAX
            } else {
                ((1u32 << (k - t)) - 1) as u16
            };
            let (u, v) = (
                _mm512_maskz_loadu_ps(m, a.add(t)),
                _mm512_maskz_loadu_ps(m, b.add(t)),
            );
            let (u0, v0) = (_mm512_castps512_ps256(u), _mm512_castps512_ps256(v));
            let u1 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(u)));
            let v1 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            x = _mm512_fmadd_pd(_mm512_cvtps_pd(u0), _mm512_cvtps_pd(v0), x);
            y = _mm512_fmadd_pd(_mm512_cvtps_pd(u1), _mm512_cvtps_pd(v1), y);
            t += 16;
        }
        _mm512_reduce_add_pd(_mm512_add_pd(x, y)) as f32
    }
    #[inline(always)]
    unsafe fn dot4_f16(a: *const f32, b: [*const f16; 4], k: usize) -> Option<[f32; 4]> {
        // Whole vectors only: a masked load of f16 lanes needs AVX512BW.
        if !k.is_multiple_of(16) {
            return None;
        }
        let mut x = [_mm512_setzero_pd(); 4];
        let mut y = [_mm512_setzero_pd(); 4];
        for t in (0..k).step_by(16) {
            let u = _mm512_loadu_ps(a.add(t));
            let u0 = _mm512_cvtps_pd(_mm512_castps512_ps256(u));
            let u1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(u),
            )));
            for i in 0..4 {
                let v = Self::load_f16(b[i].add(t));
                let v0 = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                let v1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(v),
                )));
                x[i] = _mm512_fmadd_pd(u0, v0, x[i]);
                y[i] = _mm512_fmadd_pd(u1, v1, y[i]);
            }
        }
        Some(std::array::from_fn(|i| {
            _mm512_reduce_add_pd(_mm512_add_pd(x[i], y[i])) as f32
        }))
    }
    #[inline(always)]
    unsafe fn dot4(a: *const f32, b: [*const f32; 4], k: usize) -> [f32; 4] {
        // As `dot`, for four rows in step: each row keeps its own two accumulators and
        // order, so its bits are `dot`'s.
        let mut x = [_mm512_setzero_pd(); 4];
        let mut y = [_mm512_setzero_pd(); 4];
        let mut t = 0;
        // Whole steps widen each half of eight straight from memory (one instruction each,
        // with no extraction of the upper half); the same values, so the same bits.
        let wide = |p: *const f32| {
            (
                _mm512_cvtps_pd(_mm256_loadu_ps(p)),
                _mm512_cvtps_pd(_mm256_loadu_ps(p.add(8))),
            )
        };
        while t + 16 <= k {
            let (u0, u1) = wide(a.add(t));
            for i in 0..4 {
                let (v0, v1) = wide(b[i].add(t));
                x[i] = _mm512_fmadd_pd(u0, v0, x[i]);
                y[i] = _mm512_fmadd_pd(u1, v1, y[i]);
            }
            t += 16;
        }
        while t < k {
            let m = ((1u32 << (k - t)) - 1) as u16;
            let u = _mm512_maskz_loadu_ps(m, a.add(t));
            let u0 = _mm512_cvtps_pd(_mm512_castps512_ps256(u));
            let u1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(u),
            )));
            for i in 0..4 {
                let v = _mm512_maskz_loadu_ps(m, b[i].add(t));
                let v0 = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                let v1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(v),
                )));
                x[i] = _mm512_fmadd_pd(u0, v0, x[i]);
                y[i] = _mm512_fmadd_pd(u1, v1, y[i]);
            }
            t += 16;
        }
        std::array::from_fn(|i| _mm512_reduce_add_pd(_mm512_add_pd(x[i], y[i])) as f32)
    }
    #[inline(always)]
    unsafe fn transpose_block(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * lds)));
        // Pairs of rows interleaved within each 128-bit lane, then quadruples: u[4b + k]
        // holds, in lane q, column k + 4q of rows 4b..4b + 4.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (blk, k) = (i / 4, i % 4);
            let a = _mm512_castps_pd(t[4 * blk + k / 2]);
            let b = _mm512_castps_pd(t[4 * blk + k / 2 + 2]);
            _mm512_castpd_ps(if k % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        // Column k + 4q gathers lane q of u[k], u[4 + k], u[8 + k], u[12 + k].
        for k in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[k], u[4 + k]);
            let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + k], u[12 + k]);
            let v1 = _mm512_shuffle_f32x4::<0xdd>(u[k], u[4 + k]);
            let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + k], u[12 + k]);
            _mm512_storeu_ps(dst.add(k * ldd), _mm512_shuffle_f32x4::<0x88>(v0, w0));
            _mm512_storeu_ps(dst.add((k + 8) * ldd), _mm512_shuffle_f32x4::<0xdd>(v0, w0));
            _mm512_storeu_ps(dst.add((k + 4) * ldd), _mm512_shuffle_f32x4::<0x88>(v1, w1));
            _mm512_storeu_ps(
                dst.add((k + 12) * ldd),
                _mm512_shuffle_f32x4::<0xdd>(v1, w1),
            );
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Avx2;

/// Eight lanes of all-ones followed by eight of zeros: a window of 8 starting at `8 − n` is the
/// mask of the first `n` lanes.
static TAIL_MASK: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

#[inline(always)]
unsafe fn tail_mask(n: usize) -> __m256i {
    _mm256_loadu_si256(TAIL_MASK.as_ptr().add(8 - n) as *const __m256i)
}

impl Simd for Avx2 {
    const LANES: usize = 8;
    const NV: usize = 2;
    type V = __m256;
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> __m256 {
        _mm256_maskload_ps(p, tail_mask(n))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, v: __m256, n: usize) {
        _mm256_maskstore_ps(p, tail_mask(n), v)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn reduce_add(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
    #[inline(always)]
    unsafe fn reduce_max(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        let under = _mm256_cmp_ps(x, _mm256_set1_ps(LO), _CMP_LT_OQ);
        // NaN stays NaN: `min` and `max` return their second operand when either is NaN.
        let x = _mm256_min_ps(_mm256_set1_ps(HI), _mm256_max_ps(_mm256_set1_ps(LO), x));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut y = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        // e^r = 1 + (r + r²·p(r)): one rounding at the final addition, not two.
        let r2 = _mm256_mul_ps(r, r);
        y = _mm256_add_ps(_mm256_fmadd_ps(y, r2, r), _mm256_set1_ps(1.0));
        // 2^n for n in [−126, 127] (guaranteed by the clamp): build the exponent bits.
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        let y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
        _mm256_andnot_ps(under, y)
    }
    #[inline(always)]
    unsafe fn dot(a: *const f32, b: *const f32, k: usize) -> f32 {
        // Four f64 lanes per step, two accumulators for the FMA latency.
        let (mut x, mut y) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut t = 0;
        while t + 8 <= k {
            let (u, v) = (_mm256_loadu_ps(a.add(t)), _mm256_loadu_ps(b.add(t)));
            let (u0, v0) = (_mm256_castps256_ps128(u), _mm256_castps256_ps128(v));
            let (u1, v1) = (_mm256_extractf128_ps::<1>(u), _mm256_extractf128_ps::<1>(v));
            x = _mm256_fmadd_pd(_mm256_cvtps_pd(u0), _mm256_cvtps_pd(v0), x);
            y = _mm256_fmadd_pd(_mm256_cvtps_pd(u1), _mm256_cvtps_pd(v1), y);
            t += 8;
        }
        let s = _mm256_add_pd(x, y);
        let s = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
        let mut sum = _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
        while t < k {
            sum += *a.add(t) as f64 * *b.add(t) as f64;
            t += 1;
        }
        sum as f32
    }
    #[inline(always)]
    unsafe fn transpose_block(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * lds)));
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // u[4b + k] holds column k of rows 4b..4b + 4 in its low half and column k + 4 in
        // its high half.
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let (blk, k) = (i / 4, i % 4);
            let (a, b) = (t[4 * blk + k / 2], t[4 * blk + k / 2 + 2]);
            if k % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xee>(a, b)
            }
        });
        for k in 0..4 {
            _mm256_storeu_ps(
                dst.add(k * ldd),
                _mm256_permute2f128_ps::<0x20>(u[k], u[4 + k]),
            );
            _mm256_storeu_ps(
                dst.add((k + 4) * ldd),
                _mm256_permute2f128_ps::<0x31>(u[k], u[4 + k]),
            );
        }
    }
}

mod avx512_table {
    use super::*;
    kernel_table!(AVX512, Avx512, prefetch 0, "avx512f");
}
/// The AVX-512 kernels for Intel cores (two 512-bit FMA ports, a 48 KiB L1): the matrix
/// micro-kernel asks for B's row 8 steps ahead. Measured on a Xeon, 2 threads, forward
/// N = 2048: D = 128 69.8 → 65.9 ms, D = 64 and forward+backward unchanged; on AMD Zen 4
/// the same hint in the P·V product was slower (see `PREFETCH_ROWS`), so it stays off there.
mod avx512_xeon_table {
    use super::*;
    kernel_table!(AVX512_XEON, Avx512, prefetch 8, "avx512f");
}
mod avx2_table {
    use super::*;
    kernel_table!(AVX2, Avx2, prefetch 0, "avx2", "fma", "f16c");
}
pub(crate) use avx2_table::AVX2;
pub(crate) use avx512_table::AVX512;
pub(crate) use avx512_xeon_table::AVX512_XEON;

/// Whether the CPU is an Intel one (CPUID's vendor string), whose cores take
/// [`AVX512_XEON`].
pub(crate) fn intel() -> bool {
    static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INTEL.get_or_init(|| {
        let id = __cpuid(0);
        (id.ebx, id.edx, id.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
    })
}
