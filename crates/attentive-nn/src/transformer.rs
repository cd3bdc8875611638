//! Encoder and decoder layers and the encoder–decoder Transformer (Vaswani et al., 2017).
//!
//! A layer is a residual sub-block per step: post-norm computes $x \leftarrow
//! \mathrm{LN}(x + f(x))$ as in the paper, pre-norm $x \leftarrow x + f(\mathrm{LN}(x))$, which
//! trains without warmup trouble at depth (then a final layer norm closes each stack).
//! The encoder layer's $f$ are self-attention and the feed-forward block; the decoder's are
//! causal self-attention, cross-attention over the encoder's output, and the feed-forward block.

use crate::layers::{dropout, Embedding, FeedForward, LayerNorm, Linear, Params};
use crate::mha::{KvCache, MultiHeadAttention, Positions};
use candle_core::{Module, Result, Tensor};

/// The shape of a model; saved as JSON beside its checkpoint.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub src_vocab: usize,
    pub tgt_vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ff: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    pub pre_norm: bool,
    pub positions: Positions,
    /// Residual and feed-forward dropout.
    pub dropout: f32,
    /// Dropout on attention weights, inside the fused kernel.
    pub attn_dropout: f32,
    /// Longest sequence the position table covers.
    pub max_len: usize,
    /// What self-attention computes (cross-attention stays exact; a decoder keeps exact
    /// attention for a variant with no causal form).
    #[serde(default)]
    pub attention: crate::variants::SelfAttention,
}

/// Sinusoidal or learned absolute positions, added to embeddings.
#[derive(Clone, Debug)]
pub enum PositionalEncoding {
    Sinusoidal {
        d: usize,
    },
    Learned(Embedding),
    /// Positions act inside attention (RoPE, ALiBi): nothing is added.
    None,
}

impl PositionalEncoding {
    pub fn new(p: &Params, positions: Positions, d: usize) -> Result<Self> {
        Ok(match positions {
            Positions::Sinusoidal => Self::Sinusoidal { d },
            Positions::Learned { max_len } => Self::Learned(Embedding::new(p, max_len, d)?),
            Positions::Rope { .. } | Positions::Alibi => Self::None,
        })
    }

    /// `x` (`[B, N, d]`) plus the encodings of positions `start..start + N`.
    pub fn forward(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let n = x.dim(1)?;
        match self {
            Self::Sinusoidal { d } => {
                let pe = attentive::positional::sinusoidal(start, n, *d);
                x.broadcast_add(&Tensor::from_vec(pe, (1, n, *d), x.device())?)
            }
            Self::Learned(e) => {
                let max = e.table.dim(0)?;
                if start + n > max {
                    candle_core::bail!(
                        "position {} beyond the learned table of {max}",
                        start + n - 1
                    );
                }
                let ids = Tensor::arange(start as u32, (start + n) as u32, x.device())?;
                x.broadcast_add(&e.forward(&ids)?.unsqueeze(0)?)
            }
            Self::None => Ok(x.clone()),
        }
    }
}

/// Per-call settings: training (dropout on) and its seed source.
#[derive(Clone, Copy)]
pub struct Mode<'a> {
    pub train: Option<&'a Params>,
}

impl Mode<'_> {
    pub const EVAL: Mode<'static> = Mode { train: None };

    fn drop(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        match self.train {
            Some(params) => dropout(x, p, params),
            None => Ok(x.clone()),
        }
    }

    fn seed(&self) -> Option<u64> {
        self.train.map(|p| p.next_u64())
    }
}

/// The self-attention variant of a layer, if the config asks for one it can use.
fn variant(p: &Params, c: &Config, causal: bool) -> Result<Option<crate::variants::Variant>> {
    use crate::variants::{SelfAttention, Variant};
    if c.attention == SelfAttention::Exact
        || (causal && !c.attention.has_causal_form())
        || (!causal && !c.attention.has_full_form())
    {
        return Ok(None);
    }
    if matches!(c.attention, SelfAttention::Lsh { .. }) && c.kv_heads != c.heads {
        candle_core::bail!("lsh attention shares queries and keys: it needs kv_heads = heads");
    }
    let hd = c.d_model / c.heads;
    Variant::new(&p.pp("variant"), c.attention, (c.heads, hd), c.max_len).map(Some)
}

/// Self-attention and feed-forward, each in a residual block.
#[derive(Clone, Debug)]
pub struct EncoderLayer {
    pub attn: MultiHeadAttention,
    pub ff: FeedForward,
    pub ln1: LayerNorm,
    pub ln2: LayerNorm,
    pub pre_norm: bool,
    pub dropout: f32,
}

