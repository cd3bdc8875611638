//! Which pairs attend: the structured patterns of the literature ([`pattern`]), their tables
//! per tile ([`blocks`]), and reproducible dropout of the weights ([`dropout`]), each a rule on
//! (batch, head, query, key) that the fused kernel applies rather than a kernel of its own.

pub mod blocks;
pub(crate) mod dropout;
pub mod pattern;
