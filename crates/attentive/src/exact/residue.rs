//! Dilated and strided patterns as dense problems over residue classes.
//!
//! A dilated window keeps one key in $D$ and a strided pattern one in $L$ beyond its band, so
//! every tile they touch is sparse and a tiled kernel walking them wastes most of its work. But
//! both are dense within a residue class: with $p = i + N_k - N_q$, the keys a query at $p$ sees
//! under `dilated:W,D` are exactly the keys $j \equiv p \pmod D$ with $|j - p| \le WD$. Take the
//! queries with $p \equiv r$ and the keys with $j \equiv r$ as strided views (rows $r, r + D, …$):
//! in their own indices $p' = (p - r)/D$, $j' = (j - r)/D$ the rule is the band
//! $|j' - p'| \le W$, which the kernel runs at the speed of a plain sliding window.
//!
//! `strided:L` is the band of $L$ keys $[p - L + 1, p]$ and, disjoint from it, the keys
//! $j \equiv p \pmod L$ with $j \le p - L$. The plan runs the band $[p - L, p]$ (a window on the
//! full views): its first key is the nearest class key, which the band's tiles score anyway (a
//! 16-row group spans 16 + L − 1 keys or one more, the same 16-lane vectors when L is a
//! multiple of 16), so the classes keep $j \le p - 2L$:
//! in a residue class, $j' \le p' - 2$.
//!
//! When $L$ is a multiple of the 64-row query tile, the class keys need no classes at all: the
//! keys a group of 16 consecutive rows sees $k$ steps back, $p_r - kL$, are 16 consecutive keys,
//! one per row, so the scores of a step are one vector FMA per feature over packed Kᵀ
//! ([`ClassKeys`]). The call then runs as one problem, the band plus
//! [`Problem::class_keys`]: each task runs the bands of 4 query tiles one stride apart, then
//! their class keys (the tiles see the same steps and share every load), which join the bands'
//! max, sum and output.
//!
//! Otherwise the band runs first, a chunk of heads at a time; the classes then continue from its
//! row statistics (max and sum of exponentials) and output, so the result is attention over
//! both key sets, and read their rows (a page or more apart) while the band has left them in L3.
//!
//! A union of `strided:L` with windows and sink rules splits the same way: the other rules join
//! the band (run through the block table), and the class part keeps only the class keys none of
//! them sees. Those are a band in class indices too: a window reaching $W$ keys back sees the
//! class keys $p - kL$ with $kL \le W$, so the class part keeps
//! $k \ge \max(2, \lfloor W/L\rfloor + 1)$; $S$ sink tokens see the class keys $j < S$, which
//! the class views skip.
//!
//! The plan applies when the pattern is one of these and no other option depends on positions
//! (the sub-problems renumber queries and keys); otherwise the block table serves the pattern
//! as it does every other.

use crate::error::expect_len;
use crate::error::Result;
use crate::exact::forward::{run_after, run_max_sum, run_tiled, shares};
use crate::exact::kernel::Prior;
use crate::exact::problem::{ClassSteps, Problem};
use crate::masks::pattern::Pattern;
use crate::options::Options;
use crate::tile::BR;
use crate::view::{View, ViewMut};
use crate::workspace::Buffer;

/// How a call is split: into `classes` residue classes with the band `lo ≤ j' − p' ≤ hi` over
/// the class keys `j ≥ first_key`, and for a strided pattern also the `local` part over the full
/// views.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    classes: usize,
    lo: i64,
    hi: i64,
    first_key: usize,
    local: Option<Local>,
}

/// The part of a strided plan that runs on the full views.
#[derive(Clone, Debug)]
enum Local {
    /// The keys `[p − L, p]`: the strided band and the nearest class key.
    Band(i64),
    /// The band joined by the other rules of a union.
    Pattern(Pattern),
}

