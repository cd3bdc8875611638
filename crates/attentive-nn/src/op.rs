//! The engine's fused kernel as a differentiable candle operation.
//!
//! [`attention`] computes $O = \mathrm{softmax}(\text{scale}\cdot QK^\top + \text{bias})V$ with
//! the masks and score modifiers of an [`AttnConfig`]. The forward keeps each row's log-sum-exp
//! $L_i = \log\sum_j e^{s_{ij}}$, and the backward recomputes $P_{ij} = e^{s_{ij} - L_i}$ from it
//! tile by tile (FlashAttention-2), so neither pass stores the `Nq × Nk` weights.
//! [`attention_unfused`] is the same function composed of candle operations (matmul, softmax,
//! matmul): the reference the fused op is tested against, and the baseline it is timed against.

use crate::layers::softmax_last_dim;
use attentive::{Causal, Dropout, Options, Pattern, Pos, ScoreRule, View, ViewMut};
use candle_core::CustomOp1;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// A user score rule shared with the op (see [`attentive::ScoreRule`]).
pub type SharedScoreRule = Arc<dyn ScoreRule + Send + Sync>;

/// Where the op leaves an `[B, Hq, Nq, Nk]` map (flat) when asked: the attention probabilities
/// of its forward, or $P \circ \partial L/\partial P$ of its backward, the input of
/// gradient-weighted relevance ([`attentive::backward_weighted`]).
pub type MapSink = Arc<Mutex<Option<Vec<f32>>>>;

/// How attention is masked and modified; what [`attentive::Options`] holds, owned.
#[derive(Clone, Default)]
pub struct AttnConfig {
    /// Multiplies $q\cdot k$; `None` means $1/\sqrt{D}$.
    pub scale: Option<f32>,
    pub causal: Option<Causal>,
    /// Keys `p − left ≤ j ≤ p + right` only.
    pub window: Option<(usize, usize)>,
    /// $c\tanh(s/c)$ on every score.
    pub softcap: Option<f32>,
    /// ALiBi slope per query head.
    pub alibi: Option<Vec<f32>>,
    /// Keys each batch row may attend to (`B × Nk`, `true` = attend): padding masks.
    pub key_mask: Option<Vec<bool>>,
    /// Drops each weight with probability `p`, from a seeded stream the backward replays.
    pub dropout: Option<Dropout>,
    /// A structured pattern (window, sparse, global, …), intersected with the other masks.
    pub pattern: Option<Pattern>,
    /// $s \leftarrow f(s, b, h, i, j)$ after every built-in modifier.
    pub score_rule: Option<SharedScoreRule>,
    /// The forward also writes the attention probabilities here.
    pub probabilities: Option<MapSink>,
    /// The backward also writes $P \circ \partial L/\partial P$ here.
    pub weight_grads: Option<MapSink>,
}

impl std::fmt::Debug for AttnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttnConfig")
            .field("scale", &self.scale)
            .field("causal", &self.causal)
            .field("window", &self.window)
            .field("softcap", &self.softcap)
            .field("alibi", &self.alibi)
            .field("key_mask", &self.key_mask.as_ref().map(|m| m.len()))
            .field("dropout", &self.dropout)
            .field("pattern", &self.pattern)
            .field("score_rule", &self.score_rule.is_some())
            .field("probabilities", &self.probabilities.is_some())
            .field("weight_grads", &self.weight_grads.is_some())
            .finish()
    }
}

impl AttnConfig {
    fn options<'a>(&'a self, key_mask: Option<View<'a, bool>>) -> Options<'a> {
        let mut o = Options::new();
        o.scale = self.scale;
        o.causal = self.causal;
        if let Some((l, r)) = self.window {
            o = o.window(l, r);
        }
        o.softcap = self.softcap;
        o.alibi_slopes = self.alibi.as_deref();
        o.mask = key_mask;
        o.dropout = self.dropout;
        o.pattern = self.pattern.as_ref();
        o.score_rule = self.score_rule.as_deref().map(|r| r as &dyn ScoreRule);
        o
    }
}

