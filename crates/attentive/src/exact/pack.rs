//! How the kernel reads K and V: rows through any strides, K packed once into transposed
//! panels (`Kᵀ`, tile by tile) and V into panels, or gathered per tile when packing would cost
//! more than it saves.

use crate::amx;
use crate::exact::problem::Problem;
use crate::simd::{Kernels, Transpose};
use crate::tile::{BC, BR};
use crate::view::View;
use crate::workspace::{Buffer, HugeVec, Pool, Pooled, HUGE_PAGE};
use half::f16;
use rayon::prelude::*;

/// At most this many queries take the decode path (no Kᵀ packing, keys split across threads):
/// below it, packing K would cost more memory traffic than the attention itself.
pub(crate) const DECODE_MAX_Q: usize = 16;

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

/// Copies made by [`huge_copy`], kept between calls up to [`KEEP_COPY`] bytes each.
static COPIES: Pool<Option<HugeVec<f32>>, usize> = Pool::new();
/// The largest copy kept between calls (32 MiB: Q of 8 heads × 8192 rows × D = 128). Larger
/// ones are made per call, where the backward's N² work dwarfs their cost.
const KEEP_COPY: usize = 32 << 20;

/// A contiguous copy of a `[B, H, N, D]` view on 2 MiB pages ([`HugeVec`]).
pub(crate) struct HugeCopy {
    copy: Option<Pooled<'static, Option<HugeVec<f32>>, usize>>,
    shape: [usize; 4],
}

impl HugeCopy {
    /// The copy, as a view of the original's shape.
    pub fn view(&self) -> View<'_> {
        let data = self.copy.as_ref().and_then(|c| c.as_deref()).unwrap_or(&[]);
        View::new(
            data,
            self.shape,
            crate::view::contiguous_strides(self.shape),
        )
        .expect("a copy holds its shape")
    }
}

impl Drop for HugeCopy {
    fn drop(&mut self) {
        if let Some(c) = self.copy.take() {
            if crate::view::elements(self.shape).is_none_or(|n| n > KEEP_COPY / 4) {
                c.discard();
            }
        }
    }
}

/// `view` copied onto 2 MiB pages, when it spans at least one such page; `None` for smaller
/// views, or where the memory is refused (the caller then reads the view in place).
///
/// The backward reads every query tile of a head once per key tile. From a caller's 4 KiB
/// pages those reads miss the TLB page after page; from 2 MiB pages they do not. Measured on an
/// Intel Xeon, 2 threads, N = 2048, D = 64, 8 heads: the backward took 101.9 ms with Q and dO
/// in NumPy's arrays and 92.2 ms with them on 2 MiB pages (medians of 12, alternating). The copy
/// costs one pass over Q and dO; its buffer is kept for the next call.
pub(crate) fn huge_copy(view: &View) -> Option<HugeCopy> {
    let shape = view.shape();
    let [_, h, n, d] = shape;
    let len = crate::view::elements(shape)?;
    if len < HUGE_PAGE / std::mem::size_of::<f32>() {
        return None;
    }
    let mut copy = COPIES.take(len, || HugeVec::zeroed(len).ok());
    let Some(dst) = copy.as_deref_mut() else {
        copy.discard();
        return None;
    };
    dst.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(bh, rows)| {
            gather_rows(view, (bh / h, bh % h), 0, n, rows);
        });
    Some(HugeCopy {
        copy: Some(copy),
        shape,
    })
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
    /// V of one key head as bf16 parts for the AMX product ([`Split`]), and the key of the
    /// first score column.
    Split(*const u16, usize),
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

