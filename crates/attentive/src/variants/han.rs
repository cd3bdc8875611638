//! Hierarchical attention (Yang et al., 2016): attention pooling with a learned context vector,
//! over the words of each sentence and then over the sentences of a document,
//! $$u_t = \tanh(W h_t + b),\qquad \alpha_t = \mathrm{softmax}\_t\\,(u_t\cdot c),\qquad s = \sum_t \alpha_t h_t,$$
//! with `W [A, D]`, `b [A]` and the context `c [A]` learned per level. The softmax is per row,
//! over the visible positions only (the popular package never applies its softmax; the tutorial
//! code subtracts a global max, so a row far below it underflows to 0/0): a row with no visible
//! position pools to 0. [`pool`] is one level; [`document`] is the two, words then sentences (a
//! sentence with no word is hidden at the sentence level). The paper's bidirectional GRUs
//! between the levels are not attention and are left to the model around this.

use crate::error::{AttnError, Result};
use crate::real::Real;

/// One level's weights: `W [A, D]`, `b [A]`, context `c [A]`.
#[derive(Clone, Copy, Debug)]
pub struct Level<'a> {
    pub w: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
}

/// A level's weights' gradients, shaped as the weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LevelGrads {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
}

impl Level<'_> {
    fn check(&self, d: usize) -> Result<usize> {
        let a = self.c.len();
        if a == 0 {
            return Err(AttnError::LengthMismatch {
                tensor: "c",
                expected: 1,
                got: 0,
            });
        }
        crate::error::expect_len("w", self.w.len(), a * d)?;
        crate::error::expect_len("b", self.b.len(), a)?;
        for (name, x) in [("w", self.w), ("b", self.b), ("c", self.c)] {
            if let Some(&bad) = x.iter().find(|x| !x.is_finite()) {
                return Err(AttnError::InvalidOption {
                    option: name,
                    value: bad as f64,
                    reason: "weights must be finite",
                });
            }
        }
        Ok(a)
    }
}

/// What a level computes for each group: the pooled vector and the weights.
struct Pooled {
    s: Vec<f32>,
    alpha: Vec<f32>,
    /// tanh(W h_t + b) of every position, `n × A`.
    u: Vec<f32>,
}

/// Pools one group of `n` rows `h` (`n × d`) under `mask`.
fn pool_group(level: &Level, h: &[f32], d: usize, mask: Option<&[bool]>) -> Pooled {
    let (a, n) = (level.c.len(), h.len() / d);
    let mut u = vec![0.0f32; n * a];
    let mut score = vec![f32::NEG_INFINITY; n];
    for t in 0..n {
        if mask.is_some_and(|m| !m[t]) {
            continue;
        }
        let ht = &h[t * d..(t + 1) * d];
        for r in 0..a {
            u[t * a + r] = (super::dot(&level.w[r * d..(r + 1) * d], ht) + level.b[r]).tanh();
        }
        score[t] = super::dot(&u[t * a..(t + 1) * a], level.c);
    }
    let m = score.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut alpha = vec![0.0f32; n];
    let mut s = vec![0.0f32; d];
    if m > f32::NEG_INFINITY {
        let z: f32 = score.iter().map(|&x| (x - m).exp()).sum();
        for t in 0..n {
            alpha[t] = (score[t] - m).exp() / z;
            super::axpy(&mut s, alpha[t], &h[t * d..(t + 1) * d]);
        }
    }
    Pooled { s, alpha, u }
}

/// Attention pooling of `groups` groups of `n` rows each (`h`: `groups × n × d`, row-major) with
/// `mask` (`groups × n`, `true` = a real position): the pooled vectors (`groups × d`) and the
/// weights (`groups × n`).
///
/// ```
/// use attentive::variants::han::{pool, Level};
/// // A context that prefers the first feature: the first row gets more weight.
/// let h = [1.0f32, 0.0, 0.0, 1.0];
/// let level = Level { w: &[1.0, 0.0], b: &[0.0], c: &[2.0] };
/// let (s, alpha) = pool(&h, (1, 2, 2), None, &level).unwrap();
/// assert!(alpha[0] > alpha[1] && (alpha[0] + alpha[1] - 1.0).abs() < 1e-6);
/// assert!((s[0] - alpha[0]).abs() < 1e-6);
/// ```
///
/// # Errors
/// `h` or `mask` not of the stated sizes, an empty dimension, weights of the wrong size or not
/// finite.
pub fn pool(
    h: &[f32],
    (groups, n, d): (usize, usize, usize),
    mask: Option<&[bool]>,
    level: &Level,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_sizes(h, (groups, n, d), mask)?;
    level.check(d)?;
    let mut s = Vec::with_capacity(groups * d);
    let mut alpha = Vec::with_capacity(groups * n);
    for g in 0..groups {
        let p = pool_group(
            level,
            &h[g * n * d..(g + 1) * n * d],
            d,
            mask.map(|m| &m[g * n..(g + 1) * n]),
        );
        s.extend(p.s);
        alpha.extend(p.alpha);
    }
    Ok((s, alpha))
}

