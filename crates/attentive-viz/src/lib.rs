//! See what a Transformer attends to: attention maps `[layers, heads, queries, keys]` with their
//! tokens, from an attentive model or from anywhere (a `.npy` file and a token list), turned
//! into the views and numbers people reach for, offline.
//!
//! - [`Maps`]: the input, validated once (shape against tokens; finite, non-negative weights;
//!   rows that do not sum to 1 reported, not renormalised).
//! - [`rollout`]: attention rollout and attention flow (Abnar & Zuidema, 2020).
//! - [`relevance`]: gradient-weighted relevance (Chefer et al., 2021), self-attention and
//!   encoder–decoder, from $\nabla A \odot A$ that attentive's backward forms.
//! - [`stats`]: per-head entropy, distance, special-token and punctuation shares, neighbours
//!   (Clark et al., 2019).
//! - [`stream`]: the same for long inputs, rows arriving block by block, without `L·H·N²`
//!   weights in memory.
//! - [`svg`]: heatmaps, the head view, bars and thumbnails, each a standalone SVG.
//! - [`png`]: any view as PNG, rendered in Rust.
//! - [`Report`]: all of it for one input: `index.html` (inline SVG, CSS and a small script, no
//!   external URL), every view's SVG, and `attention.json` with every number shown.
//!
//! ```
//! use attentive_viz::{Maps, Report};
//! let tokens: Vec<String> = ["[CLS]", "hello", "[SEP]"].map(String::from).to_vec();
//! let maps = Maps::self_attention(vec![1.0 / 3.0; 9], [1, 1, 3], tokens).unwrap();
//! let out = Report::new(&maps, "hello").build().unwrap();
//! assert!(out.html.contains("<svg") && !out.html.contains("http"));
//! assert_eq!(out.json["tokens"][1], "hello");
//! ```
//!
//! The crate depends on the engine (its products carry rollout) and on no tensor framework.

pub mod error;
pub mod maps;
pub mod png;
pub mod relevance;
pub mod report;
pub mod rollout;
pub mod stats;
pub mod stream;
pub mod svg;

pub use error::{Result, VizError};
pub use maps::Maps;
pub use report::{Outputs, Relevance, Report};
pub use rollout::{Fusion, Reading};
