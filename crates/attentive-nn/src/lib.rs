//! # attentive-nn: attention models on candle, trained through the fused kernel
//!
//! * [`op`] — the engine's fused attention as a differentiable candle op (the forward keeps the
//!   log-sum-exp for the backward), and the same function composed of candle ops to check it.
//! * [`layers`] — seeded parameters, linear maps, embeddings, layer norm, softmax, dropout,
//!   feed-forward blocks.
//! * [`mha`] — multi-head attention: self and cross, grouped-query, KV cache, RoPE and ALiBi.
//! * [`scored`] — attention with a learned score: Bahdanau and Luong (dot, general, concat,
//!   local-p) for encoder–decoder models, and hierarchical attention pooling (HAN).
//! * [`variants`] — self-attention other than exact softmax (linear, Performer, LSH,
//!   Linformer, GLA, adaptive span) as differentiable ops on the engine, and the choice a
//!   Transformer makes.
//! * [`transformer`] — encoder and decoder layers (pre- and post-norm) and the encoder–decoder
//!   model.
//! * [`train`] — the warmup schedule, label smoothing, gradient clipping, checkpoints
//!   (safetensors plus a JSON config). The optimiser is candle's AdamW.
//! * [`g2p`] — spelling to pronunciation on the embedded CMU Pronouncing Dictionary: data split,
//!   training loop, greedy and beam decoding, alignments, PER and WER.
//!
//! ```
//! use attentive_nn::layers::Params;
//! use attentive_nn::mha::MultiHeadAttention;
//! use candle_core::{Device, Tensor};
//! let p = Params::new(0, &Device::Cpu);
//! // 8 query heads over 2 key/value heads (grouped-query attention).
//! let attn = MultiHeadAttention::new(&p.pp("attn"), 64, 8, 2, None)?;
//! let x = Tensor::randn(0f32, 1.0, (2, 10, 64), &Device::Cpu)?; // [B, N, d_model]
//! let y = attn.forward(&x, None, true, None, None, None)?; //        causal self-attention
//! assert_eq!(y.dims(), &[2, 10, 64]);
//! let grads = y.sum_all()?.backward()?;
//! assert!(p.vars().iter().all(|(_, v)| grads.get(v.as_tensor()).is_some()));
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod g2p;
mod host;
pub mod layers;
pub mod mha;
pub mod op;
pub mod scored;
pub mod train;
pub mod transformer;
pub mod variants;

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
