//! The self-attention variants as candle ops: outputs and candle gradients equal the engine's
//! f64 oracles (causal, padding, LSH's padding to whole chunks), Linformer's composition equals
//! its oracle with E and F's gradients, and a Transformer with each variant decodes the same
//! with its cache as without.

use attentive::reference::variants as oracle;
use attentive::variants::{linear, linformer, lsh, performer};
use attentive::View;
use attentive_nn::layers::Params;
use attentive_nn::transformer::{Config, Mode, Seq2Seq};
use attentive_nn::variants::{SelfAttention, Variant};
use candle_core::{Device, Tensor, Var};

fn randn(shape: [usize; 4], seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..shape.iter().product::<usize>())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn worst(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Runs `variant` through candle on `q`, `k`, `v` and `L = Σ O∘G`; returns O and the gradients.
fn through_candle(
    variant: &Variant,
    x: [&[f32]; 4],
    s: [usize; 4],
    causal: bool,
    mask: Option<&[bool]>,
) -> [Vec<f32>; 4] {
    let dev = Device::Cpu;
    let t = |x: &[f32]| Var::from_tensor(&Tensor::from_vec(x.to_vec(), &s, &dev).unwrap()).unwrap();
    let (q, k, v) = (t(x[0]), t(x[1]), t(x[2]));
    let g = Tensor::from_vec(x[3].to_vec(), &s, &dev).unwrap();
    let o = variant.forward(&q, &k, &v, causal, mask).unwrap();
    let grads = (&o * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let grad = |x: &Var| grads.get(x).map_or(vec![0.0; s.iter().product()], flat);
    [flat(&o), grad(&q), grad(&k), grad(&v)]
}

#[test]
fn linear_performer_and_lsh_equal_their_oracles() {
    let p = Params::new(3, &Device::Cpu);
    let (b, h, n, d) = (2, 2, 13, 8);
    let s = [b, h, n, d];
    let (q, k, v, g) = (randn(s, 1), randn(s, 2), randn(s, 3), randn(s, 4));
    // Row 0 has 9 real positions, row 1 all 13.
    let keep: Vec<bool> = (0..b * n).map(|i| i >= n || i < 9).collect();
    fn cv(x: &[f32], s: [usize; 4]) -> View<'_> {
        View::contiguous(x, &s).unwrap()
    }
    for kind in [
        SelfAttention::Linear,
        SelfAttention::Performer { features: 32 },
        SelfAttention::Lsh {
            n_hashes: 2,
            bucket_size: 4,
        },
    ] {
        let var = Variant::new(&p.pp(format!("{kind:?}")), kind, (h, d), 64).unwrap();
        for causal in [false, true] {
            for masked in [false, true] {
                let mask = masked.then_some(&keep[..]);
                let got = through_candle(&var, [&q, &k, &v, &g], s, causal, mask);
                let (o, dq, dk, dv) = match kind {
                    SelfAttention::Linear => oracle::linear::<f64>(
                        cv(&q, s),
                        cv(&k, s),
                        cv(&v, s),
                        cv(&g, s),
                        &linear::Linear {
                            causal,
                            key_mask: mask,
                            ..Default::default()
                        },
                    )
                    .unwrap(),
                    SelfAttention::Performer { .. } => {
                        let w = var.draws().to_vec();
                        oracle::performer::<f64>(
                            cv(&q, s),
                            cv(&k, s),
                            cv(&v, s),
                            cv(&g, s),
                            &performer::Performer {
                                causal,
                                key_mask: mask,
                                ..performer::Performer::new(&w)
                            },
                        )
                        .unwrap()
                    }
                    _ => {
                        // Padded to 16 positions (a whole number of chunks), padding masked.
                        let np = 16;
                        let sp = [b, h, np, d];
                        let pad = |x: &[f32]| -> Vec<f32> {
                            x.chunks_exact(n * d)
                                .flat_map(|r| {
                                    r.iter()
                                        .copied()
                                        .chain(std::iter::repeat_n(0.0, (np - n) * d))
                                })
                                .collect()
                        };
                        let keep_p: Vec<bool> = (0..b * np)
                            .map(|i| i % np < n && mask.is_none_or(|m| m[i / np * n + i % np]))
                            .collect();
                        let w = var.draws().to_vec();
                        let nb = w.len() / (2 * d) * 2;
                        let opts = lsh::Lsh {
                            key_mask: Some(&keep_p),
                            ..lsh::Lsh::new(&w, 2, nb, 4).causal(causal)
                        };
                        let (qp, vp, gp) = (pad(&q), pad(&v), pad(&g));
                        let (o, dx, dv) =
                            oracle::lsh::<f64>(cv(&qp, sp), cv(&vp, sp), cv(&gp, sp), &opts)
                                .unwrap();
                        let cut = |x: Vec<f64>| -> Vec<f64> {
                            x.chunks_exact(np * d)
                                .flat_map(|r| r[..n * d].to_vec())
                                .collect()
                        };
                        (cut(o), cut(dx), vec![0.0; q.len()], cut(dv))
                    }
                };
                // Padded queries' outputs are not defined the same way by every variant:
                // compare the real rows (all rows when unmasked).
                let real = |x: &[f32]| -> Vec<f32> { keep_rows(x, mask, s) };
                let real64 = |x: &[f64]| -> Vec<f64> { keep_rows(x, mask, s) };
                for (name, got, want, rows_only) in [
                    ("O", &got[0], &o, true),
                    ("dQ", &got[1], &dq, true),
                    ("dK", &got[2], &dk, false),
                    ("dV", &got[3], &dv, false),
                ] {
                    let (a, w) = if rows_only {
                        (real(got), real64(want))
                    } else {
                        (got.clone(), want.clone())
                    };
                    let e = worst(&a, &w);
                    assert!(
                        e < 1e-5,
                        "{kind:?} causal {causal} masked {masked} {name}: {e:e}"
                    );
                }
            }
        }
    }
}

/// The rows of real positions (every row without a mask).
fn keep_rows<T: Copy>(x: &[T], mask: Option<&[bool]>, [b, h, n, d]: [usize; 4]) -> Vec<T> {
    let mut out = Vec::new();
    for bi in 0..b {
        for hh in 0..h {
            for i in 0..n {
                if mask.is_none_or(|m| m[bi * n + i]) {
                    out.extend_from_slice(&x[((bi * h + hh) * n + i) * d..][..d]);
                }
            }
        }
    }
    out
}

/// Linformer through candle (E, F learned, padding zeroed) equals its oracle, gradients of E
/// and F included.
#[test]
fn linformer_equals_its_oracle() {
    let p = Params::new(5, &Device::Cpu);
    let (b, h, n, d, kp) = (1, 2, 10, 4, 3);
    let s = [b, h, n, d];
    let (q, k, v, g) = (randn(s, 5), randn(s, 6), randn(s, 7), randn(s, 8));
    let var = Variant::new(&p, SelfAttention::Linformer { k: kp }, (h, d), 16).unwrap();
    let got = through_candle(&var, [&q, &k, &v, &g], s, false, None);
    let (e, f) = var.projections().unwrap();
    let e16 = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let f16 = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (e, f) = (&e16[..n * kp], &f16[..n * kp]);
    let w = oracle::linformer::<f64>(
        View::contiguous(&q, &s).unwrap(),
        View::contiguous(&k, &s).unwrap(),
        View::contiguous(&v, &s).unwrap(),
        View::contiguous(&g, &s).unwrap(),
        &linformer::Linformer::new(e, Some(f), kp),
    )
    .unwrap();
    for (name, got, want) in [
        ("O", &got[0], &w.0),
        ("dQ", &got[1], &w.1),
        ("dK", &got[2], &w.2),
        ("dV", &got[3], &w.3),
    ] {
        let e = worst(got, want);
        assert!(e < 1e-5, "linformer {name}: {e:e}");
    }
    let z = Tensor::zeros(&s[..], candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = var.forward(&z, &z, &z, true, None).unwrap_err();
    assert!(err.to_string().contains("no causal form"), "{err}");
}

/// A small model with self-attention `name` and `dec_layers` decoder layers.
fn tiny(name: &str, dec_layers: usize) -> Config {
    Config {
        src_vocab: 12,
        tgt_vocab: 10,
        d_model: 16,
        heads: 2,
        kv_heads: 2,
        ff: 32,
        enc_layers: 1,
        dec_layers,
        pre_norm: true,
        positions: attentive_nn::mha::Positions::Sinusoidal,
        dropout: 0.0,
        attn_dropout: 0.0,
        max_len: 16,
        attention: SelfAttention::parse(name).unwrap(),
    }
}

/// Decoding with the cache (queries cached) gives the logits of decoding the prefix at once,
/// and of the whole target at once, for every variant but LSH, which refuses a cache (its sort
/// sees the whole sequence, so every layer's earlier rows change as the prefix grows).
#[test]
fn cached_decoding_equals_decoding_at_once() {
    for name in SelfAttention::NAMES {
        let config = tiny(name, 2);
        let p = Params::new(9, &Device::Cpu);
        let model = Seq2Seq::new(&p, &config).unwrap();
        let dev = Device::Cpu;
        let src = Tensor::from_vec(vec![1u32, 4, 5, 6, 2, 3, 7, 0], (2, 4), &dev).unwrap();
        let mask = [true, true, true, true, true, true, true, false];
        let mem = model.encode(&src, &mask, Mode::EVAL).unwrap();
        let tgt = Tensor::from_vec(vec![1u32, 3, 4, 5, 6, 1, 2, 8, 8, 9], (2, 5), &dev).unwrap();
        let all = model.decode(&tgt, &mem, &mask, None, Mode::EVAL).unwrap(); // [2, 5, V]
        let mut caches = model.caches();
        for t in 0..5 {
            let step = tgt.narrow(1, t, 1).unwrap();
            let one = model.decode(&step, &mem, &mask, Some(&mut caches), Mode::EVAL);
            if name == "lsh" {
                let err = one.unwrap_err().to_string();
                assert!(err.contains("without a cache"), "{err}");
                break;
            }
            let one = one.unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            // The prefix decoded at once, its last row.
            let prefix = model
                .decode(
                    &tgt.narrow(1, 0, t + 1).unwrap(),
                    &mem,
                    &mask,
                    None,
                    Mode::EVAL,
                )
                .unwrap()
                .narrow(1, t, 1)
                .unwrap();
            let e = diff(&one, &prefix);
            assert!(e < 1e-4, "{name} step {t}: {e}");
            // Rows ignore later positions: the whole target at once too.
            let e = diff(&one, &all.narrow(1, t, 1).unwrap());
            assert!(e < 1e-4, "{name} step {t} against all at once: {e}");
        }
    }
}

/// GLA through candle: the output and the gradients equal the engine's f64 oracle on the gates
/// the module forms, `g = ln σ(k W_g + b)/16`; the keys' gradient includes the path through the
/// gates, `dk += (dg/16 ∘ (1 − σ(u))) W_gᵀ`.
#[test]
fn gla_equals_its_oracle_through_the_gates() {
    use attentive::variants::gated;
    let p = Params::new(11, &Device::Cpu);
    let (b, h, n, d) = (2, 2, 70, 8);
    let s = [b, h, n, d];
    let (q, k, v, g) = (randn(s, 21), randn(s, 22), randn(s, 23), randn(s, 24));
    let var = Variant::new(&p, SelfAttention::Gla, (h, d), 128).unwrap();
    let got = through_candle(&var, [&q, &k, &v, &g], s, true, None);
    let (w, bias) = var.projections().unwrap();
    let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap(); //  [d, d]
    let bias = bias.to_vec1::<f32>().unwrap();
    // u = k W + b, σ(u), the gates
    let u: Vec<f64> = k
        .chunks_exact(d)
        .flat_map(|row| {
            let (w, bias) = (&w, &bias);
            (0..d).map(move |c| {
                bias[c] as f64
                    + (0..d)
                        .map(|r| row[r] as f64 * w[r * d + c] as f64)
                        .sum::<f64>()
            })
        })
        .collect();
    let sig: Vec<f64> = u.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
    let gates: Vec<f32> = sig.iter().map(|x| (x.ln() / 16.0) as f32).collect();
    let (o, dq, dk, dv, dg) = oracle::gated::<f64>(
        View::contiguous(&q, &s).unwrap(),
        View::contiguous(&k, &s).unwrap(),
        View::contiguous(&v, &s).unwrap(),
        View::contiguous(&g, &s).unwrap(),
        &gated::Gated::new(gated::Decay::Gates(View::contiguous(&gates, &s).unwrap())),
    )
    .unwrap();
    let mut dk_all = dk.clone();
    for (dkr, (dgr, sr)) in dk_all
        .chunks_exact_mut(d)
        .zip(dg.chunks_exact(d).zip(sig.chunks_exact(d)))
    {
        for r in 0..d {
            dkr[r] += (0..d)
                .map(|c| dgr[c] / 16.0 * (1.0 - sr[c]) * w[r * d + c] as f64)
                .sum::<f64>();
        }
    }
    for (name, got, want) in [
        ("O", &got[0], &o),
        ("dQ", &got[1], &dq),
        ("dK", &got[2], &dk_all),
        ("dV", &got[3], &dv),
    ] {
        let e = worst(got, want);
        assert!(e < 1e-4, "gla {name}: {e:e}");
    }
}

/// Adaptive span through candle: the output equals the exact oracle with the span's score
/// rule, and the span fractions' gradient equals the engine's.
#[test]
fn adaptive_span_equals_its_oracle_and_trains_z() {
    use attentive::variants::adaptive_span::{self, AdaptiveSpan};
    let p = Params::new(12, &Device::Cpu);
    let (b, h, n, d) = (1, 2, 50, 8);
    let s = [b, h, n, d];
    let (q, k, v, g) = (randn(s, 31), randn(s, 32), randn(s, 33), randn(s, 34));
    let var = Variant::new(&p, SelfAttention::AdaptiveSpan { max_span: 32 }, (h, d), 64).unwrap();
    let dev = Device::Cpu;
    let t =
        |x: &[f32]| Var::from_tensor(&Tensor::from_vec(x.to_vec(), &s[..], &dev).unwrap()).unwrap();
    let (qv, kv, vv) = (t(&q), t(&k), t(&v));
    let o = var.forward(&qv, &kv, &vv, true, None).unwrap();
    let gt = Tensor::from_vec(g.clone(), &s[..], &dev).unwrap();
    let grads = (&o * &gt).unwrap().sum_all().unwrap().backward().unwrap();
    let (z, _) = var.projections().unwrap();
    let dz = grads.get(z).unwrap().to_vec1::<f32>().unwrap();
    let current = z.to_vec1::<f32>().unwrap();
    let span = AdaptiveSpan {
        current: &current,
        max_span: 32,
        ramp: 4,
    };
    let want = attentive::reference::forward::<f64>(
        View::contiguous(&q, &s).unwrap(),
        View::contiguous(&k, &s).unwrap(),
        View::contiguous(&v, &s).unwrap(),
        &span.options(),
    )
    .unwrap();
    let got = o.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(worst(&got, &want.o) < 1e-5, "adaptive span O");
    let mut oe = vec![0.0f32; q.len()];
    let mut lse = vec![0.0f32; b * h * n];
    adaptive_span::forward(
        View::contiguous(&q, &s).unwrap(),
        View::contiguous(&k, &s).unwrap(),
        View::contiguous(&v, &s).unwrap(),
        &span,
        &mut attentive::ViewMut::contiguous(&mut oe, s).unwrap(),
        Some(&mut lse),
    )
    .unwrap();
    let (mut a, mut bb, mut c, mut dz_e) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; q.len()],
        vec![0.0f32; q.len()],
        vec![0.0f32; h],
    );
    adaptive_span::backward(
        View::contiguous(&q, &s).unwrap(),
        View::contiguous(&k, &s).unwrap(),
        View::contiguous(&v, &s).unwrap(),
        (View::contiguous(&oe, &s).unwrap(), &lse),
        View::contiguous(&g, &s).unwrap(),
        &span,
        (
            &mut attentive::ViewMut::contiguous(&mut a, s).unwrap(),
            &mut attentive::ViewMut::contiguous(&mut bb, s).unwrap(),
            &mut attentive::ViewMut::contiguous(&mut c, s).unwrap(),
        ),
        &mut dz_e,
    )
    .unwrap();
    assert!(
        dz_e.iter().any(|x| x.abs() > 1e-6),
        "the case lost its point: {dz_e:?}"
    );
    for (x, y) in dz.iter().zip(&dz_e) {
        assert!(
            (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
            "dz {dz:?} vs {dz_e:?}"
        );
    }
}

/// A checkpoint of a model with each self-attention loads into a model made from another seed
/// and computes the same logits: learned projections and gates travel in the file, random
/// features and rotations are drawn again from the modules' paths.
#[test]
fn checkpoints_of_every_variant_round_trip() {
    let dev = Device::Cpu;
    for name in SelfAttention::NAMES {
        let config = tiny(name, 1);
        let dir =
            std::env::temp_dir().join(format!("attentive-nn-var-{}-{name}", std::process::id()));
        let p = Params::new(1, &dev);
        let m = Seq2Seq::new(&p, &config).unwrap();
        attentive_nn::train::save_checkpoint(&dir, &p, &config).unwrap();
        let loaded: Config = attentive_nn::train::load_config(&dir).unwrap();
        assert_eq!(loaded, config, "{name}");
        let p2 = Params::new(99, &dev);
        let m2 = Seq2Seq::new(&p2, &loaded).unwrap();
        p2.load(&dir.join("model.safetensors")).unwrap();
        let src = Tensor::from_vec(vec![1u32, 4, 5, 6, 7, 2, 3, 8, 9, 3], (2, 5), &dev).unwrap();
        let mask = [true; 10];
        let tgt = Tensor::from_vec(vec![1u32, 3, 4, 5, 1, 2, 8, 9], (2, 4), &dev).unwrap();
        let logits = |m: &Seq2Seq| {
            let mem = m.encode(&src, &mask, Mode::EVAL).unwrap();
            flat(&m.decode(&tgt, &mem, &mask, None, Mode::EVAL).unwrap())
        };
        assert_eq!(logits(&m), logits(&m2), "{name}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Gradient-weighted relevance needs attention weights: a G2P model with linear self-attention
/// refuses it with a clear error instead of returning maps that are not there.
#[test]
fn relevance_needs_exact_attention() {
    let config = Config {
        attention: SelfAttention::Linear,
        ..attentive_nn::g2p::default_config()
    };
    let g = attentive_nn::g2p::G2p::new(&config, 1).unwrap();
    let err = g.weight_grads(&[3, 4, 5], &[6, 7]).unwrap_err().to_string();
    assert!(err.contains("forms no attention weights"), "{err}");
}
