//! Reformer LSH attention against its f64 oracle by the accuracy rule (rounds, chunks that look
//! into the previous round, causal, N = 1, N within one chunk, every instruction set and
//! layout), one chunk equal to exact attention with the self-match masked, identical rounds
//! equal to one, causal outputs free of future values, the oracle's gradients against finite
//! differences, and bad input.

mod common;
use attentive::reference::variants::lsh as oracle;
use attentive::variants::lsh::{backward, draw_rotations, forward, Lsh, NORM_EPS, SELF_MASK};
use attentive::{AttnError, Isa, Options, View, ViewMut};
use common::{check_rule, cv, Layout, OutBuf, Rng, Tensor};

#[test]
fn forward_and_backward_against_the_oracle() {
    let mut rng = Rng::new(71);
    let mut count = 0;
    // (B, H, N, D, Dv, n_hashes, n_buckets, C)
    for &(b, h, n, d, dv, nh, nb, c) in &[
        (1, 1, 1, 4, 4, 1, 2, 4),
        (1, 2, 7, 5, 3, 3, 4, 64),
        (2, 2, 24, 8, 5, 2, 4, 4),
        (1, 3, 48, 16, 16, 1, 8, 16),
        (1, 1, 96, 7, 9, 4, 6, 8),
        (1, 2, 130, 32, 8, 2, 16, 13),
    ] {
        for causal in [false, true] {
            let layout = [Layout::Bhnd, Layout::Bnhd, Layout::Bhdn][count % 3];
            let t =
                |rng: &mut Rng, s: [usize; 4]| Tensor::new(&rng.vec(s.iter().product()), s, layout);
            let (x, v, d_o) = (
                t(&mut rng, [b, h, n, d]),
                t(&mut rng, [b, h, n, dv]),
                t(&mut rng, [b, h, n, dv]),
            );
            let rot = draw_rotations(nh, d, nb, count as u64);
            let opts = Lsh::new(&rot, nh, nb, c).causal(causal);
            let (xv, vv, dov) = (x.view(), v.view(), d_o.view());
            let o64 = oracle::<f64>(xv, vv, dov, &opts).unwrap();
            let o32 = oracle::<f32>(xv, vv, dov, &opts).unwrap();
            for isa in Isa::all_available() {
                let opts = Lsh { isa, ..opts };
                let at = |e: String| {
                    panic!(
                        "{isa:?}, shape {:?}, causal {causal}: {e}",
                        (b, h, n, d, dv, nh, nb, c)
                    )
                };
                let mut out = OutBuf::new([b, h, n, dv], layout);
                forward(xv, vv, &opts, &mut out.view()).unwrap();
                check_rule("O", &out.row_major(), &o32.0, &o64.0, 2.0).unwrap_or_else(at);
                let mut dx = OutBuf::new([b, h, n, d], layout);
                let mut dvb = OutBuf::new([b, h, n, dv], layout);
                backward(xv, vv, dov, &opts, &mut dx.view(), &mut dvb.view()).unwrap();
                check_rule("dX", &dx.row_major(), &o32.1, &o64.1, 3.0).unwrap_or_else(at);
                check_rule("dV", &dvb.row_major(), &o32.2, &o64.2, 3.0).unwrap_or_else(at);
            }
            count += 1;
        }
    }
}

/// `x̂ = x·rsqrt(mean(x²) + ε)/√D`, as the keys are formed.
fn keys(x: &[f32], d: usize) -> Vec<f32> {
    x.chunks_exact(d)
        .flat_map(|r| {
            let ms = r.iter().map(|a| a * a).sum::<f32>() / d as f32;
            let s = 1.0 / (ms + NORM_EPS).sqrt() / (d as f32).sqrt();
            r.iter().map(move |a| a * s).collect::<Vec<_>>()
        })
        .collect()
}

/// With one chunk covering the sequence, LSH attention is exact softmax attention of `x` over
/// the normalised keys, scale 1, with the self-match biased by −1e5: the fused kernel, causal
/// or not, computes the same.
#[test]
fn one_chunk_is_exact_attention_with_the_self_match_masked() {
    let mut rng = Rng::new(5);
    let (n, d) = (37, 8);
    let (x, v) = (rng.vec(n * d), rng.vec(n * d));
    let kn = keys(&x, d);
    let mut bias = vec![0.0f32; n * n];
    for i in 0..n {
        bias[i * n + i] = SELF_MASK;
    }
    let rot = draw_rotations(3, d, 4, 9);
    for causal in [false, true] {
        let mut o = vec![0.0f32; n * d];
        forward(
            cv(&x, [1, 1, n, d]),
            cv(&v, [1, 1, n, d]),
            &Lsh::new(&rot, 3, 4, n).causal(causal),
            &mut ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap(),
        )
        .unwrap();
        let mut want = vec![0.0f32; n * d];
        let mut opts = Options::new().scale(1.0).bias(cv(&bias, [1, 1, n, n]));
        if causal {
            opts = opts.causal(attentive::Causal::TopLeft);
        }
        attentive::forward(
            cv(&x, [1, 1, n, d]),
            cv(&kn, [1, 1, n, d]),
            cv(&v, [1, 1, n, d]),
            &opts,
            &mut ViewMut::contiguous(&mut want, [1, 1, n, d]).unwrap(),
            None,
        )
        .unwrap();
        let err = o
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-5, "causal {causal}: {err}");
    }
}

