//! Structured attention patterns of the literature as composable mask rules.
//!
//! A [`Pattern`] says which keys each query may see. Patterns are rules on positions: query $i$
//! sits at position $p = i + N_k - N_q$ of the key sequence (bottom-right alignment, so a decoder
//! extending a KV cache sees the same pattern as the full sequence; for self-attention $p = i$).
//! With $d = j - p$ the signed distance from the query to key $j$:
//!
//! | pattern | CLI | query at $p$ sees key $j$ when |
//! |---|---|---|
//! | [`Causal`](Pattern::Causal) | `causal` | $j \le p$ |
//! | [`Window`](Pattern::Window) | `window:L,R` | $-L \le d \le R$ |
//! | [`Dilated`](Pattern::Dilated) | `dilated:W,D` | $D \mid d$ and $\lvert d\rvert \le W D$ (Longformer's dilated window, $2W+1$ keys) |
//! | [`Strided`](Pattern::Strided) | `strided:L` | $j \le p$ and ($p - j < L$ or $L \mid p - j$) |
//! | [`Fixed`](Pattern::Fixed) | `fixed:L,C` | $j \le p$ and ($\lfloor j/L\rfloor = \lfloor p/L\rfloor$ or $j \bmod L \ge L - C$) |
//! | [`Longformer`](Pattern::Longformer) | `longformer:W:G1,G2,…` | $\lvert d\rvert \le W$ or $p \in G$ or $j \in G$ |
//! | [`BigBird`](Pattern::BigBird) | `bigbird:B,R,SEED` | see below |
//! | [`Prefix`](Pattern::Prefix) | `prefix:P` | $j < P$ or $j \le p$ |
//! | [`Sink`](Pattern::Sink) | `sink:S,W` | $j \le p$ and ($j < S$ or $p - j < W$) |
//! | [`Union`](Pattern::Union) | `A+B` | A or B |
//! | [`Intersection`](Pattern::Intersection) | `A&B` | A and B (`&` binds tighter than `+`) |
//!
//! Conventions, where the literature disagrees:
//! * **Strided** keeps the local band of OpenAI's released code, $L$ keys $[p-L+1, p]$; the
//!   paper's $t = \max(0, i - L)$ would give $L + 1$. The released code is what trained models saw.
//! * **Fixed** takes the last $C$ positions of each block of $L$ as its summary columns
//!   ($j \bmod L \in [L-C, L)$, $C$ columns, as the paper's prose and OpenAI's block layout have
//!   it). Reading the paper's set $\\{t, \dots, l\\}$ literally adds column $0$ of every block
//!   (Long Range Arena's `== 0`), $C + 1$ columns.
//! * **Sink** (StreamingLLM) keeps $S$ sink keys and a window of $W$ keys ending at the query
//!   itself, $W$ keys as a rolling cache of size $W$ holds.
//! * **BigBird** splits positions into blocks of $B$; with $n_b = \lceil N_k / B\rceil$ key blocks
//!   and query block $q = \lfloor p / B\rfloor$, the first and last query blocks see every key;
//!   other query blocks see key blocks $0$, $n_b - 1$, $q - 1$, $q$, $q + 1$ and $R$ random blocks
//!   drawn without replacement, from the seed, among the remaining ones (all of them if fewer
//!   remain). The draw is the same for every batch and head. Google's code also confines the draw
//!   to the first $2R+5$ blocks and lets rows $n_b - 3$, $n_b - 2$ draw inside their window; this
//!   rule does neither.
//! * **Longformer** global tokens are positions: a global query sees every key and every query
//!   sees a global key. One set of projections serves both (the paper's separate global
//!   projections are a model choice, made outside the kernel).
//!
//! Patterns compose with each other (`|` and `&` on values, `+` and `&` in text) and with every
//! option of [`Options`](crate::Options): causal, window, documents, dense masks and the user's
//! [`MaskRule`] intersect with the pattern.
//!
//! ```
//! use attentive::Pattern;
//! let p: Pattern = "sink:4,512+window:0,0".parse().unwrap();
//! assert_eq!(p, Pattern::Sink { sinks: 4, window: 512 } | Pattern::Window { left: 0, right: 0 });
//! assert_eq!(p.to_string(), "sink:4,512+window:0,0");
//! // Query 1000 of a 1000-token self-attention sees the 4 sinks and the last 512 keys.
//! assert!(p.visible(1001, 1001, 1000, 3) && !p.visible(1001, 1001, 1000, 4));
//! ```

