//! What a sentence embedding depends on: every layer's attention and its gradient-weighted
//! form $A \odot \partial y/\partial A$ for a chosen scalar `y` of the embeddings, the input of
//! gradient-weighted relevance (Chefer et al., 2021; `attentive_viz::relevance`).
//!
//! `y` is one dimension of a sentence's embedding, or the cosine similarity of two sentences'
//! embeddings, $y = e_1\cdot e_2 / (\lVert e_1\rVert\\,\lVert e_2\rVert)$, each as the model
//! outputs it (pooled, and normalised where the model normalises).

use crate::error::{ModelError, Result};
use crate::SentenceEncoder;

/// The scalar to explain.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Dimension `d` of one sentence's embedding.
    Dimension(usize),
    /// The cosine similarity of two sentences' embeddings.
    Similarity,
}

impl Target {
    /// In words, for a caption.
    pub fn describe(&self) -> String {
        match self {
            Target::Dimension(d) => format!("embedding dimension {d}"),
            Target::Similarity => "the cosine similarity of the two sentences".into(),
        }
    }
}

/// One sentence's part of an [`Explanation`], its padding removed.
#[derive(Clone, Debug)]
pub struct Explained {
    /// The tokenizer's strings of its `n` tokens, special tokens included.
    pub tokens: Vec<String>,
    /// Per layer, attention probabilities `[heads, n, n]`.
    pub attentions: Vec<Vec<f32>>,
    /// Per layer, $A \odot \partial y/\partial A$, `[heads, n, n]`.
    pub weight_grads: Vec<Vec<f32>>,
}

/// [`SentenceEncoder::explain`]'s result.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub target: Target,
    /// `y` itself.
    pub value: f32,
    /// Each sentence, in the order given.
    pub sentences: Vec<Explained>,
}

impl SentenceEncoder {
    /// Every layer's gradient-weighted attention for `target`: one text for
    /// [`Target::Dimension`], two for [`Target::Similarity`].
    ///
    /// # Errors
    /// [`ModelError::Input`] for the wrong number of texts or a dimension past
    /// [`SentenceEncoder::dim`]; the model's own errors.
    pub fn explain(&self, texts: &[&str], target: Target) -> Result<Explanation> {
        let want = match target {
            Target::Dimension(d) if d >= self.dim() => {
                return Err(ModelError::Input(format!(
                    "dimension {d} is past the embedding's {}",
                    self.dim()
                )))
            }
            Target::Dimension(_) => 1,
            Target::Similarity => 2,
        };
        if texts.len() != want {
            return Err(ModelError::Input(format!(
                "{} needs {want} text(s), got {}",
                target.describe(),
                texts.len()
            )));
        }
        let batch = self.tokenize(texts)?;
        let (n, mask) = (batch.n, &batch.mask);
        let pooling = &self.pooling;
        let seed = |hidden: &[f32]| -> Result<(f32, Vec<f32>)> {
            let e: Vec<Vec<f64>> = (0..want)
                .map(|s| pooling.embed_rows(hidden, mask, n, s))
                .collect();
            let (value, d_embed) = match target {
                Target::Dimension(d) => {
                    let mut g = vec![0.0; e[0].len()];
                    g[d] = 1.0;
                    (e[0][d], vec![g])
                }
                Target::Similarity => cosine_grads(&e[0], &e[1]),
            };
            let mut d_hidden = vec![0.0f32; hidden.len()];
            for (s, d) in d_embed.iter().enumerate() {
                pooling.backward_rows(hidden, mask, n, s, d, &mut d_hidden);
            }
            Ok((value as f32, d_hidden))
        };
        let out = self
            .bert
            .weight_grads(&batch.ids, mask, Some(&batch.types), n, seed)?;
        let heads = self.bert.config.num_attention_heads;
        let sentences = (0..want)
            .map(|s| {
                let real: Vec<usize> = (0..n).filter(|&i| mask[s * n + i]).collect();
                // Sentence s's [heads, m, m] block of a layer's [B, heads, N, N].
                let trim = |full: &Vec<f32>| -> Vec<f32> {
                    let mut v = Vec::with_capacity(heads * real.len() * real.len());
                    for h in 0..heads {
                        for &i in &real {
                            let row = ((s * heads + h) * n + i) * n;
                            v.extend(real.iter().map(|&j| full[row + j]));
                        }
                    }
                    v
                };
                Explained {
                    tokens: self.token_strings(&batch.rows[s]),
                    attentions: out.attentions.iter().map(trim).collect(),
                    weight_grads: out.weight_grads.iter().map(trim).collect(),
                }
            })
            .collect();
        Ok(Explanation {
            target,
            value: out.value,
            sentences,
        })
    }
}

/// $y = \cos(a, b)$ and its gradients:
/// $\partial y/\partial a = b/(\lVert a\rVert\lVert b\rVert) - y\\,a/\lVert a\rVert^2$, and
/// likewise for $b$.
fn cosine_grads(a: &[f64], b: &[f64]) -> (f64, Vec<Vec<f64>>) {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let (na, nb) = (
        a.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12),
        b.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12),
    );
    let y = dot / (na * nb);
    let grad = |u: &[f64], v: &[f64], nu: f64, nv: f64| -> Vec<f64> {
        u.iter()
            .zip(v)
            .map(|(u, v)| v / (nu * nv) - y * u / (nu * nu))
            .collect()
    };
    (y, vec![grad(a, b, na, nb), grad(b, a, nb, na)])
}
