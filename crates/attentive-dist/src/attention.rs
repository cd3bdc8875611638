//! Ring attention, forward and backward, over any [`Ring`].
//!
//! Rank $r$ holds its query rows $Q_r$ and its block $K_r, V_r$ of keys and values
//! ([`Layout`]). At step $s = 0, 1, \dots, P-1$ it holds the block of rank
//! $\text{src} = r - s \bmod P$, attends its queries to it with the fused kernel while that block
//! travels on to rank $r + 1$ and the next one arrives from rank $r - 1$, and merges the partial
//! result into its running output by log-sum-exp:
//! $$O \leftarrow \frac{e^{L} O + e^{L'} O'}{e^{L} + e^{L'}},\qquad
//! L \leftarrow \log\\!\left(e^{L} + e^{L'}\right).$$
//! No rank ever holds more than two key/value blocks, and no $N \times N$ matrix exists anywhere.
//!
//! Causal attention uses the zigzag split. Against its own block a rank attends causally (its two
//! chunks, concatenated, are in sequence order); against an earlier rank's block
//! ($\text{src} < r$) all its queries see that block's first chunk and nothing of its second;
//! against a later rank's ($\text{src} > r$) only its second chunk's queries see anything, and
//! they see the whole block. So every step but the first computes $c \times 2c$ pairs on every
//! rank (chunks of $c$ rows), and the first $2c \times 2c$ causally: the same work everywhere.
//!
//! The backward reuses the final $O$ and LSE: with them the kernel's backward over one block
//! gives exactly that block's share of $dQ$, and the gradients $dK, dV$ its keys receive from
//! these queries. dQ stays home; each block's $dK, dV$ accumulator travels the ring one step
//! behind its block (it is sent after the step that adds to it, overlapping the next step's
//! work) and returns to its owner after $P$ steps.

use crate::error::{DistError, Result};
use crate::layout::{Layout, Split};
use crate::ring::{all_ok, same_everywhere, Ring};
use attentive::{Causal, Options, View, ViewMut};
use std::ops::Range;

/// One attention problem split over a ring: global lengths and the options that a split allows
/// (masks that depend on positions other than the causal one do not travel with the blocks).
///
/// ```
/// use attentive::{forward, Causal, Options, View, ViewMut};
/// use attentive_dist::{threaded, RingAttention};
/// use std::time::Duration;
/// let (h, n, d) = (2, 37, 8);
/// let x: Vec<f32> = (0..h * n * d).map(|i| (i as f32 * 0.37).sin()).collect();
/// let attn = RingAttention::new(n).causal(true);
/// let ranks = 3;
/// let (layout, _) = attn.layouts(ranks);
/// // Each rank's rows: its chunks of every head, gathered from the whole sequence.
/// let local = |r: usize| {
///     let mut out = Vec::new();
///     for hh in 0..h {
///         for i in layout.chunks(r).into_iter().flatten() {
///             out.extend_from_slice(&x[(hh * n + i) * d..(hh * n + i + 1) * d]);
///         }
///     }
///     out
/// };
/// let outs = threaded(ranks, Duration::from_secs(60), |ring| {
///     let r = attentive_dist::Ring::rank(ring);
///     let xr = local(r);
///     let view = View::contiguous(&xr, &[1, h, layout.rows(r), d]).unwrap();
///     let (mut o, mut lse) = (vec![0.0; xr.len()], vec![0.0; h * layout.rows(r)]);
///     attn.forward(ring, view, view, view, &mut o, &mut lse).map(|_| o)
/// });
/// // The single-process kernel on the whole sequence, for comparison.
/// let whole = View::contiguous(&x, &[1, h, n, d]).unwrap();
/// let mut o = vec![0.0; x.len()];
/// let opts = Options::new().causal(Causal::TopLeft);
/// forward(whole, whole, whole, &opts, &mut ViewMut::contiguous(&mut o, [1, h, n, d]).unwrap(), None)
///     .unwrap();
/// for (r, out) in outs.into_iter().enumerate() {
///     let out = out.unwrap();
///     let rows = layout.rows(r);
///     for (k, i) in layout.chunks(r).into_iter().flatten().enumerate() {
///         for hh in 0..h {
///             for c in 0..d {
///                 let (a, b) = (out[(hh * rows + k) * d + c], o[(hh * n + i) * d + c]);
///                 assert!((a - b).abs() < 1e-5);
///             }
///         }
///     }
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RingAttention {
    /// Query rows of the whole sequence.
    pub n_q: usize,
    /// Key rows of the whole sequence (equal to `n_q` under a causal mask).
    pub n_k: usize,
    /// Query $i$ sees keys $j \le i$; the rows are split zigzag.
    pub causal: bool,
    /// Multiplies $q\cdot k$; `None` means $1/\sqrt{D}$.
    pub scale: Option<f32>,
    /// Soft cap $c$ of $c\tanh(s/c)$.
    pub softcap: Option<f32>,
}