fn attn_err(e: attentive::AttnError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The key mask as a `[B, 1, 1, Nk]` view broadcast over heads and queries.
pub(crate) fn key_mask_view(
    mask: &[bool],
    b: usize,
    nk: usize,
) -> candle_core::Result<View<'_, bool>> {
    View::new(mask, [b, 1, 1, nk], [nk, 0, 0, 1]).map_err(attn_err)
}

/// A tensor's f32 elements as a 4-D engine view (any strides, as candle lays them out).
fn view_of<'a>(data: &'a [f32], layout: &Layout, name: &str) -> candle_core::Result<View<'a>> {
    let dims = layout.dims();
    if dims.len() != 4 {
        candle_core::bail!("attention: {name} must be 4-D [B, H, N, D], got {dims:?}");
    }
    let st = layout.stride();
    View::new(
        &data[layout.start_offset()..],
        [dims[0], dims[1], dims[2], dims[3]],
        [st[0], st[1], st[2], st[3]],
    )
    .map_err(attn_err)
}

fn f32_slice<'a>(s: &'a CpuStorage, name: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("attention: {name} must be f32"),
    }
}

/// One application of the fused kernel; keeps the forward's log-sum-exp for the backward.
struct Fused {
    cfg: Arc<AttnConfig>,
    lse: Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "attentive-fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = view_of(f32_slice(s1, "q")?, l1, "q")?; //   [B, Hq, Nq, D]
        let k = view_of(f32_slice(s2, "k")?, l2, "k")?; //   [B, Hkv, Nk, D]
        let v = view_of(f32_slice(s3, "v")?, l3, "v")?; //   [B, Hkv, Nk, Dv]
        let ([b, hq, nq, _], [_, _, nk, dv]) = (q.shape(), v.shape());
        let mask = match &self.cfg.key_mask {
            Some(m) => Some(key_mask_view(m, b, nk)?),
            None => None,
        };
        let opts = self.cfg.options(mask);
        let mut out = vec![0.0f32; b * hq * nq * dv]; //   [B, Hq, Nq, Dv]
        let mut lse = vec![0.0f32; b * hq * nq]; //         [B, Hq, Nq]
        let mut o = ViewMut::contiguous(&mut out, [b, hq, nq, dv]).map_err(attn_err)?;
        attentive::forward(q, k, v, &opts, &mut o, Some(&mut lse)).map_err(attn_err)?;
        if let Some(sink) = &self.cfg.probabilities {
            let mut weights_only = opts;
            weights_only.dropout = None;
            let p = attentive::probabilities(q, k, &weights_only).map_err(attn_err)?; // [B, Hq, Nq, Nk]
            *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from((b, hq, nq, dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("attention: backward before forward".into()))?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad_res.storage_and_layout();
        // Borrowed from candle's storage for the duration of the call: no copies.
        fn cpu<'a>(s: &'a Storage, name: &str) -> candle_core::Result<&'a [f32]> {
            match s {
                Storage::Cpu(c) => f32_slice(c, name),
                _ => candle_core::bail!("attention: {name} must live on the CPU"),
            }
        }
        let (qd, kd, vd, od, gd) = (
            cpu(&qs, "q")?,
            cpu(&ks, "k")?,
            cpu(&vs, "v")?,
            cpu(&os, "output")?,
            cpu(&gs, "gradient")?,
        );
        let (qv, kv, vv) = (
            view_of(qd, ql, "q")?,
            view_of(kd, kl, "k")?,
            view_of(vd, vl, "v")?,
        );
        let (ov, gv) = (view_of(od, ol, "output")?, view_of(gd, gl, "gradient")?);
        let (qsh, ksh, vsh) = (qv.shape(), kv.shape(), vv.shape());
        let mask = match &self.cfg.key_mask {
            Some(m) => Some(key_mask_view(m, qsh[0], ksh[2])?),
            None => None,
        };
        let opts = self.cfg.options(mask);
        let mut dq = vec![0.0f32; qsh.iter().product()]; //   [B, Hq, Nq, D]
        let mut dk = vec![0.0f32; ksh.iter().product()]; //   [B, Hkv, Nk, D]
        let mut dv = vec![0.0f32; vsh.iter().product()]; //   [B, Hkv, Nk, Dv]
        let mut dqv = ViewMut::contiguous(&mut dq, qsh).map_err(attn_err)?;
        let mut dkv = ViewMut::contiguous(&mut dk, ksh).map_err(attn_err)?;
        let mut dvv = ViewMut::contiguous(&mut dv, vsh).map_err(attn_err)?;
        match &self.cfg.weight_grads {
            None => attentive::backward(
                qv, kv, vv, ov, &lse, gv, &opts, &mut dqv, &mut dkv, &mut dvv,
            ),
            Some(sink) => {
                let mut pdp = vec![0.0f32; qsh[0] * qsh[1] * qsh[2] * ksh[2]]; // [B, Hq, Nq, Nk]
                attentive::backward_weighted(
                    qv, kv, vv, ov, &lse, gv, &opts, &mut dqv, &mut dkv, &mut dvv, &mut pdp,
                )
                .map_err(attn_err)?;
                *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(pdp);
                Ok(())
            }
        }
        .map_err(attn_err)?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Fused attention of `q` `[B, Hq, Nq, D]` over `k` `[B, Hkv, Nk, D]` and `v` `[B, Hkv, Nk, Dv]`
/// (f32, on the CPU, any strides; `Hq` a multiple of `Hkv` for grouped-query attention), giving
/// `[B, Hq, Nq, Dv]`. Differentiable with respect to all three.
///
/// ```
/// use attentive_nn::op::{attention, attention_unfused, AttnConfig};
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (2, 4, 10, 16), &Device::Cpu)?;
/// let cfg = AttnConfig { causal: Some(attentive::Causal::TopLeft), ..Default::default() };
/// let fused = attention(&q, &q, &q, &cfg)?;
/// let plain = attention_unfused(&q, &q, &q, &cfg)?;
/// let diff = (fused - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &AttnConfig,
) -> candle_core::Result<Tensor> {
    let op = Fused {
        cfg: Arc::new(cfg.clone()),
        lse: Mutex::new(None),
    };
    for (t, name) in [(q, "q"), (k, "k"), (v, "v")] {
        if t.dtype() != DType::F32 {
            candle_core::bail!("attention: {name} must be f32, got {:?}", t.dtype());
        }
    }
    q.apply_op3(k, v, op)
}

