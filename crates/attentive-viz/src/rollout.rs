//! Attention rollout and attention flow (Abnar & Zuidema, 2020): how much each input token
//! reaches each position of the last layer when attention is followed through every layer.
//!
//! Per layer $\ell$ the heads are fused ($\bar A_\ell$: their mean, as in the paper, or their
//! maximum or minimum), the residual connection is added and rows are renormalised:
//! $$\hat A_\ell = \mathrm{rownorm}(\bar A_\ell + I),$$
//! which is $\tfrac12\bar A_\ell + \tfrac12 I$ when $\bar A_\ell$'s rows sum to 1.
//! **Rollout** multiplies them, $J_1 = \hat A_1$, $J_\ell = \hat A_\ell J_{\ell-1}$, so row $i$
//! of $J_L$ says how much of output position $i$ comes from each input token. **Flow** reads the
//! $\hat A_\ell$ as capacities of a layered graph instead and takes, for an output position $i$
//! and each input token $j$, the maximum flow from $i$'s node in the last layer to $j$'s node in
//! the input layer, normalised over $j$.
//!
//! Which row explains a sentence depends on the model: `[CLS]` (row 0) for a CLS-pooled model, the
//! mean of the non-padding rows for a mean-pooled one such as all-MiniLM-L6-v2 ([`Reading`]).

use crate::error::{Result, VizError};
use crate::maps::Maps;

/// How a layer's heads become one map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fusion {
    /// Their mean (the paper's).
    #[default]
    Mean,
    /// Their elementwise maximum.
    Max,
    /// Their elementwise minimum.
    Min,
}

impl Fusion {
    /// The name as written in JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fusion::Mean => "mean",
            Fusion::Max => "max",
            Fusion::Min => "min",
        }
    }
}

/// Which row of a rollout (or flow) explains the model's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    /// One position's row: 0 is `[CLS]` for a CLS-pooled model.
    Row(usize),
    /// The mean of the rows where the mask is true: the non-padding tokens of a mean-pooled model.
    MeanOf(Vec<bool>),
}

impl Reading {
    /// What the row is, in words, for a caption.
    pub fn describe(&self, tokens: &[String]) -> String {
        match self {
            Reading::Row(i) => format!(
                "row of {} (position {i})",
                tokens.get(*i).map_or("?", String::as_str)
            ),
            Reading::MeanOf(m) => format!(
                "mean of the rows of the {} non-padding tokens (the model's mean pooling)",
                m.iter().filter(|&&x| x).count()
            ),
        }
    }

    /// The row read from `m` (`n × n`, row-major).
    ///
    /// # Errors
    /// [`VizError::OutOfRange`] for a row past `n`; [`VizError::Empty`] for a mask of the wrong
    /// length or with no row.
    pub fn read(&self, m: &[f32], n: usize) -> Result<Vec<f32>> {
        match self {
            Reading::Row(i) if *i < n => Ok(m[i * n..][..n].to_vec()),
            Reading::Row(i) => Err(VizError::OutOfRange {
                what: "row",
                index: *i,
                count: n,
            }),
            Reading::MeanOf(mask) => {
                let rows: Vec<usize> = (0..n).filter(|&i| mask.get(i) == Some(&true)).collect();
                if mask.len() != n || rows.is_empty() {
                    return Err(VizError::Empty(format!(
                        "a reading mask needs {n} entries and at least one true one"
                    )));
                }
                let mut out = vec![0.0f32; n];
                for &i in &rows {
                    for (o, &x) in out.iter_mut().zip(&m[i * n..][..n]) {
                        *o += x;
                    }
                }
                out.iter_mut().for_each(|o| *o /= rows.len() as f32);
                Ok(out)
            }
        }
    }
}

/// $\hat A = \mathrm{rownorm}(M + I)$ in place, for `m` (`n × n`).
fn add_identity_rownorm(m: &mut [f32], n: usize) {
    for (i, row) in m.chunks_exact_mut(n).enumerate() {
        row[i] += 1.0;
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|x| *x /= s);
    }
}

/// Layer `l`'s heads fused.
pub fn fuse(maps: &Maps, l: usize, fusion: Fusion) -> Vec<f32> {
    let [_, heads, ..] = maps.shape();
    match fusion {
        Fusion::Mean => maps.head_mean(l),
        Fusion::Max | Fusion::Min => {
            let mut out = maps.map(l, 0).to_vec();
            for h in 1..heads {
                for (o, &a) in out.iter_mut().zip(maps.map(l, h)) {
                    *o = if fusion == Fusion::Max {
                        o.max(a)
                    } else {
                        o.min(a)
                    };
                }
            }
            out
        }
    }
}