/// The shapes a call works on, checked alike on every rank.
struct Geometry {
    rank: usize,
    ranks: usize,
    b: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    lq: Layout,
    lk: Layout,
}

impl Geometry {
    /// Query rows this rank holds.
    fn nq(&self) -> usize {
        self.lq.rows(self.rank)
    }
    /// Values in the key/value block of rank `src`: K then V, both row-major.
    fn block_len(&self, src: usize) -> usize {
        self.b * self.hkv * self.lk.rows(src) * (self.d + self.dv)
    }
    /// The rank whose block this rank holds at step `s`.
    fn src(&self, s: usize) -> usize {
        (self.rank + self.ranks - s % self.ranks) % self.ranks
    }
}

/// What a rank attends at one step: its query rows `q` against the held block's key rows `k`.
struct Step {
    q: Range<usize>,
    k: Range<usize>,
    causal: bool,
}

impl RingAttention {
    /// Self-attention over a sequence of `n` rows, not causal, default scale.
    pub fn new(n: usize) -> Self {
        Self::cross(n, n)
    }
    /// `n_q` queries attending `n_k` keys (not causal).
    pub fn cross(n_q: usize, n_k: usize) -> Self {
        Self {
            n_q,
            n_k,
            causal: false,
            scale: None,
            softcap: None,
        }
    }
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    pub fn scale(mut self, s: Option<f32>) -> Self {
        self.scale = s;
        self
    }
    pub fn softcap(mut self, c: Option<f32>) -> Self {
        self.softcap = c;
        self
    }

    /// The rows each of `ranks` ranks holds: of the queries, and of the keys and values.
    pub fn layouts(&self, ranks: usize) -> (Layout, Layout) {
        let split = if self.causal {
            Split::Zigzag
        } else {
            Split::Plain
        };
        let at = |n| Layout { n, ranks, split };
        (at(self.n_q), at(self.n_k))
    }

