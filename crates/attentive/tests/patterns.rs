//! Structured patterns: each against a dense mask built from its paper's rule and run through the
//! f64 oracle, forward and backward; the block table against the rule; per-row key counts; a
//! user closure against the equivalent built-in rule; the text syntax.

mod common;
use attentive::{forward, probabilities, BlockMask, Causal, Options, Pattern, Pos, View, ViewMut};
use common::{check_case, paper_visible, random_pattern, Case, Layout, Rng};

/// Sizes around the 64-wide tiles, and N = 1.
const SIZES: [(usize, usize); 7] = [
    (1, 1),
    (63, 63),
    (65, 65),
    (100, 100),
    (129, 129),
    (40, 150),
    (150, 97),
];

fn leaves(nk: usize) -> Vec<Pattern> {
    vec![
        Pattern::Causal,
        Pattern::Window { left: 5, right: 0 },
        Pattern::Window {
            left: 17,
            right: 70,
        },
        Pattern::Dilated {
            window: 3,
            dilation: 4,
        },
        Pattern::Dilated {
            window: 40,
            dilation: 1,
        },
        Pattern::Strided { stride: 8 },
        Pattern::Strided { stride: 65 },
        Pattern::Fixed {
            block: 16,
            summary: 4,
        },
        Pattern::Fixed {
            block: 64,
            summary: 64,
        },
        Pattern::Longformer {
            window: 4,
            global: vec![0, 7, nk / 2],
        },
        Pattern::BigBird {
            block: 16,
            random: 2,
            seed: 9,
        },
        Pattern::BigBird {
            block: 7,
            random: 3,
            seed: 1,
        },
        Pattern::Prefix { len: 20 },
        Pattern::Sink {
            sinks: 4,
            window: 16,
        },
        Pattern::Sink {
            sinks: 0,
            window: 1,
        },
        Pattern::rule(|p: Pos| !(p.i + p.j + p.h).is_multiple_of(3)),
    ]
}

