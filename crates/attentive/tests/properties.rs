//! Properties attention must have, checked on the kernels, and the oracle's own gradients checked
//! against finite differences.

mod common;
use attentive::{backward, forward, reference, Causal, Options, View, ViewMut};
use common::{cv, rows_of, Case, Inputs, Rng};

/// Forward through the kernel with contiguous outputs: (O, LSE).
fn fwd(q: View, k: View, v: View, opts: &Options) -> (Vec<f32>, Vec<f32>) {
    let [b, hq, nq, _] = q.shape();
    let dv = v.shape()[3];
    let mut o = vec![0.0; b * hq * nq * dv];
    let mut lse = vec![0.0; b * hq * nq];
    forward(
        q,
        k,
        v,
        opts,
        &mut ViewMut::contiguous(&mut o, [b, hq, nq, dv]).unwrap(),
        Some(&mut lse),
    )
    .unwrap();
    (o, lse)
}

/// Backward through the kernel: (dQ, dK, dV), contiguous.
fn bwd(q: View, k: View, v: View, d_o: View, opts: &Options) -> [Vec<f32>; 3] {
    let (o, lse) = fwd(q, k, v, opts);
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    let mut dq = vec![0.0; qs.iter().product()];
    let mut dk = vec![0.0; ks.iter().product()];
    let mut dv = vec![0.0; vs.iter().product()];
    backward(
        q,
        k,
        v,
        View::contiguous(&o, &d_o.shape()).unwrap(),
        &lse,
        d_o,
        opts,
        &mut ViewMut::contiguous(&mut dq, qs).unwrap(),
        &mut ViewMut::contiguous(&mut dk, ks).unwrap(),
        &mut ViewMut::contiguous(&mut dv, vs).unwrap(),
    )
    .unwrap();
    [dq, dk, dv]
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn gqa_equals_mha_with_repeated_kv() {
    let (b, hq, hkv, nq, nk, d) = (2, 6, 2, 70, 90, 32);
    let mut rng = Rng::new(3);
    let q = rng.vec(b * hq * nq * d);
    let k = rng.vec(b * hkv * nk * d);
    let v = rng.vec(b * hkv * nk * d);
    let d_o = rng.vec(b * hq * nq * d);
    // Repeat each kv head Hq/Hkv times, as HF's repeat_kv does.
    let repeat = |x: &[f32]| -> Vec<f32> {
        let mut out = Vec::new();
        for bi in 0..b {
            for h in 0..hq {
                let src = (bi * hkv + h / (hq / hkv)) * nk * d;
                out.extend_from_slice(&x[src..src + nk * d]);
            }
        }
        out
    };
    let (kr, vr) = (repeat(&k), repeat(&v));
    let qv = View::contiguous(&q, &[b, hq, nq, d]).unwrap();
    let dov = View::contiguous(&d_o, &[b, hq, nq, d]).unwrap();
    let gqa_k = View::contiguous(&k, &[b, hkv, nk, d]).unwrap();
    let gqa_v = View::contiguous(&v, &[b, hkv, nk, d]).unwrap();
    let mha_k = View::contiguous(&kr, &[b, hq, nk, d]).unwrap();
    let mha_v = View::contiguous(&vr, &[b, hq, nk, d]).unwrap();
    let opts = Options::new().causal(Causal::BottomRight);
    assert_eq!(fwd(qv, gqa_k, gqa_v, &opts), fwd(qv, mha_k, mha_v, &opts));
    let [dq1, dk1, dv1] = bwd(qv, gqa_k, gqa_v, dov, &opts);
    let [dq2, dk2, dv2] = bwd(qv, mha_k, mha_v, dov, &opts);
    assert!(close(&dq1, &dq2, 1e-6));
    // dK, dV of a kv head are the sums over its query heads.
    let sum_group = |x: &[f32]| -> Vec<f32> {
        let mut out = vec![0.0; b * hkv * nk * d];
        for bi in 0..b {
            for h in 0..hq {
                let dst = (bi * hkv + h / (hq / hkv)) * nk * d;
                let src = (bi * hq + h) * nk * d;
                for c in 0..nk * d {
                    out[dst + c] += x[src + c];
                }
            }
        }
        out
    };
    assert!(close(&dk1, &sum_group(&dk2), 1e-5));
    assert!(close(&dv1, &sum_group(&dv2), 1e-5));
}

#[test]
fn permuting_keys_and_values_together_leaves_output_unchanged() {
    for (nq, nk) in [(3, 200), (100, 130)] {
        let (b, h, d) = (1, 2, 48);
        let mut rng = Rng::new(nk as u64);
        let q = rng.vec(b * h * nq * d);
        let k = rng.vec(b * h * nk * d);
        let v = rng.vec(b * h * nk * d);
        // A random permutation of the keys.
        let mut perm: Vec<usize> = (0..nk).collect();
        for i in (1..nk).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let permute = |x: &[f32]| -> Vec<f32> {
            let mut out = vec![0.0; x.len()];
            for hh in 0..b * h {
                for (j, &pj) in perm.iter().enumerate() {
                    let (dst, src) = ((hh * nk + j) * d, (hh * nk + pj) * d);
                    out[dst..dst + d].copy_from_slice(&x[src..src + d]);
                }
            }
            out
        };
        let (kp, vp) = (permute(&k), permute(&v));
        let opts = Options::new();
        let (sq, sk) = ([b, h, nq, d], [b, h, nk, d]);
        let (o1, l1) = fwd(cv(&q, sq), cv(&k, sk), cv(&v, sk), &opts);
        let (o2, l2) = fwd(cv(&q, sq), cv(&kp, sk), cv(&vp, sk), &opts);
        assert!(close(&o1, &o2, 2e-6) && close(&l1, &l2, 2e-6));
    }
}

#[test]
fn causal_row_equals_attention_over_its_prefix() {
    let (h, n, d) = (2, 150, 40);
    let mut rng = Rng::new(11);
    let q = rng.vec(h * n * d);
    let k = rng.vec(h * n * d);
    let v = rng.vec(h * n * d);
    let s = [1, h, n, d];
    let (o, _) = fwd(
        cv(&q, s),
        cv(&k, s),
        cv(&v, s),
        &Options::new().causal(Causal::TopLeft),
    );
    for i in [0, 1, 63, 64, 65, 149] {
        // Query i alone, against keys 0..=i, with no mask: views with the head stride of the
        // full tensors select the prefix without a copy.
        let hnd = [h, n, d];
        let (oi, _) = fwd(
            rows_of(&q, hnd, i, 1),
            rows_of(&k, hnd, 0, i + 1),
            rows_of(&v, hnd, 0, i + 1),
            &Options::new(),
        );
        for hh in 0..h {
            let want = &o[(hh * n + i) * d..(hh * n + i + 1) * d];
            assert!(close(&oi[hh * d..(hh + 1) * d], want, 1e-6), "row {i}");
        }
    }
}

#[test]
fn decode_path_equals_tiled_kernel() {
    // 16 queries take the decode path; the same 16 among 80 take the tiled path.
    let (h, nk, d) = (4, 3000, 64);
    let mut rng = Rng::new(5);
    let q = rng.vec(h * 80 * d);
    let k = rng.vec(h * nk * d);
    let v = rng.vec(h * nk * d);
    let sk = [1, h, nk, d];
    // (Bottom-right rules depend on Nq, so only rules that do not are compared here.)
    let far_keys = |p: attentive::Pos| p.j >= 1000 + 100 * p.i;
    for opts in [Options::new(), Options::new().mask_rule(&far_keys)] {
        let (o_tiled, l_tiled) = fwd(cv(&q, [1, h, 80, d]), cv(&k, sk), cv(&v, sk), &opts);
        let q16 = rows_of(&q, [h, 80, d], 0, 16);
        let (o_dec, l_dec) = fwd(q16, cv(&k, sk), cv(&v, sk), &opts);
        for hh in 0..h {
            let t = &o_tiled[hh * 80 * d..(hh * 80 + 16) * d];
            let dec = &o_dec[hh * 16 * d..(hh + 1) * 16 * d];
            let diff = dec
                .iter()
                .zip(t)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff <= 1e-6, "max difference {diff}");
            assert!(close(
                &l_dec[hh * 16..(hh + 1) * 16],
                &l_tiled[hh * 80..hh * 80 + 16],
                2e-6
            ));
        }
    }
}

