//! Ring attention on the threaded ring against the f64 oracle of the whole sequence by the
//! accuracy rule (forward, log-sum-exp and gradients; causal with the zigzag split, plain, cross
//! lengths, GQA, scale and softcap, sequences not a multiple of 2P, ranks without rows), one rank
//! bit for bit the single-process kernel, runs repeatable bit for bit, and faults (a block of the
//! wrong size, a rank that stops or hangs, ranks started on different problems) ending every
//! rank with an error rather than a wait.

#[path = "../../attentive/tests/common/mod.rs"]
mod common;
mod short;

use attentive::{reference, Causal, Options, View, ViewMut};
use attentive_dist::{threaded, DistError, Layout, Ring, RingAttention, ThreadRing};
use common::{check_rule, Rng};
use short::Short;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    attn: RingAttention,
    ranks: usize,
}

/// Rank `r`'s rows of a row-major `[B, H, N, X]` tensor, in its storage order.
fn local(x: &[f32], [b, h, n, w]: [usize; 4], l: &Layout, r: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for bh in 0..b * h {
        for i in l.chunks(r).into_iter().flatten() {
            out.extend_from_slice(&x[(bh * n + i) * w..(bh * n + i + 1) * w]);
        }
    }
    out
}

/// Puts rank `r`'s rows back in their places of the whole tensor.
fn scatter(part: &[f32], [b, h, n, w]: [usize; 4], l: &Layout, r: usize, x: &mut [f32]) {
    let rows = l.rows(r);
    for bh in 0..b * h {
        for (k, i) in l.chunks(r).into_iter().flatten().enumerate() {
            let at = (bh * rows + k) * w;
            x[(bh * n + i) * w..(bh * n + i + 1) * w].copy_from_slice(&part[at..at + w]);
        }
    }
}

struct Whole {
    o: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
}

fn shapes(c: &Case) -> ([usize; 4], [usize; 4], [usize; 4], [usize; 4]) {
    let a = c.attn;
    (
        [c.b, c.hq, a.n_q, c.d],
        [c.b, c.hkv, a.n_k, c.d],
        [c.b, c.hkv, a.n_k, c.dv],
        [c.b, c.hq, a.n_q, c.dv],
    )
}

fn inputs(c: &Case, rng: &mut Rng) -> Inputs {
    let (qs, ks, vs, os) = shapes(c);
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    // Spread scores so the weights are far from uniform.
    let q = rng.vec(n(qs)).iter().map(|x| 2.0 * x).collect();
    Inputs {
        q,
        k: rng.vec(n(ks)),
        v: rng.vec(n(vs)),
        d_o: rng.vec(n(os)),
    }
}

/// Forward and backward of `c` on a threaded ring, gathered into whole tensors.
fn ring(c: &Case, x: &Inputs) -> Whole {
    let (qs, ks, vs, os) = shapes(c);
    let (lq, lk) = c.attn.layouts(c.ranks);
    let results = threaded(c.ranks, WAIT, |ring| {
        let r = ring.rank();
        let (nq, nk) = (lq.rows(r), lk.rows(r));
        let (q, k, v, d_o) = (
            local(&x.q, qs, &lq, r),
            local(&x.k, ks, &lk, r),
            local(&x.v, vs, &lk, r),
            local(&x.d_o, os, &lq, r),
        );
        let qv = View::contiguous(&q, &[c.b, c.hq, nq, c.d]).unwrap();
        let kv = View::contiguous(&k, &[c.b, c.hkv, nk, c.d]).unwrap();
        let vv = View::contiguous(&v, &[c.b, c.hkv, nk, c.dv]).unwrap();
        let mut o = vec![0.0; c.b * c.hq * nq * c.dv];
        let mut lse = vec![0.0; c.b * c.hq * nq];
        c.attn.forward(ring, qv, kv, vv, &mut o, &mut lse)?;
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let ov = View::contiguous(&o, &[c.b, c.hq, nq, c.dv]).unwrap();
        let dov = View::contiguous(&d_o, &[c.b, c.hq, nq, c.dv]).unwrap();
        c.attn
            .backward(ring, qv, kv, vv, ov, &lse, dov, &mut dq, &mut dk, &mut dv)?;
        Ok::<_, DistError>((o, lse, dq, dk, dv))
    });
    let mut w = Whole {
        o: vec![0.0; x.d_o.len()],
        lse: vec![0.0; c.b * c.hq * c.attn.n_q],
        dq: vec![0.0; x.q.len()],
        dk: vec![0.0; x.k.len()],
        dv: vec![0.0; x.v.len()],
    };
    for (r, res) in results.into_iter().enumerate() {
        let (o, lse, dq, dk, dv) = res.unwrap_or_else(|e| panic!("{c:?}: {e}"));
        scatter(&o, os, &lq, r, &mut w.o);
        scatter(&lse, [c.b, c.hq, c.attn.n_q, 1], &lq, r, &mut w.lse);
        scatter(&dq, qs, &lq, r, &mut w.dq);
        scatter(&dk, ks, &lk, r, &mut w.dk);
        scatter(&dv, vs, &lk, r, &mut w.dv);
    }
    w
}

