//! Gradient-weighted relevance (Chefer, Gur & Wolf, ICCV 2021, the rules without LRP): which
//! input tokens a chosen output `y` depends on, following attention weighted by its gradient.
//!
//! Per layer the heads' gradient-weighted maps are fused, keeping the positive part:
//! $$\bar A_\ell = \mathrm{mean}\_h \big(\nabla A^h_\ell \odot A^h_\ell\big)^+,
//!   \qquad \nabla A = \partial y/\partial A,$$
//! ($\nabla A \odot A$ is $P \circ dP$, which attentive's backward forms tile by tile:
//! [`attentive::backward_weighted`]).
//!
//! **Self-attention:** $R_0 = I$, $R_\ell = R_{\ell-1} + \bar A_\ell R_{\ell-1}$; row $i$ of $R_L$
//! says how relevant each input token is to position $i$'s output. The identity is what the
//! residual connections carry; the views show $R_L - I$, what attention added.
//!
//! **Encoder–decoder** (input tokens $i$, output tokens $t$): the encoder's $R^{ii}$ as above;
//! in the decoder, from $R^{tt} = I$, $R^{ti} = 0$, each self-attention layer adds
//! $\bar A R^{tt}$ to $R^{tt}$ and $\bar A R^{ti}$ to $R^{ti}$, and each cross-attention layer adds
//! $(\bar R^{tt})^\top \bar A\\,\bar R^{ii}$ to $R^{ti}$, with
//! $\bar R = \mathrm{rownorm}(R - I) + I$ (a row of $R - I$ that is all zero stays zero).
//! This is the paper's rule set (its equations 10 and 11): its $R^{tt}$ update from a
//! cross-attention layer, $\bar A R^{it}$, is zero here because the encoder never attends to
//! the decoder. The released code's variant, which adds the identity and renormalises before
//! multiplying, is not what this computes.

use crate::error::{Result, VizError};

/// Gradient-weighted attention $\nabla A \odot A$ of one attention module, row-major
/// `[layers, heads, Nq, Nk]`. Values may be negative; they must be finite.
///
/// ```
/// use attentive_viz::relevance::{relevance, Weighted};
/// // One layer, one head, two tokens: Ā = [[0, .5], [0, 0]] (the negative part is dropped).
/// let w = Weighted::new(vec![-1.0, 0.5, 0.0, 0.0], [1, 1, 2, 2]).unwrap();
/// let r = relevance(&w).unwrap();
/// assert_eq!(r[0], [1.0, 0.5, 0.0, 1.0]); // I + Ā·I
/// ```
#[derive(Clone, Debug)]
pub struct Weighted {
    data: Vec<f32>,
    shape: [usize; 4],
}

impl Weighted {
    /// # Errors
    /// [`VizError::Shape`] for a zero dimension or data of another length;
    /// [`VizError::Weight`] for a value that is NaN or infinite.
    pub fn new(data: Vec<f32>, shape: [usize; 4]) -> Result<Self> {
        let shape_err = |reason: String| VizError::Shape { shape, reason };
        if shape.contains(&0) {
            return Err(shape_err("every dimension must be at least 1".into()));
        }
        let len = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if len != Some(data.len()) {
            return Err(shape_err(format!("{} values do not fill it", data.len())));
        }
        let [_, h, nq, nk] = shape;
        if let Some(at) = data.iter().position(|x| !x.is_finite()) {
            return Err(VizError::Weight {
                layer: at / (h * nq * nk),
                head: at / (nq * nk) % h,
                row: at / nk % nq,
                col: at % nk,
                value: data[at],
            });
        }
        Ok(Self { data, shape })
    }

    /// `[layers, heads, Nq, Nk]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// $\bar A_\ell = \mathrm{mean}\_h (\nabla A \odot A)^+$, `Nq × Nk`.
    pub fn fused(&self, l: usize) -> Vec<f32> {
        let [_, heads, nq, nk] = self.shape;
        let mut out = vec![0.0f32; nq * nk];
        for h in 0..heads {
            let at = (l * heads + h) * nq * nk;
            for (o, &x) in out.iter_mut().zip(&self.data[at..at + nq * nk]) {
                *o += x.max(0.0);
            }
        }
        out.iter_mut().for_each(|o| *o /= heads as f32);
        out
    }
}

