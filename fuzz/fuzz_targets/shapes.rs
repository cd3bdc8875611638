//! The engine's entry points on shapes of any size up to 2³² a side (zero included), over
//! broadcast inputs (zero strides: a view of more elements than the address space costs a few
//! bytes), and over arbitrary strides of Q.
//!
//! Each call returns an error or a result; products of sizes never overflow unchecked. Where the
//! engine would allocate more than the memory available (`ATTENTIVE_MAX_MEMORY` in
//! `fuzz/run.sh`), it must refuse with `OutOfMemory`. Where a call is small enough to run, its
//! result is checked in closed form: every key scores the same, so each row that sees `c` keys
//! gives O = V, LSE = s + ln c, weights 1/c, dQ = dK = 0 and dV = the weight each key receives.
#![no_main]

use arbitrary::Arbitrary;
use attentive::{f16, AttnError, Causal, Options, View, ViewMut};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Call {
    /// b, hkv, group, nq, nk, each any size.
    dims: [u32; 5],
    /// d and dv (reduced below 20).
    d: u8,
    dv: u8,
    causal: u8,
    /// probabilities, forward, forward_half_kv or backward.
    entry: u8,
    /// Strides of Q over its few values, as given.
    q_strides: Option<[u64; 4]>,
}

const Q: f32 = 0.5;
const V: f32 = 0.25;
/// Elements (and multiply-adds) a call may take to run and be checked here: a few milliseconds.
const SMALL: u128 = 1 << 22;
/// Query rows a call may have to run here. Each costs a tile's fixed work, about 11 µs in the
/// fuzz build (coverage tracing on every comparison of the GEMM's loops; 0.14 µs without it):
/// 2.5M heads of one query took 28 s there and 0.35 s in a release build.
const ROWS: u128 = 1 << 16;

/// Keys row `i` of `nq` sees among `nk`.
fn seen(causal: Option<Causal>, i: usize, nq: usize, nk: usize) -> usize {
    match causal {
        None => nk,
        Some(Causal::TopLeft) => (i + 1).min(nk),
        Some(Causal::BottomRight) => (i + nk + 1).saturating_sub(nq).min(nk),
    }
}

fn close(got: f32, want: f64, what: &str) {
    let tol = 8.0 * f32::EPSILON as f64 * want.abs().max(1.0);
    assert!(
        (got as f64 - want).abs() <= tol,
        "{what}: {got} where {want} is due"
    );
}