    fn options(&self, causal: bool) -> Options<'static> {
        let mut o = Options::new();
        o.scale = self.scale;
        o.softcap = self.softcap;
        if causal {
            o = o.causal(Causal::TopLeft);
        }
        o
    }

    fn step(&self, g: &Geometry, src: usize) -> Step {
        let (nq, nk) = (g.nq(), g.lk.rows(src));
        let r = g.rank;
        if !self.causal {
            (0..nq, 0..nk, false)
        } else if src == r {
            (0..nq, 0..nk, true)
        } else if src < r {
            (0..nq, 0..g.lk.first(src), false)
        } else {
            (g.lq.first(r)..nq, 0..nk, false)
        }
        .into()
    }

    /// Checks the local tensors against the problem and this rank's rows, and that every rank
    /// was started on the same problem; every rank fails if any does.
    fn setup(
        &self,
        ring: &mut dyn Ring,
        q: View,
        k: View,
        v: View,
        phase: u64,
        outputs: &dyn Fn(&Geometry) -> Result<()>,
    ) -> Result<Geometry> {
        let (rank, ranks) = (ring.rank(), ring.size());
        if ranks == 0 || rank >= ranks {
            return Err(DistError::Unsupported(format!(
                "rank {rank} of a ring of {ranks}"
            )));
        }
        let ([b, hq, _, d], [_, hkv, _, _], [_, _, _, dv]) = (q.shape(), k.shape(), v.shape());
        let (lq, lk) = self.layouts(ranks);
        let g = Geometry {
            rank,
            ranks,
            b,
            hq,
            hkv,
            d,
            dv,
            lq,
            lk,
        };
        let local = self.check(&g, q, k, v).and_then(|()| outputs(&g));
        let bits = |x: Option<f32>| x.map_or(u64::MAX, |x| u64::from(x.to_bits()));
        let facts = [
            ("phase", phase),
            ("B", b as u64),
            ("Hq", hq as u64),
            ("Hkv", hkv as u64),
            ("D", d as u64),
            ("Dv", dv as u64),
            ("Nq", self.n_q as u64),
            ("Nk", self.n_k as u64),
            ("causal", u64::from(self.causal)),
            ("scale bits", bits(self.scale)),
            ("softcap bits", bits(self.softcap)),
        ];
        same_everywhere(ring, &facts)?;
        if all_ok(ring, local.is_ok())? {
            return Ok(g);
        }
        Err(local.err().unwrap_or_else(|| DistError::Disagree {
            rank,
            detail: "another rank's tensors do not fit the problem".into(),
        }))
    }

    fn check(&self, g: &Geometry, q: View, k: View, v: View) -> Result<()> {
        if self.causal && self.n_q != self.n_k {
            return Err(DistError::Unsupported(format!(
                "causal ring attention needs as many queries as keys (got {} and {})",
                self.n_q, self.n_k
            )));
        }
        if g.hkv == 0 || !g.hq.is_multiple_of(g.hkv) {
            return Err(DistError::Unsupported(format!(
                "{} query heads cannot share {} key/value heads",
                g.hq, g.hkv
            )));
        }
        let nk = g.lk.rows(g.rank);
        expect(g, "q", q.shape(), [g.b, g.hq, g.nq(), g.d])?;
        expect(g, "k", k.shape(), [g.b, g.hkv, nk, g.d])?;
        expect(g, "v", v.shape(), [g.b, g.hkv, nk, g.dv])
    }

    /// Attention of this rank's queries over the whole sequence's keys: writes `out`
    /// (`[B, Hq, rows, Dv]`, row-major, the rows in [`Layout::chunks`] order) and `lse`
    /// (`B·Hq·rows`). `q`, `k` and `v` are this rank's rows (`[B, Hq, rows, D]`,
    /// `[B, Hkv, rows, D]`, `[B, Hkv, rows, Dv]`, any strides). Every rank of the ring calls it
    /// together. With one rank it is the single-process kernel's call, bit for bit.
    pub fn forward(
        &self,
        ring: &mut dyn Ring,
        q: View,
        k: View,
        v: View,
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        let outputs = |g: &Geometry| {
            let rows = g.b * g.hq * g.nq();
            expect_len(g, "out", out.len(), rows * g.dv)?;
            expect_len(g, "lse", lse.len(), rows)
        };
        let g = self.setup(ring, q, k, v, 0, &outputs)?;
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        let mut cur = pack(k, v)?;
        let mut next = Vec::new();
        for s in 0..g.ranks {
            let mut work = || self.forward_step(&g, q, &cur, g.src(s), s == 0, out, lse);
            // The last step has nothing to pass on.
            let pass = s + 1 < g.ranks;
            resize(&mut next, if pass { g.block_len(g.src(s + 1)) } else { 0 })?;
            let (send, recv): (&[&[f32]], &mut [&mut [f32]]) = match pass {
                true => (&[&cur], &mut [&mut next]),
                false => (&[], &mut []),
            };
            ring.round(send, recv, &mut work)?;
            std::mem::swap(&mut cur, &mut next);
        }
        Ok(())
    }

    /// One step of the forward: this rank's queries against the block of `src`, written into
    /// `out`/`lse` at the first step and merged into them after.
    #[allow(clippy::too_many_arguments)]
    fn forward_step(
        &self,
        g: &Geometry,
        q: View,
        block: &[f32],
        src: usize,
        first: bool,
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        let st = self.step(g, src);
        if st.q.is_empty() || st.k.is_empty() {
            return Ok(());
        }
        let (k, v) = block_views(g, block, src, st.k.clone())?;
        let q = rows(q, st.q.clone())?;
        let opts = self.options(st.causal);
        let nq = g.nq();
        if first {
            let mut o = ViewMut::contiguous(out, [g.b, g.hq, nq, g.dv])?;
            return Ok(attentive::forward(q, k, v, &opts, &mut o, Some(lse))?);
        }
        let m = st.q.len();
        let mut o_t = zeros(g.b * g.hq * m * g.dv)?; // [B, Hq, m, Dv]
        let mut lse_t = zeros(g.b * g.hq * m)?; // [B, Hq, m]
        let mut o = ViewMut::contiguous(&mut o_t, [g.b, g.hq, m, g.dv])?;
        attentive::forward(q, k, v, &opts, &mut o, Some(&mut lse_t))?;
        for bh in 0..g.b * g.hq {
            let at = bh * nq + st.q.start;
            attentive::merge(
                &mut out[at * g.dv..(at + m) * g.dv],
                &mut lse[at..at + m],
                &o_t[bh * m * g.dv..(bh + 1) * m * g.dv],
                &lse_t[bh * m..(bh + 1) * m],
            )?;
        }
        Ok(())
    }

    /// Gradients of [`forward`](Self::forward) for this rank's rows: given its inputs, its output
    /// `o` and `lse`, and the gradient `d_o` of the loss with respect to `o`, writes `dq`
    /// (`[B, Hq, rows, D]`), `dk` (`[B, Hkv, rows, D]`) and `dv` (`[B, Hkv, rows, Dv]`),
    /// row-major. Every rank of the ring calls it together.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ring: &mut dyn Ring,
        q: View,
        k: View,
        v: View,
        o: View,
        lse: &[f32],
        d_o: View,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) -> Result<()> {
        let outputs = |g: &Geometry| {
            let (nq, nk) = (g.nq(), g.lk.rows(g.rank));
            let shape = [g.b, g.hq, nq, g.dv];
            expect(g, "o", o.shape(), shape)?;
            expect(g, "d_o", d_o.shape(), shape)?;
            expect_len(g, "lse", lse.len(), g.b * g.hq * nq)?;
            expect_len(g, "dq", dq.len(), g.b * g.hq * nq * g.d)?;
            expect_len(g, "dk", dk.len(), g.b * g.hkv * nk * g.d)?;
            expect_len(g, "dv", dv.len(), g.b * g.hkv * nk * g.dv)
        };
        let g = self.setup(ring, q, k, v, 1, &outputs)?;
        let grads = Grads { o, lse, d_o };
        let (mut cur, mut next) = (pack(k, v)?, Vec::new());
        // The accumulator this rank sends (its last block's), the one it receives (for the
        // block in hand), and this step's share.
        let (mut acc, mut acc_in, mut part) = (Vec::new(), Vec::new(), Vec::new());
        for s in 0..=g.ranks {
            let mut sends: Vec<&[f32]> = Vec::new();
            let mut recvs: Vec<&mut [f32]> = Vec::new();
            if s + 1 < g.ranks {
                resize(&mut next, g.block_len(g.src(s + 1)))?;
                sends.push(&cur);
                recvs.push(&mut next);
            }
            if s >= 1 {
                resize(&mut acc_in, g.block_len(g.src(s)))?;
                sends.push(&acc);
                recvs.push(&mut acc_in);
            }
            if s < g.ranks {
                resize(&mut part, g.block_len(g.src(s)))?;
            }
            let mut work = || match s < g.ranks {
                true => self.backward_step(&g, q, &grads, &cur, g.src(s), s == 0, dq, &mut part),
                false => Ok(()),
            };
            ring.round(&sends, &mut recvs, &mut work)?;
            if s == g.ranks {
                // The own block's accumulator, home after a full turn.
                let kn = g.b * g.hkv * g.lk.rows(g.rank) * g.d;
                dk.copy_from_slice(&acc_in[..kn]);
                dv.copy_from_slice(&acc_in[kn..]);
            } else {
                if s >= 1 {
                    part.iter_mut().zip(&acc_in).for_each(|(p, a)| *p += a);
                }
                std::mem::swap(&mut acc, &mut part);
                std::mem::swap(&mut cur, &mut next);
            }
        }
        Ok(())
    }

    /// One step of the backward: this rank's queries against the block of `src`. dQ is written
    /// at the first step and added to after; `part` receives the block's dK and dV from these
    /// queries (K's then V's, zero for keys they do not see).
    #[allow(clippy::too_many_arguments)]
    fn backward_step(
        &self,
        g: &Geometry,
        q: View,
        grads: &Grads,
        block: &[f32],
        src: usize,
        first: bool,
        dq: &mut [f32],
        part: &mut [f32],
    ) -> Result<()> {
        part.fill(0.0);
        let st = self.step(g, src);
        if st.q.is_empty() || st.k.is_empty() {
            return Ok(());
        }
        let (nq, m) = (g.nq(), st.q.len());
        let (k, v) = block_views(g, block, src, st.k.clone())?;
        let (q, o, d_o) = (
            rows(q, st.q.clone())?,
            rows(grads.o, st.q.clone())?,
            rows(grads.d_o, st.q.clone())?,
        );
        let lse: Vec<f32> = (0..g.b * g.hq)
            .flat_map(|bh| &grads.lse[bh * nq + st.q.start..bh * nq + st.q.end])
            .copied()
            .collect(); // [B, Hq, m]
        let rows_src = g.lk.rows(src);
        let kn = g.b * g.hkv * rows_src * g.d;
        let (pk, pv) = part.split_at_mut(kn);
        // This step's keys inside the block's rows: [B, Hkv, |k|, D] of [B, Hkv, rows_src, D].
        let mut dk = ViewMut::new(
            &mut pk[st.k.start * g.d..],
            [g.b, g.hkv, st.k.len(), g.d],
            [g.hkv * rows_src * g.d, rows_src * g.d, g.d, 1],
        )?;
        let mut dv = ViewMut::new(
            &mut pv[st.k.start * g.dv..],
            [g.b, g.hkv, st.k.len(), g.dv],
            [g.hkv * rows_src * g.dv, rows_src * g.dv, g.dv, 1],
        )?;
        let opts = self.options(st.causal);
        if first {
            let mut dq = ViewMut::contiguous(dq, [g.b, g.hq, nq, g.d])?;
            attentive::backward(q, k, v, o, &lse, d_o, &opts, &mut dq, &mut dk, &mut dv)?;
            return Ok(());
        }
        let mut dq_t = zeros(g.b * g.hq * m * g.d)?; // [B, Hq, m, D]
        let mut dq_v = ViewMut::contiguous(&mut dq_t, [g.b, g.hq, m, g.d])?;
        attentive::backward(q, k, v, o, &lse, d_o, &opts, &mut dq_v, &mut dk, &mut dv)?;
        for bh in 0..g.b * g.hq {
            let at = (bh * nq + st.q.start) * g.d;
            let rows = &mut dq[at..at + m * g.d];
            rows.iter_mut()
                .zip(&dq_t[bh * m * g.d..(bh + 1) * m * g.d])
                .for_each(|(x, y)| *x += y);
        }
        Ok(())
    }
}

