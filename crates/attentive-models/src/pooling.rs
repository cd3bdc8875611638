//! sentence-transformers' pooling: token states to one vector per sentence, as
//! `1_Pooling/config.json` and `modules.json` configure it.
//!
//! With token states $h_i$ and the real (non-padding) tokens $M$ of a sentence:
//! mean $\frac{1}{|M|}\sum_{i\in M} h_i$; CLS $h_1$; max $\max_{i\in M} h_i$ per feature;
//! mean-sqrt-len $\frac{1}{\sqrt{|M|}}\sum_{i\in M} h_i$. Several modes concatenate in that
//! library's order (CLS, max, mean, mean-sqrt-len); a `Normalize` module then divides by the L2
//! norm.

use crate::error::{ModelError, Result};
use crate::files::ModelFiles;
use candle_core::{DType, Tensor, D};

/// The pooling of a sentence-transformers model.
#[derive(Clone, Debug, PartialEq)]
pub struct Pooling {
    pub cls: bool,
    pub max: bool,
    pub mean: bool,
    pub mean_sqrt_len: bool,
    /// L2-normalise the pooled vector (a `Normalize` module follows).
    pub normalize: bool,
}

#[derive(serde::Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(serde::Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

impl Pooling {
    /// The pooling `modules.json` describes; mean pooling without normalisation when the model
    /// has no `modules.json` (a plain BERT checkpoint).
    pub fn load(files: &ModelFiles) -> Result<Self> {
        let Some(modules) = files.json::<Vec<Module>>("modules.json")? else {
            return Ok(Self {
                cls: false,
                max: false,
                mean: true,
                mean_sqrt_len: false,
                normalize: false,
            });
        };
        let pooling = modules
            .iter()
            .find(|m| m.kind.ends_with("Pooling"))
            .map(|m| format!("{}/config.json", m.path.trim_end_matches('/')));
        let c: PoolingConfig = match pooling {
            Some(p) => files.json(&p)?.ok_or_else(|| ModelError::MissingFile {
                source_path: files.origin().into(),
                file: p,
            })?,
            None => PoolingConfig {
                pooling_mode_mean_tokens: true,
                ..Default::default()
            },
        };
        if c.pooling_mode_weightedmean_tokens || c.pooling_mode_lasttoken {
            return Err(ModelError::Unsupported {
                field: "pooling_mode",
                value: "weightedmean or lasttoken".into(),
                reason: "cls, max, mean and mean_sqrt_len are",
            });
        }
        let p = Self {
            cls: c.pooling_mode_cls_token,
            max: c.pooling_mode_max_tokens,
            mean: c.pooling_mode_mean_tokens,
            mean_sqrt_len: c.pooling_mode_mean_sqrt_len_tokens,
            normalize: modules.iter().any(|m| m.kind.ends_with("Normalize")),
        };
        if !(p.cls || p.max || p.mean || p.mean_sqrt_len) {
            return Err(ModelError::Unsupported {
                field: "pooling_mode",
                value: "none".into(),
                reason: "at least one pooling mode must be on",
            });
        }
        Ok(p)
    }

    /// Pools `hidden` `[B, N, H]` under `mask` (`B × N`, `true` = real token) to `[B, H·modes]`.
    pub fn apply(&self, hidden: &Tensor, mask: &[bool]) -> Result<Tensor> {
        let (b, n, _) = hidden.dims3()?;
        let m: Vec<f32> = mask.iter().map(|&x| x as u8 as f32).collect();
        let m = Tensor::from_vec(m, (b, n, 1), hidden.device())?; //            [B, N, 1]
        let count = m.sum(1)?.maximum(1e-9)?; //                                  [B, 1]
        let sum = hidden.broadcast_mul(&m)?.sum(1)?; //                           [B, H]
        let mut parts = Vec::new();
        if self.cls {
            parts.push(hidden.narrow(1, 0, 1)?.squeeze(1)?);
        }
        if self.max {
            // Padding set to −1e9 first, as sentence-transformers does.
            let pad = ((m.ones_like()? - &m)? * -1e9)?;
            parts.push(hidden.broadcast_add(&pad)?.max(1)?);
        }
        if self.mean {
            parts.push(sum.broadcast_div(&count)?);
        }
        if self.mean_sqrt_len {
            parts.push(sum.broadcast_div(&count.sqrt()?)?);
        }
        let pooled = Tensor::cat(&parts, D::Minus1)?.to_dtype(DType::F32)?;
        if self.normalize {
            crate::bert::l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }
}

/// The pooled vector before normalisation, in f64, and for max pooling each feature's token.
struct Raw {
    pooled: Vec<f64>,
    argmax: Vec<usize>,
    count: f64,
}

impl Pooling {
    /// [`Pooling::apply`] on plain buffers for sentence `s` of `hidden` (`[B·N, H]`): the
    /// sentence vector as the model outputs it, in f64.
    pub(crate) fn embed_rows(&self, hidden: &[f32], mask: &[bool], n: usize, s: usize) -> Vec<f64> {
        let raw = self.raw(hidden, mask, n, s);
        match self.normalize {
            true => {
                let norm = raw
                    .pooled
                    .iter()
                    .map(|x| x * x)
                    .sum::<f64>()
                    .sqrt()
                    .max(1e-12);
                raw.pooled.iter().map(|x| x / norm).collect()
            }
            false => raw.pooled,
        }
    }

