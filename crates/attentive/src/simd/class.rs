//! The keys a strided pattern adds beyond its band ([`ClassKeys`]), scored, weighted and
//! summed in lanes of consecutive query rows.

use super::*;

/// Query tiles [`ClassKeys`] takes at once: each load of a key's or value's vector serves this
/// many tiles, and 4 tiles × 4 steps of accumulators (or × 4 vectors of a value row) with the
/// loaded vectors take 24 of AVX-512's 32 registers.
pub(crate) const CLASS_TILES: usize = 4;

/// The keys a strided pattern adds beyond its band, for up to [`CLASS_TILES`] groups of `LANES`
/// consecutive query rows whose positions are `stride` apart: lane `r` of group `u` (its row
/// `r`) sees key `j_t + r` at each step `t ≥ first[u]`, where `j_t = j0 − t·stride`, when
/// that key is at least `key_lo`. A step's keys are `LANES` consecutive keys, one per lane, so
/// its scores are one vector FMA per feature with no reduction, and each group shares the
/// loads of the steps it sees with the others:
///
/// ```text
/// s_u[t][r] = scale · Σ_e qᵀ_u[e][r] · Kᵀ[e][j_t + r]      (−∞ where the lane has no key)
/// m_u[r] = max_t s_u[t][r],  l_u[r] = Σ_t e^{s_u[t][r] − m_u[r]},
/// o_u[r] = Σ_t e^{s_u[t][r] − m_u[r]} · v_{j_t + r}
/// ```
///
/// (`m = −∞`, `l = 0` and `o = 0` for a row that sees no key), joined to the row's attention over
/// its other keys: on entry `m`, `l` and `o` hold that attention's max logit, sum of
/// exponentials and normalised output (−∞, 0 and 0 for none); on return, the same over both key
/// sets. Steps `0..full` have every lane's key (`j_t ≥ key_lo`); step `full`, if any lane's key
/// `j_full + r ≥ key_lo` there, has the lanes from that key on. Lanes at or beyond `rows[u]`
/// are not rows and see nothing.
#[derive(Clone, Copy)]
pub(crate) struct ClassKeys {
    /// Qᵀ of each group: `d` rows of `LANES` floats.
    pub qt: [*const f32; CLASS_TILES],
    pub first: [usize; CLASS_TILES],
    pub rows: [usize; CLASS_TILES],
    pub d: usize,
    /// Kᵀ in panels of `ldk` keys, `tile` floats apart: feature `e` of key `j` at
    /// `kt + (j / ldk)·tile + e·ldk + j % ldk`. A step's `LANES` keys lie in one panel (`j0`,
    /// `stride` and `ldk` are multiples of `LANES`; with `ldk = LANES` they are contiguous).
    pub kt: *const f32,
    pub ldk: usize,
    pub tile: usize,
    /// Row `j` of V (`dv` features) at `v + j·ldv`.
    pub v: *const f32,
    pub ldv: usize,
    pub dv: usize,
    pub j0: i64,
    pub stride: usize,
    pub full: usize,
    pub key_lo: usize,
    pub scale: f32,
    /// Scratch for the scores: group `u`'s step `t` at `s + (u·cap + t)·LANES`, `cap > full`.
    pub s: *mut f32,
    pub cap: usize,
    /// In and out, per group: `m`, `l` (`LANES` each) and `o` (`rows × dv`, row stride `dv`).
    pub m: [*mut f32; CLASS_TILES],
    pub l: [*mut f32; CLASS_TILES],
    pub o: [*mut f32; CLASS_TILES],
}

impl ClassKeys {
    /// Kᵀ of full step `t`'s keys at feature 0.
    #[inline(always)]
    unsafe fn kt_step(&self, t: usize) -> *const f32 {
        let j = (self.j0 - (t * self.stride) as i64) as usize;
        self.kt.add(j / self.ldk * self.tile + j % self.ldk)
    }

    /// Whether lane `r` has a key at the partial step `full` (in any group).
    #[inline(always)]
    fn in_partial(&self, r: usize) -> bool {
        self.j0 - (self.full * self.stride) as i64 + r as i64 >= self.key_lo as i64
    }

