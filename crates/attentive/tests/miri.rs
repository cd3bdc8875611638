//! Small calls through every piece of unsafe code the engine runs on any CPU, sized for Miri,
//! which checks each memory access against Rust's rules:
//!
//! ```text
//! MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-permissive-provenance -Zmiri-ignore-leaks" \
//!     cargo +nightly miri test -p attentive --test miri
//! ```
//!
//! (Tree Borrows and permissive provenance because crossbeam-epoch, under rayon, casts integers
//! to pointers and fails Stacked Borrows in its own code; leaks ignored because rayon's global
//! pool threads outlive `main`.) It covers strided views and their bounds, outputs written
//! through raw pointers by several threads, the pooled and huge-page buffers, the scalar
//! kernels' pointer loops, the backward's per-split buffers, probabilities and merge. (Under
//! Miri no SIMD instruction set is detected, so the scalar path runs; the SIMD paths are tested
//! against it outside Miri.) Outside Miri these are ordinary tests, checked against the oracle.

use attentive::{
    backward, forward, merge, probabilities, reference, BlockMask, Causal, HugeVec, Options,
    Pattern, View, ViewMut,
};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32 * 37 + seed * 11) % 23) as f32 / 23.0 - 0.5)
        .collect()
}

fn close(got: &[f32], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-4, "{g} against {w}");
    }
}

#[test]
fn strided_views_read_and_refuse_as_declared() {
    let x = values(2 * 3 * 4, 1);
    // [B, N, H, D] storage read as [B, H, N, D].
    let v = View::from_bnhd(&x, [1, 4, 3, 2]).unwrap();
    assert_eq!(v.at(0, 2, 1, 1), x[(3 + 2) * 2 + 1]);
    assert_eq!(v.to_vec().len(), 24);
    assert!(View::new(&x, [1, 3, 4, 2], [24, 8, 2, 1]).is_ok());
    assert!(View::new(&x, [1, 3, 4, 3], [24, 8, 2, 1]).is_err());
    assert!(View::new(&x, [2, 1, 1, 1], [usize::MAX, 1, 1, 1]).is_err());
    let mut o = vec![0.0f32; 24];
    assert!(
        ViewMut::new(&mut o, [1, 3, 4, 2], [24, 1, 2, 8]).is_err(),
        "aliasing"
    );
    assert!(ViewMut::new(&mut o, [1, 3, 4, 2], [24, 1, 3, 12]).is_ok());
}

#[test]
fn forward_backward_probabilities_and_merge_on_small_problems() {
    let (b, hq, hkv, nq, nk, d) = (1, 2, 1, 5, 7, 3);
    let (q, k, v) = (
        values(b * hq * nq * d, 2),
        values(b * hkv * nk * d, 3),
        values(b * hkv * nk * d, 4),
    );
    let qv = View::contiguous(&q, &[b, hq, nq, d]).unwrap();
    let kv = View::contiguous(&k, &[b, hkv, nk, d]).unwrap();
    let vv = View::contiguous(&v, &[b, hkv, nk, d]).unwrap();
    let pattern: Pattern = "window:2,1+sink:1,2".parse().unwrap();
    let mask = BlockMask::new(&pattern, 1, 1, nq, nk).unwrap();
    for opts in [
        Options::new(),
        Options::new().causal(Causal::BottomRight).softcap(5.0),
        Options::new().block_mask(&mask).dropout(0.25, 7),
    ] {
        let want = reference::forward::<f64>(qv, kv, vv, &opts).unwrap();
        let mut o = HugeVec::<f32>::zeroed(b * hq * nq * d).unwrap();
        let mut lse = vec![0.0f32; b * hq * nq];
        let mut ov = ViewMut::contiguous(&mut o, [b, hq, nq, d]).unwrap();
        forward(qv, kv, vv, &opts, &mut ov, Some(&mut lse)).unwrap();
        close(&o, &want.o);
        let d_o = values(o.len(), 5);
        let dov = View::contiguous(&d_o, &[b, hq, nq, d]).unwrap();
        let g = reference::backward::<f64>(qv, kv, vv, dov, &opts).unwrap();
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        backward(
            qv,
            kv,
            vv,
            View::contiguous(&o, &[b, hq, nq, d]).unwrap(),
            &lse,
            dov,
            &opts,
            &mut ViewMut::contiguous(&mut dq, [b, hq, nq, d]).unwrap(),
            &mut ViewMut::contiguous(&mut dk, [b, hkv, nk, d]).unwrap(),
            &mut ViewMut::contiguous(&mut dv, [b, hkv, nk, d]).unwrap(),
        )
        .unwrap();
        close(&dq, &g.dq);
        close(&dk, &g.dk);
        close(&dv, &g.dv);
    }
    let p = probabilities(qv, kv, &Options::new()).unwrap();
    close(
        &p,
        &reference::probabilities::<f64>(qv, kv, &Options::new()).unwrap(),
    );
    // Two halves of the keys merged equal the whole.
    let half = |lo: usize, hi: usize| {
        let (k2, v2): (Vec<f32>, Vec<f32>) =
            (k[lo * d..hi * d].to_vec(), v[lo * d..hi * d].to_vec());
        let mut o = vec![0.0f32; b * hq * nq * d];
        let mut lse = vec![0.0f32; b * hq * nq];
        forward(
            qv,
            View::contiguous(&k2, &[b, hkv, hi - lo, d]).unwrap(),
            View::contiguous(&v2, &[b, hkv, hi - lo, d]).unwrap(),
            &Options::new(),
            &mut ViewMut::contiguous(&mut o, [b, hq, nq, d]).unwrap(),
            Some(&mut lse),
        )
        .unwrap();
        (o, lse)
    };
    let ((mut o1, mut l1), (o2, l2)) = (half(0, 3), half(3, nk));
    merge(&mut o1, &mut l1, &o2, &l2).unwrap();
    close(
        &o1,
        &reference::forward::<f64>(qv, kv, vv, &Options::new())
            .unwrap()
            .o,
    );
}