/// The same function as [`attention`], composed of candle operations: scores by matmul, the
/// masks as an additive −∞ bias, our differentiable softmax, then a matmul with V. Memory is
/// `O(Nq·Nk)` per head. Attention dropout is not supported here (its random stream is the
/// fused kernel's own).
pub fn attention_unfused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &AttnConfig,
) -> candle_core::Result<Tensor> {
    let (b, hq, nq, d) = q.dims4()?;
    let (_, hkv, nk, _) = k.dims4()?;
    if cfg.dropout.is_some_and(|x| x.p > 0.0) {
        candle_core::bail!("attention_unfused: attention dropout needs the fused op");
    }
    if hkv == 0 || hq % hkv != 0 {
        candle_core::bail!("attention_unfused: {hq} query heads over {hkv} key/value heads");
    }
    let group = hq / hkv;
    // Repeat each key/value head over its group of query heads.
    let rep = |t: &Tensor| -> candle_core::Result<Tensor> {
        if group == 1 {
            return Ok(t.clone());
        }
        let (b, h, n, d) = t.dims4()?;
        t.unsqueeze(2)?
            .expand((b, h, group, n, d))?
            .reshape((b, h * group, n, d))
    };
    let (k, v) = (rep(k)?, rep(v)?); //                     [B, Hq, Nk, D], [B, Hq, Nk, Dv]
    let scale = cfg.scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
    let mut s = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?; // [B, Hq, Nq, Nk]
    if let Some(c) = cfg.softcap {
        s = ((s / c as f64)?.tanh()? * c as f64)?;
    }
    // Additive terms that do not depend on the inputs: ALiBi and every mask as −∞, one
    // [Nq, Nk] plane per batch row, and per head only when ALiBi makes heads differ.
    let off = nk as i64 - nq as i64;
    let hb = if cfg.alibi.is_some() { hq } else { 1 };
    let mut bias = vec![0.0f32; b * hb * nq * nk]; //            [B, 1 or Hq, Nq, Nk]
    for bi in 0..b {
        for h in 0..hb {
            for i in 0..nq {
                let p = i as i64 + off;
                for j in 0..nk {
                    let jj = j as i64;
                    let mut x = cfg
                        .alibi
                        .as_ref()
                        .map_or(0.0, |a| -a[h] * (p - jj).abs() as f32);
                    let hidden = match cfg.causal {
                        Some(Causal::TopLeft) => jj > i as i64,
                        Some(Causal::BottomRight) => jj > p,
                        None => false,
                    } || cfg
                        .window
                        .is_some_and(|(l, r)| jj < p - l as i64 || jj > p + r as i64)
                        || cfg.key_mask.as_ref().is_some_and(|m| !m[bi * nk + j])
                        || cfg
                            .pattern
                            .as_ref()
                            .is_some_and(|pat| !pat.visible(nq, nk, i, j));
                    if hidden {
                        x = f32::NEG_INFINITY;
                    }
                    bias[((bi * hb + h) * nq + i) * nk + j] = x;
                }
            }
        }
    }
    let bias = Tensor::from_vec(bias, (b, hb, nq, nk), q.device())?.to_dtype(q.dtype())?;
    let mut s = s.broadcast_add(&bias)?;
    if let Some(rule) = &cfg.score_rule {
        s = s.contiguous()?.apply_op1(RuleOp(rule.clone()))?;
    }
    let p = softmax_last_dim(&s)?;
    p.matmul(&v.contiguous()?)
}

