//! Dense matrix products for the layers around attention (the projections and feed-forward
//! layers of a Transformer), on the same micro-kernel as the attention kernels.
//!
//! $$C = A B + \mathbf{1} b^\top,$$
//! with $A$ `m × k`, $B$ `k × n` and $C$ `m × n`, all row-major, and an optional bias row $b$
//! (`n`) added to every row. The work is split into blocks of [`MB`] rows and [`NB`] columns,
//! one task each; within a block the reduction runs in chunks of [`KC`] so that the chunk of B
//! a block reads stays in L2 while every row pass streams it.

use crate::error::{AttnError, Result};
use crate::simd::{Gemm, Isa};
use rayon::prelude::*;

/// Rows per task: 16 passes of the 6-row micro-kernel; 96 rows × [`KC`] of A is 96 KiB, which
/// stays in the 2 MiB L2 beside the B chunk.
pub const MB: usize = 96;
/// Columns per task: four passes of 64 columns (AVX-512's four vectors).
pub const NB: usize = 256;
/// Reduction chunk: 256 rows × [`NB`] columns of B are 256 KiB, an eighth of a 2 MiB L2.
pub const KC: usize = 256;

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
    for (dim, size) in [(0, m), (1, k), (2, n)] {
        if size == 0 {
            return Err(AttnError::EmptyDimension {
                tensor: "matmul",
                dim,
                shape: vec![m, k, n],
            });
        }
    }
    let len = |x: usize, y: usize| x.saturating_mul(y);
    for (tensor, got, expected) in [
        ("a", a.len(), len(m, k)),
        ("b", b.len(), len(k, n)),
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
        for c0 in (0..n).step_by(NB) {
            let cols = NB.min(n - c0);
            for r in 0..rows {
                let row = &mut c[r * n + c0..r * n + c0 + cols];
                match bias {
                    Some(bias) => row.copy_from_slice(&bias[c0..c0 + cols]),
                    None => row.fill(0.0),
                }
            }
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let g = Gemm {
                    m: rows,
                    n: cols,
                    k: kc,
                    // r0 + rows ≤ m and k0 + kc ≤ k, so A's
                    // block lies inside `a` (m·k); likewise B's (k·n) and C's (this chunk).
                    a: a[(r0 * k + k0)..].as_ptr(),
                    a_rs: k,
                    a_ks: 1,
                    b: b[(k0 * n + c0)..].as_ptr(),
                    ldb: n,
                    b_vs: kern.lanes,
                    c: c[c0..].as_mut_ptr(),
                    ldc: n,
                    accumulate: true,
                };
                // SAFETY: A holds `rows` rows of `kc` elements at stride k from its pointer, B
                // `kc` rows of `cols` at stride n, C `rows` rows of `cols` at stride n, all
                // inside their slices (checked above); the C chunk is this task's alone.
                unsafe { (kern.gemm)(&g) };
            }
        }
    });
    Ok(())
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
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
                let mut c = vec![f32::NAN; m * n];
                matmul_with(isa, &a, &b, Some(&bias), (m, k, n), &mut c).unwrap();
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
    }
}