fn check_sizes(
    h: &[f32],
    (groups, n, d): (usize, usize, usize),
    mask: Option<&[bool]>,
) -> Result<()> {
    if let Some(dim) = [groups, n, d].iter().position(|&x| x == 0) {
        return Err(AttnError::EmptyDimension {
            tensor: "h",
            dim,
            shape: vec![groups, n, d],
        });
    }
    crate::error::expect_len("h", h.len(), groups * n * d)?;
    if let Some(m) = mask {
        crate::error::expect_len("mask", m.len(), groups * n)?;
    }
    Ok(())
}

/// The gradients of [`pool`] given `ds` (`groups × d`): `dh` and the level's weights'.
///
/// With $g_t = \partial L/\partial(u_t\cdot c) = \alpha_t\\,ds\cdot(h_t - s)$:
/// $dh_t = \alpha_t\\,ds + W^\top\big(g_t\\,c \odot (1 - u_t^2)\big)$, $dc = \sum_t g_t u_t$,
/// $dW = \sum_t (g_t c \odot (1 - u_t^2)) h_t^\top$, $db = \sum_t g_t c \odot (1 - u_t^2)$.
///
/// # Errors
/// As [`pool`], and `ds` of the wrong length.
pub fn pool_backward(
    h: &[f32],
    (groups, n, d): (usize, usize, usize),
    mask: Option<&[bool]>,
    level: &Level,
    ds: &[f32],
) -> Result<(Vec<f32>, LevelGrads)> {
    check_sizes(h, (groups, n, d), mask)?;
    let a = level.check(d)?;
    crate::error::expect_len("ds", ds.len(), groups * d)?;
    let mut dh = vec![0.0f32; h.len()];
    let mut grads = LevelGrads {
        w: vec![0.0; a * d],
        b: vec![0.0; a],
        c: vec![0.0; a],
    };
    for g in 0..groups {
        let hg = &h[g * n * d..(g + 1) * n * d];
        let p = pool_group(level, hg, d, mask.map(|m| &m[g * n..(g + 1) * n]));
        let dsg = &ds[g * d..(g + 1) * d];
        let ds_s = super::dot(dsg, &p.s);
        for t in 0..n {
            let at = p.alpha[t];
            if at == 0.0 {
                continue;
            }
            let ht = &hg[t * d..(t + 1) * d];
            let dht = &mut dh[(g * n + t) * d..(g * n + t + 1) * d];
            super::axpy(dht, at, dsg);
            let gt = at * (super::dot(dsg, ht) - ds_s);
            let ut = &p.u[t * a..(t + 1) * a];
            super::axpy(&mut grads.c, gt, ut);
            for (r, (&ur, &cr)) in ut.iter().zip(level.c).enumerate() {
                let e = gt * cr * (1.0 - ur * ur);
                grads.b[r] += e;
                super::axpy(dht, e, &level.w[r * d..(r + 1) * d]);
                super::axpy(&mut grads.w[r * d..(r + 1) * d], e, ht);
            }
        }
    }
    Ok((dh, grads))
}

/// Document vectors from word states `h` (`docs × sentences × words × d`) and their mask: each
/// sentence pooled over its words, then each document over its sentences (a sentence with no
/// visible word hidden). Returns the documents (`docs × d`), the sentence vectors
/// (`docs × sentences × d`) and the two levels' weights.
///
/// # Errors
/// As [`pool`] at either level.
#[allow(clippy::type_complexity)]
pub fn document(
    h: &[f32],
    (docs, sentences, words, d): (usize, usize, usize, usize),
    mask: Option<&[bool]>,
    (word, sentence): (&Level, &Level),
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (sv, word_alpha) = pool(h, (docs * sentences, words, d), mask, word)?;
    let smask = sentence_mask(mask, docs * sentences, words);
    let (doc, sent_alpha) = pool(&sv, (docs, sentences, d), smask.as_deref(), sentence)?;
    Ok((doc, sv, word_alpha, sent_alpha))
}

