//! The block mask: a mask rule evaluated once per tile into an empty / full / partial table.
//!
//! The kernels work on tiles of `BR` queries × `BC` keys. For each tile the table records
//! whether no pair is visible (the tile is never visited), every pair is (the kernel runs with
//! no per-element test), or some are (the tile keeps one 64-bit word per query row, bit `c` for
//! key `j0 + c`, and the kernel masks with those bits). A rule is asked once per tile: built-in
//! [`Pattern`]s classify most tiles in O(1) and compute partial rows from their formula; a user's
//! closure is evaluated on every pair once, while the table is built. After that, attention with
//! a closure costs what it costs with the equivalent built-in rule.
//!
//! Rules that may read the batch or head (user rules) get one table per (batch, head); built-in
//! patterns, which depend on positions only, share one table.
//!
//! ```
//! use attentive::{forward, BlockMask, Options, Pattern, Pos, View, ViewMut};
//! let (n, d) = (300, 16);
//! let x: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.01).sin()).collect();
//! let q = View::contiguous(&x, &[1, 1, n, d]).unwrap();
//! // A user's rule: each query sees the keys of its own block of 100 positions.
//! let blocks = BlockMask::new(&Pattern::rule(|p: Pos| p.i / 100 == p.j / 100), 1, 1, n, n).unwrap();
//! let counts = blocks.counts();
//! assert_eq!(counts.empty + counts.full + counts.partial, 5 * 5);
//! let mut o = vec![0.0; n * d];
//! let opts = Options::new().block_mask(&blocks);
//! forward(q, q, q, &opts, &mut ViewMut::contiguous(&mut o, [1, 1, n, d]).unwrap(), None).unwrap();
//! ```

use crate::error::{AttnError, Result};
use crate::masks::pattern::{ones, Compiled, Cover, Pattern};
use crate::rule::MaskRule;
use crate::tile::{BC, BR};
use rayon::prelude::*;

/// One non-empty tile: its index along the other axis, and where its row bits are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub tile: u32,
    part: u32,
}

/// Marks an [`Entry`] whose tile is fully visible.
const FULL: u32 = u32::MAX;

/// What the kernel needs of one tile.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Block<'m> {
    Full,
    /// One word per query row of the tile (row `i % BR`), bit `c` for key `j0 + c`.
    Partial(&'m [u64]),
}

impl Block<'_> {
    /// Visibility bits of query `i` in this tile; `None` when every key is visible.
    #[inline]
    pub fn row(&self, i: usize) -> Option<u64> {
        match self {
            Block::Full => None,
            Block::Partial(bits) => Some(bits[i % BR]),
        }
    }
}

/// How many tiles of each kind a [`BlockMask`] holds, over all its tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCounts {
    pub empty: usize,
    pub full: usize,
    pub partial: usize,
}

/// A mask rule tabulated per tile; see the [module documentation](self).
///
/// Pass it with [`Options::block_mask`](crate::Options::block_mask) to reuse one table across
/// calls (forward and backward, every layer): [`Options::pattern`](crate::Options::pattern) and
/// [`Options::mask_rule`](crate::Options::mask_rule) build it anew on each call.
#[derive(Clone, Debug)]
pub struct BlockMask {
    nq: usize,
    nk: usize,
    /// 1 (shared) or the batch size.
    batches: usize,
    /// 1 (shared) or the query-head count.
    heads: usize,
    qtiles: usize,
    ktiles: usize,
    row_ptr: Vec<usize>,
    row_ent: Vec<Entry>,
    col_ptr: Vec<usize>,
    col_ent: Vec<Entry>,
    bits: Vec<u64>,
}

impl BlockMask {
    /// Tabulates `pattern` for `batch × heads` problems of `nq` queries and `nk` keys.
    pub fn new(
        pattern: &Pattern,
        batch: usize,
        heads: usize,
        nq: usize,
        nk: usize,
    ) -> Result<Self> {
        pattern.validate()?;
        Self::check_dims([batch, heads, nq, nk])?;
        Self::build(&Compiled::new(pattern, nk), batch, heads, nq, nk)
    }

    /// Tabulates a user rule (called with raw indices), one table per batch and head.
    pub fn from_rule(
        rule: &dyn MaskRule,
        batch: usize,
        heads: usize,
        nq: usize,
        nk: usize,
    ) -> Result<Self> {
        Self::check_dims([batch, heads, nq, nk])?;
        Self::build(&Compiled::User(rule), batch, heads, nq, nk)
    }

