//! Shaw et al.'s relative positions: the oracle against finite differences, the banded kernel
//! against the oracle (by the accuracy rule) with every other option, and bad input.

mod common;
use attentive::shaw::Shaw;
use attentive::{reference, AttnError, Causal, Options, View, ViewMut};
use common::{check_rule, cv, Case, Inputs, OutBuf, Rng};

/// Tables with entries of a size that moves the weights, `[2c+1, D]` and `[2c+1, Dv]`.
fn tables(rng: &mut Rng, c: usize, d: usize, dv: usize) -> (Vec<f32>, Vec<f32>) {
    let n = 2 * c + 1;
    let keys = rng.vec(n * d).iter().map(|x| 2.0 * x).collect();
    (keys, rng.vec(n * dv))
}

/// Forward and backward of one case through the kernel on every ISA, against the oracle.
fn check_shaw(c: &Case, clip: usize, rng: &mut Rng) -> Result<(), String> {
    let inp = Inputs::new(c);
    let (keys, values) = tables(rng, clip, c.d, c.dv);
    let shaw = Shaw {
        clip,
        keys: &keys,
        values: &values,
    };
    let (q, k, v, d_o) = (inp.q.view(), inp.k.view(), inp.v.view(), inp.d_o.view());
    let oopts = inp.oracle_options(c);
    let s = |e: AttnError| e.to_string();
    let r64 = reference::shaw_forward::<f64>(q, k, v, &oopts, &shaw).map_err(s)?;
    let r32 = reference::shaw_forward::<f32>(q, k, v, &oopts, &shaw).map_err(s)?;
    let g64 = reference::shaw_backward::<f64>(q, k, v, d_o, &oopts, &shaw).map_err(s)?;
    // The gradient baseline: FlashAttention-2's formulas, naively in f32, from the naive f32
    // forward's output and LSE (what the kernel computes, as in tests/differential.rs).
    let stats = (&r32.o[..], &r32.lse[..]);
    let g32 = reference::shaw_backward_from_output::<f32>(q, k, v, stats, d_o, &oopts, &shaw)
        .map_err(s)?;
    for isa in attentive::Isa::all_available() {
        let opts = inp.options(c).isa(isa);
        let at = |e: String| format!("{isa:?}, clip {clip}: {e}");
        let oshape = [c.b, c.hq, c.nq, c.dv];
        let mut out = OutBuf::new(oshape, c.layout);
        let saved = shaw.forward(q, k, v, &opts, &mut out.view()).map_err(s)?;
        let o = out.row_major();
        check_rule("O", &o, &r32.o, &r64.o, 2.0).map_err(at)?;
        check_rule("LSE", saved.lse(), &r32.lse, &r64.lse, 2.0).map_err(at)?;
        check_rule("mass", saved.mass(), &r32.mass, &r64.mass, 2.0).map_err(at)?;
        let mut dq = OutBuf::new([c.b, c.hq, c.nq, c.d], c.layout);
        let mut dk = OutBuf::new([c.b, c.hkv, c.nk, c.d], c.layout);
        let mut dv = OutBuf::new([c.b, c.hkv, c.nk, c.dv], c.layout);
        let (mut d_keys, mut d_values) = (vec![0.0; keys.len()], vec![0.0; values.len()]);
        shaw.backward(
            q,
            k,
            v,
            &saved,
            d_o,
            &opts,
            (&mut dq.view(), &mut dk.view(), &mut dv.view()),
            &mut d_keys,
            &mut d_values,
        )
        .map_err(s)?;
        check_rule("dQ", &dq.row_major(), &g32.dq, &g64.dq, 3.0).map_err(at)?;
        check_rule("dK", &dk.row_major(), &g32.dk, &g64.dk, 3.0).map_err(at)?;
        check_rule("dV", &dv.row_major(), &g32.dv, &g64.dv, 3.0).map_err(at)?;
        check_rule("d a^K", &d_keys, &g32.d_keys, &g64.d_keys, 3.0).map_err(at)?;
        check_rule("d a^V", &d_values, &g32.d_values, &g64.d_values, 3.0).map_err(at)?;
    }
    Ok(())
}