    #[inline(always)]
    unsafe fn score(&self, u: usize, t: usize, lanes: usize) -> *mut f32 {
        self.s.add((u * self.cap + t) * lanes)
    }
}

/// Scores of the full steps `t..t + NB` for every group: each feature's loads (one `qᵀ`
/// vector per group, one `Kᵀ` vector per step) feed `CLASS_TILES × NB` independent FMAs.
#[inline(always)]
unsafe fn class_scores<S: Simd, const NB: usize>(c: &ClassKeys, t: usize) {
    const G: usize = CLASS_TILES;
    let l = S::LANES;
    let k: [*const f32; NB] = std::array::from_fn(|u| c.kt_step(t + u));
    let mut acc = [[S::splat(0.0); NB]; G];
    for e in 0..c.d {
        let kv: [S::V; NB] = std::array::from_fn(|u| S::load(k[u].add(e * c.ldk)));
        for (g, row) in acc.iter_mut().enumerate() {
            let q = S::load(c.qt[g].add(e * l));
            for (a, &kx) in row.iter_mut().zip(kv.iter()) {
                *a = S::fma(q, kx, *a);
            }
        }
    }
    let sv = S::splat(c.scale);
    for (g, row) in acc.iter().enumerate() {
        for (u, &a) in row.iter().enumerate() {
            S::store(c.score(g, t + u, l), S::mul(a, sv));
        }
    }
}

/// Lane `r`'s output in every group over columns `e0..e0 + cols` (`V` vectors, the last
/// holding `tail` columns when `TAIL`): each value vector is loaded once for every group.
#[inline(always)]
unsafe fn class_pv<S: Simd, const V: usize, const TAIL: bool>(
    c: &ClassKeys,
    (alpha, inv): (&[[f32; 16]; CLASS_TILES], &[[f32; 16]; CLASS_TILES]),
    r: usize,
    e0: usize,
    tail: usize,
) {
    const G: usize = CLASS_TILES;
    let l = S::LANES;
    let load = |p: *const f32, v: usize| {
        if TAIL && v == V - 1 {
            S::load_part(p.add(v * l), tail)
        } else {
            S::load(p.add(v * l))
        }
    };
    let row = |t: usize| {
        let j = c.j0 - (t * c.stride) as i64 + r as i64;
        c.v.add(j as usize * c.ldv + e0)
    };
    let steps = c.full + c.in_partial(r) as usize;
    let mut acc = [[S::splat(0.0); V]; G];
    for t in 0..steps {
        let x = row(t);
        // The next lane's row of this step: steps lie a stride of rows apart, across pages
        // the hardware prefetcher does not follow, while lanes are neighbouring rows.
        prefetch(x.wrapping_add(c.ldv), V * l * 4);
        let xv: [S::V; V] = std::array::from_fn(|v| load(x, v));
        for (g, a) in acc.iter_mut().enumerate() {
            let p = S::splat(*c.score(g, t, l).add(r));
            for (y, &xx) in a.iter_mut().zip(xv.iter()) {
                *y = S::fma(p, xx, *y);
            }
        }
    }
    for (g, a) in acc.iter().enumerate() {
        if r >= c.rows[g] {
            continue;
        }
        // o ← (α·o + Σ_t p_t·v_t) / ℓ'.
        let o = c.o[g].add(r * c.dv + e0);
        let (w, iv) = (S::splat(alpha[g][r]), S::splat(inv[g][r]));
        for (v, &x) in a.iter().enumerate() {
            if TAIL && v == V - 1 {
                let y = S::mul(S::fma(w, load(o, v), x), iv);
                S::store_part(o.add(v * l), y, tail)
            } else {
                S::store(o.add(v * l), S::mul(S::fma(w, load(o, v), x), iv))
            }
        }
    }
}

