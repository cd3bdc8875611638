//! A long input through attentive-viz without `L·H·N²` weights in memory: N tokens (4096 by
//! default), L = 6 layers of H = 12 heads (D = 32, random queries and keys), each head's weights
//! from the engine's `probabilities` on blocks of 128 query rows, folded into
//! [`attentive_viz::stream::Streamed`], then the report (downsampled views, exact statistics
//! and rollout) written to a folder.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p attentive-viz --example long -- [N] [OUT]
//! ```
//! Prints the time, the peak resident memory and what `L·H·N²` f32 weights would have taken.

use attentive::{Options, View};
use attentive_viz::stream::Streamed;
use attentive_viz::{Reading, Report};
use std::time::Instant;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(4096), |a| a.parse())?;
    let out = std::path::PathBuf::from(args.next().unwrap_or_else(|| "viz-long".into()));
    let (layers, heads, d, block) = (6, 12, 32, 128);
    let tokens: Vec<String> = (0..n)
        .map(|i| {
            if i == 0 {
                "[CLS]".into()
            } else {
                format!("t{i}")
            }
        })
        .collect();
    let t0 = Instant::now();
    let mut s = Streamed::new(layers, heads, tokens.clone())?;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    };
    for layer in 0..layers {
        let (q, k) = (random(heads * n * d), random(heads * n * d)); // [1, H, N, D]
        let kv = View::contiguous(&k, &[1, heads, n, d])?;
        for r0 in (0..n).step_by(block) {
            let rows = block.min(n - r0);
            // Query rows r0.. of every head: a strided view, no copy.
            let qv = View::new(
                &q[r0 * d..],
                [1, heads, rows, d],
                [heads * n * d, n * d, d, 1],
            )?;
            let p = attentive::probabilities(qv, kv, &Options::new())?; // [1, H, rows, N]
            for head in 0..heads {
                s.add_rows(layer, head, r0, &p[head * rows * n..][..rows * n])?;
            }
        }
        s.end_layer()?;
    }
    let f = s.finish()?;
    let (streamed_s, streamed_mib) = (t0.elapsed().as_secs_f64(), peak_rss_mib());
    let mut report = Report::new(&f.coarse, &format!("A random {n}-token input"));
    report.subtitle =
        format!("{layers} layers × {heads} heads · views averaged over blocks of tokens");
    let outputs = report.build()?;
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("index.html"), &outputs.html)?;
    let mut json = outputs.json.clone();
    json["head_stats_exact"] = serde_json::json!(f
        .stats
        .iter()
        .map(|s| (s.layer, s.head, s.entropy, s.distance))
        .collect::<Vec<_>>());
    json["rollout_cls_row"] = serde_json::json!(Reading::Row(0).read(&f.rollout, n)?);
    std::fs::write(out.join("attention.json"), serde_json::to_string(&json)?)?;
    let full = (layers * heads * n * n * 4) as f64 / (1 << 20) as f64;
    println!(
        "N = {n}: weights, statistics and rollout in {streamed_s:.1} s at a peak resident memory of \
         {streamed_mib:.0} MiB (all {layers}·{heads}·N² weights would be {full:.0} MiB); with the \
         report ({} views) {:.1} s and {:.0} MiB; wrote {}",
        outputs.svgs.len(),
        t0.elapsed().as_secs_f64(),
        peak_rss_mib(),
        out.display()
    );
    Ok(())
}
