//! Reformer's LSH attention (Kitaev et al., 2020), as the HF port of trax computes it.
//!
//! Queries and keys are one tensor `x` (shared QK). Keys are `x` normalised,
//! $$\hat k_j = \frac{x_j}{\sqrt{\mathrm{mean}(x_j^2) + 10^{-6}}\\,\sqrt{D}},$$
//! queries are `x` as it is, and a logit is $x_i\cdot\hat k_j$ with no further scale.
//!
//! * **Hashing.** Round `r` of `n_hashes` rotates every `x_j` by $R_r \in \mathbb{R}^{D\times
//!   n_b/2}$ and takes the bucket $h = \mathrm{argmax}([x_j R_r;\ -x_j R_r])$ (the first maximum
//!   on ties). Hashing has no gradient.
//! * **Sorting.** Each round's positions are sorted stably by bucket (so by `(bucket,
//!   position)`), and the rounds are laid one after another: `n_hashes·N` slots.
//! * **Chunks.** The slots are cut into chunks of `bucket_size` (`C`); each chunk's queries
//!   attend to the keys of their own chunk and of the chunk before (the first chunk's is the
//!   last, circularly, so a chunk may look into the previous round).
//! * **Masks.** A key at the query's own position gets the logit $-10^5$ (so a token with no
//!   other key attends to itself); with `causal`, a key after the query's position gets
//!   $-10^9$. The logits are replaced, so neither has a gradient. Repeated keys are not
//!   corrected for, as in the reference.
//! * **Rounds.** Each round's output $o_r$ is combined by its log-sum-exp $\ell_r$:
//!   $o = \sum_r e^{\ell_r - \mathrm{lse}\_r(\ell_r)}\\,o_r$. That is one softmax over the
//!   multiset union of a query's windows, which is how the backward treats it.
//! * **Short sequences.** When `N ≤ C` every query attends to every key once (one round, no
//!   hashing), as the reference does.
//! * **Causality.** With `causal`, no output weighs a later position's value. Later *keys* can
//!   still change an earlier output: the sort sees the whole sequence, so they can move chunk
//!   boundaries. That is the method's definition (the reference's too); decode by recomputing
//!   the prefix, not with a cache.
//! * **Precision.** Each log-sum-exp is kept as its maximum and `ln z` apart: next to the
//!   masked logits (~1e5) an f32 sum would round `ln z` away.
//!
//! `N` must be a multiple of `C` when longer than it (pad the sequence). Memory is
//! `O(n_hashes·N·(D + Dv))` per head and `O(C²)` per chunk, never `N²`.

use super::{gemm, heads, transpose, write_out, Dims};
use crate::error::{AttnError, Result};
use crate::real::Real;
use crate::simd::{Isa, Kernels};
use crate::view::{View, ViewMut};
use rayon::prelude::*;

/// The logit of a key at the query's own position.
pub const SELF_MASK: f32 = -1e5;
/// The logit of a key after the query (causal).
pub const MASKED: f32 = -1e9;
/// Added to the mean square of `x` before the key normalisation's square root.
pub const NORM_EPS: f32 = 1e-6;
/// Rows hashed at once: the rotated block (`256 × n_b/2` f32, 1 MiB at `n_b = 2048`) stays in
/// the 2 MiB L2.
const HASH_ROWS: usize = 256;

/// The options of [`forward`] and [`backward`].
#[derive(Clone, Copy, Debug)]
pub struct Lsh<'a> {
    /// The random rotations, `[n_hashes, D, n_buckets/2]` row-major.
    pub rotations: &'a [f32],
    /// Hashing rounds.
    pub n_hashes: usize,
    /// Buckets per round (even).
    pub n_buckets: usize,
    /// Chunk length `C`.
    pub bucket_size: usize,
    /// Keys after a query's position are masked.
    pub causal: bool,
    /// The positions each batch row may attend to, `B × N` row-major (`true` = use): padding,
    /// whose keys get the logit −1e9 (its queries' outputs are computed and meaningless).
    pub key_mask: Option<&'a [bool]>,
    /// The instruction set of the products (default: the fastest this CPU has).
    pub isa: Isa,
}

impl<'a> Lsh<'a> {
    /// Rotations `[n_hashes, D, n_buckets/2]`, chunks of `bucket_size`, not causal.
    pub fn new(
        rotations: &'a [f32],
        n_hashes: usize,
        n_buckets: usize,
        bucket_size: usize,
    ) -> Self {
        Self {
            rotations,
            n_hashes,
            n_buckets,
            bucket_size,
            causal: false,
            key_mask: None,
            isa: Isa::best(),
        }
    }

