//! The fused forward kernel: tiled online softmax, O(N) memory.
//!
//! For each (batch, head, tile of `BR` queries) the kernel walks the key tiles of `BC` keys that
//! its rows can see, and for each tile:
//!
//! ```text
//! S   = Q_tile · K_tileᵀ                  // (BR, BC)   one GEMM, K pre-packed as Kᵀ tiles
//! X   = logits(S)                         // scale, softcap, biases, rules, masks (partial tiles)
//! m'  = max(m, rowmax X)                  // (BR,)
//! P   = exp(X − m')                       // (BR, BC)
//! ℓ   = ℓ·e^{m−m'} + rowsum P             // (BR,)
//! O   = O·e^{m−m'} + dropout(P) · V_tile  // (BR, Dv)   one GEMM
//! ```
//!
//! and finally `O /= ℓ`, `LSE = m + ln ℓ`. Tiles every row of which is outside the causal or
//! window band are never visited; rows whose span covers the whole tile skip the per-element rules.
//!
//! With few queries (decoding against a KV cache), the keys are instead split into chunks of
//! `DECODE_CHUNK` processed in parallel, each giving a partial (O, LSE), and the partials are
//! combined with [`merge`], the same function sequence-parallel and ring attention need.

use super::pack::*;
use crate::amx;
use crate::exact::problem::{Problem, Span};
use crate::masks::blocks::Block;
use crate::simd::{Dots, Gemm, OnlineSoftmax, CLASS_TILES};
use crate::tile::{BC, BR};
use crate::view::View;
use crate::workspace::{AVec, Pool, Pooled};

/// Keys per decode chunk: 1024 keys of K and V at D = 128 are 1 MiB, half the 2 MiB L2, and a
/// 32k-key cache gives 32 chunks per head, enough to keep every thread busy.
pub(crate) const DECODE_CHUNK: usize = 1024;

/// Rows per group of a ragged tile. Where the rows of a tile see different column ranges (the
/// edges of a band, the diagonal), each group of `GROUP` rows multiplies only the hull of its
/// rows' spans: at the edge of a 256-key window this skips about a third of the tile, and a
/// group still fills the 6-row micro-kernel almost three times.
pub(crate) const GROUP: usize = 16;

/// Per-thread buffers of the tile loop, allocated once per thread and reused for every task.
pub(crate) struct Scratch {
    pub q: AVec,
    /// Raw scores, then weights, of up to [`RUN`] tiles side by side (`BR × SW`).
    pub s: AVec,
    pub o: AVec,
    pub m: AVec,
    pub l: AVec,
    /// Each row's rescaling `e^{m − m'}` of the last online-softmax step.
    pub alpha: Vec<f32>,
    /// `o` holds no product yet: the next P·V is written into it directly.
    pub fresh: bool,
    /// K of one tile when there is no packed copy: Kᵀ packed on the fly, or K's rows gathered
    /// when their feature stride is not 1 or widened from f16.
    pub kbuf: AVec,
    /// V rows gathered when V's feature stride is not 1, or widened from f16.
    pub vt: AVec,
    /// K rows widened from f16 before they are packed as Kᵀ into `kbuf`.
    pub wide: Vec<f32>,
    pub spans: Vec<Span>,
    pub hulls: Vec<(usize, usize)>,
    /// For problems with [`Problem::class_keys`] (grown on first use): Qᵀ of one group of rows
    /// per tile (`CLASS_TILES × D × lanes`), the scores of their class keys, and each tile's
    /// rows' state (max and sum, `BR` each, and output, `BR × Dv`), which a tile's `m`, `l`
    /// and `o` are swapped with.
    pub qt: AVec,
    pub cls: AVec,
    pub cls_m: [AVec; CLASS_TILES],
    pub cls_l: [AVec; CLASS_TILES],
    pub cls_o: [AVec; CLASS_TILES],
    /// The AMX products' operands ([`Problem::amx`]).
    pub amx: Option<AmxScratch>,
}

/// Scratch kept between tasks and calls, by (D, Dv, AMX).
static POOL: Pool<Scratch, (usize, usize, bool)> = Pool::new();

/// Buffers of the AMX products: the query rows' and the weights' bf16 parts (three parts each,
/// side by side, bf16 in pairs per f32) and P·V's product before it joins the output.
pub(crate) struct AmxScratch {
    /// `3 × BR × d_pad` bf16: the parts of the query tile (rows past its end zero).
    q: AVec,
    /// `3 × BR × SW` bf16: the parts of a run's weights.
    p: AVec,
    /// `BR × dv_pad` f32.
    c: AVec,
    pub(crate) d_pad: usize,
    dv_pad: usize,
}