#[test]
fn crate_rule_and_block_table_equal_the_paper_rules() {
    let mut rng = Rng::new(11);
    for &(nq, nk) in &SIZES {
        let mut pats = leaves(nk);
        for _ in 0..40 {
            pats.push(random_pattern(&mut rng, nk));
        }
        for p in &pats {
            let table = BlockMask::new(p, 1, 2, nq, nk).unwrap();
            for h in 0..2 {
                for i in 0..nq {
                    for j in 0..nk {
                        let want = paper_visible(p, nq, nk, 0, h, i, j);
                        let at = Pos { b: 0, h, i, j };
                        assert_eq!(
                            p.visible_at(nq, nk, at),
                            want,
                            "{p} rule at {at:?}, nq={nq} nk={nk}"
                        );
                        assert_eq!(
                            table.visible(0, h, i, j),
                            want,
                            "{p} table at {at:?}, nq={nq} nk={nk}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_pattern_forward_and_backward_against_the_oracle() {
    let mut n = 0;
    for &(nq, nk) in &SIZES[1..] {
        for p in leaves(nk) {
            for composed in [
                p.clone(),
                p.clone()
                    | Pattern::Sink {
                        sinks: 1,
                        window: 3,
                    },
                p & Pattern::Window {
                    left: 30,
                    right: 30,
                },
            ] {
                let mut c = Case::plain(1, 2, 1, nq, nk, 24);
                c.pattern = Some(composed);
                c.prebuilt = n % 2 == 1;
                c.layout = [Layout::Bhnd, Layout::Bnhd, Layout::Bhdn][n % 3];
                c.seed = n as u64;
                n += 1;
                check_case(&c, true).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            }
        }
    }
}

/// A lone dilated or strided pattern, or strided joined with windows and sinks, runs as dense
/// problems over residue classes: classes of several tiles, unequal class sizes, Nq ≠ Nk both
/// ways, few queries, GQA, strided layouts, softcap.
#[test]
fn residue_classes_against_the_oracle() {
    let cases = [
        (
            700,
            700,
            Pattern::Dilated {
                window: 20,
                dilation: 3,
            },
        ),
        (300, 1000, Pattern::Strided { stride: 50 }),
        (
            1000,
            301,
            Pattern::Dilated {
                window: 5,
                dilation: 4,
            },
        ),
        (513, 513, Pattern::Strided { stride: 7 }),
        (70, 200, Pattern::Strided { stride: 300 }),
        // Few queries (the decode path continues from the class part), and rows of classes
        // without keys.
        (9, 700, Pattern::Strided { stride: 40 }),
        (12, 30, Pattern::Strided { stride: 64 }),
        (
            50,
            4,
            Pattern::Dilated {
                window: 3,
                dilation: 6,
            },
        ),
        // Unions of strided with windows and sinks: the class part drops the class keys the
        // other rules see (sinks beyond one class row, windows reaching several class keys back).
        (
            300,
            300,
            Pattern::Sink {
                sinks: 4,
                window: 50,
            } | Pattern::Strided { stride: 16 },
        ),
        (
            200,
            260,
            Pattern::Strided { stride: 9 } | Pattern::Window { left: 40, right: 3 },
        ),
        (
            333,
            290,
            Pattern::Window { left: 5, right: 0 }
                | Pattern::Sink {
                    sinks: 20,
                    window: 33,
                }
                | Pattern::Strided { stride: 7 },
        ),
        (
            7,
            500,
            Pattern::Sink {
                sinks: 3,
                window: 64,
            } | Pattern::Strided { stride: 32 },
        ),
    ];
    for (n, (nq, nk, p)) in cases.into_iter().enumerate() {
        let mut c = Case::plain(2, 4, 2, nq, nk, 16);
        c.pattern = Some(p);
        c.layout = [Layout::Bhnd, Layout::Bnhd, Layout::Bhdn][n % 3];
        c.softcap = (n % 2 == 1).then_some(2.0);
        c.seed = 100 + n as u64;
        check_case(&c, n < 2).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

/// A strided pattern whose stride is a whole number of query tiles (64 rows) computes its class
/// keys inside each row task, a vector of consecutive rows per instruction and several tiles
/// one stride apart at once: partial last tiles and vectors, Nk − Nq a multiple of the vector
/// width, GQA, sinks that cut a step's vector, windows that move the first class step, widths
/// that are not multiples of a vector, a small scale, few queries.
#[test]
fn strided_class_keys_against_the_oracle() {
    let cases = [
        (700, 700, 16, 16, Pattern::Strided { stride: 64 }),
        (300, 556, 20, 12, Pattern::Strided { stride: 128 }),
        (1000, 1000, 8, 24, Pattern::Strided { stride: 192 }),
        (
            650,
            650,
            16,
            16,
            Pattern::Sink {
                sinks: 5,
                window: 70,
            } | Pattern::Strided { stride: 64 },
        ),
        (
            520,
            520,
            16,
            16,
            Pattern::Window {
                left: 200,
                right: 2,
            } | Pattern::Strided { stride: 64 },
        ),
        (10, 522, 16, 16, Pattern::Strided { stride: 64 }),
        (
            777,
            777,
            32,
            32,
            Pattern::Sink {
                sinks: 40,
                window: 1,
            } | Pattern::Strided { stride: 128 },
        ),
    ];
    for (n, (nq, nk, d, dv, p)) in cases.into_iter().enumerate() {
        let mut c = Case::plain(2, 4, 1 + n % 2 * 3, nq, nk, d);
        c.dv = dv;
        c.pattern = Some(p);
        c.layout = [Layout::Bhnd, Layout::Bnhd][n % 2];
        c.scale = (n == 4).then_some(0.05);
        c.seed = 300 + n as u64;
        check_case(&c, false).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

#[test]
fn patterns_compose_with_every_option() {
    // Random problems that all carry a pattern: causal, GQA, dropout, documents, biases, rules.
    let mut rng = Rng::new(21);
    let mut failures = Vec::new();
    for n in 0..150 {
        let mut c = Case::random(&mut rng, 150);
        c.pattern = Some(random_pattern(&mut rng, c.nk));
        c.prebuilt = rng.chance(0.3);
        if let Err(e) = check_case(&c, true) {
            failures.push(format!("case {n}: {e}\n  {c:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Keys per row counted from the kernel's attention weights (every visible key gets a positive
/// weight here), against each rule's closed form.
#[test]
fn per_row_key_counts() {
    let n = 200;
    let d = 8;
    let x: Vec<f32> = (0..n * d)
        .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.1)
        .collect();
    let q = View::contiguous(&x, &[1, 1, n, d]).unwrap();
    let count = |p: &Pattern| -> Vec<usize> {
        let w = probabilities(q, q, &Options::new().pattern(p)).unwrap();
        w.chunks(n)
            .map(|r| r.iter().filter(|&&x| x > 0.0).count())
            .collect()
    };
    let check = |p: Pattern, f: &dyn Fn(usize) -> usize| {
        let got = count(&p);
        for (t, &g) in got.iter().enumerate() {
            assert_eq!(g, f(t), "{p}: row {t}");
        }
    };
    check(Pattern::Window { left: 10, right: 3 }, &|t| {
        t.min(10) + 1 + (n - 1 - t).min(3)
    });
    check(
        Pattern::Dilated {
            window: 4,
            dilation: 3,
        },
        &|t| 1 + (t / 3).min(4) + ((n - 1 - t) / 3).min(4),
    );
    check(Pattern::Strided { stride: 16 }, &|t| {
        (t + 1).min(16) + t / 16
    });
    check(
        Pattern::Fixed {
            block: 32,
            summary: 4,
        },
        &|t| t % 32 + 1 + 4 * (t / 32),
    );
    check(
        Pattern::Longformer {
            window: 5,
            global: vec![0, 100],
        },
        &|t| {
            if t == 0 || t == 100 {
                n
            } else {
                let band = t.min(5) + 1 + (n - 1 - t).min(5);
                band + [0usize, 100].iter().filter(|&&g| g.abs_diff(t) > 5).count()
            }
        },
    );
    check(Pattern::Prefix { len: 50 }, &|t| (t + 1).max(50));
    check(
        Pattern::Sink {
            sinks: 4,
            window: 32,
        },
        &|t| (t + 1).min(32) + 4.min((t + 1).saturating_sub(32)),
    );
    // BigBird with blocks of 20 and 10 key blocks: middle rows see 5 + 2 blocks (20 keys each),
    // except where the window meets a global block; the first and last blocks see all keys.
    let bb = Pattern::BigBird {
        block: 20,
        random: 2,
        seed: 3,
    };
    let got = count(&bb);
    for (t, &g) in got.iter().enumerate() {
        let qb = t / 20;
        let want = if qb == 0 || qb == 9 {
            n
        } else {
            let mut blocks: Vec<usize> = vec![0, 9, qb - 1, qb, qb + 1];
            blocks.extend(attentive::pattern::bigbird_random_blocks(10, qb, 2, 3));
            blocks.sort_unstable();
            blocks.dedup();
            assert_eq!(
                blocks.len(),
                if (2..=7).contains(&qb) { 7 } else { 6 },
                "block {qb}"
            );
            20 * blocks.len()
        };
        assert_eq!(g, want, "bigbird row {t}");
    }
}

#[test]
fn user_closure_equals_the_builtin_rule() {
    let (b, h, n, d) = (2, 3, 300, 32);
    let mut rng = Rng::new(5);
    let x = rng.vec(b * h * n * d);
    let q = View::contiguous(&x, &[b, h, n, d]).unwrap();
    let run = |opts: &Options| {
        let mut o = vec![0.0; x.len()];
        let mut lse = vec![0.0; b * h * n];
        forward(
            q,
            q,
            q,
            opts,
            &mut ViewMut::contiguous(&mut o, [b, h, n, d]).unwrap(),
            Some(&mut lse),
        )
        .unwrap();
        (o, lse)
    };
    let builtin = Pattern::Sink {
        sinks: 4,
        window: 40,
    } | Pattern::Strided { stride: 50 };
    let closure = |p: Pos| {
        p.j <= p.i
            && (p.j < 4 || p.i - p.j < 40 || p.i - p.j < 50 || (p.i - p.j).is_multiple_of(50))
    };
    // The built-in rule through the block table, as a closure runs: the causal option on top
    // changes no visible pair but keeps the call off the residue plan.
    let want = run(&Options::new().pattern(&builtin).causal(Causal::TopLeft));
    assert_eq!(run(&Options::new().mask_rule(&closure)), want);
    let table = BlockMask::from_rule(&closure, b, h, n, n).unwrap();
    let (got, one) = (
        table.counts(),
        BlockMask::new(&builtin, 1, 1, n, n).unwrap().counts(),
    );
    assert_eq!(
        [got.empty, got.full, got.partial],
        [one.empty, one.full, one.partial].map(|x| x * b * h)
    );
    assert_eq!(run(&Options::new().block_mask(&table)), want);
    // Alone, the built-in rule takes the residue plan: the same attention, summed in another
    // order.
    let (o, lse) = run(&Options::new().pattern(&builtin));
    let far = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    assert!(far(&o, &want.0) < 1e-5 && far(&lse, &want.1) < 1e-5);
}

#[test]
fn text_syntax_round_trips_and_rejects_junk() {
    for text in [
        "causal",
        "window:256,0",
        "dilated:8,2",
        "strided:128",
        "fixed:128,32",
        "longformer:64:0,5,17",
        "longformer:64:",
        "bigbird:64,3,42",
        "prefix:100",
        "sink:4,512",
        "window:8,8+strided:16&causal",
        "sink:4,64&prefix:3+longformer:2:1+bigbird:4,1,0",
    ] {
        let p: Pattern = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(p.to_string(), text);
        assert_eq!(p.to_string().parse::<Pattern>().unwrap(), p);
    }
    for bad in [
        "",
        "window",
        "window:1",
        "window:1,2,3",
        "window:-1,2",
        "strided:0",
        "fixed:8,9",
        "fixed:8,0",
        "dilated:3,0",
        "bigbird:0,1,2",
        "longformer:3",
        "causal:1",
        "nope:1",
        "window:1,2+",
        "&causal",
    ] {
        assert!(bad.parse::<Pattern>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn block_mask_shape_is_checked() {
    let x = vec![0.5f32; 2 * 10 * 4];
    let q = View::contiguous(&x, &[1, 2, 10, 4]).unwrap();
    let mut o = vec![0.0; x.len()];
    let mut out = ViewMut::contiguous(&mut o, [1, 2, 10, 4]).unwrap();
    let wrong = BlockMask::new(&Pattern::Causal, 1, 1, 10, 11).unwrap();
    let e = forward(q, q, q, &Options::new().block_mask(&wrong), &mut out, None).unwrap_err();
    assert!(
        matches!(
            e,
            attentive::AttnError::ShapeMismatch {
                tensor: "block_mask",
                ..
            }
        ),
        "{e}"
    );
    let heads = BlockMask::from_rule(&|p: Pos| p.h == 0, 1, 3, 10, 10).unwrap();
    assert!(forward(q, q, q, &Options::new().block_mask(&heads), &mut out, None).is_err());
    let p = Pattern::Causal;
    let both = Options::new().block_mask(&heads).pattern(&p);
    assert!(matches!(
        forward(q, q, q, &both, &mut out, None),
        Err(attentive::AttnError::ConflictingOptions {
            a: "block_mask",
            b: "pattern",
            ..
        })
    ));
    let bad = Pattern::Strided { stride: 0 };
    assert!(forward(q, q, q, &Options::new().pattern(&bad), &mut out, None).is_err());
    assert!(BlockMask::new(&Pattern::Causal, 1, 1, 0, 3).is_err());
    assert!(BlockMask::new(&Pattern::Union(vec![]), 1, 1, 3, 3).is_err());
}