#[test]
fn dropout_drops_the_requested_fraction() {
    // Q = K = 0 makes every weight 1/Nk; V = identity makes O[i][j] = Z_ij / Nk, so the zeros of O
    // are exactly the dropped weights.
    let (nq, nk) = (1000, 64);
    let q = vec![0.0f32; nq * 8];
    let k = vec![0.0f32; nk * 8];
    let mut v = vec![0.0f32; nk * nk];
    (0..nk).for_each(|j| v[j * nk + j] = 1.0);
    for p in [0.1f32, 0.3, 0.5, 0.9] {
        let opts = Options::new().dropout(p, 42);
        let (o, _) = fwd(
            View::contiguous(&q, &[1, 1, nq, 8]).unwrap(),
            View::contiguous(&k, &[1, 1, nk, 8]).unwrap(),
            View::contiguous(&v, &[1, 1, nk, nk]).unwrap(),
            &opts,
        );
        let dropped = o.iter().filter(|&&x| x == 0.0).count() as f64 / o.len() as f64;
        assert!(
            (dropped - p as f64).abs() <= 0.01,
            "p = {p}: dropped {dropped}"
        );
        let kept = 1.0 / nk as f32 / (1.0 - p);
        assert!(o.iter().all(|&x| x == 0.0 || (x - kept).abs() < 1e-6));
    }
}