/// Whether to pack all of Kᵀ before the tile loop. A packed tile is written once and read by
/// every query tile (of every query head of its group) whose band reaches it; packing each tile
/// on the fly into the L1-resident `Scratch::kbuf` instead costs one transpose per visit but no
/// write and re-read of a copy through memory. Measured at N = 8192, D = 64: on the fly is 6%
/// faster for a 128-key window (3 visits per tile), even at 8 visits, and 2% slower at 16.
pub(crate) fn pack_up_front(p: &Problem) -> bool {
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

/// Whether the forward's scores come from the AMX products: where the tiled pass (more than
/// [`DECODE_MAX_Q`] queries) packs K up front ([`PackedK::new`], on [`Problem::amx`]). The
/// backward and `probabilities` recompute the scores the same way wherever this holds, so that
/// their weights `exp(S − LSE)` see the bits the forward's LSE was summed from.
pub(crate) fn split_scores(p: &Problem) -> bool {
    p.amx && p.nq > DECODE_MAX_Q && p.class_keys.is_none() && pack_up_front(p)
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
    /// K and V as bf16 parts instead, for the AMX products ([`Problem::amx`]).
    split: Option<Split>,
}

/// K and V of every key head as the three bf16 parts the AMX products read (see `amx`): per
/// key head and tile of `BC` keys, Kᵀ's parts ([`k_part`] bf16 each, side by side); per key
/// head, V's parts ([`v_part`] each), keys padded to whole tiles.
pub(crate) struct Split {
    k: Buffer,
    v: Buffer,
}

/// bf16 of one part of a tile's Kᵀ: `BC / 16` column tiles of `d_pad / 32` steps.
pub(crate) fn k_part(d: usize) -> usize {
    BC / amx::TILE * k_cols(d)
}

/// bf16 from one column tile of a Kᵀ part to the next.
pub(crate) fn k_cols(d: usize) -> usize {
    d.div_ceil(amx::STEP) * amx::B_TILE
}

/// bf16 from one column tile of a V part to the next: every key of a head, padded to tiles.
pub(crate) fn v_cols(nk: usize) -> usize {
    nk.div_ceil(BC) * BC / amx::STEP * amx::B_TILE
}

/// bf16 of one part of a key head's V.
pub(crate) fn v_part(p: &Problem) -> usize {
    p.dv.next_multiple_of(2 * amx::TILE) / amx::TILE * v_cols(p.nk)
}

impl Split {
    fn new(p: &Problem) -> Self {
        let tiles = p.nk.div_ceil(BC);
        let (k_tile, v_head) = (3 * k_part(p.d), 3 * v_part(p));
        let heads = p.b * p.hkv;
        // bf16 in pairs per f32 of the buffers.
        let mut k = Buffer::uninit(heads * tiles * k_tile / 2);
        let mut v = Buffer::uninit(heads * v_head / 2);
        let (kp, vp) = (k.as_mut_ptr() as usize, v.as_mut_ptr() as usize);
        let dv_pad = p.dv.next_multiple_of(2 * amx::TILE);
        (0..heads * tiles).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(kbuf, vbuf), idx| {
                let (bh, t) = (idx / tiles, idx % tiles);
                let (b, kvh) = (bh / p.hkv, bh % p.hkv);
                let (j0, w) = (t * BC, BC.min(p.nk - t * BC));
                kbuf.resize(BC * p.d, 0.0);
                vbuf.resize(BC * p.dv, 0.0);
                let (kr, ldk) = kv_rows(p, Kv::K, (b, kvh), j0, w, kbuf);
                let (vr, ldv) = kv_rows(p, Kv::V, (b, kvh), j0, w, vbuf);
                // SAFETY: kv_rows gives w rows of D (Dv) floats at stride ldk (ldv). Tile t of
                // head bh owns bf16 [idx·k_tile, (idx + 1)·k_tile) of K's parts, and steps
                // 2t, 2t + 1 of every column tile of its head's V parts: disjoint regions.
                unsafe {
                    let kd = (kp as *mut u16).add(idx * k_tile);
                    amx::pack_transposed(kr, (w, p.d, ldk), BC / amx::TILE, k_part(p.d), kd);
                    let vd = (vp as *mut u16).add(bh * v_head + j0 / amx::STEP * amx::B_TILE);
                    let cols = (v_cols(p.nk), v_part(p));
                    amx::pack_rows(vr, (w, p.dv, ldv), (BC, dv_pad), cols, vd);
                }
            },
        );
        Self { k, v }
    }
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
        if p.amx {
            let mut pk = Self::lazy_in(p, BC, 0);
            pk.ready.clear();
            pk.split = Some(Split::new(p));
            return pk;
        }
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
        if let Some(sp) = &self.split {
            let head = (b * p.hkv + kvh) * 3 * v_part(p);
            return Some(VRows::Split(
                sp.v.as_ptr().cast::<u16>().wrapping_add(head),
                j0,
            ));
        }
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
        let len = p.b * p.hkv * tiles * BC / panel * panel_stride(p.d, panel);
        Self::lazy_in(p, panel, len)
    }

    fn lazy_in(p: &Problem, panel: usize, len: usize) -> Self {
        let tiles = p.nk.div_ceil(BC);
        let heads = p.b * p.hkv;
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
            split: None,
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

    /// The bf16 parts of Kᵀ of keys `j0..` (a tile start) of key head `hkv` of batch `b`,
    /// when the copy is [`Split`].
    pub fn split_k(&self, b: usize, hkv: usize, hkvs: usize, j0: usize) -> Option<*const u16> {
        let sp = self.split.as_ref()?;
        let idx = (b * hkvs + hkv) * self.tiles + j0 / BC;
        let at = idx * 3 * k_part(self.d);
        assert!(at < sp.k.len() * 2, "tile {idx} outside the split copy");
        Some(sp.k.as_ptr().cast::<u16>().wrapping_add(at))
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
