//! # attentive: exact attention on the CPU
//!
//! Attention lets each query weigh every key by relevance:
//! $$O = \mathrm{softmax}\\!\left(\text{scale}\cdot QK^\top + \text{bias}\right) V,$$
//! with scale $1/\sqrt{D}$ by default. This crate computes it exactly, fused and tiled so memory
//! stays O(N) (the N×N weights are never stored), forward and backward, for multi-head, grouped-
//! query and multi-query layouts, with causal and sliding-window masks, document masks for packed
//! sequences, dense boolean masks and additive biases, ALiBi, soft-capping, user-defined mask and
//! score rules, and reproducible dropout; and the structured patterns of the literature
//! ([`Pattern`]: sliding and dilated windows, Sparse Transformer strided and fixed, Longformer,
//! BigBird, prefix-LM, attention sinks, unions and intersections), tabulated per tile in a
//! [`BlockMask`] so the kernels pay only for the tiles a pattern keeps.
//!
//! * [`positional`] — sinusoidal, learned, RoPE (both pairings), ALiBi slopes, T5 buckets.
//! * [`shaw`] — Shaw et al.'s relative position representations (learned key and value vectors
//!   per clipped distance), forward and backward on the fused kernel.
//!
//! * [`forward`] — output and log-sum-exp; [`backward`] — dQ, dK, dV from them;
//!   [`backward_weighted`] — those and $P\circ\partial L/\partial P$ per pair, for relevance;
//!   [`probabilities`] — the weights themselves, when you want to look.
//! * [`merge`] — combine attention computed over disjoint key sets (decode splits, ring attention).
//! * [`variants`] — attention that is not softmax over a mask (linear, gated linear, Performer,
//!   Linformer, Nyströmformer, Reformer LSH, adaptive span, additive and Luong with local-p,
//!   hierarchical pooling), each with its forward, backward and oracle.
//! * [`reference`](mod@reference) — the naive oracle of every option, in f64 or f32, to test against.
//! * [`matmul`] — dense products for the layers around attention, on the same micro-kernel.
//! * [`HugeVec`] — a buffer on 2 MiB pages for large inputs such as a KV cache, which decoding
//!   streams faster from there than from a `Vec`'s small pages.
//!
//! Each family lives in one place in the source: the fused exact kernel in `exact/`, masks and
//! patterns in `masks/` (public as [`pattern`] and [`blocks`]), positional schemes in
//! [`positional`], the other math in [`variants`], the oracles in [`reference`](mod@reference),
//! and below them the tile sizes and the rules on (b, h, i, j) ([`Pos`], [`MaskRule`],
//! [`ScoreRule`]) that they share; each imports only what lies below it.
//!
//! Tensors enter as [`View`]s: a slice, a shape `[B, H, N, D]` and any strides, so `[B, N, H, D]`
//! storage needs no copy. Every call validates its inputs first and returns an [`AttnError`]
//! rather than panicking; a request whose output or tables would not fit in the memory
//! available ([`available_memory`], capped by `ATTENTIVE_MAX_MEMORY`) is refused before
//! anything is allocated ([`AttnError::OutOfMemory`], with the size).
//!
//! **NaN and ±∞ in q, k and v** propagate as in PyTorch's math path, the same on every path
//! (tiled, decode, residue classes, f16 K/V, every instruction set, the backward): a NaN in
//! $q_i$, or in $k_j$ of a key row $i$ sees, makes row $i$ of the output and its log-sum-exp
//! NaN; a non-finite $v_{jc}$ of a key it sees makes $O_{ic}$ non-finite; a score of $+\infty$
//! makes the row NaN, one of $-\infty$ gives its key weight 0 (a row whose every score is
//! $-\infty$ is empty, as if masked: output 0, log-sum-exp $-\infty$). Keys a row does not see
//! never enter its weights, though a non-finite $v_j$ of such a key may reach the row through
//! a tile it shares with keys the row does see (0·NaN), and $\pm\infty$ times a
//! weight of 0 is NaN in the gradients, both as in PyTorch. No output is ever finite and wrong
//! (tested against the oracle, which computes the formulas in IEEE arithmetic, in
//! `tests/nonfinite.rs`).
//!
//! ```
//! use attentive::{forward, reference, Options, View, ViewMut};
//! let (b, h, n, d) = (2, 4, 100, 32);
//! let x: Vec<f32> = (0..b * h * n * d).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
//! let q = View::contiguous(&x, &[b, h, n, d]).unwrap();
//! let mut o = vec![0.0; x.len()];
//! forward(q, q, q, &Options::new(), &mut ViewMut::contiguous(&mut o, [b, h, n, d]).unwrap(), None)
//!     .unwrap();
//! let oracle = reference::forward::<f64>(q, q, q, &Options::new()).unwrap();
//! let err = o.iter().zip(&oracle.o).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
//! assert!(err < 1e-5);
//! ```

mod amx;
pub mod dense;
mod error;
mod exact;
mod masks;
mod options;
pub mod positional;
mod real;
pub mod reference;
mod rule;
mod simd;
mod tile;
pub mod variants;
mod view;
mod workspace;

pub use dense::matmul;
pub use error::{AttnError, Result};
pub use exact::backward::{backward, backward_rule_params, backward_weighted};
pub use exact::forward;
pub use exact::forward::{forward_half_kv, merge, probabilities, visible_pairs};
/// The f16 type K and V are stored in by [`forward_half_kv`].
pub use half::f16;
pub use masks::blocks::{BlockCounts, BlockMask};
pub use masks::dropout::Dropout;
pub use masks::{blocks, pattern};
pub use options::{Causal, DocIds, Options, Window};
pub use pattern::{Pattern, PatternError};
pub use positional::shaw;
pub use rule::{MaskRule, Pos, ScoreRule};
pub use simd::Isa;
pub use view::{contiguous_strides, View, ViewMut};
pub use workspace::{available_memory, check_memory, Element, HugeVec};
