//! Self-attention other than exact softmax, as differentiable candle ops on the engine's
//! [`attentive::variants`], and the choice a Transformer makes among them ([`SelfAttention`]).
//!
//! * linear attention ($\phi = \mathrm{elu} + 1$) and Performer's FAVOR+ (random features drawn
//!   once, seeded by the module's name, and kept fixed), causal or not, with padding;
//! * Reformer's LSH attention: the query projection serves as queries and keys (shared QK;
//!   the key projection is unused), rotations drawn once and fixed, sequences padded to a
//!   multiple of the chunk with their padding masked;
//! * Linformer: learned E, F (`[max_len, k]`, the first N rows used) composed of candle
//!   products, then the fused exact kernel over the `k` projected rows; padded keys are zeroed
//!   before the projection. It has no causal form.
//! * gated linear attention (GLA): log-gates from the keys, $g = \ln\sigma(k W_g + b)/16$ per
//!   head and feature ($W_g$ `[d_h, d_h]` shared by the heads; 16 is the paper's τ), through
//!   the engine's chunked decayed state. Causal only.
//! * adaptive span: a learned span fraction per head `z` (`[H]`) on the fused causal kernel;
//!   its gradient reaches `z` (the span loss is the trainer's to add). Causal only.
//! * Nyströmformer: landmarks as segment means, the iterative pseudo-inverse. Its landmarks
//!   must divide N and its segment means would mix padding in, so it refuses a key mask: for
//!   inputs of one length (not the G2P model's padded batches). No causal form.
//!
//! The ops take three tensors: GLA's gates and the span fractions travel beside the values
//! (`[v | g]`, `[v | z]` along the last axis) and their gradients come back the same way.
//!
//! Each op's backward is the engine's, checked against candle's own composition in the tests.

use crate::host::{err, output, Arg, Buf};
use crate::layers::{Init, Params};
use crate::op::{attention, AttnConfig};
use attentive::variants::{adaptive_span, gated, linear, lsh, nystrom, performer};
use attentive::{View, ViewMut};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Which attention a Transformer's self-attention computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelfAttention {
    /// Exact softmax attention on the fused kernel.
    #[default]
    Exact,
    /// Linear attention, $\phi = \mathrm{elu} + 1$.
    Linear,
    /// FAVOR+ with this many random features.
    Performer { features: usize },
    /// LSH attention: rounds of hashing and the chunk length.
    Lsh { n_hashes: usize, bucket_size: usize },
    /// Linformer with keys and values projected to `k` rows.
    Linformer { k: usize },
    /// Gated linear attention, gates from the keys.
    Gla,
    /// Adaptive attention span up to `max_span` keys back.
    AdaptiveSpan { max_span: usize },
    /// Nyströmformer with this many landmarks (dividing N; no padding, no causal form).
    Nystrom { landmarks: usize },
}

impl SelfAttention {
    /// The names `--attention` takes.
    pub const NAMES: [&'static str; 7] = [
        "exact",
        "linear",
        "performer",
        "lsh",
        "linformer",
        "gla",
        "adaptive-span",
    ];

    /// A name with the defaults a small model (G2P: words of up to ~30 symbols) uses:
    /// performer 64 features, lsh 2 rounds of chunks of 4, linformer k = 8, adaptive span up
    /// to 32 keys.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "exact" => Self::Exact,
            "linear" => Self::Linear,
            "performer" => Self::Performer { features: 64 },
            "lsh" => Self::Lsh {
                n_hashes: 2,
                bucket_size: 4,
            },
            "linformer" => Self::Linformer { k: 8 },
            "gla" => Self::Gla,
            "adaptive-span" => Self::AdaptiveSpan { max_span: 32 },
            _ => return None,
        })
    }

    /// Whether it has a causal form (a decoder's self-attention keeps exact attention when not).
    pub fn has_causal_form(self) -> bool {
        !matches!(self, Self::Linformer { .. } | Self::Nystrom { .. })
    }

    /// Whether it has a form that sees every key (an encoder keeps exact attention when not).
    pub fn has_full_form(self) -> bool {
        !matches!(self, Self::Gla | Self::AdaptiveSpan { .. })
    }
}

