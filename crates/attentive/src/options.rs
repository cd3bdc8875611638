//! What a call can ask for beyond plain softmax attention: masks, biases, score rules, dropout.
//!
//! The score of query $i$ against key $j$ in batch $b$, query head $h$ is computed in this order:
//!
//! 1. $s = \text{scale}\cdot q_i\cdot k_j$ (scale defaults to $1/\sqrt{D}$);
//! 2. softcap: $s \leftarrow c\tanh(s/c)$;
//! 3. biases: ALiBi $-m_h\\,|i + N_k - N_q - j|$, then the dense bias $B[b,h,i,j]$;
//! 4. the user's [`ScoreRule`] $s \leftarrow f(s, b, h, i, j)$;
//! 5. masks (causal, window, documents, dense boolean mask, a [`Pattern`], the user's
//!    [`MaskRule`], a prebuilt [`BlockMask`]): a masked pair gets $-\infty$; the mask is their
//!    intersection;
//! 6. softmax over $j$, then dropout of the weights, then the weighted sum of values.
//!
//! A row whose keys are all masked gives output 0, log-sum-exp $-\infty$ and zero gradients.

use crate::masks::blocks::BlockMask;
use crate::masks::dropout::Dropout;
use crate::masks::pattern::Pattern;
pub use crate::rule::{MaskRule, Pos, ScoreRule};
use crate::simd::Isa;
use crate::view::View;

/// Where the causal diagonal sits when `Nq ≠ Nk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causal {
    /// Query $i$ sees keys $j \le i$ (PyTorch's `is_causal`).
    TopLeft,
    /// Query $i$ sees keys $j \le i + N_k - N_q$: the last query sees every key, as a decoder
    /// extending a KV cache needs (FlashAttention's convention).
    BottomRight,
}

/// A sliding window aligned bottom-right: query $i$ sees keys
/// $[i + N_k - N_q - \text{left},\ i + N_k - N_q + \text{right}]$. `usize::MAX` leaves a side open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub left: usize,
    pub right: usize,
}

/// Document ids of packed variable-length sequences: query $i$ and key $j$ attend only when their
/// ids are equal. Each slice holds either one row shared by every batch (`Nq` / `Nk` ids) or one
/// row per batch (`B·Nq` / `B·Nk`). For self-attention over a packed batch, pass the same ids twice.
#[derive(Clone, Copy, Debug)]
pub struct DocIds<'a> {
    pub q: &'a [u32],
    pub k: &'a [u32],
}

/// Every option of an attention call. `Options::new()` is plain softmax attention with scale
/// $1/\sqrt{D}$; the builder methods add one rule each, and any combination is allowed.
///
/// ```
/// # use attentive::{Causal, Options};
/// let slopes = attentive::positional::alibi_slopes(8);
/// let opts = Options::new().causal(Causal::BottomRight).window(128, 0).alibi(&slopes);
/// ```
#[derive(Clone, Copy, Default)]
pub struct Options<'a> {
    /// Multiplies $q\cdot k$; `None` means $1/\sqrt{D}$. Must be finite and positive.
    pub scale: Option<f32>,
    pub causal: Option<Causal>,
    pub window: Option<Window>,
    /// Soft cap $c$ of $c\tanh(s/c)$; must be finite and positive.
    pub softcap: Option<f32>,
    /// ALiBi slope per query head (length `Hq`), see [`positional::alibi_slopes`](crate::positional::alibi_slopes).
    pub alibi_slopes: Option<&'a [f32]>,
    /// Boolean mask, `true` = attend, broadcastable to `[B, Hq, Nq, Nk]`.
    pub mask: Option<View<'a, bool>>,
    /// Additive bias, broadcastable to `[B, Hq, Nq, Nk]`. May hold −∞ (a float mask).
    pub bias: Option<View<'a, f32>>,
    pub docs: Option<DocIds<'a>>,
    /// A structured pattern (sliding window, sparse, global, …), built into a [`BlockMask`] per call.
    pub pattern: Option<&'a Pattern>,
    pub mask_rule: Option<&'a dyn MaskRule>,
    /// A prebuilt table; instead of `pattern` and `mask_rule`, not with them.
    pub block_mask: Option<&'a BlockMask>,
    pub score_rule: Option<&'a dyn ScoreRule>,
    pub dropout: Option<Dropout>,
    /// Forces an instruction set (tests and benchmarks); `None` picks the fastest available.
    pub isa: Option<Isa>,
}

impl<'a> Options<'a> {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn scale(mut self, s: f32) -> Self {
        self.scale = Some(s);
        self
    }
    pub fn causal(mut self, c: Causal) -> Self {
        self.causal = Some(c);
        self
    }
    pub fn window(mut self, left: usize, right: usize) -> Self {
        self.window = Some(Window { left, right });
        self
    }
    pub fn softcap(mut self, c: f32) -> Self {
        self.softcap = Some(c);
        self
    }
    pub fn alibi(mut self, slopes: &'a [f32]) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }
    pub fn mask(mut self, m: View<'a, bool>) -> Self {
        self.mask = Some(m);
        self
    }
    pub fn bias(mut self, b: View<'a, f32>) -> Self {
        self.bias = Some(b);
        self
    }
    pub fn docs(mut self, q: &'a [u32], k: &'a [u32]) -> Self {
        self.docs = Some(DocIds { q, k });
        self
    }
    pub fn pattern(mut self, p: &'a Pattern) -> Self {
        self.pattern = Some(p);
        self
    }
    pub fn block_mask(mut self, m: &'a BlockMask) -> Self {
        self.block_mask = Some(m);
        self
    }
    pub fn mask_rule(mut self, r: &'a dyn MaskRule) -> Self {
        self.mask_rule = Some(r);
        self
    }
    pub fn score_rule(mut self, r: &'a dyn ScoreRule) -> Self {
        self.score_rule = Some(r);
        self
    }
    pub fn dropout(mut self, p: f32, seed: u64) -> Self {
        self.dropout = Some(Dropout { p, seed });
        self
    }
    pub fn isa(mut self, isa: Isa) -> Self {
        self.isa = Some(isa);
        self
    }
}
