//! Linear attention against its f64 oracle (the quadratic form, pair by pair) by the accuracy
//! rule on awkward shapes and layouts; the oracle's gradients against finite differences; the
//! recurrent step equal to the causal kernel; causal outputs independent of future keys; long
//! sequences against the f64 recurrence; and bad input.

mod common;
use attentive::reference::variants::linear as oracle;
use attentive::variants::linear::{backward, forward, Linear, LinearState};
use attentive::{AttnError, Isa, View, ViewMut};
use common::{check_rule, Layout, OutBuf, Rng, Tensor};

struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    nq: usize,
    nk: usize,
    d: usize,
    dv: usize,
    causal: bool,
    masked: bool,
    layout: Layout,
}

fn run(c: &Case, rng: &mut Rng) -> Result<(), String> {
    let q = Tensor::new(
        &rng.vec(c.b * c.hq * c.nq * c.d),
        [c.b, c.hq, c.nq, c.d],
        c.layout,
    );
    let k = Tensor::new(
        &rng.vec(c.b * c.hkv * c.nk * c.d),
        [c.b, c.hkv, c.nk, c.d],
        c.layout,
    );
    let v = Tensor::new(
        &rng.vec(c.b * c.hkv * c.nk * c.dv),
        [c.b, c.hkv, c.nk, c.dv],
        c.layout,
    );
    let d_o = Tensor::new(
        &rng.vec(c.b * c.hq * c.nq * c.dv),
        [c.b, c.hq, c.nq, c.dv],
        c.layout,
    );
    let mask: Vec<bool> = (0..c.b * c.nk).map(|x| !c.masked || x % 3 != 1).collect();
    let opts = Linear {
        causal: c.causal,
        key_mask: c.masked.then_some(&mask[..]),
        ..Default::default()
    };
    let (qv, kv, vv, dov) = (q.view(), k.view(), v.view(), d_o.view());
    let s = |e: AttnError| e.to_string();
    let o64 = oracle::<f64>(qv, kv, vv, dov, &opts).map_err(s)?;
    let o32 = oracle::<f32>(qv, kv, vv, dov, &opts).map_err(s)?;
    // Every instruction set's products, the scalar path among them.
    for isa in Isa::all_available() {
        let opts = Linear { isa, ..opts };
        let at = |e: String| format!("{isa:?}: {e}");
        let mut out = OutBuf::new([c.b, c.hq, c.nq, c.dv], c.layout);
        forward(qv, kv, vv, &opts, &mut out.view()).map_err(s)?;
        check_rule("O", &out.row_major(), &o32.0, &o64.0, 2.0).map_err(at)?;
        let mut dq = OutBuf::new([c.b, c.hq, c.nq, c.d], c.layout);
        let mut dk = OutBuf::new([c.b, c.hkv, c.nk, c.d], c.layout);
        let mut dv = OutBuf::new([c.b, c.hkv, c.nk, c.dv], c.layout);
        let (gq, gk, gv) = (&mut dq.view(), &mut dk.view(), &mut dv.view());
        backward(qv, kv, vv, dov, &opts, gq, gk, gv).map_err(s)?;
        check_rule("dQ", &dq.row_major(), &o32.1, &o64.1, 3.0).map_err(at)?;
        check_rule("dK", &dk.row_major(), &o32.2, &o64.2, 3.0).map_err(at)?;
        check_rule("dV", &dv.row_major(), &o32.3, &o64.3, 3.0).map_err(at)?;
    }
    Ok(())
}

#[test]
fn forward_and_backward_against_the_oracle_on_awkward_shapes() {
    let mut rng = Rng::new(81);
    let mut n = 0;
    for causal in [false, true] {
        for &(nq, nk) in &[
            (1, 1),
            (1, 7),
            (5, 5),
            (63, 63),
            (64, 64),
            (65, 65),
            (130, 130),
            (9, 200),
        ] {
            if causal && nq != nk {
                continue;
            }
            for &(hq, hkv) in &[(1, 1), (4, 2), (3, 1)] {
                let c = Case {
                    b: 1 + n % 2,
                    hq,
                    hkv,
                    nq,
                    nk,
                    d: [1, 7, 16, 33][n % 4],
                    dv: [1, 5, 16, 32][(n / 2) % 4],
                    causal,
                    masked: n % 3 == 2,
                    layout: [Layout::Bhnd, Layout::Bnhd, Layout::Bhdn][n % 3],
                };
                run(&c, &mut rng).unwrap_or_else(|e| {
                    panic!("causal {causal}, nq {nq}, nk {nk}, heads {hq}/{hkv}: {e}")
                });
                n += 1;
            }
        }
    }
    assert!(n > 30);
}

