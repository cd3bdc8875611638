//! Shaw's relative positions against plain attention on the same inputs, timed side by side
//! (A B A B …, median of 7): forward, and forward + backward.
//!
//! `cargo run --release --example shaw_cost [N] [CLIP]` (default N = 2048, clip 16; B = 1, H = 8, D = 64)

use attentive::shaw::Shaw;
use attentive::{backward, forward, Options, View, ViewMut};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(2048, |s| s.parse().expect("N"));
    let clip: usize = args.next().map_or(16, |s| s.parse().expect("CLIP"));
    let (h, d) = (8usize, 64usize);
    let gen = |seed: usize, len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed).wrapping_mul(2654435761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    let shape = [1, h, n, d];
    let (q, k, v, d_o) = (
        gen(1, h * n * d),
        gen(2, h * n * d),
        gen(3, h * n * d),
        gen(4, h * n * d),
    );
    let (keys, values) = (gen(5, (2 * clip + 1) * d), gen(6, (2 * clip + 1) * d));
    let shaw = Shaw {
        clip,
        keys: &keys,
        values: &values,
    };
    let view = |x| View::contiguous(x, &shape).unwrap();
    let (qv, kv, vv, dov) = (view(&q), view(&k), view(&v), view(&d_o));
    let opts = Options::new();
    let mut o = vec![0.0f32; h * n * d];
    let mut lse = vec![0.0f32; h * n];
    let (mut dq, mut dk, mut dv) = (o.clone(), o.clone(), o.clone());
    let (mut dkeys, mut dvalues) = (vec![0.0f32; keys.len()], vec![0.0f32; values.len()]);
    let mut t = vec![Vec::new(); 4];
    for _ in 0..7 {
        let s = Instant::now();
        forward(
            qv,
            kv,
            vv,
            &opts,
            &mut ViewMut::contiguous(&mut o, shape).unwrap(),
            Some(&mut lse),
        )
        .unwrap();
        t[0].push(s.elapsed().as_secs_f64());
        backward(
            qv,
            kv,
            vv,
            View::contiguous(&o, &shape).unwrap(),
            &lse,
            dov,
            &opts,
            &mut ViewMut::contiguous(&mut dq, shape).unwrap(),
            &mut ViewMut::contiguous(&mut dk, shape).unwrap(),
            &mut ViewMut::contiguous(&mut dv, shape).unwrap(),
        )
        .unwrap();
        t[1].push(s.elapsed().as_secs_f64());
        let s = Instant::now();
        let saved = shaw
            .forward(
                qv,
                kv,
                vv,
                &opts,
                &mut ViewMut::contiguous(&mut o, shape).unwrap(),
            )
            .unwrap();
        t[2].push(s.elapsed().as_secs_f64());
        shaw.backward(
            qv,
            kv,
            vv,
            &saved,
            dov,
            &opts,
            (
                &mut ViewMut::contiguous(&mut dq, shape).unwrap(),
                &mut ViewMut::contiguous(&mut dk, shape).unwrap(),
                &mut ViewMut::contiguous(&mut dv, shape).unwrap(),
            ),
            &mut dkeys,
            &mut dvalues,
        )
        .unwrap();
        t[3].push(s.elapsed().as_secs_f64());
    }
    let med = |x: &mut Vec<f64>| {
        x.sort_by(f64::total_cmp);
        x[x.len() / 2] * 1e3
    };
    let m: Vec<f64> = t.iter_mut().map(med).collect();
    println!("| N={n}, H={h}, D={d}, clip {clip} | plain ms | Shaw ms | Shaw / plain |");
    println!("|---|---|---|---|");
    println!(
        "| forward | {:.2} | {:.2} | {:.2}× |",
        m[0],
        m[2],
        m[2] / m[0]
    );
    println!(
        "| forward + backward | {:.2} | {:.2} | {:.2}× |",
        m[1],
        m[3],
        m[3] / m[1]
    );
}
