//! NaN and ±∞ in q, k and v: the rule (see the crate's front page), on every instruction set
//! and every path (tiled, decode, residue classes, f16 K/V), against the f64 oracle, which
//! computes the formulas in IEEE arithmetic over the keys each row sees.
//!
//! Where the oracle's output is NaN or ±∞ the kernel's is non-finite too; where the oracle's is
//! finite the kernel's is finite and within the accuracy rule (here: 1e-4 of the largest value),
//! except that a non-finite value in v of a key a row does not see may reach it when the two
//! share a tile, and that ±∞ times a weight of 0 is NaN in the gradients, both as in PyTorch's
//! math path (0·NaN = 0·∞ = NaN). Never a finite wrong number.

use attentive::{f16, forward, forward_half_kv, reference, Causal, Isa, Options, View, ViewMut};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Checks `got` against the oracle `want` element by element; `hidden_v` allows the tile
/// exception (a non-finite v of an unseen key).
fn check(what: &str, got: &[f32], want: &[f64], hidden_v: bool) {
    let scale = want
        .iter()
        .filter(|x| x.is_finite())
        .fold(1.0f64, |a, x| a.max(x.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !w.is_finite() {
            assert!(!g.is_finite(), "{what}[{i}]: oracle {w}, kernel {g}");
        } else if g.is_finite() {
            assert!(
                ((g as f64) - w).abs() <= 1e-4 * scale,
                "{what}[{i}]: oracle {w}, kernel {g}"
            );
        } else {
            assert!(hidden_v, "{what}[{i}]: oracle {w}, kernel {g}");
        }
    }
}

#[test]
fn non_finite_inputs_reach_the_rows_that_see_them() {
    // (nq, nk, d): a decode, tiled problems with ragged edges, a long key range.
    let shapes = [
        (1, 100, 16),
        (1, 700, 64),
        (37, 100, 16),
        (130, 300, 64),
        (5, 513, 32),
    ];
    let causals = [None, Some(Causal::TopLeft), Some(Causal::BottomRight)];
    for isa in Isa::all_available() {
        for &(nq, nk, d) in &shapes {
            for causal in causals {
                for (t, tensor) in ["q", "k", "v"].iter().enumerate() {
                    for (vi, val) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
                        .iter()
                        .enumerate()
                    {
                        let (mut q, mut k, mut v) =
                            (values(nq * d, 1), values(nk * d, 2), values(nk * d, 3));
                        let rows = [nq, nk, nk][t];
                        let at = (rows * 2 / 3) * d + d / 2;
                        // A whole row poisoned for NaN; one element for ±∞.
                        let span = if vi == 0 {
                            at - d / 2..at - d / 2 + d
                        } else {
                            at..at + 1
                        };
                        match t {
                            0 => q[span].fill(*val),
                            1 => k[span].fill(*val),
                            _ => v[span].fill(*val),
                        }
                        let mut opts = Options::new().isa(isa);
                        opts.causal = causal;
                        let qv = View::contiguous(&q, &[1, 1, nq, d]).unwrap();
                        let kv = View::contiguous(&k, &[1, 1, nk, d]).unwrap();
                        let vv = View::contiguous(&v, &[1, 1, nk, d]).unwrap();
                        let want = reference::forward::<f64>(qv, kv, vv, &opts).unwrap();
                        let (mut o, mut lse) = (vec![0.0f32; nq * d], vec![0.0f32; nq]);
                        let mut ov = ViewMut::contiguous(&mut o, [1, 1, nq, d]).unwrap();
                        forward(qv, kv, vv, &opts, &mut ov, Some(&mut lse)).unwrap();
                        let what = format!("{isa:?} {nq}×{nk}×{d} {causal:?} {val} in {tensor}");
                        let hidden = t == 2 && causal.is_some();
                        check(&format!("O {what}"), &o, &want.o, hidden);
                        check(&format!("LSE {what}"), &lse, &want.lse, hidden);
                        // The backward from that output: a row's NaN reaches the gradients of
                        // what the row saw (with the same tile exception under a mask).
                        let d_o = values(nq * d, 4);
                        let dov = View::contiguous(&d_o, &[1, 1, nq, d]).unwrap();
                        let g = reference::backward::<f64>(qv, kv, vv, dov, &opts).unwrap();
                        let (mut dq, mut dk, mut dv) = (
                            vec![0.0f32; nq * d],
                            vec![0.0f32; nk * d],
                            vec![0.0f32; nk * d],
                        );
                        attentive::backward(
                            qv,
                            kv,
                            vv,
                            View::contiguous(&o, &[1, 1, nq, d]).unwrap(),
                            &lse,
                            dov,
                            &opts,
                            &mut ViewMut::contiguous(&mut dq, [1, 1, nq, d]).unwrap(),
                            &mut ViewMut::contiguous(&mut dk, [1, 1, nk, d]).unwrap(),
                            &mut ViewMut::contiguous(&mut dv, [1, 1, nk, d]).unwrap(),
                        )
                        .unwrap();
                        // ±∞ times a weight of 0 is NaN in the gradients' products, as in
                        // PyTorch; the oracle skips those terms.
                        let loose = causal.is_some() || vi > 0;
                        check(&format!("dQ {what}"), &dq, &g.dq, loose);
                        check(&format!("dK {what}"), &dk, &g.dk, loose);
                        check(&format!("dV {what}"), &dv, &g.dv, loose);
                        // f16 keys and values: ±∞ and NaN survive the conversion.
                        let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
                        let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                        let k16v = View::contiguous(&k16, &[1, 1, nk, d]).unwrap();
                        let v16v = View::contiguous(&v16, &[1, 1, nk, d]).unwrap();
                        let mut ov = ViewMut::contiguous(&mut o, [1, 1, nq, d]).unwrap();
                        forward_half_kv(qv, k16v, v16v, &opts, &mut ov, Some(&mut lse)).unwrap();
                        let k32: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
                        let v32: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
                        let want = reference::forward::<f64>(
                            qv,
                            View::contiguous(&k32, &[1, 1, nk, d]).unwrap(),
                            View::contiguous(&v32, &[1, 1, nk, d]).unwrap(),
                            &opts,
                        )
                        .unwrap();
                        check(&format!("O f16 {what}"), &o, &want.o, hidden);
                    }
                }
            }
        }
    }
}
