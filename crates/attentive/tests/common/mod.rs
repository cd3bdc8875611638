//! Shared helpers of the engine's tests: a seeded generator, random problems in several memory
//! layouts, and the accuracy rule of FlashAttention's tests.
#![allow(dead_code)]

use attentive::{
    reference, BlockMask, Causal, Isa, Options, Pattern, Pos, ScoreRule, View, ViewMut,
};

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// How a `[B, H, N, D]` tensor is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layout {
    /// Row-major `[B, H, N, D]`.
    Bhnd,
    /// `[B, N, H, D]`, as a fused projection writes it.
    Bnhd,
    /// `[B, H, D, N]`: the feature axis is not contiguous.
    Bhdn,
}

/// A tensor with its storage, viewable as `[B, H, N, D]`.
pub struct Tensor {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
    pub layout: Layout,
}

impl Tensor {
    /// Stores the row-major `[B, H, N, D]` values `x` in `layout`.
    pub fn new(x: &[f32], shape: [usize; 4], layout: Layout) -> Self {
        let [b, h, n, d] = shape;
        let mut data = vec![0.0; x.len()];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..n {
                    for c in 0..d {
                        let src = ((bi * h + hi) * n + i) * d + c;
                        let dst = match layout {
                            Layout::Bhnd => src,
                            Layout::Bnhd => ((bi * n + i) * h + hi) * d + c,
                            Layout::Bhdn => ((bi * h + hi) * d + c) * n + i,
                        };
                        data[dst] = x[src];
                    }
                }
            }
        }
        Tensor {
            data,
            shape,
            layout,
        }
    }

    pub fn strides(shape: [usize; 4], layout: Layout) -> [usize; 4] {
        let [_, h, n, d] = shape;
        match layout {
            Layout::Bhnd => [h * n * d, n * d, d, 1],
            Layout::Bnhd => [n * h * d, d, h * d, 1],
            Layout::Bhdn => [h * d * n, d * n, 1, n],
        }
    }

    pub fn view(&self) -> View<'_> {
        View::new(
            &self.data,
            self.shape,
            Self::strides(self.shape, self.layout),
        )
        .unwrap()
    }
}

/// An output buffer in a given layout, read back as row-major `[B, H, N, D]`.
pub struct OutBuf {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
    pub layout: Layout,
}

impl OutBuf {
    pub fn new(shape: [usize; 4], layout: Layout) -> Self {
        OutBuf {
            data: vec![f32::NAN; shape.iter().product()],
            shape,
            layout,
        }
    }
    pub fn view(&mut self) -> ViewMut<'_> {
        ViewMut::new(
            &mut self.data,
            self.shape,
            Tensor::strides(self.shape, self.layout),
        )
        .unwrap()
    }
    pub fn row_major(&mut self) -> Vec<f32> {
        let v = self.view();
        v.as_view().to_vec()
    }
}

/// A score rule with a non-trivial derivative: $f(s) = s + 0.3\sin s + 0.05\\,(j - i)/8$.
pub struct Wobble;

impl ScoreRule for Wobble {
    fn score(&self, s: f32, p: Pos) -> f32 {
        s + 0.3 * s.sin() + 0.05 * (p.j as f32 - p.i as f32) / 8.0
    }
    fn grad(&self, s: f32, _: Pos) -> f32 {
        1.0 + 0.3 * s.cos()
    }
    fn score_f64(&self, s: f64, p: Pos) -> f64 {
        s + 0.3 * s.sin() + 0.05 * (p.j as f64 - p.i as f64) / 8.0
    }
    fn grad_f64(&self, s: f64, _: Pos) -> f64 {
        1.0 + 0.3 * s.cos()
    }
}

pub fn every_fifth(p: Pos) -> bool {
    !(p.i + 2 * p.j + p.h + p.b).is_multiple_of(5)
}

pub static WOBBLE: Wobble = Wobble;
pub static EVERY_FIFTH: fn(Pos) -> bool = every_fifth;

