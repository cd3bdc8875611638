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