/// A self-attention module's variant and its fixed draws or learned projections.
#[derive(Clone, Debug)]
pub struct Variant {
    pub kind: SelfAttention,
    /// Performer's features `[m, d_h]`, or LSH's rotations `[n_hashes, d_h, n_buckets/2]`.
    draws: Vec<f32>,
    n_buckets: usize,
    /// Linformer's E and F, `[max_len, k]`; GLA's W_g `[d_h, d_h]` and b `[d_h]`; adaptive
    /// span's z `[H]` (first of the pair).
    projections: Option<(Tensor, Tensor)>,
}

impl Variant {
    /// For heads of width `head_dim` over sequences of up to `max_len`. The random draws are
    /// seeded by the module's path in `p` (so a checkpoint loaded into a fresh model has the
    /// same ones, and the other parameters' initial values do not move); Linformer's E and F
    /// are parameters `e`, `f` of `p`.
    pub fn new(
        p: &Params,
        kind: SelfAttention,
        (heads, head_dim): (usize, usize),
        max_len: usize,
    ) -> Result<Self> {
        // FNV-1a of the path.
        let seed = p.path().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
            (h ^ c as u64).wrapping_mul(0x100_0000_01b3)
        });
        let (draws, n_buckets) = match kind {
            SelfAttention::Performer { features } => {
                (performer::draw_features(features, head_dim, seed), 0)
            }
            SelfAttention::Lsh {
                n_hashes,
                bucket_size,
            } => {
                // The reference's rule of thumb: about 2N/C buckets, at least 2.
                let nb = (2 * max_len / bucket_size.max(1)).max(2) / 2 * 2;
                (lsh::draw_rotations(n_hashes, head_dim, nb, seed), nb)
            }
            _ => (Vec::new(), 0),
        };
        let projections = match kind {
            SelfAttention::Linformer { k } => {
                let init = Init::Normal(1.0 / (k as f64).sqrt());
                Some((
                    p.get("e", &[max_len, k], init)?,
                    p.get("f", &[max_len, k], init)?,
                ))
            }
            SelfAttention::Gla => Some((
                p.get(
                    "w_g",
                    &[head_dim, head_dim],
                    Init::Xavier {
                        fan_in: head_dim,
                        fan_out: head_dim,
                    },
                )?,
                // σ(b + …) near 1 at the start: gates close to e^0, little forgetting.
                p.get("b_g", &[head_dim], Init::Const(3.0))?,
            )),
            SelfAttention::AdaptiveSpan { .. } => {
                let z = p.get("z", &[heads], Init::Const(0.5))?;
                Some((z.clone(), z))
            }
            _ => None,
        };
        Ok(Self {
            kind,
            draws,
            n_buckets,
            projections,
        })
    }

    /// Performer's features `[m, d_h]` or LSH's rotations `[n_hashes, d_h, n_buckets/2]`, as
    /// drawn (empty for the others).
    pub fn draws(&self) -> &[f32] {
        &self.draws
    }

    /// Linformer's E and F (`[max_len, k]`).
    pub fn projections(&self) -> Option<&(Tensor, Tensor)> {
        self.projections.as_ref()
    }

    /// Self-attention of `q` over `k`, `v` (`[B, H, N, d_h]` each), `causal` or not, padding
    /// hidden by `key_mask` (`B × N`, `true` = a real position).
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
        key_mask: Option<&[bool]>,
    ) -> Result<Tensor> {
        let mask = key_mask.map(|m| m.to_vec());
        match self.kind {
            SelfAttention::Exact => {
                let cfg = AttnConfig {
                    causal: causal.then_some(attentive::Causal::TopLeft),
                    key_mask: mask,
                    ..Default::default()
                };
                attention(q, k, v, &cfg)
            }
            SelfAttention::Linear | SelfAttention::Performer { .. } => {
                let kind = match self.kind {
                    SelfAttention::Linear => Plain::Linear,
                    _ => Plain::Performer(self.draws.clone()),
                };
                plain(q, k, v, kind, causal, mask)
            }
            SelfAttention::Lsh { bucket_size, .. } => {
                let n = q.dim(2)?;
                let b = q.dim(0)?;
                // Pad N to a multiple of the chunk; the padding is masked.
                let padded = if n <= bucket_size {
                    n
                } else {
                    n.div_ceil(bucket_size) * bucket_size
                };
                let mut keep = vec![true; b * padded];
                for bi in 0..b {
                    for j in 0..padded {
                        keep[bi * padded + j] = j < n && key_mask.is_none_or(|m| m[bi * n + j]);
                    }
                }
                let pad = |x: &Tensor| -> Result<Tensor> {
                    if padded == n {
                        return x.contiguous();
                    }
                    x.contiguous()?
                        .pad_with_zeros(2, 0, padded - n)?
                        .contiguous()
                };
                let op = Lsh {
                    rotations: self.draws.clone(),
                    n_buckets: self.n_buckets,
                    bucket_size,
                    causal,
                    key_mask: keep,
                };
                pad(q)?.apply_op2(&pad(v)?, op)?.narrow(2, 0, n)
            }
            SelfAttention::Gla | SelfAttention::AdaptiveSpan { .. } if !causal => {
                candle_core::bail!("{:?} is causal only", self.kind)
            }
            SelfAttention::Gla => {
                let (w, bias) = self.projections.as_ref().expect("made with the kind");
                let k = k.contiguous()?;
                // g = ln σ(k W_g + b) / τ                                  [B, H, N, d_h]
                let u = k.broadcast_matmul(w)?.broadcast_add(bias)?;
                let g = (candle_nn::ops::sigmoid(&u)?.log()? / GLA_TAU)?;
                let vg = Tensor::cat(&[&v.contiguous()?, &g], 3)?.contiguous()?;
                q.contiguous()?.apply_op3(&k, &vg, Gated)
            }
            SelfAttention::AdaptiveSpan { max_span } => {
                let (z, _) = self.projections.as_ref().expect("made with the kind");
                let (b, h, n, _) = v.dims4()?;
                let zc = z.reshape((1, h, 1, 1))?.broadcast_as((b, h, n, 1))?;
                let vz = Tensor::cat(&[&v.contiguous()?, &zc.contiguous()?], 3)?.contiguous()?;
                q.contiguous()?.apply_op3(
                    &k.contiguous()?,
                    &vz,
                    Span {
                        max_span,
                        lse: std::sync::Mutex::new(None),
                    },
                )
            }
            SelfAttention::Nystrom { landmarks } => {
                if causal {
                    candle_core::bail!("nystrom has no causal form");
                }
                if key_mask.is_some_and(|m| m.iter().any(|&x| !x)) {
                    candle_core::bail!(
                        "nystrom cannot hide padding (its landmarks average every position): \
                         give it sequences of one length"
                    );
                }
                plain(q, k, v, Plain::Nystrom(landmarks), false, None)
            }
            SelfAttention::Linformer { .. } => {
                if causal {
                    candle_core::bail!("linformer has no causal form");
                }
                let (e, f) = self.projections.as_ref().expect("made with the kind");
                let n = k.dim(2)?;
                let (e, f) = (e.narrow(0, 0, n)?, f.narrow(0, 0, n)?); //  [N, k]
                let (k, v) = match key_mask {
                    Some(m) => {
                        let keep: Vec<f32> = m.iter().map(|&x| x as u8 as f32).collect();
                        let keep = Tensor::from_vec(keep, (k.dim(0)?, 1, n, 1), k.device())?;
                        (k.broadcast_mul(&keep)?, v.broadcast_mul(&keep)?)
                    }
                    None => (k.clone(), v.clone()),
                };
                let kp = e.t()?.broadcast_matmul(&k.contiguous()?)?; //     [B, H, k, d_h]
                let vp = f.t()?.broadcast_matmul(&v.contiguous()?)?; //     [B, H, k, d_h]
                attention(q, &kp, &vp, &AttnConfig::default())
            }
        }
    }
}

