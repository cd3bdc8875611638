//! Long inputs: the numbers and views of [`Maps`] without ever holding `L·H·N²` weights.
//!
//! Rows of each layer's heads arrive block by block (from the engine's `probabilities` on a
//! block of query rows, say) and are folded at once into:
//! - each head's statistics ([`HeadStats`], the same sums as [`crate::stats::head_stats`]);
//! - each head's map averaged and maxed over blocks of at most [`CELL_BUDGET`] a side;
//! - the layer's head mean, which at the end of the layer updates the rollout
//!   $J_\ell = \hat A_\ell J_{\ell-1}$.
//!
//! Memory: three `N × N` f32 matrices (the head mean, $J$ and the product; 192 MiB at
//! N = 4096) plus one block of rows, whatever the number of layers and heads.

use crate::error::{Result, VizError};
use crate::maps::Maps;
use crate::rollout::Fusion;
use crate::stats::{token_classes, Acc, HeadStats};
use crate::svg::CELL_BUDGET;

/// The accumulators of a long self-attention input; see the module documentation.
pub struct Streamed {
    layers: usize,
    heads: usize,
    n: usize,
    tokens: Vec<String>,
    special: Vec<bool>,
    punct: Vec<bool>,
    stats: Vec<Acc>,
    /// Per head, block sums and maxima, `cells × cells`.
    sums: Vec<Vec<f32>>,
    maxes: Vec<Vec<f32>>,
    block: usize,
    cells: usize,
    /// The current layer's sum over heads, `n × n`.
    mean: Vec<f32>,
    /// The rollout so far (`None` before the first layer ends).
    rollout: Option<Vec<f32>>,
    /// Rows received per (layer, head), to check that each layer is whole before it ends.
    seen: Vec<usize>,
    done_layers: usize,
}

impl Streamed {
    /// Accumulators for `layers × heads` maps over `tokens` (self-attention, mean fusion).
    ///
    /// # Errors
    /// [`VizError::Empty`] for no layer, head or token.
    pub fn new(layers: usize, heads: usize, tokens: Vec<String>) -> Result<Self> {
        let n = tokens.len();
        if layers == 0 || heads == 0 || n == 0 {
            return Err(VizError::Empty(format!(
                "{layers} layers, {heads} heads and {n} tokens: each must be at least 1"
            )));
        }
        let block = n.div_ceil(CELL_BUDGET);
        let cells = n.div_ceil(block);
        let (special, punct) = token_classes(&tokens);
        Ok(Self {
            layers,
            heads,
            n,
            tokens,
            special,
            punct,
            stats: vec![Acc::default(); layers * heads],
            sums: vec![vec![0.0; cells * cells]; layers * heads],
            maxes: vec![vec![0.0; cells * cells]; layers * heads],
            block,
            cells,
            mean: vec![0.0; n * n],
            rollout: None,
            seen: vec![0; layers * heads],
            done_layers: 0,
        })
    }

