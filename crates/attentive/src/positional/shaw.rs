//! Relative position representations (Shaw, Uszkoreit and Vaswani, 2018): a learned vector per
//! clipped relative distance, added to the keys and to the values.
//!
//! For query $i$ at position $p_i = i + N_k - N_q$ (bottom-right, as everywhere in the engine)
//! and key $j$, the bucket is $r_{ij} = \mathrm{clip}(j - p_i, -c, c) + c \in [0, 2c]$. With the
//! tables $a^K$ (`[2c+1, D]`) and $a^V$ (`[2c+1, Dv]`),
//! $$x_{ij} = \text{scale}\\,\bigl(q_i\cdot k_j + q_i\cdot a^K_{r_{ij}}\bigr),\qquad
//!   o_i = \sum_j w_{ij}\\,\bigl(v_j + a^V_{r_{ij}}\bigr),$$
//! where every other rule of the call (masks, biases, ALiBi, softcap on the $q_i\cdot k_j$ part)
//! applies to $x$ as in [`options`](crate::Options), and $w$ are the softmax weights after
//! dropout. The value term is $\sum_r A_{ir}\\,a^V_r$, where $A_{ir} = \sum_{j : r_{ij} = r} w_{ij}$
//! is the weight row $i$ puts on relative distance $r - c$ ([`ShawSaved::mass`]).
//!
//! # How it runs on the fused kernel
//! The key term is a score rule adding $R_{ir} = \text{scale}\\,q_i\cdot a^K_r$, a table of
//! $N_q(2c+1)$ numbers per head. Each row's keys split into three bands by $j - p_i$:
//! $(-\infty, -c]$ (bucket $0$), $(-c, c)$ (buckets $1 \dots 2c-1$, one key each) and
//! $[c, \infty)$ (bucket $2c$). The kernel attends over each outer band alone with a column of
//! ones appended to $V$, so the band's output also carries its total weight; the $2c-1$ keys of
//! the inner band are attended directly. The three results merge by their log-sum-exps, as
//! [`merge`](crate::merge) does. The bands partition the pairs: the cost is one forward pass plus
//! $O(N c D)$.
//!
//! The backward uses $dP_{ij} = z_{ij}\\, dO_i\cdot(v_j + a^V_{r_{ij}})$ ($z$ the dropout factor).
//! Over an outer band, $dO_i\cdot a^V_r$ is one number per row: appended to $dO$ (against the
//! ones appended to $V$) it makes the kernel's $dP$ exactly this. The inner band is done directly.
//! The table gradient $dR_{ir} = \sum_{j: r_{ij} = r} dx_{ij}$ over an outer band $\mathcal B$ is
//! $dO'\_i\cdot\bar O'\_{\mathcal B i} - D_i\\,\beta_{\mathcal B i}$, where $\bar O'$ is the band's
//! share of the output and $\beta$ its share of the undropped weight (both saved by the forward)
//! and $D_i = dO_i\cdot o_i$. Then $dq_i \mathrel{+}= \text{scale}\sum_r dR_{ir}\\,a^K_r$,
//! $da^K_r = \text{scale}\sum_i dR_{ir}\\,q_i$ and $da^V_r = \sum_i A_{ir}\\,dO_i$.
//!
//! ```
//! use attentive::shaw::Shaw;
//! use attentive::{Options, View, ViewMut};
//! let (n, d, c) = (6, 4, 2);
//! let x: Vec<f32> = (0..n * d).map(|t| (t as f32 * 0.7).sin()).collect();
//! let xv = View::contiguous(&x, &[1, 1, n, d]).unwrap();
//! let keys = vec![0.0f32; (2 * c + 1) * d];
//! // a^V = one-hot of the bucket: the output's extra part is each row's weight per distance.
//! let mut values = vec![0.0f32; (2 * c + 1) * (2 * c + 1)];
//! (0..2 * c + 1).for_each(|r| values[r * (2 * c + 1) + r] = 1.0);
//! let zeros = vec![0.0f32; n * (2 * c + 1)];
//! let v = View::contiguous(&zeros, &[1, 1, n, 2 * c + 1]).unwrap();
//! let shaw = Shaw { clip: c, keys: &keys, values: &values };
//! let mut o = vec![0.0f32; n * (2 * c + 1)];
//! let saved = shaw
//!     .forward(xv, xv, v, &Options::new(), &mut ViewMut::contiguous(&mut o, [1, 1, n, 2 * c + 1]).unwrap())
//!     .unwrap();
//! for (a, b) in o.iter().zip(saved.mass()) {
//!     assert!((a - b).abs() < 1e-6);
//! }
//! ```