/// A random attention problem: shapes, layout and options.
#[derive(Clone, Debug)]
pub struct Case {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
    pub dv: usize,
    pub layout: Layout,
    pub scale: Option<f32>,
    pub causal: Option<Causal>,
    pub window: Option<(usize, usize)>,
    pub softcap: Option<f32>,
    pub alibi: bool,
    /// Shape of the dense boolean mask, if any (broadcastable).
    pub mask: Option<Vec<usize>>,
    pub bias: Option<Vec<usize>>,
    pub docs: bool,
    pub mask_rule: bool,
    pub score_rule: bool,
    pub dropout: Option<f32>,
    pub pattern: Option<Pattern>,
    /// Pass the pattern as a prebuilt [`BlockMask`] rather than building it per call.
    pub prebuilt: bool,
    pub seed: u64,
}

impl Case {
    pub fn plain(b: usize, hq: usize, hkv: usize, nq: usize, nk: usize, d: usize) -> Case {
        Case {
            b,
            hq,
            hkv,
            nq,
            nk,
            d,
            dv: d,
            layout: Layout::Bhnd,
            scale: None,
            causal: None,
            window: None,
            softcap: None,
            alibi: false,
            mask: None,
            bias: None,
            docs: false,
            mask_rule: false,
            score_rule: false,
            dropout: None,
            pattern: None,
            prebuilt: false,
            seed: 1,
        }
    }

    /// A random case; `n_max` bounds the sequence lengths.
    pub fn random(rng: &mut Rng, n_max: usize) -> Case {
        let ns = [1usize, 2, 3, 7, 16, 17, 31, 63, 64, 65, 100, 129, 150, 200];
        let ns: Vec<usize> = ns.iter().copied().filter(|&n| n <= n_max).collect();
        Case::random_lengths(rng, &ns)
    }

    /// A random case whose sequence lengths are drawn from `ns`.
    pub fn random_lengths(rng: &mut Rng, ns: &[usize]) -> Case {
        let d = rng.pick(&[1, 8, 16, 32, 40, 64, 80, 96, 128, 256]);
        let (hkv, group) = (rng.pick(&[1, 2]), rng.pick(&[1, 2, 3]));
        let mut c = Case::plain(
            rng.pick(&[1, 2]),
            hkv * group,
            hkv,
            rng.pick(ns),
            rng.pick(ns),
            d,
        );
        c.dv = if rng.chance(0.3) {
            rng.pick(&[1, 8, 24, 48, 64, 72])
        } else {
            d
        };
        c.layout = rng.pick(&[Layout::Bhnd, Layout::Bnhd, Layout::Bhdn]);
        c.seed = rng.next_u64();
        if rng.chance(0.15) {
            c.scale = Some(rng.pick(&[0.05, 0.5, 1.0, 2.0]));
        }
        if rng.chance(0.4) {
            c.causal = Some(rng.pick(&[Causal::TopLeft, Causal::BottomRight]));
        }
        if rng.chance(0.25) {
            c.window = Some((
                rng.pick(&[0, 1, 5, 40, usize::MAX]),
                rng.pick(&[0, 3, 70, usize::MAX]),
            ));
        }
        if rng.chance(0.2) {
            c.softcap = Some(rng.pick(&[0.5, 2.0, 30.0]));
        }
        c.alibi = rng.chance(0.2);
        if rng.chance(0.2) {
            let (b, h, nq, nk) = (c.b, c.hq, c.nq, c.nk);
            c.mask = Some(rng.pick(&[
                vec![b, h, nq, nk],
                vec![nq, nk],
                vec![b, 1, 1, nk],
                vec![1, h, nq, 1],
            ]));
        }
        if rng.chance(0.2) {
            let (b, h, nq, nk) = (c.b, c.hq, c.nq, c.nk);
            c.bias = Some(rng.pick(&[vec![b, h, nq, nk], vec![nq, nk], vec![1, h, 1, nk]]));
        }
        c.docs = rng.chance(0.15);
        c.mask_rule = rng.chance(0.1);
        c.score_rule = rng.chance(0.1);
        if rng.chance(0.15) {
            c.dropout = Some(rng.pick(&[0.1, 0.5]));
        }
        if rng.chance(0.3) {
            c.pattern = Some(random_pattern(rng, c.nk));
            c.prebuilt = rng.chance(0.3);
        }
        c
    }
}

/// The inputs of a case, generated from its seed.
pub struct Inputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub d_o: Tensor,
    pub mask: Vec<bool>,
    pub bias: Vec<f32>,
    pub q_docs: Vec<u32>,
    pub k_docs: Vec<u32>,
    pub slopes: Vec<f32>,
    /// With a pattern: the dense mask `[B, Hq, Nq, Nk]` of the pattern's paper rule and the
    /// case's own mask, which the oracle gets instead of the pattern.
    pub pattern_mask: Vec<bool>,
    pub blocks: Option<BlockMask>,
}