impl EncoderLayer {
    pub fn new(p: &Params, c: &Config) -> Result<Self> {
        let mut attn = MultiHeadAttention::new(
            &p.pp("attn"),
            c.d_model,
            c.heads,
            c.kv_heads,
            Some(c.positions),
        )?;
        attn.dropout = c.attn_dropout;
        attn.variant = variant(&p.pp("attn"), c, false)?;
        Ok(Self {
            attn,
            ff: FeedForward::new(&p.pp("ff"), c.d_model, c.ff)?,
            ln1: LayerNorm::new(&p.pp("ln1"), c.d_model)?,
            ln2: LayerNorm::new(&p.pp("ln2"), c.d_model)?,
            pre_norm: c.pre_norm,
            dropout: c.dropout,
        })
    }

    /// `x` `[B, N, d]`, `mask` `B × N` (`true` = a real token).
    pub fn forward(&self, x: &Tensor, mask: Option<&[bool]>, mode: Mode) -> Result<Tensor> {
        let attn = |h: &Tensor| self.attn.forward(h, None, false, mask, None, mode.seed());
        let x = residual(x, &self.ln1, self.pre_norm, |h| {
            mode.drop(&attn(h)?, self.dropout)
        })?;
        residual(&x, &self.ln2, self.pre_norm, |h| {
            mode.drop(&self.ff.forward(h)?, self.dropout)
        })
    }
}

/// `LN(x + f(x))` (post-norm) or `x + f(LN(x))` (pre-norm).
fn residual(
    x: &Tensor,
    ln: &LayerNorm,
    pre_norm: bool,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if pre_norm {
        x + f(&ln.forward(x)?)?
    } else {
        ln.forward(&(x + f(x)?)?)
    }
}

/// The caches of one decoder layer: its self-attention's keys and values so far, and the
/// projected encoder output for cross-attention.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    pub self_attn: KvCache,
    pub cross: KvCache,
}

/// Causal self-attention, cross-attention and feed-forward, each in a residual block.
#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub self_attn: MultiHeadAttention,
    pub cross: MultiHeadAttention,
    pub ff: FeedForward,
    pub ln1: LayerNorm,
    pub ln2: LayerNorm,
    pub ln3: LayerNorm,
    pub pre_norm: bool,
    pub dropout: f32,
}

impl DecoderLayer {
    pub fn new(p: &Params, c: &Config) -> Result<Self> {
        let mut self_attn = MultiHeadAttention::new(
            &p.pp("self"),
            c.d_model,
            c.heads,
            c.kv_heads,
            Some(c.positions),
        )?;
        let mut cross =
            MultiHeadAttention::new(&p.pp("cross"), c.d_model, c.heads, c.kv_heads, None)?;
        self_attn.dropout = c.attn_dropout;
        self_attn.variant = variant(&p.pp("self"), c, true)?;
        cross.dropout = c.attn_dropout;
        Ok(Self {
            self_attn,
            cross,
            ff: FeedForward::new(&p.pp("ff"), c.d_model, c.ff)?,
            ln1: LayerNorm::new(&p.pp("ln1"), c.d_model)?,
            ln2: LayerNorm::new(&p.pp("ln2"), c.d_model)?,
            ln3: LayerNorm::new(&p.pp("ln3"), c.d_model)?,
            pre_norm: c.pre_norm,
            dropout: c.dropout,
        })
    }

    /// `x` `[B, Nt, d]` over the encoder output `mem` `[B, Ns, d]` with its mask `B × Ns`.
    pub fn forward(
        &self,
        x: &Tensor,
        mem: &Tensor,
        mem_mask: Option<&[bool]>,
        cache: Option<&mut LayerCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (sc, cc) = match cache {
            Some(c) => (Some(&mut c.self_attn), Some(&mut c.cross)),
            None => (None, None),
        };
        let x = residual(x, &self.ln1, self.pre_norm, |h| {
            mode.drop(
                &self
                    .self_attn
                    .forward(h, None, true, None, sc, mode.seed())?,
                self.dropout,
            )
        })?;
        let x = residual(&x, &self.ln2, self.pre_norm, |h| {
            mode.drop(
                &self
                    .cross
                    .forward(h, Some(mem), false, mem_mask, cc, mode.seed())?,
                self.dropout,
            )
        })?;
        residual(&x, &self.ln3, self.pre_norm, |h| {
            mode.drop(&self.ff.forward(h)?, self.dropout)
        })
    }
}

impl DecoderLayer {
    /// The cross-attention weights of this layer for `x` (`[B, Nt, d]`), `[B, H, Nt, Ns]` flat.
    pub fn cross_weights(&self, x: &Tensor, mem: &Tensor, mem_mask: &[bool]) -> Result<Vec<f32>> {
        let h = residual(x, &self.ln1, self.pre_norm, |h| {
            self.self_attn.forward(h, None, true, None, None, None)
        })?;
        let q_in = if self.pre_norm {
            self.ln2.forward(&h)?
        } else {
            h
        };
        self.cross.weights(&q_in, mem, Some(mem_mask))
    }
}