use crate::error::{expect_len, expect_shape};
use crate::error::{AttnError, Result};
use crate::exact::problem::Problem;
use crate::options::{Options, Pos, ScoreRule};
use crate::tile::{BC, BR};
use crate::view::{View, ViewMut};
use rayon::prelude::*;

/// Shaw et al.'s relative positions: clipping distance $c$ (the paper's $k$) and the two tables,
/// row-major, one row per bucket $r = \mathrm{clip}(j - p, -c, c) + c$. The tables are shared by
/// every head, as in the paper.
#[derive(Clone, Copy, Debug)]
pub struct Shaw<'a> {
    pub clip: usize,
    /// $a^K$, `[2·clip + 1, D]`.
    pub keys: &'a [f32],
    /// $a^V$, `[2·clip + 1, Dv]`.
    pub values: &'a [f32],
}

/// What [`Shaw::forward`] keeps for [`Shaw::backward`].
#[derive(Clone, Debug)]
pub struct ShawSaved {
    lse: Vec<f32>,
    /// The output without the value term, $\sum_j w_{ij} v_j$, `[B·Hq·Nq, Dv]`.
    attn: Vec<f32>,
    mass: Vec<f32>,
    /// Each outer band's share of the output, `[B·Hq·Nq, bands, Dv]`.
    band_out: Vec<f32>,
    /// Each outer band's share of the undropped weight, `[B·Hq·Nq, bands]`.
    band_weight: Vec<f32>,
}

impl ShawSaved {
    /// Log-sum-exp of each row, `[B, Hq, Nq]`.
    pub fn lse(&self) -> &[f32] {
        &self.lse
    }
    /// $A_{ir}$, the weight (after dropout) each row puts on each bucket, `[B, Hq, Nq, 2c+1]`:
    /// how far back or ahead each query looks.
    pub fn mass(&self) -> &[f32] {
        &self.mass
    }
}

/// Shapes and constants of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    group: usize,
    nq: usize,
    nk: usize,
    d: usize,
    dv: usize,
    off: i64,
    scale: f32,
    /// Clipping distance and bucket count $2c + 1$.
    c: i64,
    nb: usize,
}

impl Dims {
    fn rows(&self) -> usize {
        self.b * self.hq * self.nq
    }
    fn bucket(&self, i: usize, j: usize) -> usize {
        let rel = j as i64 - (i as i64 + self.off);
        (rel.clamp(-self.c, self.c) + self.c) as usize
    }
    /// The outer bands `(lo, hi, bucket)` of $j - p$: everything when $c = 0$.
    fn bands(&self) -> Vec<(i64, i64, usize)> {
        if self.c == 0 {
            vec![(i64::MIN, i64::MAX, 0)]
        } else {
            vec![(i64::MIN, -self.c, 0), (self.c, i64::MAX, self.nb - 1)]
        }
    }
}

/// The key term as a score rule: adds $R_{ir}$ of the query's row and the pair's bucket.
struct KeyTerm<'t> {
    r: &'t [f32],
    dims: Dims,
}

impl ScoreRule for KeyTerm<'_> {
    fn score(&self, s: f32, at: Pos) -> f32 {
        let row = (at.b * self.dims.hq + at.h) * self.dims.nq + at.i;
        s + self.r[row * self.dims.nb + self.dims.bucket(at.i, at.j)]
    }
    fn grad(&self, _: f32, _: Pos) -> f32 {
        1.0
    }
}