/// GLA's temperature τ: log-gates are `ln σ(·)/τ` (Yang et al., 2024).
const GLA_TAU: f64 = 16.0;

/// The adaptive span's ramp width R.
const SPAN_RAMP: usize = 4;

/// The variants whose engine calls take q, k and v alone.
enum Plain {
    Linear,
    /// FAVOR+ with these features.
    Performer(Vec<f32>),
    /// Nyström with this many landmarks.
    Nystrom(usize),
}

/// A forward into its output, or a backward from the output's gradient into dQ, dK, dV.
enum Pass<'a, 'b> {
    Forward(&'a mut ViewMut<'b>),
    Backward(View<'b>, [&'a mut ViewMut<'b>; 3]),
}

/// `kind` on `q`, `k`, `v` made contiguous.
fn plain(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kind: Plain,
    causal: bool,
    key_mask: Option<Vec<bool>>,
) -> Result<Tensor> {
    let op = PlainOp {
        kind,
        causal,
        key_mask,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Linear attention, FAVOR+ or Nyström as a candle op.
struct PlainOp {
    kind: Plain,
    causal: bool,
    key_mask: Option<Vec<bool>>,
}

impl PlainOp {
    fn call(&self, (q, k, v): (View, View, View), pass: Pass) -> Result<()> {
        let mask = self.key_mask.as_deref();
        match &self.kind {
            Plain::Linear => {
                let opts = linear::Linear {
                    causal: self.causal,
                    key_mask: mask,
                    ..Default::default()
                };
                match pass {
                    Pass::Forward(o) => linear::forward(q, k, v, &opts, o),
                    Pass::Backward(g, [a, b, c]) => linear::backward(q, k, v, g, &opts, a, b, c),
                }
            }
            Plain::Performer(w) => {
                let opts = performer::Performer {
                    causal: self.causal,
                    key_mask: mask,
                    ..performer::Performer::new(w)
                };
                match pass {
                    Pass::Forward(o) => performer::forward(q, k, v, &opts, o),
                    Pass::Backward(g, [a, b, c]) => performer::backward(q, k, v, g, &opts, a, b, c),
                }
            }
            Plain::Nystrom(m) => {
                let opts = nystrom::Nystrom::new(*m);
                match pass {
                    Pass::Forward(o) => nystrom::forward(q, k, v, &opts, o),
                    Pass::Backward(g, [a, b, c]) => nystrom::backward(q, k, v, g, &opts, a, b, c),
                }
            }
        }
        .map_err(err)
    }
}

impl CustomOp3 for PlainOp {
    fn name(&self) -> &'static str {
        "attentive-variant-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            Arg::of(s1, l1, "q")?,
            Arg::of(s2, l2, "k")?,
            Arg::of(s3, l3, "v")?,
        );
        let mut o = output(q.shape, v.shape[3]);
        self.call(
            (q.view()?, k.view()?, v.view()?),
            Pass::Forward(&mut o.view()?),
        )?;
        Ok(o.storage())
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qa, ka, va, ga) = (
            Arg::host(q)?,
            Arg::host(k)?,
            Arg::host(v)?,
            Arg::host(grad)?,
        );
        let (mut dq, mut dk, mut dv) = (
            Buf::zeros(qa.shape),
            Buf::zeros(ka.shape),
            Buf::zeros(va.shape),
        );
        let grads = [&mut dq.view()?, &mut dk.view()?, &mut dv.view()?];
        self.call(
            (qa.view()?, ka.view()?, va.view()?),
            Pass::Backward(ga.view()?, grads),
        )?;
        Ok((dq.grad(q)?, dk.grad(k)?, dv.grad(v)?))
    }
}

