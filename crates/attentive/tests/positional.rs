//! Positional schemes and score rules against the golden values of their papers and reference
//! code, their defining properties, and their gradients.

// Golden values are written as published.
#![allow(clippy::excessive_precision)]

mod common;
use attentive::positional::{
    add_learned, add_learned_backward, alibi_slopes, sinusoidal, t5_bucket, Rope, RopePairs, T5Bias,
};
use attentive::{backward_rule_params, forward, reference, Options, ViewMut, Window};
use common::{check_rule, cv, Rng};

#[test]
fn alibi_slopes_for_6_and_12_heads() {
    let neg_log2 = |n| -> Vec<f32> { alibi_slopes(n).iter().map(|m| -m.log2()).collect() };
    assert_eq!(neg_log2(6), vec![2.0, 4.0, 6.0, 8.0, 1.0, 3.0]);
    assert_eq!(
        neg_log2(12),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.5, 1.5, 2.5, 3.5]
    );
}

#[test]
fn t5_buckets_both_directions() {
    let bi = [
        (-1, 1),
        (-8, 8),
        (-12, 9),
        (-16, 10),
        (-32, 12),
        (-64, 14),
        (-128, 15),
        (1, 17),
        (8, 24),
        (16, 26),
        (127, 31),
    ];
    for (rel, want) in bi {
        assert_eq!(
            t5_bucket(rel, true, 32, 128),
            want,
            "bidirectional rel {rel}"
        );
    }
    for (rel, want) in [(-16, 16), (-32, 21), (-64, 26), (0, 0), (5, 0)] {
        assert_eq!(t5_bucket(rel, false, 32, 128), want, "causal rel {rel}");
    }
    // Far distances saturate at the last bucket of each side.
    assert_eq!(t5_bucket(-100_000, true, 32, 128), 15);
    assert_eq!(t5_bucket(100_000, true, 32, 128), 31);
}

#[test]
fn sinusoidal_values_and_shift_is_a_rotation() {
    let pe = sinusoidal(1, 1, 4);
    for (a, b) in pe
        .iter()
        .zip([0.84147098f32, 0.54030231, 0.00999983, 0.99995000])
    {
        assert!((a - b).abs() < 1e-7, "{pe:?}");
    }
    // PE(pos + k) is PE(pos) with each (sin, cos) pair rotated by k·ω_i.
    let d = 16;
    let (pos, k) = (37usize, 11usize);
    let (a, b) = (sinusoidal(pos, 1, d), sinusoidal(pos + k, 1, d));
    for i in 0..d / 2 {
        let w = 10000f64.powf(-(2.0 * i as f64) / d as f64) * k as f64;
        let (s, c) = (a[2 * i] as f64, a[2 * i + 1] as f64);
        assert!((b[2 * i] as f64 - (s * w.cos() + c * w.sin())).abs() < 1e-5);
        assert!((b[2 * i + 1] as f64 - (c * w.cos() - s * w.sin())).abs() < 1e-5);
    }
}

fn rotate(rope: &Rope, x: &[f32], pos: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    let d = x.len();
    rope.apply(
        &mut ViewMut::contiguous(&mut y, [1, 1, 1, d]).unwrap(),
        &[pos],
    )
    .unwrap();
    y
}

#[test]
fn rope_golden_values_both_pairings() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    for (pairs, want) in [
        (
            RopePairs::Interleaved,
            [-1.142640f32, 1.922076, 2.959851, 4.029800],
        ),
        (
            RopePairs::HalfSplit,
            [-1.984111, 1.959901, 2.462378, 4.019800],
        ),
    ] {
        let y = rotate(&Rope::new(4, 10000.0, pairs).unwrap(), &x, 1);
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 2e-6, "{pairs:?}: {y:?}");
        }
    }
}

