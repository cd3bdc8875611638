//! The oracle: every semantic the kernels offer, computed naively, one (b, h, i, j) at a time.
//!
//! Nothing here is tiled, fused or clever. Each function materialises the full score matrix of a
//! row and follows the definitions of [`Options`] literally, so it can serve as
//! the ground truth for the engine's tests and for anyone's own attention code. It is generic over
//! the float type: `f64` is the oracle, and `f32` is "the same naive math in the kernel's own
//! precision", the baseline of the accuracy rule (an fp32 kernel's error must stay within twice
//! that of naive fp32 forward, three times for gradients).
//!
//! ```
//! use attentive::{reference, Options, View};
//! let x = [0.0f32, 1.0, 1.0, 0.0];
//! let v = View::contiguous(&x, &[1, 1, 2, 2]).unwrap();
//! let out = reference::forward::<f64>(v, v, v, &Options::new().scale(1.0)).unwrap();
//! // Each query weighs the key equal to itself by e / (1 + e).
//! let w = std::f64::consts::E / (1.0 + std::f64::consts::E);
//! assert!((out.o[1] - w).abs() < 1e-12);
//! ```

use crate::error::Result;
use crate::exact::problem::Problem;
use crate::options::{Causal, Options, Pos};
use crate::positional::shaw::Shaw;
use crate::view::View;

/// The oracles of the [`variants`](crate::variants), each written beside its kernel.
pub mod variants {
    pub use crate::variants::additive::oracle::additive;
    pub use crate::variants::gated::oracle::gated;
    pub use crate::variants::han::oracle::han_pool;
    pub use crate::variants::linear::oracle::linear;
    pub use crate::variants::linformer::oracle::linformer;
    pub use crate::variants::lsh::oracle::lsh;
    pub use crate::variants::nystrom::oracle::{nystrom, pinv};
    pub use crate::variants::performer::oracle::{performer, performer_with};
}

pub use crate::real::Real;

/// Output of [`forward`]: `o` is `[B, Hq, Nq, Dv]` and `lse` is `[B, Hq, Nq]`, row-major.
#[derive(Clone, Debug)]
pub struct Forward<T> {
    pub o: Vec<T>,
    pub lse: Vec<T>,
}

/// Output of [`backward`]: `dq` `[B, Hq, Nq, D]`, `dk` `[B, Hkv, Nk, D]`, `dv` `[B, Hkv, Nk, Dv]`.
#[derive(Clone, Debug)]
pub struct Grads<T> {
    pub dq: Vec<T>,
    pub dk: Vec<T>,
    pub dv: Vec<T>,
    /// Gradient of the score rule's parameters ([`ScoreRule::params`](crate::ScoreRule::params) of them).
    pub d_params: Vec<T>,
    /// $P_{ij}\\, dP_{ij}$ of every pair, `[B, Hq, Nq, Nk]` (P before dropout).
    pub weight_grads: Vec<T>,
}

/// Index into a view broadcast to the full shape: size-1 dimensions are read at 0.
fn bcast<E: Copy>(v: &View<E>, idx: [usize; 4]) -> E {
    let s = v.shape();
    let f = |k: usize| if s[k] == 1 { 0 } else { idx[k] };
    v.at(f(0), f(1), f(2), f(3))
}

struct Oracle<'o, 'a> {
    opts: &'o Options<'a>,
    q: View<'a>,
    k: View<'a>,
    dims: [usize; 8], // b, hq, hkv, nq, nk, d, dv, group
    scale: f64,
}

/// One score with what its derivative needs: the logit after every rule, and
/// $\partial x / \partial(\text{scale}\cdot q\cdot k)$.
struct Logit<T> {
    x: T,
    chain: T,
}

