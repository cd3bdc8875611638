//! Multi-head attention: self and cross, grouped-query, with an optional KV cache for
//! incremental decoding, and position schemes that act inside attention (RoPE, ALiBi).
//!
//! With $H_q$ query heads over $H_{kv}$ key/value heads of width $d_h$,
//! $$\mathrm{MHA}(X, Y) = \mathrm{concat}\_h\big(\mathrm{attn}(XW^Q_h, YW^K_{g(h)}, YW^V_{g(h)})\big)W^O,
//! \quad g(h) = \lfloor h / (H_q/H_{kv}) \rfloor,$$
//! where `attn` is the fused kernel ([`crate::op::attention`]). Self-attention is $Y = X$.

use crate::layers::{Linear, Params};
use crate::op::{attention, attention_unfused, AttnConfig};
use attentive::positional::{Rope, RopePairs};
use attentive::{Causal, Dropout, ViewMut};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};

/// Where a model puts positions.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Positions {
    /// Added to the embeddings (Vaswani et al.): see [`crate::transformer::PositionalEncoding`].
    Sinusoidal,
    /// A learned vector per position added to the embeddings, up to a maximum length.
    Learned { max_len: usize },
    /// Queries and keys rotated by their positions inside attention.
    Rope { pairs: RopePairsSer },
    /// A linear penalty on distance per head, inside attention.
    Alibi,
}

/// [`RopePairs`] for configuration files.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RopePairsSer {
    Interleaved,
    HalfSplit,
}

impl From<RopePairsSer> for RopePairs {
    fn from(p: RopePairsSer) -> Self {
        match p {
            RopePairsSer::Interleaved => RopePairs::Interleaved,
            RopePairsSer::HalfSplit => RopePairs::HalfSplit,
        }
    }
}

/// RoPE as a differentiable candle op over `[B, H, N, D]`, rows at positions `start..`.
struct RopeOp {
    rope: Rope,
    start: usize,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "attentive-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("rope: f32 only");
        };
        let (b, h, n, d) = l.shape().dims4()?;
        let mut out: Vec<f32> = match l.contiguous_offsets() {
            Some((a, e)) => data[a..e].to_vec(),
            None => candle_core::bail!("rope: input must be contiguous"),
        };
        let pos: Vec<usize> = (self.start..self.start + n).collect();
        let mut v =
            ViewMut::contiguous(&mut out, [b, h, n, d]).map_err(candle_core::Error::wrap)?;
        self.rope
            .apply(&mut v, &pos)
            .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, h, n, d) = grad.dims4()?;
        let mut g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let pos: Vec<usize> = (self.start..self.start + n).collect();
        let mut v = ViewMut::contiguous(&mut g, [b, h, n, d]).map_err(candle_core::Error::wrap)?;
        self.rope
            .backward(&mut v, &pos)
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(Tensor::from_vec(g, (b, h, n, d), grad.device())?))
    }
}

/// Rotates `x` (`[B, H, N, D]`) by positions `start..start + N`, differentiably.
pub fn rope(x: &Tensor, pairs: RopePairs, start: usize) -> Result<Tensor> {
    let d = x.dim(3)?;
    let rope = Rope::new(d, 10000.0, pairs).map_err(candle_core::Error::wrap)?;
    x.contiguous()?.apply_op1(RopeOp { rope, start })
}

/// Keys and values of the positions decoded so far (`[B, Hkv, N, d_h]` each).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// The queries too, for a self-attention variant (`[B, Hq, N, d_h]`).
    q: Option<Tensor>,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Multi-head attention with its four projections.
