//! Every kernel on every instruction set this CPU has, against the scalar path and naive
//! formulas (bit for bit where the arithmetic is the same), and the roofline benchmark
//! (ignored: `cargo test --release -p attentive --lib roofline -- --ignored --nocapture`).

use super::*;

fn table(isa: Isa) -> &'static Kernels {
    isa.kernels().unwrap()
}

#[test]
fn widen_is_exact_for_every_f16() {
    // Every bit pattern (normals, subnormals, ±0, ±∞, NaNs), at an odd length so the tail
    // runs too.
    let src: Vec<f16> = (0..=u16::MAX)
        .map(f16::from_bits)
        .chain([f16::ONE])
        .collect();
    for isa in Isa::all_available() {
        let mut dst = vec![0.0f32; src.len()];
        unsafe { (table(isa).widen)(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
        for (x, y) in src.iter().zip(&dst) {
            let want = x.to_f32();
            assert!(
                y.to_bits() == want.to_bits() || (want.is_nan() && y.is_nan()),
                "{isa:?}: {x:?} widened to {y}"
            );
        }
    }
}

#[test]
fn exp_within_one_ulp() {
    for isa in Isa::all_available() {
        let k = table(isa);
        let xs: Vec<f32> = (-2000..=800).map(|t| t as f32 * 0.1 + 0.013).collect();
        let mut y = xs.clone();
        unsafe { (k.exp_sum)(y.as_mut_ptr(), y.len(), 1.0, 0.0) };
        for (&x, &e) in xs.iter().zip(&y) {
            let want = (x as f64).exp();
            if x < -87.34 {
                assert_eq!(e, 0.0, "{isa:?} exp({x})");
            } else if want > 1.2e-38 {
                let rel = ((e as f64 - want) / want).abs();
                assert!(rel < 1.3e-7, "{isa:?} exp({x}) = {e}, want {want}");
            }
        }
        let mut inf = [f32::NEG_INFINITY; 19];
        let s = unsafe { (k.exp_sum)(inf.as_mut_ptr(), 19, 1.0, 0.0) };
        assert_eq!(s, 0.0);
        assert!(inf.iter().all(|&x| x == 0.0));
    }
}

/// The roofline of the forward on this core, measured: the fastest instruction set's GEMM on
/// the forward's two shapes (QKᵀ of a 64-row tile against a 64-key tile, P·V of 64 rows over
/// 256 keys) and its online softmax over a 64 × 256 tile, each with its operands already in
/// the core's caches, then the bound they set on one (query, key) pair. A benchmark, not a
/// check: `cargo test --release -p attentive --lib roofline -- --ignored --nocapture`.
#[test]
#[ignore]
fn roofline() {
    use crate::workspace::AVec;
    let k = table(Isa::best());
    let best = |f: &mut dyn FnMut(), reps: usize| {
        (0..9)
            .map(|_| {
                let t = std::time::Instant::now();
                (0..reps).for_each(|_| f());
                t.elapsed().as_secs_f64() / reps as f64
            })
            .fold(f64::MAX, f64::min)
    };
    println!(
        "instruction set {:?}, one thread, operands in cache",
        Isa::best()
    );
    for d in [64usize, 128] {
        let (q, kt, v) = (
            AVec::filled(64 * d, 0.01),
            AVec::filled(d * 64, 0.02),
            AVec::filled(256 * d, 0.03),
        );
        let (mut s, mut o) = (AVec::filled(64 * 256, 0.0), AVec::filled(64 * d, 0.0));
        let gemm = |m, n, kk, a: &AVec, a_rs, b: &AVec, ldb, c: &mut AVec, ldc| Gemm {
            m,
            n,
            k: kk,
            a: a.as_ptr(),
            a_rs,
            a_ks: 1,
            b: b.as_ptr(),
            ldb,
            b_vs: k.lanes,
            c: c.as_mut_ptr(),
            ldc,
            accumulate: false,
            bias: std::ptr::null(),
            join: std::ptr::null(),
        };
        let qk = gemm(64, 64, d, &q, d, &kt, 64, &mut s, 256);
        let pv = gemm(64, d, 256, &s, 256, &v, d, &mut o, d);
        // SAFETY: every operand above holds the rows and columns its GEMM reads or writes.
        let t_qk = best(&mut || unsafe { (k.gemm)(&qk) }, 200);
        let t_pv = best(&mut || unsafe { (k.gemm)(&pv) }, 50);
        let (mut m, mut l, mut alpha) = (vec![0.0f32; 64], vec![0.0f32; 64], vec![0.0f32; 64]);
        let mut p = AVec::filled(64 * 256, 0.0);
        let t_sm = best(
            &mut || {
                p.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = (i % 97) as f32 * 0.01);
                m.fill(f32::NEG_INFINITY);
                l.fill(0.0);
                // SAFETY: p holds 64 rows of 256 scores; m, l and alpha 64 rows.
                unsafe {
                    (k.online_softmax)(&OnlineSoftmax {
                        s: p.as_mut_ptr(),
                        lds: 256,
                        rows: 64,
                        n: 256,
                        scale: 0.125,
                        m: m.as_mut_ptr(),
                        l: l.as_mut_ptr(),
                        alpha: alpha.as_mut_ptr(),
                    })
                }
            },
            50,
        );
        let t_fill = best(
            &mut || {
                p.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = (i % 97) as f32 * 0.01)
            },
            50,
        );
        let gf = |flops: f64, t: f64| flops / t / 1e9;
        let pairs_qk = 64.0 * 64.0;
        let pairs = 64.0 * 256.0;
        let per_pair = t_qk / pairs_qk + t_pv / pairs + (t_sm - t_fill).max(0.0) / pairs;
        println!(
            "D = {d}: QKᵀ {:.1} GFLOP/s, P·V {:.1} GFLOP/s, softmax {:.2} ns per score; \
             bound {:.1} GFLOP/s per core (softmax {:.0}% of a pair's time)",
            gf(2.0 * pairs_qk * d as f64, t_qk),
            gf(2.0 * pairs * d as f64, t_pv),
            1e9 * (t_sm - t_fill).max(0.0) / pairs,
            gf(4.0 * d as f64, per_pair),
            100.0 * (t_sm - t_fill).max(0.0) / pairs / per_pair,
        );
    }
}