impl Shaw<'_> {
    /// The number of buckets $2c + 1$, once the tables are checked against `D` and `Dv` and
    /// the call's options against the key term.
    pub(crate) fn buckets(&self, opts: &Options, d: usize, dv: usize) -> Result<usize> {
        if opts.score_rule.is_some() {
            return Err(AttnError::ConflictingOptions {
                a: "shaw",
                b: "score_rule",
                reason: "the key term of Shaw's relative positions is the call's score rule",
            });
        }
        let nb = self
            .clip
            .checked_mul(2)
            .and_then(|x| x.checked_add(1))
            .filter(|&nb| nb <= i64::MAX as usize / d.max(dv))
            .ok_or(AttnError::InvalidOption {
                option: "shaw clip",
                value: self.clip as f64,
                reason: "2·clip + 1 table rows do not fit in memory",
            })?;
        expect_len("shaw keys", self.keys.len(), nb * d)?;
        expect_len("shaw values", self.values.len(), nb * dv)?;
        Ok(nb)
    }

    /// Validates the call; returns its problem (without the key term) and its dims.
    fn check<'a>(
        &self,
        q: View<'a>,
        k: View<'a>,
        v: View<'a>,
        opts: &Options<'a>,
    ) -> Result<(Problem<'a>, Dims)> {
        let p = Problem::new(q, k, v, opts)?;
        let nb = self.buckets(opts, p.d, p.dv)?;
        let dims = Dims {
            b: p.b,
            hq: p.hq,
            hkv: p.hkv,
            group: p.group,
            nq: p.nq,
            nk: p.nk,
            d: p.d,
            dv: p.dv,
            off: p.off,
            scale: p.scale,
            c: self.clip as i64,
            nb,
        };
        Ok((p, dims))
    }

    /// $R_{ir} = \text{scale}\\, q_i\cdot a^K_r$ for every row, `[B·Hq·Nq, 2c+1]`.
    fn key_table(&self, q: &[f32], dims: Dims) -> Vec<f32> {
        let (d, nb) = (dims.d, dims.nb);
        let mut r = vec![0.0f32; dims.rows() * nb];
        r.par_chunks_mut(nb)
            .zip(q.par_chunks(d))
            .for_each(|(dst, qi)| {
                for (x, a) in dst.iter_mut().zip(self.keys.chunks(d)) {
                    *x = dims.scale * dot(qi, a);
                }
            });
        r
    }

    /// Attention with relative positions: writes `out` (`[B, Hq, Nq, Dv]`) and returns the row
    /// statistics the backward needs. Every option of [`Options`] applies except a score rule
    /// (the key term is one).
    pub fn forward(
        &self,
        q: View,
        k: View,
        v: View,
        opts: &Options,
        out: &mut ViewMut,
    ) -> Result<ShawSaved> {
        let (base, dims) = self.check(q, k, v, opts)?;
        base.check_out("out", out, [dims.b, dims.hq, dims.nq, dims.dv])?;
        let (rows, dv, nb, nq) = (dims.rows(), dims.dv, dims.nb, dims.nq);
        let qc = q.try_to_vec()?;
        let r = self.key_table(&qc, dims);
        let rule = KeyTerm { r: &r, dims };
        let plain = *opts;
        let opts = Options {
            score_rule: Some(&rule),
            ..*opts
        };
        let v1 = with_ones(&v)?;
        let v1 = View::contiguous(&v1, &[dims.b, dims.hkv, dims.nk, dv + 1])?;
        let bands = dims.bands();
        let nbands = bands.len();
        // Each outer band alone: output with its total weight in the last column, and row max
        // and sum. The key term is one number per row over an outer band, R_i,bucket: the band
        // runs without it (the kernel's fastest path) and it is added to the row's max after.
        let mut parts = Vec::with_capacity(nbands);
        for &(lo, hi, bucket) in &bands {
            let p = Problem::new(q, k, v1, &plain)?.with_band(lo, hi);
            let mut o = vec![0.0f32; rows * (dv + 1)]; //         (B, Hq, Nq, Dv+1)
            let (mut m, mut l) = (vec![0.0f32; rows], vec![0.0f32; rows]); // (B, Hq, Nq)
            let shape = [dims.b, dims.hq, nq, dv + 1];
            let out = &mut ViewMut::contiguous(&mut o, shape)?;
            crate::exact::forward::run_max_sum(&p, out, &mut m, &mut l)?;
            for (row, x) in m.iter_mut().enumerate() {
                *x += r[row * nb + bucket];
            }
            parts.push((o, m, l));
        }
        let inner = (dims.c > 0)
            .then(|| Problem::new(q, k, v, &opts).map(|p| p.with_band(1 - dims.c, dims.c - 1)))
            .transpose()?;
        let vc = v.try_to_vec()?;
        let kc = k.try_to_vec()?;

        let mut o_all = vec![0.0f32; rows * dv]; //                 (B, Hq, Nq, Dv)
        let mut lse = vec![0.0f32; rows];
        let mut mass = vec![0.0f32; rows * nb]; //                  (B, Hq, Nq, 2c+1)
        let mut band_out = vec![0.0f32; rows * nbands * dv];
        let mut band_weight = vec![0.0f32; rows * nbands];
        let mut attn = vec![0.0f32; rows * dv]; //                  (B, Hq, Nq, Dv)
        o_all
            .par_chunks_mut(dv)
            .zip(attn.par_chunks_mut(dv))
            .zip(lse.par_iter_mut())
            .zip(mass.par_chunks_mut(nb))
            .zip(band_out.par_chunks_mut(nbands * dv))
            .zip(band_weight.par_chunks_mut(nbands))
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(x, w), (row, (((((o, o_attn), l), a), bo), bw))| {
                    let (bh, i) = (row / nq, row % nq);
                    let (b, h) = (bh / dims.hq, bh % dims.hq);
                    // The inner band, directly: weights w within the band (after dropout).
                    let (mut m_in, mut l_in, mut lo) = (f32::NEG_INFINITY, 0.0, 0);
                    if let Some(p) = inner.as_ref() {
                        lo = inner_logits(p, &qc, &kc, (b, h, i), x, None);
                        (m_in, l_in) = softmax(x, w);
                        if l_in > 0.0 {
                            p.apply_dropout((b, h, i), lo, w);
                        }
                    }
                    // Each part's share of the row's weight: outer bands, then the inner one.
                    let mut stats = [(f32::NEG_INFINITY, 0.0f32); 3];
                    for (st, (_, pm, pl)) in stats.iter_mut().zip(&parts) {
                        *st = (pm[row], pl[row]);
                    }
                    stats[nbands] = (m_in, l_in);
                    let mut share = [0.0f32; 3];
                    *l = crate::exact::forward::shares(&stats[..nbands + 1], &mut share);
                    if *l == f32::NEG_INFINITY {
                        o.fill(0.0);
                        o_attn.fill(0.0);
                        a.fill(0.0);
                        bo.fill(0.0);
                        bw.fill(0.0);
                        return;
                    }
                    o.fill(0.0);
                    a.fill(0.0);
                    let kvh = h / dims.group;
                    for (part, ((po, _, _), &(_, _, bucket))) in
                        parts.iter().zip(&bands).enumerate()
                    {
                        let beta = share[part];
                        let src = &po[row * (dv + 1)..(row + 1) * (dv + 1)];
                        let dst = &mut bo[part * dv..(part + 1) * dv];
                        for ((y, z), &s) in dst.iter_mut().zip(o.iter_mut()).zip(src) {
                            *y = beta * s;
                            *z += *y;
                        }
                        bw[part] = beta;
                        a[bucket] = beta * src[dv];
                    }
                    if l_in > 0.0 {
                        let beta = share[nbands];
                        for (t, &wt) in w.iter().enumerate() {
                            if wt == 0.0 {
                                continue;
                            }
                            let j = lo + t;
                            let wt = beta * wt;
                            a[dims.bucket(i, j)] += wt;
                            let vj = &vc[((b * dims.hkv + kvh) * dims.nk + j) * dv..][..dv];
                            o.iter_mut().zip(vj).for_each(|(y, &s)| *y += wt * s);
                        }
                    }
                    o_attn.copy_from_slice(o);
                    for (&ar, av) in a.iter().zip(self.values.chunks(dv)) {
                        o.iter_mut().zip(av).for_each(|(y, &s)| *y += ar * s);
                    }
                },
            );
        out.for_each_row(|b, h, i, dst| {
            let row = (b * dims.hq + h) * nq + i;
            dst.copy_from_slice(&o_all[row * dv..(row + 1) * dv]);
        });
        Ok(ShawSaved {
            lse,
            attn,
            mass,
            band_out,
            band_weight,
        })
    }

    /// Gradients of $\sum o\circ dO$: dQ, dK, dV into the views and $da^K$, $da^V$ into
    /// `d_keys` (`[2c+1, D]`) and `d_values` (`[2c+1, Dv]`), all overwritten. `saved` is what
    /// [`forward`](Self::forward) returned for the same inputs and options.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        q: View,
        k: View,
        v: View,
        saved: &ShawSaved,
        d_o: View,
        opts: &Options,
        (dq, dk, dv): (&mut ViewMut, &mut ViewMut, &mut ViewMut),
        d_keys: &mut [f32],
        d_values: &mut [f32],
    ) -> Result<()> {
        let (base, dims) = self.check(q, k, v, opts)?;
        let (rows, d, dvd, nb, nq, nk) = (dims.rows(), dims.d, dims.dv, dims.nb, dims.nq, dims.nk);
        let (b, hq, hkv) = (dims.b, dims.hq, dims.hkv);
        let bands = dims.bands();
        let nbands = bands.len();
        expect_shape("d_o", d_o.shape(), [b, hq, nq, dvd])?;
        expect_len("lse", saved.lse.len(), rows)?;
        expect_len("mass", saved.mass.len(), rows * nb)?;
        expect_len("attn", saved.attn.len(), rows * dvd)?;
        expect_len("band_out", saved.band_out.len(), rows * nbands * dvd)?;
        expect_len("band_weight", saved.band_weight.len(), rows * nbands)?;
        base.check_out("dq", dq, [b, hq, nq, d])?;
        base.check_out("dk", dk, [b, hkv, nk, d])?;
        base.check_out("dv", dv, [b, hkv, nk, dvd])?;
        expect_len("d_keys", d_keys.len(), nb * d)?;
        expect_len("d_values", d_values.len(), nb * dvd)?;

        let (qc, kc, vc) = (q.try_to_vec()?, k.try_to_vec()?, v.try_to_vec()?);
        let doc = d_o.try_to_vec()?;
        // c_ir = dO_i·a^V_r                                        // (B·Hq·Nq, 2c+1)
        let cv: Vec<f32> = doc
            .par_chunks(dvd)
            .flat_map_iter(|g| self.values.chunks(dvd).map(move |a| dot(g, a)))
            .collect();
        // D_i = dO_i·o_i = dO_i·Σ_j w_ij v_j + Σ_r A_ir c_ir, one FMA chain in the order of
        // the kernel's dP = [dO | c]·[v | 1]: a row with one visible key gets dP − D = 0 exactly.
        let delta: Vec<f32> = (0..rows)
            .into_par_iter()
            .map(|row| {
                let (g, o) = (&doc[row * dvd..][..dvd], &saved.attn[row * dvd..][..dvd]);
                cv[row * nb..(row + 1) * nb]
                    .iter()
                    .zip(&saved.mass[row * nb..(row + 1) * nb])
                    .fold(dot(g, o), |acc, (&c, &a)| c.mul_add(a, acc))
            })
            .collect();
        let r = self.key_table(&qc, dims);
        let rule = KeyTerm { r: &r, dims };
        let plain = *opts;
        let opts = Options {
            score_rule: Some(&rule),
            ..*opts
        };
        let v1 = with_ones(&v)?;
        let v1 = View::contiguous(&v1, &[b, hkv, nk, dvd + 1])?;
        let mut lse_band = vec![0.0f32; rows];
        let shape_q1 = [b, hq, nq, dvd + 1];

        let mut gq = vec![0.0f32; rows * d]; //                     (B, Hq, Nq, D)
        let mut gk = vec![0.0f32; b * hkv * nk * d]; //             (B, Hkv, Nk, D)
        let mut gv = vec![0.0f32; b * hkv * nk * dvd]; //           (B, Hkv, Nk, Dv)
        let mut dr = vec![0.0f32; rows * nb]; //                    (B, Hq, Nq, 2c+1)
        let mut do1 = vec![0.0f32; rows * (dvd + 1)];
        let mut eq = vec![0.0f32; rows * d];
        let mut ek = vec![0.0f32; b * hkv * nk * d];
        let mut ev = vec![0.0f32; b * hkv * nk * (dvd + 1)];
        for (e, &(lo, hi, bucket)) in bands.iter().enumerate() {
            // dO' = [dO | c_i,bucket]: over this band the kernel's dP is dO_i·(v_j + a^V_bucket).
            for (row, dst) in do1.chunks_mut(dvd + 1).enumerate() {
                dst[..dvd].copy_from_slice(&doc[row * dvd..(row + 1) * dvd]);
                dst[dvd] = cv[row * nb + bucket];
            }
            // The band runs without its key term, R_i,bucket: P = e^{x − (LSE − R)}.
            for (row, x) in lse_band.iter_mut().enumerate() {
                *x = saved.lse[row] - r[row * nb + bucket];
            }
            let p = Problem::new(q, k, v1, &plain)?.with_band(lo, hi);
            crate::exact::backward::run(
                &p,
                &lse_band,
                &delta,
                View::contiguous(&do1, &shape_q1)?,
                &mut ViewMut::contiguous(&mut eq, [b, hq, nq, d])?,
                &mut ViewMut::contiguous(&mut ek, [b, hkv, nk, d])?,
                &mut ViewMut::contiguous(&mut ev, [b, hkv, nk, dvd + 1])?,
                &mut [],
            )?;
            add(&mut gq, &eq);
            add(&mut gk, &ek);
            for (dst, src) in gv.chunks_mut(dvd).zip(ev.chunks(dvd + 1)) {
                add(dst, &src[..dvd]);
            }
            // dR_i,bucket = dO'_i·(band's share of o') − D_i·(band's share of the weight).
            for row in 0..rows {
                let share_o = &saved.band_out[(row * nbands + e) * dvd..][..dvd];
                let mass = saved.mass[row * nb + bucket];
                dr[row * nb + bucket] += dot(&doc[row * dvd..(row + 1) * dvd], share_o)
                    + cv[row * nb + bucket] * mass
                    - delta[row] * saved.band_weight[row * nbands + e];
            }
        }

        // The inner band, directly. Task (b, kv head) owns its keys' dK, dV and its query heads'
        // dQ and dR rows.
        if dims.c > 0 {
            let inner = Problem::new(q, k, v, &opts)?.with_band(1 - dims.c, dims.c - 1);
            let group = dims.group;
            gk.par_chunks_mut(nk * d)
                .zip(gv.par_chunks_mut(nk * dvd))
                .zip(gq.par_chunks_mut(group * nq * d))
                .zip(dr.par_chunks_mut(group * nq * nb))
                .enumerate()
                .for_each_init(
                    || (Vec::new(), Vec::new(), Vec::new()),
                    |(x, chain, z), (bk, (((gk, gv), gq), dr))| {
                        let (bi, kvh) = (bk / hkv, bk % hkv);
                        for hl in 0..group {
                            let h = kvh * group + hl;
                            for i in 0..nq {
                                let row = (bi * hq + h) * nq + i;
                                let l = saved.lse[row];
                                if l == f32::NEG_INFINITY {
                                    continue;
                                }
                                let lo = inner_logits(&inner, &qc, &kc, (bi, h, i), x, Some(chain));
                                z.clear();
                                z.resize(x.len(), 1.0);
                                inner.apply_dropout((bi, h, i), lo, z);
                                let (qi, gi) = (&qc[row * d..][..d], hl * nq + i);
                                let g_o = &doc[row * dvd..][..dvd];
                                for t in 0..x.len() {
                                    if x[t] == f32::NEG_INFINITY {
                                        continue;
                                    }
                                    let j = lo + t;
                                    let bucket = dims.bucket(i, j);
                                    let alpha = (x[t] - l).exp();
                                    let vj = &vc[(bk * nk + j) * dvd..][..dvd];
                                    let dp = z[t] * (dot(g_o, vj) + cv[row * nb + bucket]);
                                    let dx = alpha * (dp - delta[row]);
                                    dr[gi * nb + bucket] += dx;
                                    let ds = dims.scale * chain[t] * dx;
                                    let kj = &kc[(bk * nk + j) * d..][..d];
                                    axpy(&mut gq[gi * d..(gi + 1) * d], ds, kj);
                                    axpy(&mut gk[j * d..(j + 1) * d], ds, qi);
                                    axpy(&mut gv[j * dvd..(j + 1) * dvd], alpha * z[t], g_o);
                                }
                            }
                        }
                    },
                );
        }

        // Through R = scale·Q·a^Kᵀ, and a^V's gradient.
        gq.par_chunks_mut(d)
            .zip(dr.par_chunks(nb))
            .for_each(|(g, dri)| {
                for (&x, a) in dri.iter().zip(self.keys.chunks(d)) {
                    axpy(g, dims.scale * x, a);
                }
            });
        d_keys.par_chunks_mut(d).enumerate().for_each(|(rr, dst)| {
            dst.fill(0.0);
            for row in 0..rows {
                axpy(
                    dst,
                    dims.scale * dr[row * nb + rr],
                    &qc[row * d..(row + 1) * d],
                );
            }
        });
        d_values
            .par_chunks_mut(dvd)
            .enumerate()
            .for_each(|(rr, dst)| {
                dst.fill(0.0);
                for row in 0..rows {
                    axpy(
                        dst,
                        saved.mass[row * nb + rr],
                        &doc[row * dvd..(row + 1) * dvd],
                    );
                }
            });
        let write = |view: &mut ViewMut, src: &[f32], heads: usize, n: usize, w: usize| {
            view.for_each_row(|bi, h, i, dst| {
                let at = ((bi * heads + h) * n + i) * w;
                dst.copy_from_slice(&src[at..at + w]);
            });
        };
        write(dq, &gq, hq, nq, d);
        write(dk, &gk, hkv, nk, d);
        write(dv, &gv, hkv, nk, dvd);
        Ok(())
    }
}

