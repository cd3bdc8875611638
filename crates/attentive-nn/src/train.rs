//! Training utilities: the Transformer learning-rate schedule, label-smoothed cross-entropy,
//! gradient-norm clipping, and checkpoints.

use crate::layers::Params;
use crate::Error;
use candle_core::{backprop::GradStore, Result, Tensor, Var, D};
use std::path::Path;

/// The warmup schedule of Vaswani et al.:
/// $\text{lr} = d_\text{model}^{-1/2}\min(\text{step}^{-1/2},\ \text{step}\cdot\text{warmup}^{-3/2})$,
/// rising linearly for `warmup` steps, then decaying as the inverse square root. `step` counts
/// from 1.
///
/// ```
/// let peak = attentive_nn::train::transformer_lr(4000, 512, 4000);
/// assert!((peak - 512f64.powf(-0.5) / 4000f64.sqrt()).abs() < 1e-12);
/// assert!(attentive_nn::train::transformer_lr(100, 512, 4000) < peak);
/// ```
pub fn transformer_lr(step: usize, d_model: usize, warmup: usize) -> f64 {
    let s = step.max(1) as f64;
    (d_model as f64).powf(-0.5) * s.powf(-0.5).min(s * (warmup.max(1) as f64).powf(-1.5))
}

/// Mean cross-entropy of `logits` (`[N, V]`) against `targets` (`N` u32) over the positions
/// where `weights` (`N` f32, 1 or 0) is 1, with label smoothing $\epsilon$: the target
/// distribution is $1 - \epsilon$ on the label plus $\epsilon/V$ everywhere,
/// $\ell = -\sum_v q_v \log p_v = -(1-\epsilon)\log p_y - \frac{\epsilon}{V}\sum_v \log p_v$.
pub fn smoothed_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?; //                   [N, V]
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?; // [N]
    let smooth = logp.mean(D::Minus1)?.neg()?; //                 [N]
    let per = ((nll * (1.0 - eps))? + (smooth * eps)?)?;
    let total = weights.sum_all()?.maximum(1.0)?;
    (per * weights)?.sum_all()?.div(&total)
}

/// Scales every gradient so their joint L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(vars: &[Var], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if norm > max_norm && norm.is_finite() {
        let f = max_norm / norm;
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * f)?);
            }
        }
    }
    Ok(norm)
}

/// Writes `params` to `dir/model.safetensors` and `config` to `dir/config.json`.
pub fn save_checkpoint<C: serde::Serialize>(
    dir: &Path,
    params: &Params,
    config: &C,
) -> std::result::Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.into(),
        source: e,
    })?;
    params.save(&dir.join("model.safetensors"))?;
    let json = serde_json::to_string_pretty(config).expect("configs serialise");
    let path = dir.join("config.json");
    std::fs::write(&path, json).map_err(|e| Error::Io { path, source: e })
}

/// Reads `dir/config.json`.
pub fn load_config<C: serde::de::DeserializeOwned>(dir: &Path) -> std::result::Result<C, Error> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path,
        message: e.to_string(),
    })
}