#[test]
fn online_softmax_equals_max_then_exp_sum_and_the_scalar_path() {
    let mut seed = 7u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0
    };
    for &(rows, n) in &[
        (1, 1),
        (4, 64),
        (7, 17),
        (9, 16),
        (13, 64),
        (5, 3),
        (39, 35),
    ] {
        let lds = n + 2;
        let mut s0: Vec<f32> = (0..rows * lds).map(|_| rnd()).collect();
        // A row of −∞ scores (fully masked) inside a group of four.
        s0[2 % rows * lds..2 % rows * lds + n].fill(f32::NEG_INFINITY);
        let m0: Vec<f32> = (0..rows)
            .map(|r| if r % 3 == 0 { f32::NEG_INFINITY } else { rnd() })
            .collect();
        let l0: Vec<f32> = m0
            .iter()
            .map(|&m| if m.is_finite() { 2.5 } else { 0.0 })
            .collect();
        let mut outs = Vec::new();
        for isa in Isa::all_available() {
            let k = table(isa);
            let (mut s, mut m, mut l, mut alpha) =
                (s0.clone(), m0.clone(), l0.clone(), vec![0.0; rows]);
            let t = OnlineSoftmax {
                s: s.as_mut_ptr(),
                lds,
                rows,
                n,
                scale: 0.3,
                m: m.as_mut_ptr(),
                l: l.as_mut_ptr(),
                alpha: alpha.as_mut_ptr(),
            };
            // SAFETY: s holds rows×lds elements; m, l and alpha hold rows.
            unsafe { (k.online_softmax)(&t) };
            for r in 0..rows {
                // The same step through the per-row kernels.
                let mut x = s0[r * lds..r * lds + n].to_vec();
                let m_new = m0[r].max(0.3 * unsafe { (k.max)(x.as_ptr(), n) });
                let (mut want_l, mut want_a) = (l0[r], 1.0);
                if m_new == f32::NEG_INFINITY {
                    x.fill(0.0);
                } else {
                    let sum = unsafe { (k.exp_sum)(x.as_mut_ptr(), n, 0.3, m_new) };
                    if m0[r] != m_new && m0[r] != f32::NEG_INFINITY {
                        want_a = (m0[r] - m_new).exp();
                        want_l *= want_a;
                    }
                    want_l += sum;
                }
                let want_m = if m_new == f32::NEG_INFINITY {
                    m0[r]
                } else {
                    m_new
                };
                assert_eq!(
                    &s[r * lds..r * lds + n],
                    &x[..],
                    "{isa:?} {rows}x{n} row {r}"
                );
                assert_eq!(
                    (m[r], l[r], alpha[r]),
                    (want_m, want_l, want_a),
                    "{isa:?} row {r}"
                );
                assert!(s[r * lds + n..(r + 1) * lds]
                    .iter()
                    .zip(&s0[r * lds + n..(r + 1) * lds])
                    .all(|(a, b)| a == b));
            }
            outs.push((isa, s, l));
        }
        let (_, s_ref, l_ref) = outs.last().unwrap();
        for (isa, s, l) in &outs {
            for (a, b) in s.iter().zip(s_ref).chain(l.iter().zip(l_ref)) {
                assert!(
                    (a - b).abs() <= 4e-7 * b.abs().max(1.0),
                    "{isa:?}: {a} vs scalar {b}"
                );
            }
        }
    }
}

