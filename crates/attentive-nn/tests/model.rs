//! The Transformer modules: gradients reach every parameter, a tiny model overfits a tiny batch,
//! and incremental decoding with KV caches equals decoding the whole sequence at once.

use attentive_nn::layers::Params;
use attentive_nn::mha::{Positions, RopePairsSer};
use attentive_nn::train::{clip_grad_norm, smoothed_cross_entropy, transformer_lr};
use attentive_nn::transformer::{Config, Mode, Seq2Seq};
use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

fn config(positions: Positions, pre_norm: bool, kv_heads: usize) -> Config {
    Config {
        src_vocab: 11,
        tgt_vocab: 9,
        d_model: 16,
        heads: 4,
        kv_heads,
        ff: 32,
        enc_layers: 2,
        dec_layers: 2,
        pre_norm,
        positions,
        dropout: 0.1,
        attn_dropout: 0.1,
        max_len: 32,
        attention: Default::default(),
    }
}

const ALL_POSITIONS: [Positions; 4] = [
    Positions::Sinusoidal,
    Positions::Learned { max_len: 32 },
    Positions::Rope {
        pairs: RopePairsSer::HalfSplit,
    },
    Positions::Alibi,
];

/// A batch of two sources (lengths 5 and 3, padded) and targets (lengths 4 and 6).
fn batch(dev: &Device) -> (Tensor, Vec<bool>, Tensor, Tensor, Tensor) {
    let src = Tensor::new(&[[3u32, 4, 5, 6, 7], [8, 9, 10, 0, 0]], dev).unwrap();
    let mask = vec![true, true, true, true, true, true, true, true, false, false];
    let tgt_in = Tensor::new(&[[1u32, 3, 4, 5, 0, 0], [1, 6, 7, 8, 3, 4]], dev).unwrap();
    let tgt_out = Tensor::new(&[3u32, 4, 5, 2, 0, 0, 6, 7, 8, 3, 4, 2], dev).unwrap();
    let w = Tensor::new(&[1f32, 1., 1., 1., 0., 0., 1., 1., 1., 1., 1., 1.], dev).unwrap();
    (src, mask, tgt_in, tgt_out, w)
}

fn loss(m: &Seq2Seq, p: &Params, train: bool) -> Tensor {
    let dev = Device::Cpu;
    let (src, mask, tgt_in, tgt_out, w) = batch(&dev);
    let mode = if train {
        Mode { train: Some(p) }
    } else {
        Mode::EVAL
    };
    let mem = m.encode(&src, &mask, mode).unwrap();
    let logits = m.decode(&tgt_in, &mem, &mask, None, mode).unwrap(); // [2, 6, V]
    let logits = logits.reshape((12, m.config.tgt_vocab)).unwrap();
    smoothed_cross_entropy(&logits, &tgt_out, &w, 0.1).unwrap()
}

