//! AMX tiles for the forward's two products, to f32 accuracy from bf16 parts.
//!
//! Intel's AMX unit multiplies a 16 × 32 tile of bf16 by a 32 × 16 one into 16 × 16 f32
//! accumulators: 512 multiply-adds per cycle and core against the 32 of two 512-bit FMA ports.
//! Each f32 splits exactly into three bf16 parts, each the next 8 of its 24 significant bits
//! rounded to nearest:
//!
//! $$x = h + m + l,\quad h = \mathrm{bf16}(x),\ m = \mathrm{bf16}(x - h),\ l = x - h - m,
//! \qquad |m| \le 2^{-8}|x|,\ |l| \le 2^{-16}|x|,$$
//!
//! so that a product is
//!
//! $$xy = h_x h_y + (h_x m_y + m_x h_y) + (m_x m_y + h_x l_y + l_x h_y) + \varepsilon,
//! \qquad |\varepsilon| \le 2^{-23}|xy|,$$
//!
//! the error of about one rounding of an f32 product. The unit forms each bf16 product exactly
//! in f32 and accumulates in f32. The five small products of a whole reduction are accumulated
//! first and the $h_x h_y$ products last, so the large partial sums are rounded as often as an
//! f32 dot product's: a product costs six bf16 products, which still run 2.7 times as fast as
//! one f32 FMA.
//!
//! Operands, every one padded with zeros to whole tiles:
//! * A (the left factor, row-major): three parts of `rows × k` bf16 side by side, a tile being
//!   16 rows of 32 consecutive bf16 (64 bytes);
//! * B (the right factor) in the unit's pair-interleaved layout: the tile of columns
//!   `16c..16c + 16` at reduction step `t` (32 rows) is 16 rows of pairs,
//!   `tile[p][j] = (B[32t + 2p][16c + j], B[32t + 2p + 1][16c + j])`, 1 KiB contiguous.
//!
//! Inputs are finite: an infinite element of q or k splits into ∞ and NaN, so its scores are
//! NaN here where the FMA path may give ±∞ (a key scored −∞ then weighs 0 there, and its row
//! is NaN here). Magnitudes above the largest bf16 (3.39·10³⁸, just under f32's largest) round
//! to ∞ likewise.
//!
//! [`available`] asks the CPU and the kernel (Linux grants the tile state per process on
//! request); each thread configures its tiles on first use ([`gemm`]).

/// bf16 per row of an A tile and pairs per row of a B tile: one reduction step.
pub(crate) const STEP: usize = 32;
/// Rows of an A tile and columns of a B or C tile.
pub(crate) const TILE: usize = 16;
/// bf16 in a B tile (`STEP × TILE`): 1 KiB.
pub(crate) const B_TILE: usize = STEP * TILE;

/// Whether this CPU and kernel run AMX bf16 tiles (with AVX-512 BF16 for the splitting).
pub(crate) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(x86::request)
}

/// The three bf16 parts of `x` (bit patterns), as [`split_row`] computes them.
#[cfg(test)]
fn split(x: f32) -> [u16; 3] {
    let h = bf16_rne(x);
    let r = x - widen(h);
    let m = bf16_rne(r);
    [h, m, bf16_rne(r - widen(m))]
}

