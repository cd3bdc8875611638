//! The encoder's backward pass, for gradient-weighted relevance (Chefer et al., 2021): for a
//! scalar $y$ of the last layer's token states, every layer's $A \odot \partial y/\partial A$,
//! where $A$ are its attention probabilities.
//!
//! The forward keeps each layer's activations; the backward then runs the layers in reverse:
//! LayerNorm, the feed-forward and its activation, the output projection, and attention through
//! the engine's [`attentive::backward_weighted`], which forms $P\circ dP$ tile by tile as it
//! computes dQ, dK and dV. It stops at the first layer's input: the embeddings need no
//! gradient. Memory is the activations of every layer plus two `B·heads·N²` maps per layer
//! (the probabilities and their weighted gradients), which the caller asked for.

use super::{engine, Act, Bert, LayerNorm, Linear};
use crate::error::{ModelError, Result};
use attentive::{View, ViewMut};

/// What [`Bert::weight_grads`] returns for `B` sequences of `N` tokens.
pub struct WeightGrads {
    /// The last layer's token states, `[B·N, hidden]`.
    pub hidden: Vec<f32>,
    /// The target's value, as the seed computed it.
    pub value: f32,
    /// Per layer, the attention probabilities `[B, heads, N, N]`.
    pub attentions: Vec<Vec<f32>>,
    /// Per layer, $A \odot \partial y/\partial A$, `[B, heads, N, N]` (0 at padding keys).
    pub weight_grads: Vec<Vec<f32>>,
}

/// One layer's activations, kept for its backward.
struct Saved {
    qkv: Vec<f32>, // [rows, 3H]
    a: Vec<f32>,   // [rows, H]   attention's output
    lse: Vec<f32>, // [B, heads, N]
    z1: Vec<f32>,  // [rows, H]   x + a·Woᵀ + bo, the first LayerNorm's input
    pre: Vec<f32>, // [rows, I]   the up-projection before the activation
    z2: Vec<f32>,  // [rows, H]   x1 + down-projection, the second LayerNorm's input
}

impl Linear {
    /// `dx = dy·W` (`[rows, out]` → `[rows, in]`): the gradient of the input of `y = x·Wᵀ + b`.
    fn backward(&self, dy: &[f32], rows: usize, dx: &mut [f32]) -> Result<()> {
        let w = self.w.get_or_init(|| self.wt.transpose());
        w.matmul(dy, None, rows, dx).map_err(engine)
    }
}

impl LayerNorm {
    /// The gradient of LayerNorm's input `z` from that of its output, row by row, in f64:
    /// with $\hat z = (z-\mu)/\sigma$ and $g = \gamma \odot dy$,
    /// $dz = \big(g - \bar g - \hat z\\,\overline{g \hat z}\big)/\sigma$.
    fn backward(&self, z: &[f32], dy: &[f32]) -> Vec<f32> {
        let d = self.gamma.len();
        let mut dz = vec![0.0f32; z.len()];
        for ((z, dy), dz) in z
            .chunks_exact(d)
            .zip(dy.chunks_exact(d))
            .zip(dz.chunks_exact_mut(d))
        {
            let mean = z.iter().map(|&x| x as f64).sum::<f64>() / d as f64;
            let var = z.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let sigma = (var + self.eps as f64).sqrt();
            let zh = |c: usize| (z[c] as f64 - mean) / sigma;
            let g = |c: usize| self.gamma[c] as f64 * dy[c] as f64;
            let g_mean = (0..d).map(g).sum::<f64>() / d as f64;
            let gz_mean = (0..d).map(|c| g(c) * zh(c)).sum::<f64>() / d as f64;
            for (c, out) in dz.iter_mut().enumerate() {
                *out = ((g(c) - g_mean - zh(c) * gz_mean) / sigma) as f32;
            }
        }
        dz
    }
}

