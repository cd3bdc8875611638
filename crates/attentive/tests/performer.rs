//! Performer's FAVOR+ against its f64 oracle (same features, pair by pair) by the accuracy rule;
//! the oracle's gradients against finite differences with the stabilisers held; causal outputs
//! independent of later keys; the estimate of softmax improving like 1/√m; orthogonal
//! features; bad input.

mod common;
use attentive::reference::variants::{performer as oracle, performer_with};
use attentive::variants::performer::{backward, draw_features, forward, Performer};
use attentive::{reference, AttnError, Isa, Options, View, ViewMut};
use common::{check_rule, check_rule_scaled, Layout, OutBuf, Rng, Tensor};

#[allow(clippy::too_many_arguments)]
fn run(
    rng: &mut Rng,
    (b, hq, hkv, nq, nk, d, dv): (usize, usize, usize, usize, usize, usize, usize),
    m: usize,
    causal: bool,
    masked: bool,
    layout: Layout,
) -> Result<(), String> {
    let mut t = |s: [usize; 4], amp: f32| {
        let x: Vec<f32> = rng
            .vec(s.iter().product())
            .iter()
            .map(|x| x * amp)
            .collect();
        Tensor::new(&x, s, layout)
    };
    let q = t([b, hq, nq, d], 0.7);
    let k = t([b, hkv, nk, d], 0.7);
    let v = t([b, hkv, nk, dv], 1.0);
    let d_o = t([b, hq, nq, dv], 1.0);
    let w = draw_features(m, d, 3);
    let mask: Vec<bool> = (0..b * nk).map(|x| !masked || x % 4 != 2).collect();
    let opts = Performer {
        causal,
        key_mask: masked.then_some(&mask[..]),
        ..Performer::new(&w)
    };
    let (qv, kv, vv, dov) = (q.view(), k.view(), v.view(), d_o.view());
    let s = |e: AttnError| e.to_string();
    let o64 = oracle::<f64>(qv, kv, vv, dov, &opts).map_err(s)?;
    let o32 = oracle::<f32>(qv, kv, vv, dov, &opts).map_err(s)?;
    for isa in Isa::all_available() {
        let opts = Performer { isa, ..opts };
        let at = |e: String| format!("{isa:?}: {e}");
        let mut out = OutBuf::new([b, hq, nq, dv], layout);
        forward(qv, kv, vv, &opts, &mut out.view()).map_err(s)?;
        check_rule("O", &out.row_major(), &o32.0, &o64.0, 2.0).map_err(at)?;
        let mut dq = OutBuf::new([b, hq, nq, d], layout);
        let mut dk = OutBuf::new([b, hkv, nk, d], layout);
        let mut dv_ = OutBuf::new([b, hkv, nk, dv], layout);
        let (gq, gk, gv) = (&mut dq.view(), &mut dk.view(), &mut dv_.view());
        backward(qv, kv, vv, dov, &opts, gq, gk, gv).map_err(s)?;
        // A gradient that is 0 in exact arithmetic (one visible key) is a difference of terms
        // as large as the call's other gradients: their ulps are its floor.
        let big = o64
            .1
            .iter()
            .chain(&o64.2)
            .chain(&o64.3)
            .fold(0.0f64, |a, x| a.max(x.abs()));
        check_rule_scaled("dQ", &dq.row_major(), &o32.1, &o64.1, 3.0, big).map_err(at)?;
        check_rule_scaled("dK", &dk.row_major(), &o32.2, &o64.2, 3.0, big).map_err(at)?;
        check_rule_scaled("dV", &dv_.row_major(), &o32.3, &o64.3, 3.0, big).map_err(at)?;
    }
    Ok(())
}

