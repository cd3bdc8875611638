//! The learned-score modules and Nyström as candle ops: outputs and candle gradients (inputs and
//! every weight) equal the engine's f64 oracles, with padding; Nyström refuses padding.

use attentive::reference::variants as oracle;
use attentive::variants::{additive, han::Level, nystrom};
use attentive::View;
use attentive_nn::layers::Params;
use attentive_nn::scored::{AttentionPool, Han, Score, ScoredAttention};
use attentive_nn::variants::{SelfAttention, Variant};
use candle_core::{Device, Tensor, Var};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
    let e = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(e < 1e-5 * scale, "{what}: off by {e:e} (scale {scale:e})");
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn scored_attention_equals_its_oracle() {
    let dev = Device::Cpu;
    let (b, h, nq, nk, d, dv, a) = (2, 2, 5, 9, 6, 4, 7);
    let (qs, ks, vs) = ([b, h, nq, d], [b, h, nk, d], [b, h, nk, dv]);
    let (q, k, v, g) = (
        values(b * h * nq * d, 1),
        values(b * h * nk * d, 2),
        values(b * h * nk * dv, 3),
        values(b * h * nq * dv, 4),
    );
    // Row 0 sees its first 6 keys.
    let mask: Vec<bool> = (0..b * nk).map(|i| i >= nk || i < 6).collect();
    for (n, score) in [Score::Additive, Score::Dot, Score::General, Score::Concat]
        .into_iter()
        .enumerate()
    {
        for local in [None, Some(3)] {
            let p = Params::new(n as u64 + 1, &dev);
            let m = ScoredAttention::new(&p, score, local, (d, d), a).unwrap();
            let var = |x: &[f32], s: [usize; 4]| {
                Var::from_tensor(&Tensor::from_vec(x.to_vec(), &s[..], &dev).unwrap()).unwrap()
            };
            let (qv, kv, vv) = (var(&q, qs), var(&k, ks), var(&v, vs));
            let o = m.forward(&qv, &kv, &vv, Some(&mask)).unwrap();
            let gt = Tensor::from_vec(g.clone(), &[b, h, nq, dv][..], &dev).unwrap();
            let grads = (&o * &gt).unwrap().sum_all().unwrap().backward().unwrap();
            let w: Vec<Vec<f32>> = m.weights.iter().map(flat).collect();
            let base = match score {
                Score::Additive => 3,
                Score::Dot => 0,
                Score::General => 1,
                Score::Concat => 2,
            };
            let sc = match score {
                Score::Additive => additive::Score::Additive {
                    w_q: &w[0],
                    w_k: &w[1],
                    v: &w[2],
                },
                Score::Dot => additive::Score::Dot,
                Score::General => additive::Score::General { w: &w[0] },
                Score::Concat => additive::Score::Concat { w: &w[0], v: &w[1] },
            };
            let opts = additive::Additive {
                score: sc,
                key_mask: Some(&mask),
                local: local.map(|half_width| additive::Local {
                    w_p: &w[base],
                    v_p: &w[base + 1],
                    half_width,
                    sigma: None,
                }),
            };
            let want = oracle::additive::<f64>(
                View::contiguous(&q, &qs).unwrap(),
                View::contiguous(&k, &ks).unwrap(),
                View::contiguous(&v, &vs).unwrap(),
                View::contiguous(&g, &[b, h, nq, dv]).unwrap(),
                &opts,
            )
            .unwrap();
            let at = format!("{score:?} local {local:?}");
            close(&flat(&o), &want.0, &format!("{at} O"));
            close(&flat(grads.get(&qv).unwrap()), &want.1, &format!("{at} dQ"));
            close(&flat(grads.get(&kv).unwrap()), &want.2, &format!("{at} dK"));
            close(&flat(grads.get(&vv).unwrap()), &want.3, &format!("{at} dV"));
            // The oracle's weight gradients in packing order.
            let order: Vec<&Vec<f64>> = match score {
                Score::Additive => vec![&want.4[0], &want.4[1], &want.4[2]],
                Score::Dot => vec![],
                Score::General => vec![&want.4[0]],
                Score::Concat => vec![&want.4[0], &want.4[2]],
            }
            .into_iter()
            .chain(
                local
                    .map(|_| [&want.4[3], &want.4[4]])
                    .into_iter()
                    .flatten(),
            )
            .collect();
            assert_eq!(order.len(), m.weights.len(), "{at}");
            for (i, (wt, want)) in m.weights.iter().zip(order).enumerate() {
                close(
                    &flat(grads.get(wt).unwrap()),
                    want,
                    &format!("{at} weight {i}"),
                );
            }
        }
    }
}