impl AmxScratch {
    pub(crate) fn new(p: &Problem) -> Self {
        let (d_pad, dv_pad) = (
            p.d.next_multiple_of(amx::STEP),
            p.dv.next_multiple_of(2 * amx::TILE),
        );
        Self {
            q: AVec::filled(3 * BR * d_pad / 2, 0.0),
            p: AVec::filled(3 * BR * SW / 2, 0.0),
            c: AVec::filled(BR * dv_pad, 0.0),
            d_pad,
            dv_pad,
        }
    }

    /// The three parts of `q`, rows of `d_pad` bf16.
    pub(crate) fn q_parts(&self) -> [*const u16; 3] {
        let base = self.q.as_ptr().cast::<u16>();
        [0, 1, 2].map(|k| base.wrapping_add(k * BR * self.d_pad))
    }

    /// Splits rows `0..rows` of Q (row stride `q_rs`) into the parts, zeroing rows up to the
    /// next multiple of 32.
    pub(crate) fn split_q(&mut self, p: &Problem, (q, q_rs): (*const f32, usize), rows: usize) {
        let base = self.q.as_mut_ptr().cast::<u16>();
        for r in 0..rows.next_multiple_of(32) {
            let parts = [0, 1, 2].map(|k| base.wrapping_add((k * BR + r) * self.d_pad));
            let cols = if r < rows { (0, p.d) } else { (0, 0) };
            // SAFETY: row r < rows of Q holds D floats (read only then); each part has room
            // for BR ≥ 32·ceil(rows/32) rows of d_pad bf16; AMX is available (Problem::amx).
            unsafe { amx::split_row(q.wrapping_add(r * q_rs), cols, self.d_pad, parts) };
        }
    }
}

impl Scratch {
    /// A scratch for `p`, kept from an earlier task or call if one fits.
    pub fn pooled(p: &Problem) -> Pooled<'static, Scratch, (usize, usize, bool)> {
        POOL.take((p.d, p.dv, p.amx), || Scratch::new(p))
    }

    pub fn new(p: &Problem) -> Self {
        Self {
            q: AVec::filled(BR * p.d, 0.0),
            s: AVec::filled(BR * SW, 0.0),
            o: AVec::filled(BR * p.dv, 0.0),
            m: AVec::filled(BR, 0.0),
            l: AVec::filled(BR, 0.0),
            alpha: vec![1.0; BR],
            fresh: true,
            kbuf: AVec::filled(BC * p.d, 0.0),
            vt: AVec::filled(SW * p.dv, 0.0),
            wide: Vec::new(),
            spans: vec![Span::EMPTY; RUN * BR],
            hulls: vec![(0, 0); RUN * NG],
            qt: AVec::default(),
            cls: AVec::default(),
            cls_m: Default::default(),
            cls_l: Default::default(),
            cls_o: Default::default(),
            amx: p.amx.then(|| AmxScratch::new(p)),
        }
    }
}

/// Buffers [`score_tile`] reads and writes.
pub(crate) struct TileBufs<'s> {
    /// Query rows, `rows × D` with row stride `q_rs` and unit column stride.
    pub q: *const f32,
    pub q_rs: usize,
    /// Raw scores out, `rows × BC` at row stride `lds`.
    pub s: &'s mut [f32],
    pub lds: usize,
    pub spans: &'s mut [Span],
    /// Per group of `GROUP` rows, the columns `[a, b)` its scores were computed for.
    pub hulls: &'s mut [(usize, usize)],
    /// Room for the tile's Kᵀ (`D × BC`) or gathered K rows (`BC × D`) when there is no packed
    /// copy.
    pub kbuf: &'s mut [f32],
    /// Room for f16 K rows widened before packing (`Keys::Pack` only).
    pub wide: &'s mut Vec<f32>,
    /// The query rows' bf16 parts (`Keys::Split` only).
    pub q_parts: Option<([*const u16; 3], usize)>,
}

/// Where [`score_tile`] finds K.
#[derive(Clone, Copy)]
pub(crate) enum Keys {
    /// A tile of packed Kᵀ: `D × BC` row-major for a panel of `BC` ([`PackedK`]), or
    /// `BC / panel` panels of `D × panel` one after another ([`panel_stride`] apart).
    Packed(*const f32, usize),
    /// Pack the tile into `TileBufs::kbuf` first, then as `Packed`.
    Pack,
    /// Dot products with K's rows where they lie (few queries: decoding).
    Rows,
    /// A tile of Kᵀ as bf16 parts for the AMX product ([`Split`]).
    Split(*const u16),
}

impl Keys {
    /// How a problem's scores are computed when Kᵀ is not already packed: problems of at most
    /// [`DECODE_MAX_Q`] queries score by dot products in the forward, the backward and
    /// [`probabilities`] alike, so that every pass computes the same bits for a score (the
    /// backward's weights are `exp(S − LSE)` with the forward's LSE).
    pub(crate) fn unpacked(p: &Problem) -> Keys {
        if p.nq <= DECODE_MAX_Q {
            Keys::Rows
        } else {
            Keys::Pack
        }
    }
}

