//! Attention with a learned score function, as candle modules on the engine's
//! [`attentive::variants::additive`] and [`attentive::variants::han`]:
//!
//! * [`ScoredAttention`] — encoder–decoder attention before the Transformer: Bahdanau's
//!   additive score, Luong's dot, general and concat scores, optionally under Luong's local-p
//!   window, with padding hidden;
//! * [`AttentionPool`] — attention pooling with a learned context vector (one level of HAN),
//!   and [`Han`], words into sentences into documents.
//!
//! The engine's calls take the weights beside the values: each op packs the values and every
//! weight into one flat tensor (`[v | weights…]`), and its backward returns their gradients in
//! the same order, so candle carries each to its parameter.

use crate::host::{err, output, Arg, Buf};
use crate::layers::{Init, Params};
use attentive::variants::{additive, han};
use attentive::View;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Luong's and Bahdanau's scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Score {
    /// $v^\top\tanh(W_q q + W_k k)$.
    Additive,
    /// $q\cdot k$.
    Dot,
    /// $q^\top W k$.
    General,
    /// $v^\top\tanh(W[q; k])$.
    Concat,
}

/// Encoder–decoder attention with a learned score (see [`additive`]).
#[derive(Clone, Debug)]
pub struct ScoredAttention {
    pub score: Score,
    /// Luong's local-p half-width `D` (σ = D/2); `None` is global attention.
    pub half_width: Option<usize>,
    /// The weights, in the order the op packs them: additive `w_q [A, Dq]`, `w_k [A, Dk]`,
    /// `v [A]`; general `w [Dq, Dk]`; concat `w [A, Dq + Dk]`, `v [A]`; then local-p's
    /// `w_p [A, Dq]`, `v_p [A]`.
    pub weights: Vec<Tensor>,
}

impl ScoredAttention {
    /// Weights for queries of width `dq` and keys of width `dk`, `a` hidden units.
    pub fn new(
        p: &Params,
        score: Score,
        half_width: Option<usize>,
        (dq, dk): (usize, usize),
        a: usize,
    ) -> Result<Self> {
        let x = |fan_in, fan_out| Init::Xavier { fan_in, fan_out };
        let mut weights = match score {
            Score::Additive => vec![
                p.get("w_q", &[a, dq], x(dq, a))?,
                p.get("w_k", &[a, dk], x(dk, a))?,
                p.get("v", &[a], Init::Normal(1.0 / (a as f64).sqrt()))?,
            ],
            Score::Dot => Vec::new(),
            Score::General => vec![p.get("w", &[dq, dk], x(dk, dq))?],
            Score::Concat => vec![
                p.get("w", &[a, dq + dk], x(dq + dk, a))?,
                p.get("v", &[a], Init::Normal(1.0 / (a as f64).sqrt()))?,
            ],
        };
        if half_width.is_some() {
            weights.push(p.get("w_p", &[a, dq], x(dq, a))?);
            weights.push(p.get("v_p", &[a], Init::Normal(1.0 / (a as f64).sqrt()))?);
        }
        Ok(Self {
            score,
            half_width,
            weights,
        })
    }

    /// Attention of `q` (`[B, Hq, Nq, Dq]`) over `k` (`[B, Hkv, Nk, Dk]`) and `v`
    /// (`[B, Hkv, Nk, Dv]`), padding hidden by `key_mask` (`B × Nk`, `true` = a real key).
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_mask: Option<&[bool]>,
    ) -> Result<Tensor> {
        let mut parts = vec![v.flatten_all()?];
        for w in &self.weights {
            parts.push(w.flatten_all()?);
        }
        let packed = Tensor::cat(&parts, 0)?;
        let lens: Vec<usize> = self.weights.iter().map(|w| w.elem_count()).collect();
        q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &packed,
            ScoredOp {
                score: self.score,
                half_width: self.half_width,
                v_shape: v
                    .dims()
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("v must be 4-D [B, H, N, Dv]".into()))?,
                lens,
                key_mask: key_mask.map(|m| m.to_vec()),
            },
        )
    }
}

/// A flat (any-rank) contiguous f32 argument of a forward.
fn flat_arg<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{name} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => candle_core::bail!("{name} must be contiguous"),
    }
}

