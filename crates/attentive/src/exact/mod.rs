//! The fused exact kernel: softmax attention tiled so the `N × N` weights are never stored,
//! forward and backward, with every mask, bias and pattern of [`Options`] compiled into a
//! [`Problem`](problem::Problem) first.
//!
//! * [`problem`] — a call's inputs and options checked and compiled once (spans per row, block
//!   tables, packed keys);
//! * [`pack`] — reading K and V: strided rows, packed `Kᵀ` and V panels;
//! * [`kernel`] — the tile machinery: score tiles, online softmax over runs of tiles;
//! * [`classes`] — the keys a strided pattern adds, one stride apart;
//! * [`forward`] — the tiled and decode passes over it, [`merge`](forward::merge),
//!   probabilities;
//! * [`residue`] — dilated and strided patterns as dense problems over residue classes;
//! * [`backward`] — dQ, dK, dV (and $P\circ dP$) recomputing the weights tile by tile.
//!
//! Data flows down this list; the tile sizes are in [`tile`](crate::tile), below all of it.

pub(crate) mod backward;
pub(crate) mod classes;
pub(crate) mod forward;
pub(crate) mod kernel;
pub(crate) mod pack;
pub(crate) mod problem;
pub(crate) mod residue;

use crate::error::Result;
use crate::options::Options;
use crate::view::{View, ViewMut};

/// Exact attention: writes $O = \mathrm{softmax}(\text{scale}\cdot QK^\top + \dots)V$ into `out`
/// (`[B, Hq, Nq, Dv]`) and, if given, the natural-log log-sum-exp of each row into `lse`
/// (`B·Hq·Nq`, row-major), which [`backward`](crate::backward) needs.
///
/// `q` is `[B, Hq, Nq, D]`, `k` is `[B, Hkv, Nk, D]`, `v` is `[B, Hkv, Nk, Dv]`, any strides; query
/// head `h` reads key/value head `h / (Hq / Hkv)`. Memory beyond the outputs is O(Nk·D) for a packed
/// copy of K plus O(threads) scratch.
///
/// ```
/// use attentive::{forward, Causal, Options, View, ViewMut};
/// let (b, h, n, d) = (1, 2, 5, 4);
/// let q: Vec<f32> = (0..b * h * n * d).map(|x| (x as f32 * 0.37).sin()).collect();
/// let mut o = vec![0.0; b * h * n * d];
/// let mut lse = vec![0.0; b * h * n];
/// let qv = View::contiguous(&q, &[b, h, n, d]).unwrap();
/// let opts = Options::new().causal(Causal::TopLeft);
/// forward(qv, qv, qv, &opts, &mut ViewMut::contiguous(&mut o, [b, h, n, d]).unwrap(), Some(&mut lse))
///     .unwrap();
/// // The first query sees only the first key, so its output is that key's value.
/// assert_eq!(&o[..d], &q[..d]);
/// let s00 = q[..d].iter().map(|x| x * x).sum::<f32>() / 2.0;
/// assert!((lse[0] - s00).abs() < 1e-6);
/// ```
pub fn forward(
    q: View,
    k: View,
    v: View,
    opts: &Options,
    out: &mut ViewMut,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    if let Some(plan) = residue::plan(opts) {
        return residue::forward(plan, q, k, v, opts, out, lse);
    }
    forward::run(&problem::Problem::new(q, k, v, opts)?, out, lse)
}