/// The residue plan of `opts`, if its pattern has one and nothing else depends on positions.
pub(crate) fn plan(opts: &Options) -> Option<Plan> {
    let positional = opts.causal.is_some()
        || opts.window.is_some()
        || opts.alibi_slopes.is_some()
        || opts.mask.is_some()
        || opts.bias.is_some()
        || opts.docs.is_some()
        || opts.mask_rule.is_some()
        || opts.block_mask.is_some()
        || opts.score_rule.is_some()
        || opts.dropout.is_some_and(|d| d.p > 0.0);
    if positional {
        return None;
    }
    let strided = |l: usize| Plan {
        classes: l,
        lo: -(1 << 40),
        hi: -2,
        first_key: 0,
        local: Some(Local::Band(l as i64)),
    };
    match opts.pattern? {
        &Pattern::Dilated { window, dilation } if dilation > 1 => {
            let w = window.min(1 << 40) as i64;
            Some(Plan {
                classes: dilation,
                lo: -w,
                hi: w,
                first_key: 0,
                local: None,
            })
        }
        &Pattern::Strided { stride } if stride > 1 => Some(strided(stride)),
        Pattern::Union(parts) => {
            // One strided part; every other a window or sink rule.
            let mut l = None;
            let mut others = Vec::new();
            for part in parts {
                match *part {
                    Pattern::Strided { stride } if stride > 1 && l.is_none() => l = Some(stride),
                    Pattern::Window { .. } | Pattern::Sink { .. } => others.push(part.clone()),
                    _ => return None,
                }
            }
            let l = l?;
            let mut plan = strided(l);
            // The class keys p − kL the other rules see: k ≤ back/L, and j < first_key.
            for part in &others {
                let back = match *part {
                    Pattern::Window { left, .. } => left,
                    Pattern::Sink { sinks, window } => {
                        plan.first_key = plan.first_key.max(sinks);
                        window.saturating_sub(1)
                    }
                    _ => unreachable!("only windows and sinks are kept"),
                };
                let k = (back / l).min(1 << 40) as i64;
                plan.hi = plan.hi.min(-(k + 1));
            }
            others.push(Pattern::Window { left: l, right: 0 });
            plan.local = Some(Local::Pattern(Pattern::Union(others)));
            Some(plan)
        }
        _ => None,
    }
}

/// Classes `r0..r0 + g` that run as one problem: for each batch, their queries, keys and
/// values fold into a `[g, H, n_r, ·]` view whose first axis steps one row (class `r0 + c` starts
/// at query row `i0 + c` and key row `k0 + c`), all with `nq_r` queries, `nk_r` keys and one
/// band shift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Group {
    r0: usize,
    g: usize,
    i0: usize,
    k0: usize,
    nq_r: usize,
    nk_r: usize,
    shift: i64,
}

/// The classes of a problem with `nq` queries, `nk` keys and offset `off = nk − nq`, cut into
/// runs that fold: class r holds the queries at $p \equiv r$ and the keys $j \equiv r$ (mod n)
/// with $j \ge$ `first_key`, renumbered $p' = (p - r)/n$, $j' = (j - r)/n$.
fn groups(n: usize, nq: usize, nk: usize, off: i64, first_key: usize) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for r in 0..n.min(nk) {
        let i0 = (r as i64 - off).rem_euclid(n as i64) as usize;
        // The class's first key index j'₀ = ⌈(first_key − r)/n⌉ (0 when r ≥ first_key).
        let skip = first_key.saturating_sub(r).div_ceil(n);
        let k0 = r + n * skip;
        if i0 >= nq || k0 >= nk {
            continue;
        }
        let (nq_r, nk_r) = ((nq - 1 - i0) / n + 1, (nk - 1 - k0) / n + 1);
        let p0 = (i0 as i64 + off - r as i64).div_euclid(n as i64);
        // The sub-problem aligns its row i with key i + nk_r − nq_r, key 0 being j'₀; the band
        // shifts by the difference to the true p' − j'₀.
        let shift = p0 - skip as i64 - (nk_r as i64 - nq_r as i64);
        match out.last_mut() {
            Some(l)
                if l.r0 + l.g == r
                    && l.i0 + l.g == i0
                    && l.k0 + l.g == k0
                    && (l.nq_r, l.nk_r, l.shift) == (nq_r, nk_r, shift) =>
            {
                l.g += 1
            }
            _ => out.push(Group {
                r0: r,
                g: 1,
                i0,
                k0,
                nq_r,
                nk_r,
                shift,
            }),
        }
    }
    out
}