/// Computes raw scores `S[r][c] = q_{i0+r}·k_{j0+c}` of one tile (row stride `t.lds`) and each row's
/// span. Returns `None`, computing nothing, when every row's span is empty; otherwise whether
/// the tile was ragged, computed group by group over `t.hulls` only (scores outside a group's
/// hull are left undefined). `keys_at` says where K is read. `blk` is the tile's block-mask
/// entry (rows `i0..i0 + rows` lie in one query tile).
#[allow(clippy::too_many_arguments)]
pub(crate) fn score_tile(
    p: &Problem,
    keys_at: Keys,
    (b, h): (usize, usize),
    i0: usize,
    rows: usize,
    j0: usize,
    keys: (usize, usize),
    blk: Block,
    t: TileBufs,
) -> Option<bool> {
    let w = BC.min(p.nk - j0);
    if p.covers((b, i0), rows, (j0, w), keys, &blk) {
        t.spans[..rows].fill(Span {
            a: 0,
            b: w,
            exact: true,
            bits: crate::masks::pattern::ones(w as u32),
        });
    } else {
        let td = p.tile_docs(b, j0, w);
        let mut any = false;
        for r in 0..rows {
            let span = p.span(b, i0 + r, j0, w, keys, td.as_ref(), blk.row(i0 + r));
            any |= !span.is_empty();
            t.spans[r] = span;
        }
        if !any {
            return None;
        }
    }
    let (kt, panel) = match keys_at {
        Keys::Split(kt) => {
            // The whole tile: its scores outside the groups' hulls are never read.
            let ragged = group_hulls(t.spans, t.hulls, rows, w);
            let (q_parts, d_pad) = t.q_parts.expect("query parts beside split keys");
            let part = k_part(p.d);
            // SAFETY: the query parts hold 32·ceil(rows/32) ≤ BR rows of d_pad bf16, the split
            // tile BC / 16 column tiles of d_pad / 32 steps per part, and t.s rows up to BR
            // of SW ≥ col + BC floats at stride lds.
            unsafe {
                amx::gemm(&amx::TileGemm {
                    mb: rows.div_ceil(32),
                    nb: w.div_ceil(32),
                    steps: d_pad / amx::STEP,
                    a: q_parts,
                    lda: d_pad,
                    b: [0, 1, 2].map(|k| kt.wrapping_add(k * part)),
                    b_cols: k_cols(p.d),
                    c: t.s.as_mut_ptr(),
                    ldc: t.lds,
                })
            };
            return Some(ragged);
        }
        Keys::Packed(kt, panel) => (kt, panel),
        Keys::Pack => {
            pack_k(p, (b, h / p.group), (j0, w), BC, t.kbuf, t.wide);
            (t.kbuf.as_ptr(), BC)
        }
        Keys::Rows => {
            if let Some(hk) = p.half_kv.filter(|hk| hk.k.strides()[3] == 1) {
                let (rows_n, rows) = (rows, &hk.k.data()[hk.k.offset(b, h / p.group, j0, 0)..]);
                // SAFETY: `rows` holds w rows of D f16 at the view's row stride (validated
                // view), t.q `rows` rows of D at stride q_rs, and t.s rows×w at stride lds.
                unsafe {
                    (p.kern.dots_f16)(&Dots {
                        m: rows_n,
                        n: w,
                        k: p.d,
                        a: t.q,
                        lda: t.q_rs,
                        b: rows.as_ptr(),
                        ldb: hk.k.strides()[2],
                        c: t.s.as_mut_ptr(),
                        ldc: t.lds,
                    })
                };
                t.hulls[..rows_n.div_ceil(GROUP)].fill((0, w));
                return Some(false);
            }
            let (kp, ldk) = kv_rows(p, Kv::K, (b, h / p.group), j0, w, t.kbuf);
            // SAFETY: kp addresses w rows of D floats at stride ldk (validated view or kbuf),
            // t.q `rows` rows of D at stride q_rs, and t.s holds rows×w at stride lds.
            unsafe {
                (p.kern.dots)(&Dots {
                    m: rows,
                    n: w,
                    k: p.d,
                    a: t.q,
                    lda: t.q_rs,
                    b: kp,
                    ldb: ldk,
                    c: t.s.as_mut_ptr(),
                    ldc: t.lds,
                })
            };
            t.hulls[..rows.div_ceil(GROUP)].fill((0, w));
            return Some(false);
        }
    };
    let ragged = group_hulls(t.spans, t.hulls, rows, w);
    // One GEMM over the tile, or one per group over its hull.
    let one = [(0, w)];
    let (groups, group_rows): (&[(usize, usize)], usize) = if ragged {
        (&t.hulls[..rows.div_ceil(GROUP)], GROUP)
    } else {
        (&one, rows)
    };
    // Vectors of a row of Kᵀ: side by side, or one per panel (a GEMM then starts at a panel).
    let lanes = p.kern.lanes;
    let (ldb, b_vs, align) = if panel == BC {
        (BC, lanes, 1)
    } else {
        (panel, panel_stride(p.d, panel), panel)
    };
    for (g, &(a, e)) in groups.iter().enumerate() {
        if a >= e {
            continue;
        }
        let a = a / align * align;
        // SAFETY: the Kᵀ tile holds D rows of BC floats (as one block or in panels), t.q
        // `rows` rows of D (row stride q_rs) and t.s rows×w at stride lds; the group's rows
        // and columns a..e ≤ w lie inside them.
        unsafe {
            (p.kern.gemm)(&Gemm {
                m: group_rows.min(rows - g * group_rows),
                n: e - a,
                k: p.d,
                a: t.q.add(g * group_rows * t.q_rs),
                a_rs: t.q_rs,
                a_ks: 1,
                b: kt.add(a / ldb * panel_stride(p.d, ldb) + a % ldb),
                ldb,
                b_vs,
                c: t.s[g * group_rows * t.lds + a..].as_mut_ptr(),
                ldc: t.lds,
                accumulate: false,
                bias: std::ptr::null(),
                join: std::ptr::null(),
            })
        }
    }
    Some(ragged)
}

