//! K and V stored as f16: the same bits as the f32 path on the converted values, on every
//! instruction set; the accuracy rule against a naive f16 baseline and against naive f32 on the
//! stored values; typed errors for bad shapes and strides.

mod common;
use attentive::{
    f16, forward, forward_half_kv, reference, AttnError, Causal, Isa, Options, Pattern, View,
    ViewMut,
};
use common::{check_rule, max_err, Layout, Rng, Tensor};

/// K or V rounded to f16, as f16 and as the f32 values it holds, stored in `layout`.
struct Half {
    h: Vec<f16>,
    f: Tensor,
}

impl Half {
    fn new(rng: &mut Rng, shape: [usize; 4], layout: Layout) -> Half {
        let x: Vec<f32> = rng
            .vec(shape.iter().product())
            .iter()
            .map(|&x| f16::from_f32(x).to_f32())
            .collect();
        let f = Tensor::new(&x, shape, layout);
        // Every value is an f16, so this conversion is exact.
        let h = f.data.iter().map(|&x| f16::from_f32(x)).collect();
        Half { h, f }
    }

    fn view(&self) -> View<'_, f16> {
        View::new(
            &self.h,
            self.f.shape,
            Tensor::strides(self.f.shape, self.f.layout),
        )
        .unwrap()
    }
}

struct Run {
    o: Vec<f32>,
    lse: Vec<f32>,
}

fn run(
    shape: [usize; 4],
    opts: &Options,
    f: impl FnOnce(&Options, &mut ViewMut, &mut [f32]) -> attentive::Result<()>,
) -> Run {
    let [b, h, n, dv] = shape;
    let mut o = vec![0.0; b * h * n * dv];
    let mut lse = vec![0.0; b * h * n];
    f(
        opts,
        &mut ViewMut::contiguous(&mut o, shape).unwrap(),
        &mut lse,
    )
    .unwrap();
    Run { o, lse }
}

#[test]
fn half_kv_equals_the_f32_path_bit_for_bit() {
    let pattern = Pattern::Window { left: 20, right: 3 } | Pattern::Strided { stride: 7 };
    let slopes = [0.5f32, 0.25, 0.125, 0.0625];
    // (B, Hq, Hkv, Nq, Nk, D, Dv): decode (scored by dot products), both sides of the decode
    // limit, tiles' edges, D = 1, GQA.
    let shapes = [
        (1, 4, 4, 1, 3000, 64, 64),
        (2, 4, 2, 16, 700, 32, 16),
        (1, 4, 1, 17, 129, 64, 64),
        (2, 4, 4, 100, 300, 24, 40),
        (1, 4, 2, 65, 65, 1, 3),
    ];
    let mut rng = Rng::new(7);
    for (n, &(b, hq, hkv, nq, nk, d, dv)) in shapes.iter().enumerate() {
        let layout = [Layout::Bhnd, Layout::Bnhd, Layout::Bhdn][n % 3];
        let q = Tensor::new(&rng.vec(b * hq * nq * d), [b, hq, nq, d], Layout::Bhnd);
        let k = Half::new(&mut rng, [b, hkv, nk, d], layout);
        let v = Half::new(&mut rng, [b, hkv, nk, dv], layout);
        let options = [
            Options::new(),
            Options::new().causal(Causal::BottomRight),
            // Causal too, so that the f32 call takes the block table as the f16 one does.
            Options::new().pattern(&pattern).causal(Causal::BottomRight),
            Options::new().softcap(5.0).alibi(&slopes[..hq]),
        ];
        for (m, opts) in options.iter().enumerate() {
            for isa in [Isa::Avx512, Isa::Avx2, Isa::Scalar]
                .into_iter()
                .filter(|i| i.available())
            {
                let opts = opts.isa(isa);
                let shape = [b, hq, nq, dv];
                let want = run(shape, &opts, |o, out, l| {
                    forward(q.view(), k.f.view(), v.f.view(), o, out, Some(l))
                });
                let got = run(shape, &opts, |o, out, l| {
                    forward_half_kv(q.view(), k.view(), v.view(), o, out, Some(l))
                });
                assert_eq!(got.o, want.o, "shape {n}, options {m}, {isa:?}");
                assert_eq!(got.lse, want.lse, "shape {n}, options {m}, {isa:?}");
            }
        }
    }
}