    /// With causal masking.
    pub fn causal(self, causal: bool) -> Self {
        Self { causal, ..self }
    }

    fn check(&self, x: &View, v: &View) -> Result<Dims> {
        let dims = Dims::of(x, x, v)?;
        let bad = |option, value: usize, reason| {
            Err(AttnError::InvalidOption {
                option,
                value: value as f64,
                reason,
            })
        };
        if self.n_hashes == 0 {
            return bad("n_hashes", 0, "at least one hashing round");
        }
        if self.n_buckets < 2 || !self.n_buckets.is_multiple_of(2) {
            return bad(
                "n_buckets",
                self.n_buckets,
                "the bucket count must be even and at least 2",
            );
        }
        let (n, c) = (dims.nk, self.bucket_size);
        if c == 0 {
            return bad("bucket_size", 0, "chunks of at least one position");
        }
        if c < n && n % c != 0 {
            return bad(
                "bucket_size",
                c,
                "must divide the sequence length (pad the sequence to a multiple of it)",
            );
        }
        crate::error::expect_len(
            "rotations",
            self.rotations.len(),
            self.n_hashes * dims.d * self.n_buckets / 2,
        )?;
        if let Some(m) = self.key_mask {
            crate::error::expect_len("key_mask", m.len(), dims.b * n)?;
        }
        if let Some(&r) = self.rotations.iter().find(|r| !r.is_finite()) {
            return Err(AttnError::InvalidOption {
                option: "rotations",
                value: r as f64,
                reason: "the rotations must be finite",
            });
        }
        Ok(dims)
    }
}

/// Rotations `[n_hashes, D, n_buckets/2]` of independent standard normal draws from `seed`.
///
/// ```
/// let r = attentive::variants::lsh::draw_rotations(2, 8, 16, 7);
/// assert_eq!(r.len(), 2 * 8 * 8);
/// assert_eq!(r, attentive::variants::lsh::draw_rotations(2, 8, 16, 7));
/// ```
pub fn draw_rotations(n_hashes: usize, d: usize, n_buckets: usize, seed: u64) -> Vec<f32> {
    let mut g = super::performer::Gauss::new(seed);
    (0..n_hashes * d * (n_buckets / 2))
        .map(|_| g.next() as f32)
        .collect()
}

/// The buckets of every row of `x` (`n × d`) in round `r`: `argmax([xR; −xR])`, first maximum.
fn hash_round(kern: &Kernels, opts: &Lsh, r: usize, x: &[f32], d: usize) -> Vec<u32> {
    let half = opts.n_buckets / 2;
    let rot = &opts.rotations[r * d * half..][..d * half];
    let n = x.len() / d;
    let mut buckets = vec![0u32; n];
    buckets.par_chunks_mut(HASH_ROWS).enumerate().for_each_init(
        || vec![0.0f32; HASH_ROWS * half],
        |block, (blk, out)| {
            let (start, rows) = (blk * HASH_ROWS, out.len());
            gemm(
                kern,
                (rows, d, half),
                &x[start * d..],
                (d, 1),
                rot,
                half,
                block,
                half,
                false,
            );
            for (b, y) in out.iter_mut().zip(block.chunks_exact_mut(half)) {
                *b = argmax_signed_f32(kern, y) as u32;
            }
        },
    );
    buckets
}

/// [`argmax_signed`] on the vector kernels, overwriting `y` with `−y`: the first maximum of
/// `[y; −y]` is `y`'s first maximum when that is at least `max(−y)` (the first half comes
/// first), else the first maximum of `−y` in the second half. Negation and comparison are
/// exact, so the index is the definition's.
fn argmax_signed_f32(kern: &Kernels, y: &mut [f32]) -> usize {
    let hi = row_max(kern, y);
    y.iter_mut().for_each(|v| *v = -*v);
    let neg = row_max(kern, y);
    let first = |target: f32| y.iter().position(|&v| v == target).unwrap_or(0);
    if hi >= neg {
        first(-hi)
    } else {
        y.len() + first(neg)
    }
}

/// The index of the first maximum of `[y; −y]`, by definition (the oracle's).
fn argmax_signed<T: PartialOrd + std::ops::Neg<Output = T> + Copy>(
    y: impl Iterator<Item = T> + Clone,
) -> usize {
    let half = y.clone().count();
    let mut best = (0, None::<T>);
    for (i, val) in y
        .clone()
        .enumerate()
        .chain(y.map(|t| -t).enumerate().map(|(i, t)| (half + i, t)))
    {
        if best.1.is_none_or(|b| val > b) {
            best = (i, Some(val));
        }
    }
    best.0
}

