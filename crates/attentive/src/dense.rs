//! Dense matrix products for the layers around attention (the projections and feed-forward
//! layers of a Transformer), on the same micro-kernel as the attention kernels.
//!
//! $$C = A B + \mathbf{1} b^\top,$$
//! with $A$ `m × k`, $B$ `k × n` and $C$ `m × n`, all row-major, and an optional bias row $b$
//! (`n`) added to every row. B is first copied into panels of [`PW`] columns, each contiguous
//! (`k × PW`; a layer's weights are kept so, as [`Packed`]); the work is then split into blocks
//! of [`MB`] rows, one task each, and within a block every panel is applied in chunks of [`KC`]
//! rows, so that the chunk the micro-kernel streams once per 6 rows of A sits in L1. The module
//! also holds the elementwise steps around those products: [`gelu_erf`] and
//! [`add_layer_norm`].
//!
//! Why the copy: read in place, consecutive rows of B are `n` floats apart, and for the widths
//! of a Transformer (384, 768, 1536 …) that stride is a multiple of 512 bytes, so the rows of a
//! chunk fall on a few L1 sets and evict one another; measured on the Intel Xeon of
//! BENCHMARKS.md, 4096 × 384 × 1536 on 2 threads went from 210 to 262 GFLOP/s.

use crate::error::{AttnError, Result};
use crate::simd::{Gemm, Isa};
use rayon::prelude::*;

/// Rows per task: 16 passes of the 6-row micro-kernel; 96 rows × [`KC`] of A is 48 KiB, read
/// from L2 once per panel.
pub const MB: usize = 96;
/// Columns of a panel of B: four vectors of AVX-512 (two passes of AVX2's two).
pub const PW: usize = 64;
/// Rows of a panel chunk: [`PW`] × 128 floats are 32 KiB, two thirds of a 48 KiB L1 (the rest
/// holds the six rows of A and the accumulators' rows of C).
pub const KC: usize = 128;

/// `c = a·b (+ bias)` for row-major `a` (`m × k`), `b` (`k × n`) and `c` (`m × n`), in f32 with
/// fused multiply-adds, in parallel. Each output element is a chain over the reduction in
/// order, so the result does not depend on the thread count.
///
/// ```
/// let (m, k, n) = (3, 2, 2);
/// let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let b = [1.0, 0.0, 0.0, 1.0];
/// let mut c = [0.0; 6];
/// attentive::matmul(&a, &b, Some(&[10.0, 20.0]), (m, k, n), &mut c).unwrap();
/// assert_eq!(c, [11.0, 22.0, 13.0, 24.0, 15.0, 26.0]);
/// ```
///
/// # Errors
/// [`AttnError::LengthMismatch`] when a slice does not hold its matrix, and
/// [`AttnError::EmptyDimension`] for a zero dimension.
pub fn matmul(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    c: &mut [f32],
) -> Result<()> {
    matmul_with(Isa::best(), a, b, bias, (m, k, n), c)
}

/// [`matmul`] on a given instruction set (the tests compare them).
pub fn matmul_with(
    isa: Isa,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    c: &mut [f32],
) -> Result<()> {
    nonzero(m, k, n)?;
    let packed = Packed::new(b, (k, n))?;
    packed.matmul_then(isa, a, bias, m, c, |_, _| {})
}

fn nonzero(m: usize, k: usize, n: usize) -> Result<()> {
    for (dim, size) in [(0, m), (1, k), (2, n)] {
        if size == 0 {
            return Err(AttnError::EmptyDimension {
                tensor: "matmul",
                dim,
                shape: vec![m, k, n],
            });
        }
    }
    Ok(())
}

/// The right-hand matrix B (`k × n`) of [`matmul`] in the layout its products read: panels
/// of [`PW`] columns, each contiguous (`k × w`, `w = PW` but for a narrower last panel). A
/// layer's weights packed once serve every call, instead of being packed in each.
///
/// ```
/// use attentive::dense::Packed;
/// let w = Packed::new(&[1.0, 0.0, 0.0, 1.0], (2, 2)).unwrap(); // the identity
/// let mut c = [0.0; 4];
/// w.matmul(&[1.0, 2.0, 3.0, 4.0], None, 2, &mut c).unwrap();
/// assert_eq!(c, [1.0, 2.0, 3.0, 4.0]);
/// ```
#[derive(Clone, Debug)]
pub struct Packed {
    k: usize,
    n: usize,
    panels: Vec<f32>, // [n / PW][k][w]
}

