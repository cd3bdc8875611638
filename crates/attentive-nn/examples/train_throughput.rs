//! Training throughput of the G2P Transformer with the fused attention op against the same model
//! with candle's unfused attention (matmul, softmax, matmul), measured side by side: rounds of
//! `SECONDS` each alternate fused, unfused, fused, … from the same seed, so both see the same
//! batches. Prints tokens/s per round and the median ratio.
//!
//! Usage: cargo run --release -p attentive-nn --example train_throughput [SECONDS] [ROUNDS]

use attentive_nn::g2p::{default_config, train, TrainOptions};

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(30.0);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let config = default_config();
    let (mut fused, mut unfused) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for &u in &[false, true] {
            let opts = TrainOptions {
                seconds,
                valid_every_s: f64::INFINITY,
                valid_words: 20,
                unfused: u,
                ..Default::default()
            };
            let mut last = 0.0;
            train(&config, &opts, |p| last = p.tokens_per_s)?;
            println!(
                "round {round}: {:8} {last:8.0} tokens/s",
                if u { "unfused" } else { "fused" }
            );
            if u {
                unfused.push(last)
            } else {
                fused.push(last)
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, u) = (median(&mut fused), median(&mut unfused));
    println!(
        "median: fused {f:.0} tokens/s, unfused {u:.0} tokens/s, fused/unfused {:.2}×",
        f / u
    );
    Ok(())
}