#[test]
fn same_bits_with_one_and_two_threads() {
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    for (nq, nk, hkv) in [(300, 300, 1), (5, 2500, 1), (129, 77, 2)] {
        let mut c = Case::plain(1, 2 * hkv, hkv, nq, nk, 64);
        c.causal = Some(Causal::BottomRight);
        c.dropout = Some(0.2);
        c.alibi = true;
        let inp = Inputs::new(&c);
        let opts = inp.options(&c);
        let (q, k, v, d_o) = (inp.q.view(), inp.k.view(), inp.v.view(), inp.d_o.view());
        let run = || (fwd(q, k, v, &opts), bwd(q, k, v, d_o, &opts));
        let one = pool(1).install(run);
        let two = pool(2).install(run);
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.0 .0), bits(&two.0 .0));
        assert_eq!(bits(&one.0 .1), bits(&two.0 .1));
        for g in 0..3 {
            assert_eq!(bits(&one.1[g]), bits(&two.1[g]), "gradient {g}, nq {nq}");
        }
    }
}

#[test]
fn where_the_inputs_lie_in_memory_changes_no_bit() {
    // The kernels copy operands that do not start a cache line (V's rows for the P·V product)
    // onto one; the copy must not change the arithmetic. Each tensor is placed at every float
    // offset within a 64-byte line, with Dv both a whole number of vectors and not.
    let mut rng = Rng::new(11);
    // Enough query tiles per key tile that the kernel packs K and V once, up front.
    // Dv > 64 copies V into panels of 32 columns, the last one partial here.
    for (nq, nk, d, dv, causal) in [
        (520, 130, 64, 64, None),
        (600, 70, 24, 40, Some(Causal::TopLeft)),
        (530, 140, 32, 100, Some(Causal::BottomRight)),
    ] {
        let (b, h) = (1, 2);
        let q = rng.vec(b * h * nq * d);
        let k = rng.vec(b * h * nk * d);
        let v = rng.vec(b * h * nk * dv);
        let d_o = rng.vec(b * h * nq * dv);
        let opts = match causal {
            Some(c) => Options::new().causal(c),
            None => Options::new(),
        };
        let at = |x: &[f32], off: usize| {
            let mut y = vec![0.0; off];
            y.extend_from_slice(x);
            y
        };
        let run = |off: usize| {
            let (q2, k2, v2, o2) = (at(&q, off), at(&k, off), at(&v, off), at(&d_o, off));
            fn view(x: &[f32], off: usize, [b, h, n, w]: [usize; 4]) -> View<'_> {
                View::new(&x[off..], [b, h, n, w], [h * n * w, n * w, w, 1]).unwrap()
            }
            let qv = view(&q2, off, [b, h, nq, d]);
            let (kv, vv) = (
                view(&k2, off, [b, h, nk, d]),
                view(&v2, off, [b, h, nk, dv]),
            );
            let dov = view(&o2, off, [b, h, nq, dv]);
            (fwd(qv, kv, vv, &opts), bwd(qv, kv, vv, dov, &opts))
        };
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let base = run(0);
        for off in 1..16 {
            let other = run(off);
            assert_eq!(bits(&base.0 .0), bits(&other.0 .0), "output, offset {off}");
            assert_eq!(bits(&base.0 .1), bits(&other.0 .1), "LSE, offset {off}");
            for g in 0..3 {
                assert_eq!(
                    bits(&base.1[g]),
                    bits(&other.1[g]),
                    "gradient {g}, offset {off}"
                );
            }
        }
    }
}