/// Positions sorted stably by bucket (a counting sort).
fn sort_by_bucket(buckets: &[u32], n_buckets: usize) -> Vec<u32> {
    let mut start = vec![0usize; n_buckets + 1];
    for &b in buckets {
        start[b as usize + 1] += 1;
    }
    for i in 0..n_buckets {
        start[i + 1] += start[i];
    }
    let mut order = vec![0u32; buckets.len()];
    for (pos, &b) in buckets.iter().enumerate() {
        order[start[b as usize]] = pos as u32;
        start[b as usize] += 1;
    }
    order
}

/// One head's hashing, sorting and chunking.
struct Plan {
    /// Chunk length.
    c: usize,
    /// Rounds laid out (1 when `N ≤ C`).
    rounds: usize,
    /// The position in each slot, `rounds·N`.
    order: Vec<u32>,
    /// Chunks also see the chunk before.
    look_back: bool,
}

impl Plan {
    fn new(kern: &Kernels, opts: &Lsh, x: &[f32], (n, d): (usize, usize)) -> Plan {
        if opts.bucket_size >= n {
            return Plan {
                c: n,
                rounds: 1,
                order: (0..n as u32).collect(),
                look_back: false,
            };
        }
        let order = (0..opts.n_hashes)
            .flat_map(|r| sort_by_bucket(&hash_round(kern, opts, r, x, d), opts.n_buckets))
            .collect();
        Plan {
            c: opts.bucket_size,
            rounds: opts.n_hashes,
            order,
            look_back: true,
        }
    }

    fn chunks(&self) -> usize {
        self.order.len() / self.c
    }

    /// The window's width: own chunk, and the previous one when looking back.
    fn width(&self) -> usize {
        if self.look_back {
            2 * self.c
        } else {
            self.c
        }
    }

    /// The slots of chunk `ch`'s window, in order (the previous chunk's first).
    fn window(&self, ch: usize) -> impl Iterator<Item = usize> + '_ {
        let prev = (ch + self.chunks() - 1) % self.chunks();
        let back = if self.look_back {
            prev * self.c..(prev + 1) * self.c
        } else {
            0..0
        };
        back.chain(ch * self.c..(ch + 1) * self.c)
    }
}

/// The largest element of `row`, on the vector kernels.
fn row_max(kern: &Kernels, row: &[f32]) -> f32 {
    // SAFETY: the kernel reads `row.len()` elements from the start of `row`.
    unsafe { (kern.max)(row.as_ptr(), row.len()) }
}

/// `row ← e^{row − m}`, returning the sum, on the vector kernels.
fn exp_shift(kern: &Kernels, row: &mut [f32], m: f32) -> f32 {
    // SAFETY: the kernel reads and writes `row.len()` elements from the start of `row`.
    unsafe { (kern.exp_sum)(row.as_mut_ptr(), row.len(), 1.0, m) }
}

/// `row ← a·row`, on the vector kernels.
fn scale(kern: &Kernels, row: &mut [f32], a: f32) {
    // SAFETY: the kernel reads and writes `row.len()` elements from the start of `row`.
    unsafe { (kern.scale)(row.as_mut_ptr(), row.len(), a) }
}

/// Whether a logit is replaced, and by what (`keep`: the row's key mask).
#[inline]
fn mask(qpos: u32, kpos: u32, causal: bool, keep: Option<&[bool]>) -> Option<f32> {
    if kpos == qpos {
        Some(SELF_MASK)
    } else if (causal && kpos > qpos) || keep.is_some_and(|m| !m[kpos as usize]) {
        Some(MASKED)
    } else {
        None
    }
}

/// `x̂ = x·rsqrt(mean(x²) + ε)/√D`, row by row; returns the rows' `rsqrt` factors too.
fn normalise(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0f32; x.len()];
    let r: Vec<f32> = x
        .chunks_exact(d)
        .zip(out.chunks_exact_mut(d))
        .map(|(row, o)| {
            let r = 1.0 / (super::dot(row, row) / d as f32 + NORM_EPS).sqrt();
            let s = r / (d as f32).sqrt();
            o.iter_mut().zip(row).for_each(|(o, x)| *o = x * s);
            r
        })
        .collect();
    (out, r)
}

/// One head's inputs: `x` (`N × D`), its normalised keys, `v` (`N × Dv`), and its plan.
struct Head<'a> {
    x: &'a [f32],
    kn: Vec<f32>,
    rs: Vec<f32>,
    v: &'a [f32],
    /// The batch row's key mask.
    keep: Option<&'a [bool]>,
    plan: Plan,
    d: usize,
    dv: usize,
}