impl<'a> Oracle<'_, 'a> {
    /// Validates through the engine's own checks (the oracle computes nothing else with them).
    fn new<'o>(
        q: View<'a>,
        k: View<'a>,
        v: View<'a>,
        opts: &'o Options<'a>,
    ) -> Result<Oracle<'o, 'a>> {
        let p = Problem::new(q, k, v, opts)?;
        Ok(Oracle {
            opts,
            q,
            k,
            dims: [p.b, p.hq, p.hkv, p.nq, p.nk, p.d, p.dv, p.group],
            scale: p.scale as f64,
        })
    }

    fn visible(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let [_, _, _, nq, nk, ..] = self.dims;
        let (ii, jj) = (i as i64, j as i64);
        let diag = ii + nk as i64 - nq as i64;
        let causal_ok = match self.opts.causal {
            None => true,
            Some(Causal::TopLeft) => jj <= ii,
            Some(Causal::BottomRight) => jj <= diag,
        };
        let window_ok = self.opts.window.is_none_or(|w| {
            (w.left == usize::MAX || jj >= diag - w.left as i64)
                && (w.right == usize::MAX || jj <= diag + w.right as i64)
        });
        let docs_ok = self.opts.docs.is_none_or(|d| {
            let qd = if d.q.len() == nq {
                d.q[i]
            } else {
                d.q[b * nq + i]
            };
            let kd = if d.k.len() == nk {
                d.k[j]
            } else {
                d.k[b * nk + j]
            };
            qd == kd
        });
        let mask_ok = self.opts.mask.is_none_or(|m| bcast(&m, [b, h, i, j]));
        let rule_ok = self
            .opts
            .mask_rule
            .is_none_or(|r| r.visible(Pos { b, h, i, j }));
        let pattern_ok = self
            .opts
            .pattern
            .is_none_or(|p| p.visible_at(nq, nk, Pos { b, h, i, j }));
        let table_ok = self.opts.block_mask.is_none_or(|m| m.visible(b, h, i, j));
        causal_ok && window_ok && docs_ok && mask_ok && rule_ok && pattern_ok && table_ok
    }

    fn logit<T: Real>(&self, b: usize, h: usize, i: usize, j: usize) -> Logit<T> {
        let [_, _, _, nq, nk, d, _, group] = self.dims;
        if !self.visible(b, h, i, j) {
            return Logit {
                x: T::NEG_INF,
                chain: T::ZERO,
            };
        }
        let kh = h / group;
        let mut dot = T::ZERO;
        for c in 0..d {
            dot = dot + T::from_f32(self.q.at(b, h, i, c)) * T::from_f32(self.k.at(b, kh, j, c));
        }
        let mut x = dot * T::from_f64(self.scale);
        let mut chain = T::ONE;
        if let Some(c) = self.opts.softcap {
            let c = T::from_f32(c);
            let t = (x * c.recip()).tanh();
            x = c * t;
            chain = T::ONE - t * t;
        }
        if let Some(slopes) = self.opts.alibi_slopes {
            let dist = (i as i64 + nk as i64 - nq as i64 - j as i64).unsigned_abs();
            x = x - T::from_f32(slopes[h]) * T::from_f64(dist as f64);
        }
        if let Some(bias) = self.opts.bias {
            x = x + T::from_f32(bcast(&bias, [b, h, i, j]));
        }
        if let Some(rule) = self.opts.score_rule.filter(|_| x != T::NEG_INF) {
            let at = Pos { b, h, i, j };
            chain = chain * T::rule_grad(rule, x, at);
            x = T::rule_score(rule, x, at);
        }
        Logit { x, chain }
    }

    /// The weights of row (b, h, i) after softmax (before dropout), its logits' chain factors and
    /// its log-sum-exp. A row with no visible key has zero weights and LSE −∞.
    fn row<T: Real>(&self, b: usize, h: usize, i: usize) -> (Vec<T>, Vec<T>, T) {
        let nk = self.dims[4];
        let logits: Vec<Logit<T>> = (0..nk).map(|j| self.logit(b, h, i, j)).collect();
        softmax_row(&logits)
    }

    /// Dropout factor Z of (b, h, i, j): 0 or 1/(1−p) (1 without dropout).
    fn z<T: Real>(&self, b: usize, h: usize, i: usize, j: usize) -> T {
        match self.opts.dropout.filter(|d| d.p > 0.0) {
            None => T::ONE,
            Some(d) if d.keep(b, h, i, j) => T::from_f64(1.0 / (1.0 - d.p as f64)),
            Some(_) => T::ZERO,
        }
    }
}

