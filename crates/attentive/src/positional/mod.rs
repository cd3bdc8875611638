//! Positional schemes: encodings added to or rotating the inputs (sinusoidal, learned absolute,
//! RoPE), biases added to the scores (ALiBi slopes, T5 relative-position buckets), and Shaw et
//! al.'s relative position representations ([`shaw`]).

pub mod shaw;

use crate::error::{AttnError, Result};
use crate::rule::{Pos, ScoreRule};
use crate::view::ViewMut;

/// ALiBi slopes for `n` heads (Press et al.): for `n` a power of two, $m_h = 2^{-8h/n}$ for
/// $h = 1..n$; otherwise, with $c = 2^{\lfloor\log_2 n\rfloor}$, the slopes for `c` heads followed by
/// every other slope for `2c` heads, `n − c` of them.
///
/// ```
/// let s = attentive::positional::alibi_slopes(6);
/// let neg_log2: Vec<f32> = s.iter().map(|m| -m.log2()).collect();
/// assert_eq!(neg_log2, vec![2.0, 4.0, 6.0, 8.0, 1.0, 3.0]);
/// ```
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    fn pow2(n: usize) -> Vec<f32> {
        (1..=n)
            .map(|h| 2f64.powf(-8.0 * h as f64 / n as f64) as f32)
            .collect()
    }
    if n == 0 {
        return Vec::new();
    }
    let c = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let mut s = pow2(c);
    if c < n {
        s.extend(pow2(2 * c).into_iter().step_by(2).take(n - c));
    }
    s
}

/// The sinusoidal encoding of "Attention Is All You Need", `[n, d]` row-major:
/// $PE(pos, 2i) = \sin(pos / 10000^{2i/d})$, $PE(pos, 2i+1) = \cos(pos / 10000^{2i/d})$, for
/// positions `start..start + n` (computed in f64, rounded once).
///
/// ```
/// let pe = attentive::positional::sinusoidal(0, 2, 4); // positions 0 and 1
/// let want = [0.84147098f32, 0.54030231, 0.00999983, 0.99995000];
/// assert!(pe[4..].iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-7));
/// ```
pub fn sinusoidal(start: usize, n: usize, d: usize) -> Vec<f32> {
    let freq: Vec<f64> = (0..d)
        .map(|c| 10000f64.powf(-((c / 2 * 2) as f64) / d as f64))
        .collect();
    let mut out = Vec::with_capacity(n * d);
    for pos in start..start + n {
        for (c, f) in freq.iter().enumerate() {
            let a = pos as f64 * f;
            out.push(if c % 2 == 0 { a.sin() } else { a.cos() } as f32);
        }
    }
    out
}

/// Learned absolute positions: adds row `start + n` of `table` (`[max_len, D]`, row-major) to
/// position `n` of `x` (`[B, H, N, D]`, any strides; use `H = 1` for embeddings `[B, N, D]`).
pub fn add_learned(x: &mut ViewMut, table: &[f32], start: usize) -> Result<()> {
    let [_, _, n, d] = x.shape();
    check_table(table, start + n, d)?;
    x.for_each_row(|_, _, pos, row| {
        let t = &table[(start + pos) * d..(start + pos + 1) * d];
        row.iter_mut().zip(t).for_each(|(a, b)| *a += b);
    });
    Ok(())
}

/// Backward of [`add_learned`]: adds to `d_table` (`[max_len, D]`) the gradient of each position,
/// summed over batch and heads. (The gradient with respect to `x` is `dx` itself.)
pub fn add_learned_backward(
    dx: crate::view::View,
    d_table: &mut [f32],
    start: usize,
) -> Result<()> {
    let [b, h, n, d] = dx.shape();
    check_table(d_table, start + n, d)?;
    for pos in 0..n {
        let t = &mut d_table[(start + pos) * d..(start + pos + 1) * d];
        for bi in 0..b {
            for hi in 0..h {
                for (c, g) in t.iter_mut().enumerate() {
                    *g += dx.at(bi, hi, pos, c);
                }
            }
        }
    }
    Ok(())
}

