//! The one error type of the viz crate.

use thiserror::Error;

/// Every way a map, a method or a view can be refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum VizError {
    /// Maps whose shape is empty, does not match their data, or disagrees with the tokens.
    #[error("attention maps of shape {shape:?}: {reason}")]
    Shape { shape: [usize; 4], reason: String },
    /// A weight that is not a finite, non-negative number.
    #[error("layer {layer}, head {head}, row {row}, column {col}: weight {value} is not a finite non-negative number")]
    Weight {
        layer: usize,
        head: usize,
        row: usize,
        col: usize,
        value: f32,
    },
    /// A method that needs self-attention (the same tokens as queries and keys).
    #[error("{method} needs self-attention maps (queries and keys the same tokens)")]
    NotSelfAttention { method: &'static str },
    /// A request outside what the maps hold (a layer, head or row index).
    #[error("{what} {index} is out of range (there are {count})")]
    OutOfRange {
        what: &'static str,
        index: usize,
        count: usize,
    },
    /// A request for more work than the method allows; `limit` says how much it takes.
    #[error("{method}: {reason}")]
    TooLarge {
        method: &'static str,
        reason: String,
    },
    /// A view that could not be rendered as PNG.
    #[error("PNG: {0}")]
    Render(String),
    /// Input that is empty where something is needed.
    #[error("{0}")]
    Empty(String),
}

/// Result of the viz crate's calls.
pub type Result<T> = std::result::Result<T, VizError>;