#[test]
fn softmax_grad_matches_the_scalar_formula() {
    for isa in Isa::all_available() {
        let k = table(isa);
        for n in [1, 15, 16, 17, 64] {
            let p: Vec<f32> = (0..n).map(|c| (c as f32 * 0.37).sin().abs()).collect();
            let dp: Vec<f32> = (0..n + 1).map(|c| (c as f32 * 1.3).cos()).collect();
            let mut ds = dp.clone();
            // SAFETY: p holds n elements and ds n + 1.
            unsafe { (k.softmax_grad)(p.as_ptr(), ds.as_mut_ptr(), n, 0.25, 0.125) };
            for c in 0..n {
                assert_eq!(ds[c], p[c] * (dp[c] - 0.25) * 0.125, "{isa:?} n={n} c={c}");
            }
            assert_eq!(ds[n], dp[n], "{isa:?} wrote past n");
        }
    }
}

#[test]
fn dots_are_the_f64_sum_rounded_once() {
    for isa in Isa::all_available() {
        let kern = table(isa);
        for &(m, n, k) in &[(1, 1, 1), (1, 64, 128), (3, 17, 37), (16, 5, 16), (2, 9, 7)] {
            let a: Vec<f32> = (0..m * (k + 2))
                .map(|x| (x as f32 * 0.71).sin() * 3.0)
                .collect();
            let b: Vec<f32> = (0..n * (k + 1)).map(|x| (x as f32 * 1.37).cos()).collect();
            let mut c = vec![f32::NAN; m * (n + 1)];
            let g = Dots {
                m,
                n,
                k,
                a: a.as_ptr(),
                lda: k + 2,
                b: b.as_ptr(),
                ldb: k + 1,
                c: c.as_mut_ptr(),
                ldc: n + 1,
            };
            // SAFETY: a holds m rows of k + 2, b n rows of k + 1, c m rows of n + 1.
            unsafe { (kern.dots)(&g) };
            for r in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|t| a[r * (k + 2) + t] as f64 * b[j * (k + 1) + t] as f64)
                        .sum();
                    let got = c[r * (n + 1) + j];
                    // Rounded once from a sum whose own error is far below an f32 ulp.
                    let ulp = (exact as f32).abs().max(f32::MIN_POSITIVE) * f32::EPSILON;
                    assert!(
                        (got as f64 - exact).abs() <= ulp as f64,
                        "{isa:?} {m}x{n}x{k} ({r}, {j}): {got} vs {exact}"
                    );
                }
                assert!(c[r * (n + 1) + n].is_nan(), "{isa:?} wrote past n");
            }
        }
    }
}

