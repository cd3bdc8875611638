//! The fused backward kernel (FlashAttention-2's algorithm), deterministic.
//!
//! From the forward's log-sum-exp the weights are recomputed tile by tile, never stored:
//!
//! ```text
//! D_i  = Σ_c dO[i,c]·O[i,c]                 // (B, Hq, Nq)      once, before the tiles
//! per key tile (BC keys), per query tile (BR queries) that sees it:
//!   S    = Q·Kᵀ                              // (BR, BC)         forward: S = Q·Kᵀ
//!   P    = exp(logits(S) − LSE)              // (BR, BC)         forward: P = softmax(X)
//!   dV  += (P∘Z)ᵀ·dO                         // (BC, Dv)         forward: O = (P∘Z)·V
//!   dP   = (dO·Vᵀ)∘Z                         // (BR, BC)
//!   dS   = P∘(dP − D)·∂X/∂S                  // (BR, BC)         softmax, softcap, score rule
//!   dK  += dSᵀ·Q                             // (BC, D)          forward: S = scale·Q·Kᵀ
//!   dQ  += dS·K                              // (BR, D)
//! ```
//! where Z is the dropout factor (0 or 1/(1−p)) regenerated from the seed, and `scale` is folded
//! into dS.
//!
//! Parallelism is over (batch, key/value head, split of the key tiles): each task owns the dK and
//! dV rows of its key tiles and sums the gradients of every query head of its group, so no two
//! threads write the same element. dQ is accumulated per split in a buffer of its own and the
//! splits are added in a fixed order, so the result has the same bits whatever the thread count.

use crate::amx;
use crate::error::Result;
use crate::exact::kernel::{score_tile, AmxScratch, Keys, TileBufs, GROUP};
use crate::exact::pack::{gather_rows, huge_copy, k_part, pack_transposed, rows_ptr, split_scores};
use crate::exact::problem::{Problem, Span};
use crate::options::Options;
use crate::simd::Gemm;
use crate::tile::{BC, BR};
use crate::view::{RawOut, RawSlice, View, ViewMut};
use crate::workspace::{AVec, Buffer, Pool};
use rayon::prelude::*;

/// Fewest tasks the backward aims for: enough to balance two to eight threads. When
/// `B·Hkv` is smaller, the key tiles of each head are split to reach it.
const MIN_TASKS: usize = 8;
/// Most splits of one head's key tiles: each split needs its own dQ buffer (the size of dQ),
/// so this bounds the extra memory at 4× dQ.
const MAX_SPLITS: usize = 4;
/// The join factors of dK's and dV's GEMMs (`Gemm::join`), one per row of a key tile: each
/// query tile's product is summed from zero and then added, once per element.
static ONES: [f32; BR] = [1.0; BR];
const _: () = assert!(
    BC <= BR,
    "ONES has a factor for every row of a key tile too"
);

struct Scratch {
    kt: AVec,
    vt: AVec,
    k: AVec,
    q: AVec,
    d_o: AVec,
    s: AVec,
    pd: AVec,
    dp: AVec,
    chain: AVec,
    z: AVec,
    dk: AVec,
    dv: AVec,
    /// One query tile's share of dQ (`BR × D`) before it is added, or one row of P∘dP for
    /// `weight_grads`.
    part: AVec,
    spans: Vec<Span>,
    hulls: Vec<(usize, usize)>,
    /// Where the forward's scores came from the AMX products ([`split_scores`]): the query
    /// rows' bf16 parts, and the key tile's (`3 × k_part`).
    amx: Option<(AmxScratch, AVec)>,
}

/// Scratch kept between tasks and calls, by (D, Dv, AMX scores).
static POOL: Pool<Scratch, (usize, usize, bool)> = Pool::new();

