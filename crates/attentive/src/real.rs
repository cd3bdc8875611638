//! The float types the oracles compute in (`f64` for the oracle, `f32` for the naive baseline
//! the accuracy rule compares against): below the oracles of every family.

use crate::rule::{Pos, ScoreRule};
use std::ops::{Add, Mul, Neg, Sub};

/// The float types the oracle computes in.
pub trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Neg<Output = Self>
    + Send
    + Sync
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn from_f32(x: f32) -> Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn recip(self) -> Self;
    fn sqrt(self) -> Self;
    fn rule_score(rule: &dyn ScoreRule, s: Self, at: Pos) -> Self;
    fn rule_grad(rule: &dyn ScoreRule, s: Self, at: Pos) -> Self;
    fn rule_param_grad(rule: &dyn ScoreRule, g: Self, at: Pos, grad: &mut [Self]);
}

macro_rules! real {
    ($t:ty, $score:ident, $grad:ident, $param:ident) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn recip(self) -> Self {
                1.0 / self
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn rule_score(rule: &dyn ScoreRule, s: Self, at: Pos) -> Self {
                rule.$score(s, at)
            }
            fn rule_grad(rule: &dyn ScoreRule, s: Self, at: Pos) -> Self {
                rule.$grad(s, at)
            }
            fn rule_param_grad(rule: &dyn ScoreRule, g: Self, at: Pos, grad: &mut [Self]) {
                rule.$param(g, at, grad)
            }
        }
    };
}
real!(f32, score, grad, param_grad);
real!(f64, score_f64, grad_f64, param_grad_f64);
