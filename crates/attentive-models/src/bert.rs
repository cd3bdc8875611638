//! A BERT encoder (Devlin et al., 2019) exactly as HuggingFace's `BertModel` computes it, with
//! its self-attention on attentive's fused kernel.
//!
//! For token ids $t_1 \dots t_N$ and token types $s_i$,
//! $$x_i = \mathrm{LN}\big(E_w\[t_i\] + E_p\[i\] + E_s\[s_i\]\big),$$
//! then $L$ post-norm layers
//! $$x \leftarrow \mathrm{LN}\big(x + \mathrm{MHA}(x)\big),\qquad
//!   x \leftarrow \mathrm{LN}\big(x + W_2\\,\mathrm{GELU}(W_1 x + b_1) + b_2\big),$$
//! with $\mathrm{GELU}(x) = x\\,\Phi(x)$ (the erf form, HF's `"gelu"`). Padding is a key mask:
//! a padded position gets weight exactly 0 as a key, so every sentence of a padded batch gets
//! the numbers it gets alone.

use crate::error::{ModelError, Result};
use crate::files::ModelFiles;
use attentive_nn::op::{attention, AttnConfig};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

/// The fields of a HuggingFace `config.json` that a BERT encoder needs.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_pos() -> String {
    "absolute".into()
}

/// The feed-forward nonlinearity.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    /// $x\\,\Phi(x)$, HF's `"gelu"`.
    GeluErf,
    /// The tanh approximation, HF's `"gelu_new"` and `"gelu_pytorch_tanh"`.
    GeluTanh,
    Relu,
}

struct Linear {
    /// `Wᵀ`, `[in, out]` row-major (HF stores `W` as `[out, in]`; transposed once at load).
    wt: Vec<f32>,
    b: Vec<f32>,
    d_in: usize,
    d_out: usize,
}

impl Linear {
    /// `x Wᵀ + b` over the last axis, as one product of `[rows, in]` by `[in, out]` on
    /// attentive's GEMM ([`attentive::matmul`], bias added in it): candle's own product ran at
    /// 177–185 GFLOP/s on these shapes on the Xeon of BENCHMARKS.md.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0.0f32; rows * self.d_out];
        attentive::matmul(
            &xs,
            &self.wt,
            Some(&self.b),
            (rows, self.d_in, self.d_out),
            &mut y,
        )
        .map_err(|e| ModelError::Input(e.to_string()))?;
        let mut out = dims;
        *out.last_mut().expect("at least one axis") = self.d_out;
        Ok(Tensor::from_vec(y, out, x.device())?)
    }
}

struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.gamma,
            &self.beta,
            self.eps,
        )?)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: LayerNorm,
    up: Linear,
    down: Linear,
    ln2: LayerNorm,
}

/// A BERT encoder with its weights.
pub struct Bert {
    pub config: BertConfig,
    act: Act,
    word: Tensor,
    pos: Tensor,
    types: Tensor,
    ln: LayerNorm,
    layers: Vec<Layer>,
}

/// What [`Bert::forward`] returns for a batch of `B` sequences of `N` tokens.
pub struct BertOutput {
    /// The last layer's token states, `[B, N, hidden]`.
    pub hidden: Tensor,
    /// Per layer, the attention probabilities `[B, heads, N, N]` (row-major), when asked for.
    pub attentions: Option<Vec<Vec<f32>>>,
}

/// The weights by name, with HF's optional `bert.` prefix; each taken at most once.
struct Weights {
    map: HashMap<String, Tensor>,
}