use crate::error::{AttnError, Result};
use crate::rule::{MaskRule, Pos};
use std::fmt;
use std::ops::{BitAnd, BitOr};
use std::str::FromStr;
use std::sync::Arc;

/// A structured mask rule; see the [module documentation](self) for the exact meaning of each.
#[derive(Clone)]
pub enum Pattern {
    /// $j \le p$.
    Causal,
    /// $p - \text{left} \le j \le p + \text{right}$.
    Window { left: usize, right: usize },
    /// $j = p + \text{dilation}\cdot t$ for $\lvert t\rvert \le \text{window}$.
    Dilated { window: usize, dilation: usize },
    /// Sparse Transformer, strided: a band of `stride` keys and every `stride`-th key before it.
    Strided { stride: usize },
    /// Sparse Transformer, fixed: the query's own block of `block` keys and the last `summary`
    /// keys of every earlier block.
    Fixed { block: usize, summary: usize },
    /// Sliding window of `window` keys on each side plus global positions.
    Longformer { window: usize, global: Vec<usize> },
    /// Block-sparse: window, global and random blocks of `block` positions.
    BigBird {
        block: usize,
        random: usize,
        seed: u64,
    },
    /// Prefix-LM: the first `len` keys are visible to every query, causal elsewhere.
    Prefix { len: usize },
    /// StreamingLLM: `sinks` first keys and the `window` most recent ones, causal.
    Sink { sinks: usize, window: usize },
    /// A user rule, called with the raw query index `i` (not the aligned position).
    Rule(Arc<dyn MaskRule + Send>),
    /// Keys visible to any of the parts.
    Union(Vec<Pattern>),
    /// Keys visible to every part.
    Intersection(Vec<Pattern>),
}

impl Pattern {
    /// Wraps a user rule so it composes with the built-in patterns.
    pub fn rule(r: impl MaskRule + Send + 'static) -> Self {
        Pattern::Rule(Arc::new(r))
    }

