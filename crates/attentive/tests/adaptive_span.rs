//! Adaptive attention span: the kernel against the oracle of its score rule by the accuracy rule
//! (span gradients included, every instruction set); the rule against the paper's definition
//! (ramp times softmax, renormalised) computed naively; a full span equal to causal softmax;
//! the span gradient against finite differences; the span loss; bad input.

mod common;
use attentive::reference;
use attentive::variants::adaptive_span::{backward, forward, span_loss, AdaptiveSpan};
use attentive::{AttnError, Causal, Isa, Options, View, ViewMut};
use common::{check_rule, cv, Rng};

type Shape = (usize, usize, usize, usize, [f32; 3], usize, usize);

fn shapes() -> Vec<Shape> {
    // (b, h, n, d, span fractions, max span, ramp)
    vec![
        (1, 3, 1, 4, [0.2, 0.5, 1.3], 8, 2),
        (2, 3, 70, 16, [0.1, 0.45, -0.2], 40, 8),
        (1, 3, 200, 8, [0.3, 0.9, 0.05], 64, 16),
    ]
}

#[test]
fn kernel_against_the_oracle_of_its_rule() {
    let mut rng = Rng::new(13);
    for (b, h, n, d, cur, s, r) in shapes() {
        let len = b * h * n * d;
        let (q, k, v, g) = (rng.vec(len), rng.vec(len), rng.vec(len), rng.vec(len));
        let span = AdaptiveSpan {
            current: &cur,
            max_span: s,
            ramp: r,
        };
        let sh = [b, h, n, d];
        let opts = span.options();
        let r64 = reference::forward::<f64>(cv(&q, sh), cv(&k, sh), cv(&v, sh), &opts).unwrap();
        let r32 = reference::forward::<f32>(cv(&q, sh), cv(&k, sh), cv(&v, sh), &opts).unwrap();
        let g64 = reference::backward::<f64>(cv(&q, sh), cv(&k, sh), cv(&v, sh), cv(&g, sh), &opts)
            .unwrap();
        let stats = (&r32.o[..], &r32.lse[..]);
        let g32 = reference::backward_from_output::<f32>(
            cv(&q, sh),
            cv(&k, sh),
            cv(&v, sh),
            stats,
            cv(&g, sh),
            &opts,
        )
        .unwrap();
        for isa in Isa::all_available() {
            let at = |e: String| panic!("{isa:?}, n {n}: {e}");
            let opts = opts.isa(isa);
            let (mut o, mut lse) = (vec![0.0f32; len], vec![0.0f32; b * h * n]);
            attentive::forward(
                cv(&q, sh),
                cv(&k, sh),
                cv(&v, sh),
                &opts,
                &mut ViewMut::contiguous(&mut o, sh).unwrap(),
                Some(&mut lse),
            )
            .unwrap();
            check_rule("O", &o, &r32.o, &r64.o, 2.0).unwrap_or_else(at);
            let (mut dq, mut dk, mut dv, mut dc) = (
                vec![0.0f32; len],
                vec![0.0f32; len],
                vec![0.0f32; len],
                vec![0.0f32; h],
            );
            let grads = (
                &mut ViewMut::contiguous(&mut dq, sh).unwrap(),
                &mut ViewMut::contiguous(&mut dk, sh).unwrap(),
                &mut ViewMut::contiguous(&mut dv, sh).unwrap(),
            );
            attentive::backward_rule_params(
                cv(&q, sh),
                cv(&k, sh),
                cv(&v, sh),
                cv(&o, sh),
                &lse,
                cv(&g, sh),
                &opts,
                grads.0,
                grads.1,
                grads.2,
                &mut dc,
            )
            .unwrap();
            check_rule("dQ", &dq, &g32.dq, &g64.dq, 3.0).unwrap_or_else(at);
            check_rule("dK", &dk, &g32.dk, &g64.dk, 3.0).unwrap_or_else(at);
            check_rule("dV", &dv, &g32.dv, &g64.dv, 3.0).unwrap_or_else(at);
            check_rule("d_current", &dc, &g32.d_params, &g64.d_params, 3.0).unwrap_or_else(at);
        }
        // The module's own entry points give the same numbers.
        let (mut o, mut lse) = (vec![0.0f32; len], vec![0.0f32; b * h * n]);
        forward(
            cv(&q, sh),
            cv(&k, sh),
            cv(&v, sh),
            &span,
            &mut ViewMut::contiguous(&mut o, sh).unwrap(),
            Some(&mut lse),
        )
        .unwrap();
        check_rule("O", &o, &r32.o, &r64.o, 2.0).unwrap();
        let (mut dq, mut dk, mut dv, mut dc) = (
            vec![0.0f32; len],
            vec![0.0f32; len],
            vec![0.0f32; len],
            vec![7.0f32; h],
        );
        let grads = (
            &mut ViewMut::contiguous(&mut dq, sh).unwrap(),
            &mut ViewMut::contiguous(&mut dk, sh).unwrap(),
            &mut ViewMut::contiguous(&mut dv, sh).unwrap(),
        );
        backward(
            cv(&q, sh),
            cv(&k, sh),
            cv(&v, sh),
            (cv(&o, sh), &lse),
            cv(&g, sh),
            &span,
            grads,
            &mut dc,
        )
        .unwrap();
        check_rule("d_current", &dc, &g32.d_params, &g64.d_params, 3.0).unwrap();
    }
}