/// Naive attention in half precision, as a framework computes it on f16 tensors: scores,
/// weights and outputs each rounded to f16 (sums accumulated in f32). Row-major, `Hq = Hkv`.
fn naive_f16(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [b, h, nq, nk, d]: [usize; 5],
    causal: bool,
) -> Vec<f32> {
    let r = |x: f32| f16::from_f32(x).to_f32();
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0; b * h * nq * d];
    for bh in 0..b * h {
        for i in 0..nq {
            let qi = &q[(bh * nq + i) * d..][..d];
            let seen = if causal {
                (i + nk - nq + 1).min(nk)
            } else {
                nk
            };
            let s: Vec<f32> = (0..seen)
                .map(|j| {
                    let kj = &k[(bh * nk + j) * d..][..d];
                    r(scale * qi.iter().zip(kj).map(|(&a, &b)| r(a) * b).sum::<f32>())
                })
                .collect();
            let m = s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let e: Vec<f32> = s.iter().map(|&x| (x - m).exp()).collect();
            let sum: f32 = e.iter().sum();
            let o = &mut out[(bh * nq + i) * d..][..d];
            for (j, &ej) in e.iter().enumerate() {
                let p = r(ej / sum);
                for (y, &vj) in o.iter_mut().zip(&v[(bh * nk + j) * d..][..d]) {
                    *y += p * vj;
                }
            }
            o.iter_mut().for_each(|y| *y = r(*y));
        }
    }
    out
}

#[test]
fn half_kv_meets_the_accuracy_rule() {
    let mut rng = Rng::new(11);
    // (B, H, Nq, Nk, D, causal): decode against a long cache, prefill, causal.
    for &(b, h, nq, nk, d, causal) in &[
        (1, 4, 1, 4000, 128, false),
        (1, 2, 5, 1000, 64, false),
        (2, 2, 200, 300, 64, true),
        (1, 3, 130, 130, 32, false),
    ] {
        let q = Tensor::new(&rng.vec(b * h * nq * d), [b, h, nq, d], Layout::Bhnd);
        let k = Half::new(&mut rng, [b, h, nk, d], Layout::Bhnd);
        let v = Half::new(&mut rng, [b, h, nk, d], Layout::Bhnd);
        let opts = if causal {
            Options::new().causal(Causal::BottomRight)
        } else {
            Options::new()
        };
        let got = run([b, h, nq, d], &opts, |o, out, l| {
            forward_half_kv(q.view(), k.view(), v.view(), o, out, Some(l))
        });
        let (qv, kv, vv) = (q.view(), k.f.view(), v.f.view());
        let ref64 = reference::forward::<f64>(qv, kv, vv, &opts).unwrap();
        let naive32 = reference::forward::<f32>(qv, kv, vv, &opts).unwrap();
        let naive16 = naive_f16(&q.data, &k.f.data, &v.f.data, [b, h, nq, nk, d], causal);
        // The FlashAttention rule against the naive f16 baseline ...
        let (e, e16) = (max_err(&got.o, &ref64.o), max_err(&naive16, &ref64.o));
        assert!(
            e <= 2.0 * e16,
            "N={nq}×{nk}: error {e:.2e} > 2 × naive f16's {e16:.2e}"
        );
        // ... and, since only storage is f16, the f32 rule on the stored values.
        check_rule("o", &got.o, &naive32.o, &ref64.o, 2.0).unwrap();
        check_rule("lse", &got.lse, &naive32.lse, &ref64.lse, 2.0).unwrap();
    }
}

#[test]
fn half_kv_rejects_bad_shapes_with_typed_errors() {
    let q = vec![0.0f32; 2 * 3 * 4];
    let kv = vec![f16::ZERO; 2 * 3 * 4];
    let mut o = vec![0.0f32; 2 * 3 * 4];
    let qv = View::contiguous(&q, &[1, 2, 3, 4]).unwrap();
    let call = |k: View<f16>, v: View<f16>, o: &mut [f32]| {
        let mut out = ViewMut::contiguous(o, [1, 2, 3, 4]).unwrap();
        forward_half_kv(qv, k, v, &Options::new(), &mut out, None)
    };
    // Feature sizes differ.
    let k = View::contiguous(&kv, &[1, 2, 4, 3]).unwrap();
    let v = View::contiguous(&kv, &[1, 2, 3, 4]).unwrap();
    assert!(matches!(
        call(k, v, &mut o),
        Err(AttnError::ShapeMismatch { .. })
    ));
    // 2 query heads over 3 KV heads.
    let k = View::contiguous(&kv[..3 * 4], &[1, 3, 1, 4]).unwrap();
    assert!(matches!(
        call(k, k, &mut o),
        Err(AttnError::HeadsNotDivisible { .. })
    ));
    // A view reaching past its storage.
    assert!(matches!(
        View::new(&kv, [1, 2, 3, 4], [24, 12, 4, 2]),
        Err(AttnError::OutOfBounds { .. })
    ));
    // Scale not finite.
    let k = View::contiguous(&kv, &[1, 2, 3, 4]).unwrap();
    let mut out = ViewMut::contiguous(&mut o, [1, 2, 3, 4]).unwrap();
    let opts = Options::new().scale(f32::NAN);
    assert!(matches!(
        forward_half_kv(qv, k, k, &opts, &mut out, None),
        Err(AttnError::InvalidOption { .. })
    ));
}