/// $R_\ell$ after every layer $\ell = 1 \dots L$ of self-attention, each `n × n` row-major.
///
/// # Errors
/// [`VizError::NotSelfAttention`] when queries and keys differ in number.
pub fn relevance(w: &Weighted) -> Result<Vec<Vec<f32>>> {
    let [layers, _, nq, nk] = w.shape;
    if nq != nk {
        return Err(VizError::NotSelfAttention {
            method: "self-attention relevance",
        });
    }
    let n = nq;
    let mut r = identity(n);
    let mut out = Vec::with_capacity(layers);
    for l in 0..layers {
        // R ← R + Ā·R
        let step = product(&w.fused(l), &r, (n, n, n));
        r.iter_mut().zip(&step).for_each(|(x, y)| *x += y);
        out.push(r.clone());
    }
    Ok(out)
}

/// The three relevance maps of an encoder–decoder model.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderDecoder {
    /// $R^{ii}$, `Ni × Ni`: the encoder's self-attention relevance.
    pub encoder: Vec<f32>,
    /// $R^{tt}$, `Nt × Nt`: the decoder's.
    pub decoder: Vec<f32>,
    /// $R^{ti}$, `Nt × Ni`: how relevant each input token is to each output token.
    pub cross: Vec<f32>,
}

/// The encoder–decoder rules: `encoder` `[Le, H, Ni, Ni]`, `decoder` `[Ld, H, Nt, Nt]` and
/// `cross` `[Ld, H, Nt, Ni]`; decoder layer ℓ is its self-attention then its cross-attention.
///
/// # Errors
/// [`VizError::Shape`] when the three disagree on the token counts or the decoder's layers.
pub fn relevance_encoder_decoder(
    encoder: &Weighted,
    decoder: &Weighted,
    cross: &Weighted,
) -> Result<EncoderDecoder> {
    let [_, _, ni, _] = encoder.shape;
    let [ld, _, nt, _] = decoder.shape;
    let [lc, _, ct, ci] = cross.shape;
    if lc != ld || ct != nt || ci != ni {
        return Err(VizError::Shape {
            shape: cross.shape,
            reason: format!(
                "cross-attention must be [{ld}, heads, {nt}, {ni}] for a decoder of {ld} layers over {nt} tokens and {ni} input tokens"
            ),
        });
    }
    let r_ii = relevance(encoder)?
        .pop()
        .expect("a Weighted has at least one layer");
    let mut r_tt = identity(nt);
    let mut r_ti = vec![0.0f32; nt * ni];
    let ii_bar = residual_normalised(&r_ii, ni);
    for l in 0..ld {
        let a = decoder.fused(l);
        let add_tt = product(&a, &r_tt, (nt, nt, nt));
        let add_ti = product(&a, &r_ti, (nt, nt, ni));
        r_tt.iter_mut().zip(&add_tt).for_each(|(x, y)| *x += y);
        r_ti.iter_mut().zip(&add_ti).for_each(|(x, y)| *x += y);
        // R^{ti} += (R̄^{tt})ᵀ · Ā · R̄^{ii}
        let tt_bar = residual_normalised(&r_tt, nt);
        let tt_bar_t: Vec<f32> = (0..nt * nt)
            .map(|x| tt_bar[(x % nt) * nt + x / nt])
            .collect();
        let a_ii = product(&cross.fused(l), &ii_bar, (nt, ni, ni));
        let add = product(&tt_bar_t, &a_ii, (nt, nt, ni));
        r_ti.iter_mut().zip(&add).for_each(|(x, y)| *x += y);
    }
    Ok(EncoderDecoder {
        encoder: r_ii,
        decoder: r_tt,
        cross: r_ti,
    })
}

/// $\bar R = \mathrm{rownorm}(R - I) + I$; a zero row of $R - I$ stays zero.
pub fn residual_normalised(r: &[f32], n: usize) -> Vec<f32> {
    let mut out = r.to_vec();
    for (i, row) in out.chunks_exact_mut(n).enumerate() {
        row[i] -= 1.0;
        let s: f32 = row.iter().sum();
        if s > 0.0 {
            row.iter_mut().for_each(|x| *x /= s);
        }
        row[i] += 1.0;
    }
    out
}

fn identity(n: usize) -> Vec<f32> {
    let mut r = vec![0.0f32; n * n];
    (0..n).for_each(|i| r[i * n + i] = 1.0);
    r
}

/// `a · b` for row-major `a` (`m × k`) and `b` (`k × n`), on the engine's product.
fn product(a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    attentive::matmul(a, b, None, (m, k, n), &mut c).expect("operands of the stated sizes");
    c
}