#[derive(Clone, Debug)]
pub struct MultiHeadAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub positions: Option<Positions>,
    /// Attention dropout probability (training only).
    pub dropout: f32,
    /// Runs candle's unfused composition instead of the fused kernel (for comparisons).
    pub unfused: bool,
    /// Head gates $\xi_h$ (`[Hq]`) that scale each head's output before the output projection:
    /// set them to a variable of ones and $\partial L / \partial \xi_h$ is head $h$'s importance
    /// (Michel et al., 2019). `None`: no gates.
    pub gates: Option<Tensor>,
    /// When set, the fused forward leaves this module's attention probabilities
    /// (`[B, Hq, Nq, Nk]`, without dropout) here: what it attended to.
    pub probabilities: Option<crate::op::MapSink>,
    /// When set, the fused backward leaves this module's $P \circ \partial L/\partial P$
    /// (`[B, Hq, Nq, Nk]`) here: gradient-weighted relevance (Chefer et al., 2021).
    pub weight_grads: Option<crate::op::MapSink>,
    /// Self-attention other than exact softmax (see [`crate::variants`]); cross-attention and
    /// `None` stay exact. With a cache, the queries are cached too and each call attends over
    /// the whole prefix, keeping the new rows (LSH refuses a cache: its sort sees the whole
    /// sequence, so decode it by recomputing the prefix).
    pub variant: Option<crate::variants::Variant>,
    alibi: Vec<f32>,
}

impl MultiHeadAttention {
    /// `d_model` split over `heads` query heads and `kv_heads` key/value heads
    /// (`kv_heads` divides `heads`; `kv_heads == heads` is plain multi-head attention).
    pub fn new(
        p: &Params,
        d_model: usize,
        heads: usize,
        kv_heads: usize,
        positions: Option<Positions>,
    ) -> Result<Self> {
        if heads == 0
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || !d_model.is_multiple_of(heads)
        {
            candle_core::bail!(
                "attention: {heads} heads over {kv_heads} key/value heads do not split d_model {d_model}"
            );
        }
        let hd = d_model / heads;
        Ok(Self {
            q: Linear::new(&p.pp("q"), d_model, heads * hd, true)?,
            k: Linear::new(&p.pp("k"), d_model, kv_heads * hd, true)?,
            v: Linear::new(&p.pp("v"), d_model, kv_heads * hd, true)?,
            o: Linear::new(&p.pp("o"), heads * hd, d_model, true)?,
            heads,
            kv_heads,
            head_dim: hd,
            positions,
            dropout: 0.0,
            unfused: false,
            gates: None,
            probabilities: None,
            weight_grads: None,
            variant: None,
            alibi: attentive::positional::alibi_slopes(heads),
        })
    }

