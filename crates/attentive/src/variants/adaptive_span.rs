//! Adaptive attention span (Sukhbaatar et al., 2019): each head learns how far back it looks.
//! Causal softmax weights are multiplied by a soft ramp of the distance $x = i - j$ and
//! renormalised,
//! $$m_h(x) = \mathrm{clamp}\Big(\frac{R + z_h - x}{R}, 0, 1\Big),\qquad
//!   a'\_{ij} = \frac{m_h(i-j)\\,a_{ij}}{\sum_{j'} m_h(i-j')\\,a_{ij'}},$$
//! with $z_h = c_h S$, $c_h \in [0, 1]$ the learned span fraction (clamped), `S` the largest span
//! and `R` the ramp's width. The renormalised product is the softmax of $s + \ln m$, so the span is
//! a [`ScoreRule`] on the fused causal kernel: $\ln m$ added where $m > 0$, the pairs with $m = 0$
//! at −∞, and a causal window of the largest span's reach skipping every tile beyond it. Its
//! parameter gradient is $\partial \ln m / \partial c_h = (S/R)/m$ on the ramp, 0 elsewhere (and
//! where the clamp of $c_h$ holds). The reference code divides by the sum plus $10^{-8}$; this
//! computes the renormalisation exactly. Distances count from 0 at the query itself, which every
//! span keeps, so a full span is plain causal softmax. [`span_loss`] is the paper's penalty.

use crate::error::{AttnError, Result};
use crate::options::{Causal, Options, Pos, ScoreRule};
use crate::view::{View, ViewMut};

/// A span per query head, as a score rule.
#[derive(Clone, Copy, Debug)]
pub struct AdaptiveSpan<'a> {
    /// The learned span fraction $c_h$ of each query head (`[Hq]`), clamped to [0, 1].
    pub current: &'a [f32],
    /// The largest span `S`.
    pub max_span: usize,
    /// The ramp's width `R` (at least 1).
    pub ramp: usize,
}

impl AdaptiveSpan<'_> {
    fn z(&self, h: usize) -> f64 {
        self.current[h].clamp(0.0, 1.0) as f64 * self.max_span as f64
    }

    /// $m_h(x)$.
    fn mask(&self, at: Pos) -> f64 {
        let x = at.i as f64 - at.j as f64;
        ((self.ramp as f64 + self.z(at.h) - x) / self.ramp as f64).clamp(0.0, 1.0)
    }

    /// Keys a query may reach, itself included: `S + R` back at most.
    pub fn reach(&self) -> usize {
        self.max_span + self.ramp
    }

    /// The options that run the span on the fused kernel: causal (top-left), a window of
    /// [`AdaptiveSpan::reach`] keys back, and the rule.
    pub fn options(&self) -> Options<'_> {
        Options::new()
            .causal(Causal::TopLeft)
            .window(self.reach(), 0)
            .score_rule(self)
    }
}

impl ScoreRule for AdaptiveSpan<'_> {
    fn check(&self, [_, hq, nq, nk]: [usize; 4]) -> Result<()> {
        crate::error::expect_len("current", self.current.len(), hq)?;
        if self.ramp == 0 {
            return Err(AttnError::InvalidOption {
                option: "ramp",
                value: 0.0,
                reason: "the ramp needs a width of at least 1",
            });
        }
        if let Some(&c) = self.current.iter().find(|c| !c.is_finite()) {
            return Err(AttnError::InvalidOption {
                option: "current",
                value: c as f64,
                reason: "span fractions must be finite",
            });
        }
        if nq != nk {
            return Err(AttnError::ConflictingOptions {
                a: "adaptive span",
                b: "Nq ≠ Nk",
                reason: "distances i − j are those of self-attention",
            });
        }
        Ok(())
    }

    fn score(&self, s: f32, at: Pos) -> f32 {
        self.score_f64(s as f64, at) as f32
    }

    fn grad(&self, _: f32, _: Pos) -> f32 {
        1.0
    }

    fn score_f64(&self, s: f64, at: Pos) -> f64 {
        match self.mask(at) {
            m if m > 0.0 => s + m.ln(),
            _ => f64::NEG_INFINITY,
        }
    }

    fn grad_f64(&self, _: f64, _: Pos) -> f64 {
        1.0
    }

    fn params(&self) -> usize {
        self.current.len()
    }

    fn param_grad(&self, g: f32, at: Pos, grad: &mut [f32]) {
        grad[at.h] += (g as f64 * self.d_log_mask(at)) as f32;
    }

    fn param_grad_f64(&self, g: f64, at: Pos, grad: &mut [f64]) {
        grad[at.h] += g * self.d_log_mask(at);
    }
}

