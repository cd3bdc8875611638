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

/// Writes `params` to `dir/model.safetensors` and `config` to `dir/config.json`, each with
/// [`write_atomically`]: the configuration first, so a process killed between the two leaves
/// the new configuration beside the old weights of the same model, never a file cut short.
pub fn save_checkpoint<C: serde::Serialize>(
    dir: &Path,
    params: &Params,
    config: &C,
) -> std::result::Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.into(),
        source: e,
    })?;
    let json = serde_json::to_string_pretty(config).expect("configs serialise");
    let path = dir.join("config.json");
    write_atomically(&path, |tmp| std::fs::write(tmp, &json))
        .map_err(|e| Error::Io { path, source: e })?;
    let path = dir.join("model.safetensors");
    write_atomically(&path, |tmp| params.save(tmp).map_err(std::io::Error::other))
        .map_err(|e| Error::Io { path, source: e })
}

/// Replaces `path` by what `write` writes to a temporary file beside it (same folder, so the
/// rename stays on one file system): the file is flushed to the disk (`fsync`), renamed over
/// `path`, and the folder's entry flushed too. A process killed at any instant, or a machine
/// that loses power, leaves the old file or the new one, never part of one; on an error the
/// temporary file is removed and `path` is untouched.
///
/// ```
/// let path = std::env::temp_dir().join(format!("attentive-doc-{}.txt", std::process::id()));
/// attentive_nn::train::write_atomically(&path, |tmp| std::fs::write(tmp, "new"))?;
/// assert_eq!(std::fs::read_to_string(&path)?, "new");
/// # std::fs::remove_file(&path)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let done = write(&tmp)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| sync_dir(dir));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Flushes a folder's entries (a rename into it) to the disk, where the system allows it.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
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