/// Batch `b`'s rows `first + c + n·t` (class c of the group, t-th row) of a view, folded.
fn fold<'a>(
    x: View<'a>,
    b: usize,
    first: usize,
    g: usize,
    n: usize,
    rows: usize,
) -> Result<View<'a>> {
    let [_, h, _, d] = x.shape();
    let s = x.strides();
    let data = &x.data()[x.offset(b, 0, first, 0)..];
    View::new(data, [g, h, rows, d], [s[2], s[1], s[2] * n, s[3]])
}

/// Bytes of one chunk of heads the strided plan runs band first, then classes: half of this
/// machine's 32 MiB L3, so that the classes, whose rows lie a page or more apart, read the
/// queries, keys, values and band results the band has just brought in from L3, not memory.
const CHUNK_BYTES: usize = 16 << 20;

/// The forward of a call with a residue plan; `opts` without its pattern must be valid.
pub(crate) fn forward(
    plan: Plan,
    q: View,
    k: View,
    v: View,
    opts: &Options,
    out: &mut ViewMut,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    if let Some(pat) = opts.pattern {
        pat.validate()?;
    }
    let opts = Options {
        pattern: None,
        ..*opts
    };
    let full = Problem::new(q, k, v, &opts)?;
    full.check_out("out", out, [full.b, full.hq, full.nq, full.dv])?;
    if let Some(l) = lse.as_deref() {
        expect_len("lse", l.len(), full.b * full.hq * full.nq)?;
    }
    let groups = groups(plan.classes, full.nq, full.nk, full.off, plan.first_key);
    match &plan.local {
        None => classes_only(&plan, &groups, &full, &opts, out, lse),
        Some(local) => {
            let band = match local {
                Local::Band(l) => full.with_band(-l, 0),
                Local::Pattern(pat) => {
                    let opts = Options {
                        pattern: Some(pat),
                        ..opts
                    };
                    Problem::new(q, k, v, &opts)?
                }
            };
            // The class keys within each row task when their steps keep whole vectors of
            // consecutive rows on consecutive keys; otherwise as residue-class problems.
            let lanes = band.kern.lanes;
            let fused = !band.has_mods()
                && band.off.rem_euclid(lanes as i64) == 0
                && plan.classes.is_multiple_of(BR)
                && band.q.strides()[3] == 1
                && band.v.strides()[3] == 1
                && band.half_kv.is_none();
            if fused {
                let steps = ClassSteps {
                    stride: plan.classes,
                    k_min: (-plan.hi) as usize,
                    key_lo: plan.first_key,
                };
                return run_tiled(&band.with_class_keys(steps), out, lse);
            }
            let chunk = chunk_heads(&band);
            band_then_classes(&plan, &groups, &band, &opts, chunk, out, lse)
        }
    }
}