fn options(a: &RingAttention) -> Options<'static> {
    let mut o = Options::new();
    o.scale = a.scale;
    o.softcap = a.softcap;
    if a.causal {
        o = o.causal(Causal::TopLeft);
    }
    o
}

fn check_against_oracle(c: &Case, x: &Inputs) -> Result<(), String> {
    let (qs, ks, vs, os) = shapes(c);
    let q = View::contiguous(&x.q, &qs).unwrap();
    let k = View::contiguous(&x.k, &ks).unwrap();
    let v = View::contiguous(&x.v, &vs).unwrap();
    let d_o = View::contiguous(&x.d_o, &os).unwrap();
    let opts = options(&c.attn);
    let f64s = reference::forward::<f64>(q, k, v, &opts).unwrap();
    let f32s = reference::forward::<f32>(q, k, v, &opts).unwrap();
    let g64 = reference::backward::<f64>(q, k, v, d_o, &opts).unwrap();
    let g32 = reference::backward::<f32>(q, k, v, d_o, &opts).unwrap();
    let w = ring(c, x);
    check_rule("o", &w.o, &f32s.o, &f64s.o, 2.0)?;
    check_rule("lse", &w.lse, &f32s.lse, &f64s.lse, 2.0)?;
    check_rule("dq", &w.dq, &g32.dq, &g64.dq, 3.0)?;
    check_rule("dk", &w.dk, &g32.dk, &g64.dk, 3.0)?;
    check_rule("dv", &w.dv, &g32.dv, &g64.dv, 3.0)
}

fn case(b: usize, hq: usize, hkv: usize, n: usize, d: usize, causal: bool, ranks: usize) -> Case {
    Case {
        b,
        hq,
        hkv,
        d,
        dv: d,
        attn: RingAttention::new(n).causal(causal),
        ranks,
    }
}