impl Packed {
    /// Packs row-major `b` (`k × n`).
    ///
    /// # Errors
    /// [`AttnError::EmptyDimension`] for `k` or `n` zero, [`AttnError::LengthMismatch`] when
    /// `b` does not hold `k × n` elements.
    pub fn new(b: &[f32], (k, n): (usize, usize)) -> Result<Self> {
        nonzero(1, k, n)?;
        if b.len() != k.saturating_mul(n) {
            return Err(AttnError::LengthMismatch {
                tensor: "b",
                expected: k.saturating_mul(n),
                got: b.len(),
            });
        }
        let mut panels = vec![0.0f32; k * n];
        panels
            .par_chunks_mut(PW * k)
            .enumerate()
            .for_each(|(p, panel)| {
                let (c0, w) = (p * PW, panel.len() / k);
                for (t, row) in panel.chunks_exact_mut(w).enumerate() {
                    row.copy_from_slice(&b[t * n + c0..t * n + c0 + w]);
                }
            });
        Ok(Self { k, n, panels })
    }

    /// `(k, n)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// `Bᵀ` (`n × k`) packed: what a backward pass multiplies by, `dA = dC·Bᵀ`.
    ///
    /// ```
    /// use attentive::dense::Packed;
    /// let b = Packed::new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3)).unwrap();
    /// let bt = b.transpose();
    /// let mut c = [0.0; 2];
    /// bt.matmul(&[1.0, 0.0, 1.0], None, 1, &mut c).unwrap(); // (1, 0, 1)·Bᵀ
    /// assert_eq!((bt.dims(), c), ((3, 2), [4.0, 10.0]));
    /// ```
    pub fn transpose(&self) -> Packed {
        let (k, n) = (self.k, self.n);
        let mut bt = vec![0.0f32; n * k]; //                                         [n, k]
        for (p, panel) in self.panels.chunks(PW * k).enumerate() {
            let (c0, w) = (p * PW, panel.len() / k);
            for (t, row) in panel.chunks_exact(w).enumerate() {
                for (c, &x) in row.iter().enumerate() {
                    bt[(c0 + c) * k + t] = x;
                }
            }
        }
        Packed::new(&bt, (n, k)).expect("the transpose of a valid packing is valid")
    }

    /// `c = a·B (+ bias)` for row-major `a` (`m × k`) and `c` (`m × n`): [`matmul`] with B
    /// packed.
    ///
    /// # Errors
    /// As [`matmul`].
    pub fn matmul(&self, a: &[f32], bias: Option<&[f32]>, m: usize, c: &mut [f32]) -> Result<()> {
        self.matmul_then(Isa::best(), a, bias, m, c, |_, _| {})
    }