/// Each group's hull of its rows' spans into `t.hulls`, and whether computing the hulls alone
/// is worth it (a ragged tile); when it is not, every hull is the whole tile.
fn group_hulls(spans: &[Span], hulls: &mut [(usize, usize)], rows: usize, w: usize) -> bool {
    let mut area = 0;
    for (g, hull) in hulls[..rows.div_ceil(GROUP)].iter_mut().enumerate() {
        let group = &spans[g * GROUP..((g + 1) * GROUP).min(rows)];
        let (a, e) = group
            .iter()
            .filter(|s| !s.is_empty())
            .fold((w, 0), |(a, e), s| (a.min(s.a), e.max(s.b)));
        *hull = (a, e.max(a));
        area += group.len() * (e.max(a) - a);
    }
    // Worth splitting when it saves a quarter of the tile.
    let ragged = 4 * area <= 3 * rows * w;
    if !ragged {
        hulls[..rows.div_ceil(GROUP)].fill((0, w));
    }
    ragged
}

impl Scratch {
    /// The tile buffers for query rows at `q` (row stride `q_rs`, unit column stride), for tile
    /// `u` of a run, whose scores start at column `col`.
    pub(crate) fn tile_bufs(
        &mut self,
        (q, q_rs): (*const f32, usize),
        u: usize,
        col: usize,
    ) -> TileBufs<'_> {
        TileBufs {
            q,
            q_rs,
            s: &mut self.s[col..],
            lds: SW,
            spans: &mut self.spans[u * BR..],
            hulls: &mut self.hulls[u * NG..],
            kbuf: &mut self.kbuf,
            wide: &mut self.wide,
            q_parts: self.amx.as_ref().map(|a| (a.q_parts(), a.d_pad)),
        }
    }
}

/// Attention a call continues from, computed over keys the call does not see: per row the
/// largest logit `m` and the sum `l` of exponentials relative to it (both `[B, Hq, Nq, 1]`), and
/// the normalised output `o` (`[B, Hq, Nq, Dv]`, unit last stride), read only where `l > 0`.
/// Any strides, so a residue class reads its rows of a full-size prior. The call's result is
/// attention over the union of both key sets.
#[derive(Clone, Copy)]
pub(crate) struct Prior<'a> {
    pub o: View<'a>,
    pub m: View<'a>,
    pub l: View<'a>,
}

impl<'a> Prior<'a> {
    /// Row `(b, h, i)`'s `(m, l, o)`, if it saw a key.
    #[inline]
    pub(crate) fn row(&self, b: usize, h: usize, i: usize) -> Option<(f32, f32, &'a [f32])> {
        let l = self.l.data()[self.l.offset(b, h, i, 0)];
        // NaN (a non-finite input) counts as seen: it must reach the output.
        (l > 0.0 || l.is_nan()).then(|| {
            let o = &self.o.data()[self.o.offset(b, h, i, 0)..];
            (
                self.m.data()[self.m.offset(b, h, i, 0)],
                l,
                &o[..self.o.shape()[3]],
            )
        })
    }
}

