//! The engine's entry points (`forward`, `forward_half_kv`, `backward`, `probabilities`) on
//! structured arbitrary calls: shapes including zero, strides from the input (overflowing ones
//! included), every option, NaN and ±∞ in inputs, scale, softcap and dropout p.
//!
//! A call returns an error or a result. When it succeeds on finite inputs, the result is
//! checked against the f64 oracle by the accuracy rule (LIMITS.md): within 2× the error of the
//! naive f32 computation (3× for gradients) plus a floor of 4 ulps of the largest value (for
//! dQ and dK, of the largest terms that cancel in them).
#![no_main]

use arbitrary::Arbitrary;
use attentive::{f16, reference, Causal, Isa, Options, View, ViewMut};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Call {
    /// b, hkv, group, nq, nk, d, dv (each reduced to a small range, zero included).
    dims: [u8; 7],
    /// Strides of q as given (a view over a buffer of `extra` more elements), or row-major.
    q_strides: Option<[u64; 4]>,
    extra: u8,
    bnhd: bool,
    causal: u8,
    window: Option<(u8, u8)>,
    scale: Option<f32>,
    softcap: Option<f32>,
    alibi: bool,
    mask: bool,
    bias: bool,
    docs: bool,
    dropout: Option<(f32, u64)>,
    isa: u8,
    entry: u8,
    /// Values, cycled to fill q, k, v, dO, bias and slopes.
    values: Vec<f32>,
    /// Replace non-finite values and clamp to ±8 (the oracle check runs on finite inputs only).
    finite: bool,
}

fn fill(n: usize, values: &[f32], at: usize, finite: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = if values.is_empty() {
                0.25
            } else {
                values[(at + i * 7) % values.len()]
            };
            if finite {
                if x.is_finite() {
                    x.clamp(-8.0, 8.0)
                } else {
                    0.5
                }
            } else {
                x
            }
        })
        .collect()
}

fn max_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).fold(0.0, |a: f64, (&g, &w)| {
        let e = if w.is_infinite() || g.is_infinite() {
            if g as f64 == w {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (g as f64 - w).abs()
        };
        if e.is_nan() {
            f64::INFINITY
        } else {
            a.max(e)
        }
    })
}

fn rule(what: &str, got: &[f32], naive: &[f32], oracle: &[f64], factor: f64) {
    rule_scaled(what, got, naive, oracle, factor, 0.0);
}

/// [`rule`] with the floor taken from at least `magnitude` (as the engine's tests do for a
/// quantity formed from a difference of larger terms).
fn rule_scaled(
    what: &str,
    got: &[f32],
    naive: &[f32],
    oracle: &[f64],
    factor: f64,
    magnitude: f64,
) {
    let scale = oracle
        .iter()
        .filter(|x| x.is_finite())
        .fold(1e-3f64.max(magnitude), |a, &x| a.max(x.abs()));
    let floor = 4.0 * f32::EPSILON as f64 * scale;
    let (e, e32) = (max_err(got, oracle), max_err(naive, oracle));
    assert!(
        e <= factor * e32 + floor,
        "{what}: error {e:e} > {factor}× {e32:e} + {floor:e}"
    );
}