#[test]
fn ring_matches_the_oracle_on_awkward_shapes() {
    let mut rng = Rng::new(21);
    let mut cases = vec![
        // Multiples of 2P, and not; fewer rows than chunks (ranks without rows).
        case(1, 2, 2, 64, 16, true, 4),
        case(1, 2, 2, 37, 8, true, 3),
        case(2, 4, 2, 101, 16, true, 4),
        case(1, 3, 1, 5, 8, true, 4),
        case(1, 1, 1, 1, 4, true, 2),
        case(1, 2, 1, 50, 32, false, 3),
        case(2, 8, 2, 33, 8, false, 5),
        case(1, 1, 1, 3, 8, false, 4),
    ];
    // Cross lengths, another value width, a scale and a soft cap.
    let mut c = case(1, 4, 2, 0, 16, false, 3);
    c.attn = RingAttention::cross(29, 71)
        .scale(Some(0.4))
        .softcap(Some(3.0));
    c.dv = 24;
    cases.push(c);
    let mut c = case(1, 2, 2, 90, 8, true, 3);
    c.attn = c.attn.scale(Some(0.7)).softcap(Some(2.5));
    c.dv = 5;
    cases.push(c);
    // And random ones.
    for _ in 0..12 {
        let hkv = rng.pick(&[1, 2]);
        let mut c = case(
            1 + rng.below(2),
            hkv * rng.pick(&[1, 2, 3]),
            hkv,
            1 + rng.below(130),
            rng.pick(&[4, 8, 13, 64]),
            rng.chance(0.6),
            1 + rng.below(5),
        );
        c.dv = rng.pick(&[c.d, 7]);
        cases.push(c);
    }
    let mut failures = Vec::new();
    for c in &cases {
        let x = inputs(c, &mut rng);
        if let Err(e) = check_against_oracle(c, &x) {
            failures.push(format!("{c:?}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn one_rank_is_the_single_process_kernel_bit_for_bit() {
    let mut rng = Rng::new(3);
    for causal in [false, true] {
        let c = case(2, 4, 2, 77, 16, causal, 1);
        let x = inputs(&c, &mut rng);
        let w = ring(&c, &x);
        let (qs, ks, vs, os) = shapes(&c);
        let q = View::contiguous(&x.q, &qs).unwrap();
        let k = View::contiguous(&x.k, &ks).unwrap();
        let v = View::contiguous(&x.v, &vs).unwrap();
        let opts = options(&c.attn);
        let (mut o, mut lse) = (vec![0.0; x.d_o.len()], vec![0.0; w.lse.len()]);
        let mut ov = ViewMut::contiguous(&mut o, os).unwrap();
        attentive::forward(q, k, v, &opts, &mut ov, Some(&mut lse)).unwrap();
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; x.q.len()],
            vec![0.0; x.k.len()],
            vec![0.0; x.v.len()],
        );
        attentive::backward(
            q,
            k,
            v,
            View::contiguous(&o, &os).unwrap(),
            &lse,
            View::contiguous(&x.d_o, &os).unwrap(),
            &opts,
            &mut ViewMut::contiguous(&mut dq, qs).unwrap(),
            &mut ViewMut::contiguous(&mut dk, ks).unwrap(),
            &mut ViewMut::contiguous(&mut dv, vs).unwrap(),
        )
        .unwrap();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&w.o), bits(&o), "causal {causal}");
        assert_eq!(bits(&w.lse), bits(&lse));
        assert_eq!(bits(&w.dq), bits(&dq));
        assert_eq!(bits(&w.dk), bits(&dk));
        assert_eq!(bits(&w.dv), bits(&dv));
    }
}

