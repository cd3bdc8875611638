//! The MPI ring's own fault path, under `mpiexec` (feature `mpi`): a rank that sends a block one
//! value short. The test runs itself as each rank (`mpiexec -n 3` of this test binary, told so by
//! `ATTENTIVE_RING_RANK_TEST`); the rank that receives the short block reports it and ends the
//! job, which must exit non-zero at once instead of waiting.
#![cfg(feature = "mpi")]

mod short;

use attentive::View;
use attentive_dist::mpi::MpiRing;
use attentive_dist::{Ring, RingAttention};
use short::Short;
use std::process::Command;
use std::time::{Duration, Instant};

const CHILD: &str = "ATTENTIVE_RING_RANK_TEST";

/// One rank: the causal forward of 2 heads × 48 rows on 3 ranks, rank 1 sending its block short
/// in the forward's first ring round (after 1 + 2 + 2 rounds of agreements).
fn rank() {
    let mut ring = MpiRing::init().unwrap();
    let r = ring.rank();
    let attn = RingAttention::new(48).causal(true);
    let rows = attn.layouts(ring.size()).0.rows(r);
    let x = vec![0.25f32; 2 * rows * 8];
    let view = View::contiguous(&x, &[1, 2, rows, 8]).unwrap();
    let (mut o, mut lse) = (vec![0.0; x.len()], vec![0.0; 2 * rows]);
    let round = if r == 1 { 5 } else { usize::MAX };
    let result = attn.forward(
        &mut Short::new(&mut ring, round),
        view,
        view,
        view,
        &mut o,
        &mut lse,
    );
    if let Err(e) = result {
        eprintln!("error: {e}");
        ring.abort(1);
    }
}

#[test]
fn a_short_block_ends_the_job_with_its_sizes() {
    if std::env::var_os(CHILD).is_some() {
        return rank();
    }
    let t = Instant::now();
    let out = Command::new("mpiexec")
        .args(["-n", "3"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_short_block_ends_the_job_with_its_sizes",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    // Rank 1 holds 16 rows: 2 heads × 16 rows × 8 × (K and V) = 512 values.
    assert!(
        err.contains("rank 2: buffer 0 of round 5 from rank 1 holds 511 values, expected 512"),
        "{err}"
    );
}
