//! The one error type of the model crate.

use std::path::PathBuf;
use thiserror::Error;

/// Every way loading or running a pretrained model can fail.
#[derive(Debug, Error)]
pub enum ModelError {
    /// No model where one was asked for; `hint` says how to get one.
    #[error("no model at {path}: {hint}")]
    NotFound { path: PathBuf, hint: String },
    /// A file the model needs is not in its directory, cache snapshot or wheel.
    #[error("{source_path}: has no {file}")]
    MissingFile { source_path: PathBuf, file: String },
    /// A file that could not be read.
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    /// A JSON file that does not parse, or lacks a field.
    #[error("{file}: {message}")]
    Json { file: String, message: String },
    /// A safetensors file that does not parse (truncated, corrupt).
    #[error("model.safetensors: {0}")]
    Safetensors(String),
    /// A parameter the configuration needs is not in the weights.
    #[error("model.safetensors has no tensor {name} (nor bert.{name})")]
    MissingTensor { name: String },
    /// A parameter whose shape disagrees with the configuration.
    #[error("tensor {name}: shape {got:?}, but config.json implies {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A parameter stored in a type other than f32 (or f16/bf16, which are widened).
    #[error("tensor {name}: dtype {dtype}, expected a float type")]
    TensorDtype { name: String, dtype: String },
    /// A configuration value this implementation does not support.
    #[error("config.json: {field} = {value} is not supported ({reason})")]
    Unsupported {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// The tokenizer refused the text or its file.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Input the model cannot take.
    #[error("{0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result of the model crate's calls.
pub type Result<T> = std::result::Result<T, ModelError>;