fn check_table(table: &[f32], rows: usize, d: usize) -> Result<()> {
    if d == 0 || !table.len().is_multiple_of(d) || table.len() / d < rows {
        return Err(AttnError::LengthMismatch {
            tensor: "position table",
            expected: rows * d,
            got: table.len(),
        });
    }
    Ok(())
}

/// Which feature pairs RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairs {
    /// Pairs $(2i, 2i+1)$: GPT-J's `rotate_every_two`, Meta's complex view.
    Interleaved,
    /// Pairs $(i, i + d/2)$: HF LLaMA's `rotate_half`, GPT-NeoX.
    HalfSplit,
}

/// Rotary position embedding (Su et al.): rotates pair $i$ of the first `dims` features of a
/// vector at position $m$ by the angle $m\\,\theta_i$, $\theta_i = \text{base}^{-2i/\text{dims}}$.
/// Then $\langle R_m q, R_n k\rangle$ depends on $m - n$ only, so attention sees relative
/// positions. Features past `dims` are left alone (partial rotary, as in GPT-J and NeoX).
///
/// ```
/// use attentive::positional::{Rope, RopePairs};
/// use attentive::ViewMut;
/// let rope = Rope::new(4, 10000.0, RopePairs::Interleaved).unwrap();
/// let mut x = [1.0f32, 2.0, 3.0, 4.0];
/// rope.apply(&mut ViewMut::contiguous(&mut x, [1, 1, 1, 4]).unwrap(), &[1]).unwrap();
/// let want = [-1.142640f32, 1.922076, 2.959851, 4.029800];
/// assert!(x.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Rope {
    pub dims: usize,
    pub base: f64,
    pub pairs: RopePairs,
}

impl Rope {
    /// `dims` must be even and positive, `base` finite and above 1.
    pub fn new(dims: usize, base: f64, pairs: RopePairs) -> Result<Self> {
        if dims == 0 || !dims.is_multiple_of(2) {
            return Err(AttnError::InvalidOption {
                option: "rope dims",
                value: dims as f64,
                reason: "must be even and positive",
            });
        }
        if !(base.is_finite() && base > 1.0) {
            return Err(AttnError::InvalidOption {
                option: "rope base",
                value: base,
                reason: "must be finite and greater than 1",
            });
        }
        Ok(Self { dims, base, pairs })
    }

    /// Rotates `x` (`[B, H, N, D]`, any strides, `D ≥ dims`) in place; `positions[n]` is the
    /// position of row `n` (for a KV cache, `start..start + N`).
    pub fn apply(&self, x: &mut ViewMut, positions: &[usize]) -> Result<()> {
        self.rotate(x, positions, 1.0)
    }

    /// Backward of [`apply`](Self::apply), in place on the gradient: $R_m^\top$, the rotation by
    /// $-m\theta_i$.
    pub fn backward(&self, dx: &mut ViewMut, positions: &[usize]) -> Result<()> {
        self.rotate(dx, positions, -1.0)
    }

    fn rotate(&self, x: &mut ViewMut, positions: &[usize], sign: f64) -> Result<()> {
        let [_, _, n, d] = x.shape();
        if d < self.dims {
            return Err(AttnError::InvalidOption {
                option: "rope dims",
                value: self.dims as f64,
                reason: "exceeds the head dimension",
            });
        }
        crate::error::expect_len("positions", positions.len(), n)?;
        let half = self.dims / 2;
        // cos and sin per (row, pair), computed once in f64.
        let theta: Vec<f64> = (0..half)
            .map(|i| self.base.powf(-2.0 * i as f64 / self.dims as f64))
            .collect();
        let mut cs = vec![(0f32, 0f32); n * half];
        for (r, &m) in positions.iter().enumerate() {
            for (i, th) in theta.iter().enumerate() {
                let (s, c) = (sign * m as f64 * th).sin_cos();
                cs[r * half + i] = (c as f32, s as f32);
            }
        }
        let pairs = self.pairs;
        x.for_each_row(|_, _, r, row| {
            for i in 0..half {
                let (a, b) = match pairs {
                    RopePairs::Interleaved => (2 * i, 2 * i + 1),
                    RopePairs::HalfSplit => (i, i + half),
                };
                let (c, s) = cs[r * half + i];
                let (x0, x1) = (row[a], row[b]);
                row[a] = x0 * c - x1 * s;
                row[b] = x0 * s + x1 * c;
            }
        });
        Ok(())
    }
}