/// LSH attention of `x` (queries and keys) over `v`.
struct Lsh {
    rotations: Vec<f32>,
    n_buckets: usize,
    bucket_size: usize,
    causal: bool,
    key_mask: Vec<bool>,
}

impl Lsh {
    fn opts(&self, d: usize) -> lsh::Lsh<'_> {
        let n_hashes = self.rotations.len() / (d * self.n_buckets / 2);
        lsh::Lsh {
            key_mask: Some(&self.key_mask),
            ..lsh::Lsh::new(&self.rotations, n_hashes, self.n_buckets, self.bucket_size)
                .causal(self.causal)
        }
    }
}

impl CustomOp2 for Lsh {
    fn name(&self) -> &'static str {
        "attentive-lsh-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, v) = (Arg::of(s1, l1, "x")?, Arg::of(s2, l2, "v")?);
        let mut o = output(x.shape, v.shape[3]);
        lsh::forward(x.view()?, v.view()?, &self.opts(x.shape[3]), &mut o.view()?).map_err(err)?;
        Ok(o.storage())
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xa, va, ga) = (Arg::host(x)?, Arg::host(v)?, Arg::host(grad)?);
        let (mut dx, mut dv) = (Buf::zeros(xa.shape), Buf::zeros(va.shape));
        let opts = self.opts(xa.shape[3]);
        lsh::backward(
            xa.view()?,
            va.view()?,
            ga.view()?,
            &opts,
            &mut dx.view()?,
            &mut dv.view()?,
        )
        .map_err(err)?;
        Ok((dx.grad(x)?, dv.grad(v)?))
    }
}