    /// Checks the parameters: strides, dilations and blocks at least 1, a summary of 1 to `block`
    /// keys, non-empty unions and intersections.
    pub fn validate(&self) -> Result<()> {
        let bad = |value: usize, reason: &'static str| {
            Err(AttnError::InvalidOption {
                option: "pattern",
                value: value as f64,
                reason,
            })
        };
        match self {
            Pattern::Dilated { dilation: 0, .. } => bad(0, "dilation must be at least 1"),
            Pattern::Strided { stride: 0 } => bad(0, "stride must be at least 1"),
            Pattern::Fixed { block: 0, .. } => bad(0, "block must be at least 1"),
            Pattern::Fixed { block, summary } if *summary == 0 || summary > block => {
                bad(*summary, "summary must be between 1 and the block length")
            }
            Pattern::BigBird { block: 0, .. } => bad(0, "block must be at least 1"),
            Pattern::Union(v) | Pattern::Intersection(v) => {
                if v.is_empty() {
                    return bad(0, "a union or intersection needs at least one part");
                }
                v.iter().try_for_each(Pattern::validate)
            }
            _ => Ok(()),
        }
    }

    /// Whether query `i` may see key `j` in a problem of `nq` queries and `nk` keys, evaluated
    /// straight from the definition (this is what the [`reference`](crate::reference) oracle
    /// calls). User rules are asked with batch and head 0.
    pub fn visible(&self, nq: usize, nk: usize, i: usize, j: usize) -> bool {
        self.visible_at(nq, nk, Pos { b: 0, h: 0, i, j })
    }

    /// [`visible`](Self::visible) for a full position (batch and head reach user rules).
    pub fn visible_at(&self, nq: usize, nk: usize, at: Pos) -> bool {
        let p = at.i as i64 + nk as i64 - nq as i64;
        let j = at.j as i64;
        let d = j - p;
        match self {
            Pattern::Causal => j <= p,
            Pattern::Window { left, right } => {
                -(*left as i128) <= d as i128 && d as i128 <= *right as i128
            }
            Pattern::Dilated { window, dilation } => {
                let dl = *dilation as i64;
                d % dl == 0 && (d.unsigned_abs() / dl as u64) <= *window as u64
            }
            Pattern::Strided { stride } => {
                let l = *stride as i64;
                j <= p && (p - j < l || (p - j) % l == 0)
            }
            Pattern::Fixed { block, summary } => {
                let (l, c) = (*block as i64, *summary as i64);
                j <= p && (j / l == p.div_euclid(l) || j % l >= l - c)
            }
            Pattern::Longformer { window, global } => {
                d.unsigned_abs() <= *window as u64
                    || (p >= 0 && global.contains(&(p as usize)))
                    || global.contains(&at.j)
            }
            Pattern::BigBird {
                block,
                random,
                seed,
            } => {
                let nb = nk.div_ceil(*block);
                let qb = p.div_euclid(*block as i64);
                let kb = at.j / block;
                bigbird_visible(nb, qb, kb, |q, k| {
                    bigbird_random_blocks(nb, q, *random, *seed).contains(&k)
                })
            }
            Pattern::Prefix { len } => j < *len as i64 || j <= p,
            Pattern::Sink { sinks, window } => {
                j <= p && (j < *sinks as i64 || ((p - j) as u64) < *window as u64)
            }
            Pattern::Rule(r) => r.visible(at),
            Pattern::Union(v) => v.iter().any(|x| x.visible_at(nq, nk, at)),
            Pattern::Intersection(v) => v.iter().all(|x| x.visible_at(nq, nk, at)),
        }
    }
}

impl PartialEq for Pattern {
    /// Structural equality; user rules are equal only to themselves.
    fn eq(&self, other: &Self) -> bool {
        use Pattern::*;
        match (self, other) {
            (Causal, Causal) => true,
            (Window { left: a, right: b }, Window { left: c, right: d }) => (a, b) == (c, d),
            (
                Dilated {
                    window: a,
                    dilation: b,
                },
                Dilated {
                    window: c,
                    dilation: d,
                },
            ) => (a, b) == (c, d),
            (Strided { stride: a }, Strided { stride: b }) => a == b,
            (
                Fixed {
                    block: a,
                    summary: b,
                },
                Fixed {
                    block: c,
                    summary: d,
                },
            ) => (a, b) == (c, d),
            (
                Longformer {
                    window: a,
                    global: b,
                },
                Longformer {
                    window: c,
                    global: d,
                },
            ) => a == c && b == d,
            (
                BigBird {
                    block: a,
                    random: b,
                    seed: c,
                },
                BigBird {
                    block: d,
                    random: e,
                    seed: f,
                },
            ) => (a, b, c) == (d, e, f),
            (Prefix { len: a }, Prefix { len: b }) => a == b,
            (
                Sink {
                    sinks: a,
                    window: b,
                },
                Sink {
                    sinks: c,
                    window: d,
                },
            ) => (a, b) == (c, d),
            (Rule(a), Rule(b)) => Arc::ptr_eq(a, b),
            (Union(a), Union(b)) | (Intersection(a), Intersection(b)) => a == b,
            _ => false,
        }
    }
}

impl BitOr for Pattern {
    type Output = Pattern;
    /// Union: a key is visible if either pattern lets it through.
    fn bitor(self, rhs: Pattern) -> Pattern {
        match self {
            Pattern::Union(mut v) => {
                v.push(rhs);
                Pattern::Union(v)
            }
            lhs => Pattern::Union(vec![lhs, rhs]),
        }
    }
}