/// Attention of queries `i0..i0 + rows` of `(b, h)` over keys `keys.0..keys.1`: leaves the
/// normalised output in `scr.o` (`rows × Dv`), each row's largest logit in `scr.m` and its sum
/// of exponentials relative to it in `scr.l` (−∞ and 0 for a row that sees no key). With a
/// `prior`, the rows start from its state instead of from no key.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_rows(
    p: &Problem,
    packed: Option<&PackedK>,
    (b, h): (usize, usize),
    i0: usize,
    rows: usize,
    keys: (usize, usize),
    prior: Option<Prior>,
    scr: &mut Scratch,
) {
    let dv = p.dv;
    let kvh = h / p.group;
    let q = rows_ptr(&p.q, (b, h), i0, rows, &mut scr.q);
    if packed.is_some_and(|pk| pk.split_k(b, kvh, p.hkv, 0).is_some()) {
        let bufs = scr.amx.as_mut().expect("AMX scratch beside split keys");
        bufs.split_q(p, q, rows);
    }
    scr.fresh = true;
    scr.m[..rows].fill(f32::NEG_INFINITY);
    scr.l[..rows].fill(0.0);
    // The prior's rows start the running max and sum; its output joins at the end, weighted by
    // e^{m_prior − m}·ℓ_prior, the factor every rescaling of the running sum applied to it.
    if let Some(pr) = prior {
        for r in 0..rows {
            if let Some((m, l, _)) = pr.row(b, h, i0 + r) {
                (scr.m[r], scr.l[r]) = (m, l);
            }
        }
    }
    // Key tiles any row can see: rows' spans are intervals whose ends never decrease with the
    // row, so the first row's start and the last row's end bound the walk (a row with no key
    // only widens it, and a tile no row sees is skipped after its spans).
    let lo = p.row_span(i0).0.clamp(keys.0, keys.1);
    let hi = p.row_span(i0 + rows - 1).1.clamp(lo, keys.1);
    // Without score modifiers a tile whose rows each see one interval of its keys is plain: keys
    // outside a row's span become −∞ (weight exactly 0; with scale > 0 the scaled score stays
    // −∞). Up to RUN consecutive plain tiles are scored side by side and take one softmax step
    // and one P·V product; any other tile goes row by row on its own.
    let can_run = !p.has_mods() && p.scale > 0.0;
    let mut run = Run::default();
    let ng = rows.div_ceil(GROUP);
    for (kt, blk) in p.key_tiles((b, h), i0 / BR, (lo, hi)) {
        let j0 = kt * BC;
        let w = BC.min(p.nk - j0);
        if run.tiles > 0 && (run.tiles == RUN || j0 != run.j0 + run.w) {
            flush_run(p, packed, (b, h, kvh), i0, rows, &mut run, scr);
        }
        let kt = packed.map_or(Keys::unpacked(p), |pk| {
            match pk.split_k(b, kvh, p.hkv, j0) {
                Some(kt) => Keys::Split(kt),
                None => Keys::Packed(pk.tile(b, kvh, p.hkv, j0), pk.panel),
            }
        });
        let (u, col) = (run.tiles, run.w);
        let bufs = scr.tile_bufs(q, u, col);
        let Some(ragged) = score_tile(p, kt, (b, h), i0, rows, j0, keys, blk, bufs) else {
            continue;
        };
        let spans = &scr.spans[u * BR..u * BR + rows];
        if can_run && spans.iter().all(|s| s.exact) {
            if run.tiles == 0 {
                run.j0 = j0;
            }
            if !ragged {
                scr.hulls[u * NG..u * NG + ng].fill((0, w));
            }
            run.ragged |= ragged;
            run.partial |= spans.iter().any(|s| s.a != 0 || s.b != w);
            run.widths[u] = w;
            run.tiles += 1;
            run.w += w;
        } else {
            flush_run(p, packed, (b, h, kvh), i0, rows, &mut run, scr);
            tile_by_rows(p, packed, (b, h, kvh), i0, rows, (j0, w, col), ragged, scr);
        }
    }
    flush_run(p, packed, (b, h, kvh), i0, rows, &mut run, scr);
    let kern = p.kern;
    for r in 0..rows {
        let l = scr.l[r];
        let orow = &mut scr.o[r * dv..(r + 1) * dv];
        // NaN (from a non-finite input) is not an empty row: it reaches the output.
        if l > 0.0 || l.is_nan() {
            let inv = 1.0 / l;
            if scr.fresh {
                orow.fill(0.0);
            } else {
                // SAFETY: orow has dv elements.
                unsafe { (kern.scale)(orow.as_mut_ptr(), dv, inv) };
            }
            if let Some((m, lp, src)) = prior.and_then(|pr| pr.row(b, h, i0 + r)) {
                let w = lp * (m - scr.m[r]).exp() * inv;
                orow.iter_mut().zip(src).for_each(|(y, &x)| *y += w * x);
            }
        } else {
            orow.fill(0.0);
            scr.m[r] = f32::NEG_INFINITY;
            scr.l[r] = 0.0;
        }
    }
}

/// Plain tiles per run: 256 keys, whose scores (`BR × 256`, 64 KiB) stay in the 1 MiB L2 next
/// to the tiles' Kᵀ and V. A run's softmax step and P·V product replace one per tile: fewer
/// rescalings of O, and products summed over 256 keys before they join it. Measured against 3
/// and 6 tiles (N = 4096, D = 64, dense): 3 is 6% slower, 6 no faster.
pub(crate) const RUN: usize = 4;
/// Row stride of the scores of a run.
pub(crate) const SW: usize = RUN * BC;
/// Groups per query tile.
const NG: usize = BR.div_ceil(GROUP);

