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

use crate::blocks::Block;
use crate::error::{AttnError, Result};
use crate::options::Options;
use crate::problem::{Problem, Span};
use crate::simd::{Dots, Gemm, Kernels, OnlineSoftmax, Transpose, CLASS_TILES};
use crate::view::{RawOut, RawSlice, View, ViewMut};
use crate::workspace::{AVec, Buffer};
use half::f16;
use rayon::prelude::*;

/// Queries per tile. With `BC` keys per tile the score tile is 64×64 f32 = 16 KiB; with the Kᵀ
/// tile (16 KiB at D = 64) and the V tile (16 KiB) the working set of one step fits the 48 KiB L1
/// of the target cores, and 64 rows amortise each K/V tile load over many queries.
pub(crate) const BR: usize = 64;
/// Keys per tile (see [`BR`]); a multiple of every vector width (16 lanes).
pub(crate) const BC: usize = 64;
/// At most this many queries take the decode path (no Kᵀ packing, keys split across threads):
/// below it, packing K would cost more memory traffic than the attention itself.
pub(crate) const DECODE_MAX_Q: usize = 16;
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
    /// A run's (or row-by-row tile's) P·V (`BR × Dv`), added to `o` after rescaling it.
    pub pv: AVec,
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
}

impl Scratch {
    pub fn new(p: &Problem) -> Self {
        Self {
            q: AVec::filled(BR * p.d, 0.0),
            s: AVec::filled(BR * SW, 0.0),
            o: AVec::filled(BR * p.dv, 0.0),
            m: AVec::filled(BR, 0.0),
            l: AVec::filled(BR, 0.0),
            alpha: vec![1.0; BR],
            pv: AVec::filled(BR * p.dv, 0.0),
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
        }
    }
}

/// Pointer to rows `n0..n0 + rows` of `view[b, h]` as a row-major block with unit column stride:
/// the view's own memory when its last stride is 1, otherwise a copy in `buf`.
pub(crate) fn rows_ptr(
    view: &View,
    (b, h): (usize, usize),
    n0: usize,
    rows: usize,
    buf: &mut [f32],
) -> (*const f32, usize) {
    let st = view.strides();
    let width = view.shape()[3];
    if st[3] == 1 {
        // In bounds: the view was validated to lie inside its slice.
        (view.data()[view.offset(b, h, n0, 0)..].as_ptr(), st[2])
    } else {
        gather_rows(view, (b, h), n0, rows, buf);
        (buf.as_ptr(), width)
    }
}

/// Which of K and V a kernel reads.
#[derive(Clone, Copy)]
pub(crate) enum Kv {
    K,
    V,
}

/// Rows `j0..j0 + w` of K or V of `(b, kvh)` as f32 rows with unit column stride: as
/// [`rows_ptr`] for f32 storage; f16 storage is converted into `buf`.
pub(crate) fn kv_rows(
    p: &Problem,
    which: Kv,
    (b, kvh): (usize, usize),
    j0: usize,
    w: usize,
    buf: &mut [f32],
) -> (*const f32, usize) {
    let (x32, x16) = match which {
        Kv::K => (&p.k, p.half_kv.map(|h| h.k)),
        Kv::V => (&p.v, p.half_kv.map(|h| h.v)),
    };
    let Some(x) = x16 else {
        return rows_ptr(x32, (b, kvh), j0, w, buf);
    };
    let (data, st, width) = (x.data(), x.strides(), x.shape()[3]);
    let widen = |src: &[f16], dst: &mut [f32]| {
        assert!(dst.len() >= src.len());
        // SAFETY: just checked: dst holds src.len() floats.
        unsafe { (p.kern.widen)(src.as_ptr(), dst.as_mut_ptr(), src.len()) }
    };
    if w == 0 {
        return (buf.as_ptr(), width);
    }
    let o = x.offset(b, kvh, j0, 0);
    if st[3] == 1 && st[2] == width {
        // The rows are one contiguous run.
        widen(&data[o..o + w * width], buf);
    } else if st[3] == 1 {
        for r in 0..w {
            let o = x.offset(b, kvh, j0 + r, 0);
            widen(&data[o..o + width], &mut buf[r * width..(r + 1) * width]);
        }
    } else {
        for r in 0..w {
            let o = x.offset(b, kvh, j0 + r, 0);
            for (c, y) in buf[r * width..(r + 1) * width].iter_mut().enumerate() {
                *y = data[o + c * st[3]].to_f32();
            }
        }
    }
    (buf.as_ptr(), width)
}