#[test]
fn rope_properties() {
    let d = 64;
    let mut rng = Rng::new(3);
    let (q, k) = (rng.vec(d), rng.vec(d));
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum::<f64>()
    };
    for pairs in [RopePairs::Interleaved, RopePairs::HalfSplit] {
        let rope = Rope::new(d, 10000.0, pairs).unwrap();
        // ⟨R_m q, R_n k⟩ depends on m − n only; norms are preserved.
        let base = dot(&rotate(&rope, &q, 10), &rotate(&rope, &k, 3));
        for (m, n) in [(7, 0), (107, 100), (1007, 1000)] {
            let s = dot(&rotate(&rope, &q, m), &rotate(&rope, &k, n));
            assert!(
                (s - base).abs() < 2e-4 * (1.0 + base.abs()),
                "{pairs:?} ({m},{n}): {s} vs {base}"
            );
        }
        let r = rotate(&rope, &q, 12345);
        assert!((dot(&r, &r) - dot(&q, &q)).abs() < 1e-4 * dot(&q, &q));
        // The backward is the transpose: ⟨R x, y⟩ = ⟨x, Rᵀ y⟩.
        let mut rty = k.clone();
        rope.backward(
            &mut ViewMut::contiguous(&mut rty, [1, 1, 1, d]).unwrap(),
            &[77],
        )
        .unwrap();
        assert!((dot(&rotate(&rope, &q, 77), &k) - dot(&q, &rty)).abs() < 1e-4);
    }
    // The pairings agree under the permutation new[i] = old[2i], new[i + d/2] = old[2i + 1].
    let perm = |x: &[f32]| -> Vec<f32> {
        (0..d)
            .map(|c| {
                if c < d / 2 {
                    x[2 * c]
                } else {
                    x[2 * (c - d / 2) + 1]
                }
            })
            .collect()
    };
    let inter = Rope::new(d, 10000.0, RopePairs::Interleaved).unwrap();
    let half = Rope::new(d, 10000.0, RopePairs::HalfSplit).unwrap();
    let (a, b) = (perm(&rotate(&inter, &q, 42)), rotate(&half, &perm(&q), 42));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6));
}

#[test]
fn rope_on_strided_views_and_partial_rotary() {
    // [B, N, H, D] storage through a view; only the first 8 of 12 features rotate.
    let (b, n, h, d) = (2, 5, 3, 12);
    let mut rng = Rng::new(8);
    let x = rng.vec(b * n * h * d);
    let rope = Rope::new(8, 500.0, RopePairs::HalfSplit).unwrap();
    let mut y = x.clone();
    let pos: Vec<usize> = (100..100 + n).collect();
    rope.apply(&mut ViewMut::from_bnhd(&mut y, [b, n, h, d]).unwrap(), &pos)
        .unwrap();
    for (bi, ni, hi) in [(0, 0, 0), (1, 4, 2), (1, 2, 1)] {
        let at = ((bi * n + ni) * h + hi) * d;
        let want = rotate(&rope, &x[at..at + d], 100 + ni);
        assert_eq!(&y[at..at + d], &want[..]);
        assert_eq!(&y[at + 8..at + d], &x[at + 8..at + d]);
    }
    assert!(Rope::new(7, 10000.0, RopePairs::Interleaved).is_err());
    assert!(Rope::new(8, f64::NAN, RopePairs::Interleaved).is_err());
    let mut small = vec![0.0; 4];
    let mut v = ViewMut::contiguous(&mut small, [1, 1, 1, 4]).unwrap();
    assert!(rope.apply(&mut v, &[0]).is_err(), "dims 8 > D 4");
    assert!(Rope::new(4, 10000.0, RopePairs::Interleaved)
        .unwrap()
        .apply(&mut v, &[0, 1])
        .is_err());
}

