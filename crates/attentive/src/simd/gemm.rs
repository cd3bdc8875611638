//! The matrix product every tiled pass runs ([`Gemm`], its register-blocked micro-kernel and
//! its passes), and the copies around it: transposing tiles, scaling and adding rows, widening
//! f16.

use super::*;

/// Rows of the output held in registers by the matrix micro-kernel: 6 rows × `NV` vectors of
/// accumulators (24 of AVX-512's 32 registers, 12 of AVX2's 16), leaving room for the `NV` loaded
/// vectors of B and one broadcast of A.
pub(crate) const MR: usize = 6;

/// `C (m×n) = [C +] A·B`, where A is read element by element through two strides (so A or Aᵀ
/// of any layout works) and B and C are row-major with unit column stride. B is f32, or f16
/// widened exactly as it is loaded (the same products as on B widened beforehand).
#[derive(Clone, Copy)]
pub(crate) struct Gemm<E = f32> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: *const f32,
    /// Stride of A between output rows.
    pub a_rs: usize,
    /// Stride of A along the reduction.
    pub a_ks: usize,
    pub b: *const E,
    pub ldb: usize,
    /// Elements from one vector of a row of B to the next: `LANES` for a contiguous row; any
    /// other value means B is stored in panels one vector wide (each `k × LANES`, row stride
    /// `ldb`) this far apart, which the GEMM takes one panel per pass.
    pub b_vs: usize,
    pub c: *mut f32,
    pub ldc: usize,
    /// Add to C instead of overwriting it.
    pub accumulate: bool,
    /// Unless null: a row of `n` values (column `j` at `bias + j`) that every row of C starts
    /// from instead of 0, when not accumulating.
    pub bias: *const f32,
    /// Unless null (when not accumulating): a factor per row of C, `join + i` for row `i`.
    /// The product is summed from zero (or from `bias`) and then joined to C, one fused
    /// multiply-add per element: `C[i][j] ← join[i]·C[i][j] + (A·B)[i][j]` (with a factor of 1,
    /// the product rounded once and added). The bits of computing A·B apart and adding it after.
    pub join: *const f32,
}

/// `dst[c·ldd + r] = src[r·lds + c]` for `r < rows`, `c < cols`: packs Kᵀ tiles.
#[derive(Clone, Copy)]
pub(crate) struct Transpose {
    pub src: *const f32,
    pub lds: usize,
    pub rows: usize,
    pub cols: usize,
    pub dst: *mut f32,
    pub ldd: usize,
}

#[inline(always)]
pub(super) unsafe fn transpose_generic<S: Simd>(t: &Transpose) {
    let l = S::LANES;
    let (full_r, full_c) = (t.rows / l * l, t.cols / l * l);
    for r in (0..full_r).step_by(l) {
        for c in (0..full_c).step_by(l) {
            S::transpose_block(
                t.src.add(r * t.lds + c),
                t.lds,
                t.dst.add(c * t.ldd + r),
                t.ldd,
            );
        }
    }
    // The ragged edges, element by element.
    for r in 0..t.rows {
        let c0 = if r < full_r { full_c } else { 0 };
        for c in c0..t.cols {
            *t.dst.add(c * t.ldd + r) = *t.src.add(r * t.lds + c);
        }
    }
}

/// How a kernel loads an operand stored as f32 or as f16 (widened exactly).
pub(crate) trait Elem: Copy {
    unsafe fn load<S: Simd>(p: *const Self) -> S::V;
    /// The first `n < LANES` elements, zero-filling the rest, without touching memory past them.
    unsafe fn load_part<S: Simd>(p: *const Self, n: usize) -> S::V;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const f32) -> S::V {
        S::load(p)
    }
    #[inline(always)]
    unsafe fn load_part<S: Simd>(p: *const f32, n: usize) -> S::V {
        S::load_part(p, n)
    }
}

impl Elem for f16 {
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const f16) -> S::V {
        S::load_f16(p)
    }
    #[inline(always)]
    unsafe fn load_part<S: Simd>(p: *const f16, n: usize) -> S::V {
        let mut w = [0.0f32; 16];
        for (t, x) in w.iter_mut().enumerate().take(n) {
            *x = (*p.add(t)).to_f32();
        }
        S::load_part(w.as_ptr(), n)
    }
}