/// A dilated plan: the classes alone, through a buffer of the size of the output.
fn classes_only(
    plan: &Plan,
    groups: &[Group],
    full: &Problem,
    opts: &Options,
    out: &mut ViewMut,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let (b, hq, nq, dv, n) = (full.b, full.hq, full.nq, full.dv, plan.classes);
    let rows = b * hq * nq;
    // Row statistics [B, Hq, Nq] and outputs [B, Hq, Nq, Dv] of the classes, written through
    // folded views. A row no class covers keeps l = 0 and its output is never read.
    let mut o_cls = Buffer::uninit(rows * dv);
    let (mut m_cls, mut l_cls) = (vec![f32::NEG_INFINITY; rows], vec![0.0f32; rows]);
    let row_stride = [hq * nq * dv, nq * dv, dv, 1];
    for gr in groups {
        for bi in 0..b {
            let p = Problem::new(
                fold(full.q, bi, gr.i0, gr.g, n, gr.nq_r)?,
                fold(full.k, bi, gr.k0, gr.g, n, gr.nk_r)?,
                fold(full.v, bi, gr.k0, gr.g, n, gr.nk_r)?,
                opts,
            )?
            .with_band(plan.lo + gr.shift, plan.hi + gr.shift)
            .heads_outer();
            let start = bi * row_stride[0] + gr.i0 * dv;
            let shape = [gr.g, hq, gr.nq_r, dv];
            let strides = [dv, row_stride[1], n * dv, 1];
            // The classes' rows are distinct rows of o_cls: no two elements share an address.
            let mut o = ViewMut::new_disjoint(&mut o_cls[start..], shape, strides)?;
            let mut m = vec![0.0f32; gr.g * hq * gr.nq_r];
            let mut l = vec![0.0f32; gr.g * hq * gr.nq_r];
            run_max_sum(&p, &mut o, &mut m, &mut l)?;
            for c in 0..gr.g {
                for h in 0..hq {
                    for t in 0..gr.nq_r {
                        let src = (c * hq + h) * gr.nq_r + t;
                        let dst = (bi * hq + h) * nq + gr.i0 + c + n * t;
                        m_cls[dst] = m[src];
                        l_cls[dst] = l[src];
                    }
                }
            }
        }
    }
    let lse_rows: Vec<f32> = m_cls //                                  (B, Hq, Nq)
        .iter()
        .zip(&l_cls)
        .map(|(&m, &l)| shares(&[(m, l)], &mut [0.0]))
        .collect();
    out.for_each_row(|bi, h, i, dst| {
        let row = (bi * hq + h) * nq + i;
        if l_cls[row] > 0.0 || l_cls[row].is_nan() {
            dst.copy_from_slice(&o_cls[row * dv..(row + 1) * dv]);
        } else {
            dst.fill(0.0);
        }
    });
    if let Some(l) = lse {
        l.copy_from_slice(&lse_rows);
    }
    Ok(())
}

/// Query heads per chunk: a multiple of the group whose queries, keys, values, band results and
/// output fit in [`CHUNK_BYTES`].
fn chunk_heads(p: &Problem) -> usize {
    let head_bytes = 4 * (p.nq * (p.d + 2 * p.dv) + p.nk * (p.d + p.dv) / p.group);
    let chunk = (CHUNK_BYTES / head_bytes.max(1)).max(1).div_ceil(p.group) * p.group;
    chunk.min(p.hq)
}