#[test]
fn learned_absolute_positions_and_their_gradient() {
    let (b, n, d, max_len) = (2, 3, 4, 10);
    let table: Vec<f32> = (0..max_len * d).map(|x| x as f32).collect();
    let mut x = vec![1.0f32; b * n * d];
    add_learned(
        &mut ViewMut::contiguous(&mut x, [b, 1, n, d]).unwrap(),
        &table,
        5,
    )
    .unwrap();
    assert_eq!(&x[..d], &[21.0, 22.0, 23.0, 24.0]);
    assert_eq!(&x[b * n * d - d..], &[29.0, 30.0, 31.0, 32.0]);
    let dx = vec![0.5f32; b * n * d];
    let mut dt = vec![0.0f32; max_len * d];
    add_learned_backward(cv(&dx, [b, 1, n, d]), &mut dt, 5).unwrap();
    assert_eq!(dt.iter().sum::<f32>(), 0.5 * (b * n * d) as f32);
    assert_eq!(&dt[5 * d..6 * d], &[1.0; 4]);
    assert!(add_learned(
        &mut ViewMut::contiguous(&mut x, [b, 1, n, d]).unwrap(),
        &table,
        8
    )
    .is_err());
}

#[test]
fn softcap_golden_value() {
    // One key: the log-sum-exp is the logit itself, 50·tanh(100/50).
    let q = [10.0f32, 10.0];
    let k = [5.0f32, 5.0];
    let mut o = [0.0f32; 2];
    let mut lse = [0.0f32];
    let opts = Options::new().scale(1.0).softcap(50.0);
    forward(
        cv(&q, [1, 1, 1, 2]),
        cv(&k, [1, 1, 1, 2]),
        cv(&k, [1, 1, 1, 2]),
        &opts,
        &mut ViewMut::contiguous(&mut o, [1, 1, 1, 2]).unwrap(),
        Some(&mut lse),
    )
    .unwrap();
    assert!((lse[0] - 48.201379).abs() < 1e-5, "{}", lse[0]);
}

#[test]
fn t5_bias_forward_backward_and_table_gradient() {
    let mut rng = Rng::new(17);
    for (bidirectional, nq, nk) in [(true, 70, 70), (false, 130, 130), (false, 20, 150)] {
        let (b, hq, hkv, d) = (2, 4, 2, 16);
        let q = rng.vec(b * hq * nq * d);
        let k = rng.vec(b * hkv * nk * d);
        let v = rng.vec(b * hkv * nk * d);
        let d_o = rng.vec(b * hq * nq * d);
        let table: Vec<f32> = rng.vec(hq * 32).iter().map(|x| x * 3.0).collect();
        let rule = T5Bias {
            table: &table,
            bidirectional,
            num_buckets: 32,
            max_distance: 128,
            offset: nk as i64 - nq as i64,
        };
        let mut opts = Options::new().scale(1.0).score_rule(&rule);
        if !bidirectional {
            opts = opts.causal(attentive::Causal::BottomRight);
        }
        let (qv, kv, vv, dov) = (
            cv(&q, [b, hq, nq, d]),
            cv(&k, [b, hkv, nk, d]),
            cv(&v, [b, hkv, nk, d]),
            cv(&d_o, [b, hq, nq, d]),
        );
        let r64 = reference::forward::<f64>(qv, kv, vv, &opts).unwrap();
        let r32 = reference::forward::<f32>(qv, kv, vv, &opts).unwrap();
        let mut o = vec![0.0; b * hq * nq * d];
        let mut lse = vec![0.0; b * hq * nq];
        forward(
            qv,
            kv,
            vv,
            &opts,
            &mut ViewMut::contiguous(&mut o, [b, hq, nq, d]).unwrap(),
            Some(&mut lse),
        )
        .unwrap();
        check_rule("O", &o, &r32.o, &r64.o, 2.0).unwrap();
        let g64 = reference::backward::<f64>(qv, kv, vv, dov, &opts).unwrap();
        let g32 =
            reference::backward_from_output::<f32>(qv, kv, vv, (&r32.o, &r32.lse), dov, &opts)
                .unwrap();
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let mut dtable = vec![0.0f32; table.len()];
        backward_rule_params(
            qv,
            kv,
            vv,
            cv(&o, [b, hq, nq, d]),
            &lse,
            dov,
            &opts,
            &mut ViewMut::contiguous(&mut dq, [b, hq, nq, d]).unwrap(),
            &mut ViewMut::contiguous(&mut dk, [b, hkv, nk, d]).unwrap(),
            &mut ViewMut::contiguous(&mut dv, [b, hkv, nk, d]).unwrap(),
            &mut dtable,
        )
        .unwrap();
        check_rule("dQ", &dq, &g32.dq, &g64.dq, 3.0).unwrap();
        check_rule("dK", &dk, &g32.dk, &g64.dk, 3.0).unwrap();
        check_rule("dTable", &dtable, &g32.d_params, &g64.d_params, 3.0).unwrap();
        assert!(
            g64.d_params.iter().any(|&x| x.abs() > 1e-3),
            "the table gets a gradient"
        );
        // The oracle's table gradient against central differences of Σ O∘dO in f64.
        let loss = |t: &[f32]| -> f64 {
            let r = T5Bias { table: t, ..rule };
            let mut o2 = opts;
            o2.score_rule = Some(&r);
            let f = reference::forward::<f64>(qv, kv, vv, &o2).unwrap();
            f.o.iter().zip(&d_o).map(|(a, b)| a * *b as f64).sum()
        };
        for idx in [0, 5, 17, 31, 32 * 3 + 9] {
            let h = 1.0 / 64.0;
            let (mut up, mut dn) = (table.clone(), table.clone());
            up[idx] += h;
            dn[idx] -= h;
            let fd = (loss(&up) - loss(&dn)) / (2.0 * h as f64);
            let an = g64.d_params[idx];
            assert!(
                (fd - an).abs() < 1e-3 * (1.0 + an.abs()),
                "entry {idx}: fd {fd} vs {an}"
            );
        }
    }
}