#[test]
fn shaw_kernel_matches_oracle_on_awkward_shapes() {
    let mut rng = Rng::new(41);
    let mut failures = Vec::new();
    // Clip 0 (one bucket), 1 (the inner band is the diagonal), clips shorter and longer than
    // the sequence; N on both sides of the tile; Nq ≠ Nk both ways; GQA; Dv ≠ D.
    for (clip, nq, nk, d, dv, hq, hkv) in [
        (0, 17, 17, 8, 8, 2, 1),
        (1, 65, 65, 16, 16, 2, 2),
        (2, 1, 1, 8, 8, 1, 1),
        (3, 7, 130, 32, 24, 4, 2),
        (4, 130, 7, 16, 16, 3, 1),
        (16, 129, 129, 64, 64, 2, 1),
        (40, 100, 100, 40, 72, 2, 2),
        (300, 70, 70, 8, 8, 1, 1),
    ] {
        let mut c = Case::plain(2, hq, hkv, nq, nk, d);
        c.dv = dv;
        c.seed = rng.next_u64();
        if let Err(e) = check_shaw(&c, clip, &mut rng) {
            failures.push(format!("{c:?}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn shaw_composes_with_every_other_option() {
    let seed = std::env::var("SEED").map_or(43, |s| s.parse().unwrap());
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    for n in 0..60 {
        let mut c = Case::random(&mut rng, 150);
        // The key term is the call's score rule.
        c.score_rule = false;
        let clip = rng.pick(&[0, 1, 2, 5, 33]);
        if let Err(e) = check_shaw(&c, clip, &mut rng) {
            failures.push(format!("case {n} {c:?}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Σ o·dO as a function of the inputs and tables, in f64 through the oracle.
fn loss(x: &[Vec<f32>; 5], shapes: [[usize; 4]; 4], opts: &Options, clip: usize) -> f64 {
    let shaw = Shaw {
        clip,
        keys: &x[3],
        values: &x[4],
    };
    let f = reference::shaw_forward::<f64>(
        cv(&x[0], shapes[0]),
        cv(&x[1], shapes[1]),
        cv(&x[2], shapes[2]),
        opts,
        &shaw,
    )
    .unwrap();
    let d_o: Vec<f64> = (0..f.o.len())
        .map(|t| ((t * 37 % 11) as f64 - 5.0) / 5.0)
        .collect();
    f.o.iter().zip(&d_o).map(|(a, b)| a * b).sum()
}

#[test]
fn shaw_oracle_gradients_match_finite_differences() {
    let mut rng = Rng::new(47);
    let (b, hq, hkv, nq, nk, d, dv, clip) = (1, 2, 1, 6, 9, 4, 3, 2);
    let shapes = [
        [b, hq, nq, d],
        [b, hkv, nk, d],
        [b, hkv, nk, dv],
        [b, hq, nq, dv],
    ];
    let (keys, values) = tables(&mut rng, clip, d, dv);
    let x = [
        rng.vec(b * hq * nq * d),
        rng.vec(b * hkv * nk * d),
        rng.vec(b * hkv * nk * dv),
        keys,
        values,
    ];
    let slopes = [0.3f32, 0.7];
    for opts in [
        Options::new(),
        Options::new().causal(Causal::BottomRight).softcap(1.5),
        Options::new().alibi(&slopes).window(3, 1),
    ] {
        let d_o: Vec<f32> = (0..b * hq * nq * dv)
            .map(|t| ((t * 37 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let shaw = Shaw {
            clip,
            keys: &x[3],
            values: &x[4],
        };
        let g = reference::shaw_backward::<f64>(
            cv(&x[0], shapes[0]),
            cv(&x[1], shapes[1]),
            cv(&x[2], shapes[2]),
            cv(&d_o, shapes[3]),
            &opts,
            &shaw,
        )
        .unwrap();
        let analytic = [&g.dq, &g.dk, &g.dv, &g.d_keys, &g.d_values];
        // f32 inputs: perturb by a power of two that f32 holds exactly around each entry.
        let h = 2f64.powi(-12);
        for (t, grad) in analytic.iter().enumerate() {
            for e in 0..x[t].len() {
                let mut plus = x.clone();
                let mut minus = x.clone();
                plus[t][e] += h as f32;
                minus[t][e] -= h as f32;
                let (hp, hm) = (
                    plus[t][e] as f64 - x[t][e] as f64,
                    x[t][e] as f64 - minus[t][e] as f64,
                );
                let fd = (loss(&plus, shapes, &opts, clip) - loss(&minus, shapes, &opts, clip))
                    / (hp + hm);
                assert!(
                    (fd - grad[e]).abs() <= 1e-5 * (1.0 + grad[e].abs()),
                    "tensor {t} entry {e}: finite difference {fd} vs analytic {}",
                    grad[e]
                );
            }
        }
    }
}

#[test]
fn shaw_mass_is_the_weight_per_distance() {
    // With a^V the identity over buckets and v = 0, the output is the mass itself; without
    // dropout each row's mass sums to 1, and bucket c + t holds the weight on key p + t.
    let (n, d, clip) = (80, 16, 3);
    let nb = 2 * clip + 1;
    let mut rng = Rng::new(53);
    let x = rng.vec(n * d);
    let keys = tables(&mut rng, clip, d, 1).0;
    let mut values = vec![0.0f32; nb * nb];
    (0..nb).for_each(|r| values[r * nb + r] = 1.0);
    let zeros = vec![0.0f32; n * nb];
    let shaw = Shaw {
        clip,
        keys: &keys,
        values: &values,
    };
    let xv = cv(&x, [1, 1, n, d]);
    let mut o = vec![0.0f32; n * nb];
    let opts = Options::new().causal(Causal::TopLeft);
    let saved = shaw
        .forward(
            xv,
            xv,
            cv(&zeros, [1, 1, n, nb]),
            &opts,
            &mut ViewMut::contiguous(&mut o, [1, 1, n, nb]).unwrap(),
        )
        .unwrap();
    let r =
        reference::shaw_forward::<f64>(xv, xv, cv(&zeros, [1, 1, n, nb]), &opts, &shaw).unwrap();
    for i in 0..n {
        let row = &saved.mass()[i * nb..(i + 1) * nb];
        assert!(
            (row.iter().sum::<f32>() - 1.0).abs() < 1e-5,
            "row {i}: {row:?}"
        );
        // Causal: nothing ahead of the query.
        assert!(
            row[clip + 1..].iter().all(|&m| m == 0.0),
            "row {i}: {row:?}"
        );
        for (a, b) in row.iter().zip(&o[i * nb..(i + 1) * nb]) {
            assert!((a - b).abs() < 1e-6);
        }
        for (a, b) in row.iter().zip(&r.mass[i * nb..(i + 1) * nb]) {
            assert!((*a as f64 - b).abs() < 1e-5);
        }
    }
}

#[test]
fn shaw_rejects_bad_tables_and_options() {
    let x = vec![0.5f32; 4 * 8];
    let xv = cv(&x, [1, 1, 4, 8]);
    let keys = vec![0.0f32; 5 * 8];
    let mut o = vec![0.0f32; 4 * 8];
    let run = |shaw: Shaw, opts: &Options, o: &mut Vec<f32>| {
        shaw.forward(
            xv,
            xv,
            xv,
            opts,
            &mut ViewMut::contiguous(o, [1, 1, 4, 8]).unwrap(),
        )
        .map(|_| ())
    };
    let good = Shaw {
        clip: 2,
        keys: &keys,
        values: &keys,
    };
    assert!(run(good, &Options::new(), &mut o).is_ok());
    let short = Shaw {
        keys: &keys[..39],
        ..good
    };
    assert!(matches!(
        run(short, &Options::new(), &mut o),
        Err(AttnError::LengthMismatch {
            tensor: "shaw keys",
            expected: 40,
            got: 39
        })
    ));
    let huge = Shaw {
        clip: usize::MAX / 2,
        ..good
    };
    assert!(matches!(
        run(huge, &Options::new(), &mut o),
        Err(AttnError::InvalidOption {
            option: "shaw clip",
            ..
        })
    ));
    struct Id;
    impl attentive::ScoreRule for Id {
        fn score(&self, s: f32, _: attentive::Pos) -> f32 {
            s
        }
        fn grad(&self, _: f32, _: attentive::Pos) -> f32 {
            1.0
        }
    }
    assert!(matches!(
        run(good, &Options::new().score_rule(&Id), &mut o),
        Err(AttnError::ConflictingOptions {
            a: "shaw",
            b: "score_rule",
            ..
        })
    ));
    assert!(matches!(
        run(good, &Options::new().scale(f32::NAN), &mut o),
        Err(AttnError::InvalidOption {
            option: "scale",
            ..
        })
    ));
    // The backward checks what it is given against the call.
    let saved = good
        .forward(
            xv,
            xv,
            xv,
            &Options::new(),
            &mut ViewMut::contiguous(&mut o, [1, 1, 4, 8]).unwrap(),
        )
        .unwrap();
    let (mut dq, mut dk, mut dv) = (vec![0.0; 32], vec![0.0; 32], vec![0.0; 32]);
    let (mut d_keys, mut d_values) = (vec![0.0; 40], vec![0.0; 39]);
    let err = good.backward(
        xv,
        xv,
        xv,
        &saved,
        xv,
        &Options::new(),
        (
            &mut ViewMut::contiguous(&mut dq, [1, 1, 4, 8]).unwrap(),
            &mut ViewMut::contiguous(&mut dk, [1, 1, 4, 8]).unwrap(),
            &mut ViewMut::contiguous(&mut dv, [1, 1, 4, 8]).unwrap(),
        ),
        &mut d_keys,
        &mut d_values,
    );
    assert!(matches!(
        err,
        Err(AttnError::LengthMismatch {
            tensor: "d_values",
            ..
        })
    ));
    let other = View::contiguous(&x[..16], &[1, 1, 2, 8]).unwrap();
    let err = good.backward(
        other,
        other,
        other,
        &saved,
        other,
        &Options::new(),
        (
            &mut ViewMut::contiguous(&mut dq[..16], [1, 1, 2, 8]).unwrap(),
            &mut ViewMut::contiguous(&mut dk[..16], [1, 1, 2, 8]).unwrap(),
            &mut ViewMut::contiguous(&mut dv[..16], [1, 1, 2, 8]).unwrap(),
        ),
        &mut d_keys,
        &mut d_values[..],
    );
    assert!(matches!(
        err,
        Err(AttnError::LengthMismatch { tensor: "lse", .. })
    ));
}