/// The encoder–decoder Transformer: embeddings scaled by $\sqrt{d}$ plus positions, the two
/// stacks, and a linear map to target-vocabulary logits.
#[derive(Clone, Debug)]
pub struct Seq2Seq {
    pub config: Config,
    pub src_emb: Embedding,
    pub tgt_emb: Embedding,
    pub pos: PositionalEncoding,
    pub enc: Vec<EncoderLayer>,
    pub dec: Vec<DecoderLayer>,
    /// Final norms of the pre-norm stacks.
    pub enc_ln: Option<LayerNorm>,
    pub dec_ln: Option<LayerNorm>,
    pub out: Linear,
}

impl Seq2Seq {
    pub fn new(p: &Params, c: &Config) -> Result<Self> {
        Ok(Self {
            config: c.clone(),
            src_emb: Embedding::new(&p.pp("src_emb"), c.src_vocab, c.d_model)?,
            tgt_emb: Embedding::new(&p.pp("tgt_emb"), c.tgt_vocab, c.d_model)?,
            pos: PositionalEncoding::new(&p.pp("pos"), c.positions, c.d_model)?,
            enc: (0..c.enc_layers)
                .map(|i| EncoderLayer::new(&p.pp(format!("enc.{i}")), c))
                .collect::<Result<_>>()?,
            dec: (0..c.dec_layers)
                .map(|i| DecoderLayer::new(&p.pp(format!("dec.{i}")), c))
                .collect::<Result<_>>()?,
            enc_ln: c
                .pre_norm
                .then(|| LayerNorm::new(&p.pp("enc_ln"), c.d_model))
                .transpose()?,
            dec_ln: c
                .pre_norm
                .then(|| LayerNorm::new(&p.pp("dec_ln"), c.d_model))
                .transpose()?,
            out: Linear::new(&p.pp("out"), c.d_model, c.tgt_vocab, true)?,
        })
    }

    /// Uses candle's unfused attention in every layer instead of the fused kernel.
    pub fn set_unfused(&mut self, unfused: bool) {
        for l in &mut self.enc {
            l.attn.unfused = unfused;
        }
        for l in &mut self.dec {
            l.self_attn.unfused = unfused;
            l.cross.unfused = unfused;
        }
    }

    fn embed(&self, e: &Embedding, ids: &Tensor, start: usize, mode: Mode) -> Result<Tensor> {
        let x = (e.forward(ids)? * (self.config.d_model as f64).sqrt())?;
        mode.drop(&self.pos.forward(&x, start)?, self.config.dropout)
    }

    /// Encoder output `[B, Ns, d]` of `src` (`[B, Ns]` u32) with padding mask `B × Ns`.
    pub fn encode(&self, src: &Tensor, mask: &[bool], mode: Mode) -> Result<Tensor> {
        let mut x = self.embed(&self.src_emb, src, 0, mode)?;
        for l in &self.enc {
            x = l.forward(&x, Some(mask), mode)?;
        }
        match &self.enc_ln {
            Some(ln) => ln.forward(&x),
            None => Ok(x),
        }
    }

    /// Logits `[B, Nt, V]` of the target positions `start..` given `tgt` (`[B, Nt]` u32),
    /// attending to `mem`. With `caches` (one per layer), decodes incrementally.
    pub fn decode(
        &self,
        tgt: &Tensor,
        mem: &Tensor,
        mem_mask: &[bool],
        mut caches: Option<&mut [LayerCache]>,
        mode: Mode,
    ) -> Result<Tensor> {
        let start = caches
            .as_ref()
            .and_then(|c| c.first())
            .map_or(0, |c| c.self_attn.len());
        let mut x = self.embed(&self.tgt_emb, tgt, start, mode)?;
        for (i, l) in self.dec.iter().enumerate() {
            let c = caches.as_deref_mut().map(|c| &mut c[i]);
            x = l.forward(&x, mem, Some(mem_mask), c, mode)?;
        }
        let x = match &self.dec_ln {
            Some(ln) => ln.forward(&x)?,
            None => x,
        };
        self.out.forward(&x)
    }

    /// Cross-attention weights of the last decoder layer for target inputs `tgt` (`[B, Nt]`),
    /// `[B, H, Nt, Ns]` flat.
    pub fn cross_weights(&self, tgt: &Tensor, mem: &Tensor, mem_mask: &[bool]) -> Result<Vec<f32>> {
        let mut x = self.embed(&self.tgt_emb, tgt, 0, Mode::EVAL)?;
        let Some((last, rest)) = self.dec.split_last() else {
            candle_core::bail!("the model has no decoder layer");
        };
        for l in rest {
            x = l.forward(&x, mem, Some(mem_mask), None, Mode::EVAL)?;
        }
        last.cross_weights(&x, mem, mem_mask)
    }

    /// Empty caches for incremental decoding.
    pub fn caches(&self) -> Vec<LayerCache> {
        vec![LayerCache::default(); self.dec.len()]
    }
}