/// Attention, naively: for each row the full score vector, softmax, dropout, weighted sum.
pub fn forward<T: Real>(q: View, k: View, v: View, opts: &Options) -> Result<Forward<T>> {
    let or = Oracle::new(q, k, v, opts)?;
    let [b, hq, _, nq, nk, _, dv, group] = or.dims;
    let mut o = vec![T::ZERO; b * hq * nq * dv];
    let mut lse = vec![T::ZERO; b * hq * nq];
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..nq {
                let (p, _, l) = or.row::<T>(bi, h, i);
                let row = ((bi * hq + h) * nq + i) * dv;
                lse[(bi * hq + h) * nq + i] = l;
                for (j, &pj) in p.iter().enumerate().take(nk) {
                    if pj == T::ZERO {
                        // A key the row does not see (or of weight 0): its values never enter,
                        // so a non-finite value there reaches no output.
                        continue;
                    }
                    let w = pj * or.z::<T>(bi, h, i, j);
                    for c in 0..dv {
                        o[row + c] = o[row + c] + w * T::from_f32(v.at(bi, h / group, j, c));
                    }
                }
            }
        }
    }
    Ok(Forward { o, lse })
}

/// The attention weights `[B, Hq, Nq, Nk]` after every rule and mask, before dropout.
pub fn probabilities<T: Real>(q: View, k: View, opts: &Options) -> Result<Vec<T>> {
    let or = Oracle::new(q, k, k, opts)?;
    let [b, hq, _, nq, ..] = or.dims;
    let mut out = Vec::new();
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..nq {
                out.extend(or.row::<T>(bi, h, i).0);
            }
        }
    }
    Ok(out)
}

/// Gradients of $\sum O \circ dO$ with respect to q, k and v, naively:
/// $dP_{ij} = Z_{ij}\\, dO_i\cdot v_j$, $dX_{ij} = P_{ij}(dP_{ij} - \sum_l P_{il} dP_{il})$,
/// then through the score rule and softcap to $ds_{ij}$, and
/// $dq_i = \text{scale}\sum_j ds_{ij} k_j$, $dk_j = \text{scale}\sum_i ds_{ij} q_i$,
/// $dv_j = \sum_i P_{ij} Z_{ij}\\, dO_i$; key/value gradients sum over each query group.
pub fn backward<T: Real>(q: View, k: View, v: View, d_o: View, opts: &Options) -> Result<Grads<T>> {
    backward_impl(q, k, v, d_o, opts, None)
}

/// The same gradients by FlashAttention-2's formulas, naively: the weights are recomputed from a
/// given log-sum-exp, $P_{ij} = e^{x_{ij} - \mathrm{LSE}\_i}$, and $\sum_l P_{il} dP_{il}$ is taken
/// as $D_i = dO_i \cdot O_i$ from a given output. In exact arithmetic this equals [`backward`];
/// in f32 it is the naive baseline of the fused backward kernel, which computes exactly this.
pub fn backward_from_output<T: Real>(
    q: View,
    k: View,
    v: View,
    (o, lse): (&[T], &[T]),
    d_o: View,
    opts: &Options,
) -> Result<Grads<T>> {
    backward_impl(q, k, v, d_o, opts, Some((o, lse)))
}

fn backward_impl<T: Real>(
    q: View,
    k: View,
    v: View,
    d_o: View,
    opts: &Options,
    stats: Option<(&[T], &[T])>,
) -> Result<Grads<T>> {
    let or = Oracle::new(q, k, v, opts)?;
    let [b, hq, hkv, nq, nk, d, dv, group] = or.dims;
    crate::error::expect_shape("d_o", d_o.shape(), [b, hq, nq, dv])?;
    if let Some((o, lse)) = stats {
        crate::error::expect_len("o", o.len(), b * hq * nq * dv)?;
        crate::error::expect_len("lse", lse.len(), b * hq * nq)?;
    }
    let scale = T::from_f64(or.scale);
    let mut dq = vec![T::ZERO; b * hq * nq * d];
    let mut dk = vec![T::ZERO; b * hkv * nk * d];
    let mut dvv = vec![T::ZERO; b * hkv * nk * dv];
    let rule = opts.score_rule;
    let mut d_params = vec![T::ZERO; rule.map_or(0, |r| r.params())];
    let mut weight_grads = vec![T::ZERO; b * hq * nq * nk];
    let f = T::from_f32;
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..nq {
                let row = (bi * hq + h) * nq + i;
                let logits: Vec<Logit<T>> = (0..nk).map(|j| or.logit(bi, h, i, j)).collect();
                let (p, chain) = row_weights(&logits, stats.map(|(_, lse)| lse[row]));
                let dp: Vec<T> = (0..nk)
                    .map(|j| {
                        let mut s = T::ZERO;
                        for c in 0..dv {
                            s = s + f(d_o.at(bi, h, i, c)) * f(v.at(bi, kh, j, c));
                        }
                        s * or.z::<T>(bi, h, i, j)
                    })
                    .collect();
                let o_row = stats.map(|(o, _)| &o[row * dv..(row + 1) * dv]);
                let di = row_delta(&p, &dp, o_row, |c| f(d_o.at(bi, h, i, c)));
                for j in 0..nk {
                    if p[j] == T::ZERO {
                        continue;
                    }
                    weight_grads[row * nk + j] = p[j] * dp[j];
                    let dx = p[j] * (dp[j] - di);
                    if let Some(r) = rule.filter(|r| r.params() > 0) {
                        let at = Pos { b: bi, h, i, j };
                        T::rule_param_grad(r, dx, at, &mut d_params);
                    }
                    let ds = dx * chain[j] * scale;
                    let wz = p[j] * or.z::<T>(bi, h, i, j);
                    for c in 0..d {
                        let qi = row * d + c;
                        let kj = ((bi * hkv + kh) * nk + j) * d + c;
                        dq[qi] = dq[qi] + ds * f(k.at(bi, kh, j, c));
                        dk[kj] = dk[kj] + ds * f(q.at(bi, h, i, c));
                    }
                    for c in 0..dv {
                        let vj = ((bi * hkv + kh) * nk + j) * dv + c;
                        dvv[vj] = dvv[vj] + wz * f(d_o.at(bi, h, i, c));
                    }
                }
            }
        }
    }
    Ok(Grads {
        dq,
        dk,
        dv: dvv,
        d_params,
        weight_grads,
    })
}

