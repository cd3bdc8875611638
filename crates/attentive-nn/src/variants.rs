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
//!
//! Each op's backward is the engine's, checked against candle's own composition in the tests.

use crate::layers::{Init, Params};
use crate::op::{attention, AttnConfig};
use attentive::variants::{linear, lsh, performer};
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
}

impl SelfAttention {
    /// The names `--attention` takes.
    pub const NAMES: [&'static str; 5] = ["exact", "linear", "performer", "lsh", "linformer"];

    /// A name with the defaults a small model (G2P: words of up to ~30 symbols) uses:
    /// performer 64 features, lsh 2 rounds of chunks of 4, linformer k = 8.
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
            _ => return None,
        })
    }

    /// Whether it has a causal form (a decoder's self-attention keeps exact attention when not).
    pub fn has_causal_form(self) -> bool {
        !matches!(self, Self::Linformer { .. })
    }
}

/// A self-attention module's variant and its fixed draws or learned projections.
#[derive(Clone, Debug)]
pub struct Variant {
    pub kind: SelfAttention,
    /// Performer's features `[m, d_h]`, or LSH's rotations `[n_hashes, d_h, n_buckets/2]`.
    draws: Vec<f32>,
    n_buckets: usize,
    /// Linformer's E and F, `[max_len, k]`.
    projections: Option<(Tensor, Tensor)>,
}

impl Variant {
    /// For heads of width `head_dim` over sequences of up to `max_len`. The random draws are
    /// seeded by the module's path in `p` (so a checkpoint loaded into a fresh model has the
    /// same ones, and the other parameters' initial values do not move); Linformer's E and F
    /// are parameters `e`, `f` of `p`.
    pub fn new(p: &Params, kind: SelfAttention, head_dim: usize, max_len: usize) -> Result<Self> {
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
            SelfAttention::Linear | SelfAttention::Performer { .. } => q.contiguous()?.apply_op3(
                &k.contiguous()?,
                &v.contiguous()?,
                Kernelized {
                    features: (self.kind != SelfAttention::Linear).then(|| self.draws.clone()),
                    causal,
                    key_mask: mask,
                },
            ),
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

fn err(e: attentive::AttnError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Row-major f32 data of a CPU tensor argument and its 4-D shape.
fn data<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<(&'a [f32], [usize; 4])> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("attention: {name} must be f32");
    };
    let dims: [usize; 4] = l
        .dims()
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{name} must be 4-D [B, H, N, D]")))?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok((&d[a..b], dims)),
        None => candle_core::bail!("attention: {name} must be contiguous"),
    }
}

/// The storage and layout of a tensor, made contiguous.
fn host(t: &Tensor) -> Result<(Vec<f32>, [usize; 4])> {
    let dims: [usize; 4] = t
        .dims()
        .try_into()
        .map_err(|_| candle_core::Error::Msg("expected a 4-D tensor".into()))?;
    Ok((t.flatten_all()?.to_vec1::<f32>()?, dims))
}

/// Linear attention (`features: None`) or FAVOR+.
struct Kernelized {
    features: Option<Vec<f32>>,
    causal: bool,
    key_mask: Option<Vec<bool>>,
}

impl CustomOp3 for Kernelized {
    fn name(&self) -> &'static str {
        "attentive-kernelized-attention"
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
        let ((q, qs), (k, ks), (v, vs)) =
            (data(s1, l1, "q")?, data(s2, l2, "k")?, data(s3, l3, "v")?);
        let os = [qs[0], qs[1], qs[2], vs[3]];
        let mut o = vec![0.0f32; os.iter().product()];
        let (qv, kv, vv) = (
            View::contiguous(q, &qs).map_err(err)?,
            View::contiguous(k, &ks).map_err(err)?,
            View::contiguous(v, &vs).map_err(err)?,
        );
        let mut out = ViewMut::contiguous(&mut o, os).map_err(err)?;
        let mask = self.key_mask.as_deref();
        match &self.features {
            None => {
                let opts = linear::Linear {
                    causal: self.causal,
                    key_mask: mask,
                    ..Default::default()
                };
                linear::forward(qv, kv, vv, &opts, &mut out)
            }
            Some(w) => {
                let opts = performer::Performer {
                    causal: self.causal,
                    key_mask: mask,
                    ..performer::Performer::new(w)
                };
                performer::forward(qv, kv, vv, &opts, &mut out)
            }
        }
        .map_err(err)?;
        Ok((CpuStorage::F32(o), Shape::from(os.to_vec())))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ((q_, qs), (k_, ks), (v_, vs), (g_, gs)) = (host(q)?, host(k)?, host(v)?, host(grad)?);
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; q_.len()],
            vec![0.0f32; k_.len()],
            vec![0.0f32; v_.len()],
        );
        let (qv, kv, vv, gv) = (
            View::contiguous(&q_, &qs).map_err(err)?,
            View::contiguous(&k_, &ks).map_err(err)?,
            View::contiguous(&v_, &vs).map_err(err)?,
            View::contiguous(&g_, &gs).map_err(err)?,
        );
        let (a, b, c) = (
            &mut ViewMut::contiguous(&mut dq, qs).map_err(err)?,
            &mut ViewMut::contiguous(&mut dk, ks).map_err(err)?,
            &mut ViewMut::contiguous(&mut dv, vs).map_err(err)?,
        );
        let mask = self.key_mask.as_deref();
        match &self.features {
            None => {
                let opts = linear::Linear {
                    causal: self.causal,
                    key_mask: mask,
                    ..Default::default()
                };
                linear::backward(qv, kv, vv, gv, &opts, a, b, c)
            }
            Some(w) => {
                let opts = performer::Performer {
                    causal: self.causal,
                    key_mask: mask,
                    ..performer::Performer::new(w)
                };
                performer::backward(qv, kv, vv, gv, &opts, a, b, c)
            }
        }
        .map_err(err)?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
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
        let ((x, xs), (v, vs)) = (data(s1, l1, "x")?, data(s2, l2, "v")?);
        let os = [xs[0], xs[1], xs[2], vs[3]];
        let mut o = vec![0.0f32; os.iter().product()];
        lsh::forward(
            View::contiguous(x, &xs).map_err(err)?,
            View::contiguous(v, &vs).map_err(err)?,
            &self.opts(xs[3]),
            &mut ViewMut::contiguous(&mut o, os).map_err(err)?,
        )
        .map_err(err)?;
        Ok((CpuStorage::F32(o), Shape::from(os.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ((x_, xs), (v_, vs), (g_, gs)) = (host(x)?, host(v)?, host(grad)?);
        let (mut dx, mut dv) = (vec![0.0f32; x_.len()], vec![0.0f32; v_.len()]);
        lsh::backward(
            View::contiguous(&x_, &xs).map_err(err)?,
            View::contiguous(&v_, &vs).map_err(err)?,
            View::contiguous(&g_, &gs).map_err(err)?,
            &self.opts(xs[3]),
            &mut ViewMut::contiguous(&mut dx, xs).map_err(err)?,
            &mut ViewMut::contiguous(&mut dv, vs).map_err(err)?,
        )
        .map_err(err)?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
