//! SIMD micro-kernels, chosen at run time: AVX-512, AVX2+FMA, and a scalar path that is always
//! built and tested.
//!
//! Each instruction set implements the small [`Simd`] trait; the kernels (`gemm`, the
//! row reductions and the exponential) are written once, generically, marked `#[inline(always)]`,
//! and instantiated inside a `#[target_feature]` wrapper per instruction set, so the intrinsics
//! are inlined into code compiled for that set. A [`Kernels`] table of those wrappers is picked once
//! per call from what the CPU reports.

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
    /// See [`ClassKeys`].
    pub class_keys: unsafe fn(&ClassKeys),
    /// Lanes per vector: the rows [`ClassKeys`] takes at once.
    pub lanes: usize,
}

/// One online-softmax step over `rows` rows of raw scores whose every element is visible and
/// unmodified: for each row `r` of `s` (`n` columns at stride `lds`),
///
/// ```text
/// m' = max(m[r], scale · max_c s[r][c])
/// s[r][c] ← exp(scale · s[r][c] − m')            // as exp_sum
/// alpha[r] = e^{m[r] − m'}   (1 when m is unchanged or was −∞)
/// l[r] ← l[r] · alpha[r] + Σ_c s[r][c],  m[r] ← m'
/// ```
///
/// a row whose `m'` is −∞ is zeroed and keeps `alpha = 1`. The same arithmetic as `max`
/// followed by `exp_sum`, in one call per tile instead of two per row.
#[derive(Clone, Copy)]
pub(crate) struct OnlineSoftmax {
    pub s: *mut f32,
    pub lds: usize,
    pub rows: usize,
    pub n: usize,
    pub scale: f32,
    pub m: *mut f32,
    pub l: *mut f32,
    pub alpha: *mut f32,
}