fuzz_target!(|c: Call| {
    let d = c.dims;
    let (b, hkv, group) = (
        d[0] as usize % 3,
        1 + d[1] as usize % 2,
        1 + d[2] as usize % 3,
    );
    let (nq, nk) = (d[3] as usize % 70, d[4] as usize % 70);
    let (dh, dv) = (d[5] as usize % 20, d[6] as usize % 20);
    let hq = hkv * group;
    let qshape = [b, hq, nq, dh];
    let (kshape, vshape) = ([b, hkv, nk, dh], [b, hkv, nk, dv]);
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    let vals = &c.values;
    let (qn, kn, vn) = (n(qshape), n(kshape), n(vshape));
    let q = fill(qn + c.extra as usize, vals, 0, c.finite);
    let k = fill(kn, vals, 1, c.finite);
    let v = fill(vn, vals, 2, c.finite);
    let d_o = fill(n([b, hq, nq, dv]), vals, 3, c.finite);
    let bias = fill(nq * nk, vals, 4, c.finite);
    let slopes: Vec<f32> = fill(hq, vals, 5, c.finite)
        .iter()
        .map(|s| s.abs() / 8.0)
        .collect();
    let mask: Vec<bool> = (0..nq * nk).map(|i| (i * 5 + nq) % 7 != 0).collect();
    let ids_q: Vec<u32> = (0..b * nq).map(|i| (i % nq.max(1) / 5) as u32).collect();
    let ids_k: Vec<u32> = (0..b * nk).map(|i| (i % nk.max(1) / 7) as u32).collect();

    let qv = match c.q_strides {
        Some(s) => View::new(&q, qshape, s.map(|x| x as usize)),
        None if c.bnhd => View::from_bnhd(&q[..qn], [b, nq, hq, dh]),
        None => View::contiguous(&q[..qn], &qshape),
    };
    let Ok(qv) = qv else { return };
    let (Ok(kv), Ok(vv)) = (View::contiguous(&k, &kshape), View::contiguous(&v, &vshape)) else {
        return;
    };
    let mut opts = Options::new();
    opts.causal = match c.causal % 3 {
        1 => Some(Causal::TopLeft),
        2 => Some(Causal::BottomRight),
        _ => None,
    };
    if let Some((l, r)) = c.window {
        opts = opts.window(l as usize, r as usize);
    }
    opts.scale = c.scale;
    opts.softcap = c.softcap;
    if c.alibi {
        opts = opts.alibi(&slopes);
    }
    let (mview, bview) = (
        View::contiguous(&mask, &[nq, nk]),
        View::contiguous(&bias, &[nq, nk]),
    );
    if c.mask {
        let Ok(m) = mview else { return };
        opts = opts.mask(m);
    }
    if c.bias {
        let Ok(bv) = bview else { return };
        opts = opts.bias(bv);
    }
    if c.docs {
        opts = opts.docs(&ids_q, &ids_k);
    }
    if let Some((p, seed)) = c.dropout {
        opts = opts.dropout(p, seed);
    }
    let isas = Isa::all_available();
    opts = opts.isa(isas[c.isa as usize % isas.len()]);

    let oshape = [b, hq, nq, dv];
    let mut o = vec![f32::NAN; n(oshape)];
    let mut lse = vec![f32::NAN; b * hq * nq];
    let Ok(mut ov) = ViewMut::contiguous(&mut o, oshape) else {
        return;
    };
    // Checked against the oracle when the inputs, the scale and the softcap are finite.
    let checked = c.finite
        && c.scale.is_none_or(f32::is_finite)
        && c.softcap.is_none_or(|s| s.is_finite() && s > 0.0);
    match c.entry % 4 {
        0 | 1 => {
            let ok = if c.entry % 4 == 1 {
                let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
                let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                let (Ok(k16v), Ok(v16v)) = (
                    View::contiguous(&k16, &kshape),
                    View::contiguous(&v16, &vshape),
                ) else {
                    return;
                };
                attentive::forward_half_kv(qv, k16v, v16v, &opts, &mut ov, Some(&mut lse)).is_ok()
            } else {
                attentive::forward(qv, kv, vv, &opts, &mut ov, Some(&mut lse)).is_ok()
            };
            if !ok || !checked || c.entry % 4 == 1 {
                return;
            }
            let want = reference::forward::<f64>(qv, kv, vv, &opts).expect("oracle");
            let naive = reference::forward::<f32>(qv, kv, vv, &opts).expect("oracle");
            rule("O", &o, &naive.o, &want.o, 2.0);
            rule("LSE", &lse, &naive.lse, &want.lse, 2.0);
        }
        2 => {
            if attentive::forward(qv, kv, vv, &opts, &mut ov, Some(&mut lse)).is_err() {
                return;
            }
            let (mut dq, mut dk, mut dvv) = (
                vec![f32::NAN; n(qshape)],
                vec![f32::NAN; kn],
                vec![f32::NAN; vn],
            );
            let (Ok(ov), Ok(dov)) = (
                View::contiguous(&o, &oshape),
                View::contiguous(&d_o, &oshape),
            ) else {
                return;
            };
            let (Ok(mut dqv), Ok(mut dkv), Ok(mut dvv_)) = (
                ViewMut::contiguous(&mut dq, qshape),
                ViewMut::contiguous(&mut dk, kshape),
                ViewMut::contiguous(&mut dvv, vshape),
            ) else {
                return;
            };
            let ok = attentive::backward(
                qv, kv, vv, ov, &lse, dov, &opts, &mut dqv, &mut dkv, &mut dvv_,
            )
            .is_ok();
            if !ok || !checked {
                return;
            }
            let want = reference::backward::<f64>(qv, kv, vv, dov, &opts).expect("oracle");
            let naive =
                reference::backward_from_output::<f32>(qv, kv, vv, (&o[..], &lse[..]), dov, &opts)
                    .expect("oracle");
            // dQ = scale·Σⱼ Pᵢⱼ(dPᵢⱼ − Dᵢ)·kⱼ and dK = scale·Σᵢ Pᵢⱼ(dPᵢⱼ − Dᵢ)·qᵢ subtract
            // D = rowsum(dO∘O) from dP = dO·vⱼ: the kernel forms the two dot products in
            // different orders, the naive f32 in the same one (so where O = V it cancels
            // exactly, by chance). Their floor is the rounding of the terms before they
            // cancel, |dP| + |D| ≤ 2·dv·max|dO|·max|V| (over 1 − p with dropout), weighted by
            // P's largest row or (over a group's heads) column sum. P is the kernel's, formed
            // as exp(s − LSE) from the f32 LSE: each row off by a factor up to exp(4·|LSE|·ε)
            // for the forward's 4 ulps of LSE, which past |LSE| ≈ 2²³ leaves no accuracy, as
            // in any backward from an f32 LSE. Found at scale 2.5e30, all inputs equal: dP − D
            // off by 3 ulps of dP gave dQ 2.3e9 from the oracle; with 36 queries LSE = 1.5e20
            // had lost log 36 (its ulp is 1.6e13) and every weight was 1.
            let mut p = reference::probabilities::<f64>(qv, kv, &opts).expect("oracle");
            for (pr, &l) in p.chunks_mut(nk.max(1)).zip(&lse) {
                let r = if l.is_finite() {
                    (4.0 * f32::EPSILON as f64 * (l as f64).abs()).exp()
                } else {
                    1.0
                };
                pr.iter_mut().filter(|x| **x > 0.0).for_each(|x| *x *= r);
            }
            let amax = |x: &[f32]| x.iter().fold(0.0f64, |a, &x| a.max((x as f64).abs()));
            let keep = c.dropout.map_or(1.0, |(p, _)| 1.0 / (1.0 - p as f64));
            let scale = c.scale.unwrap_or(1.0 / (dh as f32).sqrt()) as f64;
            let terms = scale * 2.0 * dv as f64 * amax(&d_o) * amax(&v) * keep;
            let (mut row, mut col) = (0.0f64, vec![0.0f64; b * hkv * nk]);
            for (r, pr) in p.chunks(nk.max(1)).enumerate() {
                let (bi, h) = (r / (nq * hq), r / nq % hq);
                row = row.max(pr.iter().sum());
                for (j, &x) in pr.iter().enumerate() {
                    col[(bi * hkv + h / group) * nk + j] += x;
                }
            }
            let col = col.iter().fold(0.0f64, |a, &x| a.max(x));
            rule_scaled("dQ", &dq, &naive.dq, &want.dq, 3.0, terms * row * amax(&k));
            rule_scaled("dK", &dk, &naive.dk, &want.dk, 3.0, terms * col * amax(&q));
            // dV = Σᵢ Pᵢⱼ·dOᵢ carries the same recomputed P: its floor is the rounding of those
            // terms with P's factor. Found at LSE = 1.2e21 (scale 2.5e30, all inputs equal),
            // where LSE had lost ln c: every recomputed weight was 1 instead of 1/c, and the
            // naive f32 weights, from scores an ulp (1.4e14) below LSE, were 0.
            rule_scaled(
                "dV",
                &dvv,
                &naive.dv,
                &want.dv,
                3.0,
                col * amax(&d_o) * keep,
            );
        }
        _ => {
            let Ok(p) = attentive::probabilities(qv, kv, &opts) else {
                return;
            };
            if !checked {
                return;
            }
            let want = reference::probabilities::<f64>(qv, kv, &opts).expect("oracle");
            let naive = reference::probabilities::<f32>(qv, kv, &opts).expect("oracle");
            // The kernel forms P = exp(s − LSE) from the forward's log-sum-exp (O(N) memory),
            // so each weight carries the rounding of LSE, |LSE|·ε relative; the naive softmax
            // subtracts the row's max instead. (Found at |LSE| ≈ 75, all scores equal.)
            let lse = reference::forward::<f64>(qv, kv, kv, &opts)
                .expect("oracle")
                .lse;
            let big = lse
                .iter()
                .filter(|x| x.is_finite())
                .fold(0.0f64, |a, x| a.max(x.abs()));
            let pmax = want.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            rule_scaled("P", &p, &naive, &want, 2.0, big * pmax);
        }
    }
});