#[test]
fn fully_masked_row_gives_zero_output_minus_infinity_lse_and_zero_gradients() {
    let (n, d) = (70, 16);
    let mut rng = Rng::new(9);
    let x = rng.vec(n * d);
    let xv = View::contiguous(&x, &[1, 1, n, d]).unwrap();
    // Query 3 sees nothing; the others see everything but key 5.
    let mask: Vec<bool> = (0..n * n).map(|e| e / n != 3 && e % n != 5).collect();
    for nq in [n, 10] {
        let qv = View::new(&x, [1, 1, nq, d], [n * d, n * d, d, 1]).unwrap();
        let mask = View::new(&mask, [1, 1, nq, n], [n * n, n * n, n, 1]).unwrap();
        let opts = Options::new().mask(mask);
        let (o, lse) = fwd(qv, xv, xv, &opts);
        assert!(o[3 * d..4 * d].iter().all(|&x| x == 0.0));
        assert_eq!(lse[3], f32::NEG_INFINITY);
        assert!(o.iter().chain(lse.iter()).all(|x| !x.is_nan()));
        let d_o = vec![1.0f32; nq * d];
        let [dq, dk, dv] = bwd(
            qv,
            xv,
            xv,
            View::contiguous(&d_o, &[1, 1, nq, d]).unwrap(),
            &opts,
        );
        assert!(dq[3 * d..4 * d].iter().all(|&x| x == 0.0));
        // Key 5 is never seen: its gradients vanish.
        assert!(dk[5 * d..6 * d]
            .iter()
            .chain(&dv[5 * d..6 * d])
            .all(|&x| x == 0.0));
        assert!(dq.iter().chain(&dk).chain(&dv).all(|x| x.is_finite()));
    }
}