/// A strided plan, `chunk` query heads at a time: the local part (`band`, over the full views)
/// into a buffer, then the classes, which continue each row from the band's max, sum and
/// output and write the result. Rows of classes that have no keys take the band's result.
fn band_then_classes(
    plan: &Plan,
    groups: &[Group],
    band: &Problem,
    opts: &Options,
    chunk: usize,
    out: &mut ViewMut,
    mut lse: Option<&mut [f32]>,
) -> Result<()> {
    let (b, hq, nq, n, dv) = (band.b, band.hq, band.nq, plan.classes, band.dv);
    // Query residues (i mod n) some class covers.
    let mut covered = vec![false; n];
    for gr in groups {
        covered[gr.i0..gr.i0 + gr.g].fill(true);
    }
    // The band's outputs [1, hc, Nq, Dv] and row statistics [1, hc, Nq, 1] for one chunk.
    let mut o_band = Buffer::uninit(chunk * nq * dv);
    let (mut m_band, mut l_band) = (vec![0.0f32; chunk * nq], vec![0.0f32; chunk * nq]);
    for bi in 0..b {
        for h0 in (0..hq).step_by(chunk) {
            let hc = chunk.min(hq - h0);
            let rows = hc * nq;
            let pb = band
                .heads(bi, h0, hc)
                .expect("a residue plan has no per-head inputs and chunks whole groups");
            run_max_sum(
                &pb,
                &mut ViewMut::contiguous(&mut o_band[..rows * dv], [1, hc, nq, dv])?,
                &mut m_band[..rows],
                &mut l_band[..rows],
            )?;
            let ob = View::contiguous(&o_band[..rows * dv], &[1, hc, nq, dv])?;
            let mb = View::contiguous(&m_band[..rows], &[1, hc, nq, 1])?;
            let lb = View::contiguous(&l_band[..rows], &[1, hc, nq, 1])?;
            for gr in groups {
                let p = Problem::new(
                    fold(pb.q, 0, gr.i0, gr.g, n, gr.nq_r)?,
                    fold(pb.k, 0, gr.k0, gr.g, n, gr.nk_r)?,
                    fold(pb.v, 0, gr.k0, gr.g, n, gr.nk_r)?,
                    opts,
                )?
                .with_band(plan.lo + gr.shift, plan.hi + gr.shift)
                .heads_outer();
                let prior = Prior {
                    o: fold(ob, 0, gr.i0, gr.g, n, gr.nq_r)?,
                    m: fold(mb, 0, gr.i0, gr.g, n, gr.nq_r)?,
                    l: fold(lb, 0, gr.i0, gr.g, n, gr.nq_r)?,
                };
                let mut o = out.fold_rows(bi, (h0, hc), (gr.i0, gr.g, n, gr.nq_r))?;
                let mut l_cls = vec![0.0f32; gr.g * hc * gr.nq_r]; //  (g, hc, nq_r)
                run_after(&p, prior, &mut o, lse.is_some().then_some(&mut l_cls[..]))?;
                if let Some(lse) = lse.as_deref_mut() {
                    for c in 0..gr.g {
                        for h in 0..hc {
                            for t in 0..gr.nq_r {
                                let dst = (bi * hq + h0 + h) * nq + gr.i0 + c + n * t;
                                lse[dst] = l_cls[(c * hc + h) * gr.nq_r + t];
                            }
                        }
                    }
                }
            }
            // Rows of classes without keys: the band's result.
            let mut rest = out.fold_rows(bi, (h0, hc), (0, 1, 1, nq))?;
            rest.for_each_row(|_, h, i, dst| {
                if covered[i % n] {
                    return;
                }
                let r = h * nq + i;
                let (m, l) = (m_band[r], l_band[r]);
                if l > 0.0 || l.is_nan() {
                    dst.copy_from_slice(&o_band[r * dv..(r + 1) * dv]);
                } else {
                    dst.fill(0.0);
                }
                if let Some(lse) = lse.as_deref_mut() {
                    lse[(bi * hq + h0 + h) * nq + i] = shares(&[(m, l)], &mut [0.0]);
                }
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heads are independent: a chunk of one group at a time gives the same bits as one chunk
    /// of every head (small problems always take the latter).
    #[test]
    fn chunks_of_heads_do_not_change_the_result() {
        let (b, hq, hkv, nq, nk, d) = (2, 6, 3, 90, 130, 8);
        let data = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed) % 1009) as f32 / 1009.0 - 0.5)
                .collect()
        };
        let (qd, kd, vd) = (
            data(b * hq * nq * d, 1),
            data(b * hkv * nk * d, 2),
            data(b * hkv * nk * d, 3),
        );
        let q = View::contiguous(&qd, &[b, hq, nq, d]).unwrap();
        let k = View::contiguous(&kd, &[b, hkv, nk, d]).unwrap();
        let v = View::contiguous(&vd, &[b, hkv, nk, d]).unwrap();
        let sink = Pattern::Sink {
            sinks: 5,
            window: 20,
        };
        for pat in [
            Pattern::Strided { stride: 11 },
            sink | Pattern::Strided { stride: 6 },
        ] {
            let with = Options::new().pattern(&pat);
            let plan = plan(&with).unwrap();
            let opts = Options::new();
            let band = match plan.local.as_ref().unwrap() {
                Local::Band(l) => Problem::new(q, k, v, &opts).unwrap().with_band(-l, 0),
                Local::Pattern(p) => Problem::new(q, k, v, &Options::new().pattern(p)).unwrap(),
            };
            let groups = groups(plan.classes, nq, nk, band.off, plan.first_key);
            let run = |chunk: usize| {
                let mut o = vec![0.0f32; b * hq * nq * d];
                let mut l = vec![0.0f32; b * hq * nq];
                let mut ov = ViewMut::contiguous(&mut o, [b, hq, nq, d]).unwrap();
                band_then_classes(&plan, &groups, &band, &opts, chunk, &mut ov, Some(&mut l))
                    .unwrap();
                (o, l)
            };
            let all = run(hq);
            assert!(all.1.iter().all(|x| x.is_finite()));
            assert_eq!(run(2), all, "{pat}");
        }
    }
}