/// A chunk's gathered rows and logits.
struct Scratch {
    qc: Vec<f32>,  //  C × D
    kw: Vec<f32>,  //  W × D
    kwt: Vec<f32>, // D × W
    vw: Vec<f32>,  //  W × Dv
    s: Vec<f32>,   //  C × W
    qpos: Vec<u32>,
    kpos: Vec<u32>,
}

impl Scratch {
    fn new(h: &Head) -> Self {
        let (c, w) = (h.plan.c, h.plan.width());
        Self {
            qc: vec![0.0; c * h.d],
            kw: vec![0.0; w * h.d],
            kwt: vec![0.0; h.d * w],
            vw: vec![0.0; w * h.dv],
            s: vec![0.0; c * w],
            qpos: vec![0; c],
            kpos: vec![0; w],
        }
    }

    /// Gathers chunk `ch` and forms its masked logits.
    fn logits(&mut self, kern: &Kernels, h: &Head, ch: usize, causal: bool) {
        let (c, w, d, dv) = (h.plan.c, h.plan.width(), h.d, h.dv);
        for (t, slot) in (ch * c..(ch + 1) * c).enumerate() {
            let p = h.plan.order[slot];
            self.qpos[t] = p;
            self.qc[t * d..][..d].copy_from_slice(&h.x[p as usize * d..][..d]);
        }
        for (t, slot) in h.plan.window(ch).enumerate() {
            let p = h.plan.order[slot];
            self.kpos[t] = p;
            self.kw[t * d..][..d].copy_from_slice(&h.kn[p as usize * d..][..d]);
            self.vw[t * dv..][..dv].copy_from_slice(&h.v[p as usize * dv..][..dv]);
        }
        transpose(&self.kw, (w, d), &mut self.kwt);
        gemm(
            kern,
            (c, d, w),
            &self.qc,
            (d, 1),
            &self.kwt,
            w,
            &mut self.s,
            w,
            false,
        );
        for (row, &qp) in self.s.chunks_exact_mut(w).zip(&self.qpos) {
            for (s, &kp) in row.iter_mut().zip(&self.kpos) {
                if let Some(m) = mask(qp, kp, causal, h.keep) {
                    *s = m;
                }
            }
        }
    }
}

impl<'a> Head<'a> {
    /// Head `bh` of the flat `B·H` heads.
    fn new(
        kern: &Kernels,
        opts: &Lsh<'a>,
        (x, v): (&'a [f32], &'a [f32]),
        (bh, h, d): (usize, usize, usize),
    ) -> Self {
        let n = x.len() / d;
        let (kn, rs) = normalise(x, d);
        Head {
            x,
            kn,
            rs,
            v,
            keep: opts.key_mask.map(|m| &m[bh / h * n..][..n]),
            plan: Plan::new(kern, opts, x, (n, d)),
            d,
            dv: v.len() / n,
        }
    }

    fn n(&self) -> usize {
        self.x.len() / self.d
    }