/// V's rows for a P·V product: f32 rows (in place, gathered or widened), or f16 rows in place,
/// which the f16 GEMM widens as it loads them.
#[derive(Clone, Copy)]
pub(crate) enum VRows {
    F32(*const f32, usize),
    F16(*const f16, usize),
    /// f32 rows in column panels `width` floats wide, `stride` floats apart: row `j` of panel
    /// `q` at `q·stride + j·width` (one panel when V is only copied onto cache lines).
    Panels(*const f32, usize, usize),
}

/// Columns per panel of V's copy when Dv > 64: two vectors, so that each P·V pass streams one
/// contiguous panel and takes 12 rows (the GEMM's passes over two vectors). Measured on an Intel
/// Xeon, forward N = 2048, D = 128: 77.5 → 73.9 ms (median of 7) and 79.3 → 77.6 ms (median of
/// 11, faster in each of the 11 alternating pairs). At D = 64 whole rows in passes of 6 rows × 4
/// vectors are faster (36.0 against 37.5 ms), so Dv ≤ 64 keeps its rows.
pub(crate) const V_PANEL: usize = 32;

/// Rows `j0..j0 + w` of V of `(b, kvh)`: from the packed copy when the call made one; f16
/// rows with unit feature stride where they are; everything else as [`kv_rows`] gives it.
pub(crate) fn v_rows(
    p: &Problem,
    packed: Option<&PackedK>,
    (b, kvh): (usize, usize),
    (j0, w): (usize, usize),
    buf: &mut [f32],
) -> VRows {
    if let Some(vr) = packed.and_then(|pk| pk.v_rows(p, (b, kvh), j0)) {
        return vr;
    }
    match p.half_kv {
        Some(hk) if hk.v.strides()[3] == 1 && w > 0 => {
            // In bounds: the view was validated to lie inside its slice.
            let rows = &hk.v.data()[hk.v.offset(b, kvh, j0, 0)..];
            VRows::F16(rows.as_ptr(), hk.v.strides()[2])
        }
        _ => {
            let (vp, ldv) = kv_rows(p, Kv::V, (b, kvh), j0, w, buf);
            VRows::F32(vp, ldv)
        }
    }
}

/// Kᵀ of keys `j0..j0 + w` of `(b, kvh)` into `dst` as [`pack_transposed`] writes it, from f32
/// or f16 storage; f16 rows are widened into `rows` first (grown once, then reused).
pub(crate) fn pack_k(
    p: &Problem,
    (b, kvh): (usize, usize),
    (j0, w): (usize, usize),
    ld: usize,
    dst: &mut [f32],
    rows: &mut Vec<f32>,
) {
    if p.half_kv.is_none() {
        return pack_transposed(&p.k, (b, kvh), (j0, w), ld, dst, p.kern);
    }
    if rows.len() < w * p.d {
        rows.resize(w * p.d, 0.0); //                                   (w, D)
    }
    kv_rows(p, Kv::K, (b, kvh), j0, w, rows);
    let view = View::new(&rows[..w * p.d], [1, 1, w, p.d], [0, 0, p.d, 1]).expect("w rows of D");
    pack_transposed(&view, (0, 0), (0, w), ld, dst, p.kern);
}

