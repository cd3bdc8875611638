//! Which rows of the sequence each rank holds.
//!
//! **Plain** (non-causal attention): the rows cut into `P` contiguous blocks, rank `r` holding
//! rows $[\lfloor rN/P\rfloor, \lfloor (r+1)N/P\rfloor)$. **Zigzag** (causal attention): the rows
//! cut into `2P` chunks, chunk `c` being $[\lfloor cN/2P\rfloor, \lfloor (c+1)N/2P\rfloor)$, rank
//! `r` holding chunks `r` and `2P − 1 − r`, in that order. Under a causal mask a late chunk
//! sees more keys than an early one; pairing them gives every rank the same work at every step.
//!
//! When `N` is not a multiple of `P` (or `2P`) the blocks differ by at most one row: no padding.
//! A rank may hold no rows at all when `N < 2P`.

use std::ops::Range;

/// How a sequence is cut between ranks (see the [module](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Plain,
    Zigzag,
}

/// The rows of a sequence of `n` rows that each of `ranks` ranks holds.
///
/// ```
/// use attentive_dist::{Layout, Split};
/// let l = Layout { n: 10, ranks: 2, split: Split::Zigzag };
/// // Four chunks of 2 or 3 rows: rank 0 holds the first and the last, rank 1 the middle two.
/// assert_eq!(l.chunks(0), [0..2, 7..10]);
/// assert_eq!(l.chunks(1), [2..5, 5..7]);
/// assert_eq!(l.rows(0), 5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub n: usize,
    pub ranks: usize,
    pub split: Split,
}

impl Layout {
    fn parts(&self) -> usize {
        match self.split {
            Split::Plain => self.ranks,
            Split::Zigzag => 2 * self.ranks,
        }
    }

    /// The first row of chunk `c` (of [`parts`](Self::parts)).
    fn bound(&self, c: usize) -> usize {
        (c as u128 * self.n as u128 / self.parts() as u128) as usize
    }

    fn chunk(&self, c: usize) -> Range<usize> {
        self.bound(c)..self.bound(c + 1)
    }

    /// The global rows rank `rank` holds, in the order it stores them: one range (plain) or
    /// two (zigzag: chunk `rank`, then chunk `2P − 1 − rank`).
    pub fn chunks(&self, rank: usize) -> Vec<Range<usize>> {
        match self.split {
            Split::Plain => vec![self.chunk(rank)],
            Split::Zigzag => vec![self.chunk(rank), self.chunk(2 * self.ranks - 1 - rank)],
        }
    }

    /// How many rows rank `rank` holds.
    pub fn rows(&self, rank: usize) -> usize {
        self.chunks(rank).iter().map(ExactSizeIterator::len).sum()
    }

    /// How many of rank `rank`'s rows come from its first chunk.
    pub fn first(&self, rank: usize) -> usize {
        self.chunk(rank).len()
    }
}