/// Central differences of $L = \sum O \circ G$ in f64 through the oracle's forward, against the
/// oracle's backward, for every input element of a tiny problem. Inputs are multiples of 2⁻⁸ so
/// that `x ± 2⁻²⁰` is exact in f32.
fn finite_difference_check(name: &str, c: &Case) {
    let inp = Inputs::new(c);
    let opts = inp.options(c);
    let quant = |x: &[f32]| -> Vec<f32> { x.iter().map(|v| (v * 256.0).round() / 256.0).collect() };
    let (q, k, v) = (quant(&inp.q.data), quant(&inp.k.data), quant(&inp.v.data));
    let g = inp.d_o.view();
    let (qs, ks, vs) = (inp.q.shape, inp.k.shape, inp.v.shape);
    let view = cv;
    let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
        let o = reference::forward::<f64>(view(q, qs), view(k, ks), view(v, vs), &opts)
            .unwrap()
            .o;
        o.iter().zip(g.to_vec()).map(|(a, b)| a * b as f64).sum()
    };
    let grads =
        reference::backward::<f64>(view(&q, qs), view(&k, ks), view(&v, vs), g, &opts).unwrap();
    let h = 2f32.powi(-20);
    let mut inputs = [q, k, v];
    for (which, want) in [grads.dq, grads.dk, grads.dv].iter().enumerate() {
        for e in 0..inputs[which].len() {
            let x0 = inputs[which][e];
            inputs[which][e] = x0 + h;
            let up = loss(&inputs[0], &inputs[1], &inputs[2]);
            inputs[which][e] = x0 - h;
            let down = loss(&inputs[0], &inputs[1], &inputs[2]);
            inputs[which][e] = x0;
            let fd = (up - down) / (2.0 * h as f64);
            let err = (fd - want[e]).abs();
            assert!(
                err <= 1e-6 * want[e].abs().max(1.0),
                "{name}: d{}[{e}] = {} by the oracle, {fd} by finite differences",
                ["q", "k", "v"][which],
                want[e]
            );
        }
    }
}

#[test]
fn oracle_gradients_match_finite_differences() {
    let base = |seed| {
        let mut c = Case::plain(1, 2, 1, 5, 7, 4);
        c.dv = 3;
        c.seed = seed;
        c
    };
    let mut plain = base(1);
    finite_difference_check("plain", &plain);
    plain.causal = Some(Causal::BottomRight);
    finite_difference_check("causal", &plain);
    let mut c = base(2);
    c.softcap = Some(0.7);
    finite_difference_check("softcap", &c);
    let mut c = base(3);
    c.alibi = true;
    c.window = Some((2, 1));
    finite_difference_check("alibi + window", &c);
    let mut c = base(4);
    c.bias = Some(vec![1, 2, 5, 7]);
    finite_difference_check("bias", &c);
    let mut c = base(5);
    c.dropout = Some(0.3);
    finite_difference_check("dropout", &c);
    let mut c = base(6);
    c.score_rule = true;
    c.mask = Some(vec![5, 7]);
    finite_difference_check("score rule + mask", &c);
}

#[test]
fn merging_attention_over_two_key_halves_equals_attention_over_all() {
    let (h, nq, nk, d) = (3, 70, 150, 32);
    let mut rng = Rng::new(21);
    let q = rng.vec(h * nq * d);
    let k = rng.vec(h * nk * d);
    let v = rng.vec(h * nk * d);
    let hnd = [h, nk, d];
    let opts = Options::new();
    let (o_all, l_all) = fwd(
        cv(&q, [1, h, nq, d]),
        cv(&k, [1, h, nk, d]),
        cv(&v, [1, h, nk, d]),
        &opts,
    );
    let qv = cv(&q, [1, h, nq, d]);
    let (mut o, mut l) = fwd(qv, rows_of(&k, hnd, 0, 60), rows_of(&v, hnd, 0, 60), &opts);
    let (o2, l2) = fwd(
        qv,
        rows_of(&k, hnd, 60, 90),
        rows_of(&v, hnd, 60, 90),
        &opts,
    );
    attentive::merge(&mut o, &mut l, &o2, &l2).unwrap();
    assert!(close(&o, &o_all, 1e-6) && close(&l, &l_all, 2e-6));
    // A part that saw no key (LSE −∞) changes nothing.
    let (o_before, l_before) = (o.clone(), l.clone());
    let (junk_o, none_l) = (vec![5.0; o.len()], vec![f32::NEG_INFINITY; l.len()]);
    attentive::merge(&mut o, &mut l, &junk_o, &none_l).unwrap();
    assert_eq!((o, l), (o_before, l_before));
    assert!(attentive::merge(&mut [0.0; 4], &mut [0.0; 2], &[0.0; 4], &[0.0; 3]).is_err());
}