/// The rule's softmax of s + ln m equals the paper's form: causal softmax weights times the
/// ramp, renormalised (without the reference code's 1e-8 in the sum).
#[test]
fn the_rule_is_the_papers_renormalised_ramp() {
    let mut rng = Rng::new(4);
    let (n, d, s, r) = (40, 5, 16, 4);
    let cur = [0.4f32];
    let (q, k, v) = (rng.vec(n * d), rng.vec(n * d), rng.vec(n * d));
    let span = AdaptiveSpan {
        current: &cur,
        max_span: s,
        ramp: r,
    };
    let sh = [1, 1, n, d];
    let got =
        reference::forward::<f64>(cv(&q, sh), cv(&k, sh), cv(&v, sh), &span.options()).unwrap();
    let z = cur[0] as f64 * s as f64;
    let mut worst = 0.0f64;
    for i in 0..n {
        let sc: Vec<f64> = (0..=i)
            .map(|j| {
                (0..d)
                    .map(|c| q[i * d + c] as f64 * k[j * d + c] as f64)
                    .sum::<f64>()
                    * (1.0f32 / (d as f32).sqrt()) as f64
            })
            .collect();
        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let a: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
        let za: f64 = a.iter().sum();
        let m: Vec<f64> = (0..=i)
            .map(|j| ((r as f64 + z - (i - j) as f64) / r as f64).clamp(0.0, 1.0))
            .collect();
        let w: Vec<f64> = a.iter().zip(&m).map(|(a, m)| m * a / za).collect();
        let sw: f64 = w.iter().sum();
        for c in 0..d {
            let o: f64 = (0..=i).map(|j| w[j] / sw * v[j * d + c] as f64).sum();
            worst = worst.max((o - got.o[i * d + c]).abs());
        }
    }
    assert!(worst < 1e-12, "{worst:e}");
}