/// Output of [`shaw_forward`]: `o` `[B, Hq, Nq, Dv]`, `lse` `[B, Hq, Nq]` and `mass`
/// `[B, Hq, Nq, 2c+1]`, the weight (after dropout) each row puts on each relative-distance bucket.
#[derive(Clone, Debug)]
pub struct ShawForward<T> {
    pub o: Vec<T>,
    pub lse: Vec<T>,
    pub mass: Vec<T>,
}

/// Output of [`shaw_backward`]: the gradients of [`Grads`] (without rule parameters) and those of
/// the two tables, `d_keys` `[2c+1, D]` and `d_values` `[2c+1, Dv]`.
#[derive(Clone, Debug)]
pub struct ShawGrads<T> {
    pub dq: Vec<T>,
    pub dk: Vec<T>,
    pub dv: Vec<T>,
    pub d_keys: Vec<T>,
    pub d_values: Vec<T>,
}

impl Oracle<'_, '_> {
    /// Row (b, h, i) of Shaw attention: logits and each key's bucket. The key term
    /// $\text{scale}\\,q_i\cdot a^K_r$ is added to every visible logit.
    fn shaw_row<T: Real>(
        &self,
        shaw: &Shaw,
        b: usize,
        h: usize,
        i: usize,
    ) -> (Vec<Logit<T>>, Vec<usize>) {
        let [_, _, _, nq, nk, d, ..] = self.dims;
        let c = shaw.clip as i64;
        let buckets: Vec<usize> = (0..nk)
            .map(|j| ((j as i64 - (i + nk) as i64 + nq as i64).clamp(-c, c) + c) as usize)
            .collect();
        let mut logits: Vec<Logit<T>> = (0..nk).map(|j| self.logit(b, h, i, j)).collect();
        for (l, &r) in logits.iter_mut().zip(&buckets) {
            if l.x != T::NEG_INF {
                let mut t = T::ZERO;
                for cc in 0..d {
                    t = t + T::from_f32(self.q.at(b, h, i, cc))
                        * T::from_f32(shaw.keys[r * d + cc]);
                }
                l.x = l.x + T::from_f64(self.scale) * t;
            }
        }
        (logits, buckets)
    }
}

/// The weights and chain factors of a row: by softmax, or recomputed from a given log-sum-exp
/// as FlashAttention-2 does, $P_{ij} = e^{x_{ij} - \mathrm{LSE}\_i}$.
fn row_weights<T: Real>(logits: &[Logit<T>], lse: Option<T>) -> (Vec<T>, Vec<T>) {
    match lse {
        None => {
            let (p, chain, _) = softmax_row(logits);
            (p, chain)
        }
        Some(lse) => logits
            .iter()
            .map(|l| {
                if lse == T::NEG_INF || l.x == T::NEG_INF {
                    (T::ZERO, T::ZERO)
                } else {
                    ((l.x - lse).exp(), l.chain)
                }
            })
            .unzip(),
    }
}

