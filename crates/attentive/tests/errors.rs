//! Every bad input is refused with its typed error before any work, never a panic or a NaN.

use attentive::{backward, forward, AttnError, Options, View, ViewMut};

const S: [usize; 4] = [2, 4, 10, 8];

fn run(q: View, k: View, v: View, opts: &Options) -> Result<(), AttnError> {
    let [b, hq, nq, _] = q.shape();
    let dv = v.shape()[3];
    let mut o = vec![0.0; b * hq * nq * dv];
    let mut out = ViewMut::contiguous(&mut o, [b, hq, nq, dv])?;
    forward(q, k, v, opts, &mut out, None)
}

fn data(s: [usize; 4]) -> Vec<f32> {
    vec![0.5; s.iter().product()]
}

#[test]
fn shape_and_head_errors() {
    let x = data(S);
    let xv = View::contiguous(&x, &S).unwrap();
    let k_short = data([2, 4, 10, 7]);
    let kv = View::contiguous(&k_short, &[2, 4, 10, 7]).unwrap();
    assert!(matches!(
        run(xv, kv, xv, &Options::new()),
        Err(AttnError::ShapeMismatch { tensor: "k", .. })
    ));
    let v_other_n = data([2, 4, 9, 8]);
    let vv = View::contiguous(&v_other_n, &[2, 4, 9, 8]).unwrap();
    assert!(matches!(
        run(xv, xv, vv, &Options::new()),
        Err(AttnError::ShapeMismatch { tensor: "v", .. })
    ));
    let k3 = data([2, 3, 10, 8]);
    let k3v = View::contiguous(&k3, &[2, 3, 10, 8]).unwrap();
    assert!(matches!(
        run(xv, k3v, k3v, &Options::new()),
        Err(AttnError::HeadsNotDivisible {
            q_heads: 4,
            kv_heads: 3
        })
    ));
    let empty: Vec<f32> = vec![];
    let ev = View::new(&empty, [2, 4, 0, 8], [0, 0, 8, 1]).unwrap();
    assert!(matches!(
        run(ev, xv, xv, &Options::new()),
        Err(AttnError::EmptyDimension {
            tensor: "q",
            dim: 2,
            ..
        })
    ));
    let ek = View::new(&empty, [2, 4, 10, 0], [0, 0, 0, 1]).unwrap();
    assert!(matches!(
        run(xv, ek, xv, &Options::new()),
        Err(AttnError::EmptyDimension { tensor: "k", .. })
    ));
}

#[test]
fn stride_and_output_errors() {
    let x = data(S);
    assert!(matches!(
        View::new(&x, S, [320, 80, 8, 2]),
        Err(AttnError::OutOfBounds { .. })
    ));
    assert!(matches!(
        View::new(&x, S, [usize::MAX, 1, 1, 1]),
        Err(AttnError::OutOfBounds { .. })
    ));
    assert!(matches!(
        View::<f32>::contiguous(&x, &[2, 4, 10, 9]),
        Err(AttnError::LengthMismatch { .. })
    ));
    let mut o = data(S);
    assert!(matches!(
        ViewMut::new(&mut o, S, [320, 80, 4, 1]),
        Err(AttnError::OverlappingOutput { .. })
    ));
    assert!(matches!(
        ViewMut::new(&mut o, [2, 4, 10, 8], [0, 80, 8, 1]),
        Err(AttnError::OverlappingOutput { .. })
    ));
    let xv = View::contiguous(&x, &S).unwrap();
    let mut small = vec![0.0; 2 * 4 * 10 * 4];
    let mut out = ViewMut::contiguous(&mut small, [2, 4, 10, 4]).unwrap();
    assert!(matches!(
        forward(xv, xv, xv, &Options::new(), &mut out, None),
        Err(AttnError::ShapeMismatch { tensor: "out", .. })
    ));
    let mut o = data(S);
    let mut out = ViewMut::contiguous(&mut o, S).unwrap();
    let mut lse = vec![0.0; 3];
    assert!(matches!(
        forward(xv, xv, xv, &Options::new(), &mut out, Some(&mut lse)),
        Err(AttnError::LengthMismatch { tensor: "lse", .. })
    ));
}

#[test]
fn option_errors() {
    let x = data(S);
    let xv = View::contiguous(&x, &S).unwrap();
    let bad = |opts: Options| run(xv, xv, xv, &opts).unwrap_err();
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            bad(Options::new().scale(s)),
            AttnError::InvalidOption {
                option: "scale",
                ..
            }
        ));
    }
    for c in [0.0, -2.0, f32::NAN] {
        assert!(matches!(
            bad(Options::new().softcap(c)),
            AttnError::InvalidOption {
                option: "softcap",
                ..
            }
        ));
    }
    for p in [-0.1, 1.0, 1.5, f32::NAN] {
        assert!(matches!(
            bad(Options::new().dropout(p, 0)),
            AttnError::InvalidOption {
                option: "dropout",
                ..
            }
        ));
    }
    let slopes = [0.5f32; 3];
    assert!(matches!(
        bad(Options::new().alibi(&slopes)),
        AttnError::LengthMismatch {
            tensor: "alibi_slopes",
            ..
        }
    ));
    let nan_slopes = [0.5, f32::NAN, 0.5, 0.5];
    assert!(matches!(
        bad(Options::new().alibi(&nan_slopes)),
        AttnError::InvalidOption { .. }
    ));
    let m = vec![true; 3 * 10];
    let mv = View::contiguous(&m, &[3, 10]).unwrap();
    assert!(matches!(
        bad(Options::new().mask(mv)),
        AttnError::NotBroadcastable { tensor: "mask", .. }
    ));
    let b = vec![0.0f32; 4 * 11];
    let bv = View::contiguous(&b, &[4, 1, 11]).unwrap();
    assert!(matches!(
        bad(Options::new().bias(bv)),
        AttnError::NotBroadcastable { tensor: "bias", .. }
    ));
    let docs = [0u32; 7];
    assert!(matches!(
        bad(Options::new().docs(&docs, &docs)),
        AttnError::LengthMismatch {
            tensor: "docs.q",
            ..
        }
    ));
}

#[test]
fn backward_errors() {
    let x = data(S);
    let xv = View::contiguous(&x, &S).unwrap();
    let lse = vec![0.0f32; 80];
    let (mut a, mut b, mut c) = (data(S), data(S), data(S));
    let wrong = data([2, 4, 10, 7]);
    let wv = View::contiguous(&wrong, &[2, 4, 10, 7]).unwrap();
    let mut call = |o: View, lse: &[f32], d_o: View| {
        backward(
            xv,
            xv,
            xv,
            o,
            lse,
            d_o,
            &Options::new(),
            &mut ViewMut::contiguous(&mut a, S).unwrap(),
            &mut ViewMut::contiguous(&mut b, S).unwrap(),
            &mut ViewMut::contiguous(&mut c, S).unwrap(),
        )
    };
    assert!(matches!(
        call(wv, &lse, xv),
        Err(AttnError::ShapeMismatch { tensor: "o", .. })
    ));
    assert!(matches!(
        call(xv, &lse, wv),
        Err(AttnError::ShapeMismatch { tensor: "d_o", .. })
    ));
    assert!(matches!(
        call(xv, &lse[..79], xv),
        Err(AttnError::LengthMismatch { tensor: "lse", .. })
    ));
    assert!(call(xv, &lse, xv).is_ok());
}