#[test]
fn prefill_with_a_window_equals_step_by_step_decoding() {
    // A window of W keys ending at the query: Window { left: W − 1, right: 0 }.
    let (h, n, d, w) = (2, 200, 32, 48);
    let mut rng = Rng::new(4);
    let (q, k, v) = (rng.vec(h * n * d), rng.vec(h * n * d), rng.vec(h * n * d));
    let opts = Options {
        window: Some(Window {
            left: w - 1,
            right: 0,
        }),
        ..Options::new()
    };
    let mut full = vec![0.0; h * n * d];
    forward(
        cv(&q, [1, h, n, d]),
        cv(&k, [1, h, n, d]),
        cv(&v, [1, h, n, d]),
        &opts,
        &mut ViewMut::contiguous(&mut full, [1, h, n, d]).unwrap(),
        None,
    )
    .unwrap();
    for t in 0..n {
        // Decoding token t: one query against the cache of keys 0..=t.
        let cache = |x: &[f32]| common::rows_of(x, [h, n, d], 0, t + 1).to_vec();
        let (kc, vc) = (cache(&k), cache(&v));
        let qt = common::rows_of(&q, [h, n, d], t, 1).to_vec();
        let mut o = vec![0.0; h * d];
        forward(
            cv(&qt, [1, h, 1, d]),
            cv(&kc, [1, h, t + 1, d]),
            cv(&vc, [1, h, t + 1, d]),
            &opts,
            &mut ViewMut::contiguous(&mut o, [1, h, 1, d]).unwrap(),
            None,
        )
        .unwrap();
        for hh in 0..h {
            let want = &full[(hh * n + t) * d..(hh * n + t + 1) * d];
            let got = &o[hh * d..(hh + 1) * d];
            let err = want
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-6, "token {t} head {hh}: {err}");
        }
    }
}

#[test]
fn t5_bias_with_a_wrong_table_is_an_error() {
    let x = vec![0.1f32; 2 * 5 * 4];
    let q = cv(&x, [1, 2, 5, 4]);
    let mut o = vec![0.0; x.len()];
    let short = [0.0f32; 32];
    for (table, nb) in [(&short[..], 32), (&short[..7], 4), (&short[..4], 2)] {
        let rule = T5Bias {
            table,
            bidirectional: true,
            num_buckets: nb,
            max_distance: 128,
            offset: 0,
        };
        let opts = Options::new().score_rule(&rule);
        let r = forward(
            q,
            q,
            q,
            &opts,
            &mut ViewMut::contiguous(&mut o, [1, 2, 5, 4]).unwrap(),
            None,
        );
        assert!(r.is_err(), "table {} buckets {nb}", table.len());
    }
}
