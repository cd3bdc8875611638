//! Gated linear attention (RetNet's per-head decay, GLA's gates) against its f64 oracle (the
//! recurrence for the output, the closed form term by term for the gradients) by the accuracy
//! rule, shallow and steep chunks, every instruction set; the oracle's gradients against finite
//! differences; no future leak; bad input.

mod common;
use attentive::reference::variants::gated as oracle;
use attentive::variants::gated::{backward, forward, Decay, Gated};
use attentive::{AttnError, Isa, View, ViewMut};
use common::{check_rule, check_rule_scaled, Layout, OutBuf, Rng, Tensor};

struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    n: usize,
    d: usize,
    dv: usize,
    /// Log-gates uniform in [−steep, 0]; none: one decay per head.
    steep: Option<f32>,
    layout: Layout,
}

fn run(c: &Case, rng: &mut Rng) -> Result<(), String> {
    let t = |rng: &mut Rng, s: [usize; 4]| Tensor::new(&rng.vec(s.iter().product()), s, c.layout);
    let q = t(rng, [c.b, c.hq, c.n, c.d]);
    let k = t(rng, [c.b, c.hkv, c.n, c.d]);
    let v = t(rng, [c.b, c.hkv, c.n, c.dv]);
    let d_o = t(rng, [c.b, c.hq, c.n, c.dv]);
    let gates: Vec<f32> = (0..c.b * c.hkv * c.n * c.d)
        .map(|_| -(rng.f32() + 1.0) / 2.0 * c.steep.unwrap_or(0.0))
        .collect();
    let per_head: Vec<f32> = (0..c.hkv).map(|h| -0.05 - 0.3 * h as f32).collect();
    let gview = View::contiguous(&gates, &[c.b, c.hkv, c.n, c.d]).unwrap();
    let decay = match c.steep {
        Some(_) => Decay::Gates(gview),
        None => Decay::PerHead(&per_head),
    };
    let opts = Gated::new(decay);
    let (qv, kv, vv, dov) = (q.view(), k.view(), v.view(), d_o.view());
    let s = |e: AttnError| e.to_string();
    let o64 = oracle::<f64>(qv, kv, vv, dov, &opts).map_err(s)?;
    let o32 = oracle::<f32>(qv, kv, vv, dov, &opts).map_err(s)?;
    for isa in Isa::all_available() {
        let opts = Gated { isa, ..opts };
        let at = |e: String| format!("{isa:?}: {e}");
        let mut out = OutBuf::new([c.b, c.hq, c.n, c.dv], c.layout);
        forward(qv, kv, vv, &opts, &mut out.view()).map_err(s)?;
        check_rule("O", &out.row_major(), &o32.0, &o64.0, 2.0).map_err(at)?;
        let mut dq = OutBuf::new([c.b, c.hq, c.n, c.d], c.layout);
        let mut dk = OutBuf::new([c.b, c.hkv, c.n, c.d], c.layout);
        let mut dv = OutBuf::new([c.b, c.hkv, c.n, c.dv], c.layout);
        let mut dg = vec![f32::NAN; o64.4.len()];
        let (gq, gk, gv) = (&mut dq.view(), &mut dk.view(), &mut dv.view());
        backward(qv, kv, vv, dov, &opts, gq, gk, gv, Some(&mut dg)).map_err(s)?;
        check_rule("dQ", &dq.row_major(), &o32.1, &o64.1, 3.0).map_err(at)?;
        check_rule("dK", &dk.row_major(), &o32.2, &o64.2, 3.0).map_err(at)?;
        check_rule("dV", &dv.row_major(), &o32.3, &o64.3, 3.0).map_err(at)?;
        // dg sums q·dq − k·dk over steps: differences of terms as large as |q·dq|, each step's
        // cancelling exactly in the closed form, so its floor is their rounding.
        let qrm = q.view().to_vec();
        let terms = qrm.iter().zip(&o64.1).map(|(a, b)| (*a as f64 * b).abs());
        let magnitude = terms.fold(0.0, f64::max) * (c.n as f64).sqrt();
        check_rule_scaled("dg", &dg, &o32.4, &o64.4, 3.0, magnitude).map_err(at)?;
    }
    Ok(())
}

#[test]
fn forward_and_backward_against_the_oracle() {
    let mut rng = Rng::new(31);
    let mut count = 0;
    for &n in &[1, 5, 63, 64, 65, 150] {
        for steep in [None, Some(0.3), Some(6.0)] {
            for &(hq, hkv) in &[(1, 1), (4, 2)] {
                let c = Case {
                    b: 1 + count % 2,
                    hq,
                    hkv,
                    n,
                    d: [1, 8, 17][count % 3],
                    dv: [3, 16, 4][count % 3],
                    steep,
                    layout: [Layout::Bhnd, Layout::Bnhd, Layout::Bhdn][count % 3],
                };
                run(&c, &mut rng)
                    .unwrap_or_else(|e| panic!("n {n}, steep {steep:?}, heads {hq}/{hkv}: {e}"));
                count += 1;
            }
        }
    }
}