/// T5's relative-position bucket (Mesh TensorFlow's `_relative_position_bucket`) of
/// `rel = key − query`: exact buckets for small distances, logarithmic ones up to `max_distance`.
/// Bidirectional rules split the buckets between keys before and after the query; causal ones
/// give every key after the query bucket 0.
///
/// ```
/// use attentive::positional::t5_bucket;
/// assert_eq!(t5_bucket(-12, true, 32, 128), 9);
/// assert_eq!(t5_bucket(127, true, 32, 128), 31);
/// assert_eq!(t5_bucket(-64, false, 32, 128), 26);
/// ```
pub fn t5_bucket(rel: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut nb = num_buckets as i64;
    let mut n = -rel;
    let mut ret = 0;
    if bidirectional {
        nb /= 2;
        if n < 0 {
            ret += nb;
        }
        n = n.abs();
    } else {
        n = n.max(0);
    }
    let exact = nb / 2;
    let bucket = if n < exact {
        n
    } else {
        // The log is evaluated only for n ≥ exact > 0.
        let v = exact as f64
            + ((n as f64 / exact as f64).ln() / (max_distance as f64 / exact as f64).ln()
                * (nb - exact) as f64) as i64 as f64;
        (v as i64).min(nb - 1)
    };
    (ret + bucket) as usize
}

/// T5's relative attention bias as a score rule: $s + \text{table}[h][\text{bucket}(j - p)]$ with
/// $p = i + \text{offset}$ the query's position (offset $N_k - N_q$ for a decoder with a cache).
/// The table is `[Hq, num_buckets]`, row-major; T5 scales no scores, so run it with scale 1.
/// Its gradient is the scatter-add of $\partial L/\partial s$ into the table:
/// [`backward_rule_params`](crate::backward_rule_params) returns it.
pub struct T5Bias<'a> {
    pub table: &'a [f32],
    pub bidirectional: bool,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub offset: i64,
}

impl T5Bias<'_> {
    fn index(&self, at: Pos) -> usize {
        let rel = at.j as i64 - (at.i as i64 + self.offset);
        at.h * self.num_buckets
            + t5_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
    }
}

impl ScoreRule for T5Bias<'_> {
    fn check(&self, [_, hq, _, _]: [usize; 4]) -> Result<()> {
        if self.num_buckets < 4 || self.max_distance < self.num_buckets / 4 + 1 {
            return Err(AttnError::InvalidOption {
                option: "t5 num_buckets",
                value: self.num_buckets as f64,
                reason: "needs at least 4 buckets and max_distance beyond the exact ones",
            });
        }
        crate::error::expect_len("t5 table", self.table.len(), hq * self.num_buckets)
    }
    fn score(&self, s: f32, at: Pos) -> f32 {
        s + self.table[self.index(at)]
    }
    fn grad(&self, _: f32, _: Pos) -> f32 {
        1.0
    }
    fn score_f64(&self, s: f64, at: Pos) -> f64 {
        s + self.table[self.index(at)] as f64
    }
    fn grad_f64(&self, _: f64, _: Pos) -> f64 {
        1.0
    }
    fn params(&self) -> usize {
        self.table.len()
    }
    fn param_grad(&self, g: f32, at: Pos, grad: &mut [f32]) {
        grad[self.index(at)] += g;
    }
    fn param_grad_f64(&self, g: f64, at: Pos, grad: &mut [f64]) {
        grad[self.index(at)] += g;
    }
}