/// $\sum_j P_{ij}\\,dP_{ij}$, or $\sum_c dO_{ic} O_{ic}$ from a given output row `o`.
fn row_delta<T: Real>(p: &[T], dp: &[T], o: Option<&[T]>, d_o: impl Fn(usize) -> T) -> T {
    let mut di = T::ZERO;
    match o {
        // Keys of weight 0 skipped: a non-finite dP of a key the row does not see stays out.
        None => p
            .iter()
            .zip(dp)
            .filter(|(&a, _)| a != T::ZERO)
            .for_each(|(&a, &b)| di = di + a * b),
        Some(o) => o
            .iter()
            .enumerate()
            .for_each(|(c, &x)| di = di + d_o(c) * x),
    }
    di
}

/// Softmax of a row of logits: weights, chain factors, log-sum-exp (zeros and −∞ when all masked).
fn softmax_row<T: Real>(logits: &[Logit<T>]) -> (Vec<T>, Vec<T>, T) {
    let nk = logits.len();
    let mut m = T::NEG_INF;
    for l in logits {
        if l.x > m {
            m = l.x;
        }
    }
    if logits.iter().any(|l| l.x.partial_cmp(&l.x).is_none()) {
        // A NaN score (a non-finite input): the row is NaN, its log-sum-exp and its weight of
        // every key it sees (the keys it does not see, −∞, keep weight 0).
        let nan = T::ZERO * T::NEG_INF;
        let p = logits
            .iter()
            .map(|l| if l.x == T::NEG_INF { T::ZERO } else { nan })
            .collect();
        return (p, logits.iter().map(|l| l.chain).collect(), nan);
    }
    if m == T::NEG_INF {
        return (vec![T::ZERO; nk], vec![T::ZERO; nk], T::NEG_INF);
    }
    let e: Vec<T> = logits.iter().map(|l| (l.x - m).exp()).collect();
    let mut sum = T::ZERO;
    for &x in &e {
        sum = sum + x;
    }
    let inv = sum.recip();
    // Keys the row does not see keep weight 0 even when the sum is not finite (+∞ scores).
    let p = e
        .into_iter()
        .zip(logits)
        .map(|(x, l)| if l.x == T::NEG_INF { T::ZERO } else { x * inv })
        .collect();
    (p, logits.iter().map(|l| l.chain).collect(), m + sum.ln())
}

/// Shaw et al.'s relative positions ([`crate::shaw`]), naively: for each pair, the bucket
/// $r = \mathrm{clip}(j - p_i, -c, c) + c$, the logit plus $\text{scale}\\,q_i\cdot a^K_r$, and
/// $o_i = \sum_j w_{ij}(v_j + a^V_r)$.
pub fn shaw_forward<T: Real>(
    q: View,
    k: View,
    v: View,
    opts: &Options,
    shaw: &Shaw,
) -> Result<ShawForward<T>> {
    let or = Oracle::new(q, k, v, opts)?;
    let [b, hq, _, nq, nk, d, dv, group] = or.dims;
    let nb = shaw.buckets(opts, d, dv)?;
    let mut o = vec![T::ZERO; b * hq * nq * dv];
    let mut lse = vec![T::ZERO; b * hq * nq];
    let mut mass = vec![T::ZERO; b * hq * nq * nb];
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..nq {
                let row = (bi * hq + h) * nq + i;
                let (logits, buckets) = or.shaw_row::<T>(shaw, bi, h, i);
                let (p, _, l) = softmax_row(&logits);
                lse[row] = l;
                for j in 0..nk {
                    let w = p[j] * or.z::<T>(bi, h, i, j);
                    let r = buckets[j];
                    mass[row * nb + r] = mass[row * nb + r] + w;
                    for c in 0..dv {
                        let u = T::from_f32(v.at(bi, h / group, j, c))
                            + T::from_f32(shaw.values[r * dv + c]);
                        o[row * dv + c] = o[row * dv + c] + w * u;
                    }
                }
            }
        }
    }
    Ok(ShawForward { o, lse, mass })
}