impl From<(Range<usize>, Range<usize>, bool)> for Step {
    fn from((q, k, causal): (Range<usize>, Range<usize>, bool)) -> Self {
        Self { q, k, causal }
    }
}

/// The forward's results the backward reads.
struct Grads<'a> {
    o: View<'a>,
    lse: &'a [f32],
    d_o: View<'a>,
}

fn expect(g: &Geometry, tensor: &'static str, got: [usize; 4], want: [usize; 4]) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(DistError::Shape {
        rank: g.rank,
        tensor,
        expected: want.to_vec(),
        got: got.to_vec(),
    })
}

fn expect_len(g: &Geometry, tensor: &'static str, got: usize, want: usize) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(DistError::Shape {
        rank: g.rank,
        tensor,
        expected: vec![want],
        got: vec![got],
    })
}

/// A zeroed buffer, refused before allocating where memory cannot hold it.
fn zeros(n: usize) -> Result<Vec<f32>> {
    attentive::check_memory("ring attention buffer", n, 4)?;
    Ok(vec![0.0; n])
}

fn resize(buf: &mut Vec<f32>, n: usize) -> Result<()> {
    attentive::check_memory("ring attention block", n, 4)?;
    buf.resize(n, 0.0);
    Ok(())
}

/// This rank's key/value block as it travels: K then V, row-major.
fn pack(k: View, v: View) -> Result<Vec<f32>> {
    let mut block = k.try_to_vec()?;
    let vs = v.try_to_vec()?;
    attentive::check_memory("ring attention block", block.len() + vs.len(), 4)?;
    block.extend_from_slice(&vs);
    Ok(block)
}