/// Copies rows `n0..n0 + rows` of `view[b, h]` into `buf` (row-major, `width` columns).
pub(crate) fn gather_rows(
    view: &View,
    (b, h): (usize, usize),
    n0: usize,
    rows: usize,
    buf: &mut [f32],
) {
    let width = view.shape()[3];
    let data = view.data();
    let st = view.strides()[3];
    for r in 0..rows {
        let o = view.offset(b, h, n0 + r, 0);
        let dst = &mut buf[r * width..(r + 1) * width];
        if st == 1 {
            dst.copy_from_slice(&data[o..o + width]);
        } else {
            for (c, x) in dst.iter_mut().enumerate() {
                *x = data[o + c * st];
            }
        }
    }
}

/// Kᵀ in tiles: `[B·Hkv][ceil(Nk/BC)][D][BC]`, zero-padded past `Nk`, so the score GEMM streams
/// contiguous `BC`-wide rows whatever the strides of K; or each tile as `BC / panel` panels
/// `[D][panel]`, [`panel_stride`] apart (the class keys of strided patterns read a vector's
/// keys of a panel as contiguous memory). An eager copy ([`PackedK::new`]) may also hold a copy
/// of V (see `v`).
pub(crate) struct PackedK {
    /// Owns the memory `base` points into; not read through after construction (readers of
    /// one head and the packing of another share it only through `base`).
    _data: Buffer,
    base: *mut f32,
    len: usize,
    tiles: usize,
    d: usize,
    /// Keys per panel of a tile ([`Keys::Packed`]).
    pub panel: usize,
    /// Per key head `b·Hkv + kvh`, set once it is packed ([`PackedK::lazy`]); empty when every
    /// head was packed on construction.
    ready: Vec<std::sync::OnceLock<()>>,
    /// V copied in column panels (`[B·Hkv][panels][Nk][width]`), with the panels' width and
    /// stride (`PackedK::new` only): [`V_PANEL`]-wide panels when Dv > 64, else whole rows on
    /// cache lines (`width` = Dv rounded up to 16) when V's own rows do not start on them. The
    /// P·V micro-kernel loads V as whole vectors, and a vector straddling two lines costs two.
    v: Option<(Buffer, usize, usize)>,
}

// SAFETY: `base` points into the owned buffer. Its elements are written only by `new` before
// the value is shared, or by `head` under that head's OnceLock, for that head's region alone,
// which no reader touches before the lock is set (readers call `head` first).
unsafe impl Send for PackedK {}
unsafe impl Sync for PackedK {}

/// Writes rows `j0..j0 + w` of `view[b, h]` transposed into `dst` as `[width][ld]`, columns
/// `w..ld` zeroed: a Kᵀ (or Vᵀ) tile whose rows the GEMM streams as contiguous vectors.
pub(crate) fn pack_transposed(
    view: &View,
    (b, h): (usize, usize),
    (j0, w): (usize, usize),
    ld: usize,
    dst: &mut [f32],
    kern: &Kernels,
) {
    let (data, st, width) = (view.data(), view.strides(), view.shape()[3]);
    assert!(w <= ld && dst.len() >= width * ld);
    if w == 0 {
        dst[..width * ld].fill(0.0);
        return;
    }
    if st[3] == 1 {
        let src = &data[view.offset(b, h, j0, 0)..];
        assert!(src.len() >= (w - 1) * st[2] + width);
        // SAFETY: just checked: src holds w rows of `width` floats at stride st[2]; dst holds
        // `width` rows of ld ≥ w floats.
        unsafe {
            (kern.transpose)(&Transpose {
                src: src.as_ptr(),
                lds: st[2],
                rows: w,
                cols: width,
                dst: dst.as_mut_ptr(),
                ldd: ld,
            })
        }
    } else {
        for c in 0..w {
            let o = view.offset(b, h, j0 + c, 0);
            for e in 0..width {
                dst[e * ld + c] = data[o + e * st[3]];
            }
        }
    }
    for e in 0..width {
        dst[e * ld + w..(e + 1) * ld].fill(0.0);
    }
}