/// $\hat A_\ell$ of every layer, `[L][n × n]`.
pub fn residual_maps(maps: &Maps, fusion: Fusion) -> Result<Vec<Vec<f32>>> {
    if !maps.is_self_attention() {
        return Err(VizError::NotSelfAttention { method: "rollout" });
    }
    let [layers, _, n, _] = maps.shape();
    Ok((0..layers)
        .map(|l| {
            let mut a = fuse(maps, l, fusion);
            add_identity_rownorm(&mut a, n);
            a
        })
        .collect())
}

/// $J_\ell$ for every layer $\ell = 1 \dots L$, each `n × n` row-major: the rollout up to that
/// layer (the last is the rollout of the model).
///
/// ```
/// use attentive_viz::{rollout, Fusion, Maps};
/// // VARIANTS.md §15: A₁ = [[.5,.5],[.2,.8]], A₂ = [[1,0],[.3,.7]] give J₂ = [[.75,.25],[.1975,.8025]].
/// let a = vec![0.5, 0.5, 0.2, 0.8, 1.0, 0.0, 0.3, 0.7];
/// let m = Maps::self_attention(a, [2, 1, 2], vec!["a".into(), "b".into()]).unwrap();
/// let j = rollout::rollout(&m, Fusion::Mean).unwrap();
/// let want = [0.75, 0.25, 0.1975, 0.8025];
/// assert!(j[1].iter().zip(want).all(|(x, w)| (x - w).abs() < 1e-6));
/// ```
///
/// # Errors
/// [`VizError::NotSelfAttention`] for cross-attention maps.
pub fn rollout(maps: &Maps, fusion: Fusion) -> Result<Vec<Vec<f32>>> {
    let hats = residual_maps(maps, fusion)?;
    let n = maps.shape()[2];
    let mut out: Vec<Vec<f32>> = Vec::with_capacity(hats.len());
    for a in hats {
        let j = match out.last() {
            None => a,
            Some(prev) => product(&a, prev, n),
        };
        out.push(j);
    }
    Ok(out)
}

/// The rollout through head `h` of layer `l` alone: $\mathrm{rownorm}(A_\ell^h + I)\\,J_{\ell-1}$
/// (with $J_0 = I$), `n × n`: what that head adds on top of the layers below it.
///
/// # Errors
/// [`VizError::NotSelfAttention`] for cross-attention maps, [`VizError::OutOfRange`] for a layer
/// or head the maps do not have.
pub fn rollout_through_head(maps: &Maps, fusion: Fusion, l: usize, h: usize) -> Result<Vec<f32>> {
    let [layers, heads, n, _] = maps.shape();
    for (what, index, count) in [("layer", l, layers), ("head", h, heads)] {
        if index >= count {
            return Err(VizError::OutOfRange { what, index, count });
        }
    }
    let below = if l == 0 {
        None
    } else {
        rollout(maps, fusion)?.into_iter().nth(l - 1)
    };
    let mut a = maps.map(l, h).to_vec();
    add_identity_rownorm(&mut a, n);
    Ok(match below {
        None => a,
        Some(j) => product(&a, &j, n),
    })
}

/// The row `reading` takes of [`rollout_through_head`] for every layer and head, `[L][H][n]`,
/// from one rollout: a row (or a mean of rows) of $\mathrm{rownorm}(A_\ell^h + I)$ times
/// $J_{\ell-1}$, the per-head rollout of the sentence.
///
/// # Errors
/// As [`rollout`] and [`Reading::read`].
pub fn readings_through_heads(
    maps: &Maps,
    fusion: Fusion,
    reading: &Reading,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let [layers, heads, n, _] = maps.shape();
    let j = rollout(maps, fusion)?;
    (0..layers)
        .map(|l| {
            (0..heads)
                .map(|h| {
                    let mut a = maps.map(l, h).to_vec();
                    add_identity_rownorm(&mut a, n);
                    let r = reading.read(&a, n)?;
                    Ok(match l {
                        0 => r,
                        _ => (0..n)
                            .map(|c| (0..n).map(|i| r[i] * j[l - 1][i * n + c]).sum())
                            .collect(),
                    })
                })
                .collect()
        })
        .collect()
}

/// `a · b` for `n × n` row-major matrices, on the engine's product.
fn product(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; n * n];
    attentive::matmul(a, b, None, (n, n, n), &mut c).expect("n × n operands of n × n maps");
    c
}

/// Flow is refused above this many edge visits (output rows × input tokens × L·n² edges ×
/// n augmenting paths, an estimate of Edmonds–Karp's work): about 10 s on one core.
pub const FLOW_WORK_LIMIT: f64 = 2e9;

