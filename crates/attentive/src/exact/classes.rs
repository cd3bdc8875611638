//! Class keys: the keys a strided pattern adds to a row, one stride apart, attended for
//! [`CLASS_TILES`] query tiles at once and joined to the rows' other keys.

use super::kernel::*;
use super::pack::*;
use crate::exact::problem::{ClassSteps, Problem};
use crate::simd::{ClassKeys, Transpose, CLASS_TILES};
use crate::tile::BR;
use crate::workspace::AVec;

/// Sizes the class-key buffers of `scr` for `p` (grown once per thread).
pub(crate) fn grow_class_buffers(p: &Problem, steps: ClassSteps, scr: &mut Scratch) {
    let (lanes, d, dv) = (p.kern.lanes, p.d, p.dv);
    let grow = |x: &mut AVec, n: usize| {
        if x.len() < n {
            x.resize(n, 0.0);
        }
    };
    grow(&mut scr.cls, CLASS_TILES * class_cap(p, steps) * lanes); //     (CT, cap, lanes)
    grow(&mut scr.qt, CLASS_TILES * d * lanes); //                        (CT, D, lanes)
    for u in 0..CLASS_TILES {
        grow(&mut scr.cls_m[u], BR);
        grow(&mut scr.cls_l[u], BR);
        grow(&mut scr.cls_o[u], BR * dv); //                              (BR, Dv)
    }
}

/// Steps a row can have: at most Nk/stride + 1 full ones, and the partial one.
fn class_cap(p: &Problem, steps: ClassSteps) -> usize {
    p.nk / steps.stride + 2
}

/// The class keys ([`Problem::class_keys`]) of the query tiles `tiles` of `(b, h)` (at most
/// [`CLASS_TILES`], one stride apart), a group of `lanes` rows of every tile at a time
/// ([`ClassKeys`]), joined to the attention of the rows over their other keys, which
/// `scr.cls_m[u]`, `scr.cls_l[u]` and `scr.cls_o[u]` hold for tile `u` (max, sum, normalised
/// output) and hold over both key sets on return. Needs Q's last stride to be 1, `Nk − Nq` a
/// multiple of the lanes, the stride a multiple of the tile, and the buffers sized by
/// [`grow_class_buffers`].
pub(crate) fn class_tiles(
    p: &Problem,
    packed: &PackedK,
    (b, h): (usize, usize),
    tiles: &[usize],
    steps: ClassSteps,
    scr: &mut Scratch,
) {
    const CT: usize = CLASS_TILES;
    let (lanes, d, dv, kern) = (p.kern.lanes, p.d, p.dv, p.kern);
    let kvh = h / p.group;
    let cap = class_cap(p, steps);
    let count = tiles.len();
    let v = &p.v.data()[p.v.offset(b, kvh, 0, 0)..];
    let q = &p.q.data()[p.q.offset(b, h, 0, 0)..];
    let q_rs = p.q.strides()[2];
    for g0 in (0..BR).step_by(lanes) {
        let mut call = ClassKeys {
            qt: [std::ptr::null(); CT],
            first: [cap; CT],
            rows: [0; CT],
            d,
            kt: packed.tile(b, kvh, p.hkv, 0),
            ldk: packed.panel,
            tile: super::pack::panel_stride(d, packed.panel),
            v: v.as_ptr(),
            ldv: p.v.strides()[2],
            dv,
            j0: 0,
            stride: steps.stride,
            full: 0,
            key_lo: steps.key_lo,
            scale: p.scale,
            s: scr.cls.as_mut_ptr(),
            cap,
            m: [std::ptr::null_mut(); CT],
            l: [std::ptr::null_mut(); CT],
            o: [std::ptr::null_mut(); CT],
        };
        for u in 0..CT {
            let qt = &mut scr.qt[u * d * lanes..(u + 1) * d * lanes];
            let i0 = tiles.get(u).map_or(p.nq, |&t| t * BR + g0);
            let n = lanes.min(p.nq.saturating_sub(i0));
            if n < lanes {
                qt.fill(0.0);
            }
            if n > 0 {
                // SAFETY: Q's rows i0..i0 + n of (b, h) hold D floats each (unit last stride,
                // checked by the plan); qt holds D × lanes.
                unsafe {
                    (kern.transpose)(&Transpose {
                        src: q[(i0 * q_rs)..].as_ptr(),
                        lds: q_rs,
                        rows: n,
                        cols: d,
                        dst: qt.as_mut_ptr(),
                        ldd: lanes,
                    })
                };
                call.rows[u] = n;
                call.first[u] = count - 1 - u;
            }
            call.qt[u] = qt.as_ptr();
            call.m[u] = scr.cls_m[u][g0..].as_mut_ptr();
            call.l[u] = scr.cls_l[u][g0..].as_mut_ptr();
            call.o[u] = scr.cls_o[u][g0 * dv..].as_mut_ptr();
        }
        // Lane 0's key at the last tile's first step, and how many steps have every lane's key.
        let pos = (tiles[count - 1] * BR + g0) as i64 + p.off;
        call.j0 = pos - (steps.k_min * steps.stride) as i64;
        let lo = steps.key_lo as i64;
        if call.j0 >= lo {
            call.full = ((call.j0 - lo) as usize) / steps.stride + 1;
        }
        // SAFETY: the packed tiles hold every key of (b, kvh) and V its nk rows of dv floats
        // (unit last stride, checked by the plan); the steps' keys lie in 0..nk (from key_lo
        // ≥ 0 up to a position minus 2·stride, where a stride is at least one tile; the partial
        // step lane by lane). scr.cls holds CT × cap steps, and the class slots each group's
        // lanes and rows.
        unsafe { (kern.class_keys)(&call) };
    }
}