impl Act {
    /// `du ← du·act′(pre)`.
    fn backward(self, pre: &[f32], du: &mut [f32]) {
        use std::f64::consts::{FRAC_1_SQRT_2, PI};
        for (g, &x) in du.iter_mut().zip(pre) {
            let x = x as f64;
            let slope = match self {
                // d/dx x·Φ(x) = Φ(x) + x·φ(x)
                Act::GeluErf => {
                    0.5 * (1.0 + libm::erf(x * FRAC_1_SQRT_2))
                        + x * (-0.5 * x * x).exp() / (2.0 * PI).sqrt()
                }
                Act::GeluTanh => {
                    let c = (2.0 / PI).sqrt();
                    let t = (c * (x + 0.044_715 * x * x * x)).tanh();
                    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044_715 * x * x)
                }
                Act::Relu => (x > 0.0) as u8 as f64,
            };
            *g = (*g as f64 * slope) as f32;
        }
    }
}

impl Bert {
    /// Runs the encoder as [`Bert::forward`] does, then, for the scalar `y` that `seed`
    /// computes from the last token states (`[B·N, hidden]` → `(y, ∂y/∂states)`), every
    /// layer's gradient-weighted attention $A \odot \partial y / \partial A$.
    ///
    /// # Errors
    /// As [`Bert::forward`]; [`ModelError::Input`] when the seed's gradient is not `B·N·hidden`
    /// long; the seed's own errors.
    pub fn weight_grads(
        &self,
        ids: &[u32],
        mask: &[bool],
        types: Option<&[u32]>,
        n: usize,
        seed: impl FnOnce(&[f32]) -> Result<(f32, Vec<f32>)>,
    ) -> Result<WeightGrads> {
        let types = self.check_input(ids, mask, types, n)?;
        let c = &self.config;
        let (b, h, heads) = (ids.len() / n, c.hidden_size, c.num_attention_heads);
        let (dh, rows) = (h / heads, ids.len());
        let ff = c.intermediate_size;
        let mut x = vec![0.0f32; rows * h]; //                                  [B·N, H]
        self.embed(ids, &types, n, &mut x)?;
        let head_view = [b, heads, n, dh];
        let (qkv_strides, out_strides) = ([n * 3 * h, dh, 3 * h, 1], [n * h, dh, h, 1]);
        let mask_view = View::new(mask, [b, 1, 1, n], [n, 0, 0, 1]).map_err(engine)?;
        let opts = attentive::Options::new().mask(mask_view);
        // Q, K and V as [B, heads, N, dh] views of [B·N, 3H] rows.
        fn split(
            qkv: &[f32],
            h: usize,
            shape: [usize; 4],
            st: [usize; 4],
        ) -> Result<[View<'_>; 3]> {
            let v = |part: usize| View::new(&qkv[part * h..], shape, st).map_err(engine);
            Ok([v(0)?, v(1)?, v(2)?])
        }
        let add = |y: &mut [f32], x: &[f32]| y.iter_mut().zip(x).for_each(|(y, x)| *y += x);

        let mut saved = Vec::with_capacity(self.layers.len());
        let mut attentions = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let mut qkv = vec![0.0f32; rows * 3 * h]; //                        [B·N, 3H]
            layer.qkv.forward(&x, rows, &mut qkv, |_, _| Ok(()))?;
            let [q, k, v] = split(&qkv, h, head_view, qkv_strides)?;
            attentions.push(attentive::probabilities(q, k, &opts).map_err(engine)?);
            let (mut a, mut lse) = (vec![0.0f32; rows * h], vec![0.0f32; b * heads * n]);
            let mut out = ViewMut::new(&mut a, head_view, out_strides).map_err(engine)?;
            attentive::forward(q, k, v, &opts, &mut out, Some(&mut lse)).map_err(engine)?;
            let mut z1 = vec![0.0f32; rows * h]; //                             [B·N, H]
            layer.o.forward(&a, rows, &mut z1, |_, _| Ok(()))?;
            add(&mut z1, &x);
            let mut x1 = z1.clone();
            layer.ln1.forward(&mut x1, None)?;
            let mut pre = vec![0.0f32; rows * ff]; //                           [B·N, I]
            layer.up.forward(&x1, rows, &mut pre, |_, _| Ok(()))?;
            let mut u = pre.clone();
            self.act.apply(&mut u);
            let mut z2 = vec![0.0f32; rows * h]; //                             [B·N, H]
            layer.down.forward(&u, rows, &mut z2, |_, _| Ok(()))?;
            add(&mut z2, &x1);
            x.copy_from_slice(&z2);
            layer.ln2.forward(&mut x, None)?;
            saved.push(Saved {
                qkv,
                a,
                lse,
                z1,
                pre,
                z2,
            });
        }