#[test]
fn runs_repeat_bit_for_bit() {
    let mut rng = Rng::new(5);
    let c = case(1, 4, 2, 203, 32, true, 3);
    let x = inputs(&c, &mut rng);
    let (a, b) = (ring(&c, &x), ring(&c, &x));
    for (p, q) in [
        (&a.o, &b.o),
        (&a.lse, &b.lse),
        (&a.dq, &b.dq),
        (&a.dk, &b.dk),
        (&a.dv, &b.dv),
    ] {
        assert!(p.iter().zip(q).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

/// The causal forward of one problem on `ranks` threads, each rank through `wrap` and started on
/// the sequence length `n(rank)`; the errors every rank returned, and how long it all took.
fn faulty(
    ranks: usize,
    wait: Duration,
    n: impl Fn(usize) -> usize + Sync,
    wrap: impl Fn(&mut ThreadRing) -> attentive_dist::Result<()> + Sync,
) -> (Vec<attentive_dist::Result<()>>, Duration) {
    let t = Instant::now();
    let res = threaded(ranks, wait, |ring| {
        let r = ring.rank();
        let attn = RingAttention::new(n(r)).causal(true);
        let rows = attn.layouts(ranks).0.rows(r);
        let x = vec![0.5f32; 2 * rows * 8];
        let view = View::contiguous(&x, &[1, 2, rows, 8]).unwrap();
        let (mut o, mut lse) = (vec![0.0; x.len()], vec![0.0; 2 * rows]);
        wrap(ring)?;
        attn.forward(ring, view, view, view, &mut o, &mut lse)
    });
    (res, t.elapsed())
}

#[test]
fn a_block_of_the_wrong_size_fails_every_rank() {
    let t = Instant::now();
    // Rank 1 sends a short block in the forward's first ring round (the agreements take 2P − 1).
    let res = threaded(4, WAIT, |ring| {
        let r = ring.rank();
        let attn = RingAttention::new(64).causal(true);
        let rows = attn.layouts(4).0.rows(r);
        let x = vec![0.25f32; 2 * rows * 8];
        let view = View::contiguous(&x, &[1, 2, rows, 8]).unwrap();
        let (mut o, mut lse) = (vec![0.0; x.len()], vec![0.0; 2 * rows]);
        let round = if r == 1 { 7 } else { usize::MAX };
        let mut short = Short::new(ring, round);
        attn.forward(&mut short, view, view, view, &mut o, &mut lse)
    });
    assert!(t.elapsed() < WAIT / 2, "took {:?}", t.elapsed());
    assert!(res.iter().all(Result::is_err), "{res:?}");
    let msg = res[2].as_ref().unwrap_err().to_string();
    assert!(
        matches!(
            res[2],
            Err(DistError::BlockSize {
                from: 1,
                got: 511,
                expected: 512,
                ..
            })
        ),
        "{msg}"
    );
    assert!(msg.contains("holds 511 values, expected 512"), "{msg}");
}

#[test]
fn a_rank_that_stops_fails_every_other_rank() {
    let (res, took) = faulty(
        4,
        WAIT,
        |_| 64,
        |ring| {
            if ring.rank() == 2 {
                return Err(DistError::Unsupported("rank 2 stops".into()));
            }
            Ok(())
        },
    );
    assert!(took < WAIT / 2, "took {took:?}");
    assert!(res.iter().all(Result::is_err), "{res:?}");
    assert!(
        matches!(res[3], Err(DistError::PeerGone { from: 2, .. })),
        "{:?}",
        res[3]
    );
}

#[test]
fn a_rank_that_hangs_times_out_its_neighbour() {
    let (res, took) = faulty(
        3,
        Duration::from_millis(300),
        |_| 30,
        |ring| {
            if ring.rank() == 0 {
                std::thread::sleep(Duration::from_secs(2));
            }
            Ok(())
        },
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(res.iter().all(Result::is_err), "{res:?}");
    let e = res[1].as_ref().unwrap_err();
    assert!(matches!(e, DistError::Timeout { from: 0, .. }), "{e:?}");
    assert!(e.to_string().contains("hangs or was stopped"), "{e}");
}

#[test]
fn ranks_started_on_different_problems_all_fail() {
    let (res, _) = faulty(4, WAIT, |r| if r == 2 { 65 } else { 64 }, |_| Ok(()));
    for (r, e) in res.iter().enumerate() {
        assert!(
            matches!(e, Err(DistError::Disagree { .. })),
            "rank {r}: {e:?}"
        );
    }
    let detail = res[3].as_ref().unwrap_err().to_string();
    assert!(
        detail.contains("Nq is 64 here and 65 on rank 2"),
        "{detail}"
    );
    // Local tensors that do not fit the problem, on one rank only.
    let res = threaded(3, WAIT, |ring| {
        let attn = RingAttention::new(30);
        let rows = attn.layouts(3).0.rows(ring.rank()) + usize::from(ring.rank() == 1);
        let x = vec![0.5f32; rows * 4];
        let view = View::contiguous(&x, &[1, 1, rows, 4]).unwrap();
        let (mut o, mut lse) = (vec![0.0; x.len()], vec![0.0; rows]);
        attn.forward(ring, view, view, view, &mut o, &mut lse)
    });
    assert!(res.iter().all(Result::is_err), "{res:?}");
    assert!(
        matches!(res[1], Err(DistError::Shape { tensor: "q", .. })),
        "{:?}",
        res[1]
    );
}