/// Views of key rows `keys` of the block of rank `src`.
fn block_views<'a>(
    g: &Geometry,
    block: &'a [f32],
    src: usize,
    keys: Range<usize>,
) -> Result<(View<'a>, View<'a>)> {
    let (rows, n) = (g.lk.rows(src), keys.len());
    let kn = g.b * g.hkv * rows * g.d;
    let (bk, bv) = block.split_at(kn);
    let k = View::new(
        &bk[keys.start * g.d..],
        [g.b, g.hkv, n, g.d],
        [g.hkv * rows * g.d, rows * g.d, g.d, 1],
    )?; // [B, Hkv, |keys|, D]
    let v = View::new(
        &bv[keys.start * g.dv..],
        [g.b, g.hkv, n, g.dv],
        [g.hkv * rows * g.dv, rows * g.dv, g.dv, 1],
    )?; // [B, Hkv, |keys|, Dv]
    Ok((k, v))
}

/// Rows `r` (non-empty) of a `[B, H, N, D]` view.
fn rows(x: View, r: Range<usize>) -> Result<View> {
    let [b, h, _, d] = x.shape();
    let s = x.strides();
    Ok(View::new(
        &x.data()[r.start * s[2]..],
        [b, h, r.len(), d],
        s,
    )?)
}
