//! # attentive-nn: attention models on candle, trained through the fused kernel
//!
//! * [`op`] — the engine's fused attention as a differentiable candle op (the forward keeps the
//!   log-sum-exp for the backward), and the same function composed of candle ops to check it.
//! * [`layers`] — seeded parameters, linear maps, embeddings, layer norm, softmax, dropout,
//!   feed-forward blocks.
//! * [`mha`] — multi-head attention: self and cross, grouped-query, KV cache, RoPE and ALiBi.
//! * [`transformer`] — encoder and decoder layers (pre- and post-norm) and the encoder–decoder
//!   model.
//! * [`train`] — the warmup schedule, label smoothing, gradient clipping, checkpoints
//!   (safetensors plus a JSON config). The optimiser is candle's AdamW.
//! * [`g2p`] — spelling to pronunciation on the embedded CMU Pronouncing Dictionary: data split,
//!   training loop, greedy and beam decoding, alignments, PER and WER.

pub mod g2p;
pub mod layers;
pub mod mha;
pub mod op;
pub mod train;
pub mod transformer;

/// What can go wrong outside a tensor operation: files and configurations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Config {
        path: std::path::PathBuf,
        message: String,
    },
}
