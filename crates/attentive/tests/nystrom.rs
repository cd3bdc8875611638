//! Nyströmformer against its f64 oracle by the accuracy rule (GQA, every instruction set), its
//! gradients (through the pseudo-inverse's iterations) against central differences of the
//! oracle, the pseudo-inverse converging to the Moore–Penrose one, m = N equal to exact softmax,
//! and bad input.

mod common;
use attentive::reference::variants::{nystrom as oracle, pinv};
use attentive::variants::nystrom::{backward, forward, Nystrom};
use attentive::{AttnError, Isa, Options, View, ViewMut};
use common::{check_rule, cv, Rng};

#[test]
fn forward_against_the_oracle() {
    let mut rng = Rng::new(19);
    for &(b, hq, hkv, nq, nk, d, dv, m) in &[
        (1, 1, 1, 4, 4, 2, 3, 1),
        (2, 4, 2, 12, 18, 8, 5, 3),
        (1, 2, 1, 64, 64, 16, 16, 8),
        (1, 1, 1, 30, 30, 4, 4, 30),
    ] {
        let (q, k, v) = (
            rng.vec(b * hq * nq * d),
            rng.vec(b * hkv * nk * d),
            rng.vec(b * hkv * nk * dv),
        );
        let (qv, kv, vv) = (
            cv(&q, [b, hq, nq, d]),
            cv(&k, [b, hkv, nk, d]),
            cv(&v, [b, hkv, nk, dv]),
        );
        let opts = Nystrom::new(m);
        let want = oracle::<f64>(qv, kv, vv, &opts).unwrap();
        let naive = oracle::<f32>(qv, kv, vv, &opts).unwrap();
        for isa in Isa::all_available() {
            let mut o = vec![f32::NAN; b * hq * nq * dv];
            forward(
                qv,
                kv,
                vv,
                &Nystrom { isa, ..opts },
                &mut ViewMut::contiguous(&mut o, [b, hq, nq, dv]).unwrap(),
            )
            .unwrap();
            check_rule("O", &o, &naive, &want, 2.0)
                .unwrap_or_else(|e| panic!("{isa:?}, n {nq}×{nk}, m {m}: {e}"));
        }
    }
}

/// dQ, dK, dV against central differences of the f64 oracle (every element, GQA).
#[test]
fn gradients_equal_finite_differences_of_the_oracle() {
    let mut rng = Rng::new(23);
    let (b, hq, hkv, n, d, dv, m) = (1, 2, 1, 6, 3, 2, 3);
    let (q, k, v, g) = (
        rng.vec(b * hq * n * d),
        rng.vec(b * hkv * n * d),
        rng.vec(b * hkv * n * dv),
        rng.vec(b * hq * n * dv),
    );
    let opts = Nystrom::new(m);
    let (mut dq, mut dk, mut dvg) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    backward(
        cv(&q, [b, hq, n, d]),
        cv(&k, [b, hkv, n, d]),
        cv(&v, [b, hkv, n, dv]),
        cv(&g, [b, hq, n, dv]),
        &opts,
        &mut ViewMut::contiguous(&mut dq, [b, hq, n, d]).unwrap(),
        &mut ViewMut::contiguous(&mut dk, [b, hkv, n, d]).unwrap(),
        &mut ViewMut::contiguous(&mut dvg, [b, hkv, n, dv]).unwrap(),
    )
    .unwrap();
    let base = [q, k, v];
    let loss = |x: &[Vec<f32>]| -> f64 {
        let o = oracle::<f64>(
            cv(&x[0], [b, hq, n, d]),
            cv(&x[1], [b, hkv, n, d]),
            cv(&x[2], [b, hkv, n, dv]),
            &opts,
        )
        .unwrap();
        o.iter().zip(&g).map(|(o, g)| o * *g as f64).sum()
    };
    let eps = 1e-3f32;
    for (which, grad) in [(0, &dq), (1, &dk), (2, &dvg)] {
        for idx in 0..grad.len() {
            let bump = |e: f32| {
                let mut x = base.to_vec();
                x[which][idx] += e;
                loss(&x)
            };
            let fd = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
            assert!(
                (fd - grad[idx] as f64).abs() < 5e-5 * (1.0 + fd.abs()),
                "tensor {which}[{idx}]: {} vs {fd}",
                grad[idx]
            );
        }
    }
}

