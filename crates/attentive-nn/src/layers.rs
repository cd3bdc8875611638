//! Parameters and the small layers a Transformer is built from: linear maps, embeddings, layer
//! norm, feed-forward blocks, softmax and dropout — each differentiable through candle's
//! autograd.
//!
//! Parameters live in a [`Params`] store: every tensor has a dotted name (`enc.0.attn.q.weight`)
//! under which checkpoints save it, and is initialised from the store's seeded generator, so a
//! run with the same seed starts from the same weights.

use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};

/// How a new parameter is filled.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// Glorot & Bengio's uniform: $U(-a, a)$ with $a = \sqrt{6/(\text{fan}\_\text{in} + \text{fan}\_\text{out})}$.
    Xavier {
        fan_in: usize,
        fan_out: usize,
    },
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    Const(f64),
}

struct Store {
    vars: Vec<(String, Var)>,
    rng: rand::rngs::StdRng,
}

/// Named, trainable parameters, created on first use under a prefix path.
#[derive(Clone)]
pub struct Params {
    store: Arc<Mutex<Store>>,
    prefix: String,
    device: Device,
}

impl Params {
    /// An empty store whose initial values come from `seed`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            store: Arc::new(Mutex::new(Store {
                vars: Vec::new(),
                rng: rand::rngs::StdRng::seed_from_u64(seed),
            })),
            prefix: String::new(),
            device: device.clone(),
        }
    }

    /// The same store, with `name` appended to the prefix.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            store: self.store.clone(),
            prefix,
            device: self.device.clone(),
        }
    }

    /// The prefix path, `a.b.c`.
    pub fn path(&self) -> &str {
        &self.prefix
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A new parameter `prefix.name` of `shape`, filled by `init`.
    pub fn get(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let full = self.pp(name).prefix;
        let mut st = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if st.vars.iter().any(|(n, _)| *n == full) {
            candle_core::bail!("parameter {full} created twice");
        }
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Xavier { fan_in, fan_out } => {
                let a = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                (0..n).map(|_| st.rng.random_range(-a..a)).collect()
            }
            Init::Normal(sd) => (0..n)
                .map(|_| {
                    // Box–Muller.
                    let (u, v): (f64, f64) = (st.rng.random(), st.rng.random());
                    ((-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos() * sd) as f32
                })
                .collect(),
            Init::Const(c) => vec![c as f32; n],
        };
        let var = Var::from_tensor(&Tensor::from_vec(data, shape, &self.device)?)?;
        st.vars.push((full, var.clone()));
        Ok(var.as_tensor().clone())
    }

    /// Every parameter, in creation order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let st = self.store.lock().unwrap_or_else(|e| e.into_inner());
        st.vars.clone()
    }

    /// Draws from the store's generator (dropout masks, seeds of attention dropout).
    pub fn next_u64(&self) -> u64 {
        self.store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rng
            .random()
    }

    /// Saves every parameter to a safetensors file.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path)
    }

    /// Overwrites every parameter with the tensor of the same name in a safetensors file; fails
    /// on a missing name or a shape that differs.
    pub fn load(&self, path: &std::path::Path) -> Result<()> {
        let data = std::fs::read(path)?;
        self.load_bytes(&data)
    }

    /// [`load`](Self::load) from the bytes of a safetensors file.
    pub fn load_bytes(&self, data: &[u8]) -> Result<()> {
        let map = candle_core::safetensors::load_buffer(data, &self.device)?;
        for (name, var) in self.vars() {
            let t = map
                .get(&name)
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks {name}")))?;
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "checkpoint's {name} is {:?}, the model's is {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}

/// $y = xW^\top + b$ over the last axis.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,       // [out, in]
    pub bias: Option<Tensor>, // [out]
}

impl Linear {
    /// Xavier-initialised weights and zero bias.
    pub fn new(p: &Params, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let init = Init::Xavier {
            fan_in: d_in,
            fan_out: d_out,
        };
        Ok(Self {
            weight: p.get("weight", &[d_out, d_in], init)?,
            bias: if bias {
                Some(p.get("bias", &[d_out], Init::Const(0.0))?)
            } else {
                None
            },
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / d_in.max(1);
        let y = x.reshape((rows, d_in))?.matmul(&self.weight.t()?)?; // [rows, out]
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// A table of `n` learned vectors of width `d`, looked up by index.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub table: Tensor, // [n, d]
}

impl Embedding {
    /// Normal initialisation with standard deviation $d^{-1/2}$ (the scale at which embeddings
    /// multiplied by $\sqrt d$ have unit variance).
    pub fn new(p: &Params, n: usize, d: usize) -> Result<Self> {
        Ok(Self {
            table: p.get("weight", &[n, d], Init::Normal((d as f64).powf(-0.5)))?,
        })
    }

    /// `ids` of any shape (u32) to vectors: shape `ids.shape() + [d]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        shape.push(self.table.dim(1)?);
        self.table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(shape)
    }
}

/// Layer normalisation over the last axis,
/// $y = \gamma\\,(x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta$, composed of differentiable
/// operations (candle's fused layer norm has no backward).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Params, d: usize) -> Result<Self> {
        Ok(Self {
            gamma: p.get("gamma", &[d], Init::Const(1.0))?,
            beta: p.get("beta", &[d], Init::Const(0.0))?,
            eps: 1e-5,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mu = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mu)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        y.broadcast_mul(&self.gamma)?.broadcast_add(&self.beta)
    }
}

/// Softmax over the last axis, $e^{x_i - m}/\sum_j e^{x_j - m}$ with $m$ the row maximum
/// (held constant: the result does not depend on it), differentiable. A row of −∞ gives 0.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    // A row that is all −∞ would give −∞ − (−∞) = NaN; shift it by 0 instead.
    let m = m.clamp(f32::MIN, f32::MAX)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    let s = s.maximum(f32::MIN_POSITIVE)?;
    e.broadcast_div(&s)
}

/// Inverted dropout: zeroes each element with probability `p` and scales the rest by
/// $1/(1-p)$, from a mask drawn from the parameter store's seeded generator.
pub fn dropout(x: &Tensor, p: f32, params: &Params) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(params.next_u64());
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

/// The position-wise feed-forward block $\max(0, xW_1 + b_1)W_2 + b_2$.
#[derive(Clone, Debug)]
pub struct FeedForward {
    pub up: Linear,
    pub down: Linear,
}

impl FeedForward {
    pub fn new(p: &Params, d: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            up: Linear::new(&p.pp("up"), d, hidden, true)?,
            down: Linear::new(&p.pp("down"), hidden, d, true)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.up.forward(x)?.relu()?)
    }
}
