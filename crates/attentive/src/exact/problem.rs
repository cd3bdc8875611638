//! One validated attention problem: shapes, options, and the per-row rules the kernels apply.
//!
//! Everything a kernel needs to know about masks and score modifiers is answered here, so the
//! forward, backward and decode kernels share one implementation of each rule.

use crate::error::{expect_shape, AttnError, Result};
use crate::masks::blocks::{Block, BlockMask, Entry};
use crate::masks::dropout::Dropout;
use crate::masks::pattern::{ones, Compiled};
use crate::options::{Causal, DocIds, Options, Pos, ScoreRule, Window};
use crate::simd::{Isa, Kernels};
use crate::tile::{BC, BR};
use crate::view::{View, ViewMut};
use half::f16;
use std::borrow::Cow;

/// K and V stored as f16.
#[derive(Clone, Copy)]
pub(crate) struct HalfKv<'a> {
    pub k: View<'a, f16>,
    pub v: View<'a, f16>,
}

/// The part of a key tile one query row may see: columns `[a, b)` after causal, window, range and
/// block-mask limits. `exact` is false when some column inside the span is masked: by `bits`
/// (bit `c` for column `c`) or by a per-element rule (documents, dense mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub a: usize,
    pub b: usize,
    pub exact: bool,
    pub bits: u64,
}

impl Span {
    pub const EMPTY: Span = Span {
        a: 0,
        b: 0,
        exact: true,
        bits: 0,
    };
    pub fn is_empty(&self) -> bool {
        self.a >= self.b
    }
}

/// A key-padding mask as bits: bit `j % 64` of word `b·words + j / 64` for key `j` of batch `b`.
pub(crate) struct KeyBits {
    words: usize,
    bits: Vec<u64>,
}

impl KeyBits {
    /// From a mask broadcast to `[B, Hq, Nq, Nk]` whose head and query strides are 0.
    fn new(m: &View<bool>) -> Self {
        let [b, _, _, nk] = m.shape();
        let words = nk.div_ceil(64);
        let mut bits = vec![0u64; b * words];
        for bi in 0..b {
            for j in 0..nk {
                if m.data()[m.offset(bi, 0, 0, j)] {
                    bits[bi * words + j / 64] |= 1 << (j % 64);
                }
            }
        }
        Self { words, bits }
    }

    /// The bits of the key tile `j0..j0 + w` of batch `b`, key `j0` in bit 0. Tiles start at
    /// multiples of [`BC`] = 64 keys, so a tile is one word.
    fn get(&self, b: usize, j0: usize, w: usize) -> u64 {
        debug_assert!(j0.is_multiple_of(64) && w <= 64);
        self.bits[b * self.words + j0 / 64] & ones(w as u32)
    }
}

const _: () = assert!(BC == 64, "KeyBits::get reads one 64-bit word per key tile");

/// Document ids of the keys in one tile, summarised so a row can be classified in O(1).
pub(crate) struct TileDocs {
    min: u32,
    max: u32,
    uniform: bool,
}

/// The keys `p − k·stride` (`k ≥ k_min`, key index `≥ key_lo`) of a strided pattern that a
/// query at position `p` sees beyond its band.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClassSteps {
    pub stride: usize,
    pub k_min: usize,
    pub key_lo: usize,
}