impl Scratch {
    fn new(p: &Problem) -> Self {
        Self {
            kt: AVec::filled(p.d * BC, 0.0),
            vt: AVec::filled(p.dv * BC, 0.0),
            k: AVec::filled(BC * p.d, 0.0),
            q: AVec::filled(BR * p.d, 0.0),
            d_o: AVec::filled(BR * p.dv, 0.0),
            s: AVec::filled(BR * BC, 0.0),
            pd: AVec::filled(BR * BC, 0.0),
            dp: AVec::filled(BR * BC, 0.0),
            chain: AVec::filled(BR * BC, 1.0),
            z: AVec::filled(BR * BC, 1.0),
            dk: AVec::filled(BC * p.d, 0.0),
            dv: AVec::filled(BC * p.dv, 0.0),
            part: AVec::filled(BR * p.d.max(1), 0.0),
            spans: vec![Span::EMPTY; BR],
            hulls: vec![(0, 0); BR.div_ceil(GROUP)],
            amx: split_scores(p)
                .then(|| (AmxScratch::new(p), AVec::filled(3 * k_part(p.d) / 2, 0.0))),
        }
    }
}

/// Gradients of attention: given the forward's inputs, its output `o` and log-sum-exp `lse`
/// (`B·Hq·Nq`), and the gradient `d_o` of the loss with respect to `o`, writes dQ, dK and dV.
///
/// The options must be the ones the forward ran with (same masks, rules and dropout seed).
/// Rows that saw no key get zero gradients. For grouped-query attention dK and dV sum over the
/// query heads of each group. Extra memory: `D` (B·Hq·Nq floats), copies of Q and dO on 2 MiB
/// pages when each is 2 MiB or more, and, when `B·Hkv < 8`, up to four dQ-sized buffers.
///
/// Accuracy: the weights are recomputed as $P_{ij} = e^{s_{ij} - \mathrm{LSE}\_i}$ from the f32
/// LSE, so each row carries its rounding, a factor up to $e^{|\mathrm{LSE}|\\,\varepsilon}$ —
/// negligible at the scores of trained models, and no accuracy left once $|\mathrm{LSE}|$
/// nears $2^{23}$ (scores of that size), as for any backward from an f32 LSE. dQ and dK are
/// formed from $dP_{ij} - D_i$, which cancel: their error is the rounding of those terms, not
/// of the result.
///
/// ```
/// use attentive::{backward, forward, Options, View, ViewMut};
/// let shape = [1, 1, 3, 2];
/// let q = [0.1f32, 0.2, 0.3, -0.1, 0.5, 0.0];
/// let qv = View::contiguous(&q, &shape).unwrap();
/// let (mut o, mut lse) = (vec![0.0; 6], vec![0.0; 3]);
/// let opts = Options::new();
/// forward(qv, qv, qv, &opts, &mut ViewMut::contiguous(&mut o, shape).unwrap(), Some(&mut lse)).unwrap();
/// let d_o = [1.0f32; 6];
/// let (mut dq, mut dk, mut dv) = (vec![0.0; 6], vec![0.0; 6], vec![0.0; 6]);
/// backward(qv, qv, qv, View::contiguous(&o, &shape).unwrap(), &lse,
///     View::contiguous(&d_o, &shape).unwrap(), &opts,
///     &mut ViewMut::contiguous(&mut dq, shape).unwrap(),
///     &mut ViewMut::contiguous(&mut dk, shape).unwrap(),
///     &mut ViewMut::contiguous(&mut dv, shape).unwrap()).unwrap();
/// // Each value row receives the total weight put on it; the weights of each query sum to 1.
/// assert!((dv.iter().sum::<f32>() - 6.0).abs() < 1e-5);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: View,
    k: View,
    v: View,
    o: View,
    lse: &[f32],
    d_o: View,
    opts: &Options,
    dq: &mut ViewMut,
    dk: &mut ViewMut,
    dv: &mut ViewMut,
) -> Result<()> {
    backward_rule_params(q, k, v, o, lse, d_o, opts, dq, dk, dv, &mut [])
}