    /// Rows `row0..row0 + rows.len() / n` of head `head` of layer `layer` (the current layer:
    /// layers arrive in order).
    ///
    /// # Errors
    /// [`VizError::OutOfRange`] for a layer other than the current one, a head past the heads
    /// or rows past the tokens; [`VizError::Shape`] for a block that is not whole rows;
    /// [`VizError::Weight`] for a weight that is not finite and non-negative.
    pub fn add_rows(&mut self, layer: usize, head: usize, row0: usize, rows: &[f32]) -> Result<()> {
        let n = self.n;
        if layer != self.done_layers || layer >= self.layers {
            return Err(VizError::OutOfRange {
                what: "layer (layers arrive in order)",
                index: layer,
                count: self.done_layers.min(self.layers - 1) + 1,
            });
        }
        if head >= self.heads {
            return Err(VizError::OutOfRange {
                what: "head",
                index: head,
                count: self.heads,
            });
        }
        let count = rows.len() / n;
        if !rows.len().is_multiple_of(n) || row0 + count > n {
            return Err(VizError::Shape {
                shape: [self.layers, self.heads, n, n],
                reason: format!(
                    "a block of {} weights from row {row0} is not whole rows inside it",
                    rows.len()
                ),
            });
        }
        if let Some(at) = rows.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(VizError::Weight {
                layer,
                head,
                row: row0 + at / n,
                col: at % n,
                value: rows[at],
            });
        }
        let k = layer * self.heads + head;
        let (cells, block) = (self.cells, self.block);
        for (r, row) in rows.chunks_exact(n).enumerate() {
            let i = row0 + r;
            self.stats[k].add(i, row, &self.special, &self.punct);
            let cell_row = &mut self.sums[k][(i / block) * cells..][..cells];
            let max_row = &mut self.maxes[k][(i / block) * cells..][..cells];
            for (j, &a) in row.iter().enumerate() {
                cell_row[j / block] += a;
                max_row[j / block] = max_row[j / block].max(a);
            }
            for (m, &a) in self.mean[i * n..][..n].iter_mut().zip(row) {
                *m += a;
            }
        }
        self.seen[k] += count;
        Ok(())
    }

    /// Ends the current layer: its head mean joins the rollout.
    ///
    /// # Errors
    /// [`VizError::Shape`] when some head of the layer has not had all its rows.
    pub fn end_layer(&mut self) -> Result<()> {
        let (n, l) = (self.n, self.done_layers);
        if l >= self.layers
            || self.seen[l * self.heads..][..self.heads]
                .iter()
                .any(|&s| s != n)
        {
            return Err(VizError::Shape {
                shape: [self.layers, self.heads, n, n],
                reason: format!("layer {l} ended before every head had its {n} rows"),
            });
        }
        let heads = self.heads as f32;
        for (i, row) in self.mean.chunks_exact_mut(n).enumerate() {
            row.iter_mut().for_each(|x| *x /= heads);
            row[i] += 1.0;
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= s);
        }
        self.rollout = Some(match self.rollout.take() {
            None => std::mem::replace(&mut self.mean, vec![0.0; n * n]),
            Some(prev) => {
                let mut j = vec![0.0f32; n * n];
                attentive::matmul(&self.mean, &prev, None, (n, n, n), &mut j)
                    .expect("n × n operands");
                self.mean.iter_mut().for_each(|x| *x = 0.0);
                j
            }
        });
        self.done_layers += 1;
        Ok(())
    }

    /// The results, once every layer has ended: each head's statistics, the maps as block means
    /// (`[L, H, c, c]`, with block labels, as [`Maps`] for the views) and block maxima, and the
    /// rollout (`n × n`).
    ///
    /// # Errors
    /// [`VizError::Shape`] when some layer has not ended.
    pub fn finish(self) -> Result<Finished> {
        if self.done_layers != self.layers {
            return Err(VizError::Shape {
                shape: [self.layers, self.heads, self.n, self.n],
                reason: format!("{} of {} layers ended", self.done_layers, self.layers),
            });
        }
        let (n, block, cells) = (self.n, self.block, self.cells);
        let size = |g: usize| (g * block + block).min(n) - g * block;
        let mut means = Vec::with_capacity(self.layers * self.heads * cells * cells);
        for sums in &self.sums {
            for r in 0..cells {
                for c in 0..cells {
                    means.push(sums[r * cells + c] / (size(r) * size(c)) as f32);
                }
            }
        }
        let labels: Vec<String> = (0..cells)
            .map(|g| {
                let (lo, hi) = (g * block, g * block + size(g));
                if hi - lo == 1 {
                    self.tokens[lo].clone()
                } else {
                    format!(
                        "{} … {} ({})",
                        self.tokens[lo],
                        self.tokens[hi - 1],
                        hi - lo
                    )
                }
            })
            .collect();
        // Block means of rows that sum to 1 sum to 1 only when blocks are single tokens: the
        // coarse maps are views, not attention, and their row sums are not checked.
        let coarse = Maps::new_unchecked_sums(
            means,
            [self.layers, self.heads, cells, cells],
            labels.clone(),
            labels,
        )?;
        let stats = self
            .stats
            .iter()
            .enumerate()
            .map(|(k, a)| a.finish(k / self.heads, k % self.heads, true))
            .collect();
        Ok(Finished {
            stats,
            coarse,
            maxima: self.maxes,
            rollout: self.rollout.expect("every layer ended"),
            fusion: Fusion::Mean,
        })
    }
}

/// What [`Streamed::finish`] returns.
pub struct Finished {
    pub stats: Vec<HeadStats>,
    /// Block means of every head's map, `[L, H, c, c]`, labelled by block.
    pub coarse: Maps,
    /// Block maxima, per head `c × c`.
    pub maxima: Vec<Vec<f32>>,
    /// The rollout through every layer, `n × n`.
    pub rollout: Vec<f32>,
    pub fusion: Fusion,
}
