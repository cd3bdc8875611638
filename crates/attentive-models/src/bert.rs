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
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::time::{Duration, Instant};

mod backward;
pub use backward::WeightGrads;

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

impl Act {
    /// The activation, in place.
    fn apply(self, block: &mut [f32]) {
        match self {
            Act::GeluErf => attentive::dense::gelu_erf(block),
            Act::GeluTanh => block.iter_mut().for_each(|y| *y = gelu_tanh(*y)),
            Act::Relu => block.iter_mut().for_each(|y| *y = y.max(0.0)),
        }
    }
}

struct Linear {
    /// `Wᵀ` (`[in, out]`; HF stores `W` as `[out, in]`), packed once at load for the products.
    wt: attentive::dense::Packed,
    b: Vec<f32>,
    /// `W` packed, for the backward pass; made on its first use.
    w: std::sync::OnceLock<attentive::dense::Packed>,
}

impl Linear {
    /// `y = x Wᵀ + b` for `rows` rows of `x` (`[rows, in]` → `[rows, out]`), one product on
    /// attentive's GEMM with the bias added in it, then `then(r0, block)` on each finished block
    /// of whole rows (rows `r0..`) while it is in cache.
    fn forward(
        &self,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        then: impl Fn(usize, &mut [f32]) -> Result<()> + Sync,
    ) -> Result<()> {
        let failed = std::sync::Mutex::new(None);
        self.wt
            .matmul_then(
                attentive::Isa::best(),
                x,
                Some(&self.b),
                rows,
                y,
                |r0, block| {
                    if let Err(e) = then(r0, block) {
                        failed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                },
            )
            .map_err(engine)?;
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn d_out(&self) -> usize {
        self.wt.dims().1
    }
}

fn engine(e: attentive::AttnError) -> ModelError {
    ModelError::Input(e.to_string())
}

struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    /// `x ← LN(x + residual)` row by row.
    fn forward(&self, x: &mut [f32], residual: Option<&[f32]>) -> Result<()> {
        attentive::dense::add_layer_norm(x, residual, &self.gamma, &self.beta, self.eps)
            .map_err(engine)
    }

    /// `block ← LN(block + residual rows r0..)` for the blocks of rows [`Linear::forward`]
    /// hands over.
    fn with_residual<'a>(
        &'a self,
        residual: &'a [f32],
    ) -> impl Fn(usize, &mut [f32]) -> Result<()> + Sync + 'a {
        let d = self.gamma.len();
        move |r0, block| self.forward(block, Some(&residual[r0 * d..][..block.len()]))
    }
}

struct Layer {
    /// Q, K and V projections as one layer, `[hidden, 3·hidden]`.
    qkv: Linear,
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
    /// Word, position and token-type embeddings, `[rows, hidden]` row-major.
    word: Vec<f32>,
    pos: Vec<f32>,
    types: Vec<f32>,
    ln: LayerNorm,
    layers: Vec<Layer>,
    /// The activations of the last call (token states, Q/K/V, attention output, feed-forward),
    /// on 2 MiB pages, kept so that the next call of the same size or smaller maps and zeroes
    /// no memory: at 32 × 128 tokens of MiniLM, 56 MiB.
    workspace: std::sync::Mutex<Vec<attentive::HugeVec<f32>>>,
}

/// What [`Bert::forward`] returns for a batch of `B` sequences of `N` tokens.
pub struct BertOutput {
    /// The last layer's token states, `[B, N, hidden]`.
    pub hidden: Tensor,
    /// Per layer, the attention probabilities `[B, heads, N, N]` (row-major), when asked for.
    pub attentions: Option<Vec<Vec<f32>>>,
}

/// Where a forward's time goes, each step summed over the layers ([`Bert::forward_timed`]).
#[derive(Clone, Debug, Default)]
pub struct StepTimes {
    /// Embedding lookups and their LayerNorm.
    pub embeddings: Duration,
    /// The Q, K, V projections (one product).
    pub qkv: Duration,
    /// Attention itself (and the maps, when asked for).
    pub attention: Duration,
    /// The output projection, residual and LayerNorm.
    pub output: Duration,
    /// The feed-forward up-projection and its activation.
    pub feed_forward_up: Duration,
    /// The feed-forward down-projection, residual and LayerNorm.
    pub feed_forward_down: Duration,
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