/// Consecutive plain tiles scored side by side: keys `j0..j0 + w` in score columns `0..w`, tile
/// `u` of `widths[u]` keys at column `64·u`, its rows' spans in `Scratch::spans[u·BR..]` and its
/// groups' hulls in `Scratch::hulls[u·NG..]`.
#[derive(Default)]
struct Run {
    j0: usize,
    w: usize,
    tiles: usize,
    widths: [usize; RUN],
    ragged: bool,
    /// Some row of some tile does not see all of the tile's keys.
    partial: bool,
}

/// The softmax step and P·V product of a run's tiles, then an empty run.
fn flush_run(
    p: &Problem,
    packed: Option<&PackedK>,
    (b, h, kvh): (usize, usize, usize),
    i0: usize,
    rows: usize,
    run: &mut Run,
    scr: &mut Scratch,
) {
    if run.tiles == 0 {
        return;
    }
    let kern = p.kern;
    let ng = rows.div_ceil(GROUP);
    // Each group of rows over the union of its hulls (every row at once when no tile is ragged):
    // scores outside it are never read.
    let mut hulls = [(0usize, 0usize); NG];
    let (groups, size) = if run.ragged {
        for (g, hull) in hulls[..ng].iter_mut().enumerate() {
            let (mut a, mut e) = (run.w, 0);
            for u in 0..run.tiles {
                let (ha, he) = scr.hulls[u * NG + g];
                if ha < he {
                    a = a.min(u * BC + ha);
                    e = e.max(u * BC + he);
                }
            }
            *hull = (a, e.max(a));
        }
        (ng, GROUP)
    } else {
        hulls[0] = (0, run.w);
        (1, rows)
    };
    for (g, &(a, e)) in hulls[..groups].iter().enumerate() {
        let (r0, r1) = (g * size, ((g + 1) * size).min(rows));
        if a >= e {
            scr.alpha[r0..r1].fill(1.0);
            continue;
        }
        // Whole vectors of 16 lanes: a partial one costs lane-by-lane sums.
        let (a, e) = (a / 16 * 16, e.next_multiple_of(16).min(run.w));
        // Keys outside a row's span become −∞ (none when every row sees its tiles whole).
        let fill_rows = if run.partial { r0..r1 } else { r0..r0 };
        for r in fill_rows {
            for u in 0..run.tiles {
                let (c0, c1) = ((u * BC).max(a), (u * BC + run.widths[u]).min(e));
                if c0 >= c1 {
                    continue;
                }
                let span = scr.spans[u * BR + r];
                let row = &mut scr.s[r * SW..];
                if span.is_empty() {
                    row[c0..c1].fill(f32::NEG_INFINITY);
                } else {
                    row[c0..(u * BC + span.a).max(c0)].fill(f32::NEG_INFINITY);
                    row[(u * BC + span.b).min(c1)..c1].fill(f32::NEG_INFINITY);
                }
            }
        }
        // SAFETY: rows r0..r1 and columns a..e ≤ run.w of scr.s (BR × SW) hold scores; m, l
        // and alpha hold BR ≥ r1 entries.
        unsafe {
            (kern.online_softmax)(&OnlineSoftmax {
                s: scr.s[r0 * SW + a..].as_mut_ptr(),
                lds: SW,
                rows: r1 - r0,
                n: e - a,
                scale: p.scale,
                m: scr.m[r0..].as_mut_ptr(),
                l: scr.l[r0..].as_mut_ptr(),
                alpha: scr.alpha[r0..].as_mut_ptr(),
            })
        };
        for r in r0..r1 {
            p.apply_dropout(
                (b, h, i0 + r),
                run.j0 + a,
                &mut scr.s[r * SW + a..r * SW + e],
            );
        }
    }
    let vr = v_rows(p, packed, (b, kvh), (run.j0, run.w), &mut scr.vt);
    pv_and_add(p, rows, vr, &hulls[..groups], size, 0, scr);
    *run = Run::default();
}

