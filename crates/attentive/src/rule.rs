//! Rules on (batch, head, query, key): the position of one score, and the user's mask and score
//! rules, which every family (the fused kernel, the patterns, positional schemes, the oracle)
//! speaks; below all of them.

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
/// a [`BlockMask`](crate::BlockMask) (per call with [`Options::mask_rule`](crate::Options::mask_rule), or once with [`BlockMask::from_rule`](crate::BlockMask::from_rule)),
/// so a closure runs as fast as a built-in [`Pattern`](crate::Pattern). Tabulating asks the rule about every
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