/// The f64 oracle's gradients, the gates' among them, against central differences of its
/// own output.
#[test]
fn oracle_gradients_equal_finite_differences() {
    let mut rng = Rng::new(4);
    let (b, h, n, d, dv) = (1, 1, 7, 3, 2);
    let q = rng.vec(b * h * n * d);
    let k = rng.vec(b * h * n * d);
    let v = rng.vec(b * h * n * dv);
    let g = rng.vec(b * h * n * dv);
    let gates: Vec<f32> = (0..n * d).map(|_| -(rng.f32() + 1.0) * 0.4).collect();
    let per_head = [-0.3f32];
    for per in [false, true] {
        let eval = |q: &[f32], k: &[f32], v: &[f32], gates: &[f32], ph: &[f32]| {
            let gv = View::contiguous(gates, &[b, h, n, d]).unwrap();
            let decay = if per {
                Decay::PerHead(ph)
            } else {
                Decay::Gates(gv)
            };
            oracle::<f64>(
                View::contiguous(q, &[b, h, n, d]).unwrap(),
                View::contiguous(k, &[b, h, n, d]).unwrap(),
                View::contiguous(v, &[b, h, n, dv]).unwrap(),
                View::contiguous(&g, &[b, h, n, dv]).unwrap(),
                &Gated::new(decay),
            )
            .unwrap()
        };
        let loss = |q: &[f32], k: &[f32], v: &[f32], gates: &[f32], ph: &[f32]| -> f64 {
            let o = eval(q, k, v, gates, ph).0;
            o.iter().zip(&g).map(|(o, g)| o * *g as f64).sum()
        };
        let (_, dq, dk, dvv, dg) = eval(&q, &k, &v, &gates, &per_head);
        let eps = 1e-3f32;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dvv), (3, &dg)] {
            for idx in 0..grad.len() {
                let bump = |e: f32| {
                    let (mut q, mut k, mut v, mut gs, mut ph) = (
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        gates.clone(),
                        per_head.to_vec(),
                    );
                    match which {
                        0 => q[idx] += e,
                        1 => k[idx] += e,
                        2 => v[idx] += e,
                        _ if per => ph[idx] += e,
                        _ => gs[idx] += e,
                    }
                    loss(&q, &k, &v, &gs, &ph)
                };
                let fd = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
                assert!(
                    (fd - grad[idx]).abs() < 1e-4 * (1.0 + fd.abs()),
                    "per-head {per}, tensor {which}, element {idx}: {} vs {fd}",
                    grad[idx]
                );
            }
        }
    }
}

/// Outputs at step i do not move when keys, values or gates after i do.
#[test]
fn no_output_reads_the_future() {
    let mut rng = Rng::new(7);
    let (n, d, dv) = (140, 8, 4);
    let q = rng.vec(n * d);
    let mut k = rng.vec(n * d);
    let mut v = rng.vec(n * dv);
    let mut gates: Vec<f32> = (0..n * d).map(|_| -(rng.f32() + 1.0) * 0.2).collect();
    let run = |k: &[f32], v: &[f32], gates: &[f32]| {
        let mut o = vec![0.0f32; n * dv];
        let gv = View::contiguous(gates, &[1, 1, n, d]).unwrap();
        forward(
            View::contiguous(&q, &[1, 1, n, d]).unwrap(),
            View::contiguous(k, &[1, 1, n, d]).unwrap(),
            View::contiguous(v, &[1, 1, n, dv]).unwrap(),
            &Gated::new(Decay::Gates(gv)),
            &mut ViewMut::contiguous(&mut o, [1, 1, n, dv]).unwrap(),
        )
        .unwrap();
        o
    };
    let before = run(&k, &v, &gates);
    let cut = 90;
    k[(cut + 1) * d..].iter_mut().for_each(|x| *x += 1.0);
    v[(cut + 1) * dv..].iter_mut().for_each(|x| *x -= 1.0);
    let after = run(&k, &v, &gates);
    assert_eq!(before[..(cut + 1) * dv], after[..(cut + 1) * dv]);
    assert_ne!(before[(cut + 1) * dv..], after[(cut + 1) * dv..]);
    gates[(cut + 1) * d..].iter_mut().for_each(|x| *x *= 2.0);
    let regated = run(&k, &v, &gates);
    assert_eq!(after[..(cut + 1) * dv], regated[..(cut + 1) * dv]);
    assert_ne!(after[(cut + 1) * dv..], regated[(cut + 1) * dv..]);
}

#[test]
fn bad_input_is_a_clear_error() {
    let x = vec![0.5f32; 24];
    let q = View::contiguous(&x, &[1, 2, 4, 3]).unwrap();
    let mut o = vec![0.0f32; 24];
    let mut out = ViewMut::contiguous(&mut o, [1, 2, 4, 3]).unwrap();
    let positive = [0.1f32, -0.1];
    let e = forward(q, q, q, &Gated::new(Decay::PerHead(&positive)), &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::InvalidOption {
                option: "decay",
                ..
            }
        ),
        "{e}"
    );
    let one = [-0.1f32];
    let e = forward(q, q, q, &Gated::new(Decay::PerHead(&one)), &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::LengthMismatch {
                tensor: "decay",
                ..
            }
        ),
        "{e}"
    );
    let mut g = vec![-0.1f32; 24];
    g[5] = f32::NAN;
    let gv = View::contiguous(&g, &[1, 2, 4, 3]).unwrap();
    let e = forward(q, q, q, &Gated::new(Decay::Gates(gv)), &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::InvalidOption {
                option: "gates",
                ..
            }
        ),
        "{e}"
    );
    let short = View::contiguous(&g[..18], &[1, 2, 3, 3]).unwrap();
    let e = forward(q, q, q, &Gated::new(Decay::Gates(short)), &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::ShapeMismatch {
                tensor: "gates",
                ..
            }
        ),
        "{e}"
    );
    let k3 = View::contiguous(&x[..18], &[1, 2, 3, 3]).unwrap();
    let fine = [-0.1f32, -0.2];
    let e = forward(q, k3, k3, &Gated::new(Decay::PerHead(&fine)), &mut out).unwrap_err();
    assert!(matches!(e, AttnError::ConflictingOptions { .. }), "{e}");
}