#[test]
fn forward_and_backward_against_the_oracle() {
    let mut rng = Rng::new(17);
    let mut n = 0;
    for causal in [false, true] {
        for &(nq, nk) in &[(1, 1), (7, 7), (64, 64), (70, 70), (5, 90)] {
            if causal && nq != nk {
                continue;
            }
            for &(hq, hkv, m) in &[(1, 1, 16), (4, 2, 37), (2, 1, 64)] {
                let shape = (
                    1 + n % 2,
                    hq,
                    hkv,
                    nq,
                    nk,
                    [4, 9, 16][n % 3],
                    [3, 8, 16][n % 3],
                );
                let layout = [Layout::Bhnd, Layout::Bnhd, Layout::Bhdn][n % 3];
                run(&mut rng, shape, m, causal, n % 3 == 1, layout)
                    .unwrap_or_else(|e| panic!("causal {causal}, {shape:?}, m {m}: {e}"));
                n += 1;
            }
        }
    }
}

/// The oracle's gradients against central differences of its output with its stabilisers held
/// where they were (the backward treats them as constants, as performer-pytorch does).
#[test]
fn oracle_gradients_equal_finite_differences() {
    let mut rng = Rng::new(2);
    let (n, d, dv, m) = (5, 3, 2, 6);
    let w = draw_features(m, d, 9);
    for causal in [false, true] {
        let q: Vec<f32> = rng.vec(n * d).iter().map(|x| x * 0.8).collect();
        let k: Vec<f32> = rng.vec(n * d).iter().map(|x| x * 0.8).collect();
        let v = rng.vec(n * dv);
        let g = rng.vec(n * dv);
        let opts = Performer {
            causal,
            ..Performer::new(&w)
        };
        let gv = View::contiguous(&g, &[1, 1, n, dv]).unwrap();
        let ((_, dq, dk, dvv), stabs) = performer_with::<f64>(
            common::cv(&q, [1, 1, n, d]),
            common::cv(&k, [1, 1, n, d]),
            common::cv(&v, [1, 1, n, dv]),
            gv,
            &opts,
            None,
        )
        .unwrap();
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let ((o, ..), _) = performer_with::<f64>(
                common::cv(q, [1, 1, n, d]),
                common::cv(k, [1, 1, n, d]),
                common::cv(v, [1, 1, n, dv]),
                gv,
                &opts,
                Some(&stabs),
            )
            .unwrap();
            o.iter().zip(&g).map(|(o, g)| o * *g as f64).sum()
        };
        let eps = 1e-3f32;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dvv)] {
            for idx in 0..grad.len() {
                let bump = |e: f32| {
                    let (mut q, mut k, mut v) = (q.clone(), k.clone(), v.clone());
                    [&mut q, &mut k, &mut v][which][idx] += e;
                    loss(&q, &k, &v)
                };
                let fd = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
                assert!(
                    (fd - grad[idx]).abs() < 1e-4 * (1.0 + fd.abs()),
                    "causal {causal}, tensor {which}, element {idx}: {} vs {fd}",
                    grad[idx]
                );
            }
        }
    }
}

/// Causal FAVOR+ has no key stabiliser, so no output reads a later key.
#[test]
fn causal_outputs_do_not_read_later_keys() {
    let mut rng = Rng::new(8);
    let (n, d) = (100, 8);
    let w = draw_features(32, d, 1);
    let q = rng.vec(n * d);
    let mut k = rng.vec(n * d);
    let v = rng.vec(n * d);
    let opts = Performer {
        causal: true,
        ..Performer::new(&w)
    };
    let run = |k: &[f32]| {
        let mut o = vec![0.0f32; n * d];
        forward(
            common::cv(&q, [1, 1, n, d]),
            common::cv(k, [1, 1, n, d]),
            common::cv(&v, [1, 1, n, d]),
            &opts,
            &mut ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap(),
        )
        .unwrap();
        o
    };
    let before = run(&k);
    // A much larger key late in the sequence: a global stabiliser would move every output.
    k[(n - 1) * d..].iter_mut().for_each(|x| *x *= 8.0);
    let after = run(&k);
    assert_eq!(before[..(n - 1) * d], after[..(n - 1) * d]);
    assert_ne!(before[(n - 1) * d..], after[(n - 1) * d..]);
}

