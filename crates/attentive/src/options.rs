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

use crate::blocks::BlockMask;
use crate::dropout::Dropout;
use crate::pattern::Pattern;
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

/// Position of one score: batch, query head, query index, key index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    pub b: usize,
    pub h: usize,
    pub i: usize,
    pub j: usize,
}

/// A user-defined mask: which (batch, head, query, key) pairs may attend.
///
/// The kernels never call a rule pair by pair while they attend: the rule is first tabulated into
/// a [`BlockMask`] (per call with [`Options::mask_rule`], or once with [`BlockMask::from_rule`]),
/// so a closure runs as fast as a built-in [`Pattern`]. Tabulating asks the rule about every
/// (b, h, i, j) (H·N² calls, about half a second for H = 8, N = 8192 on 2 cores): when calls
/// repeat, build the table once.
///
/// Any `Fn(Pos) -> bool + Sync` is a mask rule:
/// ```
/// # use attentive::{Options, Pos};
/// let even_keys = |p: Pos| p.j % 2 == 0;
/// let opts = Options::new().mask_rule(&even_keys);
/// ```
pub trait MaskRule: Sync {
    fn visible(&self, at: Pos) -> bool;
}

impl<F: Fn(Pos) -> bool + Sync> MaskRule for F {
    fn visible(&self, at: Pos) -> bool {
        self(at)
    }
}

/// A user-defined score modifier $s \leftarrow f(s, b, h, i, j)$ and its derivative
/// $\partial f/\partial s$ (the backward pass needs it).
///
/// A score that is already −∞ (a −∞ bias) stays −∞ and the rule is not called for it.
///
/// The f64 methods are what the [`reference`](crate::reference) oracle calls; by default they round
/// through the f32 ones, and a rule can override them to be exact.
///
/// ```
/// # use attentive::{Pos, ScoreRule};
/// /// Adds a learned bias per relative distance, clipped to ±2.
/// struct Relative([f32; 5]);
/// impl ScoreRule for Relative {
///     fn score(&self, s: f32, p: Pos) -> f32 {
///         s + self.0[((p.j as i64 - p.i as i64).clamp(-2, 2) + 2) as usize]
///     }
///     fn grad(&self, _s: f32, _p: Pos) -> f32 { 1.0 }
/// }
/// ```
pub trait ScoreRule: Sync {
    fn score(&self, s: f32, at: Pos) -> f32;
    /// $\partial f / \partial s$ at `s`.
    fn grad(&self, s: f32, at: Pos) -> f32;
    fn score_f64(&self, s: f64, at: Pos) -> f64 {
        self.score(s as f32, at) as f64
    }
    fn grad_f64(&self, s: f64, at: Pos) -> f64 {
        self.grad(s as f32, at) as f64
    }
    /// Checks the rule against a problem of `[B, Hq, Nq, Nk]` before any score is computed (a
    /// table too short for the heads, say); the call fails with this error.
    fn check(&self, _shape: [usize; 4]) -> crate::Result<()> {
        Ok(())
    }
    /// How many learnable parameters the rule has (a bias table, say); 0 by default.
    fn params(&self) -> usize {
        0
    }
    /// Adds $g\\,\partial f/\partial\theta$ into `grad` (length [`params`](Self::params)), where
    /// $g = \partial L/\partial f$ at `at`. [`backward_rule_params`](crate::backward_rule_params)
    /// calls it for every visible pair.
    fn param_grad(&self, _g: f32, _at: Pos, _grad: &mut [f32]) {}
    /// The f64 version the oracle calls.
    fn param_grad_f64(&self, _g: f64, _at: Pos, _grad: &mut [f64]) {}
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
