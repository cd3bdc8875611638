//! The forward's entry points: the tiled pass over query tiles or, with few queries, the decode
//! pass over key chunks merged by [`merge`]; probabilities and visible-pair counts. The tile
//! machinery they drive is in [`kernel`](super::kernel).

use super::classes::{class_tiles, grow_class_buffers};
use super::kernel::*;
use super::pack::*;
use crate::error::{AttnError, Result};
use crate::exact::problem::Problem;
use crate::options::Options;
use crate::simd::CLASS_TILES;
use crate::tile::{BC, BR};
use crate::view::{RawOut, RawSlice, View, ViewMut};
use crate::workspace::Buffer;
use half::f16;
use rayon::prelude::*;
/// The row statistics a forward call writes besides the output.
#[derive(Clone, Copy)]
enum Stats {
    None,
    Lse(RawSlice),
    /// Each row's largest logit and its sum of exponentials relative to it, unrounded by a
    /// logarithm: what merging bands needs when logits are large (the log-sum-exp of a row
    /// whose logits are near 100 carries an absolute rounding of 100·ε).
    MaxSum(RawSlice, RawSlice),
}

/// [`forward`](crate::forward()) with K and V stored as f16: a KV cache at half the memory.
///
/// Each tile's K and V rows are widened to f32 (exactly: every f16 is an f32) as the kernels
/// read them, and everything after is the f32 computation, so the result is bit for bit that of
/// [`forward`](crate::forward()) on `k` and `v` widened to f32. (One exception: a lone dilated or strided pattern,
/// or a union of strided with windows and sinks, which [`forward`](crate::forward()) splits over residue classes,
/// runs here through the block table: the same attention, summed in another order.) Takes every
/// option [`forward`](crate::forward()) takes; shapes and strides as there.
///
/// ```
/// use attentive::{f16, forward, forward_half_kv, Options, View, ViewMut};
/// let (n, d) = (4, 2);
/// let q: Vec<f32> = (0..n * d).map(|x| (x as f32 * 0.3).cos()).collect();
/// let kv: Vec<f16> = q.iter().map(|&x| f16::from_f32(x)).collect();
/// let kv32: Vec<f32> = kv.iter().map(|x| x.to_f32()).collect();
/// let (mut a, mut b) = (vec![0.0; n * d], vec![0.0; n * d]);
/// let shape = [1, 1, n, d];
/// let qv = View::contiguous(&q, &shape).unwrap();
/// let h = View::contiguous(&kv, &shape).unwrap();
/// forward_half_kv(qv, h, h, &Options::new(), &mut ViewMut::contiguous(&mut a, shape).unwrap(), None)
///     .unwrap();
/// let f = View::contiguous(&kv32, &shape).unwrap();
/// forward(qv, f, f, &Options::new(), &mut ViewMut::contiguous(&mut b, shape).unwrap(), None)
///     .unwrap();
/// assert_eq!(a, b);
/// ```
pub fn forward_half_kv(
    q: View,
    k: View<f16>,
    v: View<f16>,
    opts: &Options,
    out: &mut ViewMut,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    run(&Problem::with_half_kv(q, k, v, opts)?, out, lse)
}

/// The forward of a validated problem: checks the outputs, then runs the tiled or decode path.
pub(crate) fn run(p: &Problem, out: &mut ViewMut, lse: Option<&mut [f32]>) -> Result<()> {
    let stats = checked_lse(p, out, lse)?;
    run_stats(p, out.raw(), stats);
    Ok(())
}

/// Checks the output view and log-sum-exp length of `p`'s forward.
fn checked_lse(p: &Problem, out: &ViewMut, lse: Option<&mut [f32]>) -> Result<Stats> {
    p.check_out("out", out, [p.b, p.hq, p.nq, p.dv])?;
    if let Some(l) = lse.as_deref() {
        crate::error::expect_len("lse", l.len(), p.b * p.hq * p.nq)?;
    }
    Ok(lse.map_or(Stats::None, |l| Stats::Lse(RawSlice::new(l))))
}

/// [`run`], writing each row's largest logit `m` and its sum of exponentials `l` (both
/// `B·Hq·Nq`) instead of the log-sum-exp $m + \ln l$. The decode path (few queries) merges its
/// key chunks by log-sum-exp, and gives `m` = that and `l` = 1.
pub(crate) fn run_max_sum(
    p: &Problem,
    out: &mut ViewMut,
    m: &mut [f32],
    l: &mut [f32],
) -> Result<()> {
    p.check_out("out", out, [p.b, p.hq, p.nq, p.dv])?;
    crate::error::expect_len("max", m.len(), p.b * p.hq * p.nq)?;
    crate::error::expect_len("sum", l.len(), p.b * p.hq * p.nq)?;
    let stats = Stats::MaxSum(RawSlice::new(m), RawSlice::new(l));
    run_stats(p, out.raw(), stats);
    Ok(())
}