/// [`backward`], and also the gradient-weighted weights $P_{ij}\\,\partial L/\partial P_{ij}$ of
/// every pair, written into `weight_grads` (`[B, Hq, Nq, Nk]`, row-major; 0 where a key is not
/// visible). $P$ is the softmax output before dropout and $\partial L/\partial P_{ij} =
/// Z_{ij}\\, dO_i\cdot v_j$, so this is the $\nabla A\odot A$ of gradient-weighted relevance
/// (Chefer et al., 2021): the kernel forms both factors tile by tile anyway, and this costs one
/// store per visible pair.
///
/// ```
/// use attentive::{backward_weighted, forward, Options, View, ViewMut};
/// let shape = [1, 1, 2, 2];
/// let q = [1.0f32, 0.0, 0.0, 1.0];
/// let v = [1.0f32, 0.0, 0.0, 0.0];
/// let qv = View::contiguous(&q, &shape).unwrap();
/// let vv = View::contiguous(&v, &shape).unwrap();
/// let (mut o, mut lse) = (vec![0.0; 4], vec![0.0; 2]);
/// let opts = Options::new();
/// forward(qv, qv, vv, &opts, &mut ViewMut::contiguous(&mut o, shape).unwrap(), Some(&mut lse)).unwrap();
/// // L = Σ O[:, 0]: ∂L/∂P_ij = v_j[0], so only key 0 gets a share, P_i0 itself.
/// let d_o = [1.0f32, 0.0, 1.0, 0.0];
/// let (mut dq, mut dk, mut dv, mut pdp) = (vec![0.0; 4], vec![0.0; 4], vec![0.0; 4], vec![0.0; 4]);
/// backward_weighted(qv, qv, vv, View::contiguous(&o, &shape).unwrap(), &lse,
///     View::contiguous(&d_o, &shape).unwrap(), &opts,
///     &mut ViewMut::contiguous(&mut dq, shape).unwrap(),
///     &mut ViewMut::contiguous(&mut dk, shape).unwrap(),
///     &mut ViewMut::contiguous(&mut dv, shape).unwrap(), &mut pdp).unwrap();
/// assert_eq!((pdp[1], pdp[3]), (0.0, 0.0));
/// assert!((pdp[0] - o[0]).abs() < 1e-6 && (pdp[2] - o[2]).abs() < 1e-6);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn backward_weighted(
    q: View,
    k: View,
    v: View,
    o: View,
    lse: &[f32],
    d_o: View,
    opts: &Options,
    dq: &mut ViewMut,
    dk: &mut ViewMut,
    dv: &mut ViewMut,
    weight_grads: &mut [f32],
) -> Result<()> {
    let p = Problem::new(q, k, v, opts)?;
    crate::error::expect_shape("o", o.shape(), [p.b, p.hq, p.nq, p.dv])?;
    crate::error::expect_shape("d_o", d_o.shape(), [p.b, p.hq, p.nq, p.dv])?;
    crate::error::expect_len("weight_grads", weight_grads.len(), p.b * p.hq * p.nq * p.nk)?;
    weight_grads.fill(0.0);
    let delta = deltas(&p, o, d_o);
    let sink = RawSlice::new(weight_grads);
    run_with(&p, lse, &delta, d_o, (dq, dk, dv), &mut [], Some(sink))
}

/// [`backward`], and also the gradient of the score rule's learnable parameters (a T5 bias
/// table, say), written into `d_params` ([`ScoreRule::params`](crate::ScoreRule::params) long):
/// $\partial L/\partial\theta = \sum_{b,h,i,j} \partial L/\partial x_{bhij}\\;
/// \partial x_{bhij}/\partial\theta$, summed in a fixed order (deterministic).
/// An empty `d_params` skips it.
#[allow(clippy::too_many_arguments)]
pub fn backward_rule_params(
    q: View,
    k: View,
    v: View,
    o: View,
    lse: &[f32],
    d_o: View,
    opts: &Options,
    dq: &mut ViewMut,
    dk: &mut ViewMut,
    dv: &mut ViewMut,
    d_params: &mut [f32],
) -> Result<()> {
    let p = Problem::new(q, k, v, opts)?;
    crate::error::expect_shape("o", o.shape(), [p.b, p.hq, p.nq, p.dv])?;
    crate::error::expect_shape("d_o", d_o.shape(), [p.b, p.hq, p.nq, p.dv])?;
    let delta = deltas(&p, o, d_o);
    run(&p, lse, &delta, d_o, dq, dk, dv, d_params)
}