/// V of every key head copied into column panels (see `PackedK::v`), with their width and
/// stride: f32 V with a unit feature stride, in panels of [`V_PANEL`] when Dv > 64, else when its
/// rows do not start cache lines; `None` otherwise (f16 V, or V gathered per tile anyway).
fn pack_v(p: &Problem) -> Option<(Buffer, usize, usize)> {
    let (st, base) = (p.v.strides(), p.v.data().as_ptr() as usize);
    // Every row starts a line when the data does and every stride that reaches a row is a
    // whole number of lines (16 floats).
    let on_lines = base.is_multiple_of(64) && st[..3].iter().all(|s| s.is_multiple_of(16));
    let in_panels = p.dv > 64;
    if p.half_kv.is_some() || st[3] != 1 || (on_lines && !in_panels) {
        return None;
    }
    let width = if in_panels {
        V_PANEL
    } else {
        p.dv.next_multiple_of(16)
    };
    let panels = p.dv.div_ceil(width);
    let stride = p.nk * width;
    let mut buf = Buffer::uninit(p.b * p.hkv * panels * stride); //  (B·Hkv, panels, Nk, width)
    buf.par_chunks_mut(stride)
        .enumerate()
        .for_each(|(idx, dst)| {
            let (bh, q) = (idx / panels, idx % panels);
            let (b, kvh) = (bh / p.hkv, bh % p.hkv);
            let (c0, c1) = (q * width, ((q + 1) * width).min(p.dv));
            for (j, row) in dst.chunks_mut(width).enumerate() {
                let o = p.v.offset(b, kvh, j, 0);
                row[..c1 - c0].copy_from_slice(&p.v.data()[o + c0..o + c1]);
            }
        });
    Some((buf, width, stride))
}

impl PackedK {
    pub fn new(p: &Problem) -> Self {
        let mut pk = Self::lazy(p, BC);
        let (tiles, stride) = (pk.tiles, panel_stride(p.d, BC));
        // SAFETY: `base` addresses the whole buffer, which nothing else references yet.
        let all = unsafe { std::slice::from_raw_parts_mut(pk.base, pk.len) };
        all.par_chunks_mut(stride)
            .enumerate()
            .for_each_init(Vec::new, |rows, (idx, dst)| {
                let (bh, t) = (idx / tiles, idx % tiles);
                let keys = (t * BC, BC.min(p.nk - t * BC));
                pack_k(p, (bh / p.hkv, bh % p.hkv), keys, BC, dst, rows);
            });
        pk.ready.clear();
        pk.v = pack_v(p);
        pk
    }

    /// Rows `j0..` of V of `(b, kvh)` from the copy in panels, if there is one.
    pub fn v_rows(&self, p: &Problem, (b, kvh): (usize, usize), j0: usize) -> Option<VRows> {
        let (buf, width, stride) = self.v.as_ref()?;
        let head = (b * p.hkv + kvh) * p.dv.div_ceil(*width) * stride;
        Some(VRows::Panels(
            buf[head + j0 * width..].as_ptr(),
            *width,
            *stride,
        ))
    }

    /// Room for every key head, in panels of `panel` keys (`BC`, or the lanes of a vector:
    /// [`Keys::Packed`]); each head is packed by the first [`PackedK::head`] call for it, by
    /// the task that needs it, just before it reads it.
    pub fn lazy(p: &Problem, panel: usize) -> Self {
        let tiles = p.nk.div_ceil(BC);
        let heads = p.b * p.hkv;
        let len = heads * tiles * BC / panel * panel_stride(p.d, panel);
        let mut data = Buffer::uninit(len);
        Self {
            base: data.as_mut_ptr(),
            len,
            _data: data,
            tiles,
            d: p.d,
            panel,
            ready: (0..heads).map(|_| std::sync::OnceLock::new()).collect(),
            v: None,
        }
    }