/// [`run`] on the tiled path whatever the number of queries: the path that computes
/// [`Problem::class_keys`].
pub(crate) fn run_tiled(p: &Problem, out: &mut ViewMut, lse: Option<&mut [f32]>) -> Result<()> {
    let stats = checked_lse(p, out, lse)?;
    tiled(p, out.raw(), stats, None);
    Ok(())
}

fn run_stats(p: &Problem, out: RawOut, stats: Stats) {
    run_from(p, out, stats, None)
}

fn run_from(p: &Problem, out: RawOut, stats: Stats, prior: Option<Prior>) {
    if p.nq <= DECODE_MAX_Q {
        decode(p, out, stats, prior);
    } else {
        tiled(p, out, stats, prior);
    }
}

/// [`run`] continuing from `prior` (each of its arrays sized for `p`'s rows): the output and
/// log-sum-exp of attention over `p`'s keys together with the prior's.
pub(crate) fn run_after(
    p: &Problem,
    prior: Prior,
    out: &mut ViewMut,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    p.check_out("out", out, [p.b, p.hq, p.nq, p.dv])?;
    let rows = p.b * p.hq * p.nq;
    let stat_shape = [p.b, p.hq, p.nq, 1];
    crate::error::expect_shape("prior max", prior.m.shape(), stat_shape)?;
    crate::error::expect_shape("prior sum", prior.l.shape(), stat_shape)?;
    crate::error::expect_shape("prior output", prior.o.shape(), [p.b, p.hq, p.nq, p.dv])?;
    debug_assert_eq!(prior.o.strides()[3], 1, "prior rows are read as slices");
    if let Some(l) = lse.as_deref() {
        crate::error::expect_len("lse", l.len(), rows)?;
    }
    let stats = lse.map_or(Stats::None, |l| Stats::Lse(RawSlice::new(l)));
    run_from(p, out.raw(), stats, Some(prior));
    Ok(())
}

/// Task `task` of [`tiled`] as `(batch, head, query tile)`: batch-major, or head-major for
/// [`Problem::heads_outer`].
fn task_of(p: &Problem, qt: usize, task: usize) -> (usize, usize, usize) {
    let (outer, t) = (task / qt, task % qt);
    if p.heads_outer {
        (outer % p.b, outer / p.b, t)
    } else {
        (outer / p.hq, outer % p.hq, t)
    }
}