pub(crate) struct Problem<'a> {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    /// Query heads per key/value head.
    pub group: usize,
    pub nq: usize,
    pub nk: usize,
    pub d: usize,
    pub dv: usize,
    /// `Nk − Nq`: the bottom-right alignment offset.
    pub off: i64,
    pub scale: f32,
    pub q: View<'a>,
    pub k: View<'a>,
    pub v: View<'a>,
    causal: Option<Causal>,
    window: Option<Window>,
    /// Keys with `lo ≤ j − (i + Nk − Nq) ≤ hi` only: the bands a caller inside the crate
    /// splits one call into (Shaw's relative positions).
    band: Option<(i64, i64)>,
    /// Walk the batch inside each head ([`Problem::heads_outer`]).
    pub heads_outer: bool,
    /// Keys a strided pattern adds beyond the rest of the problem's rule (set by its residue
    /// plan, [`Problem::with_class_keys`]).
    pub class_keys: Option<ClassSteps>,
    /// K and V when stored as f16 ([`Problem::with_half_kv`]); `k` and `v` then carry only
    /// their shapes.
    pub half_kv: Option<HalfKv<'a>>,
    softcap: Option<f32>,
    alibi: Option<&'a [f32]>,
    /// A dense mask that varies with more than the key (and batch).
    mask: Option<View<'a, bool>>,
    /// A mask that varies only with batch and key (a key-padding mask, `[B, 1, 1, Nk]`), as one
    /// bit per key: it joins each span's bits like a block-mask row, so its tiles keep the
    /// fast paths and no element is tested one by one.
    key_bits: Option<KeyBits>,
    bias: Option<View<'a>>,
    docs: Option<DocIds<'a>>,
    /// The pattern, user mask rule or prebuilt table, tabulated per tile.
    blocks: Option<Cow<'a, BlockMask>>,
    score_rule: Option<&'a dyn ScoreRule>,
    pub dropout: Option<Dropout>,
    pub kern: &'static Kernels,
    /// The forward's products run on AMX tiles ([`Isa::Amx`]) where K and V are packed.
    pub amx: bool,
}

fn nonempty(tensor: &'static str, shape: [usize; 4]) -> Result<()> {
    match shape.iter().position(|&n| n == 0) {
        Some(dim) => Err(AttnError::EmptyDimension {
            tensor,
            dim,
            shape: shape.to_vec(),
        }),
        None => Ok(()),
    }
}

fn positive_finite(option: &'static str, x: f32) -> Result<()> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(AttnError::InvalidOption {
            option,
            value: x as f64,
            reason: "must be finite and positive",
        })
    }
}

