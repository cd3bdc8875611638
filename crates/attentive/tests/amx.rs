//! The AMX products (`Isa::Amx`: QKᵀ and P·V from three bf16 parts of each f32) against the
//! f64 oracle by the accuracy rule. The forward takes them where K is packed once per call,
//! which needs each key tile read by about 8 query tiles: sequences of 520 to 1100 queries, every
//! option of the random cases (masks, biases, soft-capping, ALiBi, windows, patterns, dropout,
//! grouped heads, three layouts, D and Dv not multiples of a tile). On a CPU without AMX the
//! same cases run on the other instruction sets.

mod common;
use attentive::{forward, forward_half_kv, Causal, Isa, Options, View, ViewMut};
use common::{check_case, check_rule, Case, Rng};

#[test]
fn long_random_cases_forward_and_backward() {
    let mut rng =
        Rng::new(std::env::var("SEED").map_or(20, |s| s.parse().expect("SEED is a number")));
    let mut failures = Vec::new();
    let cases = 24;
    for n in 0..cases {
        let c = Case::random_lengths(&mut rng, &[520, 577, 700, 1100]);
        if let Err(e) = check_case(&c, n % 3 == 0) {
            failures.push(format!("case {n}: {e}\n  {c:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// f16 K and V widened before they are split: the same bits as on the widened f32 inputs.
#[test]
fn half_kv_equals_widened_inputs() {
    if !Isa::Amx.available() {
        return;
    }
    let (b, h, n, d) = (1, 2, 640, 72);
    let mut rng = Rng::new(5);
    let q = rng.vec(b * h * n * d);
    let kv: Vec<attentive::f16> = rng
        .vec(2 * b * h * n * d)
        .iter()
        .map(|&x| attentive::f16::from_f32(x))
        .collect();
    let wide: Vec<f32> = kv.iter().map(|x| x.to_f32()).collect();
    let shape = [b, h, n, d];
    let half = b * h * n * d;
    let opts = Options::new().causal(Causal::BottomRight).isa(Isa::Amx);
    let qv = View::contiguous(&q, &shape).unwrap();
    let (k16, v16) = halves(&kv, shape);
    let (k32, v32) = halves(&wide, shape);
    let mut o16 = vec![0.0; half];
    let mut o32 = vec![0.0; half];
    let mut out16 = ViewMut::contiguous(&mut o16, shape).unwrap();
    forward_half_kv(qv, k16, v16, &opts, &mut out16, None).unwrap();
    let mut out32 = ViewMut::contiguous(&mut o32, shape).unwrap();
    forward(qv, k32, v32, &opts, &mut out32, None).unwrap();
    assert_eq!(o16, o32);
    let r64 = attentive::reference::forward::<f64>(qv, k32, v32, &opts).unwrap();
    let r32 = attentive::reference::forward::<f32>(qv, k32, v32, &opts).unwrap();
    check_rule("O", &o32, &r32.o, &r64.o, 2.0).unwrap();
}

/// The first and second halves of `x` as views of `shape`.
fn halves<T: attentive::Element>(x: &[T], shape: [usize; 4]) -> (View<'_, T>, View<'_, T>) {
    let half = x.len() / 2;
    let view = |x| View::contiguous(x, &shape).unwrap();
    (view(&x[..half]), view(&x[half..]))
}