impl BitAnd for Pattern {
    type Output = Pattern;
    /// Intersection: a key is visible if both patterns let it through.
    fn bitand(self, rhs: Pattern) -> Pattern {
        match self {
            Pattern::Intersection(mut v) => {
                v.push(rhs);
                Pattern::Intersection(v)
            }
            lhs => Pattern::Intersection(vec![lhs, rhs]),
        }
    }
}

impl fmt::Display for Pattern {
    /// The CLI syntax, which [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let join = |f: &mut fmt::Formatter, v: &[Pattern], sep: &str| -> fmt::Result {
            for (n, x) in v.iter().enumerate() {
                if n > 0 {
                    f.write_str(sep)?;
                }
                write!(f, "{x}")?;
            }
            Ok(())
        };
        match self {
            Pattern::Causal => write!(f, "causal"),
            Pattern::Window { left, right } => write!(f, "window:{left},{right}"),
            Pattern::Dilated { window, dilation } => write!(f, "dilated:{window},{dilation}"),
            Pattern::Strided { stride } => write!(f, "strided:{stride}"),
            Pattern::Fixed { block, summary } => write!(f, "fixed:{block},{summary}"),
            Pattern::Longformer { window, global } => {
                write!(f, "longformer:{window}:")?;
                let g: Vec<String> = global.iter().map(|x| x.to_string()).collect();
                f.write_str(&g.join(","))
            }
            Pattern::BigBird {
                block,
                random,
                seed,
            } => write!(f, "bigbird:{block},{random},{seed}"),
            Pattern::Prefix { len } => write!(f, "prefix:{len}"),
            Pattern::Sink { sinks, window } => write!(f, "sink:{sinks},{window}"),
            Pattern::Rule(_) => write!(f, "rule"),
            Pattern::Union(v) => join(f, v, "+"),
            // Unions inside an intersection cannot be written in the grammar (`&` binds
            // tighter); they never come out of the parser.
            Pattern::Intersection(v) => join(f, v, "&"),
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "Pattern({self})")
    }
}

/// Why a pattern string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pattern {text:?}: {reason}")]
pub struct PatternError {
    pub text: String,
    pub reason: String,
}

impl FromStr for Pattern {
    type Err = PatternError;

    /// Reads the CLI syntax: terms joined by `+` (union) of factors joined by `&`
    /// (intersection), each factor one of `causal`, `window:L,R`, `dilated:W,D`, `strided:L`,
    /// `fixed:L,C`, `longformer:W:G1,G2,...` (the global list may be empty), `bigbird:B,R,SEED`,
    /// `prefix:P`, `sink:S,W`.
    fn from_str(s: &str) -> std::result::Result<Self, PatternError> {
        let err = |text: &str, reason: String| PatternError {
            text: text.to_string(),
            reason,
        };
        let nums =
            |text: &str, args: &str, n: usize| -> std::result::Result<Vec<u64>, PatternError> {
                let v: std::result::Result<Vec<u64>, _> =
                    args.split(',').map(|x| x.trim().parse::<u64>()).collect();
                match v {
                    Ok(v) if v.len() == n => Ok(v),
                    _ => Err(err(
                        text,
                        format!("expected {n} non-negative integers after ':'"),
                    )),
                }
            };
        let factor = |t: &str| -> std::result::Result<Pattern, PatternError> {
            let t = t.trim();
            let (name, args) = t.split_once(':').unwrap_or((t, ""));
            let us = |x: u64| x as usize;
            let p = match name {
                "causal" if args.is_empty() && !t.contains(':') => Pattern::Causal,
                "window" => {
                    let v = nums(t, args, 2)?;
                    Pattern::Window {
                        left: us(v[0]),
                        right: us(v[1]),
                    }
                }
                "dilated" => {
                    let v = nums(t, args, 2)?;
                    Pattern::Dilated {
                        window: us(v[0]),
                        dilation: us(v[1]),
                    }
                }
                "strided" => Pattern::Strided {
                    stride: us(nums(t, args, 1)?[0]),
                },
                "fixed" => {
                    let v = nums(t, args, 2)?;
                    Pattern::Fixed {
                        block: us(v[0]),
                        summary: us(v[1]),
                    }
                }
                "longformer" => {
                    let (w, g) = args
                        .split_once(':')
                        .ok_or_else(|| err(t, "expected longformer:W:G1,G2,...".into()))?;
                    let window = us(nums(t, w, 1)?[0]);
                    let mut global = if g.trim().is_empty() {
                        Vec::new()
                    } else {
                        let n = g.split(',').count();
                        nums(t, g, n)?.into_iter().map(us).collect()
                    };
                    global.sort_unstable();
                    global.dedup();
                    Pattern::Longformer { window, global }
                }
                "bigbird" => {
                    let v = nums(t, args, 3)?;
                    Pattern::BigBird {
                        block: us(v[0]),
                        random: us(v[1]),
                        seed: v[2],
                    }
                }
                "prefix" => Pattern::Prefix {
                    len: us(nums(t, args, 1)?[0]),
                },
                "sink" => {
                    let v = nums(t, args, 2)?;
                    Pattern::Sink {
                        sinks: us(v[0]),
                        window: us(v[1]),
                    }
                }
                _ => {
                    return Err(err(
                        t,
                        "unknown rule; expected causal, window:L,R, dilated:W,D, strided:L, \
                         fixed:L,C, longformer:W:G1,..., bigbird:B,R,SEED, prefix:P or sink:S,W"
                            .into(),
                    ))
                }
            };
            p.validate().map_err(|e| err(t, e.to_string()))?;
            Ok(p)
        };
        let mut terms = Vec::new();
        for term in s.split('+') {
            let mut factors = term
                .split('&')
                .map(factor)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            terms.push(if factors.len() == 1 {
                factors.pop().expect("one factor")
            } else {
                Pattern::Intersection(factors)
            });
        }
        Ok(if terms.len() == 1 {
            terms.pop().expect("one term")
        } else {
            Pattern::Union(terms)
        })
    }
}