/// T = P·V for each group of `size` rows over its hull of score columns (P is 0 outside its
/// rows' spans, so the skipped products add nothing), V's rows starting at score column
/// `col`; then O ← alpha·O + T, joined by the GEMM as it stores (`Gemm::join`). Each output
/// sums its keys in runs of at most [`SW`], not as one chain over every key.
fn pv_and_add(
    p: &Problem,
    rows: usize,
    vr: VRows,
    hulls: &[(usize, usize)],
    size: usize,
    col: usize,
    scr: &mut Scratch,
) {
    let (dv, kern) = (p.dv, p.kern);
    if let VRows::Split(v, j) = vr {
        return pv_tiles(p, rows, (v, j), hulls, size, col, scr);
    }
    // The first product is O itself (O is 0 and alpha multiplies nothing).
    let fresh = std::mem::replace(&mut scr.fresh, false);
    for (g, &(a, e)) in hulls.iter().enumerate() {
        let (r0, m) = (g * size, size.min(rows - g * size));
        if a >= e {
            // No key: T = 0, so O ← alpha·O.
            for r in r0..r0 + m {
                let o = &mut scr.o[r * dv..(r + 1) * dv];
                if fresh {
                    o.fill(0.0);
                } else {
                    // SAFETY: o holds dv floats.
                    unsafe { (kern.scale)(o.as_mut_ptr(), dv, scr.alpha[r]) };
                }
            }
            continue;
        }
        let (a_ptr, c) = (
            scr.s[r0 * SW + col + a..].as_ptr(),
            scr.o[r0 * dv..].as_mut_ptr(),
        );
        let join = if fresh {
            std::ptr::null()
        } else {
            scr.alpha[r0..].as_ptr()
        };
        // SAFETY: P is rows × (col + e) at stride SW in scr.s, V holds the rows of score
        // columns col.. at stride ldv, O is rows × Dv in scr.o, alpha has a factor per row;
        // rows r0..r0 + m and columns col + a..col + e lie inside them.
        unsafe {
            match vr {
                VRows::F32(vp, ldv) => (kern.gemm)(&pv_gemm(
                    (m, dv, e - a),
                    a_ptr,
                    (vp.add(a * ldv), ldv, kern.lanes),
                    (c, join),
                )),
                VRows::F16(vp, ldv) => (kern.gemm_f16)(&pv_gemm(
                    (m, dv, e - a),
                    a_ptr,
                    (vp.add(a * ldv), ldv, kern.lanes),
                    (c, join),
                )),
                VRows::Split(..) => unreachable!("taken by pv_tiles"),
                VRows::Panels(vp, width, stride) => {
                    // Each panel's columns of O (row stride Dv) from that panel's rows.
                    for (q, c0) in (0..dv).step_by(width).enumerate() {
                        let g = pv_gemm((m, dv, e - a), a_ptr, (vp, width, kern.lanes), (c, join));
                        (kern.gemm)(&Gemm {
                            n: width.min(dv - c0),
                            b: vp.add(q * stride + a * width),
                            c: c.add(c0),
                            ..g
                        })
                    }
                }
            }
        };
    }
}

/// [`pv_and_add`] on AMX tiles: P's rows split into bf16 parts over the widest hull (zero
/// outside each group's hull), one product with V's parts (`v`, key `j` at score column
/// `col`), then O ← alpha·O + T.
fn pv_tiles(
    p: &Problem,
    rows: usize,
    (v, j): (*const u16, usize),
    hulls: &[(usize, usize)],
    size: usize,
    col: usize,
    scr: &mut Scratch,
) {
    let (dv, kern) = (p.dv, p.kern);
    let fresh = std::mem::replace(&mut scr.fresh, false);
    let bufs = scr.amx.as_mut().expect("AMX scratch beside split values");
    let width = hulls
        .iter()
        .map(|h| h.1)
        .max()
        .unwrap_or(0)
        .next_multiple_of(amx::STEP);
    let parts = bufs.p.as_mut_ptr().cast::<u16>();
    let part = |k: usize, r: usize| parts.wrapping_add(k * BR * SW + r * SW);
    for r in 0..rows.next_multiple_of(32) {
        let (a, e) = if r < rows { hulls[r / size] } else { (0, 0) };
        // SAFETY: row r < rows of scr.s holds weights at columns col + a..col + e (read only
        // there); each part row has SW ≥ width bf16, for BR ≥ 32·ceil(rows/32) rows.
        unsafe {
            amx::split_row(
                scr.s[r * SW + col..].as_ptr(),
                (a, e.max(a)),
                width,
                [0, 1, 2].map(|k| part(k, r)),
            )
        };
    }
    let (dv_pad, c) = (bufs.dv_pad, bufs.c.as_mut_ptr());
    if width > 0 {
        let vp = v_part(p);
        // SAFETY: P's parts hold 32·ceil(rows/32) rows of SW ≥ width bf16; V's parts
        // dv_pad / 16 column tiles of every step of the head's keys, of which steps
        // j/32..(j + width)/32 are read (j a tile start, j + width within the padded keys);
        // C holds BR rows of dv_pad floats.
        unsafe {
            amx::gemm(&amx::TileGemm {
                mb: rows.div_ceil(32),
                nb: dv_pad / 32,
                steps: width / amx::STEP,
                a: [0, 1, 2].map(|k| part(k, 0).cast_const()),
                lda: SW,
                b: [0, 1, 2].map(|k| v.wrapping_add(k * vp + j / amx::STEP * amx::B_TILE)),
                b_cols: v_cols(p.nk),
                c,
                ldc: dv_pad,
            })
        };
    } else {
        bufs.c[..rows * dv_pad].fill(0.0);
    }
    for r in 0..rows {
        let t = &bufs.c[r * dv_pad..r * dv_pad + dv];
        let o = &mut scr.o[r * dv..(r + 1) * dv];
        if fresh {
            o.copy_from_slice(t);
        } else {
            // SAFETY: o and t hold dv floats each.
            unsafe { (kern.scale_add)(o.as_mut_ptr(), t.as_ptr(), dv, scr.alpha[r]) };
        }
    }
}

