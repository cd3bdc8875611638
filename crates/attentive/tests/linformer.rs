//! Linformer against its f64 oracle by the accuracy rule (E and F separate or shared, GQA,
//! every instruction set), a row-selecting E equal to attention over those keys, the oracle's
//! gradients (E and F included) against finite differences, and bad input.

mod common;
use attentive::reference::variants::linformer as oracle;
use attentive::variants::linformer::{backward, forward, Linformer};
use attentive::{AttnError, Isa, Options, View, ViewMut};
use common::{check_rule, cv, Layout, OutBuf, Rng, Tensor};

#[test]
fn forward_and_backward_against_the_oracle() {
    let mut rng = Rng::new(44);
    let mut count = 0;
    for &(b, hq, hkv, nq, nk, kp, d, dv) in &[
        (1, 1, 1, 1, 1, 1, 4, 4),
        (2, 4, 2, 9, 17, 5, 8, 3),
        (1, 2, 1, 70, 70, 16, 16, 16),
        (1, 3, 3, 33, 65, 80, 5, 7),
    ] {
        for shared in [false, true] {
            let layout = [Layout::Bhnd, Layout::Bnhd, Layout::Bhdn][count % 3];
            let t =
                |rng: &mut Rng, s: [usize; 4]| Tensor::new(&rng.vec(s.iter().product()), s, layout);
            let (q, k, v) = (
                t(&mut rng, [b, hq, nq, d]),
                t(&mut rng, [b, hkv, nk, d]),
                t(&mut rng, [b, hkv, nk, dv]),
            );
            let d_o = t(&mut rng, [b, hq, nq, dv]);
            let e: Vec<f32> = rng
                .vec(nk * kp)
                .iter()
                .map(|x| x / (kp as f32).sqrt())
                .collect();
            let f: Vec<f32> = rng
                .vec(nk * kp)
                .iter()
                .map(|x| x / (kp as f32).sqrt())
                .collect();
            let opts = Linformer::new(&e, (!shared).then_some(&f[..]), kp);
            let (qv, kv, vv, dov) = (q.view(), k.view(), v.view(), d_o.view());
            let o64 = oracle::<f64>(qv, kv, vv, dov, &opts).unwrap();
            let o32 = oracle::<f32>(qv, kv, vv, dov, &opts).unwrap();
            for isa in Isa::all_available() {
                let opts = Linformer { isa, ..opts };
                let at = |e: String| {
                    panic!(
                        "{isa:?}, shape {:?}, shared {shared}: {e}",
                        (b, hq, hkv, nq, nk, kp)
                    )
                };
                let mut out = OutBuf::new([b, hq, nq, dv], layout);
                forward(qv, kv, vv, &opts, &mut out.view()).unwrap();
                check_rule("O", &out.row_major(), &o32.0, &o64.0, 2.0).unwrap_or_else(at);
                let mut dq = OutBuf::new([b, hq, nq, d], layout);
                let mut dk = OutBuf::new([b, hkv, nk, d], layout);
                let mut dvb = OutBuf::new([b, hkv, nk, dv], layout);
                let (mut de, mut df) = (vec![f32::NAN; nk * kp], vec![f32::NAN; nk * kp]);
                let grads = (&mut dq.view(), &mut dk.view(), &mut dvb.view());
                backward(
                    qv,
                    kv,
                    vv,
                    dov,
                    &opts,
                    grads,
                    Some(&mut de),
                    (!shared).then_some(&mut df[..]),
                )
                .unwrap();
                check_rule("dQ", &dq.row_major(), &o32.1, &o64.1, 3.0).unwrap_or_else(at);
                check_rule("dK", &dk.row_major(), &o32.2, &o64.2, 3.0).unwrap_or_else(at);
                check_rule("dV", &dvb.row_major(), &o32.3, &o64.3, 3.0).unwrap_or_else(at);
                check_rule("dE", &de, &o32.4, &o64.4, 3.0).unwrap_or_else(at);
                if !shared {
                    check_rule("dF", &df, &o32.5, &o64.5, 3.0).unwrap_or_else(at);
                }
            }
            count += 1;
        }
    }
}