/// The weights `probabilities` returns equal the oracle's, for every batch and head, with query
/// counts on both sides of a tile (each (batch, head) block of rows is placed by its own index).
#[test]
fn probabilities_match_the_oracle_in_every_head() {
    let mut rng = Rng::new(77);
    for &(b, hq, hkv, nq, nk) in &[
        (2, 4, 2, 3, 5),
        (1, 3, 3, 70, 9),
        (2, 2, 1, 64, 130),
        (1, 2, 2, 129, 1),
    ] {
        let d = 8;
        let q = rng.vec(b * hq * nq * d);
        let k = rng.vec(b * hkv * nk * d);
        let qv = View::contiguous(&q, &[b, hq, nq, d]).unwrap();
        let kv = View::contiguous(&k, &[b, hkv, nk, d]).unwrap();
        let opts = Options::new().causal(Causal::BottomRight);
        let got = attentive::probabilities(qv, kv, &opts).unwrap();
        let want = reference::probabilities::<f64>(qv, kv, &opts).unwrap();
        assert_eq!(got.len(), want.len());
        for (n, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() < 1e-5,
                "{b}x{hq}x{nq}x{nk}: element {n}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn backward_from_copies_of_large_q_and_do_is_exact_and_layout_blind() {
    // Q and dO of 2 MiB or more are read from copies on 2 MiB pages. Gathered from [B, N, H, D]
    // storage they give the same bits as from [B, H, N, D], and the gradients pass the rule.
    let mut rng = Rng::new(23);
    let (b, h, nq, nk, d) = (1, 4, 1100, 300, 128);
    assert!(b * h * nq * d * 4 >= 2 << 20);
    let q = rng.vec(b * h * nq * d);
    let k = rng.vec(b * h * nk * d);
    let v = rng.vec(b * h * nk * d);
    let d_o = rng.vec(b * h * nq * d);
    let opts = Options::new().causal(Causal::BottomRight);
    let (qv, dov) = (cv(&q, [b, h, nq, d]), cv(&d_o, [b, h, nq, d]));
    let (kv, vv) = (cv(&k, [b, h, nk, d]), cv(&v, [b, h, nk, d]));
    let got = bwd(qv, kv, vv, dov, &opts);
    // The same tensors stored [B, N, H, D].
    let bnhd = |x: &[f32]| {
        let mut y = vec![0.0; x.len()];
        for hh in 0..h {
            for i in 0..nq {
                let src = &x[(hh * nq + i) * d..][..d];
                y[(i * h + hh) * d..][..d].copy_from_slice(src);
            }
        }
        y
    };
    let (q2, do2) = (bnhd(&q), bnhd(&d_o));
    let strided = bwd(
        View::from_bnhd(&q2, [b, nq, h, d]).unwrap(),
        kv,
        vv,
        View::from_bnhd(&do2, [b, nq, h, d]).unwrap(),
        &opts,
    );
    for g in 0..3 {
        assert!(got[g]
            .iter()
            .zip(&strided[g])
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    let oracle = reference::backward::<f64>(qv, kv, vv, dov, &opts).unwrap();
    let naive = reference::backward::<f32>(qv, kv, vv, dov, &opts).unwrap();
    for (name, got, n, o) in [
        ("dq", &got[0], &naive.dq, &oracle.dq),
        ("dk", &got[1], &naive.dk, &oracle.dk),
        ("dv", &got[2], &naive.dv, &oracle.dv),
    ] {
        common::check_rule(name, got, n, o, 3.0).unwrap();
    }
}