#[test]
fn every_parameter_receives_a_gradient() {
    for positions in ALL_POSITIONS {
        for pre_norm in [false, true] {
            for kv_heads in [4, 2] {
                let p = Params::new(1, &Device::Cpu);
                let m = Seq2Seq::new(&p, &config(positions, pre_norm, kv_heads)).unwrap();
                let grads = loss(&m, &p, true).backward().unwrap();
                for (name, var) in p.vars() {
                    let g = grads.get(var.as_tensor()).unwrap_or_else(|| {
                        panic!("{positions:?} pre_norm={pre_norm}: {name} has no gradient")
                    });
                    let norm = g
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        norm > 0.0 && norm.is_finite(),
                        "{positions:?}: {name} gradient norm {norm}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_tiny_model_overfits_a_tiny_batch() {
    let p = Params::new(7, &Device::Cpu);
    let mut c = config(Positions::Sinusoidal, true, 4);
    c.dropout = 0.0;
    c.attn_dropout = 0.0;
    let m = Seq2Seq::new(&p, &c).unwrap();
    let vars: Vec<_> = p.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let first = loss(&m, &p, false).to_scalar::<f32>().unwrap();
    for _ in 0..150 {
        let mut grads = loss(&m, &p, true).backward().unwrap();
        clip_grad_norm(&vars, &mut grads, 1.0).unwrap();
        opt.step(&grads).unwrap();
    }
    let last = loss(&m, &p, false).to_scalar::<f32>().unwrap();
    // With smoothing 0.1 over 9 classes the floor is the smoothed entropy, about 0.5.
    assert!(last < 0.7 && last < first / 3.0, "loss {first} -> {last}");
    // Greedy predictions equal the targets.
    let dev = Device::Cpu;
    let (src, mask, tgt_in, tgt_out, w) = batch(&dev);
    let mem = m.encode(&src, &mask, Mode::EVAL).unwrap();
    let pred = m
        .decode(&tgt_in, &mem, &mask, None, Mode::EVAL)
        .unwrap()
        .argmax(2)
        .unwrap();
    let pred = pred.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let (want, w) = (
        tgt_out.to_vec1::<u32>().unwrap(),
        w.to_vec1::<f32>().unwrap(),
    );
    for i in 0..12 {
        if w[i] > 0.0 {
            assert_eq!(pred[i], want[i], "position {i}");
        }
    }
    assert!(transformer_lr(10, 16, 100) < transformer_lr(100, 16, 100));
}

#[test]
fn incremental_decoding_equals_full_decoding() {
    for positions in ALL_POSITIONS {
        for kv_heads in [4, 1] {
            let p = Params::new(3, &Device::Cpu);
            let m = Seq2Seq::new(&p, &config(positions, false, kv_heads)).unwrap();
            let dev = Device::Cpu;
            let (src, mask, tgt_in, _, _) = batch(&dev);
            let mem = m.encode(&src, &mask, Mode::EVAL).unwrap();
            let full = m.decode(&tgt_in, &mem, &mask, None, Mode::EVAL).unwrap(); // [2, 6, V]
            let mut caches = m.caches();
            for t in 0..6 {
                let step = tgt_in.narrow(1, t, 1).unwrap();
                let out = m
                    .decode(&step, &mem, &mask, Some(&mut caches), Mode::EVAL)
                    .unwrap();
                let want = full.narrow(1, t, 1).unwrap();
                let diff = (out - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < 1e-5,
                    "{positions:?} kv_heads={kv_heads}: step {t} differs by {diff}"
                );
            }
        }
    }
}

#[test]
fn checkpoints_round_trip() {
    let dir = std::env::temp_dir().join(format!("attentive-nn-ckpt-{}", std::process::id()));
    let c = config(
        Positions::Rope {
            pairs: RopePairsSer::Interleaved,
        },
        true,
        2,
    );
    let p = Params::new(1, &Device::Cpu);
    let m = Seq2Seq::new(&p, &c).unwrap();
    attentive_nn::train::save_checkpoint(&dir, &p, &c).unwrap();
    let c2: Config = attentive_nn::train::load_config(&dir).unwrap();
    assert_eq!(c, c2);
    let p2 = Params::new(99, &Device::Cpu);
    let m2 = Seq2Seq::new(&p2, &c2).unwrap();
    p2.load(&dir.join("model.safetensors")).unwrap();
    let (a, b) = (loss(&m, &p, false), loss(&m2, &p2, false));
    assert_eq!(a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    // A checkpoint of another shape is refused.
    let p3 = Params::new(1, &Device::Cpu);
    let mut c3 = c.clone();
    c3.ff = 8;
    Seq2Seq::new(&p3, &c3).unwrap();
    assert!(p3.load(&dir.join("model.safetensors")).is_err());
    // So is a file that is not safetensors at all.
    assert!(p2.load_bytes(b"not a checkpoint").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn seeded_training_runs_are_reproducible() {
    use attentive_nn::g2p::{default_config, train, TrainOptions};
    let mut c = default_config();
    c.d_model = 32;
    c.ff = 64;
    c.enc_layers = 1;
    c.dec_layers = 1;
    c.attn_dropout = 0.1;
    let run = |seed| {
        let opts = TrainOptions {
            seconds: f64::INFINITY,
            max_steps: Some(3),
            seed,
            valid_words: 5,
            batch_tokens: 400,
            ..Default::default()
        };
        let mut losses = Vec::new();
        let m = train(&c, &opts, |p| losses.push(p.loss)).unwrap();
        let w = m.params.vars()[5]
            .1
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (losses, w)
    };
    let (a, b, other) = (run(4), run(4), run(5));
    assert_eq!(a, b, "same seed, same losses and weights");
    assert_ne!(a.1, other.1, "another seed starts elsewhere");
}
