//! What each head does, in numbers (Clark et al. 2019, "What does BERT look at?"): for every
//! layer and head, means over its query rows of
//!
//! - the entropy of the row, $-\sum_j a_{ij} \ln a_{ij}$ in nats (0 for a head that looks at one
//!   token, $\ln N_k$ for one that looks everywhere alike);
//! - the attention distance $\sum_j a_{ij}\\,|i - j|$ (self-attention only);
//! - the share of attention to special tokens (`[CLS]`, `[SEP]`, …) and to punctuation;
//! - the weight on the previous, the same and the next token (self-attention only);
//! - the largest weight of the row.

use crate::maps::Maps;

/// One head's statistics; see the module documentation.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadStats {
    pub layer: usize,
    pub head: usize,
    pub entropy: f64,
    /// `None` for cross-attention.
    pub distance: Option<f64>,
    pub special: f64,
    pub punctuation: f64,
    /// `[previous, same, next]`; `None` for cross-attention.
    pub neighbours: Option<[f64; 3]>,
    pub max: f64,
}

/// Whether a token is a tokenizer's special token: `[CLS]`, `[SEP]`, `<s>`, `</s>`, `<pad>`, …
pub fn is_special(token: &str) -> bool {
    let t = token.trim();
    t.len() > 2
        && ((t.starts_with('[') && t.ends_with(']')) || (t.starts_with('<') && t.ends_with('>')))
}

/// Whether a token is punctuation alone (after a sub-word marker such as `##` or `Ġ`).
pub fn is_punctuation(token: &str) -> bool {
    let t = token
        .trim_start_matches("##")
        .trim_start_matches('Ġ')
        .trim_start_matches('▁');
    !t.is_empty()
        && t.chars()
            .all(|c| !c.is_alphanumeric() && !c.is_whitespace())
        && !is_special(token)
}

/// One head's sums over the rows seen so far: rows may come all at once ([`head_stats`]) or
/// block by block ([`crate::stream::Streamed`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Acc {
    entropy: f64,
    distance: f64,
    special: f64,
    punctuation: f64,
    neighbours: [f64; 3],
    max: f64,
    rows: usize,
}

impl Acc {
    /// Adds query row `i` (its weights over the keys).
    pub fn add(&mut self, i: usize, row: &[f32], special: &[bool], punct: &[bool]) {
        let mut row_max = 0.0f64;
        for (j, &a) in row.iter().enumerate() {
            let a = a as f64;
            if a > 0.0 {
                self.entropy -= a * a.ln();
            }
            self.distance += a * (i as f64 - j as f64).abs();
            if special[j] {
                self.special += a;
            }
            if punct[j] {
                self.punctuation += a;
            }
            row_max = row_max.max(a);
        }
        self.max += row_max;
        for (k, slot) in self.neighbours.iter_mut().enumerate() {
            if let Some(j) = (i + k).checked_sub(1).filter(|&j| j < row.len()) {
                *slot += row[j] as f64;
            }
        }
        self.rows += 1;
    }

    /// The means, for head `head` of layer `layer`.
    pub fn finish(&self, layer: usize, head: usize, self_attention: bool) -> HeadStats {
        let count = self.rows.max(1) as f64;
        HeadStats {
            layer,
            head,
            entropy: self.entropy / count,
            distance: self_attention.then_some(self.distance / count),
            special: self.special / count,
            punctuation: self.punctuation / count,
            neighbours: self_attention.then_some(self.neighbours.map(|x| x / count)),
            max: self.max / count,
        }
    }
}

/// Which key tokens are special and which are punctuation.
pub(crate) fn token_classes(tokens: &[String]) -> (Vec<bool>, Vec<bool>) {
    (
        tokens.iter().map(|t| is_special(t)).collect(),
        tokens.iter().map(|t| is_punctuation(t)).collect(),
    )
}

/// Every head's statistics, layer by layer, over the query rows where `rows` is true (all rows
/// when `None`: pass the padding mask to leave padded queries out).
///
/// ```
/// use attentive_viz::{stats::head_stats, Maps};
/// let tokens: Vec<String> = ["[CLS]", "a", "."].map(String::from).to_vec();
/// // Every query looks at the previous token (the first at itself).
/// let prev = vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
/// let s = &head_stats(&Maps::self_attention(prev, [1, 1, 3], tokens).unwrap(), None)[0];
/// assert_eq!(s.entropy, 0.0);
/// assert_eq!(s.neighbours, Some([2.0 / 3.0, 1.0 / 3.0, 0.0]));
/// assert_eq!(s.special, 2.0 / 3.0);
/// ```
pub fn head_stats(maps: &Maps, rows: Option<&[bool]>) -> Vec<HeadStats> {
    let [layers, heads, nq, nk] = maps.shape();
    let (special, punct) = token_classes(maps.k_tokens());
    let used: Vec<usize> = (0..nq)
        .filter(|&i| rows.is_none_or(|r| r.get(i) == Some(&true)))
        .collect();
    let mut out = Vec::with_capacity(layers * heads);
    for layer in 0..layers {
        for head in 0..heads {
            let m = maps.map(layer, head);
            let mut acc = Acc::default();
            for &i in &used {
                acc.add(i, &m[i * nk..][..nk], &special, &punct);
            }
            out.push(acc.finish(layer, head, maps.is_self_attention()));
        }
    }
    out
}