fn tiled(p: &Problem, out: RawOut, stats: Stats, prior: Option<Prior>) {
    let packed = (pack_up_front(p) && p.class_keys.is_none()).then(|| PackedK::new(p));
    let qt = p.nq.div_ceil(BR);
    let emit = |scr: &mut Scratch, (b, h): (usize, usize), i0: usize, rows: usize| {
        let bh = b * p.hq + h;
        for r in 0..rows {
            // SAFETY: the task of (b, h) and this query tile alone writes rows i0..i0+rows.
            unsafe { out.write_row(b, h, i0 + r, &scr.o[r * p.dv..(r + 1) * p.dv]) };
        }
        // SAFETY: as above, for the statistics of those rows.
        match stats {
            Stats::None => {}
            Stats::Lse(l) => {
                to_lse(scr, rows);
                unsafe { l.write(bh * p.nq + i0, &scr.m[..rows]) };
            }
            Stats::MaxSum(m, l) => unsafe {
                m.write(bh * p.nq + i0, &scr.m[..rows]);
                l.write(bh * p.nq + i0, &scr.l[..rows]);
            },
        }
    };
    if let Some(steps) = p.class_keys {
        // Tasks of up to CLASS_TILES query tiles one stride apart, whose class keys share their
        // loads: the tiles ρ, ρ + per, ρ + 2·per, … taken a few at a time.
        let per = steps.stride / BR;
        let sets: Vec<(usize, usize)> = (0..per.min(qt))
            .flat_map(|rho| {
                let n = (qt - rho).div_ceil(per);
                (0..n)
                    .step_by(CLASS_TILES)
                    .map(move |c| (rho + c * per, CLASS_TILES.min(n - c)))
            })
            .collect();
        // Class keys read Kᵀ tiles of every earlier stretch of keys, so every tile is packed,
        // in panels one vector wide (a step's keys for a vector of rows are then contiguous);
        // each key head by the first task that reads it, while it is about to be read, in one
        // parallel loop (a loop per head would make every thread wait for the slowest task of
        // each head, and wake again).
        let pk = PackedK::lazy(p, p.kern.lanes);
        (0..p.b * p.hq * sets.len()).into_par_iter().for_each_init(
            || Scratch::pooled(p),
            |scr, task| {
                let (bh, (t0, count)) = (task / sets.len(), sets[task % sets.len()]);
                let (b, h) = (bh / p.hq, bh % p.hq);
                pk.head(p, (b, h / p.group));
                let all: [usize; CLASS_TILES] = std::array::from_fn(|u| t0 + u * per);
                let tiles = &all[..count];
                // Each tile's band, its state set aside in the class slots (by swapping buffers),
                // then the class keys of all of them, which join that state, then the output.
                let swap = |scr: &mut Scratch, u: usize| {
                    std::mem::swap(&mut scr.m, &mut scr.cls_m[u]);
                    std::mem::swap(&mut scr.l, &mut scr.cls_l[u]);
                    std::mem::swap(&mut scr.o, &mut scr.cls_o[u]);
                };
                grow_class_buffers(p, steps, scr);
                for (u, &t) in tiles.iter().enumerate() {
                    let (i0, rows) = (t * BR, BR.min(p.nq - t * BR));
                    attend_rows(p, Some(&pk), (b, h), i0, rows, (0, p.nk), None, scr);
                    swap(scr, u);
                }
                class_tiles(p, &pk, (b, h), tiles, steps, scr);
                for (u, &t) in tiles.iter().enumerate() {
                    swap(scr, u);
                    emit(scr, (b, h), t * BR, BR.min(p.nq - t * BR));
                }
            },
        );
        return;
    }
    (0..p.b * p.hq * qt).into_par_iter().for_each_init(
        || Scratch::pooled(p),
        |scr, task| {
            let (b, h, t) = task_of(p, qt, task);
            let i0 = t * BR;
            let rows = BR.min(p.nq - i0);
            attend_rows(p, packed.as_ref(), (b, h), i0, rows, (0, p.nk), prior, scr);
            emit(scr, (b, h), i0, rows);
        },
    );
}

fn decode(p: &Problem, out: RawOut, stats: Stats, prior: Option<Prior>) {
    let chunks = p.nk.div_ceil(DECODE_CHUNK);
    let (nq, dv) = (p.nq, p.dv);
    // Every element is written by its chunk's task before the merge reads it.
    let mut parts_o = Buffer::uninit(p.b * p.hq * chunks * nq * dv);
    let mut parts_l = Buffer::uninit(p.b * p.hq * chunks * nq);
    parts_o
        .par_chunks_mut(nq * dv)
        .zip(parts_l.par_chunks_mut(nq))
        .enumerate()
        .for_each_init(
            || Scratch::pooled(p),
            |scr, (task, (po, pl))| {
                let (bh, c) = (task / chunks, task % chunks);
                let (b, h) = (bh / p.hq, bh % p.hq);
                let keys = (c * DECODE_CHUNK, ((c + 1) * DECODE_CHUNK).min(p.nk));
                attend_rows(p, None, (b, h), 0, nq, keys, None, scr);
                to_lse(scr, nq);
                po.copy_from_slice(&scr.o[..nq * dv]);
                pl.copy_from_slice(&scr.m[..nq]);
            },
        );
    parts_o
        .par_chunks_mut(chunks * nq * dv)
        .zip(parts_l.par_chunks_mut(chunks * nq))
        .enumerate()
        .for_each(|(bh, (po, pl))| {
            let (b, h) = (bh / p.hq, bh % p.hq);
            let (acc_o, rest_o) = po.split_at_mut(nq * dv);
            let (acc_l, rest_l) = pl.split_at_mut(nq);
            for (o, l) in rest_o.chunks(nq * dv).zip(rest_l.chunks(nq)) {
                merge(acc_o, acc_l, o, l).expect("partials share one shape");
            }
            if let Some(pr) = prior {
                let mut o = vec![0.0f32; nq * dv];
                let lse: Vec<f32> = (0..nq)
                    .map(|r| match pr.row(b, h, r) {
                        Some((m, l, src)) => {
                            o[r * dv..(r + 1) * dv].copy_from_slice(src);
                            m + l.ln()
                        }
                        None => f32::NEG_INFINITY,
                    })
                    .collect();
                merge(acc_o, acc_l, &o, &lse).expect("the prior has the rows' shape");
            }
            for r in 0..nq {
                // SAFETY: this (b, h) is merged and written by this iteration alone.
                unsafe { out.write_row(b, h, r, &acc_o[r * dv..(r + 1) * dv]) };
            }
            // SAFETY: as above.
            match stats {
                Stats::None => {}
                Stats::Lse(l) => unsafe { l.write(bh * nq, acc_l) },
                Stats::MaxSum(m, l) => {
                    let ones: Vec<f32> = acc_l
                        .iter()
                        .map(|&x| if x == f32::NEG_INFINITY { 0.0 } else { 1.0 })
                        .collect();
                    unsafe {
                        m.write(bh * nq, acc_l);
                        l.write(bh * nq, &ones);
                    }
                }
            }
        });
}

