//! Hierarchical attention pooling against its f64 oracle by the accuracy rule, the oracle's
//! gradients against finite differences, the document level composed of two poolings (with
//! its backward against finite differences), per-row softmax far below any global max, padding,
//! and bad input.

mod common;
use attentive::reference::variants::han_pool as oracle;
use attentive::variants::han::{document, document_backward, pool, pool_backward, Level};
use attentive::AttnError;
use common::{check_rule, Rng};

fn level(rng: &mut Rng, a: usize, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        rng.vec(a * d),
        rng.vec(a).iter().map(|x| x * 0.3).collect(),
        rng.vec(a),
    )
}

#[test]
fn pooling_against_the_oracle() {
    let mut rng = Rng::new(5);
    for &(groups, n, d, a) in &[(1, 1, 1, 1), (3, 7, 5, 4), (4, 33, 16, 8)] {
        let h = rng.vec(groups * n * d);
        let ds = rng.vec(groups * d);
        let (w, b, c) = level(&mut rng, a, d);
        let lv = Level {
            w: &w,
            b: &b,
            c: &c,
        };
        // Some positions hidden, and with several groups one group entirely.
        let mask: Vec<bool> = (0..groups * n)
            .map(|x| x % 4 != 1 && !(groups > 1 && x < n))
            .collect();
        for m in [None, Some(&mask[..])] {
            let want = oracle::<f64>(&h, (groups, n, d), m, &lv, &ds).unwrap();
            let naive = oracle::<f32>(&h, (groups, n, d), m, &lv, &ds).unwrap();
            let (s, alpha) = pool(&h, (groups, n, d), m, &lv).unwrap();
            check_rule("s", &s, &naive.0, &want.0, 2.0).unwrap();
            check_rule("alpha", &alpha, &naive.1, &want.1, 2.0).unwrap();
            let (dh, g) = pool_backward(&h, (groups, n, d), m, &lv, &ds).unwrap();
            check_rule("dh", &dh, &naive.2, &want.2, 3.0).unwrap();
            check_rule("dW", &g.w, &naive.3, &want.3, 3.0).unwrap();
            check_rule("db", &g.b, &naive.4, &want.4, 3.0).unwrap();
            check_rule("dc", &g.c, &naive.5, &want.5, 3.0).unwrap();
            if m.is_some() && groups > 1 {
                assert!(
                    s[..d].iter().all(|&x| x == 0.0),
                    "a group with nothing visible pools to 0"
                );
            }
        }
    }
}