impl<'a> Problem<'a> {
    pub fn new(q: View<'a>, k: View<'a>, v: View<'a>, opts: &Options<'a>) -> Result<Self> {
        nonempty("q", q.shape())?;
        nonempty("k", k.shape())?;
        nonempty("v", v.shape())?;
        let [b, hq, nq, d] = q.shape();
        let [_, hkv, nk, _] = k.shape();
        let dv = v.shape()[3];
        expect_shape("k", k.shape(), [b, hkv, nk, d])?;
        expect_shape("v", v.shape(), [b, hkv, nk, dv])?;
        if hq % hkv != 0 {
            return Err(AttnError::HeadsNotDivisible {
                q_heads: hq,
                kv_heads: hkv,
            });
        }
        let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
        positive_finite("scale", scale)?;
        if let Some(c) = opts.softcap {
            positive_finite("softcap", c)?;
        }
        if let Some(s) = opts.alibi_slopes {
            if s.len() != hq {
                return Err(AttnError::LengthMismatch {
                    tensor: "alibi_slopes",
                    expected: hq,
                    got: s.len(),
                });
            }
            if let Some(&x) = s.iter().find(|x| !x.is_finite()) {
                return Err(AttnError::InvalidOption {
                    option: "alibi_slopes",
                    value: x as f64,
                    reason: "slopes must be finite",
                });
            }
        }
        let target = [b, hq, nq, nk];
        let mut mask = opts
            .mask
            .map(|m| m.broadcast_to("mask", target))
            .transpose()?;
        let key_bits = match mask {
            Some(m) if m.strides()[1] == 0 && m.strides()[2] == 0 => {
                mask = None;
                Some(KeyBits::new(&m))
            }
            _ => None,
        };
        let bias = opts
            .bias
            .map(|m| m.broadcast_to("bias", target))
            .transpose()?;
        if let Some(docs) = opts.docs {
            for (tensor, len, n) in [("docs.q", docs.q.len(), nq), ("docs.k", docs.k.len(), nk)] {
                if len != n && len != b * n {
                    return Err(AttnError::LengthMismatch {
                        tensor,
                        expected: b * n,
                        got: len,
                    });
                }
            }
        }
        if let Some(dr) = opts.dropout {
            if !(dr.p.is_finite() && (0.0..1.0).contains(&dr.p)) {
                return Err(AttnError::InvalidOption {
                    option: "dropout",
                    value: dr.p as f64,
                    reason: "must be in [0, 1)",
                });
            }
        }
        if let Some(r) = opts.score_rule {
            r.check([b, hq, nq, nk])?;
        }
        let blocks = match (opts.block_mask, opts.pattern, opts.mask_rule) {
            (Some(m), None, None) => {
                m.check(b, hq, nq, nk)?;
                Some(Cow::Borrowed(m))
            }
            (Some(_), _, _) => {
                return Err(AttnError::ConflictingOptions {
                    a: "block_mask",
                    b: if opts.pattern.is_some() {
                        "pattern"
                    } else {
                        "mask_rule"
                    },
                    reason: "a block mask replaces the pattern and mask rule it was built from",
                })
            }
            (None, None, None) => None,
            (None, pattern, rule) => {
                let mut parts = Vec::new();
                if let Some(pat) = pattern {
                    pat.validate()?;
                    parts.push(Compiled::new(pat, nk));
                }
                if let Some(r) = rule {
                    parts.push(Compiled::User(r));
                }
                let rule = if parts.len() == 1 {
                    parts.pop().expect("one part")
                } else {
                    Compiled::All(parts)
                };
                Some(Cow::Owned(BlockMask::build(&rule, b, hq, nq, nk)?))
            }
        };
        let isa = opts.isa.unwrap_or_else(Isa::best);
        let kern = isa.kernels()?;
        Ok(Self {
            b,
            hq,
            hkv,
            group: hq / hkv,
            nq,
            nk,
            d,
            dv,
            off: nk as i64 - nq as i64,
            scale,
            q,
            k,
            v,
            causal: opts.causal,
            window: opts.window,
            band: None,
            heads_outer: false,
            class_keys: None,
            half_kv: None,
            softcap: opts.softcap,
            alibi: opts.alibi_slopes,
            mask,
            key_bits,
            bias,
            docs: opts.docs,
            blocks,
            score_rule: opts.score_rule,
            dropout: opts.dropout.filter(|d| d.p > 0.0),
            kern,
            amx: isa == Isa::Amx,
        })
    }

    /// A problem whose K and V are stored as f16: validated as [`Problem::new`] validates f32
    /// ones; the kernels convert each tile's rows to f32 where they read them
    /// (`forward::pack_k`, `forward::kv_rows`).
    pub fn with_half_kv(
        q: View<'a>,
        k: View<'a, f16>,
        v: View<'a, f16>,
        opts: &Options<'a>,
    ) -> Result<Self> {
        static ZERO: [f32; 1] = [0.0];
        // Views of K's and V's shapes whose every element is one zero: nothing reads them.
        let shape_of = |x: &View<f16>| View::new(&ZERO[..], x.shape(), [0; 4]);
        let mut p = Problem::new(q, shape_of(&k)?, shape_of(&v)?, opts)?;
        p.half_kv = Some(HalfKv { k, v });
        Ok(p)
    }

    /// Restricts the problem to keys at relative positions `lo ≤ j − (i + Nk − Nq) ≤ hi`.
    pub fn with_band(mut self, lo: i64, hi: i64) -> Self {
        self.band = Some((lo, hi));
        self
    }