        let (value, mut g) = seed(&x)?; //                                      [B·N, H]
        if g.len() != rows * h {
            return Err(ModelError::Input(format!(
                "the target's gradient has {} elements, not the {} of the token states",
                g.len(),
                rows * h
            )));
        }
        let mut weight_grads = vec![Vec::new(); self.layers.len()];
        for (l, (layer, s)) in self.layers.iter().zip(&saved).enumerate().rev() {
            // x2 = LN2(z2), z2 = act(pre)·Wdᵀ + bd + x1, pre = x1·Wuᵀ + bu
            let dz2 = layer.ln2.backward(&s.z2, &g); //                         [B·N, H]
            let mut du = vec![0.0f32; rows * ff]; //                            [B·N, I]
            layer.down.backward(&dz2, rows, &mut du)?;
            self.act.backward(&s.pre, &mut du);
            let mut dx1 = vec![0.0f32; rows * h]; //                            [B·N, H]
            layer.up.backward(&du, rows, &mut dx1)?;
            add(&mut dx1, &dz2);
            // x1 = LN1(z1), z1 = a·Woᵀ + bo + x
            let dz1 = layer.ln1.backward(&s.z1, &dx1); //                       [B·N, H]
            let mut da = vec![0.0f32; rows * h]; //                             [B·N, H]
            layer.o.backward(&dz1, rows, &mut da)?;
            // a = attention(q, k, v)
            let [q, k, v] = split(&s.qkv, h, head_view, qkv_strides)?;
            let o = View::new(&s.a, head_view, out_strides).map_err(engine)?;
            let d_o = View::new(&da, head_view, out_strides).map_err(engine)?;
            let mut d = [0, 1, 2].map(|_| vec![0.0f32; rows * h]); //      3 × [B·N, H]
            let mut pdp = vec![0.0f32; b * heads * n * n]; //                   [B, heads, N, N]
            {
                let [dq, dk, dv] = &mut d;
                let mut dq = ViewMut::new(dq, head_view, out_strides).map_err(engine)?;
                let mut dk = ViewMut::new(dk, head_view, out_strides).map_err(engine)?;
                let mut dv = ViewMut::new(dv, head_view, out_strides).map_err(engine)?;
                attentive::backward_weighted(
                    q, k, v, o, &s.lse, d_o, &opts, &mut dq, &mut dk, &mut dv, &mut pdp,
                )
                .map_err(engine)?;
            }
            weight_grads[l] = pdp;
            if l == 0 {
                break;
            }
            // qkv = x·Wqkvᵀ + b: dx = [dq dk dv]·Wqkv, then the residual's dz1.
            let mut dqkv = vec![0.0f32; rows * 3 * h]; //                       [B·N, 3H]
            for (r, row) in dqkv.chunks_exact_mut(3 * h).enumerate() {
                for (part, src) in d.iter().enumerate() {
                    row[part * h..][..h].copy_from_slice(&src[r * h..][..h]);
                }
            }
            let mut dx = vec![0.0f32; rows * h]; //                             [B·N, H]
            layer.qkv.backward(&dqkv, rows, &mut dx)?;
            add(&mut dx, &dz1);
            g = dx;
        }
        Ok(WeightGrads {
            hidden: x,
            value,
            attentions,
            weight_grads,
        })
    }
}