/// The gradients of [`document`] given `d_doc` (`docs × d`): `dh` and both levels' weights'.
///
/// # Errors
/// As [`document`], and `d_doc` of the wrong length.
pub fn document_backward(
    h: &[f32],
    (docs, sentences, words, d): (usize, usize, usize, usize),
    mask: Option<&[bool]>,
    (word, sentence): (&Level, &Level),
    d_doc: &[f32],
) -> Result<(Vec<f32>, LevelGrads, LevelGrads)> {
    let (sv, _) = pool(h, (docs * sentences, words, d), mask, word)?;
    let smask = sentence_mask(mask, docs * sentences, words);
    let (dsv, sg) = pool_backward(&sv, (docs, sentences, d), smask.as_deref(), sentence, d_doc)?;
    let (dh, wg) = pool_backward(h, (docs * sentences, words, d), mask, word, &dsv)?;
    Ok((dh, wg, sg))
}

/// A sentence is visible when one of its words is.
fn sentence_mask(mask: Option<&[bool]>, groups: usize, words: usize) -> Option<Vec<bool>> {
    mask.map(|m| {
        (0..groups)
            .map(|g| m[g * words..(g + 1) * words].iter().any(|&x| x))
            .collect()
    })
}

/// The oracle of one level, term by term, and its gradients given `ds`. Generic over the float
/// type: `f64` is the oracle, `f32` the naive baseline.
pub mod oracle {
    use super::*;

    /// `(s, alpha, dh, dW, db, dc)`, row-major.
    pub type Out<T> = (Vec<T>, Vec<T>, Vec<T>, Vec<T>, Vec<T>, Vec<T>);

    /// # Errors
    /// As [`pool`].
    #[allow(clippy::needless_range_loop)] // term by term, as the definition reads
    pub fn han_pool<T: Real>(
        h: &[f32],
        (groups, n, d): (usize, usize, usize),
        mask: Option<&[bool]>,
        level: &Level,
        ds: &[f32],
    ) -> Result<Out<T>> {
        check_sizes(h, (groups, n, d), mask)?;
        let a = level.check(d)?;
        let f = T::from_f32;
        let (mut s, mut alpha, mut dh) = (
            vec![T::ZERO; groups * d],
            vec![T::ZERO; groups * n],
            vec![T::ZERO; h.len()],
        );
        let (mut dw, mut db, mut dc) = (vec![T::ZERO; a * d], vec![T::ZERO; a], vec![T::ZERO; a]);
        for g in 0..groups {
            let vis = |t: usize| mask.is_none_or(|m| m[g * n + t]);
            let hv = |t: usize, c: usize| f(h[(g * n + t) * d + c]);
            let u: Vec<Vec<T>> = (0..n)
                .map(|t| {
                    (0..a)
                        .map(|r| {
                            ((0..d).fold(T::ZERO, |x, c| x + f(level.w[r * d + c]) * hv(t, c))
                                + f(level.b[r]))
                            .tanh()
                        })
                        .collect()
                })
                .collect();
            let e: Vec<T> = (0..n)
                .map(|t| (0..a).fold(T::ZERO, |x, r| x + u[t][r] * f(level.c[r])))
                .collect();
            let m = (0..n)
                .filter(|&t| vis(t))
                .map(|t| e[t])
                .fold(T::NEG_INF, |x, y| if y > x { y } else { x });
            if m == T::NEG_INF {
                continue;
            }
            let z = (0..n)
                .filter(|&t| vis(t))
                .fold(T::ZERO, |x, t| x + (e[t] - m).exp());
            for t in 0..n {
                if vis(t) {
                    alpha[g * n + t] = (e[t] - m).exp() * z.recip();
                }
            }
            for c in 0..d {
                s[g * d + c] = (0..n).fold(T::ZERO, |x, t| x + alpha[g * n + t] * hv(t, c));
            }
            let dsv = |c: usize| f(ds[g * d + c]);
            let ds_s = (0..d).fold(T::ZERO, |x, c| x + dsv(c) * s[g * d + c]);
            for t in 0..n {
                let at = alpha[g * n + t];
                if !vis(t) {
                    continue;
                }
                let gt = at * ((0..d).fold(T::ZERO, |x, c| x + dsv(c) * hv(t, c)) - ds_s);
                for c in 0..d {
                    dh[(g * n + t) * d + c] = dh[(g * n + t) * d + c] + at * dsv(c);
                }
                for r in 0..a {
                    dc[r] = dc[r] + gt * u[t][r];
                    let e = gt * f(level.c[r]) * (T::ONE - u[t][r] * u[t][r]);
                    db[r] = db[r] + e;
                    for c in 0..d {
                        dh[(g * n + t) * d + c] =
                            dh[(g * n + t) * d + c] + e * f(level.w[r * d + c]);
                        dw[r * d + c] = dw[r * d + c] + e * hv(t, c);
                    }
                }
            }
        }
        Ok((s, alpha, dh, dw, db, dc))
    }
}