/// A score rule applied element by element to a `[B, H, Nq, Nk]` score tensor, with its
/// derivative for the backward: the unfused composition's version of the kernel's rule.
struct RuleOp(SharedScoreRule);

/// The position of element `n` of a contiguous `[B, H, Nq, Nk]` tensor.
fn pos_of(n: usize, (h, nq, nk): (usize, usize, usize)) -> Pos {
    Pos {
        b: n / (h * nq * nk),
        h: n / (nq * nk) % h,
        i: n / nk % nq,
        j: n % nk,
    }
}

impl RuleOp {
    /// `f(s, position)` of every element of `x`, in f64; a −∞ element (a masked score) maps to
    /// `minus_inf` instead.
    fn map(
        &self,
        x: &Tensor,
        minus_inf: f64,
        f: impl Fn(f64, Pos) -> f64,
    ) -> candle_core::Result<Tensor> {
        let (b, h, nq, nk) = x.dims4()?;
        let data = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let out: Vec<f64> = data
            .iter()
            .enumerate()
            .map(|(n, &s)| {
                if s == f64::NEG_INFINITY {
                    minus_inf
                } else {
                    f(s, pos_of(n, (h, nq, nk)))
                }
            })
            .collect();
        Tensor::from_vec(out, (b, h, nq, nk), x.device())?.to_dtype(x.dtype())
    }
}

impl CustomOp1 for RuleOp {
    fn name(&self) -> &'static str {
        "attentive-score-rule"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, e) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("score rule: contiguous input only".into()))?;
        let (_, h, nq, nk) = l.shape().dims4()?;
        let dims = (h, nq, nk);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(
                v[a..e]
                    .iter()
                    .enumerate()
                    .map(|(n, &x)| {
                        // A −∞ score stays −∞, as in the kernel.
                        if x == f32::NEG_INFINITY {
                            x
                        } else {
                            self.0.score(x, pos_of(n, dims))
                        }
                    })
                    .collect(),
            ),
            CpuStorage::F64(v) => CpuStorage::F64(
                v[a..e]
                    .iter()
                    .enumerate()
                    .map(|(n, &x)| {
                        if x == f64::NEG_INFINITY {
                            x
                        } else {
                            self.0.score_f64(x, pos_of(n, dims))
                        }
                    })
                    .collect(),
            ),
            _ => candle_core::bail!("score rule: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let d = self.map(arg, 0.0, |s, at| self.0.grad_f64(s, at))?;
        Ok(Some(grad.mul(&d)?))
    }
}
