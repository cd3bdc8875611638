//! The machinery every kernelized attention shares: weights $a_i\cdot b_j$ of positive
//! features $a = \phi(q)$, $b = \phi(k)$ (`f` wide), normalised by their sum,
//! $o_i = a_i^\top S / \delta_i$ with $S = \sum_j b_j v_j^\top$ (`f × Dv`) and
//! $\delta_i = a_i\cdot z + $ a guard, $z = \sum_j b_j$. A [`Features`] map supplies the features
//! of a chunk of rows and takes their gradients back to q and k; linear attention and Performer
//! are two such maps.
//!
//! Causal is computed chunk by chunk ([`CHUNK`] rows): the pairs inside a chunk as a masked
//! product, those before it through the running state, never an `N × f × Dv` tensor. The
//! backward runs the queries front to back (their states) and the keys back to front (the
//! gradient states): with $dn_i = do_i/\delta_i$ and $d\delta_i = -(do_i\cdot o_i)/\delta_i$,
//! $da_i = S\\,dn_i + z\\,d\delta_i$ over the keys `i` sees, and $db_j = dS\\,v_j + dz$,
//! $dv_j = dS^\top b_j$ with $dS = \sum_i a_i\\,dn_i^\top$, $dz = \sum_i a_i\\,d\delta_i$ over the
//! queries that see `j`.

use super::{add_rows, axpy, dot, gemm, transpose};
use crate::simd::Kernels;

/// Rows per chunk of the causal form: a chunk's features and values (3 × 64 × 64 floats, 48 KiB
/// at f = Dv = 64) and its 64 × 64 pair weights stay within L2 beside the `f × Dv` state.
pub const CHUNK: usize = 64;

/// A feature map for one head: the features of rows of its queries and keys, and the way back.
pub(crate) trait Features {
    /// Features per row.
    fn width(&self) -> usize;
    /// Queries.
    fn nq(&self) -> usize;
    /// Keys.
    fn nk(&self) -> usize;
    /// `out (m × f) ← φ` of query rows `r0..r1`.
    fn queries(&self, kern: &Kernels, rows: (usize, usize), out: &mut [f32]);
    /// `out (m × f) ← φ` of key rows `r0..r1` (0 for a hidden key).
    fn keys(&self, kern: &Kernels, rows: (usize, usize), out: &mut [f32]);
    /// `dq (m × D) ← ` the gradient of query rows `r0..r1` from their features' `da` (`m × f`);
    /// `a` holds those rows' features.
    fn queries_back(
        &self,
        kern: &Kernels,
        rows: (usize, usize),
        a: &[f32],
        da: &[f32],
        dq: &mut [f32],
    );
    /// `dk (m × D) ← ` the gradient of key rows `r0..r1` from their features' `db`.
    fn keys_back(
        &self,
        kern: &Kernels,
        rows: (usize, usize),
        b: &[f32],
        db: &[f32],
        dk: &mut [f32],
    );
}

/// What keeps a denominator away from 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Guard {
    /// `δ + ε` (linear attention's ε after the dot product).
    Eps(f32),
    /// `δ + 2·10⁻⁶` where `|δ| ≤ 10⁻⁶` (Performer's).
    Small,
}

impl Guard {
    #[inline]
    fn apply(self, den: f32) -> f32 {
        match self {
            Guard::Eps(e) => den + e,
            Guard::Small if den.abs() <= 1e-6 => den + 2e-6,
            Guard::Small => den,
        }
    }
}

/// How a head is attended: causal or not, and its guard.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rule {
    pub causal: bool,
    pub guard: Guard,
}

/// `S += Σ_j b_j v_jᵀ`, `z += Σ_j b_j` over the rows of `vc` (`m × dv`) and the first `m` rows
/// of `bc` (`f` wide).
fn add_to_state(
    kern: &Kernels,
    (s, z): (&mut [f32], &mut [f32]),
    (bc, vc): (&[f32], &[f32]),
    (f, dv): (usize, usize),
) {
    let m = vc.len() / dv;
    gemm(kern, (f, m, dv), bc, (1, f), vc, dv, s, dv, true);
    add_rows(z, &bc[..m * f], f);
}