#[test]
fn scale_add_is_one_fused_multiply_add_per_element() {
    for isa in Isa::all_available() {
        let k = table(isa);
        for n in [1, 15, 16, 17, 64, 130] {
            let x0: Vec<f32> = (0..n + 1).map(|c| (c as f32 * 0.37).sin()).collect();
            let y: Vec<f32> = (0..n).map(|c| (c as f32 * 1.3).cos()).collect();
            let mut x = x0.clone();
            // SAFETY: x holds n + 1 elements and y n.
            unsafe { (k.scale_add)(x.as_mut_ptr(), y.as_ptr(), n, 0.7) };
            for c in 0..n {
                assert_eq!(x[c], x0[c].mul_add(0.7, y[c]), "{isa:?} n={n} c={c}");
            }
            assert_eq!(x[n], x0[n], "{isa:?} wrote past n");
        }
    }
}

#[test]
fn transpose_matches_the_scalar_path() {
    for isa in Isa::all_available() {
        let k = table(isa);
        for &(rows, cols) in &[(1, 1), (16, 16), (64, 64), (17, 33), (40, 8), (5, 70)] {
            let (lds, ldd) = (cols + 3, rows + 5);
            let src: Vec<f32> = (0..rows * lds).map(|x| x as f32).collect();
            let mut dst = vec![-1.0f32; cols * ldd];
            let t = Transpose {
                src: src.as_ptr(),
                lds,
                rows,
                cols,
                dst: dst.as_mut_ptr(),
                ldd,
            };
            // SAFETY: src holds rows×lds and dst cols×ldd elements.
            unsafe { (k.transpose)(&t) };
            for c in 0..cols {
                for r in 0..ldd {
                    let want = if r < rows { src[r * lds + c] } else { -1.0 };
                    assert_eq!(
                        dst[c * ldd + r],
                        want,
                        "{isa:?} {rows}x{cols} at ({r}, {c})"
                    );
                }
            }
        }
    }
}