/// `x` rounded to the nearest bf16, ties to even (finite `x`).
#[cfg(test)]
fn bf16_rne(x: f32) -> u16 {
    let b = x.to_bits();
    // A result below the smallest normal bf16 is flushed to zero, as the hardware does.
    if x.abs() < f32::MIN_POSITIVE {
        return (b >> 16) as u16 & 0x8000;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// A bf16 bit pattern as the f32 it is.
#[cfg(test)]
fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `C = A·B` for `C` of `32·mb × 32·nb` f32 (row stride `ldc` floats), over `steps` reduction
/// steps of [`STEP`], from the parts of A and B laid out as the module describes.
#[derive(Clone, Copy)]
pub(crate) struct TileGemm {
    pub mb: usize,
    pub nb: usize,
    pub steps: usize,
    /// The parts of A (h, m, l), each `lda` bf16 per row.
    pub a: [*const u16; 3],
    pub lda: usize,
    /// The parts of B (h, m, l): the tile of columns `16c..` at step `t` starts at
    /// `c·b_cols + t·B_TILE` bf16.
    pub b: [*const u16; 3],
    pub b_cols: usize,
    pub c: *mut f32,
    pub ldc: usize,
}

/// Runs `g` (AMX must be [`available`]).
///
/// # Safety
/// Every tile `g` names lies inside its buffer: A's parts hold `32·mb` rows of `lda ≥
/// 32·steps` bf16, B's parts `2·nb` column tiles of `steps` tiles, C `32·mb` rows of `ldc ≥
/// 32·nb` floats.
pub(crate) unsafe fn gemm(g: &TileGemm) {
    #[cfg(target_arch = "x86_64")]
    x86::gemm(g);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = g;
}

/// `dst[p][c] = part p of src[c]` for `c` in `lo..hi`, 0 elsewhere in `0..n` (a multiple of
/// 16); `src` is read only at `lo..hi`.
///
/// # Safety
/// `src` holds `hi` floats, each `dst[p]` holds `n` bf16, AMX is [`available`].
pub(crate) unsafe fn split_row(
    src: *const f32,
    (lo, hi): (usize, usize),
    n: usize,
    dst: [*mut u16; 3],
) {
    #[cfg(target_arch = "x86_64")]
    x86::split_row(src, (lo, hi), n, dst);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (src, lo, hi, n, dst);
}

/// Rows `0..w` of a `w × d` f32 matrix (row stride `ld`) as the B factor of `A·Xᵀ`: `ceil(w /
/// 16)` column tiles (each `d_pad / 32` steps, `b_cols = d_pad / 32 · B_TILE` apart) per part,
/// parts `part` bf16 apart, zero past `w` and `d`; `dst` is zeroed up to `cols` column tiles.
///
/// # Safety
/// `src` holds `w` rows of `d` floats at stride `ld`; `dst` holds three parts of `cols ≥
/// ceil(w/16)` column tiles; `part ≥ cols·b_cols`; AMX is [`available`].
pub(crate) unsafe fn pack_transposed(
    src: *const f32,
    (w, d, ld): (usize, usize, usize),
    cols: usize,
    part: usize,
    dst: *mut u16,
) {
    let d_pad = d.next_multiple_of(STEP);
    let b_cols = d_pad / STEP * B_TILE;
    let mut row = [vec![0u16; d_pad], vec![0u16; d_pad], vec![0u16; d_pad]];
    for p in 0..3 {
        std::ptr::write_bytes(dst.add(p * part), 0, cols * b_cols);
    }
    for j in 0..w {
        let parts = [
            row[0].as_mut_ptr(),
            row[1].as_mut_ptr(),
            row[2].as_mut_ptr(),
        ];
        split_row(src.add(j * ld), (0, d), d_pad, parts);
        let (c, jj) = (j / TILE, j % TILE);
        for (p, r) in row.iter().enumerate() {
            // Pair q of features (2q, 2q + 1) goes to row q % 16 of step q / 16's tile.
            let base = dst.add(p * part + c * b_cols + 2 * jj).cast::<u32>();
            let pairs = r.as_ptr().cast::<u32>();
            for q in 0..d_pad / 2 {
                let at = (q / TILE) * B_TILE / 2 + (q % TILE) * TILE;
                base.add(at).write_unaligned(pairs.add(q).read_unaligned());
            }
        }
    }
}

/// Rows `0..w` of a `w × dv` f32 matrix V (row stride `ld`) as the B factor of `P·V`, keys
/// being the reduction: `dv_pad / 16` column tiles `b_cols` bf16 apart, each `w_pad / 32`
/// steps, parts `part` apart, zero past `w` (up to `w_pad`) and `dv`.
///
/// # Safety
/// `src` holds `w` rows of `dv` floats at stride `ld`; `dst` holds three parts of `dv_pad / 16`
/// column tiles of `b_cols ≥ w_pad / 32 · B_TILE` bf16; AMX is [`available`].
pub(crate) unsafe fn pack_rows(
    src: *const f32,
    (w, dv, ld): (usize, usize, usize),
    (w_pad, dv_pad): (usize, usize),
    (b_cols, part): (usize, usize),
    dst: *mut u16,
) {
    let mut row: [[Vec<u16>; 3]; 2] =
        std::array::from_fn(|_| std::array::from_fn(|_| vec![0u16; dv_pad]));
    for j0 in (0..w_pad).step_by(2) {
        for (e, r) in row.iter_mut().enumerate() {
            let j = j0 + e;
            let parts = [r[0].as_mut_ptr(), r[1].as_mut_ptr(), r[2].as_mut_ptr()];
            let keys = if j < w { (0, dv) } else { (0, 0) };
            split_row(
                src.add(j.min(w.saturating_sub(1)) * ld),
                keys,
                dv_pad,
                parts,
            );
        }
        // Keys j0 and j0 + 1 are one row of pairs of step j0 / 32's tiles.
        let at = (j0 / STEP) * B_TILE + (j0 % STEP) / 2 * 2 * TILE;
        for (p, (even, odd)) in row[0].iter().zip(&row[1]).enumerate() {
            for c in 0..dv_pad / TILE {
                let out = dst.add(p * part + c * b_cols + at);
                for jj in 0..TILE {
                    *out.add(2 * jj) = even[c * TILE + jj];
                    *out.add(2 * jj + 1) = odd[c * TILE + jj];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// CPUID leaf 7: AMX-BF16 (EDX bit 22), AMX-TILE (EDX bit 24), AVX-512 BF16 (leaf 7.1
    /// EAX bit 5); then the tile data state requested from Linux (`arch_prctl`), which grants
    /// it to the whole process.
    pub(super) fn request() -> bool {
        if !std::arch::is_x86_feature_detected!("avx512bf16")
            || !std::arch::is_x86_feature_detected!("avx512bw")
        {
            return false;
        }
        // CPUID leaf 7 exists on every CPU with AVX-512 (checked above).
        let l7 = __cpuid_count(7, 0);
        if l7.edx & (1 << 22) == 0 || l7.edx & (1 << 24) == 0 {
            return false;
        }
        permit()
    }

    #[cfg(target_os = "linux")]
    fn permit() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes the process's permitted
        // extended state; it returns 0 when the tile data state is granted.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn permit() -> bool {
        false
    }

    thread_local! {
        static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Every tile 16 rows of 64 bytes (palette 1), loaded once per thread: no other code in
    /// the process configures tiles.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    unsafe fn configure() {
        if CONFIGURED.get() {
            return;
        }
        let mut cfg = Config([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = 16;
        }
        // SAFETY: AMX is available (the caller's contract) and cfg is a valid palette-1
        // configuration of 64 aligned bytes.
        asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        CONFIGURED.set(true);
    }

    /// A's two row tiles at `a` and `a16` bytes further (row stride `lda` bytes) into tmm4 and
    /// tmm5.
    ///
    /// # Safety
    /// Both tiles lie inside A; the tiles are configured.
    #[inline(always)]
    unsafe fn load_a(a: *const u16, a16: usize, lda: usize) {
        asm!(
            "tileloadd tmm4, [{a} + {lda}]",
            "tileloadd tmm5, [{a2} + {lda}]",
            a = in(reg) a,
            a2 = in(reg) a.byte_add(a16),
            lda = in(reg) lda,
            options(nostack, readonly)
        );
    }

    /// B's two column tiles at `b` and `b16` bytes further into tmm6 and tmm7.
    ///
    /// # Safety
    /// Both tiles lie inside B; the tiles are configured.
    #[inline(always)]
    unsafe fn load_b(b: *const u16, b16: usize) {
        asm!(
            "tileloadd tmm6, [{b} + {s}]",
            "tileloadd tmm7, [{b2} + {s}]",
            b = in(reg) b,
            b2 = in(reg) b.byte_add(b16),
            s = in(reg) 64usize,
            options(nostack, readonly)
        );
    }

    /// The 2 × 2 block of accumulators in tmm0–3 += (tmm4; tmm5) · (tmm6, tmm7).
    ///
    /// # Safety
    /// The tiles are configured.
    #[inline(always)]
    unsafe fn mul4() {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            options(nostack, nomem)
        );
    }

    pub(super) unsafe fn gemm(g: &TileGemm) {
        configure();
        let (lda, ldc) = (g.lda * 2, g.ldc * 4);
        for rb in 0..g.mb {
            for cb in 0..g.nb {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                let a0 = g.a.map(|a| a.add(rb * 32 * g.lda));
                let b0 = g.b.map(|b| b.add(2 * cb * g.b_cols));
                let (a16, b16) = (TILE * lda, g.b_cols * 2);
                // The five small products of every step, each factor loaded once per step
                // where the tiles allow: B_h (m·h, l·h), B_m (m·m, h·m), B_l (h·l).
                // SAFETY (every load below): the tiles lie inside the operands (the caller's
                // contract).
                for t in 0..g.steps {
                    let (at, bt) = (a0.map(|a| a.add(t * STEP)), b0.map(|b| b.add(t * B_TILE)));
                    load_b(bt[0], b16);
                    load_a(at[1], a16, lda);
                    mul4();
                    load_a(at[2], a16, lda);
                    mul4();
                    load_b(bt[1], b16);
                    load_a(at[1], a16, lda);
                    mul4();
                    load_a(at[0], a16, lda);
                    mul4();
                    load_b(bt[2], b16);
                    mul4();
                }
                // Then h·h, whose partial sums are the large ones.
                for t in 0..g.steps {
                    load_a(a0[0].add(t * STEP), a16, lda);
                    load_b(b0[0].add(t * B_TILE), b16);
                    mul4();
                }
                let c = g.c.add(rb * 32 * g.ldc + cb * 32);
                // SAFETY: the 32 × 32 block lies inside C.
                asm!(
                    "tilestored [{c0} + {ldc}], tmm0",
                    "tilestored [{c1} + {ldc}], tmm1",
                    "tilestored [{c2} + {ldc}], tmm2",
                    "tilestored [{c3} + {ldc}], tmm3",
                    c0 = in(reg) c,
                    c1 = in(reg) c.add(TILE),
                    c2 = in(reg) c.add(TILE * g.ldc),
                    c3 = in(reg) c.add(TILE * g.ldc + TILE),
                    ldc = in(reg) ldc,
                    options(nostack)
                );
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn split_row(
        src: *const f32,
        (lo, hi): (usize, usize),
        n: usize,
        dst: [*mut u16; 3],
    ) {
        #[inline(always)]
        unsafe fn widen(h: __m256bh) -> __m512 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                std::mem::transmute::<__m256bh, __m256i>(h),
            )))
        }
        let store = |p: *mut u16, v: __m256bh| {
            _mm256_storeu_si256(p.cast(), std::mem::transmute::<__m256bh, __m256i>(v))
        };
        for c in (0..n).step_by(16) {
            let x = if lo <= c && c + 16 <= hi {
                _mm512_loadu_ps(src.add(c))
            } else {
                let (a, e) = (lo.clamp(c, c + 16) - c, hi.clamp(c, c + 16) - c);
                let mask: __mmask16 = if a >= e {
                    0
                } else {
                    ((1u32 << e) - (1u32 << a)) as u16
                };
                // Masked-off lanes are not read.
                _mm512_maskz_loadu_ps(mask, src.wrapping_add(c))
            };
            let h = _mm512_cvtneps_pbh(x);
            let r = _mm512_sub_ps(x, widen(h));
            let m = _mm512_cvtneps_pbh(r);
            let l = _mm512_cvtneps_pbh(_mm512_sub_ps(r, widen(m)));
            store(dst[0].add(c), h);
            store(dst[1].add(c), m);
            store(dst[2].add(c), l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
    }

    #[test]
    fn parts_sum_to_the_value() {
        let mut s = 1;
        for _ in 0..100_000 {
            let x = rand(&mut s) * 10f32.powi((rand(&mut s) * 4.0) as i32);
            let [h, m, l] = split(x).map(widen);
            assert_eq!((h as f64) + (m as f64) + (l as f64), x as f64, "{x}");
            assert!(m.abs() <= x.abs() * 2f32.powi(-8) && l.abs() <= x.abs() * 2f32.powi(-16));
        }
    }

    #[test]
    fn vector_split_equals_the_scalar_one() {
        if !available() {
            return;
        }
        let mut s = 7;
        let x: Vec<f32> = (0..80).map(|_| rand(&mut s)).collect();
        let mut parts = [vec![1u16; 96], vec![1u16; 96], vec![1u16; 96]];
        let dst = [
            parts[0].as_mut_ptr(),
            parts[1].as_mut_ptr(),
            parts[2].as_mut_ptr(),
        ];
        // SAFETY: x holds 80 ≥ 75 floats, each part 96 bf16; AMX checked.
        unsafe { split_row(x.as_ptr(), (3, 75), 96, dst) };
        for c in 0..96 {
            let want = if (3..75).contains(&c) {
                split(x[c])
            } else {
                [0; 3]
            };
            assert_eq!([parts[0][c], parts[1][c], parts[2][c]], want, "column {c}");
        }
    }

    /// A·Bᵀ through the packers and tiles equals the f64 product to about an f32 rounding of
    /// each product, on ragged sizes.
    #[test]
    fn tile_product_is_f32_accurate() {
        if !available() {
            return;
        }
        let mut s = 3;
        for (m, n, k) in [
            (1usize, 1usize, 1usize),
            (32, 32, 32),
            (45, 37, 70),
            (64, 64, 128),
            (20, 64, 96),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rand(&mut s)).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rand(&mut s)).collect();
            let (mp, np, kp) = (
                m.next_multiple_of(32),
                n.next_multiple_of(32),
                k.next_multiple_of(32),
            );
            let mut ap = vec![0u16; 3 * mp * kp];
            for r in 0..m {
                let dst = [0, 1, 2].map(|p| ap[p * mp * kp + r * kp..].as_mut_ptr());
                // SAFETY: row r of a holds k floats; each part row kp bf16.
                unsafe { split_row(a[r * k..].as_ptr(), (0, k), kp, dst) };
            }
            let cols = np / TILE;
            let b_cols = kp / STEP * B_TILE;
            let mut bp = vec![0u16; 3 * cols * b_cols];
            // SAFETY: b holds n rows of k; bp three parts of `cols` column tiles.
            unsafe { pack_transposed(b.as_ptr(), (n, k, k), cols, cols * b_cols, bp.as_mut_ptr()) };
            let mut c = vec![0f32; mp * np];
            let g = TileGemm {
                mb: mp / 32,
                nb: np / 32,
                steps: kp / STEP,
                a: [0, 1, 2].map(|p| ap[p * mp * kp..].as_ptr()),
                lda: kp,
                b: [0, 1, 2].map(|p| bp[p * cols * b_cols..].as_ptr()),
                b_cols,
                c: c.as_mut_ptr(),
                ldc: np,
            };
            // SAFETY: every operand was sized for g above.
            unsafe { gemm(&g) };
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut mag) = (0f64, 0f64);
                    for t in 0..k {
                        let p = a[i * k + t] as f64 * b[j * k + t] as f64;
                        exact += p;
                        mag += p.abs();
                    }
                    let err = (c[i * np + j] as f64 - exact).abs();
                    assert!(
                        err <= mag * 2f64.powi(-22),
                        "({m},{n},{k}) [{i},{j}] {err} of {mag}"
                    );
                }
            }
        }
    }

    #[test]
    fn pair_interleaved_rows() {
        if !available() {
            return;
        }
        let (w, dv) = (5, 20);
        let v: Vec<f32> = (0..w * dv).map(|x| x as f32 + 0.5).collect();
        let (w_pad, dv_pad) = (32, 32);
        let b_cols = w_pad / STEP * B_TILE;
        let mut dst = vec![7u16; 3 * 2 * b_cols];
        // SAFETY: v holds w rows of dv; dst three parts of two column tiles.
        unsafe {
            pack_rows(
                v.as_ptr(),
                (w, dv, dv),
                (w_pad, dv_pad),
                (b_cols, 2 * b_cols),
                dst.as_mut_ptr(),
            )
        };
        for j in 0..w_pad {
            for c in 0..dv_pad {
                let at = (c / TILE) * b_cols + (j / 2) * 2 * TILE + (c % TILE) * 2 + j % 2;
                let want = if j < w && c < dv {
                    split(v[j * dv + c])[0]
                } else {
                    0
                };
                assert_eq!(dst[at], want, "key {j} column {c}");
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release -p attentive --lib amx::speed -- --ignored --nocapture`: the
    /// tile product on the forward's two shapes, operands in cache.
    #[test]
    #[ignore]
    fn tile_product_speed() {
        if !available() {
            return;
        }
        for (m, n, k, label) in [
            (64, 64, 64, "QK D64"),
            (64, 64, 256, "PV D64 run 256"),
            (64, 128, 128, "QK D128"),
            (64, 128, 256, "PV D128"),
        ] {
            let lda = k;
            // Operands on cache lines, as the kernel's are.
            let ones = f32::from_bits(0x3f80_3f80);
            let a = crate::workspace::AVec::filled(3 * m * lda / 2, ones);
            let cols = n / TILE;
            let b_cols = k / STEP * B_TILE;
            let b = crate::workspace::AVec::filled(3 * cols * b_cols / 2, ones);
            let mut c = crate::workspace::AVec::filled(m * n, 0.0);
            let (a, b) = (a.as_ptr().cast::<u16>(), b.as_ptr().cast::<u16>());
            let g = TileGemm {
                mb: m / 32,
                nb: n / 32,
                steps: k / STEP,
                a: [0, 1, 2].map(|p| a.wrapping_add(p * m * lda)),
                lda,
                b: [0, 1, 2].map(|p| b.wrapping_add(p * cols * b_cols)),
                b_cols,
                c: c.as_mut_ptr(),
                ldc: n,
            };
            let reps = 20000;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                // SAFETY: operands sized for g.
                unsafe { gemm(&g) };
            }
            let s = t.elapsed().as_secs_f64();
            let macs = 6.0 * (m * n * k) as f64 * reps as f64;
            println!(
                "{label}: {:.0} bf16 GFLOP/s, {:.0} f32-equivalent",
                2.0 * macs / s / 1e9,
                2.0 * macs / 6.0 / s / 1e9
            );
        }
    }
}
