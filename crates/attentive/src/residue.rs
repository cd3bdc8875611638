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
//! `strided:L` is the band of $L$ keys $[p - L + 1, p]$ (a window on the full views) and, disjoint
//! from it, the keys $j \equiv p \pmod L$ with $j \le p - L$: in a residue class, $j' \le p' - 1$.
//! The two parts merge by their row statistics as [`merge`](crate::merge) does.
//!
//! The plan applies when the pattern is a lone dilated or strided rule and no other option
//! depends on positions (the sub-problems renumber queries and keys); otherwise the block table
//! serves the pattern as it does every other.

use crate::error::Result;
use crate::forward::{run_after, run_max_sum, shares, Prior};
use crate::options::Options;
use crate::pattern::Pattern;
use crate::problem::{expect_len, Problem};
use crate::view::{View, ViewMut};
use crate::workspace::Buffer;

/// How a call is split: into `classes` residue classes with the band `lo ≤ j' − p' ≤ hi`, and
/// for a strided pattern also the band `[-(L−1), 0]` over the full views.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    classes: usize,
    lo: i64,
    hi: i64,
    local: Option<i64>,
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
    match *opts.pattern? {
        Pattern::Dilated { window, dilation } if dilation > 1 => {
            let w = window.min(1 << 40) as i64;
            Some(Plan {
                classes: dilation,
                lo: -w,
                hi: w,
                local: None,
            })
        }
        Pattern::Strided { stride } if stride > 1 => Some(Plan {
            classes: stride,
            lo: -(1 << 40),
            hi: -1,
            local: Some(stride as i64),
        }),
        _ => None,
    }
}

/// Classes `r0..r0 + g` that run as one problem: for each batch, their queries, keys and
/// values fold into a `[g, H, n_r, ·]` view whose first axis steps one row (class `r0 + c` starts
/// at query row `i0 + c` and key row `r0 + c`), all with `nq_r` queries, `nk_r` keys and one
/// band shift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Group {
    r0: usize,
    g: usize,
    i0: usize,
    nq_r: usize,
    nk_r: usize,
    shift: i64,
}

/// The classes of a problem with `nq` queries, `nk` keys and offset `off = nk − nq`, cut into
/// runs that fold: class r holds the queries at $p \equiv r$ and the keys $j \equiv r$ (mod n),
/// renumbered $p' = (p - r)/n$, $j' = (j - r)/n$.
fn groups(n: usize, nq: usize, nk: usize, off: i64) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for r in 0..n.min(nk) {
        let i0 = (r as i64 - off).rem_euclid(n as i64) as usize;
        if i0 >= nq {
            continue;
        }
        let (nq_r, nk_r) = ((nq - 1 - i0) / n + 1, (nk - 1 - r) / n + 1);
        let p0 = (i0 as i64 + off - r as i64).div_euclid(n as i64);
        // The sub-problem aligns p' as its row index plus nk_r − nq_r; the band shifts by the
        // difference to the true p'.
        let shift = p0 - (nk_r as i64 - nq_r as i64);
        match out.last_mut() {
            Some(l)
                if l.r0 + l.g == r
                    && l.i0 + l.g == i0
                    && (l.nq_r, l.nk_r, l.shift) == (nq_r, nk_r, shift) =>
            {
                l.g += 1
            }
            _ => out.push(Group {
                r0: r,
                g: 1,
                i0,
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
    let (b, hq, nq, nk, dv) = (full.b, full.hq, full.nq, full.nk, full.dv);
    full.check_out("out", out, [b, hq, nq, dv])?;
    if let Some(l) = lse.as_deref() {
        expect_len("lse", l.len(), b * hq * nq)?;
    }
    let n = plan.classes;
    let rows = b * hq * nq;
    // Row statistics [B, Hq, Nq] and outputs [B, Hq, Nq, Dv] of the class part, written through
    // folded views. A row no class covers keeps l = 0 and its output is never read.
    let mut o_cls = Buffer::uninit(rows * dv);
    let (mut m_cls, mut l_cls) = (vec![f32::NEG_INFINITY; rows], vec![0.0f32; rows]);
    let row_stride = [hq * nq * dv, nq * dv, dv, 1];
    for gr in groups(n, nq, nk, full.off) {
        for bi in 0..b {
            let p = Problem::new(
                fold(q, bi, gr.i0, gr.g, n, gr.nq_r)?,
                fold(k, bi, gr.r0, gr.g, n, gr.nk_r)?,
                fold(v, bi, gr.r0, gr.g, n, gr.nk_r)?,
                &opts,
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
    if let Some(l) = plan.local {
        // The local band continues from the class part's row statistics and writes the result.
        let prior = Prior {
            o: &o_cls,
            m: &m_cls,
            l: &l_cls,
        };
        return run_after(&full.with_band(1 - l, 0), prior, out, lse);
    }
    let lse_rows: Vec<f32> = m_cls //                                  (B, Hq, Nq)
        .iter()
        .zip(&l_cls)
        .map(|(&m, &l)| shares(&[(m, l)], &mut [0.0]))
        .collect();
    out.for_each_row(|bi, h, i, dst| {
        let row = (bi * hq + h) * nq + i;
        if l_cls[row] > 0.0 {
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