/// The f64 oracle's gradients against central differences of its own output, in f64 (the
/// kernel's gradients are held to the oracle's above).
#[test]
fn oracle_gradients_equal_finite_differences() {
    let mut rng = Rng::new(5);
    for causal in [false, true] {
        let (b, h, n, d, dv) = (1, 2, 6, 3, 2);
        let q = rng.vec(b * h * n * d);
        let k = rng.vec(b * h * n * d);
        let v = rng.vec(b * h * n * dv);
        let g = rng.vec(b * h * n * dv);
        let mask = [true, true, false, true, true, true];
        let opts = Linear {
            causal,
            key_mask: Some(&mask),
            ..Default::default()
        };
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let (o, ..) = oracle::<f64>(
                View::contiguous(q, &[b, h, n, d]).unwrap(),
                View::contiguous(k, &[b, h, n, d]).unwrap(),
                View::contiguous(v, &[b, h, n, dv]).unwrap(),
                View::contiguous(&g, &[b, h, n, dv]).unwrap(),
                &opts,
            )
            .unwrap();
            o.iter().zip(&g).map(|(o, g)| o * *g as f64).sum()
        };
        let (_, dq, dk, dvv) = oracle::<f64>(
            View::contiguous(&q, &[b, h, n, d]).unwrap(),
            View::contiguous(&k, &[b, h, n, d]).unwrap(),
            View::contiguous(&v, &[b, h, n, dv]).unwrap(),
            View::contiguous(&g, &[b, h, n, dv]).unwrap(),
            &opts,
        )
        .unwrap();
        let eps = 1e-3f32;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dvv)] {
            for idx in 0..grad.len() {
                let bump = |e: f32| {
                    let (mut q, mut k, mut v) = (q.clone(), k.clone(), v.clone());
                    [&mut q, &mut k, &mut v][which][idx] += e;
                    loss(&q, &k, &v)
                };
                let fd = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
                // f32 inputs move by ε exactly; the loss is f64: the difference is good to ~1e-6.
                assert!(
                    (fd - grad[idx]).abs() < 2e-4 * (1.0 + fd.abs()),
                    "causal {causal}, tensor {which}, element {idx}: {} vs {fd}",
                    grad[idx]
                );
            }
        }
    }
}

/// Recurrent = chunked: a decoder pushing one token at a time reads what the causal kernel
/// computes; and outputs at i do not move when keys or values after i do.
#[test]
fn the_recurrent_step_equals_the_causal_kernel_and_ignores_the_future() {
    let mut rng = Rng::new(9);
    let (n, d, dv) = (150, 8, 5);
    let q = rng.vec(n * d);
    let mut k = rng.vec(n * d);
    let mut v = rng.vec(n * dv);
    let opts = Linear {
        causal: true,
        ..Default::default()
    };
    let causal = |k: &[f32], v: &[f32]| {
        let mut o = vec![0.0f32; n * dv];
        forward(
            View::contiguous(&q, &[1, 1, n, d]).unwrap(),
            View::contiguous(k, &[1, 1, n, d]).unwrap(),
            View::contiguous(v, &[1, 1, n, dv]).unwrap(),
            &opts,
            &mut ViewMut::contiguous(&mut o, [1, 1, n, dv]).unwrap(),
        )
        .unwrap();
        o
    };
    let full = causal(&k, &v);
    let mut st = LinearState::new(d, dv);
    let mut row = vec![0.0f32; dv];
    for i in 0..n {
        st.push(&k[i * d..(i + 1) * d], &v[i * dv..(i + 1) * dv])
            .unwrap();
        st.read(&q[i * d..(i + 1) * d], opts.eps, &mut row).unwrap();
        let err = row
            .iter()
            .zip(&full[i * dv..(i + 1) * dv])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-5, "row {i}: recurrent and chunked differ by {err}");
    }
    assert_eq!(st.len(), n);
    let cut = 70;
    for x in &mut k[(cut + 1) * d..] {
        *x = -*x * 3.0;
    }
    for x in &mut v[(cut + 1) * dv..] {
        *x += 1.0;
    }
    let moved = causal(&k, &v);
    assert_eq!(
        full[..(cut + 1) * dv],
        moved[..(cut + 1) * dv],
        "the future leaked"
    );
    assert_ne!(full[(cut + 1) * dv..], moved[(cut + 1) * dv..]);
}

