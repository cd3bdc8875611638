//! Bahdanau's additive and Luong's dot, general and concat scores, global and under Luong's
//! local-p window, against their f64 oracle by the accuracy rule (weights' gradients included),
//! the oracle against finite differences, local-p's limits (a wide flat window is global
//! attention), padding (a fully hidden row gives 0, never NaN), and bad input.

mod common;
use attentive::reference::variants::additive as oracle;
use attentive::variants::additive::{backward, forward, Additive, Local, Score};
use attentive::{AttnError, View, ViewMut};
use common::{check_rule, cv, Rng};

struct W {
    wq: Vec<f32>,
    wk: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
    c: Vec<f32>,
}

fn weights(rng: &mut Rng, a: usize, dq: usize, dk: usize) -> W {
    let mut s = |n: usize, amp: f32| -> Vec<f32> { rng.vec(n).iter().map(|x| x * amp).collect() };
    W {
        wq: s(a * dq, 0.5),
        wk: s(a * dk, 0.5),
        v: s(a, 1.0),
        g: s(dq * dk, 0.5),
        c: s(a * (dq + dk), 0.5),
    }
}

fn scores(w: &W) -> [Score<'_>; 4] {
    [
        Score::Additive {
            w_q: &w.wq,
            w_k: &w.wk,
            v: &w.v,
        },
        Score::Dot,
        Score::General { w: &w.g },
        Score::Concat { w: &w.c, v: &w.v },
    ]
}