#[inline(always)]
pub(super) unsafe fn class_keys_generic<S: Simd>(c: &ClassKeys) {
    const NB: usize = 4;
    let l = S::LANES;
    // Per group and lane: the weight of the other keys' output, and 1 / the new sum.
    let mut alpha = [[0.0f32; 16]; CLASS_TILES];
    let mut inv = [[0.0f32; 16]; CLASS_TILES];
    let mut t = 0;
    while t + NB <= c.full {
        class_scores::<S, NB>(c, t);
        t += NB;
    }
    while t < c.full {
        class_scores::<S, 1>(c, t);
        t += 1;
    }
    // The partial step, lane by lane.
    let jp = c.j0 - (c.full * c.stride) as i64;
    let partial = (0..l).any(|r| c.in_partial(r));
    let steps = c.full + partial as usize;
    for g in 0..CLASS_TILES {
        if partial {
            for r in 0..l {
                let mut x = f32::NEG_INFINITY;
                if c.in_partial(r) && r < c.rows[g] {
                    let j = (jp + r as i64) as usize;
                    let k = c.kt.add(j / c.ldk * c.tile + j % c.ldk);
                    let dot = (0..c.d).fold(0.0f32, |acc, e| {
                        (*c.qt[g].add(e * l + r)).mul_add(*k.add(e * c.ldk), acc)
                    });
                    x = c.scale * dot;
                }
                *c.score(g, c.full, l).add(r) = x;
            }
        }
        // Steps before the group's first, and lanes that are not rows, see nothing.
        for t in 0..c.first[g].min(steps) {
            S::store(c.score(g, t, l), S::splat(f32::NEG_INFINITY));
        }
        if c.rows[g] < l {
            for t in 0..steps {
                for r in c.rows[g]..l {
                    *c.score(g, t, l).add(r) = f32::NEG_INFINITY;
                }
            }
        }
        // The rows' max over their other keys and these.
        let m_band = S::load(c.m[g]);
        let mut mx = m_band;
        for t in 0..steps {
            mx = S::max(mx, S::load(c.score(g, t, l)));
        }
        S::store(c.m[g], mx);
        // A lane with no key subtracts 0 instead of −∞: its weights e^{−∞} are 0.
        let mut neg = [0.0f32; 16];
        for (r, x) in neg.iter_mut().enumerate().take(l) {
            let m = *c.m[g].add(r);
            *x = if m == f32::NEG_INFINITY { 0.0 } else { -m };
        }
        let nv = S::load(neg.as_ptr());
        let mut sum = S::splat(0.0);
        for t in 0..steps {
            let p = S::exp(S::add(S::load(c.score(g, t, l)), nv));
            S::store(c.score(g, t, l), p);
            sum = S::add(sum, p);
        }
        // The other keys' share, ℓ·e^{m − m'} (0 for a row that saw none), and the new sum.
        let a = S::mul(S::load(c.l[g]), S::exp(S::add(m_band, nv)));
        let total = S::add(a, sum);
        S::store(alpha[g].as_mut_ptr(), a);
        S::store(c.l[g], total);
        for (r, x) in inv[g].iter_mut().enumerate().take(l) {
            let t = *c.l[g].add(r);
            *x = if t > 0.0 { 1.0 / t } else { 0.0 };
        }
    }
    let block = S::NV * l;
    let rows = c.rows.iter().copied().max().unwrap_or(0);
    for r in 0..rows {
        let mut e0 = 0;
        while e0 < c.dv {
            let cols = block.min(c.dv - e0);
            match (cols.div_ceil(l), cols % l) {
                (4, 0) => class_pv::<S, 4, false>(c, (&alpha, &inv), r, e0, 0),
                (4, t) => class_pv::<S, 4, true>(c, (&alpha, &inv), r, e0, t),
                (3, 0) => class_pv::<S, 3, false>(c, (&alpha, &inv), r, e0, 0),
                (3, t) => class_pv::<S, 3, true>(c, (&alpha, &inv), r, e0, t),
                (2, 0) => class_pv::<S, 2, false>(c, (&alpha, &inv), r, e0, 0),
                (2, t) => class_pv::<S, 2, true>(c, (&alpha, &inv), r, e0, t),
                (_, 0) => class_pv::<S, 1, false>(c, (&alpha, &inv), r, e0, 0),
                (_, t) => class_pv::<S, 1, true>(c, (&alpha, &inv), r, e0, t),
            }
            e0 += cols;
        }
    }
}