    /// The same problem on batch entry `b` and query heads `h0..h0 + hc` (whole key/value
    /// groups), or `None` when an input is indexed by batch or head (a mask, bias, ALiBi slopes,
    /// document ids, a score rule, dropout, a per-head block table) or K and V are f16: calls
    /// with a residue plan, which run a few heads at a time, have none of those.
    pub fn heads(&self, b: usize, h0: usize, hc: usize) -> Option<Problem<'_>> {
        let per_head = self.mask.is_some()
            || self.key_bits.is_some()
            || self.bias.is_some()
            || self.alibi.is_some()
            || self.docs.is_some()
            || self.score_rule.is_some()
            || self.dropout.is_some()
            || self.half_kv.is_some()
            || self.blocks.as_ref().is_some_and(|t| !t.shared());
        let g = self.group;
        if per_head
            || !h0.is_multiple_of(g)
            || !hc.is_multiple_of(g)
            || hc == 0
            || h0 + hc > self.hq
        {
            return None;
        }
        let sub = |x: &View<'a>, h0: usize, hc: usize| {
            let [_, _, n, d] = x.shape();
            View::new(
                &x.data()[x.offset(b, h0, 0, 0)..],
                [1, hc, n, d],
                x.strides(),
            )
            .ok()
        };
        Some(Problem {
            b: 1,
            hq: hc,
            hkv: hc / g,
            q: sub(&self.q, h0, hc)?,
            k: sub(&self.k, h0 / g, hc / g)?,
            v: sub(&self.v, h0 / g, hc / g)?,
            blocks: self.blocks.as_deref().map(Cow::Borrowed),
            mask: None,
            key_bits: None,
            bias: None,
            alibi: None,
            docs: None,
            score_rule: None,
            dropout: None,
            half_kv: None,
            ..*self
        })
    }

    /// The same problem where query `p` also sees the keys `p − k·stride` for `k ≥ k_min` at or
    /// beyond `key_lo` ([`ClassSteps`]): the tiled forward computes them with
    /// [`Kernels::class_keys`](crate::simd::Kernels) after the rest of each row's keys.
    pub fn with_class_keys(mut self, steps: ClassSteps) -> Self {
        self.class_keys = Some(steps);
        self
    }

    /// Has the forward take its tasks head by head, every batch entry of a head in turn,
    /// instead of batch by batch: for a batch axis that steps one row (the residue classes),
    /// consecutive tasks then read neighbouring rows, on pages the TLB already holds.
    pub fn heads_outer(mut self) -> Self {
        self.heads_outer = true;
        self
    }

    pub fn score_rule(&self) -> Option<&'a dyn ScoreRule> {
        self.score_rule
    }

    /// Checks that an output view has exactly `shape`.
    pub fn check_out(&self, tensor: &'static str, out: &ViewMut, shape: [usize; 4]) -> Result<()> {
        expect_shape(tensor, out.shape(), shape)
    }

    /// Keys `[lo, hi)` that query `i` may see under the causal, window and band rules.
    pub fn row_span(&self, i: usize) -> (usize, usize) {
        let i = i as i64;
        let (mut lo, mut hi) = (0i64, self.nk as i64);
        match self.causal {
            Some(Causal::TopLeft) => hi = hi.min(i + 1),
            Some(Causal::BottomRight) => hi = hi.min(i + self.off + 1),
            None => {}
        }
        if let Some(w) = self.window {
            if w.left != usize::MAX {
                lo = lo.max(i + self.off - w.left.min(i64::MAX as usize / 2) as i64);
            }
            if w.right != usize::MAX {
                hi = hi.min(i + self.off + w.right.min(i64::MAX as usize / 2) as i64 + 1);
            }
        }
        if let Some((a, e)) = self.band {
            lo = lo.max((i + self.off).saturating_add(a));
            hi = hi.min((i + self.off).saturating_add(e).saturating_add(1));
        }
        let lo = lo.clamp(0, self.nk as i64) as usize;
        let hi = hi.clamp(0, self.nk as i64) as usize;
        (lo, hi.max(lo))
    }

    /// Queries `[lo, hi)` outside of which no query sees a key of `[j0, j1)` under the causal
    /// and window rules (both ends of a row's span grow with the row, so this is a binary search).
    pub fn rows_seeing(&self, j0: usize, j1: usize) -> (usize, usize) {
        let first = |pred: &dyn Fn(usize) -> bool| {
            let (mut lo, mut hi) = (0, self.nq);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if pred(mid) {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            lo
        };
        let lo = first(&|i| self.row_span(i).1 > j0);
        let hi = first(&|i| self.row_span(i).0 >= j1);
        (lo, hi.max(lo))
    }

    /// Whether any score modifier (softcap, ALiBi, bias, score rule) is set.
    pub fn has_mods(&self) -> bool {
        self.softcap.is_some()
            || self.alibi.is_some()
            || self.bias.is_some()
            || self.score_rule.is_some()
    }

    /// Whether a score rule or softcap makes the logit's derivative differ from 1.
    pub fn has_chain(&self) -> bool {
        self.softcap.is_some() || self.score_rule.is_some()
    }

    fn q_doc(&self, docs: &DocIds, b: usize, i: usize) -> u32 {
        docs.q[if docs.q.len() == self.nq {
            i
        } else {
            b * self.nq + i
        }]
    }

    fn k_doc(&self, docs: &DocIds, b: usize, j: usize) -> u32 {
        docs.k[if docs.k.len() == self.nk {
            j
        } else {
            b * self.nk + j
        }]
    }

    /// Summary of the document ids of keys `[j0, j0 + w)` (None without documents).
    pub fn tile_docs(&self, b: usize, j0: usize, w: usize) -> Option<TileDocs> {
        let docs = self.docs.as_ref()?;
        let (mut min, mut max) = (u32::MAX, 0);
        for j in j0..j0 + w {
            let d = self.k_doc(docs, b, j);
            min = min.min(d);
            max = max.max(d);
        }
        Some(TileDocs {
            min,
            max,
            uniform: min == max,
        })
    }

    /// What query `i` of batch `b` sees of the key tile `[j0, j0 + w)`, restricted to keys
    /// `[key_lo, key_hi)`; `row_bits` are the row's block-mask bits in a partial tile.
    #[allow(clippy::too_many_arguments)]
    pub fn span(
        &self,
        b: usize,
        i: usize,
        j0: usize,
        w: usize,
        (key_lo, key_hi): (usize, usize),
        tile_docs: Option<&TileDocs>,
        row_bits: Option<u64>,
    ) -> Span {
        let (lo, hi) = self.row_span(i);
        let lo = lo.max(key_lo).max(j0);
        let hi = hi.min(key_hi).min(j0 + w);
        if lo >= hi {
            return Span::EMPTY;
        }
        let (mut a, mut e) = (lo - j0, hi - j0);
        let mut bits = ones(e as u32) & !ones(a as u32);
        let mut exact = self.mask.is_none();
        let keys = self.key_bits.as_ref().map(|k| k.get(b, j0, w));
        let more = match (row_bits, keys) {
            (Some(r), Some(k)) => Some(r & k),
            (r, k) => r.or(k),
        };
        if let Some(rb) = more {
            bits &= rb;
            if bits == 0 {
                return Span::EMPTY;
            }
            a = bits.trailing_zeros() as usize;
            e = 64 - bits.leading_zeros() as usize;
            exact &= bits == ones(e as u32) & !ones(a as u32);
        }
        if let (Some(docs), Some(td)) = (self.docs.as_ref(), tile_docs) {
            let qd = self.q_doc(docs, b, i);
            if qd < td.min || qd > td.max {
                return Span::EMPTY;
            }
            exact &= td.uniform;
        }
        Span {
            a,
            b: e,
            exact,
            bits,
        }
    }

    /// Whether every row `i0..i0 + rows` of batch `b` sees every key of `[j0, j0 + w)` with no
    /// per-element rule: no mask tensor, no document ids, no masked key, a full block, and the
    /// tile inside both end rows' bands (both ends of a band grow with the row, so the rows between see it too).
    pub fn covers(
        &self,
        (b, i0): (usize, usize),
        rows: usize,
        (j0, w): (usize, usize),
        keys: (usize, usize),
        blk: &Block,
    ) -> bool {
        if self.mask.is_some() || self.docs.is_some() || !matches!(blk, Block::Full) {
            return false;
        }
        if let Some(k) = self.key_bits.as_ref() {
            if k.get(b, j0, w) != ones(w as u32) {
                return false;
            }
        }
        let (j1, first, last) = (j0 + w, self.row_span(i0), self.row_span(i0 + rows - 1));
        keys.0 <= j0
            && j1 <= keys.1
            && first.0 <= j0
            && j1 <= first.1
            && last.0 <= j0
            && j1 <= last.1
    }

    /// Non-empty key tiles `(kt, block)` (keys `kt·BC..`) of query tile `qt` of `(b, h)` that meet keys `[lo, hi)`.
    pub fn key_tiles(
        &self,
        (b, h): (usize, usize),
        qt: usize,
        (lo, hi): (usize, usize),
    ) -> TileIter<'_> {
        let (t0, t1) = (lo / BC, hi.div_ceil(BC));
        match self.blocks.as_deref() {
            None => TileIter::Dense(t0..t1.max(t0)),
            Some(m) => TileIter::Table(m, m.row_tiles(b, h, qt).iter(), (t0, t1)),
        }
    }

    /// Query tiles `(qt, block)` of `(b, h)` that see key tile `kt` and meet queries `[lo, hi)`.
    pub fn query_tiles(
        &self,
        (b, h): (usize, usize),
        kt: usize,
        (lo, hi): (usize, usize),
    ) -> TileIter<'_> {
        let (t0, t1) = (lo / BR, hi.div_ceil(BR));
        match self.blocks.as_deref() {
            None => TileIter::Dense(t0..t1.max(t0)),
            Some(m) => TileIter::Table(m, m.col_tiles(b, h, kt).iter(), (t0, t1)),
        }
    }

    /// The block of tile `(qt, kt)`; `None` when the table says it is empty.
    pub fn block(&self, (b, h): (usize, usize), qt: usize, kt: usize) -> Option<Block<'_>> {
        match self.blocks.as_deref() {
            None => Some(Block::Full),
            Some(m) => m.find(b, h, qt, kt),
        }
    }

    /// Number of (batch, head, query, key) quadruples that every mask leaves visible.
    pub fn visible_pairs(&self) -> u64 {
        use rayon::prelude::*;
        let qtiles = self.nq.div_ceil(BR);
        (0..self.b * self.hq * qtiles)
            .into_par_iter()
            .map(|task| {
                let (bh, qt) = (task / qtiles, task % qtiles);
                let (b, h) = (bh / self.hq, bh % self.hq);
                let rows = qt * BR..(qt * BR + BR).min(self.nq);
                let mut n = 0u64;
                for (kt, blk) in self.key_tiles((b, h), qt, (0, self.nk)) {
                    let (j0, w) = (kt * BC, BC.min(self.nk - kt * BC));
                    let td = self.tile_docs(b, j0, w);
                    for i in rows.clone() {
                        let s = self.span(b, i, j0, w, (0, self.nk), td.as_ref(), blk.row(i));
                        n += if s.exact {
                            (s.b - s.a) as u64
                        } else {
                            (s.a..s.b)
                                .filter(|&c| s.bits >> c & 1 == 1 && self.visible(b, h, i, j0 + c))
                                .count() as u64
                        };
                    }
                }
                n
            })
            .sum()
    }

    /// Whether the per-element rules (documents, dense mask) let `(b, h, i, j)` attend.
    #[inline]
    fn visible(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        if let Some(docs) = self.docs.as_ref() {
            if self.q_doc(docs, b, i) != self.k_doc(docs, b, j) {
                return false;
            }
        }
        if let Some(m) = self.mask.as_ref() {
            if !m.data()[m.offset(b, h, i, j)] {
                return false;
            }
        }
        true
    }

    /// Turns raw dot products `row[c] = q_i·k_{j0+c}` into logits in place: scale, softcap,
    /// biases, score rule, then masks (−∞ outside the span and where a per-element rule says no).
    /// With `chain`, also writes $\partial x_c / \partial(\text{scale}\cdot s_c)$.
    pub fn logits(
        &self,
        (b, h, i): (usize, usize, usize),
        j0: usize,
        row: &mut [f32],
        span: Span,
        chain: Option<&mut [f32]>,
    ) {
        let (a, e) = (span.a, span.b);
        row[..a].fill(f32::NEG_INFINITY);
        row[e..].fill(f32::NEG_INFINITY);
        let x = &mut row[a..e];
        let scale = self.scale;
        x.iter_mut().for_each(|s| *s *= scale);
        let mut chain = chain.map(|g| {
            let g = &mut g[a..e];
            g.fill(1.0);
            g
        });
        if let Some(cap) = self.softcap {
            let inv = 1.0 / cap;
            for (c, s) in x.iter_mut().enumerate() {
                let t = (*s * inv).tanh();
                *s = cap * t;
                if let Some(g) = chain.as_deref_mut() {
                    g[c] = 1.0 - t * t;
                }
            }
        }
        if let Some(slopes) = self.alibi {
            let m = slopes[h];
            let base = i as i64 + self.off - (j0 + a) as i64;
            for (c, s) in x.iter_mut().enumerate() {
                *s -= m * (base - c as i64).unsigned_abs() as f32;
            }
        }
        if let Some(bias) = self.bias.as_ref() {
            let data = bias.data();
            let o = bias.offset(b, h, i, j0 + a);
            let st = bias.strides()[3];
            for (c, s) in x.iter_mut().enumerate() {
                *s += data[o + c * st];
            }
        }
        if let Some(rule) = self.score_rule {
            for (c, s) in x.iter_mut().enumerate() {
                if *s == f32::NEG_INFINITY {
                    continue; // masked by a −∞ bias: stays masked, the rule is not asked
                }
                let at = Pos {
                    b,
                    h,
                    i,
                    j: j0 + a + c,
                };
                if let Some(g) = chain.as_deref_mut() {
                    g[c] *= rule.grad(*s, at);
                }
                *s = rule.score(*s, at);
            }
        }
        if !span.exact {
            let per_element = self.docs.is_some() || self.mask.is_some();
            for (c, s) in x.iter_mut().enumerate() {
                if span.bits >> (a + c) & 1 == 0
                    || (per_element && !self.visible(b, h, i, j0 + a + c))
                {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Adds `dx`·∂x/∂θ of the score rule's parameters at `(b, h, i, j)` into `grad`.
    pub fn rule_param_grad(
        &self,
        dx: f32,
        (b, h, i): (usize, usize, usize),
        j: usize,
        grad: &mut [f32],
    ) {
        if let Some(r) = self.score_rule {
            r.param_grad(dx, Pos { b, h, i, j }, grad);
        }
    }

    /// Multiplies the weights `row[c]` (keys `j0 + c`) by the dropout factor of row `(b, h, i)`.
    pub fn apply_dropout(&self, (b, h, i): (usize, usize, usize), j0: usize, row: &mut [f32]) {
        if let Some(d) = self.dropout {
            let key = d.row_key(b, h, i);
            let t = d.threshold();
            let inv = d.keep_scale();
            for (c, x) in row.iter_mut().enumerate() {
                *x *= if Dropout::keep_bits(key, j0 + c, t) {
                    inv
                } else {
                    0.0
                };
            }
        }
    }
}

/// The tiles a kernel walks: every tile of a range, or the non-empty ones of a block mask.
pub(crate) enum TileIter<'m> {
    Dense(std::ops::Range<usize>),
    Table(&'m BlockMask, std::slice::Iter<'m, Entry>, (usize, usize)),
}

impl<'m> Iterator for TileIter<'m> {
    /// The tile's index along the walked axis and its block.
    type Item = (usize, Block<'m>);
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            TileIter::Dense(r) => r.next().map(|t| (t, Block::Full)),
            TileIter::Table(m, it, (t0, t1)) => loop {
                let e = it.next()?;
                let t = e.tile as usize;
                if t >= *t1 {
                    return None;
                }
                if t >= *t0 {
                    return Some((t, m.block(*e)));
                }
            },
        }
    }
}
