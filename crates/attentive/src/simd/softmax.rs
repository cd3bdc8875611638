//! The online softmax of a tile ([`OnlineSoftmax`]), its per-row pieces (`max`, `exp_sum`)
//! and the softmax gradient of a row.

use super::*;

/// One online-softmax step over `rows` rows of raw scores whose every element is visible and
/// unmodified: for each row `r` of `s` (`n` columns at stride `lds`),
///
/// ```text
/// m' = max(m[r], scale · max_c s[r][c])
/// s[r][c] ← exp(scale · s[r][c] − m')            // as exp_sum
/// alpha[r] = e^{m[r] − m'}   (1 when m is unchanged or was −∞)
/// l[r] ← l[r] · alpha[r] + Σ_c s[r][c],  m[r] ← m'
/// ```
///
/// a row whose `m'` is −∞ is zeroed and keeps `alpha = 1`. The same arithmetic as `max`
/// followed by `exp_sum`, in one call per tile instead of two per row.
#[derive(Clone, Copy)]
pub(crate) struct OnlineSoftmax {
    pub s: *mut f32,
    pub lds: usize,
    pub rows: usize,
    pub n: usize,
    pub scale: f32,
    pub m: *mut f32,
    pub l: *mut f32,
    pub alpha: *mut f32,
}

#[inline(always)]
pub(super) unsafe fn softmax_grad_generic<S: Simd>(
    p: *const f32,
    ds: *mut f32,
    n: usize,
    d: f32,
    scale: f32,
) {
    let l = S::LANES;
    let (dv, sv) = (S::splat(-d), S::splat(scale));
    let step = |c: usize, part: Option<usize>| {
        let (pv, x) = match part {
            None => (S::load(p.add(c)), S::load(ds.add(c))),
            Some(t) => (S::load_part(p.add(c), t), S::load_part(ds.add(c), t)),
        };
        let y = S::mul(S::mul(pv, S::add(x, dv)), sv);
        match part {
            None => S::store(ds.add(c), y),
            Some(t) => S::store_part(ds.add(c), y, t),
        }
    };
    let mut c = 0;
    while c + l <= n {
        step(c, None);
        c += l;
    }
    if c < n {
        step(c, Some(n - c));
    }
}

/// `Σ_c a[c]·b[c]` as one fused multiply-add chain in column order, the arithmetic of one
/// element of the GEMM's accumulation: the backward's $D_i$ from a row of dO and of O, so that a
/// row whose output equals one value row (a single visible key) gets $dP - D = 0$ exactly. In a
/// table whose features include FMA, `mul_add` is one instruction; elsewhere a correctly
/// rounded library call with the same bits.
#[inline(always)]
pub(super) unsafe fn fma_chain_generic(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = 0.0f32;
    for c in 0..n {
        acc = (*a.add(c)).mul_add(*b.add(c), acc);
    }
    acc
}

/// Rows per group of [`OnlineSoftmax`]: the horizontal max and sum of a row are chains of
/// dependent shuffles, and the row's exponentials wait on its max; four rows in flight give the
/// out-of-order core independent work to overlap them with.
const SOFTMAX_ROWS: usize = 4;
/// Rows of [`OnlineSoftmax`] whose maxima are found before any of their exponentials: 16 rows
/// of a run's 256 scores are 16 KiB, so the exponential pass finds them still in the 32–48 KiB
/// L1 the maxima pass left them in. On Zen 5 this took a 32 × 256 tile's softmax from 0.146 to
/// 0.140 ns per score against a block of 4 rows (one group).
const SOFTMAX_BLOCK: usize = 16;