/// FAVOR+ estimates softmax attention: on small-norm inputs its error falls as the features
/// grow, like 1/√m (a factor 8 from 16 to 1024 features; at least 3 asked here, over seeds).
#[test]
fn the_estimate_improves_with_more_features() {
    let mut rng = Rng::new(21);
    let (n, d) = (48, 16);
    let x: Vec<Vec<f32>> = (0..3)
        .map(|_| rng.vec(n * d).iter().map(|x| x * 0.5).collect())
        .collect();
    let exact = reference::forward::<f64>(
        common::cv(&x[0], [1, 1, n, d]),
        common::cv(&x[1], [1, 1, n, d]),
        common::cv(&x[2], [1, 1, n, d]),
        &Options::new(),
    )
    .unwrap();
    let err = |m: usize| -> f64 {
        (0..8)
            .map(|seed| {
                let w = draw_features(m, d, 100 + seed);
                let mut o = vec![0.0f32; n * d];
                let mut out = ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap();
                forward(
                    common::cv(&x[0], [1, 1, n, d]),
                    common::cv(&x[1], [1, 1, n, d]),
                    common::cv(&x[2], [1, 1, n, d]),
                    &Performer::new(&w),
                    &mut out,
                )
                .unwrap();
                let num: f64 = o
                    .iter()
                    .zip(&exact.o)
                    .map(|(a, b)| (*a as f64 - b).powi(2))
                    .sum();
                let den: f64 = exact.o.iter().map(|b| b * b).sum();
                (num / den).sqrt()
            })
            .sum::<f64>()
            / 8.0
    };
    let (e16, e1024) = (err(16), err(1024));
    assert!(e1024 < 0.05, "relative error {e1024} with 1024 features");
    assert!(e16 / e1024 > 3.0, "16 features: {e16}, 1024: {e1024}");
}

#[test]
fn features_are_orthogonal_within_blocks() {
    let (m, d) = (40, 16);
    let w = draw_features(m, d, 5);
    assert_eq!(w.len(), m * d);
    let row = |i: usize| &w[i * d..(i + 1) * d];
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for blk in 0..m.div_ceil(d) {
        for i in blk * d..((blk + 1) * d).min(m) {
            for j in blk * d..i {
                let c = dot(row(i), row(j)) / (dot(row(i), row(i)) * dot(row(j), row(j))).sqrt();
                assert!(c.abs() < 1e-5, "rows {i}, {j}: cosine {c}");
            }
        }
    }
    // Norms of Gaussian d-vectors: about √d on average.
    let mean: f32 = (0..m).map(|i| dot(row(i), row(i)).sqrt()).sum::<f32>() / m as f32;
    assert!((mean - (d as f32).sqrt()).abs() < 1.0, "mean norm {mean}");
    assert_eq!(w, draw_features(m, d, 5), "a seed gives the same features");
    assert_ne!(w, draw_features(m, d, 6));
}

#[test]
fn bad_input_is_a_clear_error() {
    let x = vec![0.1f32; 24];
    let q = View::contiguous(&x, &[1, 2, 4, 3]).unwrap();
    let mut o = vec![0.0f32; 24];
    let mut out = ViewMut::contiguous(&mut o, [1, 2, 4, 3]).unwrap();
    let short = [0.5f32; 7];
    let e = forward(q, q, q, &Performer::new(&short), &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::LengthMismatch {
                tensor: "features",
                ..
            }
        ),
        "{e}"
    );
    let mut w = draw_features(4, 3, 1);
    w[2] = f32::INFINITY;
    let e = forward(q, q, q, &Performer::new(&w), &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::InvalidOption {
                option: "features",
                ..
            }
        ),
        "{e}"
    );
    // A key along a long feature: ω·k′ − ‖k′‖²/2 reaches ‖ω‖²/2, here past 80.
    let w: Vec<f32> = draw_features(4, 3, 1).iter().map(|x| x * 10.0).collect();
    let big: Vec<f32> = (0..24).map(|i| w[i % 3] * 3f32.powf(0.25)).collect();
    let kb = View::contiguous(&big, &[1, 2, 4, 3]).unwrap();
    let causal = Performer {
        causal: true,
        ..Performer::new(&w)
    };
    let e = forward(q, kb, q, &causal, &mut out).unwrap_err();
    assert!(
        matches!(e, AttnError::InvalidOption { option: "keys", .. }),
        "{e}"
    );
}