    /// Packs key head `b·Hkv + kvh` of a [`PackedK::lazy`] copy if no task has yet (one
    /// thread packs, any other caller for that head waits); every head of an eager copy is.
    pub fn head(&self, p: &Problem, (b, kvh): (usize, usize)) {
        let Some(ready) = self.ready.get(b * p.hkv + kvh) else {
            return;
        };
        ready.get_or_init(|| {
            let (per, stride) = (BC / self.panel, panel_stride(self.d, self.panel));
            let len = self.tiles * per * stride;
            // SAFETY: head (b, kvh)'s region of the buffer, written here under its lock and
            // read by no one before the lock is set.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(self.base.add((b * p.hkv + kvh) * len), len)
            };
            let mut rows = Vec::new();
            for (t, dst) in dst.chunks_mut(stride).enumerate() {
                let j0 = (t * self.panel).min(p.nk);
                let keys = (j0, self.panel.min(p.nk - j0));
                pack_k(p, (b, kvh), keys, self.panel, dst, &mut rows);
            }
        });
    }

    pub fn tile(&self, b: usize, hkv: usize, hkvs: usize, j0: usize) -> *const f32 {
        let idx = (b * hkvs + hkv) * self.tiles + j0 / BC;
        let off = idx * BC / self.panel * panel_stride(self.d, self.panel);
        assert!(off < self.len, "tile {idx} outside the packed copy");
        self.base.wrapping_add(off).cast_const()
    }
}

/// Floats from one panel of a packed Kᵀ tile to the next: `D × panel`, and for panels narrower
/// than the tile one cache line more, so that the vectors of one row of Kᵀ, one per panel, do
/// not all fall in one set of the 8-way L1 (panels of 4 KiB would put them 4 KiB apart).
pub(crate) fn panel_stride(d: usize, panel: usize) -> usize {
    if panel == BC {
        d * BC
    } else {
        d * panel + 16
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
            bits: crate::pattern::ones(w as u32),
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
    let mut area = 0;
    for (g, hull) in t.hulls[..rows.div_ceil(GROUP)].iter_mut().enumerate() {
        let group = &t.spans[g * GROUP..((g + 1) * GROUP).min(rows)];
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
        t.hulls[..rows.div_ceil(GROUP)].fill((0, w));
    }
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
            })
        }
    }
    Some(ragged)
}