impl Inputs {
    pub fn new(c: &Case) -> Inputs {
        let mut rng = Rng::new(c.seed);
        let (qs, ks, vs) = (
            [c.b, c.hq, c.nq, c.d],
            [c.b, c.hkv, c.nk, c.d],
            [c.b, c.hkv, c.nk, c.dv],
        );
        // Scaled scores with a standard deviation of about 2 (amp²/3): softmax is neither
        // uniform nor one-hot.
        let amp = 2.5;
        let q: Vec<f32> = rng
            .vec(qs.iter().product())
            .iter()
            .map(|x| x * amp)
            .collect();
        let k: Vec<f32> = rng
            .vec(ks.iter().product())
            .iter()
            .map(|x| x * amp)
            .collect();
        let v = rng.vec(vs.iter().product());
        let d_o = rng.vec(c.b * c.hq * c.nq * c.dv);
        let mask: Vec<bool> = c
            .mask
            .as_ref()
            .map(|s| (0..s.iter().product()).map(|_| rng.chance(0.7)).collect())
            .unwrap_or_default();
        let bias = c
            .bias
            .as_ref()
            .map(|s| {
                (0..s.iter().product())
                    .map(|_| {
                        if rng.chance(0.05) {
                            f32::NEG_INFINITY
                        } else {
                            rng.f32()
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Document boundaries: sorted ids per batch, as packed sequences have them.
        let docs = |n: usize, rng: &mut Rng| -> Vec<u32> {
            let mut out = Vec::new();
            for _ in 0..c.b {
                let mut id = 0u32;
                for _ in 0..n {
                    if rng.chance(0.05) {
                        id += 1;
                    }
                    out.push(id);
                }
            }
            out
        };
        let q_docs = docs(c.nq, &mut rng);
        let k_docs = docs(c.nk, &mut rng);
        let mut pattern_mask = Vec::new();
        if let Some(p) = &c.pattern {
            let own = c.mask.as_ref().map(|s| View::contiguous(&mask, s).unwrap());
            for b in 0..c.b {
                for h in 0..c.hq {
                    for i in 0..c.nq {
                        for j in 0..c.nk {
                            let own_ok = own.as_ref().is_none_or(|m| {
                                m.broadcast_to("mask", [c.b, c.hq, c.nq, c.nk])
                                    .unwrap()
                                    .at(b, h, i, j)
                            });
                            pattern_mask.push(own_ok && paper_visible(p, c.nq, c.nk, b, h, i, j));
                        }
                    }
                }
            }
        }
        let blocks = match (&c.pattern, c.prebuilt) {
            (Some(p), true) => Some(BlockMask::new(p, c.b, c.hq, c.nq, c.nk).unwrap()),
            _ => None,
        };
        Inputs {
            q: Tensor::new(&q, qs, c.layout),
            k: Tensor::new(&k, ks, c.layout),
            v: Tensor::new(&v, vs, c.layout),
            d_o: Tensor::new(&d_o, [c.b, c.hq, c.nq, c.dv], c.layout),
            mask,
            bias,
            q_docs,
            k_docs,
            slopes: attentive::positional::alibi_slopes(c.hq),
            pattern_mask,
            blocks,
        }
    }

    pub fn options<'a>(&'a self, c: &'a Case) -> Options<'a> {
        let mut o = Options::new();
        o.scale = c.scale;
        o.causal = c.causal;
        if let Some((l, r)) = c.window {
            o = o.window(l, r);
        }
        o.softcap = c.softcap;
        if c.alibi {
            o = o.alibi(&self.slopes);
        }
        if let Some(s) = &c.mask {
            o = o.mask(View::contiguous(&self.mask, s).unwrap());
        }
        if let Some(s) = &c.bias {
            o = o.bias(View::contiguous(&self.bias, s).unwrap());
        }
        if c.docs {
            o = o.docs(&self.q_docs, &self.k_docs);
        }
        if c.mask_rule {
            o = o.mask_rule(&EVERY_FIFTH);
        }
        match (&c.pattern, &self.blocks) {
            (Some(_), Some(m)) => {
                o.mask_rule = None;
                o = o.block_mask(m);
            }
            (Some(p), None) => o = o.pattern(p),
            _ => {}
        }
        if c.score_rule {
            o = o.score_rule(&WOBBLE);
        }
        if let Some(p) = c.dropout {
            o = o.dropout(p, c.seed ^ 77);
        }
        o
    }

    /// The options the oracle runs with: the pattern (or its block mask) replaced by the dense
    /// mask of its paper rule.
    pub fn oracle_options<'a>(&'a self, c: &'a Case) -> Options<'a> {
        let mut o = self.options(c);
        if c.pattern.is_some() {
            o.pattern = None;
            o.block_mask = None;
            if c.prebuilt {
                o.mask_rule = None;
            }
            let shape = [c.b, c.hq, c.nq, c.nk];
            o.mask = Some(View::contiguous(&self.pattern_mask, &shape).unwrap());
        }
        o
    }
}

/// A random pattern for `nk` keys, parameters drawn around the sequence length.
pub fn random_pattern(rng: &mut Rng, nk: usize) -> Pattern {
    let small = |rng: &mut Rng| rng.pick(&[1usize, 2, 3, 7, 16, 64, 65]);
    let leaf = |rng: &mut Rng| match rng.below(10) {
        0 => Pattern::Causal,
        1 => Pattern::Window {
            left: small(rng),
            right: rng.pick(&[0, 5, usize::MAX]),
        },
        2 => Pattern::Dilated {
            window: small(rng),
            dilation: rng.pick(&[1, 2, 3, 8]),
        },
        3 => Pattern::Strided { stride: small(rng) },
        4 => {
            let block = small(rng).max(2);
            Pattern::Fixed {
                block,
                summary: 1 + rng.below(block),
            }
        }
        5 => Pattern::Longformer {
            window: small(rng),
            global: {
                let mut g: Vec<usize> = (0..rng.below(4)).map(|_| rng.below(nk + 2)).collect();
                g.sort_unstable();
                g.dedup();
                g
            },
        },
        6 => Pattern::BigBird {
            block: rng.pick(&[1, 4, 16, 64]),
            random: rng.below(4),
            seed: rng.next_u64(),
        },
        7 => Pattern::Prefix {
            len: rng.below(nk + 1),
        },
        8 => Pattern::Sink {
            sinks: rng.below(5),
            window: small(rng),
        },
        _ => Pattern::rule(|p: Pos| !(p.i * 3 + p.j * 5 + p.h).is_multiple_of(7)),
    };
    match rng.below(5) {
        0 => leaf(rng) | leaf(rng),
        1 => leaf(rng) & leaf(rng),
        _ => leaf(rng),
    }
}

/// Whether query `i` sees key `j` under pattern `p`, written from each paper's rule as a set of
/// visible keys, independently of the crate's code.
pub fn paper_visible(
    p: &Pattern,
    nq: usize,
    nk: usize,
    b: usize,
    h: usize,
    i: usize,
    j: usize,
) -> bool {
    // Query i stands at position t of the key sequence (bottom-right alignment).
    let t = i as i64 + nk as i64 - nq as i64;
    let j = j as i64;
    let keys_of = |mut set: Box<dyn Iterator<Item = i64>>| set.any(|x| x == j);
    match p {
        Pattern::Causal => j <= t,
        Pattern::Window { left, right } => {
            let lo = t.saturating_sub(i64::try_from(*left).unwrap_or(i64::MAX / 2));
            let hi = t.saturating_add(i64::try_from(*right).unwrap_or(i64::MAX / 2));
            lo <= j && j <= hi
        }
        // Longformer's dilated indexing: score column k ∈ [0, 2w] maps to key t + d·(k − w).
        Pattern::Dilated { window, dilation } => {
            let (w, d) = (*window as i64, *dilation as i64);
            keys_of(Box::new((0..=2 * w).map(move |k| t + d * (k - w))))
        }
        // OpenAI's local band of l keys [t − l + 1, t], plus {j : (t − j) mod l = 0}, all j ≤ t.
        Pattern::Strided { stride } => {
            let l = *stride as i64;
            j <= t && j >= 0 && (j > t - l || (t - j) % l == 0)
        }
        // A¹ = {j : ⌊j/l⌋ = ⌊t/l⌋}, A² = {j : j mod l ∈ {l − c, …, l − 1}}, all j ≤ t.
        Pattern::Fixed { block, summary } => {
            let (l, c) = (*block as i64, *summary as i64);
            j <= t
                && (j.div_euclid(l) == t.div_euclid(l) || ((l - c)..l).contains(&j.rem_euclid(l)))
        }
        Pattern::Longformer { window, global } => {
            let g = |x: i64| global.iter().any(|&y| y as i64 == x);
            (t - j).abs() <= *window as i64 || g(t) || g(j)
        }
        // google-research/bigbird `full_bigbird_mask` from the block adjacency, with the random
        // blocks injected from the crate's draw.
        Pattern::BigBird {
            block,
            random,
            seed,
        } => {
            let nb = nk.div_ceil(*block) as i64;
            let (qb, kb) = (t.div_euclid(*block as i64), j / *block as i64);
            let global_row = qb <= 0 || qb >= nb - 1;
            let global_col = kb == 0 || kb == nb - 1;
            let band = (qb - kb).abs() <= 1;
            let rand = !global_row
                && attentive::pattern::bigbird_random_blocks(
                    nb as usize,
                    qb as usize,
                    *random,
                    *seed,
                )
                .contains(&(kb as usize));
            global_row || global_col || band || rand
        }
        Pattern::Prefix { len } => j < *len as i64 || j <= t,
        // StreamingLLM keeps sinks {0..s−1} and the recent window {t − w + 1..t}.
        Pattern::Sink { sinks, window } => {
            let recent = (t - *window as i64 + 1).max(0)..=t;
            j <= t && (j < *sinks as i64 || recent.contains(&j))
        }
        Pattern::Rule(r) => r.visible(Pos {
            b,
            h,
            i,
            j: j as usize,
        }),
        Pattern::Union(v) => v
            .iter()
            .any(|x| paper_visible(x, nq, nk, b, h, i, j as usize)),
        Pattern::Intersection(v) => v
            .iter()
            .all(|x| paper_visible(x, nq, nk, b, h, i, j as usize)),
    }
}

/// Largest absolute difference, with ±∞ required to match exactly.
pub fn max_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if w.is_infinite() || g.is_infinite() {
                if g as f64 == w {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                (g as f64 - w).abs()
            }
        })
        .fold(
            0.0,
            |a: f64, e| if e.is_nan() { f64::INFINITY } else { a.max(e) },
        )
}

/// The accuracy rule: `max|got − oracle| ≤ factor·max|naive32 − oracle| + floor`, the floor being
/// a few ulps of the largest finite oracle value.
pub fn check_rule(
    what: &str,
    got: &[f32],
    naive32: &[f32],
    oracle: &[f64],
    factor: f64,
) -> Result<(), String> {
    check_rule_scaled(what, got, naive32, oracle, factor, 0.0)
}

/// [`check_rule`] with the floor taken from at least `magnitude`: for a quantity formed as a
/// difference of larger terms (whose rounding is then the honest floor).
pub fn check_rule_scaled(
    what: &str,
    got: &[f32],
    naive32: &[f32],
    oracle: &[f64],
    factor: f64,
    magnitude: f64,
) -> Result<(), String> {
    let scale = oracle
        .iter()
        .filter(|x| x.is_finite())
        .fold(1e-3f64.max(magnitude), |a, &x| a.max(x.abs()));
    let floor = 4.0 * f32::EPSILON as f64 * scale;
    let e = max_err(got, oracle);
    let e32 = max_err(naive32, oracle);
    if e <= factor * e32 + floor {
        Ok(())
    } else {
        Err(format!(
            "{what}: error {e:.3e} > {factor}× naive f32 error {e32:.3e} + floor {floor:.1e}"
        ))
    }
}

/// Runs a case through the kernel on every instruction set this CPU has (forward, and backward
/// if `grads`) and checks each against the oracle by the accuracy rule.
pub fn check_case(c: &Case, grads: bool) -> Result<(), String> {
    let inp = Inputs::new(c);
    let opts = inp.options(c);
    let (q, k, v, d_o) = (inp.q.view(), inp.k.view(), inp.v.view(), inp.d_o.view());
    let s = |e: attentive::AttnError| e.to_string();
    let oopts = inp.oracle_options(c);
    let ref64 = reference::forward::<f64>(q, k, v, &oopts).map_err(s)?;
    let ref32 = reference::forward::<f32>(q, k, v, &oopts).map_err(s)?;
    // The gradient baseline is FlashAttention-2's backward done naively in f32 from the naive
    // f32 forward's output and LSE: the kernel computes those same formulas, so this measures
    // its tiling, SIMD and accumulation, while the oracle stays exact softmax calculus in f64.
    let grads_ref = if grads {
        let stats = (&ref32.o[..], &ref32.lse[..]);
        Some((
            reference::backward::<f64>(q, k, v, d_o, &oopts).map_err(s)?,
            reference::backward_from_output::<f32>(q, k, v, stats, d_o, &oopts).map_err(s)?,
        ))
    } else {
        None
    };
    for isa in Isa::all_available() {
        let opts = opts.isa(isa);
        let at = |e: String| format!("{isa:?}: {e}");
        let oshape = [c.b, c.hq, c.nq, c.dv];
        let mut out = OutBuf::new(oshape, c.layout);
        let mut lse = vec![f32::NAN; c.b * c.hq * c.nq];
        attentive::forward(q, k, v, &opts, &mut out.view(), Some(&mut lse)).map_err(s)?;
        let o = out.row_major();
        check_rule("O", &o, &ref32.o, &ref64.o, 2.0).map_err(at)?;
        check_rule("LSE", &lse, &ref32.lse, &ref64.lse, 2.0).map_err(at)?;
        let Some((g64, g32)) = &grads_ref else {
            continue;
        };
        let mut dq = OutBuf::new([c.b, c.hq, c.nq, c.d], c.layout);
        let mut dk = OutBuf::new([c.b, c.hkv, c.nk, c.d], c.layout);
        let mut dv = OutBuf::new([c.b, c.hkv, c.nk, c.dv], c.layout);
        let o_view = View::contiguous(&o, &oshape).unwrap();
        attentive::backward(
            q,
            k,
            v,
            o_view,
            &lse,
            d_o,
            &opts,
            &mut dq.view(),
            &mut dk.view(),
            &mut dv.view(),
        )
        .map_err(s)?;
        check_rule("dQ", &dq.row_major(), &g32.dq, &g64.dq, 3.0).map_err(at)?;
        check_rule("dK", &dk.row_major(), &g32.dk, &g64.dk, 3.0).map_err(at)?;
        check_rule("dV", &dv.row_major(), &g32.dv, &g64.dv, 3.0).map_err(at)?;
        // The same backward writing P∘dP too: the gradients keep their bits, and P∘dP of every
        // pair meets the oracle's.
        let mut dq2 = OutBuf::new([c.b, c.hq, c.nq, c.d], c.layout);
        let mut dk2 = OutBuf::new([c.b, c.hkv, c.nk, c.d], c.layout);
        let mut dv2 = OutBuf::new([c.b, c.hkv, c.nk, c.dv], c.layout);
        let mut pdp = vec![f32::NAN; c.b * c.hq * c.nq * c.nk];
        attentive::backward_weighted(
            q,
            k,
            v,
            o_view,
            &lse,
            d_o,
            &opts,
            &mut dq2.view(),
            &mut dk2.view(),
            &mut dv2.view(),
            &mut pdp,
        )
        .map_err(s)?;
        let same =
            |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        if !same(dq.row_major(), dq2.row_major())
            || !same(dk.row_major(), dk2.row_major())
            || !same(dv.row_major(), dv2.row_major())
        {
            return Err(at("backward_weighted changed dQ, dK or dV".into()));
        }
        check_rule("P∘dP", &pdp, &g32.weight_grads, &g64.weight_grads, 3.0).map_err(at)?;
    }
    Ok(())
}

/// A row-major view of `x` with shape `s`.
pub fn cv(x: &[f32], s: [usize; 4]) -> View<'_> {
    View::contiguous(x, &s).unwrap()
}

/// A view of `rows` rows starting at row `start` of each `[n, d]` head of a row-major
/// `[1, h, n, d]` tensor.
pub fn rows_of(x: &[f32], [h, n, d]: [usize; 3], start: usize, rows: usize) -> View<'_> {
    View::new(&x[start * d..], [1, h, rows, d], [h * n * d, n * d, d, 1]).unwrap()
}