    /// [`Packed::matmul`] on a given instruction set, then `then(r0, rows)` on each block of
    /// whole rows of `c` (rows `r0..`) as soon as it is complete, while it is still in cache:
    /// the activation or the residual add and LayerNorm that follows a layer's product, fused
    /// into it.
    ///
    /// ```
    /// use attentive::{dense::{gelu_erf, Packed}, Isa};
    /// let w = Packed::new(&[1.0, -1.0], (1, 2)).unwrap();
    /// let mut c = [0.0; 4];
    /// w.matmul_then(Isa::best(), &[1.0, 2.0], None, 2, &mut c, |_, rows| gelu_erf(rows)).unwrap();
    /// assert!((c[2] - 1.954_5).abs() < 1e-4 && c[3] < 0.0);
    /// ```
    ///
    /// # Errors
    /// As [`matmul`], and [`AttnError::IsaUnavailable`] when this CPU cannot run `isa`.
    pub fn matmul_then(
        &self,
        isa: Isa,
        a: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        c: &mut [f32],
        then: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<()> {
        let (k, n) = (self.k, self.n);
        nonzero(m, k, n)?;
        let len = |x: usize, y: usize| x.saturating_mul(y);
        for (tensor, got, expected) in [
            ("a", a.len(), len(m, k)),
            ("c", c.len(), len(m, n)),
            ("bias", bias.map_or(n, <[f32]>::len), n),
        ] {
            if got != expected {
                return Err(AttnError::LengthMismatch {
                    tensor,
                    expected,
                    got,
                });
            }
        }
        let kern = isa.kernels()?;
        c.par_chunks_mut(MB * n).enumerate().for_each(|(blk, c)| {
            let r0 = blk * MB;
            let rows = c.len() / n;
            for c0 in (0..n).step_by(PW) {
                let cols = PW.min(n - c0);
                let panel = &self.panels[c0 * k..(c0 + cols) * k]; // k × cols
                for k0 in (0..k).step_by(KC) {
                    let kc = KC.min(k - k0);
                    let g = Gemm {
                        m: rows,
                        n: cols,
                        k: kc,
                        a: a[(r0 * k + k0)..].as_ptr(),
                        a_rs: k,
                        a_ks: 1,
                        b: panel[k0 * cols..].as_ptr(),
                        ldb: cols,
                        b_vs: kern.lanes,
                        c: c[c0..].as_mut_ptr(),
                        ldc: n,
                        // The first chunk starts from the bias (or 0), the rest add to it.
                        accumulate: k0 > 0,
                        bias: bias.map_or(std::ptr::null(), |b| b[c0..].as_ptr()),
                        join: std::ptr::null(),
                    };
                    // SAFETY: A holds `rows` rows of `kc` elements at stride k from its
                    // pointer (r0 + rows ≤ m, k0 + kc ≤ k), the panel `kc` rows of `cols`
                    // contiguous from row k0, C `rows` rows of `cols` at stride n from column
                    // c0 and the bias `cols` values from c0, all inside their slices (lengths
                    // checked above); the C chunk is this task's alone.
                    unsafe { (kern.gemm)(&g) };
                }
            }
            then(r0, c);
        });
        Ok(())
    }
}

/// GELU in its erf form, in place and in parallel:
/// $$\mathrm{GELU}(x) = x\\,\Phi(x) = \tfrac{x}{2}\big(1 + \mathrm{erf}(x/\sqrt 2)\big),$$
/// as HF's `"gelu"` and `torch.nn.functional.gelu` compute it. The erf is a polynomial (in
/// $x^2$ below $|x| = 0.928$, of $|x|$ inside an exponential above), within one ulp of the
/// exact erf, vectorised on every instruction set.
///
/// ```
/// let mut x = [-1.0f32, 0.0, 1.0];
/// attentive::dense::gelu_erf(&mut x);
/// assert!((x[2] - 0.841_344_7).abs() < 1e-6 && x[1] == 0.0);
/// assert!((x[0] + 0.158_655_26).abs() < 1e-6);
/// ```
pub fn gelu_erf(x: &mut [f32]) {
    let isa = Isa::best();
    x.par_chunks_mut(ELEMENTWISE_CHUNK)
        .for_each(|x| elementwise::gelu(isa, x));
}

/// [`gelu_erf`] on a given instruction set (the tests compare them).
///
/// # Errors
/// [`AttnError::IsaUnavailable`] when this CPU cannot run `isa`.
pub fn gelu_erf_with(isa: Isa, x: &mut [f32]) -> Result<()> {
    isa.kernels()?;
    x.par_chunks_mut(ELEMENTWISE_CHUNK)
        .for_each(|x| elementwise::gelu(isa, x));
    Ok(())
}

/// The residual add and LayerNorm of a post-norm Transformer layer, in place, row by row (rows
/// of `gamma.len()` elements) and in parallel:
/// $$x \leftarrow \gamma \odot \frac{y - \mu(y)}{\sqrt{\sigma^2(y) + \varepsilon}} + \beta,
///   \qquad y = x + r,$$
/// with $\mu$ and $\sigma^2$ the mean and the biased variance of the row, as
/// `torch.nn.LayerNorm(x + r)`. Without a residual it is LayerNorm alone.
///
/// ```
/// let mut x = [1.0f32, 2.0, 3.0, 4.0];
/// let r = [1.0f32, 0.0, -1.0, 0.0];
/// attentive::dense::add_layer_norm(&mut x, Some(&r), &[1.0, 1.0], &[0.0, 0.5], 1e-12).unwrap();
/// assert_eq!(x, [0.0, 0.5, -1.0, 1.5]);
/// ```
///
/// # Errors
/// [`AttnError::EmptyDimension`] for an empty `gamma`; [`AttnError::LengthMismatch`] when `x` is
/// not whole rows or `residual` and `beta` do not match it; [`AttnError::InvalidOption`] for an
/// `eps` that is not positive and finite (a constant row would divide 0 by 0).
pub fn add_layer_norm(
    x: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> Result<()> {
    add_layer_norm_with(Isa::best(), x, residual, gamma, beta, eps)
}

/// [`add_layer_norm`] on a given instruction set (the tests compare them).
pub fn add_layer_norm_with(
    isa: Isa,
    x: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> Result<()> {
    let d = gamma.len();
    if d == 0 {
        return Err(AttnError::EmptyDimension {
            tensor: "gamma",
            dim: 0,
            shape: vec![0],
        });
    }
    let whole = x.len().div_ceil(d) * d;
    for (tensor, got, expected) in [
        ("x", x.len(), whole),
        ("beta", beta.len(), d),
        ("residual", residual.map_or(x.len(), <[f32]>::len), x.len()),
    ] {
        if got != expected {
            return Err(AttnError::LengthMismatch {
                tensor,
                expected,
                got,
            });
        }
    }
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(AttnError::InvalidOption {
            option: "eps",
            value: eps as f64,
            reason: "LayerNorm's epsilon must be positive and finite",
        });
    }
    isa.kernels()?;
    let rows = (ELEMENTWISE_CHUNK / d).max(1);
    x.par_chunks_mut(rows * d).enumerate().for_each(|(i, x)| {
        let r = residual.map(|r| &r[i * rows * d..i * rows * d + x.len()]);
        elementwise::add_layer_norm(isa, x, r, gamma, beta, eps);
    });
    Ok(())
}

/// Elements per task of the elementwise passes: 64 KiB of f32, enough to outweigh a task's
/// start, small enough that a `[4096, 1536]` activation makes 96 tasks for the threads to share.
const ELEMENTWISE_CHUNK: usize = 16 * 1024;

/// The elementwise kernels, written as plain loops over lanes that the compiler vectorises for
/// each instruction set's `target_feature`.
mod elementwise {
    use crate::simd::Isa;

    /// Lanes of the accumulators of a row's sums: one AVX-512 vector, two AVX2 ones.
    const W: usize = 16;

    /// $e^x$ for $x \le 0$ (0 below $-87$): $2^n e^f$ with $n = \mathrm{round}(x \log_2 e)$,
    /// $f = x - n \ln 2$ in two steps (Cody–Waite) and $e^f$, $|f| \le \ln 2 / 2$, by its Taylor
    /// polynomial to degree 7 (truncation below $3\cdot10^{-9}$).
    #[inline(always)]
    fn exp_neg(x: f32) -> f32 {
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        // Round to nearest by the 1.5·2^23 shift: exact for |x log₂e| < 2^22.
        const SHIFT: f32 = 12_582_912.0;
        let x = x.max(-87.0);
        let shifted = x.mul_add(std::f32::consts::LOG2_E, SHIFT);
        let n = shifted - SHIFT;
        let f = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
        let mut p: f32 = 1.0 / 5040.0;
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = p.mul_add(f, c);
        }
        // 2^n for n in [−126, 0], the exponent field alone, from the bits of SHIFT + n (which
        // are SHIFT's plus n) with integer lane operations: a float-to-int conversion would not
        // vectorise.
        let bits = shifted
            .to_bits()
            .wrapping_sub(SHIFT.to_bits())
            .wrapping_add(127);
        p * f32::from_bits(bits << 23)
    }

    /// erf within one ulp: for $|a| \le 0.928$ an odd polynomial, $a + a\\,P(a^2)$; above,
    /// $1 - e^{Q(|a|)}$ with its sign. Both are computed and one is selected, so the loop has no
    /// branch to keep it from vectorising.
    #[inline(always)]
    fn erf(a: f32) -> f32 {
        let t = a.abs();
        let s = a * a;
        let mut r = (-1.728_534_7e-5f32).mul_add(t, 3.831_971_3e-4);
        let u = (-3.883_964_4e-3f32).mul_add(t, 2.425_462_2e-2);
        r = r.mul_add(s, u);
        for c in [-1.067_778_8e-1, -6.348_467e-1, -1.287_175_1e-1] {
            r = r.mul_add(t, c);
        }
        let far = (1.0 - exp_neg(r.mul_add(t, -t))).copysign(a);
        let mut p = -5.967_617e-4f32;
        for c in [
            4.991_194_2e-3,
            -2.676_813_5e-2,
            1.128_199_3e-1,
            -3.761_253_4e-1,
            1.283_791_7e-1,
        ] {
            p = p.mul_add(s, c);
        }
        let near = p.mul_add(a, a);
        if t > 0.927_734_4 {
            far
        } else {
            near
        }
    }

    #[inline(always)]
    fn gelu_generic(x: &mut [f32]) {
        for y in x {
            *y = 0.5 * *y * (1.0 + erf(*y * std::f32::consts::FRAC_1_SQRT_2));
        }
    }

    #[inline(always)]
    fn add_layer_norm_generic(
        x: &mut [f32],
        residual: Option<&[f32]>,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let d = gamma.len();
        for (i, row) in x.chunks_exact_mut(d).enumerate() {
            if let Some(r) = residual {
                for (y, r) in row.iter_mut().zip(&r[i * d..(i + 1) * d]) {
                    *y += r;
                }
            }
            // Sums in W lanes, then across them: the compiler keeps the lanes in a register.
            let (mut sum, mut sq) = ([0.0f32; W], [0.0f32; W]);
            let whole = d / W * W;
            for c in row[..whole].chunks_exact(W) {
                for (a, &y) in sum.iter_mut().zip(c) {
                    *a += y;
                }
            }
            let mean = (sum.iter().sum::<f32>() + row[whole..].iter().sum::<f32>()) / d as f32;
            for c in row[..whole].chunks_exact(W) {
                for (a, &y) in sq.iter_mut().zip(c) {
                    *a = (y - mean).mul_add(y - mean, *a);
                }
            }
            let tail = row[whole..].iter().map(|&y| (y - mean) * (y - mean));
            let var = (sq.iter().sum::<f32>() + tail.sum::<f32>()) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((y, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *y = ((*y - mean) * rstd).mul_add(*g, *b);
            }
        }
    }

    macro_rules! per_isa {
        ($name:ident, $generic:ident, ($($arg:ident: $ty:ty),*)) => {
            pub(super) fn $name(isa: Isa, $($arg: $ty),*) {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,fma")]
                    unsafe fn avx512($($arg: $ty),*) { $generic($($arg),*) }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) { $generic($($arg),*) }
                    match isa {
                        // SAFETY: the caller checked `isa.kernels()`, so this CPU runs `isa`.
                        Isa::Avx512 | Isa::Amx => return unsafe { avx512($($arg),*) },
                        // SAFETY: as above.
                        Isa::Avx2 => return unsafe { avx2($($arg),*) },
                        Isa::Scalar => {}
                    }
                }
                let _ = isa;
                $generic($($arg),*)
            }
        };
    }
    per_isa!(gelu, gelu_generic, (x: &mut [f32]));
    per_isa!(
        add_layer_norm,
        add_layer_norm_generic,
        (x: &mut [f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_f64_on_awkward_shapes_on_every_isa() {
        for isa in Isa::all_available() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (7, 5, 3),
                (97, 300, 257),
                (200, 513, 70),
                (13, 1536, 384),
            ] {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let b: Vec<f32> = (0..k * n)
                    .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                    .collect();
                // Without a bias on every other shape: C then starts from 0.
                let with_bias = (m + k) % 2 == 0;
                let bias: Vec<f32> = (0..n)
                    .map(|j| if with_bias { j as f32 * 0.01 } else { 0.0 })
                    .collect();
                let mut c = vec![f32::NAN; m * n];
                let given = with_bias.then_some(&bias[..]);
                matmul_with(isa, &a, &b, given, (m, k, n), &mut c).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let (exact, size) =
                            (0..k).fold((bias[j] as f64, bias[j].abs() as f64), |(s, z), t| {
                                let p = a[i * k + t] as f64 * b[t * n + j] as f64;
                                (s + p, z + p.abs())
                            });
                        // Any order of k + 1 f32 roundings: |error| ≤ γ_{k+1} Σ|terms|.
                        let u = f32::EPSILON as f64 / 2.0;
                        let gamma = (k + 1) as f64 * u / (1.0 - (k + 1) as f64 * u);
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= gamma * size,
                            "{isa:?} {m}x{k}x{n} ({i},{j}): {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    /// `then` sees every row once, in blocks of whole rows, each already its final value.
    #[test]
    fn matmul_then_sees_each_finished_block_once() {
        let (m, k, n) = (300, 200, 130);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32).collect();
        let mut want = vec![0.0; m * n];
        matmul(&a, &b, Some(&bias), (m, k, n), &mut want).unwrap();
        let seen = std::sync::Mutex::new(vec![None; m * n]);
        let p = Packed::new(&b, (k, n)).unwrap();
        let mut c = vec![0.0; m * n];
        p.matmul_then(Isa::best(), &a, Some(&bias), m, &mut c, |r0, rows| {
            assert_eq!(rows.len() % n, 0);
            let mut seen = seen.lock().unwrap();
            for (i, &x) in rows.iter().enumerate() {
                assert!(
                    seen[r0 * n + i].replace(x).is_none(),
                    "element {} twice",
                    r0 * n + i
                );
            }
        })
        .unwrap();
        let seen: Vec<f32> = seen
            .into_inner()
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect();
        assert_eq!(seen, want);
        assert_eq!(c, want);
    }

    #[test]
    fn matmul_refuses_wrong_lengths() {
        let x = [0.0f32; 6];
        let mut c = [0.0f32; 4];
        assert!(matches!(matmul(&x, &x, None, (2, 3, 2), &mut c), Ok(())));
        assert!(matches!(
            matmul(&x, &x[..5], None, (2, 3, 2), &mut c),
            Err(AttnError::LengthMismatch { tensor: "b", .. })
        ));
        assert!(matches!(
            matmul(&x, &x, Some(&[1.0]), (2, 3, 2), &mut c),
            Err(AttnError::LengthMismatch { tensor: "bias", .. })
        ));
        assert!(matches!(
            matmul(&x, &x, None, (0, 3, 2), &mut c),
            Err(AttnError::EmptyDimension { .. })
        ));
        assert!(matches!(
            matmul(&x, &x, None, (usize::MAX, 3, 2), &mut c),
            Err(AttnError::LengthMismatch { tensor: "a", .. })
        ));
        assert!(matches!(
            Packed::new(&x, (2, 2)),
            Err(AttnError::LengthMismatch { tensor: "b", .. })
        ));
        let p = Packed::new(&x, (3, 2)).unwrap();
        assert!(matches!(
            p.matmul(&x[..5], None, 2, &mut c),
            Err(AttnError::LengthMismatch { tensor: "a", .. })
        ));
        assert!(matches!(
            p.matmul(&x, None, 2, &mut c[..3]),
            Err(AttnError::LengthMismatch { tensor: "c", .. })
        ));
    }

    /// Against the f64 oracle, each value within what its own f32 arithmetic must allow: an ulp
    /// of erf, the rounding of 1 + erf (which is all of the error where erf is near −1 and
    /// the result tiny) and the two products.
    #[test]
    fn gelu_matches_f64_on_every_isa() {
        let mut xs: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 * 2.5e-4).collect();
        xs.extend([
            0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6, 30.0, -30.0, 1e30, -1e30,
        ]);
        xs.extend((0..1000).map(|i| 0.927_734_4 + (i as f32 - 500.0) * 1e-7));
        let exact = |x: f32| {
            let x = x as f64;
            0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
        };
        let eps = f32::EPSILON as f64;
        for isa in Isa::all_available() {
            let mut y = xs.clone();
            gelu_erf_with(isa, &mut y).unwrap();
            for (&x, &y) in xs.iter().zip(&y) {
                let e = exact(x);
                let bound = 3.0 * eps * e.abs() + 0.75 * eps * (x as f64).abs();
                assert!(
                    (y as f64 - e).abs() <= bound,
                    "{isa:?} gelu({x}) = {y}, exact {e}"
                );
            }
        }
        let mut special = [f32::NAN, f32::INFINITY];
        gelu_erf(&mut special);
        assert!(special[0].is_nan() && special[1] == f32::INFINITY);
    }

    #[test]
    fn add_layer_norm_matches_f64_on_awkward_widths_on_every_isa() {
        for isa in Isa::all_available() {
            for &(rows, d) in &[(1, 1), (3, 7), (5, 16), (2, 17), (70, 384), (3, 1000)] {
                let x: Vec<f32> = (0..rows * d)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 + 3.0)
                    .collect();
                let r: Vec<f32> = (0..rows * d).map(|i| (i * 53 % 97) as f32 / 48.0).collect();
                let g: Vec<f32> = (0..d).map(|j| 0.5 + j as f32 * 0.01).collect();
                let b: Vec<f32> = (0..d).map(|j| j as f32 * -0.02).collect();
                for residual in [None, Some(&r[..])] {
                    let mut y = x.clone();
                    add_layer_norm_with(isa, &mut y, residual, &g, &b, 1e-12).unwrap();
                    for i in 0..rows {
                        let row: Vec<f64> = (0..d)
                            .map(|j| {
                                let k = i * d + j;
                                x[k] as f64 + residual.map_or(0.0, |r| r[k] as f64)
                            })
                            .collect();
                        let mean = row.iter().sum::<f64>() / d as f64;
                        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
                        for j in 0..d {
                            let z = (row[j] - mean) / (var + 1e-12).sqrt();
                            let e = z * g[j] as f64 + b[j] as f64;
                            // Relative to the row's scale: a few roundings of each normalised
                            // value plus the sums' γ_d.
                            let u = f32::EPSILON as f64;
                            let bound = (8.0 + d as f64) * u * (z.abs() + 1.0) * g[j] as f64
                                + 4.0 * u * (b[j] as f64).abs();
                            let got = y[i * d + j] as f64;
                            assert!(
                                (got - e).abs() <= bound,
                                "{isa:?} {rows}x{d} ({i},{j}) residual {}: {got} vs {e}",
                                residual.is_some()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn add_layer_norm_refuses_bad_input() {
        let (g, b) = ([1.0f32; 4], [0.0f32; 4]);
        let mut x = [1.0f32; 8];
        assert!(add_layer_norm(&mut x, None, &g, &b, 1e-5).is_ok());
        assert!(matches!(
            add_layer_norm(&mut x[..7], None, &g, &b, 1e-5),
            Err(AttnError::LengthMismatch { tensor: "x", .. })
        ));
        assert!(matches!(
            add_layer_norm(&mut x, Some(&[0.0; 4]), &g, &b, 1e-5),
            Err(AttnError::LengthMismatch {
                tensor: "residual",
                ..
            })
        ));
        assert!(matches!(
            add_layer_norm(&mut x, None, &g, &b[..3], 1e-5),
            Err(AttnError::LengthMismatch { tensor: "beta", .. })
        ));
        assert!(matches!(
            add_layer_norm(&mut x, None, &[], &[], 1e-5),
            Err(AttnError::EmptyDimension { .. })
        ));
        for eps in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                add_layer_norm(&mut x, None, &g, &b, eps),
                Err(AttnError::InvalidOption { option: "eps", .. })
            ));
        }
        // A constant row: 0, then β.
        let mut c = [2.0f32; 4];
        add_layer_norm(&mut c, None, &g, &[0.5; 4], 1e-12).unwrap();
        assert_eq!(c, [0.5; 4]);
    }
}