/// Logits of row `(b, h, i)` over the keys the problem's rules let it see, by the kernel's rules
/// (the problem carries the inner band): fills `x` for keys `[lo, lo + x.len())`, −∞ where masked,
/// and with `chain` also $\partial x/\partial(\text{scale}\\,q\cdot k)$. Returns `lo`.
fn inner_logits(
    p: &Problem,
    qc: &[f32],
    kc: &[f32],
    (b, h, i): (usize, usize, usize),
    x: &mut Vec<f32>,
    mut chain: Option<&mut Vec<f32>>,
) -> usize {
    let (lo, hi) = p.row_span(i);
    x.clear();
    x.resize(hi - lo, f32::NEG_INFINITY);
    if let Some(g) = chain.as_deref_mut() {
        g.clear();
        g.resize(hi - lo, 0.0);
    }
    if lo >= hi {
        return lo;
    }
    let d = p.d;
    let qi = &qc[((b * p.hq + h) * p.nq + i) * d..][..d];
    let kvh = h / p.group;
    let (mut row, mut grow) = ([0.0f32; BC], [0.0f32; BC]);
    for kt in lo / BC..hi.div_ceil(BC) {
        let (j0, w) = (kt * BC, BC.min(p.nk - kt * BC));
        let Some(blk) = p.block((b, h), i / BR, kt) else {
            continue;
        };
        let td = p.tile_docs(b, j0, w);
        let span = p.span(b, i, j0, w, (lo, hi), td.as_ref(), blk.row(i));
        if span.is_empty() {
            continue;
        }
        for (c, s) in row.iter_mut().enumerate().take(span.b).skip(span.a) {
            *s = dot(qi, &kc[((b * p.hkv + kvh) * p.nk + j0 + c) * d..][..d]);
        }
        let want_chain = chain.is_some();
        p.logits(
            (b, h, i),
            j0,
            &mut row[..w],
            span,
            want_chain.then_some(&mut grow[..w]),
        );
        for c in span.a..span.b {
            x[j0 + c - lo] = row[c];
            if let Some(g) = chain.as_deref_mut() {
                g[j0 + c - lo] = grow[c];
            }
        }
    }
    lo
}