/// The random key blocks of middle query block `q` among `nb` key blocks: `random` distinct
/// blocks outside the window (`q − 1..=q + 1`) and the global blocks (`0`, `nb − 1`), sorted, or
/// all of them if fewer remain. A function of `(seed, q)` only.
pub fn bigbird_random_blocks(nb: usize, q: usize, random: usize, seed: u64) -> Vec<usize> {
    let mut cand: Vec<usize> = (1..nb.saturating_sub(1))
        .filter(|&k| k + 1 < q || k > q + 1)
        .collect();
    let take = random.min(cand.len());
    let mut state = seed ^ (q as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for n in 0..take {
        // Partial Fisher–Yates with splitmix64: uniform without replacement.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let pick = n + (z % (cand.len() - n) as u64) as usize;
        cand.swap(n, pick);
    }
    cand.truncate(take);
    cand.sort_unstable();
    cand
}

/// BigBird's block rule: query block `qb` (may be negative for queries before the first key)
/// sees key block `kb` of `nb`.
fn bigbird_visible(nb: usize, qb: i64, kb: usize, random: impl Fn(usize, usize) -> bool) -> bool {
    let last = nb as i64 - 1;
    if qb <= 0 || qb >= last || kb == 0 || kb as i64 == last || (kb as i64 - qb).abs() <= 1 {
        return true;
    }
    random(qb as usize, kb)
}

/// How a tile relates to a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cover {
    Empty,
    Full,
    /// Mixed, or not known without evaluating the rows.
    Mixed,
}

/// A stand-in for ±∞ distances that leaves room to add positions without overflow.
const FAR: i64 = i64::MAX / 4;

/// Bits `c` of a `w`-key tile starting at `j0` with `lo ≤ j0 + c ≤ hi`.
#[inline]
pub(crate) fn range_bits(lo: i64, hi: i64, j0: i64, w: usize) -> u64 {
    let a = (lo - j0).max(0);
    let b = (hi - j0 + 1).min(w as i64);
    if a >= b {
        0
    } else {
        ones(b as u32) & !ones(a as u32)
    }
}