    fn check_dims(shape: [usize; 4]) -> Result<()> {
        match shape.iter().position(|&n| n == 0) {
            Some(dim) => Err(AttnError::EmptyDimension {
                tensor: "block_mask",
                dim,
                shape: shape.to_vec(),
            }),
            None => Ok(()),
        }
    }

    /// Tabulates `rule`. The table's size depends on the rule (a causal mask has one partial
    /// tile per row of tiles, a strided one a partial tile nearly everywhere), so it is bounded
    /// first from the tiles' covers and refused with [`AttnError::OutOfMemory`] when that
    /// passes the memory available ([`crate::available_memory`]).
    pub(crate) fn build(
        rule: &Compiled,
        batch: usize,
        heads: usize,
        nq: usize,
        nk: usize,
    ) -> Result<Self> {
        let (batches, heads) = if rule.uses_batch_head() {
            (batch, heads)
        } else {
            (1, 1)
        };
        let (qtiles, ktiles) = (nq.div_ceil(BR), nk.div_ceil(BC));
        let off = nk as i64 - nq as i64;
        // The row and column pointers, then the entries and bits as they are made.
        let tables = batches * heads;
        let pointers = tables.saturating_mul(qtiles + ktiles + 2);
        crate::check_memory("block mask", pointers, 2 * std::mem::size_of::<usize>())?;
        // A first pass over the tiles' covers alone (no bits) bounds the table's size: every
        // non-empty tile an entry in each direction, every mixed one BR words of bits.
        let bytes: u128 = (0..tables * qtiles)
            .into_par_iter()
            .map(|task| {
                let i0 = (task % qtiles) * BR;
                let rows = BR.min(nq - i0);
                let ps = (i0 as i64 + off, (i0 + rows) as i64 + off);
                let mut bytes = 0u128;
                for kt in 0..ktiles {
                    let j0 = kt * BC;
                    let w = BC.min(nk - j0);
                    bytes += match rule.cover(ps, (j0 as i64, (j0 + w) as i64)) {
                        Cover::Empty => 0,
                        Cover::Full => 2 * std::mem::size_of::<Entry>() as u128,
                        Cover::Mixed => (2 * std::mem::size_of::<Entry>() + 8 * BR) as u128,
                    };
                }
                bytes
            })
            .sum();
        crate::check_memory(
            "block mask",
            usize::try_from(bytes).unwrap_or(usize::MAX),
            1,
        )?;
        // One row of tiles per task: its non-empty tiles (index, full?) and the bits of its
        // partial ones.
        type TileRow = (Vec<(u32, bool)>, Vec<u64>);
        let rows: Vec<TileRow> = (0..tables * qtiles)
            .into_par_iter()
            .map(|task| {
                let (t, qt) = (task / qtiles, task % qtiles);
                let (b, h) = (t / heads, t % heads);
                let i0 = qt * BR;
                let rows = BR.min(nq - i0);
                let ps = (i0 as i64 + off, (i0 + rows) as i64 + off);
                let (mut tiles, mut bits) = (Vec::new(), Vec::new());
                let mut words = [0u64; BR];
                for kt in 0..ktiles {
                    let j0 = kt * BC;
                    let w = BC.min(nk - j0);
                    match rule.cover(ps, (j0 as i64, (j0 + w) as i64)) {
                        Cover::Empty => {}
                        Cover::Full => tiles.push((kt as u32, true)),
                        Cover::Mixed => {
                            let (mut any, mut all) = (0u64, u64::MAX);
                            for (r, word) in words[..rows].iter_mut().enumerate() {
                                let i = i0 + r;
                                *word = rule.row((b, h, i), i as i64 + off, j0, w);
                                any |= *word;
                                all &= *word;
                            }
                            if all == ones(w as u32) {
                                tiles.push((kt as u32, true));
                            } else if any != 0 {
                                tiles.push((kt as u32, false));
                                bits.extend_from_slice(&words[..rows]);
                                bits.resize(bits.len() + BR - rows, 0);
                            }
                        }
                    }
                }
                (tiles, bits)
            })
            .collect();
        let mut row_ptr = Vec::with_capacity(rows.len() + 1);
        let mut row_ent = Vec::new();
        let mut bits = Vec::new();
        row_ptr.push(0);
        for (tiles, words) in rows {
            let mut part = (bits.len() / BR) as u32;
            for (kt, full) in tiles {
                row_ent.push(Entry {
                    tile: kt,
                    part: if full {
                        FULL
                    } else {
                        part += 1;
                        part - 1
                    },
                });
            }
            bits.extend_from_slice(&words);
            row_ptr.push(row_ent.len());
        }
        // The transpose: per (table, key tile), the query tiles that see it, in order.
        let mut count = vec![0usize; tables * ktiles + 1];
        for t in 0..tables {
            for qt in 0..qtiles {
                let r = t * qtiles + qt;
                for e in &row_ent[row_ptr[r]..row_ptr[r + 1]] {
                    count[t * ktiles + e.tile as usize + 1] += 1;
                }
            }
        }
        for x in 1..count.len() {
            count[x] += count[x - 1];
        }
        let col_ptr = count.clone();
        let mut col_ent = vec![Entry { tile: 0, part: 0 }; row_ent.len()];
        for t in 0..tables {
            for qt in 0..qtiles {
                let r = t * qtiles + qt;
                for e in &row_ent[row_ptr[r]..row_ptr[r + 1]] {
                    let c = t * ktiles + e.tile as usize;
                    col_ent[count[c]] = Entry {
                        tile: qt as u32,
                        part: e.part,
                    };
                    count[c] += 1;
                }
            }
        }
        Ok(Self {
            nq,
            nk,
            batches,
            heads,
            qtiles,
            ktiles,
            row_ptr,
            row_ent,
            col_ptr,
            col_ent,
            bits,
        })
    }