    /// A linear layer's `Wᵀ` (`[in, out]`, row-major) and bias.
    fn linear_raw(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let w = self.take(&format!("{name}.weight"), &[d_out, d_in])?;
        Ok((
            w.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
            self.take(&format!("{name}.bias"), &[d_out])?
                .to_vec1::<f32>()?,
        ))
    }

    /// The layers `names` (each `d_in → d_out`) as one whose outputs are theirs side by side:
    /// Q, K and V in one product.
    fn linear(&mut self, names: &[String], d_in: usize, d_out: usize) -> Result<Linear> {
        let parts = names
            .iter()
            .map(|n| self.linear_raw(n, d_in, d_out))
            .collect::<Result<Vec<_>>>()?;
        let width = d_out * parts.len();
        let mut wt = Vec::with_capacity(d_in * width);
        for i in 0..d_in {
            for (p, _) in &parts {
                wt.extend_from_slice(&p[i * d_out..(i + 1) * d_out]);
            }
        }
        Ok(Linear {
            wt: attentive::dense::Packed::new(&wt, (d_in, width)).map_err(engine)?,
            b: parts.into_iter().flat_map(|(_, b)| b).collect(),
            w: Default::default(),
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
            gamma: get(self, "weight", "gamma")?.to_vec1::<f32>()?,
            beta: get(self, "bias", "beta")?.to_vec1::<f32>()?,
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
        let (word, pos, types) = (flat(&word)?, flat(&pos)?, flat(&types)?);
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                let one = |s: &str| [format!("{p}.{s}")];
                let qkv = ["query", "key", "value"].map(|m| format!("{p}.attention.self.{m}"));
                Ok(Layer {
                    qkv: w.linear(&qkv, h, h)?,
                    o: w.linear(&one("attention.output.dense"), h, h)?,
                    ln1: w.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                    up: w.linear(&one("intermediate.dense"), h, config.intermediate_size)?,
                    down: w.linear(&one("output.dense"), config.intermediate_size, h)?,
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
            workspace: Default::default(),
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
        self.forward_timed(ids, mask, types, n, attentions, None)
    }

    /// [`Bert::forward`], adding the time of each step to `times` (summed over the layers).
    pub fn forward_timed(
        &self,
        ids: &[u32],
        mask: &[bool],
        types: Option<&[u32]>,
        n: usize,
        attentions: bool,
        times: Option<&mut StepTimes>,
    ) -> Result<BertOutput> {
        let types = self.check_input(ids, mask, types, n)?;
        let c = &self.config;
        let (b, h, heads) = (ids.len() / n, c.hidden_size, c.num_attention_heads);
        let (dh, rows) = (h / heads, ids.len());
        let mut times = times;
        let mut clock = Instant::now();
        let mut lap = |slot: fn(&mut StepTimes) -> &mut Duration,
                       times: &mut Option<&mut StepTimes>| {
            let now = Instant::now();
            if let Some(t) = times.as_deref_mut() {
                *slot(t) += now - clock;
            }
            clock = now;
        };
        let ff = self.layers.first().map_or(0, |l| l.up.d_out());
        let mut bufs =
            self.take_buffers([rows * h, rows * 3 * h, rows * h, rows * h, rows * ff])?;
        let [x, qkv, a, y, up] = &mut bufs;
        let mut x = &mut x[..rows * h]; //                                       [B·N, H]
        let qkv = &mut qkv[..rows * 3 * h]; //                                   [B·N, 3H]
        let a = &mut a[..rows * h]; //                                           [B·N, H]
        let mut y = &mut y[..rows * h]; //                                       [B·N, H]
        let up = &mut up[..rows * ff]; //                                        [B·N, I]
        self.embed(ids, &types, n, x)?;
        // Q, K, V and the attention output as [B, heads, N, dh] views of [B·N, ·] rows.
        let head_view = [b, heads, n, dh];
        let qkv_strides = [n * 3 * h, dh, 3 * h, 1];
        let mask_view = attentive::View::new(mask, [b, 1, 1, n], [n, 0, 0, 1]).map_err(engine)?;
        let opts = attentive::Options::new().mask(mask_view);
        let mut maps = attentions.then(Vec::new);
        lap(|t| &mut t.embeddings, &mut times);
        for layer in &self.layers {
            layer.qkv.forward(x, rows, qkv, |_, _| Ok(()))?;
            lap(|t| &mut t.qkv, &mut times);
            let view = |part: usize| {
                attentive::View::new(&qkv[part * h..], head_view, qkv_strides).map_err(engine)
            };
            let (q, k, v) = (view(0)?, view(1)?, view(2)?);
            if let Some(maps) = maps.as_mut() {
                maps.push(attentive::probabilities(q, k, &opts).map_err(engine)?);
            }
            let mut out =
                attentive::ViewMut::new(a, head_view, [n * h, dh, h, 1]).map_err(engine)?;
            attentive::forward(q, k, v, &opts, &mut out, None).map_err(engine)?;
            lap(|t| &mut t.attention, &mut times);
            // y = LN(a Woᵀ + bo + x), each block of rows as soon as its product is done.
            layer.o.forward(a, rows, y, layer.ln1.with_residual(x))?;
            std::mem::swap(&mut x, &mut y);
            lap(|t| &mut t.output, &mut times);
            let act = self.act;
            layer.up.forward(x, rows, up, |_, block| {
                act.apply(block);
                Ok(())
            })?;
            lap(|t| &mut t.feed_forward_up, &mut times);
            layer
                .down
                .forward(up, rows, y, layer.ln2.with_residual(x))?;
            std::mem::swap(&mut x, &mut y);
            lap(|t| &mut t.feed_forward_down, &mut times);
        }
        let hidden = Tensor::from_slice(x, (b, n, h), &Device::Cpu)?;
        self.keep_buffers(bufs);
        Ok(BertOutput {
            hidden,
            attentions: maps,
        })
    }

    /// Checks a call's inputs; returns the token types (all 0 when `None`).
    fn check_input(
        &self,
        ids: &[u32],
        mask: &[bool],
        types: Option<&[u32]>,
        n: usize,
    ) -> Result<Vec<u32>> {
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
        let types = types.map_or_else(|| vec![0u32; ids.len()], <[u32]>::to_vec);
        if types.len() != ids.len() || types.iter().any(|&t| t as usize >= c.type_vocab_size) {
            return Err(ModelError::Input(format!(
                "token types must be {} values below {}",
                ids.len(),
                c.type_vocab_size
            )));
        }
        Ok(types)
    }

    /// `x ← LN(E_w[ids] + E_s[types] + E_p[position])`                        // [B·N, H]
    fn embed(&self, ids: &[u32], types: &[u32], n: usize, x: &mut [f32]) -> Result<()> {
        let h = self.config.hidden_size;
        for (i, row) in x.chunks_exact_mut(h).enumerate() {
            let (w, t, p) = (ids[i] as usize, types[i] as usize, i % n);
            for (j, y) in row.iter_mut().enumerate() {
                *y = (self.word[w * h + j] + self.types[t * h + j]) + self.pos[p * h + j];
            }
        }
        self.ln.forward(x, None)
    }

    /// Five buffers of at least `lens` elements: those the last call left, where they are
    /// large enough, else new ones.
    fn take_buffers(&self, lens: [usize; 5]) -> Result<[attentive::HugeVec<f32>; 5]> {
        let kept = std::mem::take(&mut *self.workspace.lock().unwrap_or_else(|p| p.into_inner()));
        let mut kept = kept.into_iter();
        let mut out = Vec::with_capacity(5);
        for len in lens {
            out.push(match kept.next() {
                Some(b) if b.len() >= len => b,
                _ => attentive::HugeVec::zeroed(len).map_err(engine)?,
            });
        }
        Ok(out
            .try_into()
            .unwrap_or_else(|_| unreachable!("five lengths, five buffers")))
    }

    /// Keeps a call's buffers for the next one.
    fn keep_buffers(&self, bufs: [attentive::HugeVec<f32>; 5]) {
        *self.workspace.lock().unwrap_or_else(|p| p.into_inner()) = bufs.into();
    }

    /// The model's token-state width.
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }
}

/// The tanh form of GELU (HF's `"gelu_new"`, `"gelu_pytorch_tanh"`):
/// $\tfrac{x}{2}\big(1 + \tanh\big(\sqrt{2/\pi}\\,(x + 0.044715\\,x^3)\big)\big)$.
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// A tensor's elements as one row-major `Vec`.
fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// `x / max(‖x‖₂, 1e-12)` along the last axis, as `torch.nn.functional.normalize`.
pub(crate) fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    Ok(x.broadcast_div(&norm)?)
}