/// Merges attention computed over another, disjoint set of keys into an accumulator.
///
/// `acc_o`/`acc_lse` and `o`/`lse` each hold rows of normalised output (`rows × Dv`) and their
/// log-sum-exp (`rows`). Attention over the union of both key sets is
/// $$L = \log(e^{L_a} + e^{L_b}),\qquad O = e^{L_a - L}\\,O_a + e^{L_b - L}\\,O_b,$$
/// written into the accumulator. A part with $L = -\infty$ (no visible key) contributes nothing.
/// This is how the decode path combines its key chunks, and what sequence-parallel and ring
/// attention need to combine shards.
///
/// ```
/// # use attentive::merge;
/// // Two halves of the keys, each seen with equal total weight: the result is their average.
/// let (mut o, mut l) = (vec![1.0, 2.0], vec![0.5f32]);
/// merge(&mut o, &mut l, &[3.0, 4.0], &[0.5]).unwrap();
/// assert_eq!(o, vec![2.0, 3.0]);
/// assert!((l[0] - (0.5 + 2f32.ln())).abs() < 1e-6);
/// ```
pub fn merge(acc_o: &mut [f32], acc_lse: &mut [f32], o: &[f32], lse: &[f32]) -> Result<()> {
    let rows = acc_lse.len();
    if lse.len() != rows {
        return Err(AttnError::LengthMismatch {
            tensor: "lse",
            expected: rows,
            got: lse.len(),
        });
    }
    if rows == 0 && acc_o.is_empty() && o.is_empty() {
        return Ok(());
    }
    if rows == 0 || !acc_o.len().is_multiple_of(rows) || o.len() != acc_o.len() {
        return Err(AttnError::LengthMismatch {
            tensor: "o",
            expected: acc_o.len(),
            got: o.len(),
        });
    }
    let dv = acc_o.len() / rows;
    for r in 0..rows {
        let (la, lb) = (acc_lse[r], lse[r]);
        if lb == f32::NEG_INFINITY {
            continue;
        }
        let row = &mut acc_o[r * dv..(r + 1) * dv];
        let orow = &o[r * dv..(r + 1) * dv];
        if la == f32::NEG_INFINITY {
            row.copy_from_slice(orow);
            acc_lse[r] = lb;
            continue;
        }
        let mx = la.max(lb);
        let (wa, wb) = ((la - mx).exp(), (lb - mx).exp());
        let total = wa + wb;
        let (wa, wb) = (wa / total, wb / total);
        for (x, &y) in row.iter_mut().zip(orow) {
            *x = wa * *x + wb * y;
        }
        acc_lse[r] = mx + total.ln();
    }
    Ok(())
}

/// Combines parts of one row computed over disjoint key sets, each given by the largest logit
/// `m` and the sum `l` of exponentials relative to it ([`run_max_sum`]): writes each part's
/// share of the row's weight, $l_p e^{m_p - m} / \sum_{p'} l_{p'} e^{m_{p'} - m}$, into
/// `shares` and returns the row's log-sum-exp. No rounded LSE enters, unlike [`merge`]. A row no
/// part sees gets shares 0 and −∞.
pub(crate) fn shares(stats: &[(f32, f32)], shares: &mut [f32]) -> f32 {
    let m = stats.iter().fold(f32::NEG_INFINITY, |a, s| a.max(s.0));
    for (x, &(mp, lp)) in shares.iter_mut().zip(stats) {
        // NaN (a non-finite input) is kept: it must reach the row.
        *x = if lp > 0.0 || lp.is_nan() {
            lp * (mp - m).exp()
        } else {
            0.0
        };
    }
    let sum: f32 = shares[..stats.len()].iter().sum();
    if sum == 0.0 {
        return f32::NEG_INFINITY;
    }
    shares.iter_mut().for_each(|x| *x /= sum);
    m + sum.ln()
}