#[inline(always)]
unsafe fn softmax_grad_generic<S: Simd>(p: *const f32, ds: *mut f32, n: usize, d: f32, scale: f32) {
    let l = S::LANES;
    let (dv, sv) = (S::splat(-d), S::splat(scale));
    let step = |c: usize, part: Option<usize>| {
        let (pv, x) = match part {
            None => (S::load(p.add(c)), S::load(ds.add(c))),
            Some(t) => (S::load_part(p.add(c), t), S::load_part(ds.add(c), t)),
        };
        let y = S::mul(S::mul(pv, S::add(x, dv)), sv);
        match part {
            None => S::store(ds.add(c), y),
            Some(t) => S::store_part(ds.add(c), y, t),
        }
    };
    let mut c = 0;
    while c + l <= n {
        step(c, None);
        c += l;
    }
    if c < n {
        step(c, Some(n - c));
    }
}

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
unsafe fn dots_generic<S: Simd>(g: &Dots) {
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

/// [`Dots`] over f16 rows of B, four at a time widened into L1 right before their products:
/// the loads of the cache's rows interleave with the arithmetic, as the f32 kernel's do.
#[inline(always)]
unsafe fn dots_f16_generic<S: Simd>(g: &Dots<f16>) {
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

/// Query tiles [`ClassKeys`] takes at once: each load of a key's or value's vector serves this
/// many tiles, and 4 tiles × 4 steps of accumulators (or × 4 vectors of a value row) with the
/// loaded vectors take 24 of AVX-512's 32 registers.
pub(crate) const CLASS_TILES: usize = 4;

/// The keys a strided pattern adds beyond its band, for up to [`CLASS_TILES`] groups of `LANES`
/// consecutive query rows whose positions are `stride` apart: lane `r` of group `u` (its row
/// `r`) sees key `j_t + r` at each step `t ≥ first[u]`, where `j_t = j0 − t·stride`, when
/// that key is at least `key_lo`. A step's keys are `LANES` consecutive keys, one per lane, so
/// its scores are one vector FMA per feature with no reduction, and each group shares the
/// loads of the steps it sees with the others:
///
/// ```text
/// s_u[t][r] = scale · Σ_e qᵀ_u[e][r] · Kᵀ[e][j_t + r]      (−∞ where the lane has no key)
/// m_u[r] = max_t s_u[t][r],  l_u[r] = Σ_t e^{s_u[t][r] − m_u[r]},
/// o_u[r] = Σ_t e^{s_u[t][r] − m_u[r]} · v_{j_t + r}
/// ```
///
/// (`m = −∞`, `l = 0` and `o = 0` for a row that sees no key), joined to the row's attention over
/// its other keys: on entry `m`, `l` and `o` hold that attention's max logit, sum of
/// exponentials and normalised output (−∞, 0 and 0 for none); on return, the same over both key
/// sets. Steps `0..full` have every lane's key (`j_t ≥ key_lo`); step `full`, if any lane's key
/// `j_full + r ≥ key_lo` there, has the lanes from that key on. Lanes at or beyond `rows[u]`
/// are not rows and see nothing.
#[derive(Clone, Copy)]
pub(crate) struct ClassKeys {
    /// Qᵀ of each group: `d` rows of `LANES` floats.
    pub qt: [*const f32; CLASS_TILES],
    pub first: [usize; CLASS_TILES],
    pub rows: [usize; CLASS_TILES],
    pub d: usize,
    /// Kᵀ in panels of `ldk` keys, `tile` floats apart: feature `e` of key `j` at
    /// `kt + (j / ldk)·tile + e·ldk + j % ldk`. A step's `LANES` keys lie in one panel (`j0`,
    /// `stride` and `ldk` are multiples of `LANES`; with `ldk = LANES` they are contiguous).
    pub kt: *const f32,
    pub ldk: usize,
    pub tile: usize,
    /// Row `j` of V (`dv` features) at `v + j·ldv`.
    pub v: *const f32,
    pub ldv: usize,
    pub dv: usize,
    pub j0: i64,
    pub stride: usize,
    pub full: usize,
    pub key_lo: usize,
    pub scale: f32,
    /// Scratch for the scores: group `u`'s step `t` at `s + (u·cap + t)·LANES`, `cap > full`.
    pub s: *mut f32,
    pub cap: usize,
    /// In and out, per group: `m`, `l` (`LANES` each) and `o` (`rows × dv`, row stride `dv`).
    pub m: [*mut f32; CLASS_TILES],
    pub l: [*mut f32; CLASS_TILES],
    pub o: [*mut f32; CLASS_TILES],
}

impl ClassKeys {
    /// Kᵀ of full step `t`'s keys at feature 0.
    #[inline(always)]
    unsafe fn kt_step(&self, t: usize) -> *const f32 {
        let j = (self.j0 - (t * self.stride) as i64) as usize;
        self.kt.add(j / self.ldk * self.tile + j % self.ldk)
    }

    /// Whether lane `r` has a key at the partial step `full` (in any group).
    #[inline(always)]
    fn in_partial(&self, r: usize) -> bool {
        self.j0 - (self.full * self.stride) as i64 + r as i64 >= self.key_lo as i64
    }

    #[inline(always)]
    unsafe fn score(&self, u: usize, t: usize, lanes: usize) -> *mut f32 {
        self.s.add((u * self.cap + t) * lanes)
    }
}

/// Scores of the full steps `t..t + NB` for every group: each feature's loads (one `qᵀ`
/// vector per group, one `Kᵀ` vector per step) feed `CLASS_TILES × NB` independent FMAs.
#[inline(always)]
unsafe fn class_scores<S: Simd, const NB: usize>(c: &ClassKeys, t: usize) {
    const G: usize = CLASS_TILES;
    let l = S::LANES;
    let k: [*const f32; NB] = std::array::from_fn(|u| c.kt_step(t + u));
    let mut acc = [[S::splat(0.0); NB]; G];
    for e in 0..c.d {
        let kv: [S::V; NB] = std::array::from_fn(|u| S::load(k[u].add(e * c.ldk)));
        for (g, row) in acc.iter_mut().enumerate() {
            let q = S::load(c.qt[g].add(e * l));
            for (a, &kx) in row.iter_mut().zip(kv.iter()) {
                *a = S::fma(q, kx, *a);
            }
        }
    }
    let sv = S::splat(c.scale);
    for (g, row) in acc.iter().enumerate() {
        for (u, &a) in row.iter().enumerate() {
            S::store(c.score(g, t + u, l), S::mul(a, sv));
        }
    }
}

/// Lane `r`'s output in every group over columns `e0..e0 + cols` (`V` vectors, the last
/// holding `tail` columns when `TAIL`): each value vector is loaded once for every group.
#[inline(always)]
unsafe fn class_pv<S: Simd, const V: usize, const TAIL: bool>(
    c: &ClassKeys,
    (alpha, inv): (&[[f32; 16]; CLASS_TILES], &[[f32; 16]; CLASS_TILES]),
    r: usize,
    e0: usize,
    tail: usize,
) {
    const G: usize = CLASS_TILES;
    let l = S::LANES;
    let load = |p: *const f32, v: usize| {
        if TAIL && v == V - 1 {
            S::load_part(p.add(v * l), tail)
        } else {
            S::load(p.add(v * l))
        }
    };
    let row = |t: usize| {
        let j = c.j0 - (t * c.stride) as i64 + r as i64;
        c.v.add(j as usize * c.ldv + e0)
    };
    let steps = c.full + c.in_partial(r) as usize;
    let mut acc = [[S::splat(0.0); V]; G];
    for t in 0..steps {
        let x = row(t);
        // The next lane's row of this step: steps lie a stride of rows apart, across pages
        // the hardware prefetcher does not follow, while lanes are neighbouring rows.
        prefetch(x.wrapping_add(c.ldv), V * l * 4);
        let xv: [S::V; V] = std::array::from_fn(|v| load(x, v));
        for (g, a) in acc.iter_mut().enumerate() {
            let p = S::splat(*c.score(g, t, l).add(r));
            for (y, &xx) in a.iter_mut().zip(xv.iter()) {
                *y = S::fma(p, xx, *y);
            }
        }
    }
    for (g, a) in acc.iter().enumerate() {
        if r >= c.rows[g] {
            continue;
        }
        // o ← (α·o + Σ_t p_t·v_t) / ℓ'.
        let o = c.o[g].add(r * c.dv + e0);
        let (w, iv) = (S::splat(alpha[g][r]), S::splat(inv[g][r]));
        for (v, &x) in a.iter().enumerate() {
            if TAIL && v == V - 1 {
                let y = S::mul(S::fma(w, load(o, v), x), iv);
                S::store_part(o.add(v * l), y, tail)
            } else {
                S::store(o.add(v * l), S::mul(S::fma(w, load(o, v), x), iv))
            }
        }
    }
}

#[inline(always)]
unsafe fn class_keys_generic<S: Simd>(c: &ClassKeys) {
    const NB: usize = 4;
    let l = S::LANES;
    // Per group and lane: the weight of the other keys' output, and 1 / the new sum.
    let mut alpha = [[0.0f32; 16]; CLASS_TILES];
    let mut inv = [[0.0f32; 16]; CLASS_TILES];
    let mut t = 0;
    while t + NB <= c.full {
        class_scores::<S, NB>(c, t);
        t += NB;
    }
    while t < c.full {
        class_scores::<S, 1>(c, t);
        t += 1;
    }
    // The partial step, lane by lane.
    let jp = c.j0 - (c.full * c.stride) as i64;
    let partial = (0..l).any(|r| c.in_partial(r));
    let steps = c.full + partial as usize;
    for g in 0..CLASS_TILES {
        if partial {
            for r in 0..l {
                let mut x = f32::NEG_INFINITY;
                if c.in_partial(r) && r < c.rows[g] {
                    let j = (jp + r as i64) as usize;
                    let k = c.kt.add(j / c.ldk * c.tile + j % c.ldk);
                    let dot = (0..c.d).fold(0.0f32, |acc, e| {
                        (*c.qt[g].add(e * l + r)).mul_add(*k.add(e * c.ldk), acc)
                    });
                    x = c.scale * dot;
                }
                *c.score(g, c.full, l).add(r) = x;
            }
        }
        // Steps before the group's first, and lanes that are not rows, see nothing.
        for t in 0..c.first[g].min(steps) {
            S::store(c.score(g, t, l), S::splat(f32::NEG_INFINITY));
        }
        if c.rows[g] < l {
            for t in 0..steps {
                for r in c.rows[g]..l {
                    *c.score(g, t, l).add(r) = f32::NEG_INFINITY;
                }
            }
        }
        // The rows' max over their other keys and these.
        let m_band = S::load(c.m[g]);
        let mut mx = m_band;
        for t in 0..steps {
            mx = S::max(mx, S::load(c.score(g, t, l)));
        }
        S::store(c.m[g], mx);
        // A lane with no key subtracts 0 instead of −∞: its weights e^{−∞} are 0.
        let mut neg = [0.0f32; 16];
        for (r, x) in neg.iter_mut().enumerate().take(l) {
            let m = *c.m[g].add(r);
            *x = if m == f32::NEG_INFINITY { 0.0 } else { -m };
        }
        let nv = S::load(neg.as_ptr());
        let mut sum = S::splat(0.0);
        for t in 0..steps {
            let p = S::exp(S::add(S::load(c.score(g, t, l)), nv));
            S::store(c.score(g, t, l), p);
            sum = S::add(sum, p);
        }
        // The other keys' share, ℓ·e^{m − m'} (0 for a row that saw none), and the new sum.
        let a = S::mul(S::load(c.l[g]), S::exp(S::add(m_band, nv)));
        let total = S::add(a, sum);
        S::store(alpha[g].as_mut_ptr(), a);
        S::store(c.l[g], total);
        for (r, x) in inv[g].iter_mut().enumerate().take(l) {
            let t = *c.l[g].add(r);
            *x = if t > 0.0 { 1.0 / t } else { 0.0 };
        }
    }
    let block = S::NV * l;
    let rows = c.rows.iter().copied().max().unwrap_or(0);
    for r in 0..rows {
        let mut e0 = 0;
        while e0 < c.dv {
            let cols = block.min(c.dv - e0);
            match (cols.div_ceil(l), cols % l) {
                (4, 0) => class_pv::<S, 4, false>(c, (&alpha, &inv), r, e0, 0),
                (4, t) => class_pv::<S, 4, true>(c, (&alpha, &inv), r, e0, t),
                (3, 0) => class_pv::<S, 3, false>(c, (&alpha, &inv), r, e0, 0),
                (3, t) => class_pv::<S, 3, true>(c, (&alpha, &inv), r, e0, t),
                (2, 0) => class_pv::<S, 2, false>(c, (&alpha, &inv), r, e0, 0),
                (2, t) => class_pv::<S, 2, true>(c, (&alpha, &inv), r, e0, t),
                (_, 0) => class_pv::<S, 1, false>(c, (&alpha, &inv), r, e0, 0),
                (_, t) => class_pv::<S, 1, true>(c, (&alpha, &inv), r, e0, t),
            }
            e0 += cols;
        }
    }
}

/// Rows per group of [`OnlineSoftmax`]: the horizontal max and sum of a row are chains of
/// dependent shuffles, and the row's exponentials wait on its max; four rows in flight give the
/// out-of-order core independent work to overlap them with.
const SOFTMAX_ROWS: usize = 4;
/// Rows of [`OnlineSoftmax`] whose maxima are found before any of their exponentials.
const SOFTMAX_BLOCK: usize = 16;

#[inline(always)]
unsafe fn online_softmax_generic<S: Simd>(t: &OnlineSoftmax) {
    const G: usize = SOFTMAX_ROWS;
    let l = S::LANES;
    let full = t.n / l * l;
    let mut b0 = 0;
    while b0 + G <= t.rows {
        // The maxima of a block of groups first, then their exponentials: each group's
        // exponentials wait on its max (a chain of dependent shuffles), which the previous
        // group's exponentials would otherwise have to hide.
        let groups = ((t.rows - b0) / G).min(SOFTMAX_BLOCK / G);
        let mut m_new = [0.0f32; SOFTMAX_BLOCK];
        for g0 in (0..groups * G).step_by(G) {
            let x: [*const f32; G] =
                std::array::from_fn(|g| t.s.add((b0 + g0 + g) * t.lds).cast_const());
            let mut mx = [S::splat(f32::NEG_INFINITY); G];
            for c in (0..full).step_by(l) {
                for g in 0..G {
                    mx[g] = S::max(mx[g], S::load(x[g].add(c)));
                }
            }
            for g in 0..G {
                let mut m = S::reduce_max(mx[g]);
                for c in full..t.n {
                    m = m.max(*x[g].add(c));
                }
                m_new[g0 + g] = (*t.m.add(b0 + g0 + g)).max(t.scale * m);
            }
        }
        for g0 in (0..groups * G).step_by(G) {
            let r0 = b0 + g0;
            let m_new: [f32; G] = std::array::from_fn(|g| m_new[g0 + g]);
            if m_new.contains(&f32::NEG_INFINITY) {
                // A row of −∞ scores: rare, row by row.
                online_softmax_rows::<S>(t, r0, r0 + G);
                continue;
            }
            let x: [*mut f32; G] = std::array::from_fn(|g| t.s.add((r0 + g) * t.lds));
            let sv = S::splat(t.scale);
            let mv: [S::V; G] = std::array::from_fn(|g| S::splat(-m_new[g]));
            let mut sum = [S::splat(0.0); G];
            for c in (0..full).step_by(l) {
                let a: [S::V; G] =
                    std::array::from_fn(|g| S::add(S::mul(S::load(x[g].add(c)), sv), mv[g]));
                let e = S::exp4(a);
                for g in 0..G {
                    S::store(x[g].add(c), e[g]);
                    sum[g] = S::add(sum[g], e[g]);
                }
            }
            for g in 0..G {
                let mut s = S::reduce_add(sum[g]);
                if full < t.n {
                    // As exp_sum: the tail's lanes are added one by one after the reduction.
                    let tail = t.n - full;
                    let e = S::exp(S::add(
                        S::mul(S::load_part(x[g].add(full), tail), sv),
                        mv[g],
                    ));
                    S::store_part(x[g].add(full), e, tail);
                    for c in full..t.n {
                        s += *x[g].add(c);
                    }
                }
                finish_row(t, r0 + g, m_new[g], s);
            }
        }
        b0 += groups * G;
    }
    online_softmax_rows::<S>(t, b0, t.rows);
}

/// Rows `r0..r1` of an [`OnlineSoftmax`] one at a time: `max` and `exp_sum` per row.
#[inline(always)]
unsafe fn online_softmax_rows<S: Simd>(t: &OnlineSoftmax, r0: usize, r1: usize) {
    for r in r0..r1 {
        let x = t.s.add(r * t.lds);
        let mut m_new = (*t.m.add(r)).max(t.scale * max_generic::<S>(x, t.n));
        if m_new == f32::NEG_INFINITY && (0..t.n).any(|c| (*x.add(c)).is_nan()) {
            // NaN scores and no finite one (`max` passes over NaN): the row is NaN, not empty.
            m_new = f32::NAN;
        }
        if m_new == f32::NEG_INFINITY {
            *t.alpha.add(r) = 1.0;
            std::ptr::write_bytes(x, 0, t.n);
            continue;
        }
        finish_row(t, r, m_new, exp_sum_generic::<S>(x, t.n, t.scale, m_new));
    }
}

/// Row `r`'s statistics after its exponentials summed to `sum` relative to the new max `m_new`.
#[inline(always)]
unsafe fn finish_row(t: &OnlineSoftmax, r: usize, m_new: f32, sum: f32) {
    let m_old = *t.m.add(r);
    let mut alpha = 1.0;
    if m_old != m_new && m_old != f32::NEG_INFINITY {
        alpha = (m_old - m_new).exp();
        *t.l.add(r) *= alpha;
    }
    *t.alpha.add(r) = alpha;
    *t.l.add(r) += sum;
    *t.m.add(r) = m_new;
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
unsafe fn transpose_generic<S: Simd>(t: &Transpose) {
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
        for (v, &x) in row.iter().enumerate() {
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
unsafe fn gemm_generic<S: Simd, E: Elem, const PF: usize>(g: &Gemm<E>) {
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
unsafe fn max_generic<S: Simd>(x: *const f32, n: usize) -> f32 {
    let l = S::LANES;
    let mut acc = S::splat(f32::NEG_INFINITY);
    let mut c = 0;
    while c + l <= n {
        acc = S::max(acc, S::load(x.add(c)));
        c += l;
    }
    let mut m = S::reduce_max(acc);
    while c < n {
        m = m.max(*x.add(c));
        c += 1;
    }
    m
}

#[inline(always)]
unsafe fn exp_sum_generic<S: Simd>(x: *mut f32, n: usize, scale: f32, m: f32) -> f32 {
    let l = S::LANES;
    let (sv, mv) = (S::splat(scale), S::splat(-m));
    let mut sum = S::splat(0.0);
    let mut c = 0;
    while c + l <= n {
        let e = S::exp(S::add(S::mul(S::load(x.add(c)), sv), mv));
        S::store(x.add(c), e);
        sum = S::add(sum, e);
        c += l;
    }
    if c < n {
        let t = n - c;
        // Lanes past the row are loaded as 0 and would give exp(−m): keep them out of the sum.
        let e = S::exp(S::add(S::mul(S::load_part(x.add(c), t), sv), mv));
        S::store_part(x.add(c), e, t);
        let mut s = S::reduce_add(sum);
        for q in 0..t {
            s += *x.add(c + q);
        }
        return s;
    }
    S::reduce_add(sum)
}

#[inline(always)]
unsafe fn scale_generic<S: Simd>(x: *mut f32, n: usize, a: f32) {
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
unsafe fn scale_add_generic<S: Simd>(x: *mut f32, y: *const f32, n: usize, a: f32) {
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
unsafe fn widen_generic<S: Simd>(src: *const f16, dst: *mut f32, n: usize) {
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
            widen: wrappers::widen,
            class_keys: wrappers::class_keys,
            lanes: <$S>::LANES,
        };
    };
}

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

#[cfg(target_arch = "x86_64")]
mod x86 {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(isa: Isa) -> &'static Kernels {
        isa.kernels().unwrap()
    }

    #[test]
    fn widen_is_exact_for_every_f16() {
        // Every bit pattern (normals, subnormals, ±0, ±∞, NaNs), at an odd length so the tail
        // runs too.
        let src: Vec<f16> = (0..=u16::MAX)
            .map(f16::from_bits)
            .chain([f16::ONE])
            .collect();
        for isa in Isa::all_available() {
            let mut dst = vec![0.0f32; src.len()];
            unsafe { (table(isa).widen)(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
            for (x, y) in src.iter().zip(&dst) {
                let want = x.to_f32();
                assert!(
                    y.to_bits() == want.to_bits() || (want.is_nan() && y.is_nan()),
                    "{isa:?}: {x:?} widened to {y}"
                );
            }
        }
    }

    #[test]
    fn exp_within_one_ulp() {
        for isa in Isa::all_available() {
            let k = table(isa);
            let xs: Vec<f32> = (-2000..=800).map(|t| t as f32 * 0.1 + 0.013).collect();
            let mut y = xs.clone();
            unsafe { (k.exp_sum)(y.as_mut_ptr(), y.len(), 1.0, 0.0) };
            for (&x, &e) in xs.iter().zip(&y) {
                let want = (x as f64).exp();
                if x < -87.34 {
                    assert_eq!(e, 0.0, "{isa:?} exp({x})");
                } else if want > 1.2e-38 {
                    let rel = ((e as f64 - want) / want).abs();
                    assert!(rel < 1.3e-7, "{isa:?} exp({x}) = {e}, want {want}");
                }
            }
            let mut inf = [f32::NEG_INFINITY; 19];
            let s = unsafe { (k.exp_sum)(inf.as_mut_ptr(), 19, 1.0, 0.0) };
            assert_eq!(s, 0.0);
            assert!(inf.iter().all(|&x| x == 0.0));
        }
    }

    /// The roofline of the forward on this core, measured: the fastest instruction set's GEMM on
    /// the forward's two shapes (QKᵀ of a 64-row tile against a 64-key tile, P·V of 64 rows over
    /// 256 keys) and its online softmax over a 64 × 256 tile, each with its operands already in
    /// the core's caches, then the bound they set on one (query, key) pair. A benchmark, not a
    /// check: `cargo test --release -p attentive --lib roofline -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn roofline() {
        use crate::workspace::AVec;
        let k = table(Isa::best());
        let best = |f: &mut dyn FnMut(), reps: usize| {
            (0..9)
                .map(|_| {
                    let t = std::time::Instant::now();
                    (0..reps).for_each(|_| f());
                    t.elapsed().as_secs_f64() / reps as f64
                })
                .fold(f64::MAX, f64::min)
        };
        println!(
            "instruction set {:?}, one thread, operands in cache",
            Isa::best()
        );
        for d in [64usize, 128] {
            let (q, kt, v) = (
                AVec::filled(64 * d, 0.01),
                AVec::filled(d * 64, 0.02),
                AVec::filled(256 * d, 0.03),
            );
            let (mut s, mut o) = (AVec::filled(64 * 256, 0.0), AVec::filled(64 * d, 0.0));
            let gemm = |m, n, kk, a: &AVec, a_rs, b: &AVec, ldb, c: &mut AVec, ldc| Gemm {
                m,
                n,
                k: kk,
                a: a.as_ptr(),
                a_rs,
                a_ks: 1,
                b: b.as_ptr(),
                ldb,
                b_vs: k.lanes,
                c: c.as_mut_ptr(),
                ldc,
                accumulate: false,
                bias: std::ptr::null(),
            };
            let qk = gemm(64, 64, d, &q, d, &kt, 64, &mut s, 256);
            let pv = gemm(64, d, 256, &s, 256, &v, d, &mut o, d);
            // SAFETY: every operand above holds the rows and columns its GEMM reads or writes.
            let t_qk = best(&mut || unsafe { (k.gemm)(&qk) }, 200);
            let t_pv = best(&mut || unsafe { (k.gemm)(&pv) }, 50);
            let (mut m, mut l, mut alpha) = (vec![0.0f32; 64], vec![0.0f32; 64], vec![0.0f32; 64]);
            let mut p = AVec::filled(64 * 256, 0.0);
            let t_sm = best(
                &mut || {
                    p.iter_mut()
                        .enumerate()
                        .for_each(|(i, x)| *x = (i % 97) as f32 * 0.01);
                    m.fill(f32::NEG_INFINITY);
                    l.fill(0.0);
                    // SAFETY: p holds 64 rows of 256 scores; m, l and alpha 64 rows.
                    unsafe {
                        (k.online_softmax)(&OnlineSoftmax {
                            s: p.as_mut_ptr(),
                            lds: 256,
                            rows: 64,
                            n: 256,
                            scale: 0.125,
                            m: m.as_mut_ptr(),
                            l: l.as_mut_ptr(),
                            alpha: alpha.as_mut_ptr(),
                        })
                    }
                },
                50,
            );
            let t_fill = best(
                &mut || {
                    p.iter_mut()
                        .enumerate()
                        .for_each(|(i, x)| *x = (i % 97) as f32 * 0.01)
                },
                50,
            );
            let gf = |flops: f64, t: f64| flops / t / 1e9;
            let pairs_qk = 64.0 * 64.0;
            let pairs = 64.0 * 256.0;
            let per_pair = t_qk / pairs_qk + t_pv / pairs + (t_sm - t_fill).max(0.0) / pairs;
            println!(
                "D = {d}: QKᵀ {:.1} GFLOP/s, P·V {:.1} GFLOP/s, softmax {:.2} ns per score; \
                 bound {:.1} GFLOP/s per core (softmax {:.0}% of a pair's time)",
                gf(2.0 * pairs_qk * d as f64, t_qk),
                gf(2.0 * pairs * d as f64, t_pv),
                1e9 * (t_sm - t_fill).max(0.0) / pairs,
                gf(4.0 * d as f64, per_pair),
                100.0 * (t_sm - t_fill).max(0.0) / pairs / per_pair,
            );
        }
    }

    #[test]
    fn online_softmax_equals_max_then_exp_sum_and_the_scalar_path() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0
        };
        for &(rows, n) in &[
            (1, 1),
            (4, 64),
            (7, 17),
            (9, 16),
            (13, 64),
            (5, 3),
            (39, 35),
        ] {
            let lds = n + 2;
            let mut s0: Vec<f32> = (0..rows * lds).map(|_| rnd()).collect();
            // A row of −∞ scores (fully masked) inside a group of four.
            s0[2 % rows * lds..2 % rows * lds + n].fill(f32::NEG_INFINITY);
            let m0: Vec<f32> = (0..rows)
                .map(|r| if r % 3 == 0 { f32::NEG_INFINITY } else { rnd() })
                .collect();
            let l0: Vec<f32> = m0
                .iter()
                .map(|&m| if m.is_finite() { 2.5 } else { 0.0 })
                .collect();
            let mut outs = Vec::new();
            for isa in Isa::all_available() {
                let k = table(isa);
                let (mut s, mut m, mut l, mut alpha) =
                    (s0.clone(), m0.clone(), l0.clone(), vec![0.0; rows]);
                let t = OnlineSoftmax {
                    s: s.as_mut_ptr(),
                    lds,
                    rows,
                    n,
                    scale: 0.3,
                    m: m.as_mut_ptr(),
                    l: l.as_mut_ptr(),
                    alpha: alpha.as_mut_ptr(),
                };
                // SAFETY: s holds rows×lds elements; m, l and alpha hold rows.
                unsafe { (k.online_softmax)(&t) };
                for r in 0..rows {
                    // The same step through the per-row kernels.
                    let mut x = s0[r * lds..r * lds + n].to_vec();
                    let m_new = m0[r].max(0.3 * unsafe { (k.max)(x.as_ptr(), n) });
                    let (mut want_l, mut want_a) = (l0[r], 1.0);
                    if m_new == f32::NEG_INFINITY {
                        x.fill(0.0);
                    } else {
                        let sum = unsafe { (k.exp_sum)(x.as_mut_ptr(), n, 0.3, m_new) };
                        if m0[r] != m_new && m0[r] != f32::NEG_INFINITY {
                            want_a = (m0[r] - m_new).exp();
                            want_l *= want_a;
                        }
                        want_l += sum;
                    }
                    let want_m = if m_new == f32::NEG_INFINITY {
                        m0[r]
                    } else {
                        m_new
                    };
                    assert_eq!(
                        &s[r * lds..r * lds + n],
                        &x[..],
                        "{isa:?} {rows}x{n} row {r}"
                    );
                    assert_eq!(
                        (m[r], l[r], alpha[r]),
                        (want_m, want_l, want_a),
                        "{isa:?} row {r}"
                    );
                    assert!(s[r * lds + n..(r + 1) * lds]
                        .iter()
                        .zip(&s0[r * lds + n..(r + 1) * lds])
                        .all(|(a, b)| a == b));
                }
                outs.push((isa, s, l));
            }
            let (_, s_ref, l_ref) = outs.last().unwrap();
            for (isa, s, l) in &outs {
                for (a, b) in s.iter().zip(s_ref).chain(l.iter().zip(l_ref)) {
                    assert!(
                        (a - b).abs() <= 4e-7 * b.abs().max(1.0),
                        "{isa:?}: {a} vs scalar {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_grad_matches_the_scalar_formula() {
        for isa in Isa::all_available() {
            let k = table(isa);
            for n in [1, 15, 16, 17, 64] {
                let p: Vec<f32> = (0..n).map(|c| (c as f32 * 0.37).sin().abs()).collect();
                let dp: Vec<f32> = (0..n + 1).map(|c| (c as f32 * 1.3).cos()).collect();
                let mut ds = dp.clone();
                // SAFETY: p holds n elements and ds n + 1.
                unsafe { (k.softmax_grad)(p.as_ptr(), ds.as_mut_ptr(), n, 0.25, 0.125) };
                for c in 0..n {
                    assert_eq!(ds[c], p[c] * (dp[c] - 0.25) * 0.125, "{isa:?} n={n} c={c}");
                }
                assert_eq!(ds[n], dp[n], "{isa:?} wrote past n");
            }
        }
    }

    #[test]
    fn dots_are_the_f64_sum_rounded_once() {
        for isa in Isa::all_available() {
            let kern = table(isa);
            for &(m, n, k) in &[(1, 1, 1), (1, 64, 128), (3, 17, 37), (16, 5, 16), (2, 9, 7)] {
                let a: Vec<f32> = (0..m * (k + 2))
                    .map(|x| (x as f32 * 0.71).sin() * 3.0)
                    .collect();
                let b: Vec<f32> = (0..n * (k + 1)).map(|x| (x as f32 * 1.37).cos()).collect();
                let mut c = vec![f32::NAN; m * (n + 1)];
                let g = Dots {
                    m,
                    n,
                    k,
                    a: a.as_ptr(),
                    lda: k + 2,
                    b: b.as_ptr(),
                    ldb: k + 1,
                    c: c.as_mut_ptr(),
                    ldc: n + 1,
                };
                // SAFETY: a holds m rows of k + 2, b n rows of k + 1, c m rows of n + 1.
                unsafe { (kern.dots)(&g) };
                for r in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|t| a[r * (k + 2) + t] as f64 * b[j * (k + 1) + t] as f64)
                            .sum();
                        let got = c[r * (n + 1) + j];
                        // Rounded once from a sum whose own error is far below an f32 ulp.
                        let ulp = (exact as f32).abs().max(f32::MIN_POSITIVE) * f32::EPSILON;
                        assert!(
                            (got as f64 - exact).abs() <= ulp as f64,
                            "{isa:?} {m}x{n}x{k} ({r}, {j}): {got} vs {exact}"
                        );
                    }
                    assert!(c[r * (n + 1) + n].is_nan(), "{isa:?} wrote past n");
                }
            }
        }
    }

    #[test]
    fn scale_add_is_one_fused_multiply_add_per_element() {
        for isa in Isa::all_available() {
            let k = table(isa);
            for n in [1, 15, 16, 17, 64, 130] {
                let x0: Vec<f32> = (0..n + 1).map(|c| (c as f32 * 0.37).sin()).collect();
                let y: Vec<f32> = (0..n).map(|c| (c as f32 * 1.3).cos()).collect();
                let mut x = x0.clone();
                // SAFETY: x holds n + 1 elements and y n.
                unsafe { (k.scale_add)(x.as_mut_ptr(), y.as_ptr(), n, 0.7) };
                for c in 0..n {
                    assert_eq!(x[c], x0[c].mul_add(0.7, y[c]), "{isa:?} n={n} c={c}");
                }
                assert_eq!(x[n], x0[n], "{isa:?} wrote past n");
            }
        }
    }

    #[test]
    fn transpose_matches_the_scalar_path() {
        for isa in Isa::all_available() {
            let k = table(isa);
            for &(rows, cols) in &[(1, 1), (16, 16), (64, 64), (17, 33), (40, 8), (5, 70)] {
                let (lds, ldd) = (cols + 3, rows + 5);
                let src: Vec<f32> = (0..rows * lds).map(|x| x as f32).collect();
                let mut dst = vec![-1.0f32; cols * ldd];
                let t = Transpose {
                    src: src.as_ptr(),
                    lds,
                    rows,
                    cols,
                    dst: dst.as_mut_ptr(),
                    ldd,
                };
                // SAFETY: src holds rows×lds and dst cols×ldd elements.
                unsafe { (k.transpose)(&t) };
                for c in 0..cols {
                    for r in 0..ldd {
                        let want = if r < rows { src[r * lds + c] } else { -1.0 };
                        assert_eq!(
                            dst[c * ldd + r],
                            want,
                            "{isa:?} {rows}x{cols} at ({r}, {c})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_matches_naive_on_awkward_sizes() {
        let mut seed = 1u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for isa in Isa::all_available() {
            let k = table(isa);
            for &(m, n, kk) in &[
                (1, 1, 1),
                (7, 33, 5),
                (13, 64, 64),
                (6, 17, 3),
                (64, 80, 40),
                // One or two rows take passes twice as wide (tails included).
                (1, 128, 33),
                (2, 150, 9),
                (1, 37, 4),
                // At most two vectors of columns take passes of up to twelve rows.
                (30, 32, 17),
                (64, 20, 300),
                (7, 9, 3),
            ] {
                for &(trans, acc) in &[(false, false), (true, true)] {
                    let a: Vec<f32> = (0..m * kk).map(|_| rnd()).collect();
                    let b: Vec<f32> = (0..kk * (n + 3)).map(|_| rnd()).collect();
                    let c0: Vec<f32> = (0..m * (n + 1)).map(|_| rnd()).collect();
                    let mut c = c0.clone();
                    let (a_rs, a_ks) = if trans { (1, m) } else { (kk, 1) };
                    let g = Gemm {
                        m,
                        n,
                        k: kk,
                        a: a.as_ptr(),
                        a_rs,
                        a_ks,
                        b: b.as_ptr(),
                        ldb: n + 3,
                        b_vs: k.lanes,
                        c: c.as_mut_ptr(),
                        ldc: n + 1,
                        accumulate: acc,
                        bias: std::ptr::null(),
                    };
                    unsafe { (k.gemm)(&g) };
                    // B in panels one vector wide (each kk × lanes, row stride lanes, zero
                    // past n): the same products in the same order, so the same bits.
                    let l = k.lanes;
                    let panels = n.div_ceil(l);
                    let mut bp = vec![0.0f32; panels * kk * l];
                    for p in 0..kk {
                        for j in 0..n {
                            bp[(j / l) * kk * l + p * l + j % l] = b[p * (n + 3) + j];
                        }
                    }
                    let mut cp = c0.clone();
                    let gp = Gemm {
                        b: bp.as_ptr(),
                        ldb: l,
                        b_vs: kk * l,
                        c: cp.as_mut_ptr(),
                        ..g
                    };
                    unsafe { (k.gemm)(&gp) };
                    assert_eq!(cp, c, "{isa:?} {m}x{n}x{kk} in panels");
                    for i in 0..m {
                        for j in 0..n + 1 {
                            let got = c[i * (n + 1) + j];
                            if j == n {
                                assert_eq!(got, c0[i * (n + 1) + j], "column past n was written");
                                continue;
                            }
                            let mut want = if acc { c0[i * (n + 1) + j] as f64 } else { 0.0 };
                            for p in 0..kk {
                                want += a[i * a_rs + p * a_ks] as f64 * b[p * (n + 3) + j] as f64;
                            }
                            assert!((got as f64 - want).abs() < 1e-5, "{isa:?} {m}x{n}x{kk}");
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 tables for each vendor differ only in prefetch hints, which read nothing:
    /// their GEMMs give the same bits (f32 and f16 B, rows and columns not whole blocks).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_avx512_tables_give_the_same_bits() {
        if !Isa::Avx512.available() {
            return;
        }
        let (amd, intel) = (&x86::AVX512, &x86::AVX512_XEON);
        for &(m, n, kk) in &[(1, 1, 1), (7, 33, 5), (64, 64, 64), (13, 80, 300)] {
            let a: Vec<f32> = (0..m * kk).map(|x| (x as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..kk * n).map(|x| (x as f32 * 0.91).cos()).collect();
            let b16: Vec<f16> = b.iter().map(|&x| f16::from_f32(x)).collect();
            let run = |t: &Kernels, half: bool| {
                let mut c = vec![0.5f32; m * n];
                fn g<E>(
                    (m, n, k): (usize, usize, usize),
                    a: &[f32],
                    b: &[E],
                    c: &mut [f32],
                    lanes: usize,
                ) -> Gemm<E> {
                    Gemm {
                        m,
                        n,
                        k,
                        a: a.as_ptr(),
                        a_rs: k,
                        a_ks: 1,
                        b: b.as_ptr(),
                        ldb: n,
                        b_vs: lanes,
                        c: c.as_mut_ptr(),
                        ldc: n,
                        accumulate: true,
                        bias: std::ptr::null(),
                    }
                }
                // SAFETY: a is m × kk, b and b16 kk × n, c m × n, all row-major.
                unsafe {
                    if half {
                        (t.gemm_f16)(&g((m, n, kk), &a, &b16, &mut c, t.lanes))
                    } else {
                        (t.gemm)(&g((m, n, kk), &a, &b, &mut c, t.lanes))
                    }
                };
                c
            };
            for half in [false, true] {
                assert_eq!(
                    run(amd, half),
                    run(intel, half),
                    "{m}x{n}x{kk}, f16 B: {half}"
                );
            }
        }
    }

    /// f16 operands widened as they are loaded give the same bits as the f32 kernels on the
    /// widened values: the GEMM's B (tails included) and the dot products' rows.
    #[test]
    fn f16_operands_equal_the_f32_kernels_on_widened_values() {
        let half = |n: usize, seed: u32| -> Vec<f16> {
            (0..n)
                .map(|i| {
                    f16::from_f32(
                        ((((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 - 1000.0)
                            / 317.0,
                    )
                })
                .collect()
        };
        let wide = |x: &[f16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
        for isa in Isa::all_available() {
            let k = table(isa);
            for &(m, n, kk) in &[
                (1, 1, 1),
                (1, 128, 700),
                (1, 33, 128),
                (7, 33, 5),
                (6, 64, 64),
                (16, 80, 143),
                (30, 20, 17),
            ] {
                let a: Vec<f32> = wide(&half(m * kk, 7));
                let b16 = half(kk * (n + 3), 11);
                let b32 = wide(&b16);
                let mut c16 = vec![0.5f32; m * n];
                let mut c32 = c16.clone();
                fn gemm<E>(
                    a: &[f32],
                    b: *const E,
                    c: &mut [f32],
                    (m, n, kk, lanes): (usize, usize, usize, usize),
                ) -> Gemm<E> {
                    Gemm {
                        m,
                        n,
                        k: kk,
                        a: a.as_ptr(),
                        a_rs: kk,
                        a_ks: 1,
                        b,
                        ldb: n + 3,
                        b_vs: lanes,
                        c: c.as_mut_ptr(),
                        ldc: n,
                        accumulate: true,
                        bias: std::ptr::null(),
                    }
                }
                let dims = (m, n, kk, k.lanes);
                unsafe { (k.gemm)(&gemm(&a, b32.as_ptr(), &mut c32, dims)) };
                unsafe { (k.gemm_f16)(&gemm(&a, b16.as_ptr(), &mut c16, dims)) };
                assert_eq!(c16, c32, "{isa:?} gemm {m}x{n}x{kk}");
                fn dots<E>(
                    a: &[f32],
                    b: *const E,
                    c: &mut [f32],
                    (m, n, kk): (usize, usize, usize),
                ) -> Dots<E> {
                    Dots {
                        m,
                        n,
                        k: kk,
                        a: a.as_ptr(),
                        lda: kk,
                        b,
                        ldb: kk,
                        c: c.as_mut_ptr(),
                        ldc: n,
                    }
                }
                let (mut d16, mut d32) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
                let (r16, r32) = (half(n * kk, 13), wide(&half(n * kk, 13)));
                unsafe { (k.dots)(&dots(&a, r32.as_ptr(), &mut d32, (m, n, kk))) };
                unsafe { (k.dots_f16)(&dots(&a, r16.as_ptr(), &mut d16, (m, n, kk))) };
                assert_eq!(d16, d32, "{isa:?} dots {m}x{n}x{kk}");
            }
        }
    }
}