/// The score over `q`, `k` and `[v | weights…]` (flat).
struct ScoredOp {
    score: Score,
    half_width: Option<usize>,
    v_shape: [usize; 4],
    /// Each weight's length, in packing order.
    lens: Vec<usize>,
    key_mask: Option<Vec<bool>>,
}

impl ScoredOp {
    /// The values and the engine's options from the packed tensor.
    fn unpack<'a>(&'a self, packed: &'a [f32]) -> (&'a [f32], additive::Additive<'a>) {
        let nv: usize = self.v_shape.iter().product();
        let (v, mut rest) = packed.split_at(nv);
        let mut next = |i: usize| {
            let (w, r) = rest.split_at(self.lens[i]);
            rest = r;
            w
        };
        let score = match self.score {
            Score::Additive => additive::Score::Additive {
                w_q: next(0),
                w_k: next(1),
                v: next(2),
            },
            Score::Dot => additive::Score::Dot,
            Score::General => additive::Score::General { w: next(0) },
            Score::Concat => additive::Score::Concat {
                w: next(0),
                v: next(1),
            },
        };
        let base = match self.score {
            Score::Additive => 3,
            Score::Dot => 0,
            Score::General => 1,
            Score::Concat => 2,
        };
        let local = self.half_width.map(|half_width| additive::Local {
            w_p: next(base),
            v_p: next(base + 1),
            half_width,
            sigma: None,
        });
        (
            v,
            additive::Additive {
                score,
                key_mask: self.key_mask.as_deref(),
                local,
            },
        )
    }
}

impl CustomOp3 for ScoredOp {
    fn name(&self) -> &'static str {
        "attentive-scored-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k) = (Arg::of(s1, l1, "q")?, Arg::of(s2, l2, "k")?);
        let (v, opts) = self.unpack(flat_arg(s3, l3, "[v | weights]")?);
        let v = View::contiguous(v, &self.v_shape).map_err(err)?;
        let mut o = output(q.shape, self.v_shape[3]);
        additive::forward(q.view()?, k.view()?, v, &opts, &mut o.view()?, None).map_err(err)?;
        Ok(o.storage())
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qa, ka, ga) = (Arg::host(q)?, Arg::host(k)?, Arg::host(grad)?);
        let packed_data = packed.flatten_all()?.to_vec1::<f32>()?;
        let (v, opts) = self.unpack(&packed_data);
        let v = View::contiguous(v, &self.v_shape).map_err(err)?;
        let (mut dq, mut dk, mut dv) = (
            Buf::zeros(qa.shape),
            Buf::zeros(ka.shape),
            Buf::zeros(self.v_shape),
        );
        let (a, b, c) = (&mut dq.view()?, &mut dk.view()?, &mut dv.view()?);
        let wg = additive::backward(qa.view()?, ka.view()?, v, ga.view()?, &opts, a, b, c)
            .map_err(err)?;
        // [dv | each weight's gradient], in packing order.
        let mut d = dv.data;
        match self.score {
            Score::Additive => [&wg.w, &wg.w_k, &wg.v].iter().for_each(|g| d.extend(*g)),
            Score::Dot => {}
            Score::General => d.extend(&wg.w),
            Score::Concat => [&wg.w, &wg.v].iter().for_each(|g| d.extend(*g)),
        }
        if self.half_width.is_some() {
            d.extend(&wg.w_p);
            d.extend(&wg.v_p);
        }
        Ok((
            dq.grad(q)?,
            dk.grad(k)?,
            Some(Tensor::from_vec(d, packed.shape(), packed.device())?),
        ))
    }
}

/// Attention pooling with a learned context vector: $u_t = \tanh(W h_t + b)$,
/// $\alpha = \mathrm{softmax}\_t(u_t\cdot c)$ over the visible rows, $s = \sum_t \alpha_t h_t$.
#[derive(Clone, Debug)]
pub struct AttentionPool {
    /// `W [A, D]`, `b [A]`, `c [A]`.
    pub w: Tensor,
    pub b: Tensor,
    pub c: Tensor,
}