    /// Adds to `d_hidden` (`[B·N, H]`) the gradient of `y` given `d_embed` = ∂y/∂(sentence
    /// `s`'s vector as [`Pooling::embed_rows`] gives it).
    pub(crate) fn backward_rows(
        &self,
        hidden: &[f32],
        mask: &[bool],
        n: usize,
        s: usize,
        d_embed: &[f64],
        d_hidden: &mut [f32],
    ) {
        let h = hidden.len() / mask.len();
        let raw = self.raw(hidden, mask, n, s);
        // e = p / max(‖p‖, 1e-12): ∂y/∂p = (∂y/∂e − e (e·∂y/∂e)) / ‖p‖ while ‖p‖ > 1e-12.
        let dp: Vec<f64> = if self.normalize {
            let norm = raw.pooled.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 1e-12 {
                let e: Vec<f64> = raw.pooled.iter().map(|x| x / norm).collect();
                let ed: f64 = e.iter().zip(d_embed).map(|(a, b)| a * b).sum();
                e.iter()
                    .zip(d_embed)
                    .map(|(e, d)| (d - e * ed) / norm)
                    .collect()
            } else {
                d_embed.iter().map(|d| d / 1e-12).collect()
            }
        } else {
            d_embed.to_vec()
        };
        let real: Vec<usize> = (0..n).filter(|&i| mask[s * n + i]).collect();
        let mut add = |i: usize, f: usize, g: f64| d_hidden[(s * n + i) * h + f] += g as f32;
        let mut at = 0;
        if self.cls {
            (0..h).for_each(|f| add(0, f, dp[at + f]));
            at += h;
        }
        if self.max {
            (0..h).for_each(|f| add(raw.argmax[f], f, dp[at + f]));
            at += h;
        }
        for (on, div) in [
            (self.mean, raw.count),
            (self.mean_sqrt_len, raw.count.sqrt()),
        ] {
            if on {
                for &i in &real {
                    (0..h).for_each(|f| add(i, f, dp[at + f] / div));
                }
                at += h;
            }
        }
    }

    fn raw(&self, hidden: &[f32], mask: &[bool], n: usize, s: usize) -> Raw {
        let h = hidden.len() / mask.len();
        let row = |i: usize| &hidden[(s * n + i) * h..][..h];
        let real: Vec<usize> = (0..n).filter(|&i| mask[s * n + i]).collect();
        let count = (real.len() as f64).max(1e-9);
        let mut sum = vec![0.0f64; h];
        let mut argmax = vec![0usize; h];
        let mut best = vec![f64::NEG_INFINITY; h];
        for &i in &real {
            for (f, &x) in row(i).iter().enumerate() {
                sum[f] += x as f64;
                if (x as f64) > best[f] {
                    (best[f], argmax[f]) = (x as f64, i);
                }
            }
        }
        let mut pooled = Vec::new();
        if self.cls {
            pooled.extend(row(0).iter().map(|&x| x as f64));
        }
        if self.max {
            pooled.extend(&best);
        }
        if self.mean {
            pooled.extend(sum.iter().map(|x| x / count));
        }
        if self.mean_sqrt_len {
            pooled.extend(sum.iter().map(|x| x / count.sqrt()));
        }
        Raw {
            pooled,
            argmax,
            count,
        }
    }
}
