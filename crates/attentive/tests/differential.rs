//! The kernels against the f64 oracle on hundreds of seeded random problems: every option and
//! combinations of them, awkward sizes (N = 1, N not a multiple of any tile, D not a multiple of
//! the vector width), grouped-query heads, and three memory layouts.

mod common;
use common::{check_case, Case, Layout, Rng};

fn run(seed: u64, cases: usize, n_max: usize, grads: bool) {
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    for n in 0..cases {
        let c = Case::random(&mut rng, n_max);
        if let Err(e) = check_case(&c, grads) {
            failures.push(format!("case {n}: {e}\n  {c:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures[..failures.len().min(8)].join("\n")
    );
}

/// `SEED=n cargo test --release --test differential` draws another set of cases.
fn seed(default: u64) -> u64 {
    std::env::var("SEED").map_or(default, |s| s.parse().expect("SEED is a number"))
}

#[test]
fn random_cases_forward_and_backward() {
    run(seed(1), 300, 150, true);
}

#[test]
fn random_cases_forward_longer_sequences() {
    run(seed(2), 60, 200, false);
}

#[test]
fn every_head_dimension_plain_and_causal() {
    for d in [1, 8, 16, 32, 40, 64, 80, 96, 128, 256] {
        for (nq, nk) in [(1, 1), (1, 77), (77, 1), (65, 130), (130, 65), (17, 17)] {
            let mut c = Case::plain(1, 2, 1, nq, nk, d);
            c.seed = (d * 1000 + nq * 10 + nk) as u64;
            check_case(&c, true).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            c.causal = Some(attentive::Causal::BottomRight);
            c.layout = Layout::Bnhd;
            check_case(&c, true).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        }
    }
}

#[test]
fn decode_over_several_key_chunks() {
    // More keys than one decode chunk (1024), few queries: the split-and-merge path.
    for (nq, nk, causal) in [
        (1, 2500, None),
        (3, 2049, Some(attentive::Causal::BottomRight)),
    ] {
        let mut c = Case::plain(1, 4, 2, nq, nk, 64);
        c.causal = causal;
        c.window = Some((1500, 0));
        check_case(&c, false).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

/// A mask that varies only with batch and key (`[B, 1, 1, Nk]`, a padded batch's key mask) is
/// applied as bits per key tile: tiles wholly visible keep the fast path, wholly hidden ones
/// are skipped, cut ones masked by their bits. Against the oracle, with the same mask spelled
/// out per element (the per-element path) beside it: prefill (forward, backward, weights,
/// visible pairs) and decode over several key chunks.
#[test]
fn key_padding_masks_against_the_oracle() {
    use attentive::{reference, visible_pairs, Isa, Options, View, ViewMut};
    use common::check_rule;
    let holes = |j: usize| j % 3 != 1;
    // (queries, keys, head dim, each sequence's visible keys: a prefix length, or None for
    // every third key hidden)
    let cases: [(usize, usize, usize, Vec<Option<usize>>); 3] = [
        (
            70,
            150,
            16,
            vec![Some(150), Some(0), Some(64), Some(1), Some(129), None],
        ),
        (130, 64, 8, vec![Some(63), Some(64), None]),
        (
            2,
            2100,
            32,
            vec![Some(2100), Some(1500), Some(1024), Some(37), None],
        ),
    ];
    for (nq, nk, d, lens) in cases {
        let (b, hq, hkv) = (lens.len(), 2, 1);
        let keys: Vec<bool> = lens
            .iter()
            .flat_map(|l| (0..nk).map(move |j| l.map_or(holes(j), |l| j < l)))
            .collect();
        let dense: Vec<bool> = (0..b * hq * nq * nk)
            .map(|x| keys[x / (hq * nq * nk) * nk + x % nk])
            .collect();
        let mut rng = Rng::new(nq as u64 * 7 + nk as u64);
        let (q, k, v) = (
            rng.vec(b * hq * nq * d),
            rng.vec(b * hkv * nk * d),
            rng.vec(b * hkv * nk * d),
        );
        let d_o = rng.vec(b * hq * nq * d);
        fn cv(x: &[f32], shape: [usize; 4]) -> View<'_> {
            View::contiguous(x, &shape).unwrap()
        }
        let (q, k, v, d_o) = (
            cv(&q, [b, hq, nq, d]),
            cv(&k, [b, hkv, nk, d]),
            cv(&v, [b, hkv, nk, d]),
            cv(&d_o, [b, hq, nq, d]),
        );
        let by_key = Options::new().mask(View::new(&keys, [b, 1, 1, nk], [nk, 0, 0, 1]).unwrap());
        let by_element = Options::new().mask(View::contiguous(&dense, &[b, hq, nq, nk]).unwrap());
        let r64 = reference::forward::<f64>(q, k, v, &by_key).unwrap();
        let r32 = reference::forward::<f32>(q, k, v, &by_key).unwrap();
        let what = |w: &str, isa: Isa, path: &str| format!("{w} {isa:?} {path} {nq}x{nk} {lens:?}");
        for isa in Isa::all_available() {
            for (path, opts) in [
                ("by key", by_key.isa(isa)),
                ("by element", by_element.isa(isa)),
            ] {
                let mut o = vec![f32::NAN; b * hq * nq * d];
                let mut lse = vec![f32::NAN; b * hq * nq];
                let mut out = ViewMut::contiguous(&mut o, [b, hq, nq, d]).unwrap();
                attentive::forward(q, k, v, &opts, &mut out, Some(&mut lse)).unwrap();
                check_rule(&what("O", isa, path), &o, &r32.o, &r64.o, 2.0).unwrap();
                check_rule(&what("LSE", isa, path), &lse, &r32.lse, &r64.lse, 2.0).unwrap();
                if nq <= 16 {
                    continue; // decode: forward only
                }
                let g64 = reference::backward::<f64>(q, k, v, d_o, &by_key).unwrap();
                let g32 = reference::backward_from_output::<f32>(
                    q,
                    k,
                    v,
                    (&r32.o, &r32.lse),
                    d_o,
                    &by_key,
                )
                .unwrap();
                let (mut dq, mut dk, mut dv) = (
                    vec![0.0; b * hq * nq * d],
                    vec![0.0; b * hkv * nk * d],
                    vec![0.0; b * hkv * nk * d],
                );
                attentive::backward(
                    q,
                    k,
                    v,
                    View::contiguous(&o, &[b, hq, nq, d]).unwrap(),
                    &lse,
                    d_o,
                    &opts,
                    &mut ViewMut::contiguous(&mut dq, [b, hq, nq, d]).unwrap(),
                    &mut ViewMut::contiguous(&mut dk, [b, hkv, nk, d]).unwrap(),
                    &mut ViewMut::contiguous(&mut dv, [b, hkv, nk, d]).unwrap(),
                )
                .unwrap();
                check_rule(&what("dQ", isa, path), &dq, &g32.dq, &g64.dq, 3.0).unwrap();
                check_rule(&what("dK", isa, path), &dk, &g32.dk, &g64.dk, 3.0).unwrap();
                check_rule(&what("dV", isa, path), &dv, &g32.dv, &g64.dv, 3.0).unwrap();
                let p = attentive::probabilities(q, k, &opts).unwrap();
                let p64 = reference::probabilities::<f64>(q, k, &by_key).unwrap();
                let p32 = reference::probabilities::<f32>(q, k, &by_key).unwrap();
                check_rule(&what("P", isa, path), &p, &p32, &p64, 2.0).unwrap();
            }
        }
        let visible = dense.iter().filter(|&&x| x).count() as u64;
        assert_eq!(visible_pairs(q, k, &by_key).unwrap(), visible);
        assert_eq!(visible_pairs(q, k, &by_element).unwrap(), visible);
    }
}