#[inline(always)]
pub(super) unsafe fn online_softmax_generic<S: Simd>(t: &OnlineSoftmax) {
    const G: usize = SOFTMAX_ROWS;
    let l = S::LANES;
    let full = t.n / l * l;
    let mut b0 = 0;
    while b0 + G <= t.rows {
        // The maxima of a block of groups first, then their exponentials: each group's
        // exponentials wait on its max (a chain of dependent shuffles), which the previous
        // group's exponentials would otherwise have to hide.
        let groups = ((t.rows - b0) / G).min(SOFTMAX_BLOCK / G);
        let mut m_new = [0.0f32; SOFTMAX_BLOCK];
        for g0 in (0..groups * G).step_by(G) {
            let x: [*const f32; G] =
                std::array::from_fn(|g| t.s.add((b0 + g0 + g) * t.lds).cast_const());
            let mut mx = [S::splat(f32::NEG_INFINITY); G];
            for c in (0..full).step_by(l) {
                for g in 0..G {
                    mx[g] = S::max(mx[g], S::load(x[g].add(c)));
                }
            }
            for g in 0..G {
                let mut m = S::reduce_max(mx[g]);
                for c in full..t.n {
                    m = m.max(*x[g].add(c));
                }
                m_new[g0 + g] = (*t.m.add(b0 + g0 + g)).max(t.scale * m);
            }
        }
        for g0 in (0..groups * G).step_by(G) {
            let r0 = b0 + g0;
            let m_new: [f32; G] = std::array::from_fn(|g| m_new[g0 + g]);
            if m_new.contains(&f32::NEG_INFINITY) {
                // A row of −∞ scores: rare, row by row.
                online_softmax_rows::<S>(t, r0, r0 + G);
                continue;
            }
            let x: [*mut f32; G] = std::array::from_fn(|g| t.s.add((r0 + g) * t.lds));
            let sv = S::splat(t.scale);
            let mv: [S::V; G] = std::array::from_fn(|g| S::splat(-m_new[g]));
            let mut sum = [S::splat(0.0); G];
            for c in (0..full).step_by(l) {
                let a: [S::V; G] =
                    std::array::from_fn(|g| S::add(S::mul(S::load(x[g].add(c)), sv), mv[g]));
                let e = S::exp4(a);
                for g in 0..G {
                    S::store(x[g].add(c), e[g]);
                    sum[g] = S::add(sum[g], e[g]);
                }
            }
            for g in 0..G {
                let mut s = S::reduce_add(sum[g]);
                if full < t.n {
                    // As exp_sum: the tail's lanes are added one by one after the reduction.
                    let tail = t.n - full;
                    let e = S::exp(S::add(
                        S::mul(S::load_part(x[g].add(full), tail), sv),
                        mv[g],
                    ));
                    S::store_part(x[g].add(full), e, tail);
                    for c in full..t.n {
                        s += *x[g].add(c);
                    }
                }
                finish_row(t, r0 + g, m_new[g], s);
            }
        }
        b0 += groups * G;
    }
    online_softmax_rows::<S>(t, b0, t.rows);
}

/// Rows `r0..r1` of an [`OnlineSoftmax`] one at a time: `max` and `exp_sum` per row.
#[inline(always)]
unsafe fn online_softmax_rows<S: Simd>(t: &OnlineSoftmax, r0: usize, r1: usize) {
    for r in r0..r1 {
        let x = t.s.add(r * t.lds);
        let mut m_new = (*t.m.add(r)).max(t.scale * max_generic::<S>(x, t.n));
        if m_new == f32::NEG_INFINITY && (0..t.n).any(|c| (*x.add(c)).is_nan()) {
            // NaN scores and no finite one (`max` passes over NaN): the row is NaN, not empty.
            m_new = f32::NAN;
        }
        if m_new == f32::NEG_INFINITY {
            *t.alpha.add(r) = 1.0;
            std::ptr::write_bytes(x, 0, t.n);
            continue;
        }
        finish_row(t, r, m_new, exp_sum_generic::<S>(x, t.n, t.scale, m_new));
    }
}

/// Row `r`'s statistics after its exponentials summed to `sum` relative to the new max `m_new`.
#[inline(always)]
unsafe fn finish_row(t: &OnlineSoftmax, r: usize, m_new: f32, sum: f32) {
    let m_old = *t.m.add(r);
    let mut alpha = 1.0;
    if m_old != m_new && m_old != f32::NEG_INFINITY {
        alpha = (m_old - m_new).exp();
        *t.l.add(r) *= alpha;
    }
    *t.alpha.add(r) = alpha;
    *t.l.add(r) += sum;
    *t.m.add(r) = m_new;
}

#[inline(always)]
pub(super) unsafe fn max_generic<S: Simd>(x: *const f32, n: usize) -> f32 {
    let l = S::LANES;
    let mut acc = S::splat(f32::NEG_INFINITY);
    let mut c = 0;
    while c + l <= n {
        acc = S::max(acc, S::load(x.add(c)));
        c += l;
    }
    let mut m = S::reduce_max(acc);
    while c < n {
        m = m.max(*x.add(c));
        c += 1;
    }
    m
}

#[inline(always)]
pub(super) unsafe fn exp_sum_generic<S: Simd>(x: *mut f32, n: usize, scale: f32, m: f32) -> f32 {
    let l = S::LANES;
    let (sv, mv) = (S::splat(scale), S::splat(-m));
    let mut sum = S::splat(0.0);
    let mut c = 0;
    while c + l <= n {
        let e = S::exp(S::add(S::mul(S::load(x.add(c)), sv), mv));
        S::store(x.add(c), e);
        sum = S::add(sum, e);
        c += l;
    }
    if c < n {
        let t = n - c;
        // Lanes past the row are loaded as 0 and would give exp(−m): keep them out of the sum.
        let e = S::exp(S::add(S::mul(S::load_part(x.add(c), t), sv), mv));
        S::store_part(x.add(c), e, t);
        let mut s = S::reduce_add(sum);
        for q in 0..t {
            s += *x.add(c + q);
        }
        return s;
    }
    S::reduce_add(sum)
}
