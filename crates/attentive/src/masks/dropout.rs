//! Attention dropout that needs no stored mask.
//!
//! Whether the weight of pair `(b, h, i, j)` is kept is a pure function of
//! `(seed, b, h, i, j)`: a counter-based generator (SplitMix64's finaliser applied to a key
//! derived from the row and the key index). The backward pass regenerates exactly the forward's
//! decisions, and the result does not depend on tiling or thread count.
//!
//! Kept weights are scaled by $1/(1-p)$, so $\mathbb{E}[\text{out}] $ equals the undropped output.

/// SplitMix64's finaliser: a bijective mix of 64 bits.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Dropout on the attention weights with probability `p` of dropping, reproducible from `seed`.
///
/// ```
/// # use attentive::Dropout;
/// let d = Dropout { p: 0.25, seed: 7 };
/// let kept = (0..10_000).filter(|&j| d.keep(0, 0, 3, j)).count();
/// assert!((kept as f64 / 10_000.0 - 0.75).abs() < 0.02);
/// assert_eq!(d.keep(1, 2, 3, 4), d.keep(1, 2, 3, 4));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of dropping a weight, in `[0, 1)`.
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    /// Key of query row `(b, h, i)`; combine with [`Dropout::keep_in_row`] for each key `j`.
    #[inline]
    pub fn row_key(&self, b: usize, h: usize, i: usize) -> u64 {
        let mut z = mix(self.seed.wrapping_add(GOLDEN));
        z = mix(z ^ (b as u64).wrapping_mul(GOLDEN));
        z = mix(z ^ (h as u64).wrapping_add(GOLDEN));
        mix(z ^ (i as u64).wrapping_mul(0xd6e8_feb8_6659_fd93))
    }

    /// Drop threshold on 24 random bits: a pair is kept when its bits are at least this.
    #[inline]
    pub(crate) fn threshold(&self) -> u64 {
        (self.p as f64 * (1u64 << 24) as f64).round() as u64
    }

    /// Whether key `j` is kept in the row whose key is `row_key`, given `threshold()`.
    #[inline(always)]
    pub(crate) fn keep_bits(row_key: u64, j: usize, threshold: u64) -> bool {
        (mix(row_key.wrapping_add((j as u64 + 1).wrapping_mul(GOLDEN))) >> 40) >= threshold
    }

    /// Whether the weight of query `i` on key `j` in batch `b`, head `h` survives dropout.
    pub fn keep(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        Self::keep_bits(self.row_key(b, h, i), j, self.threshold())
    }

    /// Whether key `j` survives in a row whose key came from [`Dropout::row_key`].
    pub fn keep_in_row(&self, row_key: u64, j: usize) -> bool {
        Self::keep_bits(row_key, j, self.threshold())
    }

    /// The factor kept weights are multiplied by, $1/(1-p)$.
    pub fn keep_scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}
