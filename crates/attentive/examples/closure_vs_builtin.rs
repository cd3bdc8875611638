//! A user's closure against the equivalent built-in rule, timed side by side (A B A B …).
//!
//! The rule is a sliding window of 256 keys ending at the query (`window:256,0`). Three ways
//! run the same forward pass: the built-in [`Pattern`], the closure tabulated once into a
//! [`BlockMask`] (what a training loop does), and the closure passed per call, which pays for
//! tabulating it on every call. Prints the median of each and checks that all three agree
//! bit for bit.
//!
//! `cargo run --release --example closure_vs_builtin [N]` (default N = 8192; B = 1, H = 8, D = 64)

use attentive::{forward, BlockMask, Options, Pattern, Pos, View, ViewMut};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(8192, |s| s.parse().expect("N"));
    let (h, d, w) = (8usize, 64usize, 256usize);
    let x: Vec<f32> = (0..h * n * d)
        .map(|i| ((i.wrapping_mul(2654435761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let q = View::contiguous(&x, &[1, h, n, d]).unwrap();
    let builtin = Pattern::Window {
        left: w - 1,
        right: 0,
    };
    let closure = move |p: Pos| p.j <= p.i && p.i - p.j < w;
    let table = BlockMask::from_rule(&closure, 1, h, n, n).unwrap();
    let runs: [(&str, Options); 3] = [
        ("built-in window:255,0", Options::new().pattern(&builtin)),
        ("closure, tabulated once", Options::new().block_mask(&table)),
        ("closure, per call", Options::new().mask_rule(&closure)),
    ];
    let pairs = attentive::visible_pairs(q, q, &runs[0].1).unwrap();
    let mut outs = vec![vec![0.0f32; h * n * d]; runs.len()];
    let mut times = vec![Vec::new(); runs.len()];
    for _ in 0..7 {
        for (t, (_, opts)) in runs.iter().enumerate() {
            let start = Instant::now();
            let mut o = ViewMut::contiguous(&mut outs[t], [1, h, n, d]).unwrap();
            forward(q, q, q, opts, &mut o, None).unwrap();
            times[t].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!("| N={n}, H={h}, D={d}, forward | median ms | GFLOP/s |");
    println!("|---|---|---|");
    for (t, (label, _)) in runs.iter().enumerate() {
        times[t].sort_by(f64::total_cmp);
        let ms = times[t][times[t].len() / 2];
        let gflops = 4.0 * d as f64 * pairs as f64 / ms / 1e6;
        println!("| {label} | {ms:.2} | {gflops:.1} |");
        assert!(outs[t] == outs[0], "{label} differs from the built-in rule");
    }
}