fuzz_target!(|c: Call| {
    let [b, hkv, group, nq, nk] = c.dims.map(|x| x as usize);
    let (d, dv) = (c.d as usize % 20, c.dv as usize % 20);
    let Some(hq) = hkv.checked_mul(group) else {
        return;
    };
    // Elements of a shape, saturating (four sides of 2⁶⁴ pass u128).
    let size = |s: [usize; 4]| s.iter().fold(1u128, |a, &x| a.saturating_mul(x as u128));
    let (qshape, kshape, vshape) = ([b, hq, nq, d], [b, hkv, nk, d], [b, hkv, nk, dv]);
    let oshape = [b, hq, nq, dv];
    let (qbuf, kbuf, vbuf) = (vec![Q; 64], vec![Q; d.max(1)], vec![V; dv.max(1)]);
    let qv = match c.q_strides {
        Some(s) => View::new(&qbuf, qshape, s.map(|x| x as usize)),
        None => View::new(&qbuf, qshape, [0, 0, 0, 1]),
    };
    let (Ok(qv), Ok(kv), Ok(vv)) = (
        qv,
        View::new(&kbuf, kshape, [0, 0, 0, 1]),
        View::new(&vbuf, vshape, [0, 0, 0, 1]),
    ) else {
        return;
    };
    let mut opts = Options::new();
    opts.causal = match c.causal % 3 {
        1 => Some(Causal::TopLeft),
        2 => Some(Causal::BottomRight),
        _ => None,
    };
    let causal = opts.causal;
    let score = Q as f64 * Q as f64 * d as f64 / (d as f64).sqrt();
    // Query rows, and the multiply-adds a forward takes over them.
    let rows = size([b, hq, nq, 1]);
    let work = size([b, hq, nq, nk]).saturating_mul((d + dv + 1) as u128);
    match c.entry % 4 {
        0 => {
            let bytes = size([b, hq, nq, nk]).saturating_mul(4);
            let limit = attentive::available_memory().map_or(u128::MAX, u128::from);
            if bytes <= limit && (bytes / 4 > SMALL || rows > ROWS) {
                return; // allowed, and too slow to compute here
            }
            match attentive::probabilities(qv, kv, &opts) {
                Err(AttnError::OutOfMemory { bytes: b, .. }) => assert!(b > limit, "{b} refused"),
                Err(_) => {}
                Ok(p) => {
                    assert!(bytes <= limit, "{bytes} bytes allowed past {limit}");
                    assert_eq!(p.len() as u128, bytes / 4);
                    for (r, row) in p.chunks(nk.max(1)).enumerate() {
                        let c = seen(causal, r % nq.max(1), nq, nk);
                        let nonzero: Vec<f32> = row.iter().copied().filter(|&x| x != 0.0).collect();
                        assert_eq!(nonzero.len(), c, "weights of a row that sees {c} keys");
                        nonzero.iter().for_each(|&x| close(x, 1.0 / c as f64, "P"));
                    }
                }
            }
        }
        entry => {
            // The forward (entry 1, or 2 with f16 K/V), checked; entry 3 goes on to the backward.
            let grads = entry == 3;
            let outputs = size(oshape).max(if grads { size(qshape) } else { 0 });
            let outputs = outputs.max(if grads {
                size(kshape).max(size(vshape))
            } else {
                0
            });
            if outputs > SMALL || rows > ROWS || work > SMALL >> u32::from(grads) {
                return;
            }
            let (mut o, mut lse) = (
                vec![f32::NAN; size(oshape) as usize],
                vec![f32::NAN; rows as usize],
            );
            let Ok(mut ov) = ViewMut::contiguous(&mut o, oshape) else {
                return;
            };
            let r = if entry == 2 {
                let k16 = vec![f16::from_f32(Q); kbuf.len()];
                let v16 = vec![f16::from_f32(V); vbuf.len()];
                let (Ok(k16), Ok(v16)) = (
                    View::new(&k16, kshape, [0, 0, 0, 1]),
                    View::new(&v16, vshape, [0, 0, 0, 1]),
                ) else {
                    return;
                };
                attentive::forward_half_kv(qv, k16, v16, &opts, &mut ov, Some(&mut lse))
            } else {
                attentive::forward(qv, kv, vv, &opts, &mut ov, Some(&mut lse))
            };
            if r.is_err() {
                return;
            }
            for (r, (orow, &l)) in o.chunks(dv.max(1)).zip(&lse).enumerate() {
                let c = seen(causal, r % nq.max(1), nq, nk);
                let want = if c == 0 { 0.0 } else { V as f64 };
                orow.iter().for_each(|&x| close(x, want, "O"));
                if c == 0 {
                    assert!(l == f32::NEG_INFINITY, "LSE {l} of a row that sees no key");
                } else {
                    close(l, score + (c as f64).ln(), "LSE");
                }
            }
            if !grads {
                return;
            }
            let d_o = vec![1.0f32; dv.max(1)];
            let n = |s: [usize; 4]| size(s) as usize;
            let (mut dq, mut dk, mut dvv) = (
                vec![f32::NAN; n(qshape)],
                vec![f32::NAN; n(kshape)],
                vec![f32::NAN; n(vshape)],
            );
            let (Ok(ov), Ok(dov)) = (
                View::contiguous(&o, &oshape),
                View::new(&d_o, oshape, [0, 0, 0, 1]),
            ) else {
                return;
            };
            let (Ok(mut gq), Ok(mut gk), Ok(mut gv)) = (
                ViewMut::contiguous(&mut dq, qshape),
                ViewMut::contiguous(&mut dk, kshape),
                ViewMut::contiguous(&mut dvv, vshape),
            ) else {
                return;
            };
            let r =
                attentive::backward(qv, kv, vv, ov, &lse, dov, &opts, &mut gq, &mut gk, &mut gv);
            if r.is_err() {
                return;
            }
            // dP = dO·V = D on every key: dS = P(dP − D) = 0, up to the rounding of the terms
            // scale·(|dP| + |D|)·|k| (dQ: over weights summing to 1; dK: to at most nq·group).
            let terms =
                8.0 * f32::EPSILON as f64 * 2.0 * dv as f64 * (V * Q) as f64 / (d as f64).sqrt();
            dq.iter()
                .for_each(|x| assert!((x.abs() as f64) <= terms, "dQ {x}"));
            let terms = terms * (nq * group) as f64;
            dk.iter()
                .for_each(|x| assert!((x.abs() as f64) <= terms, "dK {x}"));
            // Key j receives Σ_i 1/c_i over the rows that see it, in each of its group's heads.
            for (r, row) in dvv.chunks(dv.max(1)).enumerate() {
                let j = r % nk.max(1);
                let want: f64 = (0..nq)
                    .map(|i| (i, seen(causal, i, nq, nk)))
                    .filter(|&(i, c)| match causal {
                        None => true,
                        Some(Causal::TopLeft) => j <= i,
                        Some(Causal::BottomRight) => j + nq <= i + nk && c > 0,
                    })
                    .map(|(_, c)| 1.0 / c as f64)
                    .sum::<f64>()
                    * group as f64;
                row.iter().for_each(|&x| {
                    let tol = 8.0 * f32::EPSILON as f64 * (nq * group).max(1) as f64;
                    assert!(
                        (x as f64 - want).abs() <= tol * want.max(1.0),
                        "dV {x} for {want}"
                    );
                });
            }
        }
    }
});