/// How many (batch, head, query, key) pairs the masks of `opts` leave visible: the pairs the
/// kernels compute, and what a FLOP count of masked attention should count (4·D FLOPs per pair
/// forward, 10·D more backward). Takes the shapes of `q` (`[B, Hq, Nq, D]`) and `k`
/// (`[B, Hkv, Nk, D]`), not their values.
///
/// ```
/// # use attentive::{visible_pairs, Causal, Options, View};
/// let x = vec![0.0f32; 10 * 4];
/// let q = View::contiguous(&x, &[1, 1, 10, 4]).unwrap();
/// assert_eq!(visible_pairs(q, q, &Options::new().causal(Causal::TopLeft)).unwrap(), 55);
/// ```
pub fn visible_pairs(q: View, k: View, opts: &Options) -> Result<u64> {
    Ok(Problem::new(q, k, k, opts)?.visible_pairs())
}

/// The attention weights $P$ (`[B, Hq, Nq, Nk]`, row-major) after every score rule and mask and
/// before dropout. They take O(N²) memory: ask for them only to look at them.
pub fn probabilities(q: View, k: View, opts: &Options) -> Result<Vec<f32>> {
    let [b, hkv, nk, _] = k.shape();
    let [_, hq, nq, _] = q.shape();
    // The weights' memory, before any of it (or of the ones below) is allocated.
    let count = |dims: &[usize]| dims.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
    crate::check_memory(
        "probabilities",
        count(&[b, hq, nq, nk]).unwrap_or(usize::MAX),
        4,
    )?;
    crate::check_memory(
        "probabilities",
        count(&[b, hkv, nk]).unwrap_or(usize::MAX),
        4,
    )?;
    // Value dimension 1: the forward pass then costs little more than the log-sum-exp we need.
    let ones = vec![1.0f32; b * hkv * nk];
    let v = View::contiguous(&ones, &[b, hkv, nk, 1])?;
    // One problem (and one block-mask table) serves the forward and the weights below.
    let p = Problem::new(q, k, v, opts)?;
    let mut lse = vec![0.0f32; p.b * p.hq * p.nq];
    let mut o = vec![0.0f32; p.b * p.hq * p.nq];
    run(
        &p,
        &mut ViewMut::contiguous(&mut o, [p.b, p.hq, p.nq, 1])?,
        Some(&mut lse),
    )?;
    // The scores as the forward computed them (see split_scores).
    let split = split_scores(&p).then(|| PackedK::new(&p));
    let mut probs = vec![0.0f32; p.b * p.hq * p.nq * p.nk];
    // Tasks (b·h, query tile): each owns the rows of its tile within its head's Nq·Nk block.
    let tasks = probs
        .par_chunks_mut(p.nq * p.nk)
        .enumerate()
        .flat_map_iter(|(bh, head)| {
            head.chunks_mut(BR * p.nk)
                .enumerate()
                .map(move |(t, dst)| (bh, t, dst))
        });
    tasks.for_each_init(
        || Scratch::pooled(&p),
        |scr, (bh, t, dst)| {
            let (b, h) = (bh / p.hq, bh % p.hq);
            let i0 = t * BR;
            let rows = BR.min(p.nq - i0);
            let q = rows_ptr(&p.q, (b, h), i0, rows, &mut scr.q);
            if let (Some(_), Some(a)) = (&split, scr.amx.as_mut()) {
                a.split_q(&p, q, rows);
            }
            for j0 in (0..p.nk).step_by(BC) {
                let w = BC.min(p.nk - j0);
                let Some(blk) = p.block((b, h), t, j0 / BC) else {
                    continue;
                };
                let keys = split
                    .as_ref()
                    .and_then(|pk| pk.split_k(b, h / p.group, p.hkv, j0))
                    .map_or(Keys::unpacked(&p), Keys::Split);
                let bufs = scr.tile_bufs(q, 0, 0);
                if score_tile(&p, keys, (b, h), i0, rows, j0, (0, p.nk), blk, bufs).is_none() {
                    continue;
                }
                for r in 0..rows {
                    let span = scr.spans[r];
                    let l = lse[bh * p.nq + i0 + r];
                    if span.is_empty() || l == f32::NEG_INFINITY {
                        continue;
                    }
                    let srow = &mut scr.s[r * SW..r * SW + w];
                    p.logits((b, h, i0 + r), j0, srow, span, None);
                    let out = &mut dst[r * p.nk + j0..r * p.nk + j0 + w];
                    for (x, &s) in out.iter_mut().zip(srow.iter()) {
                        *x = (s - l).exp();
                    }
                }
            }
        },
    );
    Ok(probs)
}