#[test]
fn oracle_gradients_equal_finite_differences() {
    let mut rng = Rng::new(8);
    let (groups, n, d, a) = (2, 4, 3, 2);
    let h = rng.vec(groups * n * d);
    let ds = rng.vec(groups * d);
    let (w, b, c) = level(&mut rng, a, d);
    let base = vec![h, w, b, c];
    let run = |x: &[Vec<f32>]| {
        oracle::<f64>(
            &x[0],
            (groups, n, d),
            None,
            &Level {
                w: &x[1],
                b: &x[2],
                c: &x[3],
            },
            &ds,
        )
        .unwrap()
    };
    let out = run(&base);
    for (which, grad) in [(0, &out.2), (1, &out.3), (2, &out.4), (3, &out.5)] {
        for idx in 0..grad.len() {
            let loss = |e: f32| {
                let mut x = base.clone();
                x[which][idx] += e;
                run(&x)
                    .0
                    .iter()
                    .zip(&ds)
                    .map(|(s, g)| s * *g as f64)
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

/// Two documents of three sentences of five words; the second document's last sentence and
/// some words are padding. Its backward against central differences of `document`.
#[test]
fn documents_pool_words_then_sentences() {
    let mut rng = Rng::new(12);
    let (docs, sents, words, d, a) = (2, 3, 5, 4, 3);
    let h = rng.vec(docs * sents * words * d);
    let (ww, wb, wc) = level(&mut rng, a, d);
    let (sw, sb, sc) = level(&mut rng, a, d);
    let (wl, sl) = (
        Level {
            w: &ww,
            b: &wb,
            c: &wc,
        },
        Level {
            w: &sw,
            b: &sb,
            c: &sc,
        },
    );
    let mut mask = vec![true; docs * sents * words];
    mask[(sents + 2) * words..(sents + 3) * words].fill(false);
    mask[3] = false;
    let shape = (docs, sents, words, d);
    let (doc, sv, _, sent_alpha) = document(&h, shape, Some(&mask), (&wl, &sl)).unwrap();
    assert_eq!(
        sent_alpha[sents + 2],
        0.0,
        "a sentence of padding gets no weight"
    );
    // The document is the second pooling of the first's output.
    let (again, _) = pool(
        &sv,
        (docs, sents, d),
        Some(&[true, true, true, true, true, false]),
        &sl,
    )
    .unwrap();
    assert_eq!(doc, again);
    let g = rng.vec(docs * d);
    let (dh, gw, gs) = document_backward(&h, shape, Some(&mask), (&wl, &sl), &g).unwrap();
    let loss = |h: &[f32], ww: &[f32], sc: &[f32]| -> f64 {
        let (wl, sl) = (
            Level {
                w: ww,
                b: &wb,
                c: &wc,
            },
            Level {
                w: &sw,
                b: &sb,
                c: sc,
            },
        );
        let (doc, ..) = document(h, shape, Some(&mask), (&wl, &sl)).unwrap();
        doc.iter().zip(&g).map(|(x, y)| *x as f64 * *y as f64).sum()
    };
    let eps = 1e-2f32;
    for (which, grad) in [(0, &dh), (1, &gw.w), (2, &gs.c)] {
        for idx in (0..grad.len()).step_by(7) {
            let bump = |e: f32| {
                let (mut h2, mut w2, mut c2) = (h.clone(), ww.clone(), sc.clone());
                [&mut h2, &mut w2, &mut c2][which][idx] += e;
                loss(&h2, &w2, &c2)
            };
            let fd = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
            assert!(
                (fd - grad[idx] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "tensor {which}[{idx}]: {} vs {fd}",
                grad[idx]
            );
        }
    }
}

/// Scores of one group far below another's: a per-row softmax still pools each.
#[test]
fn per_row_softmax_survives_far_apart_rows() {
    let d = 1;
    let h = [1.0f32, 2.0, 300.0, 301.0];
    let lv = Level {
        w: &[1.0],
        b: &[0.0],
        c: &[200.0],
    };
    let (s, alpha) = pool(&h, (2, 2, d), None, &lv).unwrap();
    assert!(s.iter().all(|x| x.is_finite()) && alpha.iter().all(|x| x.is_finite()));
    assert!(
        ((alpha[0] + alpha[1]) - 1.0).abs() < 1e-6 && ((alpha[2] + alpha[3]) - 1.0).abs() < 1e-6
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let h = [0.5f32; 12];
    let lv = Level {
        w: &[1.0; 6],
        b: &[0.0; 2],
        c: &[1.0; 2],
    };
    assert!(matches!(
        pool(&h, (2, 3, 3), None, &lv),
        Err(AttnError::LengthMismatch { tensor: "h", .. })
    ));
    assert!(matches!(
        pool(&h, (2, 2, 3), Some(&[true; 3]), &lv),
        Err(AttnError::LengthMismatch { tensor: "mask", .. })
    ));
    let bad = Level {
        w: &[1.0; 5],
        b: &[0.0; 2],
        c: &[1.0; 2],
    };
    assert!(matches!(
        pool(&h, (2, 2, 3), None, &bad),
        Err(AttnError::LengthMismatch { tensor: "w", .. })
    ));
    let nan = Level {
        w: &[1.0; 6],
        b: &[f32::NAN, 0.0],
        c: &[1.0; 2],
    };
    assert!(matches!(
        pool(&h, (2, 2, 3), None, &nan),
        Err(AttnError::InvalidOption { option: "b", .. })
    ));
    assert!(matches!(
        pool(&h, (0, 2, 3), None, &lv),
        Err(AttnError::EmptyDimension { .. })
    ));
}