/// At N = 65 536 the f32 states hold: the causal kernel against the recurrence in f64.
#[test]
fn long_causal_sequences_stay_accurate() {
    let mut rng = Rng::new(12);
    let (n, d, dv) = (65_536, 32, 8);
    let q = rng.vec(n * d);
    let k = rng.vec(n * d);
    let v = rng.vec(n * dv);
    let mut o = vec![0.0f32; n * dv];
    forward(
        View::contiguous(&q, &[1, 1, n, d]).unwrap(),
        View::contiguous(&k, &[1, 1, n, d]).unwrap(),
        View::contiguous(&v, &[1, 1, n, dv]).unwrap(),
        &Linear {
            causal: true,
            ..Default::default()
        },
        &mut ViewMut::contiguous(&mut o, [1, 1, n, dv]).unwrap(),
    )
    .unwrap();
    let phi = |x: f32| {
        if x > 0.0 {
            x as f64 + 1.0
        } else {
            (x as f64).exp()
        }
    };
    let (mut s, mut z) = (vec![0.0f64; d * dv], vec![0.0f64; d]);
    let (mut worst, mut den_max) = (0.0f64, 0.0f64);
    for i in 0..n {
        for c in 0..d {
            let b = phi(k[i * d + c]);
            z[c] += b;
            for e in 0..dv {
                s[c * dv + e] += b * v[i * dv + e] as f64;
            }
        }
        let a: Vec<f64> = (0..d).map(|c| phi(q[i * d + c])).collect();
        let den: f64 = (0..d).map(|c| a[c] * z[c]).sum::<f64>() + 1e-6;
        den_max = den_max.max(den);
        for e in 0..dv {
            let num: f64 = (0..d).map(|c| a[c] * s[c * dv + e]).sum();
            worst = worst.max((o[i * dv + e] as f64 - num / den).abs());
        }
    }
    assert!(den_max > 1e5, "denominators reach {den_max:e}");
    assert!(worst < 1e-4, "max error {worst:e} at N = {n}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let x = vec![0.5f32; 2 * 4 * 3];
    let q = View::contiguous(&x, &[1, 2, 4, 3]).unwrap();
    let k3 = View::contiguous(&x[..12], &[1, 1, 3, 4]).unwrap();
    let mut o = vec![0.0f32; 24];
    let mut out = ViewMut::contiguous(&mut o, [1, 2, 4, 3]).unwrap();
    let err = forward(q, k3, k3, &Linear::default(), &mut out).unwrap_err();
    assert!(
        matches!(err, AttnError::ShapeMismatch { tensor: "k", .. }),
        "{err}"
    );
    let k = View::contiguous(&x[..12], &[1, 1, 4, 3]).unwrap();
    let short = View::contiguous(&x[..9], &[1, 1, 3, 3]).unwrap();
    let causal = Linear {
        causal: true,
        ..Default::default()
    };
    let mut o2 = vec![0.0f32; 24];
    let mut out2 = ViewMut::contiguous(&mut o2, [1, 2, 4, 3]).unwrap();
    assert!(matches!(
        forward(q, short, short, &causal, &mut out2),
        Err(AttnError::ConflictingOptions { .. })
    ));
    let nan = Linear {
        eps: f32::NAN,
        ..Default::default()
    };
    assert!(matches!(
        forward(q, k, k, &nan, &mut out),
        Err(AttnError::InvalidOption { option: "eps", .. })
    ));
    let mask = [true; 3];
    let masked = Linear {
        key_mask: Some(&mask),
        ..Default::default()
    };
    assert!(matches!(
        forward(q, k, k, &masked, &mut out),
        Err(AttnError::LengthMismatch {
            tensor: "key_mask",
            ..
        })
    ));
    let three = View::contiguous(&x[..18], &[1, 3, 2, 3]).unwrap();
    assert!(matches!(
        forward(q, three, three, &Linear::default(), &mut out),
        Err(AttnError::ShapeMismatch { .. }) | Err(AttnError::HeadsNotDivisible { .. })
    ));
    let mut st = LinearState::new(3, 3);
    assert!(matches!(
        st.push(&[1.0], &[1.0; 3]),
        Err(AttnError::LengthMismatch { tensor: "k", .. })
    ));
}