/// `[v | extra]` (`[B, H, N, Dv + e]`, contiguous) as views of `v` and of the extra columns.
fn split_last(data: &[f32], [b, h, n, w]: [usize; 4], dv: usize) -> Result<(View<'_>, View<'_>)> {
    let strides = [h * n * w, n * w, w, 1];
    Ok((
        View::new(data, [b, h, n, dv], strides).map_err(err)?,
        View::new(&data[dv..], [b, h, n, w - dv], strides).map_err(err)?,
    ))
}

/// `[a | b]` along the last axis of two row-major `[B, H, N, ·]` buffers.
fn join_last(a: &[f32], wa: usize, b: &[f32], wb: usize) -> Vec<f32> {
    a.chunks_exact(wa)
        .zip(b.chunks_exact(wb))
        .flat_map(|(x, y)| x.iter().chain(y).copied())
        .collect()
}

/// Gated linear attention of `q` over `k` and `[v | g]`, `g` the log-gates (`[B, H, N, D]`).
struct Gated;

impl CustomOp3 for Gated {
    fn name(&self) -> &'static str {
        "attentive-gated-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, vg) = (
            Arg::of(s1, l1, "q")?,
            Arg::of(s2, l2, "k")?,
            Arg::of(s3, l3, "[v | g]")?,
        );
        let dv = vg.shape[3] - k.shape[3];
        let (v, g) = split_last(vg.data, vg.shape, dv)?;
        let mut o = output(q.shape, dv);
        let opts = gated::Gated::new(gated::Decay::Gates(g));
        gated::forward(q.view()?, k.view()?, v, &opts, &mut o.view()?).map_err(err)?;
        Ok(o.storage())
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        vg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qa, ka, vga, ga) = (
            Arg::host(q)?,
            Arg::host(k)?,
            Arg::host(vg)?,
            Arg::host(grad)?,
        );
        let (d, dvw) = (ka.shape[3], vga.shape[3] - ka.shape[3]);
        let (v, gates) = split_last(&vga.data, vga.shape, dvw)?;
        let [b, h, n, _] = vga.shape;
        let (mut dq, mut dk, mut dv) = (
            Buf::zeros(qa.shape),
            Buf::zeros(ka.shape),
            Buf::zeros([b, h, n, dvw]),
        );
        let mut dg = vec![0.0f32; ka.data.len()];
        let opts = gated::Gated::new(gated::Decay::Gates(gates));
        let (a, c, e) = (&mut dq.view()?, &mut dk.view()?, &mut dv.view()?);
        gated::backward(
            qa.view()?,
            ka.view()?,
            v,
            ga.view()?,
            &opts,
            a,
            c,
            e,
            Some(&mut dg),
        )
        .map_err(err)?;
        let dvg = Buf {
            data: join_last(&dv.data, dvw, &dg, d),
            shape: vga.shape,
        };
        Ok((dq.grad(q)?, dk.grad(k)?, dvg.grad(vg)?))
    }
}