    /// The output (`N × Dv`) and each position's log-sum-exp over all its windows, as its
    /// largest logit `m` and `ln z` of the rest (`N` pairs): kept apart because masked logits
    /// are ~1e5, where an f32 sum `m + ln z` would lose most of `ln z` to rounding.
    fn forward(&self, kern: &Kernels, causal: bool) -> (Vec<f32>, Vec<(f32, f32)>) {
        let (c, w, dv, n) = (self.plan.c, self.plan.width(), self.dv, self.n());
        let slots = self.plan.order.len();
        let mut o_slots = vec![0.0f32; slots * dv]; // [rounds·N, Dv] in slot order
        let mut lse_slots = vec![(0.0f32, 0.0f32); slots];
        o_slots
            .par_chunks_mut(c * dv)
            .zip(lse_slots.par_chunks_mut(c))
            .enumerate()
            .for_each_init(
                || Scratch::new(self),
                |sc, (ch, (o, lse))| {
                    sc.logits(kern, self, ch, causal);
                    for (row, l) in sc.s.chunks_exact_mut(w).zip(lse.iter_mut()) {
                        let m = row_max(kern, row);
                        let z = exp_shift(kern, row, m);
                        scale(kern, row, 1.0 / z);
                        *l = (m, z.ln());
                    }
                    gemm(kern, (c, w, dv), &sc.s, (w, 1), &sc.vw, dv, o, dv, false);
                },
            );
        if self.plan.rounds == 1 {
            let mut o = vec![0.0f32; n * dv];
            let mut lse = vec![(0.0f32, 0.0f32); n];
            for (slot, &p) in self.plan.order.iter().enumerate() {
                o[p as usize * dv..][..dv].copy_from_slice(&o_slots[slot * dv..][..dv]);
                lse[p as usize] = lse_slots[slot];
            }
            return (o, lse);
        }
        // slot_of[r][p]: where position p sits in round r.
        let mut slot_of = vec![0usize; slots];
        for (slot, &p) in self.plan.order.iter().enumerate() {
            slot_of[slot / n * n + p as usize] = slot;
        }
        let mut o = vec![0.0f32; n * dv];
        let mut lse = vec![(0.0f32, 0.0f32); n];
        o.par_chunks_mut(dv)
            .zip(lse.par_iter_mut())
            .enumerate()
            .for_each(|(p, (o, l))| {
                let slot = |r: usize| slot_of[r * n + p];
                let rounds = 0..self.plan.rounds;
                let m = rounds
                    .clone()
                    .fold(f32::NEG_INFINITY, |a, r| a.max(lse_slots[slot(r)].0));
                // Round r's weight is e^{(m_r − m) + ln z_r − ln Z}.
                let rel = |r: usize| lse_slots[slot(r)].0 - m + lse_slots[slot(r)].1;
                let lz = rounds.clone().map(|r| rel(r).exp()).sum::<f32>().ln();
                *l = (m, lz);
                for r in rounds {
                    super::axpy(o, (rel(r) - lz).exp(), &o_slots[slot(r) * dv..][..dv]);
                }
            });
        (o, lse)
    }

    /// `(dx, dv)` for the output gradient `d_o` (`N × Dv`).
    fn backward(&self, kern: &Kernels, causal: bool, d_o: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (o, lse) = self.forward(kern, causal);
        let (c, w, d, dv, n) = (self.plan.c, self.plan.width(), self.d, self.dv, self.n());
        // D_i = dO_i·O_i
        let delta: Vec<f32> = d_o
            .chunks_exact(dv)
            .zip(o.chunks_exact(dv))
            .map(|(g, o)| super::dot(g, o))
            .collect();
        // Per chunk: [dQ (C × D) | dK of the window (W × D) | dV of the window (W × Dv)].
        let block = c * d + w * (d + dv);
        let mut grads = vec![0.0f32; self.plan.chunks() * block];
        grads.par_chunks_mut(block).enumerate().for_each_init(
            || {
                (
                    Scratch::new(self),
                    vec![0.0f32; c * dv],
                    vec![0.0f32; dv * w],
                    vec![0.0f32; c * w],
                )
            },
            |(sc, doc, vwt, dp), (ch, g)| {
                sc.logits(kern, self, ch, causal);
                for (t, &p) in sc.qpos.iter().enumerate() {
                    doc[t * dv..][..dv].copy_from_slice(&d_o[p as usize * dv..][..dv]);
                }
                transpose(&sc.vw, (w, dv), vwt);
                gemm(kern, (c, dv, w), doc, (dv, 1), vwt, w, dp, w, false);
                // s ← P = exp(s − L_i); dp ← dS = P(dP − D_i), zero where the logit was replaced.
                for ((row, dpr), &qp) in
                    sc.s.chunks_exact_mut(w)
                        .zip(dp.chunks_exact_mut(w))
                        .zip(&sc.qpos)
                {
                    let ((m, lz), di) = (lse[qp as usize], delta[qp as usize]);
                    // e^{s − m}·e^{−ln z}: m and ln z kept apart (see `forward`).
                    exp_shift(kern, row, m);
                    scale(kern, row, (-lz).exp());
                    for ((s, ds), &kp) in row.iter_mut().zip(dpr.iter_mut()).zip(&sc.kpos) {
                        *ds = if mask(qp, kp, causal, self.keep).is_some() {
                            0.0
                        } else {
                            *s * (*ds - di)
                        };
                    }
                }
                let (dq, rest) = g.split_at_mut(c * d);
                let (dk, dvw) = rest.split_at_mut(w * d);
                gemm(kern, (c, w, d), dp, (w, 1), &sc.kw, d, dq, d, false);
                gemm(kern, (w, c, d), dp, (1, w), &sc.qc, d, dk, d, false);
                gemm(kern, (w, c, dv), &sc.s, (1, w), doc, dv, dvw, dv, false);
            },
        );
        // Gather the slots' gradients onto positions.
        let (mut dq, mut dkn, mut dvs) = (
            vec![0.0f32; n * d],
            vec![0.0f32; n * d],
            vec![0.0f32; n * dv],
        );
        for ch in 0..self.plan.chunks() {
            let g = &grads[ch * block..][..block];
            for (t, slot) in (ch * c..(ch + 1) * c).enumerate() {
                let p = self.plan.order[slot] as usize;
                super::axpy(&mut dq[p * d..][..d], 1.0, &g[t * d..][..d]);
            }
            let dk = &g[c * d..][..w * d];
            let dvw = &g[c * d + w * d..][..w * dv];
            for (t, slot) in self.plan.window(ch).enumerate() {
                let p = self.plan.order[slot] as usize;
                super::axpy(&mut dkn[p * d..][..d], 1.0, &dk[t * d..][..d]);
                super::axpy(&mut dvs[p * dv..][..dv], 1.0, &dvw[t * dv..][..dv]);
            }
        }
        // Through the key normalisation: dx += (r·g − r³·x·(g·x)/D)/√D.
        let sd = (d as f32).sqrt();
        for ((dx, g), (x, &r)) in dq
            .chunks_exact_mut(d)
            .zip(dkn.chunks_exact(d))
            .zip(self.x.chunks_exact(d).zip(&self.rs))
        {
            let gx = super::dot(g, x);
            let (a, b) = (r / sd, r * r * r * gx / (d as f32 * sd));
            for ((dx, g), x) in dx.iter_mut().zip(g).zip(x) {
                *dx += a * g - b * x;
            }
        }
        (dq, dvs)
    }
}

