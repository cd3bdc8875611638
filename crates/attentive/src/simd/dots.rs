//! Dot products of whole rows summed in f64 ([`Dots`]): how the decode scores a few queries
//! against K (f32 or f16) where it lies.

use super::*;

/// `c[r·ldc + j] = Σ_t a[r·lda + t]·b[j·ldb + t]` for `r < m`, `j < n`, `t < k`: dot products of
/// rows, both read along their unit stride, each accumulated in f64 ([`Simd::dot`]) and rounded
/// once. Scoring a few queries against K rows where they lie: K streams from memory once, in
/// order, with no packing; the f64 sum makes each score the correctly rounded value up to a
/// rare tie, at a cost the memory-bound decode does not notice.
#[derive(Clone, Copy)]
pub(crate) struct Dots<E = f32> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: *const f32,
    pub lda: usize,
    /// B's rows, f32 or f16 (each row widened exactly just before its dot products).
    pub b: *const E,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
}

#[inline(always)]
pub(super) unsafe fn dots_generic<S: Simd>(g: &Dots) {
    // Four rows of B at a time (`dot4`: the bits of four `dot`s, with the conversion of A's
    // elements shared and eight independent chains), each asked for a page ahead.
    let mut j = 0;
    while j + 4 <= g.n {
        let b: [*const f32; 4] = std::array::from_fn(|i| g.b.add((j + i) * g.ldb));
        for &p in &b {
            prefetch(p.wrapping_add(PREFETCH_ROWS * g.ldb), g.k * 4);
        }
        for r in 0..g.m {
            let d = S::dot4(g.a.add(r * g.lda), b, g.k);
            for (i, &x) in d.iter().enumerate() {
                *g.c.add(r * g.ldc + j + i) = x;
            }
        }
        j += 4;
    }
    for j in j..g.n {
        let b = g.b.add(j * g.ldb);
        for r in 0..g.m {
            *g.c.add(r * g.ldc + j) = S::dot(g.a.add(r * g.lda), b, g.k);
        }
    }
}

/// Rows ahead of its loads that `dots_f16` asks the cache for: 16 rows of 256 bytes (D = 128)
/// are 4 KiB, one page, which the hardware prefetcher does not cross by itself. Measured at
/// H = 32, 32768 keys, D = 128: 23.4 → 21.3 ms; on AMD Zen 4 the same hint in the GEMM's V loads
/// was slower (Intel cores take one: `AVX512_XEON`).
const PREFETCH_ROWS: usize = 16;

/// [`Dots`] over f16 rows of B, four at a time widened into L1 right before their products:
/// the loads of the cache's rows interleave with the arithmetic, as the f32 kernel's do.
#[inline(always)]
pub(super) unsafe fn dots_f16_generic<S: Simd>(g: &Dots<f16>) {
    // Four widened rows: on the stack for D ≤ 256, allocated once per call beyond (only when
    // the rows are not widened in registers).
    let mut stack = [0.0f32; 4 * 256];
    let mut heap = Vec::new();
    let rows: &mut [f32] = if 4 * g.k <= stack.len() {
        &mut stack[..4 * g.k]
    } else {
        heap.resize(4 * g.k, 0.0);
        &mut heap
    };
    let mut j = 0;
    while j < g.n {
        let q = 4.min(g.n - j);
        if q == 4 && g.m == 1 {
            // One query: widen in registers, with no trip through memory.
            let b = std::array::from_fn(|i| g.b.add((j + i) * g.ldb));
            for &p in &b {
                prefetch(p.wrapping_add(PREFETCH_ROWS * g.ldb), g.k * 2);
            }
            if let Some(d) = S::dot4_f16(g.a, b, g.k) {
                for (i, &x) in d.iter().enumerate() {
                    *g.c.add(j + i) = x;
                }
                j += 4;
                continue;
            }
        }
        for i in 0..q {
            let src = g.b.add((j + i) * g.ldb);
            prefetch(src.wrapping_add(PREFETCH_ROWS * g.ldb), g.k * 2);
            widen_generic::<S>(src, rows.as_mut_ptr().add(i * g.k), g.k);
        }
        if q == 4 {
            let b = std::array::from_fn(|i| rows.as_ptr().add(i * g.k));
            for r in 0..g.m {
                let d = S::dot4(g.a.add(r * g.lda), b, g.k);
                for (i, &x) in d.iter().enumerate() {
                    *g.c.add(r * g.ldc + j + i) = x;
                }
            }
        } else {
            for i in 0..q {
                for r in 0..g.m {
                    *g.c.add(r * g.ldc + j + i) =
                        S::dot(g.a.add(r * g.lda), rows.as_ptr().add(i * g.k), g.k);
                }
            }
        }
        j += q;
    }
}