#[inline(always)]
unsafe fn micro<
    S: Simd,
    E: Elem,
    const PF: usize,
    const R: usize,
    const V: usize,
    const TAIL: bool,
>(
    g: &Gemm<E>,
    (i0, j0, b0): (usize, usize, usize),
    tail: usize,
) {
    let l = S::LANES;
    let mut acc = [[S::splat(0.0); V]; R];
    if g.accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            let p = g.c.add((i0 + r) * g.ldc + j0);
            for (v, x) in row.iter_mut().enumerate() {
                *x = if TAIL && v == V - 1 {
                    S::load_part(p.add(v * l), tail)
                } else {
                    S::load(p.add(v * l))
                };
            }
        }
    } else if !g.bias.is_null() {
        let p = g.bias.add(j0);
        let b: [S::V; V] = std::array::from_fn(|v| {
            if TAIL && v == V - 1 {
                S::load_part(p.add(v * l), tail)
            } else {
                S::load(p.add(v * l))
            }
        });
        acc = [b; R];
    }
    let mut a = g.a.add(i0 * g.a_rs);
    let mut b = g.b.add(b0);
    for _ in 0..g.k {
        if PF > 0 {
            for v in 0..V {
                prefetch(b.wrapping_add(PF * g.ldb + v * l), 1);
            }
        }
        let mut bv = [S::splat(0.0); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = if TAIL && v == V - 1 {
                E::load_part::<S>(b.add(v * l), tail)
            } else {
                E::load::<S>(b.add(v * l))
            };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = S::splat(*a.add(r * g.a_rs));
            for (x, &bx) in row.iter_mut().zip(bv.iter()) {
                *x = S::fma(av, bx, *x);
            }
        }
        // Wrapping: after the last step the pointers pass the operands' ends and are never
        // read; `add` there would be undefined behaviour (Miri found it).
        a = a.wrapping_add(g.a_ks);
        b = b.wrapping_add(g.ldb);
    }
    for (r, row) in acc.iter().enumerate() {
        let p = g.c.add((i0 + r) * g.ldc + j0);
        let join = (!g.join.is_null()).then(|| S::splat(*g.join.add(i0 + r)));
        for (v, &x) in row.iter().enumerate() {
            let x = match join {
                Some(a) if TAIL && v == V - 1 => S::fma(S::load_part(p.add(v * l), tail), a, x),
                Some(a) => S::fma(S::load(p.add(v * l)), a, x),
                None => x,
            };
            if TAIL && v == V - 1 {
                S::store_part(p.add(v * l), x, tail)
            } else {
                S::store(p.add(v * l), x)
            }
        }
    }
}

macro_rules! dispatch_micro {
    ($S:ty, $E:ty, $PF:expr, $g:expr, $pos:expr, $r:expr, $v:expr, $tail:expr, [$($R:literal),*], $Vs:tt) => {
        match $r {
            $( $R => dispatch_micro!(@v $S, $E, $PF, $g, $pos, $R, $v, $tail, $Vs), )*
            _ => unreachable!(),
        }
    };
    (@v $S:ty, $E:ty, $PF:expr, $g:expr, $pos:expr, $R:literal, $v:expr, $tail:expr, [$($V:literal),*]) => {
        match ($v, $tail) {
            $( ($V, 0) => micro::<$S, $E, $PF, $R, $V, false>($g, $pos, 0),
               ($V, t) => micro::<$S, $E, $PF, $R, $V, true>($g, $pos, t), )*
            _ => unreachable!(),
        }
    };
}