/// E = F selecting keys 1, 4 and 6 is exact attention over those three keys.
#[test]
fn a_selecting_projection_is_attention_over_the_selected_keys() {
    let mut rng = Rng::new(3);
    let (n, d, pick) = (8, 4, [1usize, 4, 6]);
    let (q, k, v) = (rng.vec(5 * d), rng.vec(n * d), rng.vec(n * d));
    let mut e = vec![0.0f32; n * pick.len()];
    for (c, &r) in pick.iter().enumerate() {
        e[r * pick.len() + c] = 1.0;
    }
    let mut o = vec![0.0f32; 5 * d];
    forward(
        cv(&q, [1, 1, 5, d]),
        cv(&k, [1, 1, n, d]),
        cv(&v, [1, 1, n, d]),
        &Linformer::new(&e, None, 3),
        &mut ViewMut::contiguous(&mut o, [1, 1, 5, d]).unwrap(),
    )
    .unwrap();
    let sel = |x: &[f32]| {
        pick.iter()
            .flat_map(|&r| x[r * d..(r + 1) * d].to_vec())
            .collect::<Vec<f32>>()
    };
    let (ks, vs) = (sel(&k), sel(&v));
    let mut want = vec![0.0f32; 5 * d];
    attentive::forward(
        cv(&q, [1, 1, 5, d]),
        cv(&ks, [1, 1, 3, d]),
        cv(&vs, [1, 1, 3, d]),
        &Options::new(),
        &mut ViewMut::contiguous(&mut want, [1, 1, 5, d]).unwrap(),
        None,
    )
    .unwrap();
    assert!(
        o.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6),
        "{o:?} vs {want:?}"
    );
}

#[test]
fn oracle_gradients_equal_finite_differences() {
    let mut rng = Rng::new(10);
    let (n, kp, d, dv) = (5, 3, 3, 2);
    let (q, k, v, g) = (
        rng.vec(4 * d),
        rng.vec(n * d),
        rng.vec(n * dv),
        rng.vec(4 * dv),
    );
    let (e, f) = (rng.vec(n * kp), rng.vec(n * kp));
    let run = |x: &[Vec<f32>]| {
        oracle::<f64>(
            cv(&x[0], [1, 1, 4, d]),
            cv(&x[1], [1, 1, n, d]),
            cv(&x[2], [1, 1, n, dv]),
            cv(&g, [1, 1, 4, dv]),
            &Linformer::new(&x[3], Some(&x[4]), kp),
        )
        .unwrap()
    };
    let base = vec![q, k, v, e, f];
    let (_, dq, dk, dvv, de, df) = run(&base);
    let eps = 1e-3f32;
    for (which, grad) in [(0, &dq), (1, &dk), (2, &dvv), (3, &de), (4, &df)] {
        for idx in 0..grad.len() {
            let loss = |delta: f32| {
                let mut x = base.clone();
                x[which][idx] += delta;
                run(&x)
                    .0
                    .iter()
                    .zip(&g)
                    .map(|(o, g)| o * *g as f64)
                    .sum::<f64>()
            };
            let fd = (loss(eps) - loss(-eps)) / (2.0 * eps as f64);
            assert!(
                (fd - grad[idx]).abs() < 1e-4 * (1.0 + fd.abs()),
                "tensor {which}[{idx}]: {} vs {fd}",
                grad[idx]
            );
        }
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let x = vec![0.1f32; 24];
    let q = View::contiguous(&x, &[1, 2, 4, 3]).unwrap();
    let mut o = vec![0.0f32; 24];
    let mut out = ViewMut::contiguous(&mut o, [1, 2, 4, 3]).unwrap();
    let e = [0.5f32; 7];
    let err = forward(q, q, q, &Linformer::new(&e, None, 2), &mut out).unwrap_err();
    assert!(
        matches!(err, AttnError::LengthMismatch { tensor: "e", .. }),
        "{err}"
    );
    let mut e = vec![0.5f32; 8];
    let err = forward(q, q, q, &Linformer::new(&e, None, 0), &mut out).unwrap_err();
    assert!(
        matches!(err, AttnError::InvalidOption { option: "k", .. }),
        "{err}"
    );
    e[3] = f32::NAN;
    let err = forward(q, q, q, &Linformer::new(&e, None, 2), &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            AttnError::InvalidOption {
                option: "projection",
                ..
            }
        ),
        "{err}"
    );
}