impl AttentionPool {
    /// Rows of width `d`, `a` hidden units.
    pub fn new(p: &Params, d: usize, a: usize) -> Result<Self> {
        Ok(Self {
            w: p.get(
                "w",
                &[a, d],
                Init::Xavier {
                    fan_in: d,
                    fan_out: a,
                },
            )?,
            b: p.get("b", &[a], Init::Const(0.0))?,
            c: p.get("c", &[a], Init::Normal(1.0 / (a as f64).sqrt()))?,
        })
    }

    /// Pools each group of `h` (`[G, N, D]`) into `[G, D]`; `mask` (`G × N`, `true` = a real
    /// row) hides padding, and a group with no visible row pools to 0.
    pub fn forward(&self, h: &Tensor, mask: Option<&[bool]>) -> Result<Tensor> {
        let packed = Tensor::cat(&[&self.w.flatten_all()?, &self.b, &self.c], 0)?;
        h.contiguous()?.apply_op2(
            &packed,
            PoolOp {
                a: self.c.elem_count(),
                mask: mask.map(|m| m.to_vec()),
            },
        )
    }
}

/// Hierarchical attention (HAN): words pooled into sentence vectors, sentences into a document
/// vector (the paper's GRUs between the levels are the model's own).
#[derive(Clone, Debug)]
pub struct Han {
    pub word: AttentionPool,
    pub sentence: AttentionPool,
}

impl Han {
    pub fn new(p: &Params, d: usize, a: usize) -> Result<Self> {
        Ok(Self {
            word: AttentionPool::new(&p.pp("word"), d, a)?,
            sentence: AttentionPool::new(&p.pp("sentence"), d, a)?,
        })
    }

    /// `h` `[DOCS, SENTENCES, WORDS, D]` to `[DOCS, D]`; `mask` (`DOCS × SENTENCES × WORDS`)
    /// hides padded words, and a sentence with no word is hidden from its document.
    pub fn forward(&self, h: &Tensor, mask: Option<&[bool]>) -> Result<Tensor> {
        let (docs, sents, words, d) = h.dims4()?;
        let s = self
            .word
            .forward(&h.reshape((docs * sents, words, d))?, mask)?; //      [DOCS·S, D]
        let smask: Option<Vec<bool>> = mask.map(|m| {
            m.chunks_exact(words)
                .map(|w| w.iter().any(|&x| x))
                .collect()
        });
        self.sentence
            .forward(&s.reshape((docs, sents, d))?, smask.as_deref())
    }
}

/// One level of attention pooling over `h` and `[W | b | c]` (flat).
struct PoolOp {
    a: usize,
    mask: Option<Vec<bool>>,
}

impl PoolOp {
    fn level<'a>(&self, packed: &'a [f32], d: usize) -> han::Level<'a> {
        let (w, rest) = packed.split_at(self.a * d);
        let (b, c) = rest.split_at(self.a);
        han::Level { w, b, c }
    }
}

fn dims3(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[g, n, d] => Ok((g, n, d)),
        other => candle_core::bail!("attention pooling: h must be [G, N, D], got {other:?}"),
    }
}

impl CustomOp2 for PoolOp {
    fn name(&self) -> &'static str {
        "attentive-attention-pool"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, packed) = (flat_arg(s1, l1, "h")?, flat_arg(s2, l2, "weights")?);
        let (g, n, d) = dims3(l1)?;
        let (s, _) =
            han::pool(h, (g, n, d), self.mask.as_deref(), &self.level(packed, d)).map_err(err)?;
        Ok((CpuStorage::F32(s), Shape::from((g, d))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, n, d) = h.dims3()?;
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (h_, p_, g_) = (flat(h)?, flat(packed)?, flat(grad)?);
        let (dh, lg) = han::pool_backward(
            &h_,
            (g, n, d),
            self.mask.as_deref(),
            &self.level(&p_, d),
            &g_,
        )
        .map_err(err)?;
        let mut dp = lg.w;
        dp.extend(lg.b);
        dp.extend(lg.c);
        let dev = h.device();
        Ok((
            Some(Tensor::from_vec(dh, h.shape(), dev)?),
            Some(Tensor::from_vec(dp, packed.shape(), dev)?),
        ))
    }
}