#[inline(always)]
pub(super) unsafe fn gemm_generic<S: Simd, E: Elem, const PF: usize>(g: &Gemm<E>) {
    if g.m == 0 || g.n == 0 {
        return;
    }
    if g.k == 0 {
        if !g.accumulate {
            for i in 0..g.m {
                std::ptr::write_bytes(g.c.add(i * g.ldc), 0, g.n);
            }
        }
        return;
    }
    let l = S::LANES;
    // B in panels one vector wide: one vector (one panel, contiguous in itself) per pass. A
    // single-vector pass is still bound by its FMAs (one load of B and R broadcasts for R FMAs),
    // and its loop keeps few enough addresses to stay in registers.
    let panels = g.b_vs != l;
    // At most two rows (decoding's P·V): a pass over up to twice as many vectors, so that each
    // row of B (V's rows, streamed from memory once) is read in one pass, not two half-rows in
    // two passes.
    let wide = g.m <= 2 && !panels;
    // At most two vectors of columns (V's panels, small heads): passes of twice the rows, so
    // that 24 accumulators are in flight and each row of B serves 12 rows of A (where there are
    // registers for them: AVX-512's 32, not AVX2's 16).
    let narrow = !panels && !wide && g.n <= 2 * l && g.m > MR && S::NV >= 4;
    let (block, mr) = if panels {
        (l, MR)
    } else if wide {
        (2 * S::NV * l, MR)
    } else if narrow {
        (2 * l, 2 * MR)
    } else {
        (S::NV * l, MR)
    };
    let b0 = |j0: usize| if panels { j0 / l * g.b_vs } else { j0 };
    let mut j0 = 0;
    while j0 < g.n {
        let cols = block.min(g.n - j0);
        let v = cols.div_ceil(l);
        let tail = cols % l;
        // Rows in passes of as equal a size as MR allows (8 rows: 4 + 4, not 6 + 2).
        let passes = g.m.div_ceil(mr);
        let mut i0 = 0;
        for pass in 0..passes {
            let r = (g.m - i0).div_ceil(passes - pass);
            if r > MR {
                dispatch_micro!(
                    S,
                    E,
                    PF,
                    g,
                    (i0, j0, b0(j0)),
                    r,
                    v,
                    tail,
                    [7, 8, 9, 10, 11, 12],
                    [1, 2]
                );
            } else if v > S::NV {
                dispatch_micro!(
                    S,
                    E,
                    PF,
                    g,
                    (i0, j0, b0(j0)),
                    r,
                    v,
                    tail,
                    [1, 2],
                    [3, 4, 5, 6, 7, 8]
                );
            } else {
                dispatch_micro!(
                    S,
                    E,
                    PF,
                    g,
                    (i0, j0, b0(j0)),
                    r,
                    v,
                    tail,
                    [1, 2, 3, 4, 5, 6],
                    [1, 2, 3, 4]
                );
            }
            i0 += r;
        }
        j0 += cols;
    }
}

#[inline(always)]
pub(super) unsafe fn scale_generic<S: Simd>(x: *mut f32, n: usize, a: f32) {
    let l = S::LANES;
    let av = S::splat(a);
    let mut c = 0;
    while c + l <= n {
        S::store(x.add(c), S::mul(S::load(x.add(c)), av));
        c += l;
    }
    if c < n {
        S::store_part(x.add(c), S::mul(S::load_part(x.add(c), n - c), av), n - c);
    }
}

#[inline(always)]
pub(super) unsafe fn scale_add_generic<S: Simd>(x: *mut f32, y: *const f32, n: usize, a: f32) {
    let l = S::LANES;
    let av = S::splat(a);
    let mut c = 0;
    while c + l <= n {
        S::store(x.add(c), S::fma(S::load(x.add(c)), av, S::load(y.add(c))));
        c += l;
    }
    if c < n {
        let t = n - c;
        let v = S::fma(S::load_part(x.add(c), t), av, S::load_part(y.add(c), t));
        S::store_part(x.add(c), v, t);
    }
}

#[inline(always)]
pub(super) unsafe fn widen_generic<S: Simd>(src: *const f16, dst: *mut f32, n: usize) {
    let l = S::LANES;
    let mut c = 0;
    while c + l <= n {
        S::store(dst.add(c), S::load_f16(src.add(c)));
        c += l;
    }
    for t in c..n {
        *dst.add(t) = (*src.add(t)).to_f32();
    }
}