/// $D_i = \sum_c dO_{ic} O_{ic}$ of every row                          // (B, Hq, Nq)
fn deltas(p: &Problem, o: View, d_o: View) -> Vec<f32> {
    let (hq, nq, dvd) = (p.hq, p.nq, p.dv);
    let mut delta = vec![0.0f32; p.b * hq * nq];
    let kern = p.kern;
    delta.par_chunks_mut(nq).enumerate().for_each_init(
        || (vec![0.0f32; dvd], vec![0.0f32; dvd]),
        |(ro, rd), (bh, dst)| {
            let (bi, h) = (bh / hq, bh % hq);
            for (i, x) in dst.iter_mut().enumerate() {
                gather_rows(&o, (bi, h), i, 1, ro);
                gather_rows(&d_o, (bi, h), i, 1, rd);
                // One fused multiply-add chain in column order: the arithmetic the dP GEMM
                // does per element, so a row whose output equals one value row (a single
                // visible key) gets dP − D = 0 exactly, as the math says.
                // SAFETY: rd and ro hold dvd elements each.
                *x = unsafe { (kern.fma_chain)(rd.as_ptr(), ro.as_ptr(), dvd) };
            }
        },
    );
    delta
}

/// The backward of a validated problem, given each row's $D_i$: checks the gradients' shapes,
/// then runs the kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    p: &Problem,
    lse: &[f32],
    delta: &[f32],
    d_o: View,
    dq: &mut ViewMut,
    dk: &mut ViewMut,
    dv: &mut ViewMut,
    d_params: &mut [f32],
) -> Result<()> {
    run_with(p, lse, delta, d_o, (dq, dk, dv), d_params, None)
}

/// [`run`], also writing $P\circ dP$ of every visible pair into `weight_grads` when given
/// (`[B, Hq, Nq, Nk]`, zeroed by the caller).
fn run_with(
    p: &Problem,
    lse: &[f32],
    delta: &[f32],
    d_o: View,
    (dq, dk, dv): (&mut ViewMut, &mut ViewMut, &mut ViewMut),
    d_params: &mut [f32],
    weight_grads: Option<RawSlice>,
) -> Result<()> {
    let n_params = if d_params.is_empty() {
        0
    } else {
        let n = p.score_rule().map_or(0, |r| r.params());
        crate::error::expect_len("d_params", d_params.len(), n)?;
        n
    };
    let (b, hq, hkv, nq, nk, d, dvd) = (p.b, p.hq, p.hkv, p.nq, p.nk, p.d, p.dv);
    crate::error::expect_shape("d_o", d_o.shape(), [b, hq, nq, dvd])?;
    crate::error::expect_len("lse", lse.len(), b * hq * nq)?;
    crate::error::expect_len("delta", delta.len(), b * hq * nq)?;
    p.check_out("dq", dq, [b, hq, nq, d])?;
    p.check_out("dk", dk, [b, hkv, nk, d])?;
    p.check_out("dv", dv, [b, hkv, nk, dvd])?;

    // Q and dO, read once per key tile, from 2 MiB pages (copies when they are large).
    let (q_copy, do_copy) = (huge_copy(&p.q), huge_copy(&d_o));
    let q_rows = q_copy.as_ref().map_or(p.q, |c| c.view());
    let d_o = do_copy.as_ref().map_or(d_o, |c| c.view());
    let tiles = nk.div_ceil(BC);
    let splits = MIN_TASKS.div_ceil(b * hkv).clamp(1, MAX_SPLITS).min(tiles);
    let group_len = p.group * nq * d;
    let mut dq_parts = Buffer::zeroed(splits * b * hq * nq * d);
    let parts = RawSlice::new(&mut dq_parts);
    let (dk_out, dv_out) = (dk.raw(), dv.raw());
    // One parameter-gradient buffer per task, added in task order below.
    let mut param_parts = vec![0.0f32; b * hkv * splits * n_params];
    let pparts = RawSlice::new(&mut param_parts);
    (0..b * hkv * splits).into_par_iter().for_each_init(
        || POOL.take((p.d, p.dv, split_scores(p)), || Scratch::new(p)),
        |scr, task| {
            // SAFETY: task `task` alone owns its slice of the parameter buffers.
            let d_rule = unsafe { pparts.slice_mut(task * n_params, n_params) };
            let (bk, split) = (task / splits, task % splits);
            let start = (split * b * hkv + bk) * group_len;
            // SAFETY: task (bk, split) alone owns the dQ rows of its query-head group in its split.
            let dq_acc = unsafe { parts.slice_mut(start, group_len) };
            for t in (split..tiles).step_by(splits) {
                key_tile(
                    p,
                    (bk / hkv, bk % hkv),
                    t * BC,
                    (&q_rows, &d_o, lse, delta),
                    dq_acc,
                    d_rule,
                    scr,
                    (dk_out, dv_out),
                    weight_grads.as_ref(),
                );
            }
        },
    );

    if n_params > 0 {
        for part in param_parts.chunks(n_params) {
            d_params.iter_mut().zip(part).for_each(|(x, y)| *x += y);
        }
    }
    // dQ = Σ_split dQ_split, in split order.                         // (B, Hq, Nq, D)
    let dq_out = dq.raw();
    let part_len = b * hq * nq * d;
    (0..b * hq).into_par_iter().for_each_init(
        || vec![0.0f32; d],
        |row, bh| {
            let (bi, h) = (bh / hq, bh % hq);
            for i in 0..nq {
                let at = (bh * nq + i) * d;
                row.copy_from_slice(&dq_parts[at..at + d]);
                for s in 1..splits {
                    let part = &dq_parts[s * part_len + at..s * part_len + at + d];
                    row.iter_mut().zip(part).for_each(|(x, y)| *x += y);
                }
                // SAFETY: row (bi, h, i) is written by this iteration alone.
                unsafe { dq_out.write_row(bi, h, i, row) };
            }
        },
    );
    Ok(())
}