/// Softmax of `x` into `w`; returns the largest logit and the sum of exponentials relative to
/// it (−∞, 0 and zero weights when all are −∞).
fn softmax(x: &[f32], w: &mut Vec<f32>) -> (f32, f32) {
    w.clear();
    w.resize(x.len(), 0.0);
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return (m, 0.0);
    }
    let mut sum = 0.0f32;
    for (y, &s) in w.iter_mut().zip(x) {
        *y = (s - m).exp();
        sum += *y;
    }
    w.iter_mut().for_each(|y| *y /= sum);
    (m, sum)
}

/// One fused multiply-add chain in column order (the kernel's order for D).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA, checked just above.
        return unsafe { dot_fma(a, b) };
    }
    dot_chain(a, b)
}

/// $y \leftarrow a x + y$, each element one fused multiply-add.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA, checked just above.
        return unsafe { axpy_fma(y, a, x) };
    }
    axpy_chain(y, a, x)
}

#[inline(always)]
fn dot_chain(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |acc, (&x, &y)| x.mul_add(y, acc))
}

#[inline(always)]
fn axpy_chain(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut()
        .zip(x)
        .for_each(|(y, &x)| *y = a.mul_add(x, *y));
}

// The same code compiled with the FMA instruction instead of a call to the library's `fmaf`;
// both round once per multiply-add, so the results are the same bits (tested below).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_chain(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn axpy_fma(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_chain(y, a, x)
}

fn add(y: &mut [f32], x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += x);
}

/// `[v | 1]`, contiguous: `[B, Hkv, Nk, Dv + 1]`.
fn with_ones(v: &View) -> Result<Vec<f32>> {
    let dv = v.shape()[3];
    let vc = v.try_to_vec()?;
    let mut out = Vec::with_capacity(vc.len() / dv * (dv + 1));
    for row in vc.chunks(dv) {
        out.extend_from_slice(row);
        out.push(1.0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fma_path_gives_the_scalar_bits() {
        let a: Vec<f32> = (0..203)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        let b: Vec<f32> = (0..203)
            .map(|i| ((i * 104729) % 997) as f32 / 89.0 - 5.5)
            .collect();
        assert_eq!(dot(&a, &b).to_bits(), dot_chain(&a, &b).to_bits());
        let (mut y, mut z) = (b.clone(), b.clone());
        axpy(&mut y, 0.37, &a);
        axpy_chain(&mut z, 0.37, &a);
        assert!(y.iter().zip(&z).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