/// `C (m × n) = P·V` over `k` keys: P at row stride [`SW`], V's rows (contiguous, `lanes` per
/// vector) at stride `ldv` as f32 or f16, C at row stride `n`, joined to C by `join` unless null.
fn pv_gemm<E>(
    (m, n, k): (usize, usize, usize),
    p: *const f32,
    (v, ldv, lanes): (*const E, usize, usize),
    (c, join): (*mut f32, *const f32),
) -> Gemm<E> {
    Gemm {
        m,
        n,
        k,
        a: p,
        a_rs: SW,
        a_ks: 1,
        b: v,
        ldb: ldv,
        b_vs: lanes,
        c,
        ldc: n,
        accumulate: false,
        bias: std::ptr::null(),
        join,
    }
}

/// A tile that is not plain (score modifiers, per-element masks, scale ≤ 0), row by row: keys
/// `j0..j0 + w`, scored at column `col` of `scr.s` with their spans in `scr.spans[u·BR..]`
/// (`u = col / BC`) and hulls in `scr.hulls[u·NG..]`.
#[allow(clippy::too_many_arguments)]
fn tile_by_rows(
    p: &Problem,
    packed: Option<&PackedK>,
    (b, h, kvh): (usize, usize, usize),
    i0: usize,
    rows: usize,
    (j0, w, col): (usize, usize, usize),
    ragged: bool,
    scr: &mut Scratch,
) {
    let (mods, kern) = (p.has_mods(), p.kern);
    let u = col / BC;
    scr.alpha[..rows].fill(1.0);
    for r in 0..rows {
        let span = scr.spans[u * BR + r];
        let srow = &mut scr.s[r * SW + col..r * SW + col + w];
        if span.is_empty() {
            srow.fill(0.0);
            continue;
        }
        let i = i0 + r;
        let (a, e) = (span.a, span.b);
        // SAFETY (kernel calls below): every pointer/length pair lies inside srow or the
        // output row r of scr.o.
        let (scale, tile_max) = if mods || !span.exact {
            p.logits((b, h, i), j0, srow, span, None);
            (1.0, unsafe { (kern.max)(srow[a..].as_ptr(), e - a) })
        } else {
            let mx = unsafe { (kern.max)(srow[a..].as_ptr(), e - a) };
            (p.scale, p.scale * mx)
        };
        let m_old = scr.m[r];
        let mut m_new = m_old.max(tile_max);
        if m_new == f32::NEG_INFINITY && srow[a..e].iter().any(|s| s.is_nan()) {
            // NaN scores and no finite one (`max` passes over NaN): the row is NaN, not empty.
            m_new = f32::NAN;
        }
        if m_new == f32::NEG_INFINITY {
            srow.fill(0.0);
            continue;
        }
        srow[..a].fill(0.0);
        srow[e..].fill(0.0);
        let sum = unsafe { (kern.exp_sum)(srow[a..].as_mut_ptr(), e - a, scale, m_new) };
        if m_old != m_new && m_old != f32::NEG_INFINITY {
            let alpha = (m_old - m_new).exp();
            scr.l[r] *= alpha;
            scr.alpha[r] = alpha;
        }
        scr.l[r] += sum;
        scr.m[r] = m_new;
        p.apply_dropout((b, h, i), j0 + a, &mut srow[a..e]);
    }
    let ng = rows.div_ceil(GROUP);
    let mut hulls = [(0usize, 0usize); NG];
    let (groups, size) = if ragged {
        hulls[..ng].copy_from_slice(&scr.hulls[u * NG..u * NG + ng]);
        (ng, GROUP)
    } else {
        hulls[0] = (0, w);
        (1, rows)
    };
    let vr = v_rows(p, packed, (b, kvh), (j0, w), &mut scr.vt);
    pv_and_add(p, rows, vr, &hulls[..groups], size, col, scr);
}

/// Turns the `(max, sum)` statistics [`attend_rows`] leaves in `scr.m`/`scr.l` into each row's
/// log-sum-exp, in `scr.m`.
pub(crate) fn to_lse(scr: &mut Scratch, rows: usize) {
    for (m, &l) in scr.m[..rows].iter_mut().zip(&scr.l[..rows]) {
        if l > 0.0 || l.is_nan() {
            *m += l.ln();
        }
    }
}