#[test]
fn gemm_matches_naive_on_awkward_sizes() {
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for isa in Isa::all_available() {
        let k = table(isa);
        for &(m, n, kk) in &[
            (1, 1, 1),
            (7, 33, 5),
            (13, 64, 64),
            (6, 17, 3),
            (64, 80, 40),
            // One or two rows take passes twice as wide (tails included).
            (1, 128, 33),
            (2, 150, 9),
            (1, 37, 4),
            // At most two vectors of columns take passes of up to twelve rows.
            (30, 32, 17),
            (64, 20, 300),
            (7, 9, 3),
        ] {
            for &(trans, acc) in &[(false, false), (true, true)] {
                let a: Vec<f32> = (0..m * kk).map(|_| rnd()).collect();
                let b: Vec<f32> = (0..kk * (n + 3)).map(|_| rnd()).collect();
                let c0: Vec<f32> = (0..m * (n + 1)).map(|_| rnd()).collect();
                let mut c = c0.clone();
                let (a_rs, a_ks) = if trans { (1, m) } else { (kk, 1) };
                let g = Gemm {
                    m,
                    n,
                    k: kk,
                    a: a.as_ptr(),
                    a_rs,
                    a_ks,
                    b: b.as_ptr(),
                    ldb: n + 3,
                    b_vs: k.lanes,
                    c: c.as_mut_ptr(),
                    ldc: n + 1,
                    accumulate: acc,
                    bias: std::ptr::null(),
                    join: std::ptr::null(),
                };
                unsafe { (k.gemm)(&g) };
                // B in panels one vector wide (each kk × lanes, row stride lanes, zero
                // past n): the same products in the same order, so the same bits.
                let l = k.lanes;
                let panels = n.div_ceil(l);
                let mut bp = vec![0.0f32; panels * kk * l];
                for p in 0..kk {
                    for j in 0..n {
                        bp[(j / l) * kk * l + p * l + j % l] = b[p * (n + 3) + j];
                    }
                }
                let mut cp = c0.clone();
                let gp = Gemm {
                    b: bp.as_ptr(),
                    ldb: l,
                    b_vs: kk * l,
                    c: cp.as_mut_ptr(),
                    ..g
                };
                unsafe { (k.gemm)(&gp) };
                assert_eq!(cp, c, "{isa:?} {m}x{n}x{kk} in panels");
                if !acc {
                    // Joined to C as it stores: the bits of the product apart, then
                    // C ← alpha·C + T row by row (alpha 1 included: the plain sum).
                    let alpha: Vec<f32> = (0..m)
                        .map(|i| if i % 3 == 0 { 1.0 } else { rnd() })
                        .collect();
                    let mut cj = c0.clone();
                    let gj = Gemm {
                        c: cj.as_mut_ptr(),
                        join: alpha.as_ptr(),
                        ..g
                    };
                    unsafe { (k.gemm)(&gj) };
                    let mut want = c0.clone();
                    for i in 0..m {
                        let row = &mut want[i * (n + 1)..i * (n + 1) + n];
                        unsafe {
                            (k.scale_add)(row.as_mut_ptr(), c[i * (n + 1)..].as_ptr(), n, alpha[i])
                        };
                    }
                    assert_eq!(cj, want, "{isa:?} {m}x{n}x{kk} joined");
                }
                for i in 0..m {
                    for j in 0..n + 1 {
                        let got = c[i * (n + 1) + j];
                        if j == n {
                            assert_eq!(got, c0[i * (n + 1) + j], "column past n was written");
                            continue;
                        }
                        let mut want = if acc { c0[i * (n + 1) + j] as f64 } else { 0.0 };
                        for p in 0..kk {
                            want += a[i * a_rs + p * a_ks] as f64 * b[p * (n + 3) + j] as f64;
                        }
                        assert!((got as f64 - want).abs() < 1e-5, "{isa:?} {m}x{n}x{kk}");
                    }
                }
            }
        }
    }
}