#[test]
fn every_score_against_the_oracle() {
    let mut rng = Rng::new(27);
    for &(b, hq, hkv, nq, nk, dq, dk, dv, a) in &[
        (1, 1, 1, 1, 1, 3, 3, 2, 4),
        (2, 2, 1, 7, 11, 5, 5, 4, 6),
        (1, 3, 3, 20, 9, 8, 8, 8, 16),
        (2, 2, 2, 6, 13, 4, 6, 3, 5),
    ] {
        let w = weights(&mut rng, a, dq, dk);
        let (wp, vp) = (rng.vec(a * dq), rng.vec(a));
        let (q, k, v, g) = (
            rng.vec(b * hq * nq * dq),
            rng.vec(b * hkv * nk * dk),
            rng.vec(b * hkv * nk * dv),
            rng.vec(b * hq * nq * dv),
        );
        // Every fifth key hidden, and with two batch rows all of the first's: rows with no key.
        let mask: Vec<bool> = (0..b * nk)
            .map(|x| x % 5 != 3 && !(x < nk && nk > 1 && b > 1))
            .collect();
        for score in scores(&w) {
            if matches!(score, Score::Dot) && dq != dk {
                continue;
            }
            for (masked, local) in [(false, false), (true, false), (false, true), (true, true)] {
                let opts = Additive {
                    score,
                    key_mask: masked.then_some(&mask[..]),
                    local: local.then_some(Local {
                        w_p: &wp,
                        v_p: &vp,
                        half_width: 1 + nk / 4,
                        sigma: None,
                    }),
                };
                let (qv, kv, vv, gv) = (
                    cv(&q, [b, hq, nq, dq]),
                    cv(&k, [b, hkv, nk, dk]),
                    cv(&v, [b, hkv, nk, dv]),
                    cv(&g, [b, hq, nq, dv]),
                );
                let o64 = oracle::<f64>(qv, kv, vv, gv, &opts).unwrap();
                let o32 = oracle::<f32>(qv, kv, vv, gv, &opts).unwrap();
                let at = |e: String| {
                    panic!("{score:?}, masked {masked}, local {local}, n {nq}×{nk}: {e}")
                };
                let mut o = vec![f32::NAN; b * hq * nq * dv];
                forward(
                    qv,
                    kv,
                    vv,
                    &opts,
                    &mut ViewMut::contiguous(&mut o, [b, hq, nq, dv]).unwrap(),
                    None,
                )
                .unwrap();
                assert!(o.iter().all(|x| x.is_finite()));
                check_rule("O", &o, &o32.0, &o64.0, 2.0).unwrap_or_else(at);
                let (mut dqg, mut dkg, mut dvg) =
                    (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
                let wg = backward(
                    qv,
                    kv,
                    vv,
                    gv,
                    &opts,
                    &mut ViewMut::contiguous(&mut dqg, [b, hq, nq, dq]).unwrap(),
                    &mut ViewMut::contiguous(&mut dkg, [b, hkv, nk, dk]).unwrap(),
                    &mut ViewMut::contiguous(&mut dvg, [b, hkv, nk, dv]).unwrap(),
                )
                .unwrap();
                check_rule("dQ", &dqg, &o32.1, &o64.1, 3.0).unwrap_or_else(at);
                check_rule("dK", &dkg, &o32.2, &o64.2, 3.0).unwrap_or_else(at);
                check_rule("dV", &dvg, &o32.3, &o64.3, 3.0).unwrap_or_else(at);
                for (name, got, i) in [
                    ("dW", &wg.w, 0),
                    ("dW_k", &wg.w_k, 1),
                    ("dv", &wg.v, 2),
                    ("dW_p", &wg.w_p, 3),
                    ("dv_p", &wg.v_p, 4),
                ] {
                    assert_eq!(got.len(), o64.4[i].len(), "{score:?} {name}");
                    check_rule(name, got, &o32.4[i], &o64.4[i], 3.0).unwrap_or_else(at);
                }
            }
        }
    }
}

/// The oracle's gradients (weights included) against central differences, for the additive
/// and general scores.
#[test]
fn oracle_gradients_equal_finite_differences() {
    let mut rng = Rng::new(3);
    let (nq, nk, d, dv, a) = (3, 4, 3, 2, 3);
    let w = weights(&mut rng, a, d, d);
    let (q, k, v, g) = (
        rng.vec(nq * d),
        rng.vec(nk * d),
        rng.vec(nk * dv),
        rng.vec(nq * dv),
    );
    let run = |x: &[Vec<f32>], general: bool| {
        let score = if general {
            Score::General { w: &x[3] }
        } else {
            Score::Additive {
                w_q: &x[3],
                w_k: &x[4],
                v: &x[5],
            }
        };
        oracle::<f64>(
            cv(&x[0], [1, 1, nq, d]),
            cv(&x[1], [1, 1, nk, d]),
            cv(&x[2], [1, 1, nk, dv]),
            cv(&g, [1, 1, nq, dv]),
            &Additive {
                score,
                key_mask: None,
                local: None,
            },
        )
        .unwrap()
    };
    for general in [false, true] {
        let base = if general {
            vec![q.clone(), k.clone(), v.clone(), w.g.clone()]
        } else {
            vec![
                q.clone(),
                k.clone(),
                v.clone(),
                w.wq.clone(),
                w.wk.clone(),
                w.v.clone(),
            ]
        };
        let out = run(&base, general);
        let grads: Vec<&Vec<f64>> = vec![&out.1, &out.2, &out.3, &out.4[0], &out.4[1], &out.4[2]];
        for (which, grad) in grads.iter().enumerate().take(base.len()) {
            for idx in 0..grad.len() {
                let loss = |e: f32| {
                    let mut x = base.clone();
                    x[which][idx] += e;
                    run(&x, general)
                        .0
                        .iter()
                        .zip(&g)
                        .map(|(o, g)| o * *g as f64)
                        .sum::<f64>()
                };
                let fd = (loss(1e-3) - loss(-1e-3)) / 2e-3;
                assert!(
                    (fd - grad[idx]).abs() < 1e-4 * (1.0 + fd.abs()),
                    "general {general}, tensor {which}[{idx}]: {} vs {fd}",
                    grad[idx]
                );
            }
        }
    }
}

/// Local-p's oracle gradients (the centre's weights, queries, keys, values) against central
/// differences, on a general score.
#[test]
fn local_p_oracle_gradients_equal_finite_differences() {
    let mut rng = Rng::new(19);
    let (nq, nk, d, dv, a) = (3, 9, 3, 2, 2);
    let base = vec![
        rng.vec(nq * d),
        rng.vec(nk * d),
        rng.vec(nk * dv),
        rng.vec(d * d),
        rng.vec(a * d),
        rng.vec(a),
    ];
    let g = rng.vec(nq * dv);
    let run = |x: &[Vec<f32>]| {
        oracle::<f64>(
            cv(&x[0], [1, 1, nq, d]),
            cv(&x[1], [1, 1, nk, d]),
            cv(&x[2], [1, 1, nk, dv]),
            cv(&g, [1, 1, nq, dv]),
            &Additive {
                score: Score::General { w: &x[3] },
                key_mask: None,
                local: Some(Local {
                    w_p: &x[4],
                    v_p: &x[5],
                    half_width: 3,
                    sigma: None,
                }),
            },
        )
        .unwrap()
    };
    let out = run(&base);
    let grads = [&out.1, &out.2, &out.3, &out.4[0], &out.4[3], &out.4[4]];
    for (which, grad) in grads.iter().enumerate() {
        for idx in 0..grad.len() {
            let loss = |e: f32| {
                let mut x = base.clone();
                x[which][idx] += e;
                run(&x)
                    .0
                    .iter()
                    .zip(&g)
                    .map(|(o, g)| o * *g as f64)
                    .sum::<f64>()
            };
            let fd = (loss(1e-3) - loss(-1e-3)) / 2e-3;
            assert!(
                (fd - grad[idx]).abs() < 1e-4 * (1.0 + fd.abs()),
                "tensor {which}[{idx}]: {} vs {fd}",
                grad[idx]
            );
        }
    }
}

/// A window wider than the keys with a flat Gaussian (σ huge) is global attention; with the
/// centre pinned near key 6 (v_p large), a half-width 1 window sees keys 5..=7 only.
#[test]
fn local_p_limits() {
    let mut rng = Rng::new(4);
    let (nq, nk, d) = (4, 10, 3);
    let (q, k, v) = (rng.vec(nq * d), rng.vec(nk * d), rng.vec(nk * d));
    let run = |local: Option<Local>, k: &[f32], v: &[f32], nk: usize| {
        let mut o = vec![0.0f32; nq * d];
        forward(
            cv(&q, [1, 1, nq, d]),
            cv(k, [1, 1, nk, d]),
            cv(v, [1, 1, nk, d]),
            &Additive {
                score: Score::Dot,
                key_mask: None,
                local,
            },
            &mut ViewMut::contiguous(&mut o, [1, 1, nq, d]).unwrap(),
            None,
        )
        .unwrap();
        o
    };
    let (wp, vp) = (rng.vec(2 * d), rng.vec(2));
    let wide = Local {
        w_p: &wp,
        v_p: &vp,
        half_width: 2 * nk,
        sigma: Some(1e6),
    };
    let max = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let err = max(&run(Some(wide), &k, &v, nk), &run(None, &k, &v, nk));
    assert!(err < 1e-5, "{err}");
    // W_p = 0: tanh(0) = 0, so z = 0 and p = Nk/2 = 5 for every query: keys 4..=6.
    let zero = vec![0.0f32; 2 * d];
    let pinned = Local {
        w_p: &zero,
        v_p: &vp,
        half_width: 1,
        sigma: Some(1e6),
    };
    let got = run(Some(pinned), &k, &v, nk);
    let want = run(None, &k[4 * d..7 * d], &v[4 * d..7 * d], 3);
    let err = max(&got, &want);
    assert!(err < 1e-5, "{err}");
}

/// A row with every key hidden gives 0, not NaN.
#[test]
fn hidden_rows_are_zero() {
    let q = [1.0f32, 2.0];
    let k = [0.5f32, -0.5, 1.0, 0.0];
    let v = [1.0f32, 2.0, 3.0, 4.0];
    let mask = [false, false];
    let opts = Additive {
        score: Score::Dot,
        key_mask: Some(&mask),
        local: None,
    };
    let mut o = [f32::NAN; 2];
    forward(
        cv(&q, [1, 1, 1, 2]),
        cv(&k, [1, 1, 2, 2]),
        cv(&v, [1, 1, 2, 2]),
        &opts,
        &mut ViewMut::contiguous(&mut o, [1, 1, 1, 2]).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(o, [0.0, 0.0]);
}

#[test]
fn bad_input_is_a_clear_error() {
    let x = vec![0.1f32; 24];
    let q = View::contiguous(&x, &[1, 2, 4, 3]).unwrap();
    let k4 = View::contiguous(&x, &[1, 2, 3, 4]).unwrap();
    let mut o = vec![0.0f32; 24];
    let mut out = ViewMut::contiguous(&mut o, [1, 2, 4, 3]).unwrap();
    let e = forward(
        q,
        k4,
        q,
        &Additive {
            score: Score::Dot,
            key_mask: None,
            local: None,
        },
        &mut out,
        None,
    )
    .unwrap_err();
    assert!(matches!(e, AttnError::ShapeMismatch { .. }), "{e}");
    let w = [0.5f32; 5];
    let e = forward(
        q,
        q,
        q,
        &Additive {
            score: Score::General { w: &w },
            key_mask: None,
            local: None,
        },
        &mut out,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(e, AttnError::LengthMismatch { tensor: "w", .. }),
        "{e}"
    );
    let (wq, wk, v) = ([0.5f32; 6], [f32::NAN; 6], [1.0f32; 2]);
    let e = forward(
        q,
        q,
        q,
        &Additive {
            score: Score::Additive {
                w_q: &wq,
                w_k: &wk,
                v: &v,
            },
            key_mask: None,
            local: None,
        },
        &mut out,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(e, AttnError::InvalidOption { option: "w_k", .. }),
        "{e}"
    ); // Local-p: W_p of the wrong size, a zero half-width (σ = 0).
    let (wp, vp) = ([0.5f32; 5], [1.0f32; 2]);
    let local = |w_p, half_width| Additive {
        local: Some(Local {
            w_p,
            v_p: &vp,
            half_width,
            sigma: None,
        }),
        ..Additive::new(Score::Dot)
    };
    let e = forward(q, q, q, &local(&wp, 2), &mut out, None).unwrap_err();
    assert!(
        matches!(e, AttnError::LengthMismatch { tensor: "w_p", .. }),
        "{e}"
    );
    let wp = [0.5f32; 6];
    let e = forward(q, q, q, &local(&wp, 0), &mut out, None).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::InvalidOption {
                option: "sigma",
                ..
            }
        ),
        "{e}"
    );
}