/// Adaptive-span attention of `q` over `k` and `[v | z]`, `z` each head's span fraction
/// broadcast over batch and positions (read at `[0, h, 0]`).
struct Span {
    max_span: usize,
    /// The forward's log-sum-exp, for the backward.
    lse: std::sync::Mutex<Option<Vec<f32>>>,
}

impl Span {
    /// Each head's span fraction from the `z` column.
    fn fractions(z: &View) -> Vec<f32> {
        (0..z.shape()[1]).map(|h| z.at(0, h, 0, 0)).collect()
    }

    fn span<'a>(&self, current: &'a [f32]) -> adaptive_span::AdaptiveSpan<'a> {
        adaptive_span::AdaptiveSpan {
            current,
            max_span: self.max_span,
            ramp: SPAN_RAMP,
        }
    }
}

impl CustomOp3 for Span {
    fn name(&self) -> &'static str {
        "attentive-adaptive-span-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, vz) = (
            Arg::of(s1, l1, "q")?,
            Arg::of(s2, l2, "k")?,
            Arg::of(s3, l3, "[v | z]")?,
        );
        let (v, z) = split_last(vz.data, vz.shape, vz.shape[3] - 1)?;
        let current = Self::fractions(&z);
        let mut o = output(q.shape, vz.shape[3] - 1);
        let mut lse = vec![0.0f32; q.shape[0] * q.shape[1] * q.shape[2]];
        let span = self.span(&current);
        adaptive_span::forward(
            q.view()?,
            k.view()?,
            v,
            &span,
            &mut o.view()?,
            Some(&mut lse),
        )
        .map_err(err)?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok(o.storage())
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        vz: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("adaptive span: backward before forward".into())
            })?;
        let (qa, ka, vza) = (Arg::host(q)?, Arg::host(k)?, Arg::host(vz)?);
        let (oa, ga) = (Arg::host(res)?, Arg::host(grad)?);
        let [b, h, n, w] = vza.shape;
        let (v, z) = split_last(&vza.data, vza.shape, w - 1)?;
        let current = Self::fractions(&z);
        let (mut dq, mut dk, mut dv) = (
            Buf::zeros(qa.shape),
            Buf::zeros(ka.shape),
            Buf::zeros([b, h, n, w - 1]),
        );
        let mut dz = vec![0.0f32; current.len()];
        adaptive_span::backward(
            qa.view()?,
            ka.view()?,
            v,
            (oa.view()?, &lse),
            ga.view()?,
            &self.span(&current),
            (&mut dq.view()?, &mut dk.view()?, &mut dv.view()?),
            &mut dz,
        )
        .map_err(err)?;
        // z was broadcast over batch and positions: its whole gradient at [0, h, 0], zero
        // elsewhere, sums back to dz through the broadcast.
        let mut dzc = vec![0.0f32; b * h * n];
        for (hh, g) in dz.iter().enumerate() {
            dzc[hh * n] = *g;
        }
        let dvz = Buf {
            data: join_last(&dv.data, w - 1, &dzc, 1),
            shape: vza.shape,
        };
        Ok((dq.grad(q)?, dk.grad(k)?, dvz.grad(vz)?))
    }
}
