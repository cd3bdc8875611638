//! The fused op against candle's unfused composition, forward and gradients, by the accuracy
//! rule of BENCHMARKS.md: the fused error against an f64 oracle (the unfused composition run in
//! f64) is at most 2× (forward) or 3× (gradients) that of the unfused composition in f32, plus a
//! floor of 4 ulps of the largest oracle value.

use attentive::{Causal, Pos, ScoreRule};
use attentive_nn::op::{attention, attention_unfused, AttnConfig};
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;

struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    nq: usize,
    nk: usize,
    d: usize,
    dv: usize,
    cfg: AttnConfig,
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn rand_tensor(seed: &mut u64, shape: (usize, usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|_| lcg(seed) * 1.5).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Output and gradients of q, k, v of `sum(O ⊙ G)`.
fn run(
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
    qkv: [&Tensor; 3],
    g: &Tensor,
    dtype: DType,
) -> Vec<Vec<f64>> {
    let vars: Vec<Var> = qkv
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
        .collect();
    let o = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )
    .unwrap();
    let loss = (&o * g.to_dtype(dtype).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let mut out = vec![flat(&o)];
    for v in &vars {
        out.push(flat(
            grads
                .get(v.as_tensor())
                .expect("every input gets a gradient"),
        ));
    }
    out
}

fn max_err(got: &[f64], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn check(c: &Case, name: &str) {
    let mut seed = (c.b * 31 + c.nq * 7 + c.nk * 13 + c.d) as u64;
    let q = rand_tensor(&mut seed, (c.b, c.hq, c.nq, c.d));
    let k = rand_tensor(&mut seed, (c.b, c.hkv, c.nk, c.d));
    let v = rand_tensor(&mut seed, (c.b, c.hkv, c.nk, c.dv));
    let g = rand_tensor(&mut seed, (c.b, c.hq, c.nq, c.dv));
    let cfg = c.cfg.clone();
    let fused = run(
        &|q, k, v| attention(q, k, v, &cfg),
        [&q, &k, &v],
        &g,
        DType::F32,
    );
    let naive = run(
        &|q, k, v| attention_unfused(q, k, v, &cfg),
        [&q, &k, &v],
        &g,
        DType::F32,
    );
    let oracle = run(
        &|q, k, v| attention_unfused(q, k, v, &cfg),
        [&q, &k, &v],
        &g,
        DType::F64,
    );
    for (i, what) in ["O", "dQ", "dK", "dV"].iter().enumerate() {
        let scale = oracle[i].iter().fold(1e-3f64, |a, x| a.max(x.abs()));
        let floor = 4.0 * f32::EPSILON as f64 * scale;
        let factor = if i == 0 { 2.0 } else { 3.0 };
        let (e, e32) = (
            max_err(&fused[i], &oracle[i]),
            max_err(&naive[i], &oracle[i]),
        );
        assert!(
            e <= factor * e32 + floor,
            "{name}: {what} error {e:.3e} > {factor}× unfused f32 error {e32:.3e} + {floor:.1e}"
        );
    }
}

#[test]
fn fused_op_matches_the_unfused_composition() {
    let base = |b, hq, hkv, nq, nk, d, dv| Case {
        b,
        hq,
        hkv,
        nq,
        nk,
        d,
        dv,
        cfg: AttnConfig::default(),
    };
    let mut cases = vec![
        ("plain", base(2, 4, 4, 17, 17, 16, 16)),
        ("one query", base(1, 2, 2, 1, 9, 8, 8)),
        ("cross, Nq < Nk", base(2, 2, 2, 5, 23, 32, 16)),
        ("cross, Nq > Nk", base(1, 3, 3, 70, 6, 8, 24)),
        ("gqa", base(2, 6, 2, 33, 33, 16, 16)),
        ("long", base(1, 2, 1, 130, 130, 64, 64)),
    ];
    let mut c = base(2, 4, 4, 20, 20, 16, 16);
    c.cfg.causal = Some(Causal::TopLeft);
    cases.push(("causal", c));
    let mut c = base(1, 2, 2, 9, 29, 8, 8);
    c.cfg.causal = Some(Causal::BottomRight);
    cases.push(("causal bottom-right", c));
    let mut c = base(2, 4, 2, 40, 40, 16, 16);
    c.cfg.window = Some((5, 2));
    c.cfg.alibi = Some(attentive::positional::alibi_slopes(4));
    cases.push(("window + alibi + gqa", c));
    let mut c = base(1, 2, 2, 25, 25, 16, 16);
    c.cfg.softcap = Some(2.5);
    c.cfg.scale = Some(0.7);
    cases.push(("softcap + scale", c));
    let mut c = base(3, 2, 2, 11, 13, 8, 8);
    c.cfg.key_mask = Some((0..3 * 13).map(|i| i % 13 < 13 - 4 * (i / 13)).collect());
    cases.push(("key padding", c));
    let mut c = base(2, 2, 2, 70, 70, 16, 16);
    c.cfg.pattern = Some("strided:8+sink:2,5".parse().unwrap());
    cases.push(("pattern", c));
    let mut c = base(2, 4, 2, 19, 23, 8, 8);
    c.cfg.score_rule = Some(Arc::new(Relative));
    c.cfg.causal = Some(Causal::BottomRight);
    cases.push(("score rule + causal", c));
    for (name, c) in &cases {
        check(c, name);
    }
}

/// A nonlinear rule with a position-dependent term: $f(s) = s + 0.1\tanh(s)\\,(h + 1) - 0.05|i - j|$.
struct Relative;

impl ScoreRule for Relative {
    fn score(&self, s: f32, p: Pos) -> f32 {
        self.score_f64(s as f64, p) as f32
    }
    fn grad(&self, s: f32, p: Pos) -> f32 {
        self.grad_f64(s as f64, p) as f32
    }
    fn score_f64(&self, s: f64, p: Pos) -> f64 {
        s + 0.1 * s.tanh() * (p.h + 1) as f64 - 0.05 * (p.i as f64 - p.j as f64).abs()
    }
    fn grad_f64(&self, s: f64, p: Pos) -> f64 {
        1.0 + 0.1 * (1.0 - s.tanh().powi(2)) * (p.h + 1) as f64
    }
}

#[test]
fn dropout_backward_replays_the_forward_mask() {
    // Central differences of sum(O ⊙ G) through the fused op with dropout agree with its
    // gradient: the backward drops exactly the weights the forward dropped.
    let mut seed = 11;
    let shape = (1, 2, 9, 4);
    let q = rand_tensor(&mut seed, shape);
    let k = rand_tensor(&mut seed, shape);
    let v = rand_tensor(&mut seed, shape);
    let g = rand_tensor(&mut seed, shape);
    let cfg = AttnConfig {
        dropout: Some(attentive::Dropout { p: 0.3, seed: 42 }),
        ..Default::default()
    };
    let loss = |q: &Tensor| -> f64 {
        let o = attention(q, &k, &v, &cfg).unwrap();
        (o * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let qv = Var::from_tensor(&q).unwrap();
    let o = attention(qv.as_tensor(), &k, &v, &cfg).unwrap();
    let grads = (o * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let dq = flat(grads.get(qv.as_tensor()).unwrap());
    let base = flat(&q);
    let h = 1e-2;
    for idx in [0, 5, 17, 40, 71] {
        let bump = |delta: f64| {
            let mut x = base.clone();
            x[idx] += delta;
            let x: Vec<f32> = x.iter().map(|&y| y as f32).collect();
            Tensor::from_vec(x, shape, &Device::Cpu).unwrap()
        };
        let fd = (loss(&bump(h)) - loss(&bump(-h))) / (2.0 * h);
        assert!(
            (fd - dq[idx]).abs() < 2e-3 + 1e-2 * fd.abs(),
            "element {idx}: finite difference {fd} vs {}",
            dq[idx]
        );
    }
    // And dropout changes the output.
    let plain = attention(&q, &k, &v, &AttnConfig::default()).unwrap();
    let dropped = attention(&q, &k, &v, &cfg).unwrap();
    assert!(max_err(&flat(&plain), &flat(&dropped)) > 1e-3);
}

#[test]
fn strided_inputs_give_the_same_result() {
    // Transposed [B, N, H, D] storage viewed as [B, H, N, D]: the op reads the strides.
    let mut seed = 5;
    let x = rand_tensor(&mut seed, (2, 12, 3, 8)); // [B, N, H, D]
    let q = x.transpose(1, 2).unwrap(); //             [B, H, N, D], not contiguous
    let cfg = AttnConfig::default();
    let a = attention(&q, &q, &q, &cfg).unwrap();
    let b = attention(
        &q.contiguous().unwrap(),
        &q.contiguous().unwrap(),
        &q.contiguous().unwrap(),
        &cfg,
    )
    .unwrap();
    assert_eq!(flat(&a), flat(&b));
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev).unwrap();
    let k = Tensor::zeros((1, 3, 3, 4), DType::F32, &dev).unwrap();
    assert!(
        attention(&q, &k, &k, &AttnConfig::default()).is_err(),
        "3 kv heads for 2 query heads"
    );
    let k64 = Tensor::zeros((1, 2, 3, 4), DType::F64, &dev).unwrap();
    assert!(
        attention(&q, &k64, &k64, &AttnConfig::default()).is_err(),
        "f64"
    );
    let q3 = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
    assert!(
        attention(&q3, &q3, &q3, &AttnConfig::default()).is_err(),
        "rank 3"
    );
    let cfg = AttnConfig {
        scale: Some(f32::NAN),
        ..Default::default()
    };
    assert!(attention(&q, &q, &q, &cfg).is_err(), "NaN scale");
}