/// The AVX-512 tables for each vendor differ only in prefetch hints, which read nothing:
/// their GEMMs give the same bits (f32 and f16 B, rows and columns not whole blocks).
#[cfg(target_arch = "x86_64")]
#[test]
fn both_avx512_tables_give_the_same_bits() {
    if !Isa::Avx512.available() {
        return;
    }
    let (amd, intel) = (&x86::AVX512, &x86::AVX512_XEON);
    for &(m, n, kk) in &[(1, 1, 1), (7, 33, 5), (64, 64, 64), (13, 80, 300)] {
        let a: Vec<f32> = (0..m * kk).map(|x| (x as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..kk * n).map(|x| (x as f32 * 0.91).cos()).collect();
        let b16: Vec<f16> = b.iter().map(|&x| f16::from_f32(x)).collect();
        let run = |t: &Kernels, half: bool| {
            let mut c = vec![0.5f32; m * n];
            fn g<E>(
                (m, n, k): (usize, usize, usize),
                a: &[f32],
                b: &[E],
                c: &mut [f32],
                lanes: usize,
            ) -> Gemm<E> {
                Gemm {
                    m,
                    n,
                    k,
                    a: a.as_ptr(),
                    a_rs: k,
                    a_ks: 1,
                    b: b.as_ptr(),
                    ldb: n,
                    b_vs: lanes,
                    c: c.as_mut_ptr(),
                    ldc: n,
                    accumulate: true,
                    bias: std::ptr::null(),
                    join: std::ptr::null(),
                }
            }
            // SAFETY: a is m × kk, b and b16 kk × n, c m × n, all row-major.
            unsafe {
                if half {
                    (t.gemm_f16)(&g((m, n, kk), &a, &b16, &mut c, t.lanes))
                } else {
                    (t.gemm)(&g((m, n, kk), &a, &b, &mut c, t.lanes))
                }
            };
            c
        };
        for half in [false, true] {
            assert_eq!(
                run(amd, half),
                run(intel, half),
                "{m}x{n}x{kk}, f16 B: {half}"
            );
        }
    }
}

/// f16 operands widened as they are loaded give the same bits as the f32 kernels on the
/// widened values: the GEMM's B (tails included) and the dot products' rows.
#[test]
fn f16_operands_equal_the_f32_kernels_on_widened_values() {
    let half = |n: usize, seed: u32| -> Vec<f16> {
        (0..n)
            .map(|i| {
                f16::from_f32(
                    ((((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 - 1000.0) / 317.0,
                )
            })
            .collect()
    };
    let wide = |x: &[f16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
    for isa in Isa::all_available() {
        let k = table(isa);
        for &(m, n, kk) in &[
            (1, 1, 1),
            (1, 128, 700),
            (1, 33, 128),
            (7, 33, 5),
            (6, 64, 64),
            (16, 80, 143),
            (30, 20, 17),
        ] {
            let a: Vec<f32> = wide(&half(m * kk, 7));
            let b16 = half(kk * (n + 3), 11);
            let b32 = wide(&b16);
            let mut c16 = vec![0.5f32; m * n];
            let mut c32 = c16.clone();
            fn gemm<E>(
                a: &[f32],
                b: *const E,
                c: &mut [f32],
                (m, n, kk, lanes): (usize, usize, usize, usize),
            ) -> Gemm<E> {
                Gemm {
                    m,
                    n,
                    k: kk,
                    a: a.as_ptr(),
                    a_rs: kk,
                    a_ks: 1,
                    b,
                    ldb: n + 3,
                    b_vs: lanes,
                    c: c.as_mut_ptr(),
                    ldc: n,
                    accumulate: true,
                    bias: std::ptr::null(),
                    join: std::ptr::null(),
                }
            }
            let dims = (m, n, kk, k.lanes);
            unsafe { (k.gemm)(&gemm(&a, b32.as_ptr(), &mut c32, dims)) };
            unsafe { (k.gemm_f16)(&gemm(&a, b16.as_ptr(), &mut c16, dims)) };
            assert_eq!(c16, c32, "{isa:?} gemm {m}x{n}x{kk}");
            fn dots<E>(
                a: &[f32],
                b: *const E,
                c: &mut [f32],
                (m, n, kk): (usize, usize, usize),
            ) -> Dots<E> {
                Dots {
                    m,
                    n,
                    k: kk,
                    a: a.as_ptr(),
                    lda: kk,
                    b,
                    ldb: kk,
                    c: c.as_mut_ptr(),
                    ldc: n,
                }
            }
            let (mut d16, mut d32) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
            let (r16, r32) = (half(n * kk, 13), wide(&half(n * kk, 13)));
            unsafe { (k.dots)(&dots(&a, r32.as_ptr(), &mut d32, (m, n, kk))) };
            unsafe { (k.dots_f16)(&dots(&a, r16.as_ptr(), &mut d16, (m, n, kk))) };
            assert_eq!(d16, d32, "{isa:?} dots {m}x{n}x{kk}");
        }
    }
}