/// Attention flow for the output positions `rows`: for each, the maximum flow from its node in
/// the last layer to every input token's node through the graph whose edges from layer $\ell$
/// position $i$ to layer $\ell-1$ position $j$ have capacity $\hat A_\ell[i, j]$, normalised to
/// sum to 1 over the input tokens. Returns `[rows.len()][n]`.
///
/// Each value is one max-flow (Edmonds–Karp, in f64): opt-in, for a few rows of short inputs.
///
/// # Errors
/// [`VizError::NotSelfAttention`] for cross-attention maps, [`VizError::OutOfRange`] for a row
/// past the tokens, [`VizError::TooLarge`] when the work would pass [`FLOW_WORK_LIMIT`].
pub fn flow(maps: &Maps, fusion: Fusion, rows: &[usize]) -> Result<Vec<Vec<f64>>> {
    let hats = residual_maps(maps, fusion)?;
    let [layers, _, n, _] = maps.shape();
    if let Some(&bad) = rows.iter().find(|&&i| i >= n) {
        return Err(VizError::OutOfRange {
            what: "row",
            index: bad,
            count: n,
        });
    }
    let work = rows.len() as f64 * (layers * n * n) as f64 * (n * n) as f64;
    if work > FLOW_WORK_LIMIT {
        return Err(VizError::TooLarge {
            method: "attention flow",
            reason: format!(
                "{} rows of {n} tokens through {layers} layers is about {work:.1e} edge visits, \
                 over the limit of {FLOW_WORK_LIMIT:.0e} (about 10 s); ask for fewer rows or \
                 a shorter input (one row of 64 tokens through 12 layers is {:.1e})",
                rows.len(),
                (12 * 64 * 64) as f64 * (64.0 * 64.0)
            ),
        });
    }
    let mut g = Graph::layered(&hats, n);
    Ok(rows
        .iter()
        .map(|&i| {
            let source = layers * n + i;
            let mut f: Vec<f64> = (0..n).map(|j| g.max_flow(source, j)).collect();
            let total: f64 = f.iter().sum();
            if total > 0.0 {
                f.iter_mut().for_each(|x| *x /= total);
            }
            f
        })
        .collect())
}

/// A flow network: node `l·n + t` is token `t` of layer `l` (0 = the input).
struct Graph {
    /// Per node, its edges' indices.
    adj: Vec<Vec<usize>>,
    /// Edge `e`: head node, capacity, and its reverse edge `e ^ 1`.
    to: Vec<usize>,
    cap: Vec<f64>,
    flow: Vec<f64>,
}

impl Graph {
    fn layered(hats: &[Vec<f32>], n: usize) -> Self {
        let nodes = (hats.len() + 1) * n;
        let mut g = Graph {
            adj: vec![Vec::new(); nodes],
            to: Vec::new(),
            cap: Vec::new(),
            flow: Vec::new(),
        };
        for (l, a) in hats.iter().enumerate() {
            // Layer l + 1's position i reads layer l's position j with weight Â_{l+1}[i, j].
            for i in 0..n {
                for j in 0..n {
                    let c = a[i * n + j] as f64;
                    if c > 0.0 {
                        g.edge((l + 1) * n + i, l * n + j, c);
                    }
                }
            }
        }
        g
    }

    fn edge(&mut self, u: usize, v: usize, c: f64) {
        for (from, to, cap) in [(u, v, c), (v, u, 0.0)] {
            self.adj[from].push(self.to.len());
            self.to.push(to);
            self.cap.push(cap);
            self.flow.push(0.0);
        }
    }

    /// Edmonds–Karp: shortest augmenting paths until none is left.
    fn max_flow(&mut self, s: usize, t: usize) -> f64 {
        self.flow.iter_mut().for_each(|f| *f = 0.0);
        let mut total = 0.0;
        let mut via = vec![usize::MAX; self.adj.len()];
        loop {
            via.iter_mut().for_each(|e| *e = usize::MAX);
            let mut queue = std::collections::VecDeque::from([s]);
            while let Some(u) = queue.pop_front() {
                if u == t {
                    break;
                }
                for &e in &self.adj[u] {
                    let v = self.to[e];
                    if v != s && via[v] == usize::MAX && self.cap[e] - self.flow[e] > 1e-12 {
                        via[v] = e;
                        queue.push_back(v);
                    }
                }
            }
            if via[t] == usize::MAX {
                return total;
            }
            let mut push = f64::INFINITY;
            let mut v = t;
            while v != s {
                let e = via[v];
                push = push.min(self.cap[e] - self.flow[e]);
                v = self.to[e ^ 1];
            }
            let mut v = t;
            while v != s {
                let e = via[v];
                self.flow[e] += push;
                self.flow[e ^ 1] -= push;
                v = self.to[e ^ 1];
            }
            total += push;
        }
    }
}