/// LSH attention of `x` (queries and keys, `[B, H, N, D]`) over `v` (`[B, H, N, Dv]`) into `out`
/// (`[B, H, N, Dv]`).
///
/// ```
/// use attentive::variants::lsh::{draw_rotations, forward, Lsh};
/// use attentive::{View, ViewMut};
/// let (n, d) = (8, 4);
/// let x: Vec<f32> = (0..n * d).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
/// let rot = draw_rotations(2, d, 4, 1);
/// let xv = View::contiguous(&x, &[1, 1, n, d]).unwrap();
/// let mut o = vec![0.0f32; n * d];
/// forward(xv, xv, &Lsh::new(&rot, 2, 4, 2), &mut ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap()).unwrap();
/// assert!(o.iter().all(|y| y.is_finite()));
/// ```
///
/// # Errors
/// Shapes that disagree, an empty dimension, rotations not `n_hashes·D·n_buckets/2` long or
/// not finite, an odd bucket count, a chunk length that does not divide a longer `N`, an
/// instruction set this CPU lacks.
pub fn forward(x: View, v: View, opts: &Lsh, out: &mut ViewMut) -> Result<()> {
    let dims = opts.check(&x, &v)?;
    let kern = opts.isa.kernels()?;
    let Dims {
        b, hq, nq, d, dv, ..
    } = dims;
    crate::error::expect_shape("out", out.shape(), [b, hq, nq, dv])?;
    let (xs, vs) = (heads(&x)?, heads(&v)?);
    write_out(out, |o| {
        for (bh, ((oh, xh), vh)) in o
            .chunks_exact_mut(nq * dv)
            .zip(xs.chunks_exact(nq * d))
            .zip(vs.chunks_exact(nq * dv))
            .enumerate()
        {
            let head = Head::new(kern, opts, (xh, vh), (bh, hq, d));
            oh.copy_from_slice(&head.forward(kern, opts.causal).0);
        }
    });
    Ok(())
}

/// Gradients of LSH attention: `dx` (through both the queries and the normalised keys) and
/// `dv`, for the output gradient `d_o`. The hashing, a step function, has none.
///
/// # Errors
/// As [`forward`], gradients of the wrong shape.
pub fn backward(
    x: View,
    v: View,
    d_o: View,
    opts: &Lsh,
    dx: &mut ViewMut,
    dv: &mut ViewMut,
) -> Result<()> {
    let dims = opts.check(&x, &v)?;
    let kern = opts.isa.kernels()?;
    let Dims {
        b,
        hq,
        nq,
        d,
        dv: dvd,
        ..
    } = dims;
    crate::error::expect_shape("d_o", d_o.shape(), [b, hq, nq, dvd])?;
    crate::error::expect_shape("dx", dx.shape(), [b, hq, nq, d])?;
    crate::error::expect_shape("dv", dv.shape(), [b, hq, nq, dvd])?;
    let (xs, vs, gs) = (heads(&x)?, heads(&v)?, heads(&d_o)?);
    let per: Vec<(Vec<f32>, Vec<f32>)> = xs
        .chunks_exact(nq * d)
        .zip(vs.chunks_exact(nq * dvd))
        .zip(gs.chunks_exact(nq * dvd))
        .enumerate()
        .map(|(bh, ((xh, vh), gh))| {
            Head::new(kern, opts, (xh, vh), (bh, hq, d)).backward(kern, opts.causal, gh)
        })
        .collect();
    write_out(dx, |o| {
        for (o, (g, _)) in o.chunks_exact_mut(nq * d).zip(&per) {
            o.copy_from_slice(g);
        }
    });
    write_out(dv, |o| {
        for (o, (_, g)) in o.chunks_exact_mut(nq * dvd).zip(&per) {
            o.copy_from_slice(g);
        }
    });
    Ok(())
}