    /// Checks that the table fits a problem of `b × hq` heads, `nq` queries and `nk` keys.
    pub(crate) fn check(&self, b: usize, hq: usize, nq: usize, nk: usize) -> Result<()> {
        let fits = |n: usize, of: usize| n == 1 || n == of;
        if self.nq != nq || self.nk != nk || !fits(self.batches, b) || !fits(self.heads, hq) {
            return Err(AttnError::ShapeMismatch {
                tensor: "block_mask",
                expected: vec![b, hq, nq, nk],
                got: vec![self.batches, self.heads, self.nq, self.nk],
            });
        }
        Ok(())
    }

    /// Whether one table serves every batch entry and head.
    pub(crate) fn shared(&self) -> bool {
        self.batches == 1 && self.heads == 1
    }

    fn table(&self, b: usize, h: usize) -> usize {
        (if self.batches == 1 { 0 } else { b }) * self.heads + if self.heads == 1 { 0 } else { h }
    }

    /// Non-empty key tiles of query tile `qt`, in key order.
    pub(crate) fn row_tiles(&self, b: usize, h: usize, qt: usize) -> &[Entry] {
        let r = self.table(b, h) * self.qtiles + qt;
        &self.row_ent[self.row_ptr[r]..self.row_ptr[r + 1]]
    }

    /// Query tiles that see key tile `kt`, in query order.
    pub(crate) fn col_tiles(&self, b: usize, h: usize, kt: usize) -> &[Entry] {
        let c = self.table(b, h) * self.ktiles + kt;
        &self.col_ent[self.col_ptr[c]..self.col_ptr[c + 1]]
    }

    pub(crate) fn block(&self, e: Entry) -> Block<'_> {
        if e.part == FULL {
            Block::Full
        } else {
            let at = e.part as usize * BR;
            Block::Partial(&self.bits[at..at + BR])
        }
    }

    /// The tile of query tile `qt` and key tile `kt`; `None` when it is empty.
    pub(crate) fn find(&self, b: usize, h: usize, qt: usize, kt: usize) -> Option<Block<'_>> {
        let row = self.row_tiles(b, h, qt);
        row.binary_search_by_key(&(kt as u32), |e| e.tile)
            .ok()
            .map(|n| self.block(row[n]))
    }

    /// Whether query `i` sees key `j` in batch `b`, head `h`, according to the table.
    pub fn visible(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        match self.find(b, h, i / BR, j / BC) {
            None => false,
            Some(blk) => blk.row(i).is_none_or(|w| w >> (j % BC) & 1 == 1),
        }
    }

    /// Tiles of each kind over all tables.
    pub fn counts(&self) -> BlockCounts {
        let partial = self.bits.len() / BR;
        let nonempty = self.row_ent.len();
        BlockCounts {
            empty: self.batches * self.heads * self.qtiles * self.ktiles - nonempty,
            full: nonempty - partial,
            partial,
        }
    }
}