/// The low `n` bits set (`n ≤ 64`).
#[inline]
pub(crate) fn ones(n: u32) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// Cover of the band $lo \le j - p \le hi$ over rows `[p0, p1)` and keys `[j0, j1)`: both ends of
/// a row's interval move by one per row, so the first and last rows decide.
fn band_cover(lo: i64, hi: i64, (p0, p1): (i64, i64), (j0, j1): (i64, i64)) -> Cover {
    if lo > hi || p1 - 1 + hi < j0 || p0 + lo > j1 - 1 {
        Cover::Empty
    } else if p1 - 1 + lo <= j0 && p0 + hi >= j1 - 1 {
        Cover::Full
    } else {
        Cover::Mixed
    }
}

/// A pattern bound to a problem's key count, with its user rules borrowed: what the block-mask
/// builder evaluates.
pub(crate) enum Compiled<'a> {
    /// $lo \le j - p \le hi$ (causal, window, prefix as a band).
    Band {
        lo: i64,
        hi: i64,
    },
    /// $j \le \max(P - 1, p)$.
    Prefix {
        len: i64,
    },
    Dilated {
        w: i64,
        d: i64,
    },
    Strided {
        l: i64,
    },
    Fixed {
        l: i64,
        c: i64,
    },
    Longformer {
        w: i64,
        global: Vec<usize>,
    },
    BigBird {
        b: usize,
        nb: usize,
        random: Vec<Vec<usize>>,
    },
    Sink {
        s: i64,
        w: i64,
    },
    User(&'a dyn MaskRule),
    Any(Vec<Compiled<'a>>),
    All(Vec<Compiled<'a>>),
}

impl<'a> Compiled<'a> {
    pub fn new(p: &'a Pattern, nk: usize) -> Self {
        match p {
            Pattern::Causal => Compiled::Band { lo: -FAR, hi: 0 },
            Pattern::Window { left, right } => Compiled::Band {
                lo: -((*left).min(FAR as usize) as i64),
                hi: (*right).min(FAR as usize) as i64,
            },
            Pattern::Dilated { window, dilation } => Compiled::Dilated {
                w: (*window).min(FAR as usize / 2 / dilation) as i64,
                d: *dilation as i64,
            },
            Pattern::Strided { stride } => Compiled::Strided {
                l: (*stride).min(FAR as usize) as i64,
            },
            Pattern::Fixed { block, summary } => Compiled::Fixed {
                l: (*block).min(FAR as usize) as i64,
                c: (*summary).min(FAR as usize) as i64,
            },
            Pattern::Longformer { window, global } => {
                let mut g = global.clone();
                g.sort_unstable();
                g.dedup();
                Compiled::Longformer {
                    w: (*window).min(FAR as usize) as i64,
                    global: g,
                }
            }
            Pattern::BigBird {
                block,
                random,
                seed,
            } => {
                let nb = nk.div_ceil(*block);
                let random = (0..nb)
                    .map(|q| {
                        if q == 0 || q + 1 >= nb {
                            Vec::new()
                        } else {
                            bigbird_random_blocks(nb, q, *random, *seed)
                        }
                    })
                    .collect();
                Compiled::BigBird {
                    b: *block,
                    nb,
                    random,
                }
            }
            Pattern::Prefix { len } => Compiled::Prefix {
                len: (*len).min(FAR as usize) as i64,
            },
            Pattern::Sink { sinks, window } => Compiled::Sink {
                s: (*sinks).min(FAR as usize) as i64,
                w: (*window).min(FAR as usize) as i64,
            },
            Pattern::Rule(r) => Compiled::User(r.as_ref()),
            Pattern::Union(v) => Compiled::Any(v.iter().map(|x| Compiled::new(x, nk)).collect()),
            Pattern::Intersection(v) => {
                Compiled::All(v.iter().map(|x| Compiled::new(x, nk)).collect())
            }
        }
    }

    /// Whether evaluating the rule needs the batch and head (user rules may read them).
    pub fn uses_batch_head(&self) -> bool {
        match self {
            Compiled::User(_) => true,
            Compiled::Any(v) | Compiled::All(v) => v.iter().any(Compiled::uses_batch_head),
            _ => false,
        }
    }

    /// What the rule says of rows (positions) `[p0, p1)` against keys `[j0, j1)`, when that is
    /// cheap to know; [`Cover::Mixed`] otherwise.
    pub fn cover(&self, ps: (i64, i64), js: (i64, i64)) -> Cover {
        let (p0, p1) = ps;
        let (j0, j1) = js;
        let causal = band_cover(-FAR, 0, ps, js);
        match self {
            Compiled::Band { lo, hi } => band_cover(*lo, *hi, ps, js),
            Compiled::Prefix { len } => {
                if j1 <= *len {
                    Cover::Full
                } else if j0 >= *len {
                    causal
                } else {
                    match causal {
                        Cover::Full => Cover::Full,
                        _ => Cover::Mixed,
                    }
                }
            }
            Compiled::Dilated { w, d } => match band_cover(-w * d, w * d, ps, js) {
                Cover::Full if *d == 1 => Cover::Full,
                Cover::Empty => Cover::Empty,
                _ => Cover::Mixed,
            },
            Compiled::Strided { l } => match causal {
                Cover::Empty => Cover::Empty,
                Cover::Full if band_cover(-(l - 1), 0, ps, js) == Cover::Full || *l == 1 => {
                    Cover::Full
                }
                _ => Cover::Mixed,
            },
            Compiled::Fixed { l, c } => match causal {
                Cover::Empty => Cover::Empty,
                Cover::Full => {
                    let same_block = j0 / l == (j1 - 1) / l
                        && p0.div_euclid(*l) == j0 / l
                        && (p1 - 1).div_euclid(*l) == j0 / l;
                    let all_summary = *c == *l || (j0 / l == (j1 - 1) / l && j0 % l >= l - c);
                    if same_block || all_summary {
                        Cover::Full
                    } else {
                        Cover::Mixed
                    }
                }
                Cover::Mixed => Cover::Mixed,
            },
            Compiled::Longformer { w, global } => {
                let band = band_cover(-w, *w, ps, js);
                let any_in = |lo: i64, hi: i64| {
                    let lo = lo.max(0) as usize;
                    let hi = hi.max(0) as usize;
                    global.partition_point(|&g| g < hi) > global.partition_point(|&g| g < lo)
                };
                let all_rows_global = p0 >= 0
                    && global.partition_point(|&g| (g as i64) < p1)
                        - global.partition_point(|&g| (g as i64) < p0)
                        == (p1 - p0) as usize;
                if band == Cover::Full || all_rows_global {
                    Cover::Full
                } else if band == Cover::Empty && !any_in(p0, p1) && !any_in(j0, j1) {
                    Cover::Empty
                } else {
                    Cover::Mixed
                }
            }
            Compiled::BigBird { b, nb, random } => {
                let b = *b as i64;
                let (q0, q1) = (p0.div_euclid(b), (p1 - 1).div_euclid(b));
                let (k0, k1) = ((j0 / b) as usize, ((j1 - 1) / b) as usize);
                let (mut any, mut all) = (false, true);
                for qb in q0..=q1 {
                    for kb in k0..=k1 {
                        let v = bigbird_visible(*nb, qb, kb, |q, k| {
                            random[q].binary_search(&k).is_ok()
                        });
                        any |= v;
                        all &= v;
                    }
                }
                if all {
                    Cover::Full
                } else if !any {
                    Cover::Empty
                } else {
                    Cover::Mixed
                }
            }
            Compiled::Sink { s, w } => {
                let recent = band_cover(-(w - 1), 0, ps, js);
                match causal {
                    Cover::Empty => Cover::Empty,
                    _ if j0 >= *s && recent == Cover::Empty => Cover::Empty,
                    Cover::Full if j1 <= *s || recent == Cover::Full => Cover::Full,
                    _ => Cover::Mixed,
                }
            }
            Compiled::User(_) => Cover::Mixed,
            Compiled::Any(v) => {
                let mut all_empty = true;
                for x in v {
                    match x.cover(ps, js) {
                        Cover::Full => return Cover::Full,
                        Cover::Mixed => all_empty = false,
                        Cover::Empty => {}
                    }
                }
                if all_empty {
                    Cover::Empty
                } else {
                    Cover::Mixed
                }
            }
            Compiled::All(v) => {
                let mut all_full = true;
                for x in v {
                    match x.cover(ps, js) {
                        Cover::Empty => return Cover::Empty,
                        Cover::Mixed => all_full = false,
                        Cover::Full => {}
                    }
                }
                if all_full {
                    Cover::Full
                } else {
                    Cover::Mixed
                }
            }
        }
    }

    /// Visibility bits of keys `j0..j0 + w` (`w ≤ 64`) for the query at position `p`; `at`
    /// carries the batch, head and raw query index for user rules.
    pub fn row(&self, at: (usize, usize, usize), p: i64, j0: usize, w: usize) -> u64 {
        let jj = j0 as i64;
        match self {
            Compiled::Band { lo, hi } => range_bits(p + lo, p + hi, jj, w),
            Compiled::Prefix { len } => range_bits(0, (len - 1).max(p), jj, w),
            Compiled::Dilated { w: win, d } => {
                let (lo, hi) = ((p - win * d).max(jj), (p + win * d).min(jj + w as i64 - 1));
                let mut bits = 0;
                if lo <= hi {
                    // First key ≥ lo on the lattice p + d·t.
                    let mut j = lo + (p - lo).rem_euclid(*d);
                    while j <= hi {
                        bits |= 1 << (j - jj);
                        j += d;
                    }
                }
                bits
            }
            Compiled::Strided { l } => {
                let mut bits = range_bits(p - (l - 1), p, jj, w);
                let hi = p.min(jj + w as i64 - 1);
                if hi >= jj {
                    let mut j = hi - (hi - p).rem_euclid(*l);
                    while j >= jj {
                        bits |= 1 << (j - jj);
                        j -= l;
                    }
                }
                bits
            }
            Compiled::Fixed { l, c } => {
                let own = p.div_euclid(*l) * l;
                let mut bits = range_bits(own, own + l - 1, jj, w);
                let mut blk = jj / l * l;
                while blk < jj + w as i64 {
                    bits |= range_bits(blk + l - c, blk + l - 1, jj, w);
                    blk += l;
                }
                bits & range_bits(-FAR, p, jj, w)
            }
            Compiled::Longformer { w: win, global } => {
                if p >= 0 && global.binary_search(&(p as usize)).is_ok() {
                    return ones(w as u32);
                }
                let mut bits = range_bits(p - win, p + win, jj, w);
                let start = global.partition_point(|&g| g < j0);
                for &g in global[start..].iter().take_while(|&&g| g < j0 + w) {
                    bits |= 1 << (g - j0);
                }
                bits
            }
            Compiled::BigBird { b, nb, random } => {
                let qb = p.div_euclid(*b as i64);
                let mut bits = 0;
                let mut kb = j0 / b;
                while kb * b < j0 + w {
                    if bigbird_visible(*nb, qb, kb, |q, k| random[q].binary_search(&k).is_ok()) {
                        let s = (kb * b) as i64;
                        bits |= range_bits(s, s + *b as i64 - 1, jj, w);
                    }
                    kb += 1;
                }
                bits
            }
            Compiled::Sink { s, w: win } => {
                (range_bits(0, s - 1, jj, w) | range_bits(p - (win - 1), p, jj, w))
                    & range_bits(-FAR, p, jj, w)
            }
            Compiled::User(r) => {
                let (b, h, i) = at;
                let mut bits = 0;
                for c in 0..w {
                    if r.visible(Pos { b, h, i, j: j0 + c }) {
                        bits |= 1 << c;
                    }
                }
                bits
            }
            Compiled::Any(v) => v.iter().fold(0, |acc, x| acc | x.row(at, p, j0, w)),
            Compiled::All(v) => v
                .iter()
                .fold(ones(w as u32), |acc, x| acc & x.row(at, p, j0, w)),
        }
    }
}