/// Gradient contributions of one key tile `[j0, j0 + BC)` of key/value head `kvh` (queries read
/// from `q`, the problem's Q or its copy): writes its dK
/// and dV rows and adds to `dq_acc` (`group × Nq × D`, the query heads of this group) and to
/// `d_rule`, the score rule's parameter gradient (empty when not asked for).
#[allow(clippy::too_many_arguments)]
fn key_tile(
    p: &Problem,
    (b, kvh): (usize, usize),
    j0: usize,
    (q, d_o, lse, delta): (&View, &View, &[f32], &[f32]),
    dq_acc: &mut [f32],
    d_rule: &mut [f32],
    scr: &mut Scratch,
    (dk_out, dv_out): (RawOut, RawOut),
    weight_grads: Option<&RawSlice>,
) {
    let (d, dv, nq, kern) = (p.d, p.dv, p.nq, p.kern);
    let w = BC.min(p.nk - j0);
    pack_transposed(&p.v, (b, kvh), (j0, w), BC, &mut scr.vt, kern);
    gather_rows(&p.k, (b, kvh), j0, w, &mut scr.k);
    scr.dk[..w * d].fill(0.0);
    scr.dv[..w * dv].fill(0.0);
    let (ilo, ihi) = p.rows_seeing(j0, j0 + w);
    // Scores from K's rows (few queries, as the forward did) or from a packed Kᵀ tile.
    let keys_at = match (Keys::unpacked(p), scr.amx.as_mut()) {
        (Keys::Rows, _) => Keys::Rows,
        (_, Some((_, kparts))) => {
            let at = kparts.as_mut_ptr().cast::<u16>();
            // SAFETY: scr.k holds w ≤ BC gathered rows of D floats; kparts three parts of BC / 16
            // column tiles; AMX is available (Problem::amx).
            unsafe {
                amx::pack_transposed(scr.k.as_ptr(), (w, d, d), BC / amx::TILE, k_part(d), at)
            };
            Keys::Split(at)
        }
        _ => {
            pack_transposed(&p.k, (b, kvh), (j0, w), BC, &mut scr.kt, kern);
            Keys::Packed(scr.kt.as_ptr(), BC)
        }
    };
    let mods = p.has_mods();
    let chain = p.has_chain();
    for hl in 0..p.group {
        let h = kvh * p.group + hl;
        let bh = b * p.hq + h;
        for (qt, blk) in p.query_tiles((b, h), j0 / BC, (ilo, ihi)) {
            // The rows of query tile qt inside the band that sees this key tile.
            let i0 = (qt * BR).max(ilo);
            let rows = ((qt + 1) * BR).min(ihi).saturating_sub(i0);
            if rows == 0 {
                continue;
            }
            // Q and dO rows where they lie when their rows are contiguous, else gathered.
            let (qp, ldq) = rows_ptr(q, (b, h), i0, rows, &mut scr.q);
            let q_parts = scr.amx.as_mut().map(|(a, _)| {
                a.split_q(p, (qp, ldq), rows);
                (a.q_parts(), a.d_pad)
            });
            let bufs = TileBufs {
                q: qp,
                q_rs: ldq,
                s: &mut scr.s,
                lds: BC,
                spans: &mut scr.spans,
                hulls: &mut scr.hulls,
                // K's rows of this tile, already gathered: what `Keys::Rows` reads.
                kbuf: &mut scr.k,
                // Never grown: the backward packs its Kᵀ tile itself, never `Keys::Pack`.
                wide: &mut Vec::new(),
                q_parts,
            };
            // S = Q·Kᵀ                                              // (rows, w)
            if score_tile(p, keys_at, (b, h), i0, rows, j0, (0, p.nk), blk, bufs).is_none() {
                continue;
            }
            let (dop, ldo) = rows_ptr(d_o, (b, h), i0, rows, &mut scr.d_o);
            // P = exp(X − LSE); PD = P∘Z                             // (rows, w)
            for r in 0..rows {
                let i = i0 + r;
                let span = scr.spans[r];
                let l = lse[bh * nq + i];
                let srow = &mut scr.s[r * BC..r * BC + w];
                if span.is_empty() || l == f32::NEG_INFINITY {
                    scr.spans[r] = Span::EMPTY;
                    srow.fill(0.0);
                    scr.pd[r * BC..r * BC + w].fill(0.0);
                    continue;
                }
                let (a, e) = (span.a, span.b);
                let scale = if mods || !span.exact {
                    let g = chain.then(|| &mut scr.chain[r * BC..r * BC + w]);
                    p.logits((b, h, i), j0, srow, span, g);
                    1.0
                } else {
                    p.scale
                };
                srow[..a].fill(0.0);
                srow[e..].fill(0.0);
                // SAFETY: a..e lies inside srow.
                unsafe { (kern.exp_sum)(srow[a..].as_mut_ptr(), e - a, scale, l) };
                if p.dropout.is_some() {
                    let pd = &mut scr.pd[r * BC..r * BC + w];
                    pd.copy_from_slice(srow);
                    let z = &mut scr.z[r * BC..r * BC + w];
                    z.fill(1.0);
                    p.apply_dropout((b, h, i), j0, z);
                    pd.iter_mut().zip(z.iter()).for_each(|(x, y)| *x *= y);
                }
            }
            // P∘Z: P itself without dropout.
            let pd = if p.dropout.is_some() { &scr.pd } else { &scr.s };
            // SAFETY (the four GEMMs and dQ's addition): every operand is a scratch buffer
            // sized for BR×BC, BC×D, BC×Dv or BR×D, rows of Q or dO (rows_ptr: `rows` rows at
            // stride ldq, ldo), or rows of dq_acc; the joins read ONES, a factor for each of up
            // to BR rows.
            unsafe {
                // dV += PDᵀ·dO                                      // (w, Dv)
                (kern.gemm)(&Gemm {
                    m: w,
                    n: dv,
                    k: rows,
                    a: pd.as_ptr(),
                    a_rs: 1,
                    a_ks: BC,
                    b: dop,
                    ldb: ldo,
                    b_vs: kern.lanes,
                    c: scr.dv.as_mut_ptr(),
                    ldc: dv,
                    accumulate: false,
                    bias: std::ptr::null(),
                    join: ONES.as_ptr(),
                });
                // dP = dO·Vᵀ                                        // (rows, w)
                (kern.gemm)(&Gemm {
                    m: rows,
                    n: w,
                    k: dv,
                    a: dop,
                    a_rs: ldo,
                    a_ks: 1,
                    b: scr.vt.as_ptr(),
                    ldb: BC,
                    b_vs: kern.lanes,
                    c: scr.dp.as_mut_ptr(),
                    ldc: BC,
                    accumulate: false,
                    bias: std::ptr::null(),
                    join: std::ptr::null(),
                });
            }
            // dS = P∘(dP∘Z − D)·chain·scale, in place of dP           // (rows, w)
            for r in 0..rows {
                let span = scr.spans[r];
                let ds = &mut scr.dp[r * BC..r * BC + w];
                if span.is_empty() {
                    ds.fill(0.0);
                    continue;
                }
                let di = delta[bh * nq + i0 + r];
                let pr = &scr.s[r * BC..r * BC + w];
                if let Some(sink) = weight_grads {
                    // P∘(dP∘Z)                                         // (w,)
                    let row = &mut scr.part[..w];
                    let z = p.dropout.map(|_| &scr.z[r * BC..r * BC + w]);
                    for c in 0..w {
                        row[c] = pr[c] * z.map_or(ds[c], |z| ds[c] * z[c]);
                    }
                    // SAFETY: pairs (b, h, i, j0..j0 + w) of key tile j0 belong to this task.
                    unsafe { sink.write((bh * nq + i0 + r) * p.nk + j0, row) };
                }
                let sc = p.scale;
                if p.dropout.is_some() || !d_rule.is_empty() {
                    let z = p.dropout.map(|_| &scr.z[r * BC..r * BC + w]);
                    for c in 0..w {
                        let dpz = z.map_or(ds[c], |z| ds[c] * z[c]);
                        // ∂L/∂x, which the rule's parameters receive.
                        let dx = pr[c] * (dpz - di);
                        if dx != 0.0 && !d_rule.is_empty() {
                            p.rule_param_grad(dx, (b, h, i0 + r), j0 + c, d_rule);
                        }
                        ds[c] = dx * sc;
                    }
                } else {
                    // SAFETY: pr and ds hold w elements each.
                    unsafe { (kern.softmax_grad)(pr.as_ptr(), ds.as_mut_ptr(), w, di, sc) };
                }
                if chain {
                    let g = &scr.chain[r * BC..r * BC + w];
                    for c in span.a..span.b {
                        ds[c] *= g[c];
                    }
                }
            }
            unsafe {
                // dK += dSᵀ·Q                                       // (w, D)
                (kern.gemm)(&Gemm {
                    m: w,
                    n: d,
                    k: rows,
                    a: scr.dp.as_ptr(),
                    a_rs: 1,
                    a_ks: BC,
                    b: qp,
                    ldb: ldq,
                    b_vs: kern.lanes,
                    c: scr.dk.as_mut_ptr(),
                    ldc: d,
                    accumulate: false,
                    bias: std::ptr::null(),
                    join: ONES.as_ptr(),
                });
                // dQ += dS·K                                        // (rows, D)
                (kern.gemm)(&Gemm {
                    m: rows,
                    n: d,
                    k: w,
                    a: scr.dp.as_ptr(),
                    a_rs: BC,
                    a_ks: 1,
                    b: scr.k.as_ptr(),
                    ldb: d,
                    b_vs: kern.lanes,
                    c: scr.part.as_mut_ptr(),
                    ldc: d,
                    accumulate: false,
                    bias: std::ptr::null(),
                    join: std::ptr::null(),
                });
                // Added by a pass of its own, not joined as the GEMM stores: dQ's rows of a
                // whole head group (4 MiB at GQA 32/8, D = 128) are not in cache, and a pass
                // streams them where the GEMM's stores would wait on each block's rows
                // (joined: GQA fwd+bwd 5% slower).
                let dq = &mut dq_acc[(hl * nq + i0) * d..(hl * nq + i0 + rows) * d];
                (kern.scale_add)(dq.as_mut_ptr(), scr.part.as_ptr(), rows * d, 1.0);
            }
        }
    }
    for c in 0..w {
        // SAFETY: key tile j0 of (b, kvh) belongs to this task alone.
        unsafe {
            dk_out.write_row(b, kvh, j0 + c, &scr.dk[c * d..(c + 1) * d]);
            dv_out.write_row(b, kvh, j0 + c, &scr.dv[c * dv..(c + 1) * dv]);
        }
    }
}