/// Scratch of one head: a chunk's query and key features, a transposed block, pair weights.
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    t: Vec<f32>,
    pair: Vec<f32>,
}

impl Scratch {
    fn new(f: usize, dv: usize) -> Self {
        let w = f.max(dv);
        Self {
            a: vec![0.0; CHUNK * f],
            b: vec![0.0; CHUNK * f],
            t: vec![0.0; w * CHUNK.max(w)],
            pair: vec![0.0; CHUNK * CHUNK],
        }
    }
}

/// `pair (m × m, row stride CHUNK) ← x·yᵀ` with the pairs `j > i` set to 0, for `m` rows of
/// `x` and `y` (`w` wide).
fn lower_pairs(
    kern: &Kernels,
    (x, y): (&[f32], &[f32]),
    (m, w): (usize, usize),
    t: &mut [f32],
    pair: &mut [f32],
) {
    transpose(&y[..m * w], (m, w), t);
    gemm(kern, (m, w, m), x, (w, 1), t, m, pair, CHUNK, false);
    for i in 0..m {
        pair[i * CHUNK + i + 1..i * CHUNK + m].fill(0.0);
    }
}

/// `pair ← G = tril(dN_c·V_cᵀ + dδ_c 1ᵀ)` (`m × m`, row stride CHUNK): `G_ij = ∂L/∂A_ij`.
fn grad_pairs(
    kern: &Kernels,
    (dnc, vc): (&[f32], &[f32]),
    dden: &[f32],
    dv: usize,
    scr: &mut Scratch,
) {
    let m = dden.len();
    lower_pairs(kern, (dnc, vc), (m, dv), &mut scr.t, &mut scr.pair);
    for (r, &g) in dden.iter().enumerate() {
        scr.pair[r * CHUNK..r * CHUNK + r + 1]
            .iter_mut()
            .for_each(|x| *x += g);
    }
}

/// The chunks `[c0, c1)` of `n` rows.
pub(crate) fn chunks(n: usize) -> impl DoubleEndedIterator<Item = (usize, usize)> {
    (0..n.div_ceil(CHUNK)).map(move |c| (c * CHUNK, ((c + 1) * CHUNK).min(n)))
}

/// One head's output `o` (`nq × dv`) from its features and values `v` (`nk × dv`), and when
/// asked each row's denominator.
pub(crate) fn head_forward(
    kern: &Kernels,
    h: &impl Features,
    v: &[f32],
    rule: Rule,
    o: &mut [f32],
    mut dens: Option<&mut [f32]>,
) {
    let (f, dv) = (h.width(), v.len() / h.nk());
    let (mut s, mut z) = (vec![0.0f32; f * dv], vec![0.0f32; f]);
    let mut scr = Scratch::new(f, dv);
    let v_rows = |(r0, r1): (usize, usize)| &v[r0 * dv..r1 * dv];
    if !rule.causal {
        // S = φ(K)ᵀ·V, z = Σ_j φ(k_j)                                     (f, dv), (f)
        for c in chunks(h.nk()) {
            h.keys(kern, c, &mut scr.b);
            add_to_state(kern, (&mut s, &mut z), (&scr.b, v_rows(c)), (f, dv));
        }
    }
    for (c0, c1) in chunks(h.nq()) {
        let m = c1 - c0;
        h.queries(kern, (c0, c1), &mut scr.a);
        let oc = &mut o[c0 * dv..c1 * dv];
        // Num = φ(Q_c)·S [+ tril(φ(Q_c)·φ(K_c)ᵀ)·V_c]                     (m, dv)
        gemm(kern, (m, f, dv), &scr.a, (f, 1), &s, dv, oc, dv, false);
        if rule.causal {
            h.keys(kern, (c0, c1), &mut scr.b);
            lower_pairs(kern, (&scr.a, &scr.b), (m, f), &mut scr.t, &mut scr.pair);
            gemm(
                kern,
                (m, m, dv),
                &scr.pair,
                (CHUNK, 1),
                v_rows((c0, c1)),
                dv,
                oc,
                dv,
                true,
            );
        }
        // δ_i = φ(q_i)·z [+ Σ_{j ≤ i} A_ij], guarded
        for r in 0..m {
            let within: f32 = match rule.causal {
                true => scr.pair[r * CHUNK..r * CHUNK + r + 1].iter().sum(),
                false => 0.0,
            };
            let den = rule
                .guard
                .apply(dot(&scr.a[r * f..(r + 1) * f], &z) + within);
            oc[r * dv..(r + 1) * dv].iter_mut().for_each(|x| *x /= den);
            if let Some(ds) = dens.as_deref_mut() {
                ds[c0 + r] = den;
            }
        }
        if rule.causal {
            add_to_state(kern, (&mut s, &mut z), (&scr.b, v_rows((c0, c1))), (f, dv));
        }
    }
}