impl AdaptiveSpan<'_> {
    /// $\partial \ln m / \partial c_h$: $(S/R)/m$ on the ramp while $c_h$ is inside (0, 1).
    fn d_log_mask(&self, at: Pos) -> f64 {
        let (m, c) = (self.mask(at), self.current[at.h]);
        if m > 0.0 && m < 1.0 && c > 0.0 && c < 1.0 {
            self.max_span as f64 / self.ramp as f64 / m
        } else {
            0.0
        }
    }
}

/// Adaptive-span attention of `q` over `k`, `v` (self-attention, `Nq = Nk`) into `out`, and the
/// log-sum-exp when asked: [`crate::forward`] with [`AdaptiveSpan::options`].
///
/// ```
/// use attentive::variants::adaptive_span::{forward, AdaptiveSpan};
/// use attentive::{View, ViewMut};
/// let x = [0.3f32, -0.2, 0.5, 0.1, -0.4, 0.2];
/// let v = View::contiguous(&x, &[1, 1, 3, 2]).unwrap();
/// // A span of 0 with a ramp of 1: each query keeps only itself.
/// let span = AdaptiveSpan { current: &[0.0], max_span: 4, ramp: 1 };
/// let mut o = [0.0f32; 6];
/// forward(v, v, v, &span, &mut ViewMut::contiguous(&mut o, [1, 1, 3, 2]).unwrap(), None).unwrap();
/// assert_eq!(o, x);
/// ```
///
/// # Errors
/// As [`crate::forward`], and spans not one per query head, a zero ramp, `Nq ≠ Nk`.
pub fn forward(
    q: View,
    k: View,
    v: View,
    span: &AdaptiveSpan,
    out: &mut ViewMut,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    crate::forward(q, k, v, &span.options(), out, lse)
}

/// Gradients of adaptive-span attention: dQ, dK, dV, and each head's span fraction's into
/// `d_current` (`[Hq]`), from the forward's output and log-sum-exp.
///
/// # Errors
/// As [`crate::backward_rule_params`].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: View,
    k: View,
    v: View,
    (o, lse): (View, &[f32]),
    d_o: View,
    span: &AdaptiveSpan,
    (dq, dk, dv): (&mut ViewMut, &mut ViewMut, &mut ViewMut),
    d_current: &mut [f32],
) -> Result<()> {
    crate::error::expect_len("d_current", d_current.len(), span.current.len())?;
    d_current.fill(0.0);
    crate::backward_rule_params(q, k, v, o, lse, d_o, &span.options(), dq, dk, dv, d_current)
}

/// The paper's span penalty $\text{coeff}\cdot S\cdot\mathrm{mean}\_h\\,c_h$ and its gradient with
/// respect to each $c_h$.
pub fn span_loss(current: &[f32], max_span: usize, coeff: f32) -> (f32, Vec<f32>) {
    let n = current.len().max(1) as f32;
    let scale = coeff * max_span as f32;
    let loss = scale * current.iter().map(|c| c.clamp(0.0, 1.0)).sum::<f32>() / n;
    let grad = current
        .iter()
        .map(|&c| if c > 0.0 && c < 1.0 { scale / n } else { 0.0 })
        .collect();
    (loss, grad)
}