/// Gradients of $\sum o\circ dO$ for [`shaw_forward`], by the chain rule on each pair:
/// $dP_{ij} = z_{ij}\\,dO_i\cdot(v_j + a^V_r)$, $dx_{ij} = P_{ij}(dP_{ij} - \sum_l P_{il}dP_{il})$;
/// $dx$ reaches q and k through the content score (times its chain factor) and q and $a^K$
/// through the key term; $dv_j$ and $da^V_r$ both receive $P_{ij}z_{ij}\\,dO_i$.
pub fn shaw_backward<T: Real>(
    q: View,
    k: View,
    v: View,
    d_o: View,
    opts: &Options,
    shaw: &Shaw,
) -> Result<ShawGrads<T>> {
    shaw_backward_impl(q, k, v, d_o, opts, shaw, None)
}

/// The same gradients by FlashAttention-2's formulas, as [`backward_from_output`] computes them:
/// weights from a given log-sum-exp and $\sum_l P_{il} dP_{il}$ as $dO_i\cdot o_i$ from a given
/// output. In f32 this is the naive baseline of the fused Shaw backward.
pub fn shaw_backward_from_output<T: Real>(
    q: View,
    k: View,
    v: View,
    (o, lse): (&[T], &[T]),
    d_o: View,
    opts: &Options,
    shaw: &Shaw,
) -> Result<ShawGrads<T>> {
    shaw_backward_impl(q, k, v, d_o, opts, shaw, Some((o, lse)))
}

fn shaw_backward_impl<T: Real>(
    q: View,
    k: View,
    v: View,
    d_o: View,
    opts: &Options,
    shaw: &Shaw,
    stats: Option<(&[T], &[T])>,
) -> Result<ShawGrads<T>> {
    let or = Oracle::new(q, k, v, opts)?;
    let [b, hq, hkv, nq, nk, d, dv, group] = or.dims;
    let nb = shaw.buckets(opts, d, dv)?;
    crate::error::expect_shape("d_o", d_o.shape(), [b, hq, nq, dv])?;
    if let Some((o, lse)) = stats {
        crate::error::expect_len("o", o.len(), b * hq * nq * dv)?;
        crate::error::expect_len("lse", lse.len(), b * hq * nq)?;
    }
    let f = T::from_f32;
    let scale = T::from_f64(or.scale);
    let mut g = ShawGrads {
        dq: vec![T::ZERO; b * hq * nq * d],
        dk: vec![T::ZERO; b * hkv * nk * d],
        dv: vec![T::ZERO; b * hkv * nk * dv],
        d_keys: vec![T::ZERO; nb * d],
        d_values: vec![T::ZERO; nb * dv],
    };
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            for i in 0..nq {
                let row = (bi * hq + h) * nq + i;
                let (logits, buckets) = or.shaw_row::<T>(shaw, bi, h, i);
                let (p, chain) = row_weights(&logits, stats.map(|(_, lse)| lse[row]));
                let dp: Vec<T> = (0..nk)
                    .map(|j| {
                        let mut s = T::ZERO;
                        for c in 0..dv {
                            let u = f(v.at(bi, kh, j, c)) + f(shaw.values[buckets[j] * dv + c]);
                            s = s + f(d_o.at(bi, h, i, c)) * u;
                        }
                        s * or.z::<T>(bi, h, i, j)
                    })
                    .collect();
                let o_row = stats.map(|(o, _)| &o[row * dv..(row + 1) * dv]);
                let di = row_delta(&p, &dp, o_row, |c| f(d_o.at(bi, h, i, c)));
                for j in 0..nk {
                    if p[j] == T::ZERO {
                        continue;
                    }
                    let r = buckets[j];
                    let dx = p[j] * (dp[j] - di);
                    let ds = dx * chain[j] * scale;
                    for c in 0..d {
                        let (qi, kj) = (row * d + c, ((bi * hkv + kh) * nk + j) * d + c);
                        g.dq[qi] = g.dq[qi]
                            + ds * f(k.at(bi, kh, j, c))
                            + dx * scale * f(shaw.keys[r * d + c]);
                        g.dk[kj] = g.dk[kj] + ds * f(q.at(bi, h, i, c));
                        g.d_keys[r * d + c] =
                            g.d_keys[r * d + c] + dx * scale * f(q.at(bi, h, i, c));
                    }
                    let wz = p[j] * or.z::<T>(bi, h, i, j);
                    for c in 0..dv {
                        let vj = ((bi * hkv + kh) * nk + j) * dv + c;
                        let go = wz * f(d_o.at(bi, h, i, c));
                        g.dv[vj] = g.dv[vj] + go;
                        g.d_values[r * dv + c] = g.d_values[r * dv + c] + go;
                    }
                }
            }
        }
    }
    Ok(g)
}