impl Weights {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .map
            .remove(name)
            .or_else(|| self.map.remove(&format!("bert.{name}")))
            .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
        if !matches!(
            t.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(ModelError::TensorDtype {
                name: name.into(),
                dtype: format!("{:?}", t.dtype()),
            });
        }
        if t.dims() != shape {
            return Err(ModelError::TensorShape {
                name: name.into(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    }

    fn linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        let w = self.take(&format!("{name}.weight"), &[d_out, d_in])?;
        Ok(Linear {
            wt: w.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
            b: self
                .take(&format!("{name}.bias"), &[d_out])?
                .to_vec1::<f32>()?,
            d_in,
            d_out,
        })
    }

    fn layer_norm(&mut self, name: &str, d: usize, eps: f32) -> Result<LayerNorm> {
        // Old checkpoints name LayerNorm's parameters gamma and beta.
        let get = |w: &mut Self, new: &str, old: &str| match w.take(&format!("{name}.{new}"), &[d])
        {
            Err(ModelError::MissingTensor { .. }) => w
                .take(&format!("{name}.{old}"), &[d])
                .map_err(|_| ModelError::MissingTensor {
                    name: format!("{name}.{new}"),
                }),
            r => r,
        };
        Ok(LayerNorm {
            gamma: get(self, "weight", "gamma")?,
            beta: get(self, "bias", "beta")?,
            eps,
        })
    }
}

impl Bert {
    /// Reads `config.json` and `model.safetensors` from `files` and checks every tensor's
    /// presence, shape and type against the configuration.
    pub fn load(files: &ModelFiles) -> Result<Self> {
        Self::from_bytes(
            &files.read("config.json")?,
            &files.read("model.safetensors")?,
        )
    }

    /// [`Bert::load`] from the bytes of `config.json` and `model.safetensors`.
    pub fn from_bytes(config: &[u8], safetensors: &[u8]) -> Result<Self> {
        let config: BertConfig = serde_json::from_slice(config).map_err(|e| ModelError::Json {
            file: "config.json".into(),
            message: e.to_string(),
        })?;
        let map = candle_core::safetensors::load_buffer(safetensors, &Device::Cpu)
            .map_err(|e| ModelError::Safetensors(e.to_string()))?;
        Self::from_weights(config, map)
    }

    /// A model from a configuration and its tensors by HF name.
    pub fn from_weights(config: BertConfig, map: HashMap<String, Tensor>) -> Result<Self> {
        let act = match config.hidden_act.as_str() {
            "gelu" => Act::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "relu" => Act::Relu,
            other => {
                return Err(ModelError::Unsupported {
                    field: "hidden_act",
                    value: other.into(),
                    reason: "gelu, gelu_new, gelu_pytorch_tanh and relu are",
                })
            }
        };
        if config.position_embedding_type != "absolute" {
            return Err(ModelError::Unsupported {
                field: "position_embedding_type",
                value: config.position_embedding_type.clone(),
                reason: "only absolute position embeddings are",
            });
        }
        let (h, heads) = (config.hidden_size, config.num_attention_heads);
        if heads == 0 || h % heads != 0 {
            return Err(ModelError::Unsupported {
                field: "num_attention_heads",
                value: heads.to_string(),
                reason: "it must divide hidden_size",
            });
        }
        let eps = config.layer_norm_eps as f32;
        let mut w = Weights { map };
        let word = w.take("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let pos = w.take(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let types = w.take(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let ln = w.layer_norm("embeddings.LayerNorm", h, eps)?;
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                Ok(Layer {
                    q: w.linear(&format!("{p}.attention.self.query"), h, h)?,
                    k: w.linear(&format!("{p}.attention.self.key"), h, h)?,
                    v: w.linear(&format!("{p}.attention.self.value"), h, h)?,
                    o: w.linear(&format!("{p}.attention.output.dense"), h, h)?,
                    ln1: w.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                    up: w.linear(
                        &format!("{p}.intermediate.dense"),
                        h,
                        config.intermediate_size,
                    )?,
                    down: w.linear(&format!("{p}.output.dense"), config.intermediate_size, h)?,
                    ln2: w.layer_norm(&format!("{p}.output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            act,
            word,
            pos,
            types,
            ln,
            layers,
        })
    }

    /// Runs the encoder on `ids` (`B × N`, row-major), `mask` (`B × N`, `true` = a real token,
    /// `false` = padding) and token types (all 0 when `None`). With `attentions`, also returns
    /// every layer's attention probabilities from the kernel's `probabilities` (the only O(N²)
    /// memory of the call).
    pub fn forward(
        &self,
        ids: &[u32],
        mask: &[bool],
        types: Option<&[u32]>,
        n: usize,
        attentions: bool,
    ) -> Result<BertOutput> {
        let c = &self.config;
        if n == 0 || ids.is_empty() || !ids.len().is_multiple_of(n) || mask.len() != ids.len() {
            return Err(ModelError::Input(format!(
                "{} ids and {} mask entries do not make rows of {n} tokens",
                ids.len(),
                mask.len()
            )));
        }
        if n > c.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "{n} tokens exceed the model's {} positions",
                c.max_position_embeddings
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        let zeros = vec![0u32; ids.len()];
        let types = types.unwrap_or(&zeros);
        if types.len() != ids.len() || types.iter().any(|&t| t as usize >= c.type_vocab_size) {
            return Err(ModelError::Input(format!(
                "token types must be {} values below {}",
                ids.len(),
                c.type_vocab_size
            )));
        }
        let (b, h, heads) = (ids.len() / n, c.hidden_size, c.num_attention_heads);
        let dh = h / heads;
        let dev = Device::Cpu;
        let ids_t = Tensor::from_slice(ids, ids.len(), &dev)?;
        let types_t = Tensor::from_slice(types, ids.len(), &dev)?;
        let x = self.word.index_select(&ids_t, 0)?.reshape((b, n, h))?; // [B, N, H]
        let t = self.types.index_select(&types_t, 0)?.reshape((b, n, h))?; // [B, N, H]
        let p = self.pos.narrow(0, 0, n)?; //                                    [N, H]
        let mut x = self.ln.forward(&(x + t)?.broadcast_add(&p)?)?; //           [B, N, H]
        let cfg = AttnConfig {
            key_mask: Some(mask.to_vec()),
            ..Default::default()
        };
        let mut maps = attentions.then(Vec::new);
        for layer in &self.layers {
            // [B, N, H] → [B, N, heads, dh] → [B, heads, N, dh] (a strided view, no copy)
            let split = |l: &Linear| -> Result<Tensor> {
                Ok(l.forward(&x)?.reshape((b, n, heads, dh))?.transpose(1, 2)?)
            };
            let (q, k, v) = (split(&layer.q)?, split(&layer.k)?, split(&layer.v)?);
            if let Some(maps) = maps.as_mut() {
                maps.push(probabilities(&q, &k, mask)?);
            }
            let a = attention(&q, &k, &v, &cfg)? //                              [B, heads, N, dh]
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, n, h))?; //                                         [B, N, H]
            x = layer.ln1.forward(&(layer.o.forward(&a)? + &x)?)?;
            let up = layer.up.forward(&x)?; //                                   [B, N, I]
            let up = match self.act {
                Act::GeluErf => gelu_erf(&up)?,
                Act::GeluTanh => up.gelu()?,
                Act::Relu => up.relu()?,
            };
            x = layer.ln2.forward(&(layer.down.forward(&up)? + &x)?)?;
        }
        Ok(BertOutput {
            hidden: x,
            attentions: maps,
        })
    }

    /// The model's token-state width.
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }
}

/// $x\\,\Phi(x) = \tfrac{x}{2}\big(1 + \mathrm{erf}(x/\sqrt 2)\big)$ elementwise, with musl's
/// `erff` (within an ulp), in parallel: candle's own `gelu_erf` took 133 ms on a
/// `[32, 128, 1536]` tensor on 2 threads, half of a MiniLM forward; this takes a fraction.
fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    v.par_chunks_mut(16 * 1024).for_each(|c| {
        for y in c {
            *y = 0.5 * *y * (1.0 + libm::erff(*y * std::f32::consts::FRAC_1_SQRT_2));
        }
    });
    Ok(Tensor::from_vec(v, x.shape(), x.device())?)
}

/// Softmax weights of `q` `[B, heads, N, dh]` over `k` under a key mask, from the engine.
fn probabilities(q: &Tensor, k: &Tensor, mask: &[bool]) -> Result<Vec<f32>> {
    let (b, heads, n, dh) = q.dims4()?;
    let q = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let k = k.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let shape = [b, heads, n, dh];
    let err = |e: attentive::AttnError| ModelError::Input(e.to_string());
    let qv = attentive::View::contiguous(&q, &shape).map_err(err)?;
    let kv = attentive::View::contiguous(&k, &shape).map_err(err)?;
    let mv = attentive::View::new(mask, [b, 1, 1, n], [n, 0, 0, 1]).map_err(err)?;
    let mut opts = attentive::Options::new();
    opts.mask = Some(mv);
    attentive::probabilities(qv, kv, &opts).map_err(err)
}

/// `x / max(‖x‖₂, 1e-12)` along the last axis, as `torch.nn.functional.normalize`.
pub(crate) fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    Ok(x.broadcast_div(&norm)?)
}