    /// `[B, N, H·d_h]` to `[B, H, N, d_h]`.
    fn split(&self, x: &Tensor, h: usize) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, h, self.head_dim))?.transpose(1, 2)
    }

    /// The attention weights of `x` over `y` without dropout or cache, `[B, Hq, Nq, Nk]` flat:
    /// what the model looks at.
    pub fn weights(&self, x: &Tensor, y: &Tensor, key_mask: Option<&[bool]>) -> Result<Vec<f32>> {
        let q = self.split(&self.q.forward(x)?, self.heads)?.contiguous()?; // [B, Hq, Nq, dh]
        let k = self
            .split(&self.k.forward(y)?, self.kv_heads)?
            .contiguous()?; // [B, Hkv, Nk, dh]
        let (qd, kd) = (
            q.flatten_all()?.to_vec1::<f32>()?,
            k.flatten_all()?.to_vec1::<f32>()?,
        );
        let (qs, ks) = (q.dims4()?, k.dims4()?);
        let w = candle_core::Error::wrap;
        let qv = attentive::View::contiguous(&qd, &[qs.0, qs.1, qs.2, qs.3]).map_err(w)?;
        let kv = attentive::View::contiguous(&kd, &[ks.0, ks.1, ks.2, ks.3]).map_err(w)?;
        let mut opts = attentive::Options::new();
        if let Some(m) = key_mask {
            opts.mask = Some(crate::op::key_mask_view(m, ks.0, ks.2)?);
        }
        attentive::probabilities(qv, kv, &opts).map_err(w)
    }

    /// Attention of `x` (`[B, Nq, d_model]`) over `y` (`[B, Nk, d_model]`; `None` for
    /// self-attention). `causal` masks future keys (bottom-right aligned, so it holds with a
    /// cache too); `key_mask` (`B × Nk`, `true` = attend) hides padding. With a `cache`, the new
    /// keys and values are appended to it and attention runs over all of them (self-attention),
    /// or, for cross-attention, the cache holds the projected memory after the first call.
    /// `train` enables attention dropout with a seed drawn from `rng`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        y: Option<&Tensor>,
        causal: bool,
        key_mask: Option<&[bool]>,
        cache: Option<&mut KvCache>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let (b, nq, _) = x.dims3()?;
        let cross = y.is_some();
        let start = match (&cache, cross) {
            (Some(c), false) => c.len(),
            _ => 0,
        };
        let q = self.split(&self.q.forward(x)?, self.heads)?; // [B, Hq, Nq, dh]
        let q = match self.positions {
            Some(Positions::Rope { pairs }) if !cross => rope(&q, pairs.into(), start)?,
            _ => q,
        };
        // A self-attention variant with a cache: the whole prefix's queries.
        let mut q_all = None;
        let (k, v) = match (cache, y) {
            // Cross-attention with a cache: project the memory once.
            (Some(c), Some(mem)) => {
                if c.k.is_none() {
                    c.k = Some(self.split(&self.k.forward(mem)?, self.kv_heads)?);
                    c.v = Some(self.split(&self.v.forward(mem)?, self.kv_heads)?);
                }
                (c.k.clone().expect("set"), c.v.clone().expect("set"))
            }
            (cache, _) => {
                let src = y.unwrap_or(x);
                let mut k = self.split(&self.k.forward(src)?, self.kv_heads)?; // [B, Hkv, N, dh]
                let v = self.split(&self.v.forward(src)?, self.kv_heads)?;
                if let Some(Positions::Rope { pairs }) = self.positions {
                    k = rope(&k, pairs.into(), start)?;
                }
                match cache {
                    Some(c) => {
                        if let Some(var) = &self.variant {
                            if matches!(var.kind, crate::variants::SelfAttention::Lsh { .. }) {
                                candle_core::bail!(
                                    "lsh attention decodes without a cache: each step's sort \
                                     sees the whole prefix, so earlier rows of every layer change"
                                );
                            }
                            let all = match &c.q {
                                Some(old) => Tensor::cat(&[old, &q], 2)?,
                                None => q.clone(),
                            };
                            c.q = Some(all.clone());
                            q_all = Some(all);
                        }
                        let k = match &c.k {
                            Some(old) => Tensor::cat(&[old, &k], 2)?,
                            None => k,
                        };
                        let v = match &c.v {
                            Some(old) => Tensor::cat(&[old, &v], 2)?,
                            None => v,
                        };
                        c.k = Some(k.clone());
                        c.v = Some(v.clone());
                        (k, v)
                    }
                    None => (k, v),
                }
            }
        };
        if let (Some(var), false) = (&self.variant, cross) {
            let q_all = q_all.unwrap_or_else(|| q.clone());
            let o = var.forward(&q_all, &k, &v, causal, key_mask)?; //   [B, Hq, N, dh]
            let o = o.narrow(2, q_all.dim(2)? - nq, nq)?;
            return self.project_out(o, b, nq);
        }
        let cfg = AttnConfig {
            causal: causal.then_some(Causal::BottomRight),
            alibi: (self.positions == Some(Positions::Alibi) && !cross).then(|| self.alibi.clone()),
            key_mask: key_mask.map(|m| m.to_vec()),
            dropout: dropout_seed
                .filter(|_| self.dropout > 0.0)
                .map(|seed| Dropout {
                    p: self.dropout,
                    seed,
                }),
            probabilities: self.probabilities.clone(),
            weight_grads: self.weight_grads.clone(),
            ..Default::default()
        };
        let o = if self.unfused {
            attention_unfused(&q, &k, &v, &cfg)?
        } else {
            attention(&q, &k, &v, &cfg)?
        }; //                                                      [B, Hq, Nq, dh]
        self.project_out(o, b, nq)
    }

    /// The head gates, then `[B, Hq, Nq, dh]` back to `[B, Nq, d_model]` through the output
    /// projection.
    fn project_out(&self, o: Tensor, b: usize, nq: usize) -> Result<Tensor> {
        let o = match &self.gates {
            Some(g) => o.broadcast_mul(&g.reshape((1, self.heads, 1, 1))?)?,
            None => o,
        };
        let o = o
            .transpose(1, 2)?
            .reshape((b, nq, self.heads * self.head_dim))?;
        self.o.forward(&o)
    }
}