/// Two identical rounds give the one round's output: each query's window is the same twice.
#[test]
fn identical_rounds_equal_one_round() {
    let mut rng = Rng::new(8);
    let (n, d, nb, c) = (64, 8, 8, 8);
    let (x, v) = (rng.vec(n * d), rng.vec(n * d));
    let one = draw_rotations(1, d, nb, 2);
    let two = [one.clone(), one.clone()].concat();
    let run = |rot: &[f32], nh| {
        let mut o = vec![0.0f32; n * d];
        forward(
            cv(&x, [1, 1, n, d]),
            cv(&v, [1, 1, n, d]),
            &Lsh::new(rot, nh, nb, c),
            &mut ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap(),
        )
        .unwrap();
        o
    };
    let (a, b) = (run(&one, 1), run(&two, 2));
    let err = a
        .iter()
        .zip(&b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(err < 1e-6, "{err}");
}

/// Causal: the output at i weighs only values at positions ≤ i, so changing later values
/// leaves it exactly as it was. (Later *keys* may move the chunk boundaries, because the sort
/// sees the whole sequence: the method's own property, documented on the module.)
#[test]
fn causal_outputs_ignore_future_values() {
    let mut rng = Rng::new(12);
    let (n, d, i) = (96, 8, 40);
    let (x, v) = (rng.vec(n * d), rng.vec(n * d));
    let rot = draw_rotations(2, d, 8, 4);
    let opts = Lsh::new(&rot, 2, 8, 16).causal(true);
    let run = |v: &[f32]| {
        let mut o = vec![0.0f32; n * d];
        forward(
            cv(&x, [1, 1, n, d]),
            cv(v, [1, 1, n, d]),
            &opts,
            &mut ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap(),
        )
        .unwrap();
        o
    };
    let mut v2 = v.clone();
    v2[(i + 1) * d..]
        .iter_mut()
        .for_each(|a| *a = *a * 3.0 + 1.0);
    let (a, b) = (run(&v), run(&v2));
    assert_eq!(a[..(i + 1) * d], b[..(i + 1) * d]);
    assert_ne!(a[(i + 1) * d..], b[(i + 1) * d..]);
}

#[test]
fn oracle_gradients_equal_finite_differences() {
    let mut rng = Rng::new(10);
    let (n, d, dv) = (12, 4, 3);
    let (x, v, g) = (rng.vec(n * d), rng.vec(n * dv), rng.vec(n * dv));
    let rot = draw_rotations(2, d, 4, 3);
    for causal in [false, true] {
        let opts = Lsh::new(&rot, 2, 4, 3).causal(causal);
        let run = |x: &[f32], v: &[f32]| {
            oracle::<f64>(
                cv(x, [1, 1, n, d]),
                cv(v, [1, 1, n, dv]),
                cv(&g, [1, 1, n, dv]),
                &opts,
            )
            .unwrap()
        };
        let loss = |x: &[f32], v: &[f32]| {
            run(x, v)
                .0
                .iter()
                .zip(&g)
                .map(|(o, g)| o * *g as f64)
                .sum::<f64>()
        };
        let (_, dx, dvv) = run(&x, &v);
        let eps = 1e-3f32;
        for (which, grad) in [(0, &dx), (1, &dvv)] {
            for idx in 0..grad.len() {
                let at = |delta: f32| {
                    let (mut x2, mut v2) = (x.clone(), v.clone());
                    [&mut x2, &mut v2][which][idx] += delta;
                    loss(&x2, &v2)
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                assert!(
                    (fd - grad[idx]).abs() < 1e-4 * (1.0 + fd.abs()),
                    "causal {causal}, tensor {which}[{idx}]: {} vs {fd}",
                    grad[idx]
                );
            }
        }
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let x = vec![0.1f32; 2 * 6 * 4];
    let xv = View::contiguous(&x, &[1, 2, 6, 4]).unwrap();
    let mut o = vec![0.0f32; x.len()];
    let mut out = ViewMut::contiguous(&mut o, [1, 2, 6, 4]).unwrap();
    let rot = draw_rotations(2, 4, 4, 1);
    let option = |e: AttnError| match e {
        AttnError::InvalidOption { option, .. } => option,
        e => panic!("{e}"),
    };
    let err = forward(xv, xv, &Lsh::new(&rot, 2, 4, 4), &mut out).unwrap_err();
    assert_eq!(option(err), "bucket_size");
    let err = forward(xv, xv, &Lsh::new(&rot, 2, 3, 3), &mut out).unwrap_err();
    assert_eq!(option(err), "n_buckets");
    let err = forward(xv, xv, &Lsh::new(&rot, 0, 4, 3), &mut out).unwrap_err();
    assert_eq!(option(err), "n_hashes");
    let err = forward(xv, xv, &Lsh::new(&rot, 2, 4, 0), &mut out).unwrap_err();
    assert_eq!(option(err), "bucket_size");
    let err = forward(xv, xv, &Lsh::new(&rot[1..], 2, 4, 3), &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            AttnError::LengthMismatch {
                tensor: "rotations",
                ..
            }
        ),
        "{err}"
    );
    let mut bad = rot.clone();
    bad[5] = f32::INFINITY;
    let err = forward(xv, xv, &Lsh::new(&bad, 2, 4, 3), &mut out).unwrap_err();
    assert_eq!(option(err), "rotations");
    let v = vec![0.1f32; 5 * 4];
    let err = forward(xv, cv(&v, [1, 1, 5, 4]), &Lsh::new(&rot, 2, 4, 3), &mut out).unwrap_err();
    assert!(matches!(err, AttnError::ShapeMismatch { .. }), "{err}");
}

/// Position 0 under the causal mask sees only itself, at the logit −1e5, and in rounds whose
/// window holds it twice its log-sum-exp is −1e5 + ln 2: an f32 `m + ln z` there rounds ln 2 to
/// the grid of 1e5 (the naive f32 output is off by ~3e-3). The engine keeps `m` and `ln z`
/// apart and stays at round-off.
#[test]
fn masked_logits_keep_their_precision() {
    let s = [1usize, 2, 40, 8];
    let n: usize = s.iter().product();
    let (x, v, g) = (Rng::new(2).vec(n), Rng::new(3).vec(n), Rng::new(4).vec(n));
    let rot = draw_rotations(3, 8, 6, 5);
    let opts = Lsh::new(&rot, 3, 6, 8).causal(true);
    let (xv, vv, gv) = (cv(&x, s), cv(&v, s), cv(&g, s));
    let want = oracle::<f64>(xv, vv, gv, &opts).unwrap();
    let naive = oracle::<f32>(xv, vv, gv, &opts).unwrap();
    let mut o = vec![0.0f32; n];
    forward(xv, vv, &opts, &mut ViewMut::contiguous(&mut o, s).unwrap()).unwrap();
    let err = |got: &[f32]| {
        got.iter()
            .zip(&want.0)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max)
    };
    assert!(
        err(&naive.0) > 1e-4,
        "the case lost its point: {}",
        err(&naive.0)
    );
    assert!(err(&o) < 1e-6, "{}", err(&o));
}

/// Padding: with a key mask, engine and oracle agree (output and gradients), and the values at
/// hidden positions do not reach any output.
#[test]
fn padding_against_the_oracle() {
    let mut rng = Rng::new(31);
    let (b, h, n, d) = (2, 2, 24, 8);
    let s = [b, h, n, d];
    let (x, v, g) = (
        rng.vec(b * h * n * d),
        rng.vec(b * h * n * d),
        rng.vec(b * h * n * d),
    );
    // Row 0 keeps 17 positions, row 1 all.
    let keep: Vec<bool> = (0..b * n).map(|i| i >= n || i < 17).collect();
    let rot = draw_rotations(2, d, 4, 6);
    for causal in [false, true] {
        let opts = Lsh {
            key_mask: Some(&keep),
            ..Lsh::new(&rot, 2, 4, 6).causal(causal)
        };
        let (xv, vv, gv) = (cv(&x, s), cv(&v, s), cv(&g, s));
        let o64 = oracle::<f64>(xv, vv, gv, &opts).unwrap();
        let o32 = oracle::<f32>(xv, vv, gv, &opts).unwrap();
        let mut o = vec![0.0f32; x.len()];
        forward(xv, vv, &opts, &mut ViewMut::contiguous(&mut o, s).unwrap()).unwrap();
        check_rule("O", &o, &o32.0, &o64.0, 2.0).unwrap();
        let (mut dx, mut dvg) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        backward(
            xv,
            vv,
            gv,
            &opts,
            &mut ViewMut::contiguous(&mut dx, s).unwrap(),
            &mut ViewMut::contiguous(&mut dvg, s).unwrap(),
        )
        .unwrap();
        check_rule("dX", &dx, &o32.1, &o64.1, 3.0).unwrap();
        check_rule("dV", &dvg, &o32.2, &o64.2, 3.0).unwrap();
        let mut v2 = v.clone();
        for hh in 0..h {
            v2[(hh * n + 17) * d..(hh * n + n) * d]
                .iter_mut()
                .for_each(|a| *a += 5.0);
        }
        let mut o2 = vec![0.0f32; x.len()];
        forward(
            xv,
            cv(&v2, s),
            &opts,
            &mut ViewMut::contiguous(&mut o2, s).unwrap(),
        )
        .unwrap();
        for hh in 0..h {
            let real = (hh * n) * d..(hh * n + 17) * d;
            assert_eq!(o[real.clone()], o2[real], "causal {causal}, head {hh}");
        }
    }
}