#[test]
fn attention_pooling_and_han_equal_the_oracle() {
    let dev = Device::Cpu;
    let p = Params::new(4, &dev);
    let (docs, sents, words, d, a) = (2, 3, 4, 5, 6);
    let han = Han::new(&p, d, a).unwrap();
    let h = values(docs * sents * words * d, 9);
    let mask: Vec<bool> = (0..docs * sents * words)
        .map(|i| i / words != 2 && i % words != 1)
        .collect();
    let g = values(docs * d, 10);
    let hv = Var::from_tensor(&Tensor::from_vec(h.clone(), (docs, sents, words, d), &dev).unwrap())
        .unwrap();
    let out = han.forward(&hv, Some(&mask)).unwrap();
    let gt = Tensor::from_vec(g.clone(), (docs, d), &dev).unwrap();
    let grads = (&out * &gt).unwrap().sum_all().unwrap().backward().unwrap();
    let level = |m: &AttentionPool| (flat(&m.w), flat(&m.b), flat(&m.c));
    let ((ww, wb, wc), (sw, sb, sc)) = (level(&han.word), level(&han.sentence));
    let word = Level {
        w: &ww,
        b: &wb,
        c: &wc,
    };
    let sent = Level {
        w: &sw,
        b: &sb,
        c: &sc,
    };
    let zeros = vec![0.0f32; docs * sents * d];
    let sv =
        oracle::han_pool::<f64>(&h, (docs * sents, words, d), Some(&mask), &word, &zeros).unwrap();
    let sv32: Vec<f32> = sv.0.iter().map(|&x| x as f32).collect();
    let smask: Vec<bool> = mask
        .chunks_exact(words)
        .map(|w| w.iter().any(|&x| x))
        .collect();
    let top = oracle::han_pool::<f64>(&sv32, (docs, sents, d), Some(&smask), &sent, &g).unwrap();
    close(&flat(&out), &top.0, "documents");
    close(
        &flat(grads.get(&han.sentence.c).unwrap()),
        &top.5,
        "dc_sentence",
    );
    let dsv: Vec<f32> = top.2.iter().map(|&x| x as f32).collect();
    let low =
        oracle::han_pool::<f64>(&h, (docs * sents, words, d), Some(&mask), &word, &dsv).unwrap();
    close(&flat(grads.get(&hv).unwrap()), &low.2, "dh");
    close(&flat(grads.get(&han.word.w).unwrap()), &low.3, "dW_word");
    close(&flat(grads.get(&han.word.b).unwrap()), &low.4, "db_word");
}

#[test]
fn nystrom_equals_its_oracle_and_refuses_padding() {
    let dev = Device::Cpu;
    let p = Params::new(2, &dev);
    let (b, h, n, d) = (1, 2, 24, 8);
    let s = [b, h, n, d];
    let (q, k, v, g) = (
        values(b * h * n * d, 5),
        values(b * h * n * d, 6),
        values(b * h * n * d, 7),
        values(b * h * n * d, 8),
    );
    let var_mod = Variant::new(&p, SelfAttention::Nystrom { landmarks: 6 }, (h, d), 64).unwrap();
    let t =
        |x: &[f32]| Var::from_tensor(&Tensor::from_vec(x.to_vec(), &s[..], &dev).unwrap()).unwrap();
    let (qv, kv, vv) = (t(&q), t(&k), t(&v));
    let o = var_mod.forward(&qv, &kv, &vv, false, None).unwrap();
    let gt = Tensor::from_vec(g.clone(), &s[..], &dev).unwrap();
    let grads = (&o * &gt).unwrap().sum_all().unwrap().backward().unwrap();
    fn cv(x: &[f32]) -> View<'_> {
        View::contiguous(x, &[1, 2, 24, 8]).unwrap()
    }
    let opts = nystrom::Nystrom::new(6);
    let want = oracle::nystrom::<f64>(cv(&q), cv(&k), cv(&v), &opts).unwrap();
    close(&flat(&o), &want, "O");
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; q.len()], vec![0.0; q.len()]);
    nystrom::backward(
        cv(&q),
        cv(&k),
        cv(&v),
        cv(&g),
        &opts,
        &mut attentive::ViewMut::contiguous(&mut dq, s).unwrap(),
        &mut attentive::ViewMut::contiguous(&mut dk, s).unwrap(),
        &mut attentive::ViewMut::contiguous(&mut dv, s).unwrap(),
    )
    .unwrap();
    for (name, got, want) in [("dQ", &qv, &dq), ("dK", &kv, &dk), ("dV", &vv, &dv)] {
        assert_eq!(flat(grads.get(got).unwrap()), *want, "{name}");
    }
    let mask: Vec<bool> = (0..n).map(|i| i < 20).collect();
    let e = var_mod
        .forward(&qv, &kv, &vv, false, Some(&mask))
        .unwrap_err();
    assert!(e.to_string().contains("cannot hide padding"), "{e}");
}