/// One query head's share of the gradients: `dq` (`nq × D`) written; `db` (`nk × f`, the key
/// features' gradient, mapped back by the caller once every head of a group has added to it)
/// and `dvs` (`nk × dv`) added.
pub(crate) fn head_backward(
    kern: &Kernels,
    h: &impl Features,
    v: &[f32],
    d_o: &[f32],
    rule: Rule,
    (dq, db, dvs): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (f, nq, nk) = (h.width(), h.nq(), h.nk());
    let dv = v.len() / nk;
    let d = dq.len() / nq;
    let v_rows = |(r0, r1): (usize, usize)| &v[r0 * dv..r1 * dv];
    // The forward again, for o and the denominators.
    let (mut o, mut den) = (vec![0.0f32; nq * dv], vec![0.0f32; nq]);
    head_forward(kern, h, v, rule, &mut o, Some(&mut den));
    // dN = dO / δ; dδ_i = −(do_i·o_i) / δ_i                              (nq, dv), (nq)
    let mut dn = vec![0.0f32; nq * dv];
    let mut dden = vec![0.0f32; nq];
    for i in 0..nq {
        let (doi, oi) = (&d_o[i * dv..(i + 1) * dv], &o[i * dv..(i + 1) * dv]);
        dden[i] = -dot(doi, oi) / den[i];
        for (x, &g) in dn[i * dv..(i + 1) * dv].iter_mut().zip(doi) {
            *x = g / den[i];
        }
    }
    let (mut s, mut z) = (vec![0.0f32; f * dv], vec![0.0f32; f]);
    let (mut ds, mut dz) = (vec![0.0f32; f * dv], vec![0.0f32; f]);
    let mut t = vec![0.0f32; f * dv];
    let mut da = vec![0.0f32; CHUNK * f];
    let mut scr = Scratch::new(f, dv);
    if !rule.causal {
        for c in chunks(nk) {
            h.keys(kern, c, &mut scr.b);
            add_to_state(kern, (&mut s, &mut z), (&scr.b, v_rows(c)), (f, dv));
        }
    }
    // Queries front to back: dA_c = dN_c·Sᵀ + dδ_c zᵀ [+ G·φ(K_c), G = tril(dN_c·V_cᵀ + dδ_c 1ᵀ)]
    for (c0, c1) in chunks(nq) {
        let m = c1 - c0;
        h.queries(kern, (c0, c1), &mut scr.a);
        let dnc = &dn[c0 * dv..c1 * dv];
        let dac = &mut da[..m * f];
        transpose(&s, (f, dv), &mut t);
        gemm(kern, (m, dv, f), dnc, (dv, 1), &t, f, dac, f, false);
        for (dai, &g) in dac.chunks_exact_mut(f).zip(&dden[c0..c1]) {
            axpy(dai, g, &z);
        }
        if rule.causal {
            h.keys(kern, (c0, c1), &mut scr.b);
            let vc = v_rows((c0, c1));
            grad_pairs(kern, (dnc, vc), &dden[c0..c1], dv, &mut scr);
            gemm(
                kern,
                (m, m, f),
                &scr.pair,
                (CHUNK, 1),
                &scr.b,
                f,
                dac,
                f,
                true,
            );
            add_to_state(kern, (&mut s, &mut z), (&scr.b, vc), (f, dv));
        } else {
            // dS = φ(Q)ᵀ·dN, dz = φ(Q)ᵀ·dδ over every query
            gemm(kern, (f, m, dv), &scr.a, (1, f), dnc, dv, &mut ds, dv, true);
            for (ai, &g) in scr.a.chunks_exact(f).zip(&dden[c0..c1]) {
                axpy(&mut dz, g, ai);
            }
        }
        h.queries_back(kern, (c0, c1), &scr.a, dac, &mut dq[c0 * d..c1 * d]);
    }
    if !rule.causal {
        // dB += V·dSᵀ + 1 dzᵀ; dV += φ(K)·dS
        transpose(&ds, (f, dv), &mut t);
        for c in chunks(nk) {
            let m = c.1 - c.0;
            h.keys(kern, c, &mut scr.b);
            let (dbc, dvc) = (&mut db[c.0 * f..c.1 * f], &mut dvs[c.0 * dv..c.1 * dv]);
            gemm(kern, (m, dv, f), v_rows(c), (dv, 1), &t, f, dbc, f, true);
            for dbj in dbc.chunks_exact_mut(f) {
                axpy(dbj, 1.0, &dz);
            }
            gemm(kern, (m, f, dv), &scr.b, (f, 1), &ds, dv, dvc, dv, true);
        }
        return;
    }
    // Keys back to front, (dS, dz) summing the queries after the chunk:
    // dB_c += V_c·dSᵀ + 1 dzᵀ + Gᵀ·φ(Q_c); dV_c += φ(K_c)·dS + Mᵀ·dN_c, M = tril(φ(Q_c)·φ(K_c)ᵀ)
    for (c0, c1) in chunks(nq).rev() {
        let m = c1 - c0;
        h.queries(kern, (c0, c1), &mut scr.a);
        h.keys(kern, (c0, c1), &mut scr.b);
        let vc = v_rows((c0, c1));
        let dnc = &dn[c0 * dv..c1 * dv];
        let (dbc, dvc) = (&mut db[c0 * f..c1 * f], &mut dvs[c0 * dv..c1 * dv]);
        transpose(&ds, (f, dv), &mut t);
        gemm(kern, (m, dv, f), vc, (dv, 1), &t, f, dbc, f, true);
        for dbj in dbc.chunks_exact_mut(f) {
            axpy(dbj, 1.0, &dz);
        }
        grad_pairs(kern, (dnc, vc), &dden[c0..c1], dv, &mut scr);
        gemm(
            kern,
            (m, m, f),
            &scr.pair,
            (1, CHUNK),
            &scr.a,
            f,
            dbc,
            f,
            true,
        );
        gemm(kern, (m, f, dv), &scr.b, (f, 1), &ds, dv, dvc, dv, true);
        lower_pairs(kern, (&scr.a, &scr.b), (m, f), &mut scr.t, &mut scr.pair);
        gemm(
            kern,
            (m, m, dv),
            &scr.pair,
            (1, CHUNK),
            dnc,
            dv,
            dvc,
            dv,
            true,
        );
        // dS += φ(Q_c)ᵀ·dN_c, dz += φ(Q_c)ᵀ·dδ_c
        gemm(kern, (f, m, dv), &scr.a, (1, f), dnc, dv, &mut ds, dv, true);
        for (ai, &g) in scr.a.chunks_exact(f).zip(&dden[c0..c1]) {
            axpy(&mut dz, g, ai);
        }
    }
}

/// Maps a key/value head's feature gradient `db` (`nk × f`) back to its keys, chunk by chunk.
pub(crate) fn keys_back_all(kern: &Kernels, h: &impl Features, db: &[f32], dk: &mut [f32]) {
    let f = h.width();
    let d = dk.len() / h.nk();
    let mut b = vec![0.0f32; CHUNK * f];
    for c in chunks(h.nk()) {
        h.keys(kern, c, &mut b);
        let rows = (&db[c.0 * f..c.1 * f], &mut dk[c.0 * d..c.1 * d]);
        h.keys_back(kern, c, &b, rows.0, rows.1);
    }
}
