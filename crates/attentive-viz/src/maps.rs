//! Attention maps `[L, H, Nq, Nk]` with their tokens: the one input every method and view reads.

use crate::error::{Result, VizError};

/// Every layer's and head's attention weights, row-major `[layers, heads, queries, keys]`
/// (row `i` of a map: how query `i` spreads its attention over the keys), with a label for each
/// query and key token.
///
/// Validated once, when made: the shape must match the labels, every weight must be finite and
/// not negative. Rows that do not sum to 1 (within `1e-3`) are kept as they are, not
/// renormalised, and listed in [`Maps::row_sum_warnings`].
///
/// ```
/// use attentive_viz::Maps;
/// let tokens = vec!["[CLS]".to_string(), "hi".into(), "[SEP]".into()];
/// let uniform = vec![1.0 / 3.0; 9];
/// let m = Maps::self_attention(uniform, [1, 1, 3], tokens).unwrap();
/// assert_eq!(m.map(0, 0)[4], 1.0 / 3.0);
/// assert!(m.row_sum_warnings().is_empty());
/// ```
#[derive(Clone, Debug)]
pub struct Maps {
    data: Vec<f32>,
    shape: [usize; 4],
    q_tokens: Vec<String>,
    k_tokens: Vec<String>,
    warnings: Vec<RowSum>,
}

/// A row whose weights do not sum to 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSum {
    pub layer: usize,
    pub head: usize,
    pub row: usize,
    pub sum: f32,
}

/// How far a row's sum may be from 1 before it is reported.
pub const ROW_SUM_TOLERANCE: f32 = 1e-3;

impl Maps {
    /// Maps of shape `[layers, heads, Nq, Nk]` with `Nq` query and `Nk` key labels (cross
    /// attention: a decoder's queries over an encoder's keys).
    ///
    /// # Errors
    /// [`VizError::Shape`] when a dimension is 0, the data does not hold the shape or the labels
    /// do not match it; [`VizError::Weight`] for a weight that is NaN, infinite or negative.
    pub fn new(
        data: Vec<f32>,
        shape: [usize; 4],
        q_tokens: Vec<String>,
        k_tokens: Vec<String>,
    ) -> Result<Self> {
        let [_, h, nq, nk] = shape;
        let shape_err = |reason: String| VizError::Shape { shape, reason };
        if shape.contains(&0) {
            return Err(shape_err("every dimension must be at least 1".into()));
        }
        let len = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if len != Some(data.len()) {
            return Err(shape_err(format!("{} weights do not fill it", data.len())));
        }
        if q_tokens.len() != nq || k_tokens.len() != nk {
            return Err(shape_err(format!(
                "{} query and {} key tokens given",
                q_tokens.len(),
                k_tokens.len()
            )));
        }
        if let Some(at) = data.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
            let [layer, head, row, col] = unravel(at, shape);
            return Err(VizError::Weight {
                layer,
                head,
                row,
                col,
                value: data[at],
            });
        }
        let mut warnings = Vec::new();
        for (r, row) in data.chunks_exact(nk).enumerate() {
            let sum: f32 = row.iter().sum();
            if (sum - 1.0).abs() > ROW_SUM_TOLERANCE {
                warnings.push(RowSum {
                    layer: r / (h * nq),
                    head: r / nq % h,
                    row: r % nq,
                    sum,
                });
            }
        }
        Ok(Self {
            data,
            shape,
            q_tokens,
            k_tokens,
            warnings,
        })
    }

    /// [`Maps::new`] for summaries that are not attention (block means of a long input's maps),
    /// whose row sums mean nothing and are not reported.
    pub(crate) fn new_unchecked_sums(
        data: Vec<f32>,
        shape: [usize; 4],
        q_tokens: Vec<String>,
        k_tokens: Vec<String>,
    ) -> Result<Self> {
        let mut m = Self::new(data, shape, q_tokens, k_tokens)?;
        m.warnings.clear();
        Ok(m)
    }

    /// Self-attention maps `[layers, heads, N, N]` over one token list.
    ///
    /// # Errors
    /// As [`Maps::new`].
    pub fn self_attention(
        data: Vec<f32>,
        [l, h, n]: [usize; 3],
        tokens: Vec<String>,
    ) -> Result<Self> {
        Self::new(data, [l, h, n, n], tokens.clone(), tokens)
    }

    /// `[layers, heads, Nq, Nk]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// Whether queries and keys are the same tokens (rollout and flow need it).
    pub fn is_self_attention(&self) -> bool {
        self.shape[2] == self.shape[3] && self.q_tokens == self.k_tokens
    }

    pub fn q_tokens(&self) -> &[String] {
        &self.q_tokens
    }

    pub fn k_tokens(&self) -> &[String] {
        &self.k_tokens
    }

    /// Head `h` of layer `l`: `Nq × Nk`, row-major.
    pub fn map(&self, l: usize, h: usize) -> &[f32] {
        let [_, heads, nq, nk] = self.shape;
        &self.data[(l * heads + h) * nq * nk..][..nq * nk]
    }

    /// Layer `l` averaged over its heads, `Nq × Nk`.
    pub fn head_mean(&self, l: usize) -> Vec<f32> {
        let [_, heads, nq, nk] = self.shape;
        let mut mean = vec![0.0f32; nq * nk];
        for h in 0..heads {
            for (m, &a) in mean.iter_mut().zip(self.map(l, h)) {
                *m += a;
            }
        }
        mean.iter_mut().for_each(|m| *m /= heads as f32);
        mean
    }

    /// Every weight, row-major `[L, H, Nq, Nk]`.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The rows whose weights do not sum to 1 (within [`ROW_SUM_TOLERANCE`]), as found.
    pub fn row_sum_warnings(&self) -> &[RowSum] {
        &self.warnings
    }
}

fn unravel(at: usize, [_, h, nq, nk]: [usize; 4]) -> [usize; 4] {
    [
        at / (h * nq * nk),
        at / (nq * nk) % h,
        at / nk % nq,
        at % nk,
    ]
}