#[test]
fn a_full_span_is_causal_softmax() {
    let mut rng = Rng::new(6);
    let (n, d) = (100, 8);
    let (q, k, v) = (rng.vec(2 * n * d), rng.vec(2 * n * d), rng.vec(2 * n * d));
    let sh = [1, 2, n, d];
    let span = AdaptiveSpan {
        current: &[1.0, 1.0],
        max_span: n,
        ramp: 8,
    };
    let mut o = vec![0.0f32; 2 * n * d];
    forward(
        cv(&q, sh),
        cv(&k, sh),
        cv(&v, sh),
        &span,
        &mut ViewMut::contiguous(&mut o, sh).unwrap(),
        None,
    )
    .unwrap();
    let mut want = vec![0.0f32; 2 * n * d];
    attentive::forward(
        cv(&q, sh),
        cv(&k, sh),
        cv(&v, sh),
        &Options::new().causal(Causal::TopLeft),
        &mut ViewMut::contiguous(&mut want, sh).unwrap(),
        None,
    )
    .unwrap();
    let e = o
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(e < 1e-6, "{e:e}");
}

/// ∂L/∂c_h of the oracle against central differences of its output.
#[test]
fn span_gradient_equals_finite_differences() {
    let mut rng = Rng::new(9);
    let (n, d, s, r) = (30, 4, 20, 6);
    let (q, k, v, g) = (
        rng.vec(2 * n * d),
        rng.vec(2 * n * d),
        rng.vec(2 * n * d),
        rng.vec(2 * n * d),
    );
    let sh = [1, 2, n, d];
    let cur = [0.31f32, 0.62];
    let span = AdaptiveSpan {
        current: &cur,
        max_span: s,
        ramp: r,
    };
    let grads = reference::backward::<f64>(
        cv(&q, sh),
        cv(&k, sh),
        cv(&v, sh),
        cv(&g, sh),
        &span.options(),
    )
    .unwrap();
    for h in 0..2 {
        let loss = |e: f32| {
            let mut c = cur;
            c[h] += e;
            let sp = AdaptiveSpan {
                current: &c,
                max_span: s,
                ramp: r,
            };
            let o = reference::forward::<f64>(cv(&q, sh), cv(&k, sh), cv(&v, sh), &sp.options())
                .unwrap()
                .o;
            o.iter().zip(&g).map(|(o, g)| o * *g as f64).sum::<f64>()
        };
        let eps = 1e-4f32;
        let fd = (loss(eps) - loss(-eps)) / (2.0 * eps as f64);
        assert!(
            grads.d_params[h].abs() > 1e-3,
            "head {h}: a gradient to check"
        );
        assert!(
            (fd - grads.d_params[h]).abs() < 1e-3 * (1.0 + fd.abs()),
            "head {h}: {} vs {fd}",
            grads.d_params[h]
        );
    }
}

#[test]
fn span_loss_and_bad_input() {
    let (l, g) = span_loss(&[0.5, 0.25, 1.5], 100, 0.01);
    assert!((l - 0.01 * 100.0 * (0.5 + 0.25 + 1.0) / 3.0).abs() < 1e-6);
    assert_eq!(g, vec![1.0 / 3.0, 1.0 / 3.0, 0.0]);
    let x = vec![0.1f32; 24];
    let q = View::contiguous(&x, &[1, 2, 4, 3]).unwrap();
    let mut o = vec![0.0f32; 24];
    let mut out = ViewMut::contiguous(&mut o, [1, 2, 4, 3]).unwrap();
    let bad_len = AdaptiveSpan {
        current: &[0.5],
        max_span: 4,
        ramp: 2,
    };
    assert!(matches!(
        forward(q, q, q, &bad_len, &mut out, None),
        Err(AttnError::LengthMismatch {
            tensor: "current",
            ..
        })
    ));
    let no_ramp = AdaptiveSpan {
        current: &[0.5, 0.5],
        max_span: 4,
        ramp: 0,
    };
    assert!(matches!(
        forward(q, q, q, &no_ramp, &mut out, None),
        Err(AttnError::InvalidOption { option: "ramp", .. })
    ));
    let nan = AdaptiveSpan {
        current: &[0.5, f32::NAN],
        max_span: 4,
        ramp: 2,
    };
    assert!(matches!(
        forward(q, q, q, &nan, &mut out, None),
        Err(AttnError::InvalidOption {
            option: "current",
            ..
        })
    ));
}
