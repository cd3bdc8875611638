//! Attention on a six-word sentence, end to end: the fused kernel's output and weights next to
//! the f64 oracle's, and the gradient a training step would use.
//!
//! Run with `cargo run --release --example quickstart`.

use attentive::{backward, forward, probabilities, reference, Causal, Options, View, ViewMut};

const WORDS: [&str; 6] = ["the", "cat", "sat", "on", "the", "mat"];

/// Four hand-made features per word: determiner, animal, action, place.
const EMBED: [[f32; 4]; 6] = [
    [1.0, 0.0, 0.0, 0.1],
    [0.1, 1.0, 0.3, 0.0],
    [0.0, 0.4, 1.0, 0.2],
    [0.2, 0.0, 0.3, 0.8],
    [1.0, 0.0, 0.0, 0.1],
    [0.1, 0.2, 0.0, 1.0],
];

fn main() -> attentive::Result<()> {
    let (n, d) = (WORDS.len(), 4);
    let x: Vec<f32> = EMBED.iter().flatten().map(|v| v * 3.0).collect();
    // Self-attention with Q = K = V = the embeddings: one batch, one head, [1, 1, 6, 4].
    let xv = View::contiguous(&x, &[1, 1, n, d])?;
    let opts = Options::new().causal(Causal::TopLeft);

    let mut out = vec![0.0f32; n * d];
    let mut lse = vec![0.0f32; n];
    forward(
        xv,
        xv,
        xv,
        &opts,
        &mut ViewMut::contiguous(&mut out, [1, 1, n, d])?,
        Some(&mut lse),
    )?;
    let weights = probabilities(xv, xv, &opts)?;
    let oracle = reference::forward::<f64>(xv, xv, xv, &opts)?;

    println!("Causal self-attention weights (row: query word, column: key word)\n");
    print!("{:>6}", "");
    WORDS.iter().for_each(|w| print!("{w:>7}"));
    println!();
    for (i, w) in WORDS.iter().enumerate() {
        print!("{w:>6}");
        for j in 0..n {
            print!("{:>7.3}", weights[i * n + j]);
        }
        println!();
    }
    let err = out
        .iter()
        .zip(&oracle.o)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    println!(
        "\nOutput of 'mat' (a weighted mix of the values it sees): {:?}",
        &out[5 * d..]
    );
    println!("Largest difference from the f64 oracle over all outputs: {err:.2e}");

    // Gradients of the sum of all outputs, as one training step would need.
    let ones = vec![1.0f32; n * d];
    let (mut dq, mut dk, mut dv) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n * d]);
    backward(
        xv,
        xv,
        xv,
        View::contiguous(&out, &[1, 1, n, d])?,
        &lse,
        View::contiguous(&ones, &[1, 1, n, d])?,
        &opts,
        &mut ViewMut::contiguous(&mut dq, [1, 1, n, d])?,
        &mut ViewMut::contiguous(&mut dk, [1, 1, n, d])?,
        &mut ViewMut::contiguous(&mut dv, [1, 1, n, d])?,
    )?;
    let mass: Vec<String> = (0..n)
        .map(|j| format!("{}={:.2}", WORDS[j], dv[j * d]))
        .collect();
    println!(
        "Total attention each word receives (dV of the summed output): {}",
        mass.join(" ")
    );
    Ok(())
}