impl Scratch {
    /// The tile buffers for query rows at `q` (row stride `q_rs`, unit column stride), for tile
    /// `u` of a run, whose scores start at column `col`.
    fn tile_bufs(&mut self, (q, q_rs): (*const f32, usize), u: usize, col: usize) -> TileBufs<'_> {
        TileBufs {
            q,
            q_rs,
            s: &mut self.s[col..],
            lds: SW,
            spans: &mut self.spans[u * BR..],
            hulls: &mut self.hulls[u * NG..],
            kbuf: &mut self.kbuf,
            wide: &mut self.wide,
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
    fn row(&self, b: usize, h: usize, i: usize) -> Option<(f32, f32, &'a [f32])> {
        let l = self.l.data()[self.l.offset(b, h, i, 0)];
        (l > 0.0).then(|| {
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
            Keys::Packed(pk.tile(b, kvh, p.hkv, j0), pk.panel)
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
        if l > 0.0 {
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
/// `col`; then O ← alpha·O + T. Each output sums its keys in runs of at most [`SW`], not as one
/// chain over every key.
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
    // The first product is O itself (O is 0 and alpha multiplies nothing).
    let fresh = std::mem::replace(&mut scr.fresh, false);
    for (g, &(a, e)) in hulls.iter().enumerate() {
        let (r0, m) = (g * size, size.min(rows - g * size));
        let t = if fresh { &mut scr.o } else { &mut scr.pv };
        if a >= e {
            t[r0 * dv..(r0 + m) * dv].fill(0.0);
            continue;
        }
        let (a_ptr, c) = (
            scr.s[r0 * SW + col + a..].as_ptr(),
            t[r0 * dv..].as_mut_ptr(),
        );
        // SAFETY: P is rows × (col + e) at stride SW in scr.s, V holds the rows of score
        // columns col.. at stride ldv, T is rows × Dv in scr.pv (or scr.o); rows r0..r0 + m
        // and columns col + a..col + e lie inside them.
        unsafe {
            match vr {
                VRows::F32(vp, ldv) => (kern.gemm)(&pv_gemm(
                    (m, dv, e - a),
                    a_ptr,
                    (vp.add(a * ldv), ldv, kern.lanes),
                    c,
                )),
                VRows::F16(vp, ldv) => (kern.gemm_f16)(&pv_gemm(
                    (m, dv, e - a),
                    a_ptr,
                    (vp.add(a * ldv), ldv, kern.lanes),
                    c,
                )),
                VRows::Panels(vp, width, stride) => {
                    // Each panel's columns of T (row stride Dv) from that panel's rows.
                    for (q, c0) in (0..dv).step_by(width).enumerate() {
                        let g = pv_gemm((m, dv, e - a), a_ptr, (vp, width, kern.lanes), c);
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
    if fresh {
        return;
    }
    for r in 0..rows {
        // SAFETY: row r of scr.o and of scr.pv hold dv elements each.
        unsafe {
            (kern.scale_add)(
                scr.o[r * dv..].as_mut_ptr(),
                scr.pv[r * dv..].as_ptr(),
                dv,
                scr.alpha[r],
            )
        };
    }
}

/// `C (m × n) = P·V` over `k` keys: P at row stride [`SW`], V's rows (contiguous, `lanes` per
/// vector) at stride `ldv` as f32 or f16, C at row stride `n`.
fn pv_gemm<E>(
    (m, n, k): (usize, usize, usize),
    p: *const f32,
    (v, ldv, lanes): (*const E, usize, usize),
    c: *mut f32,
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
        let m_new = m_old.max(tile_max);
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
fn to_lse(scr: &mut Scratch, rows: usize) {
    for (m, &l) in scr.m[..rows].iter_mut().zip(&scr.l[..rows]) {
        if l > 0.0 {
            *m += l.ln();
        }
    }
}

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

/// Exact attention: writes $O = \mathrm{softmax}(\text{scale}\cdot QK^\top + \dots)V$ into `out`
/// (`[B, Hq, Nq, Dv]`) and, if given, the natural-log log-sum-exp of each row into `lse`
/// (`B·Hq·Nq`, row-major), which [`backward`](crate::backward) needs.
///
/// `q` is `[B, Hq, Nq, D]`, `k` is `[B, Hkv, Nk, D]`, `v` is `[B, Hkv, Nk, Dv]`, any strides; query
/// head `h` reads key/value head `h / (Hq / Hkv)`. Memory beyond the outputs is O(Nk·D) for a packed
/// copy of K plus O(threads) scratch.
///
/// ```
/// use attentive::{forward, Causal, Options, View, ViewMut};
/// let (b, h, n, d) = (1, 2, 5, 4);
/// let q: Vec<f32> = (0..b * h * n * d).map(|x| (x as f32 * 0.37).sin()).collect();
/// let mut o = vec![0.0; b * h * n * d];
/// let mut lse = vec![0.0; b * h * n];
/// let qv = View::contiguous(&q, &[b, h, n, d]).unwrap();
/// let opts = Options::new().causal(Causal::TopLeft);
/// forward(qv, qv, qv, &opts, &mut ViewMut::contiguous(&mut o, [b, h, n, d]).unwrap(), Some(&mut lse))
///     .unwrap();
/// // The first query sees only the first key, so its output is that key's value.
/// assert_eq!(&o[..d], &q[..d]);
/// let s00 = q[..d].iter().map(|x| x * x).sum::<f32>() / 2.0;
/// assert!((lse[0] - s00).abs() < 1e-6);
/// ```
pub fn forward(
    q: View,
    k: View,
    v: View,
    opts: &Options,
    out: &mut ViewMut,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    if let Some(plan) = crate::residue::plan(opts) {
        return crate::residue::forward(plan, q, k, v, opts, out, lse);
    }
    run(&Problem::new(q, k, v, opts)?, out, lse)
}

/// [`forward`] with K and V stored as f16: a KV cache at half the memory.
///
/// Each tile's K and V rows are widened to f32 (exactly: every f16 is an f32) as the kernels
/// read them, and everything after is the f32 computation, so the result is bit for bit that of
/// [`forward`] on `k` and `v` widened to f32. (One exception: a lone dilated or strided pattern,
/// or a union of strided with windows and sinks, which [`forward`] splits over residue classes,
/// runs here through the block table: the same attention, summed in another order.) Takes every
/// option [`forward`] takes; shapes and strides as there.
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
        crate::problem::expect_len("lse", l.len(), p.b * p.hq * p.nq)?;
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
    crate::problem::expect_len("max", m.len(), p.b * p.hq * p.nq)?;
    crate::problem::expect_len("sum", l.len(), p.b * p.hq * p.nq)?;
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
    crate::problem::expect_shape("prior max", prior.m.shape(), stat_shape)?;
    crate::problem::expect_shape("prior sum", prior.l.shape(), stat_shape)?;
    crate::problem::expect_shape("prior output", prior.o.shape(), [p.b, p.hq, p.nq, p.dv])?;
    debug_assert_eq!(prior.o.strides()[3], 1, "prior rows are read as slices");
    if let Some(l) = lse.as_deref() {
        crate::problem::expect_len("lse", l.len(), rows)?;
    }
    let stats = lse.map_or(Stats::None, |l| Stats::Lse(RawSlice::new(l)));
    run_from(p, out.raw(), stats, Some(prior));
    Ok(())
}

/// Whether to pack all of Kᵀ before the tile loop. A packed tile is written once and read by
/// every query tile (of every query head of its group) whose band reaches it; packing each tile
/// on the fly into the L1-resident `Scratch::kbuf` instead costs one transpose per visit but no
/// write and re-read of a copy through memory. Measured at N = 8192, D = 64: on the fly is 6%
/// faster for a 128-key window (3 visits per tile), even at 8 visits, and 2% slower at 16.
fn pack_up_front(p: &Problem) -> bool {
    const MIN_VISITS: usize = 8;
    // Row spans' ends never decrease with the row, so a tile's first and last rows bound it.
    let visits: usize = (0..p.nq)
        .step_by(BR)
        .map(|i0| {
            let (a, _) = p.row_span(i0);
            let (_, e) = p.row_span((i0 + BR).min(p.nq) - 1);
            if a < e {
                e.div_ceil(BC) - a / BC
            } else {
                0
            }
        })
        .sum();
    visits * p.group >= MIN_VISITS * p.nk.div_ceil(BC)
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
            || Scratch::new(p),
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
                crate::residue::grow_class_buffers(p, steps, scr);
                for (u, &t) in tiles.iter().enumerate() {
                    let (i0, rows) = (t * BR, BR.min(p.nq - t * BR));
                    attend_rows(p, Some(&pk), (b, h), i0, rows, (0, p.nk), None, scr);
                    swap(scr, u);
                }
                crate::residue::class_tiles(p, &pk, (b, h), tiles, steps, scr);
                for (u, &t) in tiles.iter().enumerate() {
                    swap(scr, u);
                    emit(scr, (b, h), t * BR, BR.min(p.nq - t * BR));
                }
            },
        );
        return;
    }
    (0..p.b * p.hq * qt).into_par_iter().for_each_init(
        || Scratch::new(p),
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
            || Scratch::new(p),
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
        *x = if lp > 0.0 { lp * (mp - m).exp() } else { 0.0 };
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
        || Scratch::new(&p),
        |scr, (bh, t, dst)| {
            let (b, h) = (bh / p.hq, bh % p.hq);
            let i0 = t * BR;
            let rows = BR.min(p.nq - i0);
            let q = rows_ptr(&p.q, (b, h), i0, rows, &mut scr.q);
            for j0 in (0..p.nk).step_by(BC) {
                let w = BC.min(p.nk - j0);
                let Some(blk) = p.block((b, h), t, j0 / BC) else {
                    continue;
                };
                let bufs = scr.tile_bufs(q, 0, 0);
                if score_tile(
                    &p,
                    Keys::unpacked(&p),
                    (b, h),
                    i0,
                    rows,
                    j0,
                    (0, p.nk),
                    blk,
                    bufs,
                )
                .is_none()
                {
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