/// The oracle: hashing, sorting and chunking written out with lists, every query's windows
/// scored one pair at a time, rounds combined by their log-sum-exp, and the gradients as one
/// softmax over the union of the windows. Generic over the float type: `f64` is the oracle,
/// `f32` the naive baseline.
pub mod oracle {
    use super::*;

    /// `(o, dx, dv)`, row-major.
    pub type Out<T> = (Vec<T>, Vec<T>, Vec<T>);

    /// # Errors
    /// As [`forward`].
    #[allow(clippy::needless_range_loop)] // term by term, as the definition reads
    pub fn lsh<T: Real>(x: View, v: View, d_o: View, opts: &Lsh) -> Result<Out<T>> {
        let dims = opts.check(&x, &v)?;
        let Dims {
            b,
            hq,
            nq: n,
            d,
            dv,
            ..
        } = dims;
        crate::error::expect_shape("d_o", d_o.shape(), [b, hq, n, dv])?;
        let f = T::from_f32;
        let half = opts.n_buckets / 2;
        let (mut o, mut dx, mut dvv) = (
            vec![T::ZERO; b * hq * n * dv],
            vec![T::ZERO; b * hq * n * d],
            vec![T::ZERO; b * hq * n * dv],
        );
        for bi in 0..b {
            for h in 0..hq {
                let xr: Vec<Vec<T>> = (0..n)
                    .map(|i| (0..d).map(|c| f(x.at(bi, h, i, c))).collect())
                    .collect();
                let vr: Vec<Vec<T>> = (0..n)
                    .map(|i| (0..dv).map(|c| f(v.at(bi, h, i, c))).collect())
                    .collect();
                let g: Vec<Vec<T>> = (0..n)
                    .map(|i| (0..dv).map(|c| f(d_o.at(bi, h, i, c))).collect())
                    .collect();
                let rs: Vec<T> = xr
                    .iter()
                    .map(|r| {
                        let ms = r.iter().fold(T::ZERO, |a, &x| a + x * x) * f(1.0 / d as f32);
                        (ms + f(NORM_EPS)).sqrt().recip()
                    })
                    .collect();
                let sd = f(d as f32).sqrt();
                let kn: Vec<Vec<T>> = xr
                    .iter()
                    .zip(&rs)
                    .map(|(r, &s)| r.iter().map(|&x| x * s * sd.recip()).collect())
                    .collect();
                // Slots: (round, position), sorted by (bucket, position) within each round.
                let (c, rounds, look_back) = if opts.bucket_size >= n {
                    (n, 1, false)
                } else {
                    (opts.bucket_size, opts.n_hashes, true)
                };
                let mut slots: Vec<usize> = Vec::new();
                for r in 0..rounds {
                    let mut keyed: Vec<(usize, usize)> = (0..n)
                        .map(|i| {
                            if !look_back {
                                return (0, i);
                            }
                            let y: Vec<T> = (0..half)
                                .map(|e| {
                                    (0..d).fold(T::ZERO, |a, k| {
                                        a + xr[i][k] * f(opts.rotations[(r * d + k) * half + e])
                                    })
                                })
                                .collect();
                            (argmax_signed(y.into_iter()), i)
                        })
                        .collect();
                    keyed.sort_by_key(|&(bucket, i)| (bucket, i));
                    slots.extend(keyed.iter().map(|&(_, i)| i));
                }
                let chunks = slots.len() / c;
                let window = |ch: usize| -> Vec<usize> {
                    let mut w = Vec::new();
                    if look_back {
                        let prev = (ch + chunks - 1) % chunks;
                        w.extend(&slots[prev * c..(prev + 1) * c]);
                    }
                    w.extend(&slots[ch * c..(ch + 1) * c]);
                    w
                };
                let keep = opts.key_mask.map(|m| &m[bi * n..(bi + 1) * n]);
                let logit = |i: usize, j: usize| match mask(i as u32, j as u32, opts.causal, keep) {
                    Some(m) => f(m),
                    None => (0..d).fold(T::ZERO, |a, k| a + xr[i][k] * kn[j][k]),
                };
                // Each position's (round lse, round output) pairs.
                let mut per: Vec<Vec<(T, Vec<T>)>> = vec![Vec::new(); n];
                for ch in 0..chunks {
                    let w = window(ch);
                    for &i in &slots[ch * c..(ch + 1) * c] {
                        let s: Vec<T> = w.iter().map(|&j| logit(i, j)).collect();
                        let m = s.iter().fold(T::NEG_INF, |a, &x| if x > a { x } else { a });
                        let z = s.iter().fold(T::ZERO, |a, &x| a + (x - m).exp());
                        let lse = m + z.ln();
                        let out: Vec<T> = (0..dv)
                            .map(|e| {
                                w.iter()
                                    .zip(&s)
                                    .fold(T::ZERO, |a, (&j, &x)| a + (x - lse).exp() * vr[j][e])
                            })
                            .collect();
                        per[i].push((lse, out));
                    }
                }
                let mut big_l = vec![T::ZERO; n];
                for i in 0..n {
                    let m = per[i]
                        .iter()
                        .fold(T::NEG_INF, |a, (l, _)| if *l > a { *l } else { a });
                    let z = per[i].iter().fold(T::ZERO, |a, (l, _)| a + (*l - m).exp());
                    big_l[i] = m + z.ln();
                    let row = (bi * hq + h) * n + i;
                    for (l, out) in &per[i] {
                        let wgt = (*l - big_l[i]).exp();
                        for e in 0..dv {
                            o[row * dv + e] = o[row * dv + e] + wgt * out[e];
                        }
                    }
                }
                // Backward: one softmax over the union of i's windows.
                let mut dq = vec![vec![T::ZERO; d]; n];
                let mut dkn = vec![vec![T::ZERO; d]; n];
                for ch in 0..chunks {
                    let w = window(ch);
                    for &i in &slots[ch * c..(ch + 1) * c] {
                        let row = (bi * hq + h) * n + i;
                        let di = (0..dv).fold(T::ZERO, |a, e| a + g[i][e] * o[row * dv + e]);
                        for &j in &w {
                            let p = (logit(i, j) - big_l[i]).exp();
                            let dp = (0..dv).fold(T::ZERO, |a, e| a + g[i][e] * vr[j][e]);
                            let at = ((bi * hq + h) * n + j) * dv;
                            for e in 0..dv {
                                dvv[at + e] = dvv[at + e] + p * g[i][e];
                            }
                            if mask(i as u32, j as u32, opts.causal, keep).is_some() {
                                continue;
                            }
                            let ds = p * (dp - di);
                            for k in 0..d {
                                dq[i][k] = dq[i][k] + ds * kn[j][k];
                                dkn[j][k] = dkn[j][k] + ds * xr[i][k];
                            }
                        }
                    }
                }
                for j in 0..n {
                    let gx = (0..d).fold(T::ZERO, |a, k| a + dkn[j][k] * xr[j][k]);
                    let r = rs[j];
                    let at = ((bi * hq + h) * n + j) * d;
                    for k in 0..d {
                        dx[at + k] = dq[j][k]
                            + (r * dkn[j][k] - r * r * r * xr[j][k] * gx * f(1.0 / d as f32))
                                * sd.recip();
                    }
                }
            }
        }
        Ok((o, dx, dvv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass argmax equals the definition, ties included (the first maximum wins, the
    /// first half before the second).
    #[test]
    fn one_pass_argmax_equals_the_definition() {
        let cases: [&[f32]; 6] = [
            &[0.5],
            &[-0.5],
            &[1.0, -1.0],
            &[-1.0, 1.0, 1.0, -1.0],
            &[0.0, 0.0, 0.0],
            &[0.25, -0.75, 0.75, -0.25],
        ];
        let check = |y: &[f32]| {
            for isa in Isa::all_available() {
                let kern = isa.kernels().unwrap();
                let mut scratch = y.to_vec();
                let got = argmax_signed_f32(kern, &mut scratch);
                assert_eq!(got, argmax_signed(y.iter().copied()), "{isa:?}: {y:?}");
            }
        };
        for y in cases {
            check(y);
        }
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for n in 1..40 {
            let y: Vec<f32> = (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    // Few distinct values, so ties are common.
                    (s % 7) as f32 - 3.0
                })
                .collect();
            check(&y);
        }
    }
}