/// Twenty iterations meet the Moore–Penrose conditions AZA = A and ZAZ = Z to 1e-9; six do not
/// yet on the same matrix.
#[test]
fn the_iterations_reach_the_pseudo_inverse() {
    let mut rng = Rng::new(2);
    let m = 8;
    let a: Vec<Vec<f64>> = (0..m)
        .map(|_| {
            let r: Vec<f64> = rng.vec(m).iter().map(|x| (*x as f64 * 2.0).exp()).collect();
            let s: f64 = r.iter().sum();
            r.into_iter().map(|x| x / s).collect()
        })
        .collect();
    let mul = |x: &[Vec<f64>], y: &[Vec<f64>]| -> Vec<Vec<f64>> {
        (0..m)
            .map(|i| {
                (0..m)
                    .map(|j| (0..m).map(|t| x[i][t] * y[t][j]).sum())
                    .collect()
            })
            .collect()
    };
    let err = |z: &[Vec<f64>]| -> f64 {
        let aza = mul(&mul(&a, z), &a);
        let zaz = mul(&mul(z, &a), z);
        let e1 = (0..m * m)
            .map(|x| (aza[x / m][x % m] - a[x / m][x % m]).abs())
            .fold(0.0, f64::max);
        let e2 = (0..m * m)
            .map(|x| (zaz[x / m][x % m] - z[x / m][x % m]).abs())
            .fold(0.0, f64::max);
        e1.max(e2)
    };
    assert!(err(&pinv(&a, 20)) < 1e-9, "{}", err(&pinv(&a, 20)));
    assert!(err(&pinv(&a, 6)) > err(&pinv(&a, 20)));
}

/// With a landmark per position the landmarks are the rows themselves and, the iterations
/// converged, the output is exact softmax attention.
#[test]
fn a_landmark_per_position_is_softmax_attention() {
    let mut rng = Rng::new(7);
    let (n, d) = (12, 4);
    let (q, k, v) = (rng.vec(n * d), rng.vec(n * d), rng.vec(n * d));
    let opts = Nystrom {
        iterations: 30,
        ..Nystrom::new(n)
    };
    let mut o = vec![0.0f32; n * d];
    forward(
        cv(&q, [1, 1, n, d]),
        cv(&k, [1, 1, n, d]),
        cv(&v, [1, 1, n, d]),
        &opts,
        &mut ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap(),
    )
    .unwrap();
    let mut want = vec![0.0f32; n * d];
    attentive::forward(
        cv(&q, [1, 1, n, d]),
        cv(&k, [1, 1, n, d]),
        cv(&v, [1, 1, n, d]),
        &Options::new(),
        &mut ViewMut::contiguous(&mut want, [1, 1, n, d]).unwrap(),
        None,
    )
    .unwrap();
    let e = o
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(e < 1e-4, "{e:e}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let x = vec![0.1f32; 30];
    let q = View::contiguous(&x, &[1, 1, 10, 3]).unwrap();
    let mut o = vec![0.0f32; 30];
    let mut out = ViewMut::contiguous(&mut o, [1, 1, 10, 3]).unwrap();
    for m in [0, 3, 11] {
        let e = forward(q, q, q, &Nystrom::new(m), &mut out).unwrap_err();
        assert!(
            matches!(
                e,
                AttnError::InvalidOption {
                    option: "landmarks",
                    ..
                }
            ),
            "{m}: {e}"
        );
    }
}
