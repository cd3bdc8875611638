//! Grapheme-to-phoneme conversion: spelling in, pronunciation out, learned by the encoder–decoder
//! Transformer from the CMU Pronouncing Dictionary (embedded, see `data/README.md`).
//!
//! The model reads a word's letters and writes its phonemes one at a time; its cross-attention
//! weights say which letters it looked at for each sound. Quality is measured on held-out words:
//! the phoneme error rate (PER) is the edit distance between prediction and reference over the
//! reference length, summed over words; the word error rate (WER) is the share of words with any
//! error. A word with several pronunciations is scored against the closest one.

use crate::layers::Params;
use crate::mha::Positions;
use crate::train::{clip_grad_norm, smoothed_cross_entropy, transformer_lr};
use crate::transformer::{Config, Mode, Seq2Seq};
use candle_core::{Device, Result, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use std::collections::BTreeMap;
use std::io::Read;

static CMUDICT_GZ: &[u8] = include_bytes!("../data/cmudict.dict.gz");

pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
/// Letters after the three special symbols.
pub const LETTERS: &str = "abcdefghijklmnopqrstuvwxyz'";
/// The 39 phonemes of CMUdict, without stress.
pub const PHONES: [&str; 39] = [
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
    "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH",
    "UW", "V", "W", "Y", "Z", "ZH",
];

/// Which part of the data a word belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
    Test,
}

/// A word and its pronunciations as phoneme ids.
#[derive(Clone, Debug)]
pub struct Entry {
    pub word: String,
    pub prons: Vec<Vec<u32>>,
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The split of a word: FNV-1a of its spelling modulo 100 — 0–4 test, 5–6 validation.
pub fn split_of(word: &str) -> Split {
    match fnv1a(word) % 100 {
        0..=4 => Split::Test,
        5..=6 => Split::Valid,
        _ => Split::Train,
    }
}

/// Letter ids of a word (`None` if it has a letter outside [`LETTERS`]).
pub fn encode_word(word: &str) -> Option<Vec<u32>> {
    word.chars()
        .map(|c| LETTERS.find(c.to_ascii_lowercase()).map(|i| i as u32 + 3))
        .collect()
}

pub fn phone_id(p: &str) -> Option<u32> {
    PHONES.iter().position(|&x| x == p).map(|i| i as u32 + 3)
}

pub fn phone_name(id: u32) -> &'static str {
    match id {
        PAD => "<pad>",
        BOS => "<s>",
        EOS => "</s>",
        i => PHONES.get(i as usize - 3).copied().unwrap_or("?"),
    }
}

/// Every word of the embedded dictionary in `split`, sorted by spelling.
pub fn load(split: Split) -> Vec<Entry> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(CMUDICT_GZ)
        .read_to_string(&mut text)
        .expect("the embedded dictionary is valid gzip");
    let mut words: BTreeMap<String, Vec<Vec<u32>>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut parts = line.split_whitespace();
        let Some(w) = parts.next() else { continue };
        let base = match w.find('(') {
            Some(i) if w.ends_with(')') => &w[..i],
            _ => w,
        };
        if encode_word(base).is_none() || split_of(base) != split {
            continue;
        }
        let pron: Option<Vec<u32>> = parts
            .map(|p| phone_id(p.trim_end_matches(|c: char| c.is_ascii_digit())))
            .collect();
        if let Some(pron) = pron.filter(|p| !p.is_empty()) {
            let e = words.entry(base.to_string()).or_default();
            if !e.contains(&pron) {
                e.push(pron);
            }
        }
    }
    words
        .into_iter()
        .map(|(word, prons)| Entry { word, prons })
        .collect()
}

/// The dictionary's entry for `word` (lower case), whichever split holds it.
pub fn lookup(word: &str) -> Option<Entry> {
    let entries = load(split_of(word));
    entries
        .binary_search_by(|e| e.word.as_str().cmp(word))
        .ok()
        .map(|i| entries[i].clone())
}

/// Levenshtein distance.
pub fn edit_distance(a: &[u32], b: &[u32]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (x != y) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// PER and WER (both in %) of predictions against entries.
pub fn score(entries: &[Entry], preds: &[Vec<u32>]) -> (f64, f64) {
    let (mut errs, mut len, mut wrong) = (0usize, 0usize, 0usize);
    for (e, p) in entries.iter().zip(preds) {
        let (d, r) = e
            .prons
            .iter()
            .map(|r| (edit_distance(p, r), r.len()))
            .min()
            .expect("every entry has a pronunciation");
        errs += d;
        len += r;
        wrong += (d > 0) as usize;
    }
    (
        100.0 * errs as f64 / len.max(1) as f64,
        100.0 * wrong as f64 / entries.len().max(1) as f64,
    )
}

/// The shipped model's shape.
pub fn default_config() -> Config {
    Config {
        src_vocab: 3 + LETTERS.len(),
        tgt_vocab: 3 + PHONES.len(),
        d_model: 128,
        heads: 4,
        kv_heads: 4,
        ff: 512,
        enc_layers: 3,
        dec_layers: 3,
        pre_norm: true,
        positions: Positions::Sinusoidal,
        dropout: 0.1,
        attn_dropout: 0.0,
        max_len: 40,
        attention: Default::default(),
    }
}

/// Teacher forcing: decoder inputs `BOS y₁ … y_n` (`[B, Nt]`), targets `y₁ … y_n EOS`
/// (`[B·Nt]`) and each target position's weight (1, or 0 for padding).
fn target_batch(tgts: &[&[u32]], dev: &Device) -> Result<(Tensor, Tensor, Vec<f32>)> {
    let nt = tgts.iter().map(|t| t.len() + 1).max().unwrap_or(1);
    let b = tgts.len();
    let (mut tin, mut tout, mut w) = (vec![PAD; b * nt], vec![PAD; b * nt], vec![0f32; b * nt]);
    for (r, t) in tgts.iter().enumerate() {
        tin[r * nt] = BOS;
        tin[r * nt + 1..r * nt + 1 + t.len()].copy_from_slice(t);
        tout[r * nt..r * nt + t.len()].copy_from_slice(t);
        tout[r * nt + t.len()] = EOS;
        w[r * nt..r * nt + t.len() + 1].fill(1.0);
    }
    Ok((
        Tensor::from_vec(tin, (b, nt), dev)?,
        Tensor::from_vec(tout, b * nt, dev)?,
        w,
    ))
}

/// Sources `[B, Ns]` padded with [`PAD`] and their mask (`B × Ns`).
fn source_batch(words: &[&[u32]], dev: &Device) -> Result<(Tensor, Vec<bool>)> {
    let n = words.iter().map(|w| w.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![PAD; words.len() * n];
    let mut mask = vec![false; words.len() * n];
    for (b, w) in words.iter().enumerate() {
        ids[b * n..b * n + w.len()].copy_from_slice(w);
        mask[b * n..b * n + w.len()].fill(true);
    }
    Ok((Tensor::from_vec(ids, (words.len(), n), dev)?, mask))
}

/// A trained model and what decoding needs.
pub struct G2p {
    pub model: Seq2Seq,
    pub params: Params,
}

/// A decoded word: its phonemes and, per phoneme, the cross-attention weights of the last decoder
/// layer averaged over heads (one per letter).
#[derive(Clone, Debug)]
pub struct Decoded {
    pub phones: Vec<u32>,
    pub alignment: Vec<Vec<f32>>,
}

/// One map per layer and head of each attention module, flat, with its shape
/// `[layers, heads, queries, keys]`.
#[derive(Clone, Debug)]
pub struct ModuleMaps {
    /// Encoder self-attention, `[Le, H, Ns, Ns]` over the letters.
    pub encoder: (Vec<f32>, [usize; 4]),
    /// Decoder self-attention, `[Ld, H, Nt, Nt]` over the start token and the phonemes.
    pub decoder: (Vec<f32>, [usize; 4]),
    /// Cross-attention, `[Ld, H, Nt, Ns]`.
    pub cross: (Vec<f32>, [usize; 4]),
}

/// [`G2p::weight_grads`]' result for one position: each module's
/// $A \odot \partial y/\partial A$.
#[derive(Clone, Debug)]
pub struct WeightedMaps {
    /// The explained logit.
    pub value: f32,
    pub maps: ModuleMaps,
}

impl G2p {
    pub fn new(config: &Config, seed: u64) -> Result<Self> {
        let params = Params::new(seed, &Device::Cpu);
        let model = Seq2Seq::new(&params, config)?;
        Ok(Self { model, params })
    }

    /// Greedy decoding of many words at once, with KV caches.
    pub fn greedy(&self, words: &[&[u32]]) -> Result<Vec<Vec<u32>>> {
        let dev = Device::Cpu;
        let (src, mask) = source_batch(words, &dev)?;
        let mem = self.model.encode(&src, &mask, Mode::EVAL)?;
        let mut caches = self.model.caches();
        let b = words.len();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        let mut last = vec![BOS; b];
        let max = self.model.config.max_len - 1;
        // LSH attention sorts the whole prefix: it decodes by recomputing it, without a cache.
        let recompute = matches!(
            self.model.config.attention,
            crate::variants::SelfAttention::Lsh { .. }
        );
        let mut prefix: Vec<u32> = vec![BOS; b]; //                         [B, t] row-major
        for t in 0..max {
            let logits = if recompute {
                let all = Tensor::from_vec(prefix.clone(), (b, t + 1), &dev)?;
                self.model
                    .decode(&all, &mem, &mask, None, Mode::EVAL)?
                    .narrow(1, t, 1)?
            } else {
                let step = Tensor::from_vec(last.clone(), (b, 1), &dev)?;
                self.model
                    .decode(&step, &mem, &mask, Some(&mut caches), Mode::EVAL)?
            };
            let next = logits.squeeze(1)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for i in 0..b {
                if !done[i] {
                    if next[i] == EOS {
                        done[i] = true;
                    } else {
                        out[i].push(next[i]);
                    }
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            prefix = prefix
                .chunks_exact(t + 1)
                .zip(&next)
                .flat_map(|(row, &n)| row.iter().copied().chain([n]))
                .collect();
            last = next;
        }
        Ok(out)
    }

    /// Beam search of width `k` for one word: the hypothesis of highest total log-probability
    /// among those that ended, over `max_len` steps.
    pub fn beam(&self, word: &[u32], k: usize) -> Result<Vec<u32>> {
        let dev = Device::Cpu;
        let (src, mask) = source_batch(&[word], &dev)?;
        let mem = self.model.encode(&src, &mask, Mode::EVAL)?;
        let mut beams: Vec<(Vec<u32>, f32)> = vec![(vec![BOS], 0.0)];
        let mut finished: Vec<(Vec<u32>, f32)> = Vec::new();
        for _ in 0..self.model.config.max_len - 1 {
            if beams.is_empty() {
                break;
            }
            // Score every live beam in one batch (no cache: beams reorder each step).
            let n = beams[0].0.len();
            let ids: Vec<u32> = beams.iter().flat_map(|(s, _)| s.clone()).collect();
            let tgt = Tensor::from_vec(ids, (beams.len(), n), &dev)?;
            let bm = beams.len();
            let mem_b = mem
                .broadcast_as((bm, mem.dim(1)?, mem.dim(2)?))?
                .contiguous()?;
            let mask_b: Vec<bool> = (0..bm).flat_map(|_| mask.clone()).collect();
            let logits = self.model.decode(&tgt, &mem_b, &mask_b, None, Mode::EVAL)?;
            let last = logits.narrow(1, n - 1, 1)?.squeeze(1)?; //   [beams, V]
            let logp = candle_nn::ops::log_softmax(&last, D::Minus1)?.to_vec2::<f32>()?;
            let mut cand: Vec<(Vec<u32>, f32)> = Vec::new();
            for ((seq, s), lp) in beams.iter().zip(&logp) {
                for (tok, &l) in lp.iter().enumerate().skip(EOS as usize) {
                    let mut next = seq.clone();
                    next.push(tok as u32);
                    cand.push((next, s + l));
                }
            }
            cand.sort_by(|a, b| b.1.total_cmp(&a.1));
            beams.clear();
            for (seq, s) in cand.into_iter().take(k) {
                if *seq.last().expect("non-empty") == EOS {
                    finished.push((seq, s));
                } else {
                    beams.push((seq, s));
                }
            }
            // Stop when no live beam can beat the best finished one.
            let best_done = finished
                .iter()
                .map(|f| f.1)
                .fold(f32::NEG_INFINITY, f32::max);
            if finished.len() >= k || beams.iter().all(|b| b.1 < best_done) {
                break;
            }
        }
        let best = finished
            .into_iter()
            .chain(beams)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(s, _)| s)
            .unwrap_or_default();
        Ok(best.into_iter().filter(|&t| t != BOS && t != EOS).collect())
    }

    /// Cross-attention of the last decoder layer, averaged over heads, for a decoded word:
    /// row t holds the weights phoneme t put on each letter.
    pub fn alignment(&self, word: &[u32], phones: &[u32]) -> Result<Vec<Vec<f32>>> {
        let dev = Device::Cpu;
        let (src, mask) = source_batch(&[word], &dev)?;
        let mem = self.model.encode(&src, &mask, Mode::EVAL)?;
        let mut tgt = vec![BOS];
        tgt.extend_from_slice(phones);
        let tgt = Tensor::from_vec(tgt, (1, phones.len() + 1), &dev)?;
        let w = self.model.cross_weights(&tgt, &mem, &mask)?; // [H, Nt, Ns]
        let (h, nt, ns) = (self.model.config.heads, phones.len() + 1, word.len());
        Ok((0..phones.len())
            .map(|t| {
                (0..ns)
                    .map(|s| (0..h).map(|hh| w[(hh * nt + t) * ns + s]).sum::<f32>() / h as f32)
                    .collect()
            })
            .collect())
    }

    /// A copy of the model with a fresh sink in `slot` of every attention module, and the sinks:
    /// the encoder's, the decoder's self-attention's and its cross-attention's, layer by layer.
    fn with_sinks(
        &self,
        slot: fn(&mut crate::mha::MultiHeadAttention) -> &mut Option<crate::op::MapSink>,
    ) -> (Seq2Seq, [Vec<crate::op::MapSink>; 3]) {
        let mut model = self.model.clone();
        let put =
            |m: &mut crate::mha::MultiHeadAttention| slot(m).insert(Default::default()).clone();
        let enc = model.enc.iter_mut().map(|l| put(&mut l.attn)).collect();
        let dec = model
            .dec
            .iter_mut()
            .map(|l| put(&mut l.self_attn))
            .collect();
        let cross = model.dec.iter_mut().map(|l| put(&mut l.cross)).collect();
        (model, [enc, dec, cross])
    }

    /// Every attention module's $A \odot \partial y_t/\partial A$ for $y_t$ the logit of the
    /// phoneme written at each position `t` of a decoded word (`phones[t]`, and the end token
    /// at `t = phones.len()`), under teacher forcing on the decoded phonemes: the input of
    /// gradient-weighted relevance with the encoder–decoder rules (Chefer et al., 2021). Each
    /// map comes from the fused backward ([`attentive::backward_weighted`]). One batch holds a
    /// copy of the word per position and one backward serves them all: copy `t` receives only
    /// $y_t$'s gradient.
    ///
    /// # Errors
    /// An empty word; a model whose self-attention is not exact (linear, LSH, … form no
    /// weights to weigh); candle's errors.
    pub fn weight_grads(&self, word: &[u32], phones: &[u32]) -> Result<Vec<WeightedMaps>> {
        if word.is_empty() {
            candle_core::bail!("weight_grads: an empty word");
        }
        let attention = self.model.config.attention;
        if attention != crate::variants::SelfAttention::Exact {
            candle_core::bail!(
                "weight_grads: this model's self-attention is {attention:?}, which forms no \
                 attention weights to weigh"
            );
        }
        let dev = Device::Cpu;
        let (model, [enc, dec, cross]) = self.with_sinks(|m| &mut m.weight_grads);
        let (ns, nt, h) = (word.len(), phones.len() + 1, self.model.config.heads);
        let v = self.model.config.tgt_vocab;
        let (src, mask) = source_batch(&vec![word; nt], &dev)?;
        let (tin, _, _) = target_batch(&vec![phones; nt], &dev)?;
        let mem = model.encode(&src, &mask, Mode::EVAL)?;
        let logits = model.decode(&tin, &mem, &mask, None, Mode::EVAL)?; //  [Nt, Nt, V]
                                                                         // y = Σ_t logits[t, t, target_t]
        let at: Vec<u32> = (0..nt)
            .map(|t| ((t * nt + t) * v) as u32 + phones.get(t).copied().unwrap_or(EOS))
            .collect();
        let picked = logits
            .flatten_all()?
            .index_select(&Tensor::from_vec(at, nt, &dev)?, 0)?; //              [Nt]
        picked.sum_all()?.backward()?;
        let values = picked.to_vec1::<f32>()?;
        let take = |sinks: &[crate::op::MapSink], per: usize| -> Result<Vec<Vec<f32>>> {
            // Per layer [Nt copies, H, q, k] → per copy, its layers one after another.
            let mut out = vec![Vec::new(); nt];
            for s in sinks {
                let got = s.lock().unwrap_or_else(|e| e.into_inner()).take();
                let got = got.ok_or_else(|| {
                    candle_core::Error::Msg("weight_grads: a module had no backward".into())
                })?;
                for (o, copy) in out.iter_mut().zip(got.chunks_exact(per)) {
                    o.extend_from_slice(copy);
                }
            }
            Ok(out)
        };
        let (le, ld) = (self.model.enc.len(), self.model.dec.len());
        let (e, d, c) = (
            take(&enc, h * ns * ns)?,
            take(&dec, h * nt * nt)?,
            take(&cross, h * nt * ns)?,
        );
        Ok(values
            .into_iter()
            .zip(e)
            .zip(d)
            .zip(c)
            .map(|(((value, e), d), c)| WeightedMaps {
                value,
                maps: ModuleMaps {
                    encoder: (e, [le, h, ns, ns]),
                    decoder: (d, [ld, h, nt, nt]),
                    cross: (c, [ld, h, nt, ns]),
                },
            })
            .collect())
    }

    /// Every attention module's weights for a word and its phonemes under teacher forcing
    /// (decoder queries: the start token, then each phoneme), from the fused kernel's forward.
    ///
    /// # Errors
    /// An empty word; candle's errors.
    pub fn attention_maps(&self, word: &[u32], phones: &[u32]) -> Result<ModuleMaps> {
        if word.is_empty() {
            candle_core::bail!("attention_maps: an empty word");
        }
        let dev = Device::Cpu;
        let (model, [enc, dec, cross]) = self.with_sinks(|m| &mut m.probabilities);
        let (src, mask) = source_batch(&[word], &dev)?;
        let (tin, _, _) = target_batch(&[phones], &dev)?;
        let mem = model.encode(&src, &mask, Mode::EVAL)?;
        model.decode(&tin, &mem, &mask, None, Mode::EVAL)?;
        let take = |sinks: &[crate::op::MapSink]| -> Result<Vec<f32>> {
            let mut all = Vec::new();
            for s in sinks {
                all.extend(
                    s.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take()
                        .ok_or_else(|| {
                            candle_core::Error::Msg("attention_maps: a module did not run".into())
                        })?,
                );
            }
            Ok(all)
        };
        let (ns, nt, h) = (word.len(), phones.len() + 1, self.model.config.heads);
        let (le, ld) = (self.model.enc.len(), self.model.dec.len());
        Ok(ModuleMaps {
            encoder: (take(&enc)?, [le, h, ns, ns]),
            decoder: (take(&dec)?, [ld, h, nt, nt]),
            cross: (take(&cross)?, [ld, h, nt, ns]),
        })
    }

    /// Head importance (Michel et al., 2019) over `entries`: a gate $\xi_h = 1$ on each head's
    /// output, $I_h = \frac1{|E|}\sum_{e \in E} |\partial L_e / \partial \xi_h|$ with $L_e$ the
    /// cross-entropy of the dictionary's (first) pronunciation of word $e$ under teacher forcing, then each
    /// layer's importances divided by their ℓ2 norm. Returns, per attention module (encoder
    /// self-attention, decoder self-attention, decoder cross-attention), `[layers][heads]`.
    pub fn head_importance(&self, entries: &[Entry]) -> Result<Vec<(&'static str, Vec<Vec<f32>>)>> {
        let dev = Device::Cpu;
        let heads = self.model.config.heads;
        let mut model = self.model.clone();
        let mut gates = Vec::new();
        let mut gate = |m: &mut crate::mha::MultiHeadAttention| -> Result<()> {
            let v = candle_core::Var::ones(heads, candle_core::DType::F32, &dev)?;
            m.gates = Some(v.as_tensor().clone());
            gates.push(v);
            Ok(())
        };
        for l in &mut model.enc {
            gate(&mut l.attn)?;
        }
        for l in &mut model.dec {
            gate(&mut l.self_attn)?;
        }
        for l in &mut model.dec {
            gate(&mut l.cross)?;
        }
        let mut sums = vec![0.0f64; gates.len() * heads];
        let mut count = 0usize;
        for e in entries {
            let (Some(src), Some(phones)) = (encode_word(&e.word), e.prons.first()) else {
                continue;
            };
            let (src, mask) = source_batch(&[&src], &dev)?;
            let (tin, tout, w) = target_batch(&[phones], &dev)?;
            let wt = Tensor::from_vec(w, tout.dims1()?, &dev)?;
            let mem = model.encode(&src, &mask, Mode::EVAL)?;
            let logits = model.decode(&tin, &mem, &mask, None, Mode::EVAL)?;
            let logits = logits.reshape((tout.dims1()?, self.model.config.tgt_vocab))?;
            let grads = smoothed_cross_entropy(&logits, &tout, &wt, 0.0)?.backward()?;
            for (g, v) in gates.iter().enumerate() {
                if let Some(d) = grads.get(v.as_tensor()) {
                    for (h, x) in d.to_vec1::<f32>()?.into_iter().enumerate() {
                        sums[g * heads + h] += x.abs() as f64;
                    }
                }
            }
            count += 1;
        }
        let layer = |g: usize| -> Vec<f32> {
            let row: Vec<f64> = sums[g * heads..(g + 1) * heads]
                .iter()
                .map(|s| s / count.max(1) as f64)
                .collect();
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            row.iter()
                .map(|x| if norm > 0.0 { (x / norm) as f32 } else { 0.0 })
                .collect()
        };
        let (ne, nd) = (self.model.enc.len(), self.model.dec.len());
        Ok(vec![
            ("encoder self-attention", (0..ne).map(layer).collect()),
            ("decoder self-attention", (ne..ne + nd).map(layer).collect()),
            (
                "decoder cross-attention",
                (ne + nd..ne + 2 * nd).map(layer).collect(),
            ),
        ])
    }

    /// Greedy PER and WER (%) over entries, decoding `batch` words at a time.
    pub fn evaluate(&self, entries: &[Entry], batch: usize) -> Result<(f64, f64, Vec<Vec<u32>>)> {
        let codes: Vec<Vec<u32>> = entries
            .iter()
            .map(|e| encode_word(&e.word).expect("entries hold encodable words"))
            .collect();
        // Decode in length order so batches pad little; put results back in entry order.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| codes[i].len());
        let mut preds: Vec<Vec<u32>> = vec![Vec::new(); entries.len()];
        for chunk in order.chunks(batch.max(1)) {
            let words: Vec<&[u32]> = chunk.iter().map(|&i| codes[i].as_slice()).collect();
            for (&i, p) in chunk.iter().zip(self.greedy(&words)?) {
                preds[i] = p;
            }
        }
        let (per, wer) = score(entries, &preds);
        Ok((per, wer, preds))
    }
}

/// One training example: letters and one pronunciation.
struct Example {
    src: Vec<u32>,
    tgt: Vec<u32>,
}

/// What the training loop reports after each step.
pub struct Progress {
    pub step: usize,
    pub loss: f32,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub valid: Option<(f64, f64)>,
}

/// Options of [`train`].
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub seconds: f64,
    pub seed: u64,
    /// Target tokens per batch.
    pub batch_tokens: usize,
    pub warmup: usize,
    pub lr_scale: f64,
    pub label_smoothing: f64,
    /// Validate every this many seconds.
    pub valid_every_s: f64,
    /// Validation words (a prefix of the validation split) per check.
    pub valid_words: usize,
    pub unfused: bool,
    /// Stop after this many steps, if sooner than `seconds`.
    pub max_steps: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            seconds: 60.0,
            seed: 1,
            batch_tokens: 3000,
            warmup: 800,
            lr_scale: 1.0,
            label_smoothing: 0.1,
            valid_every_s: 300.0,
            valid_words: 500,
            unfused: false,
            max_steps: None,
        }
    }
}

/// Trains a model of `config` for `opts.seconds` of wall time on the training split, calling
/// `report` after every step. Batches are drawn from length buckets in a seeded order.
pub fn train(
    config: &Config,
    opts: &TrainOptions,
    mut report: impl FnMut(&Progress),
) -> Result<G2p> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut g2p = G2p::new(config, opts.seed)?;
    g2p.model.set_unfused(opts.unfused);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed ^ 0x5eed);
    let mut examples: Vec<Example> = load(Split::Train)
        .into_iter()
        .flat_map(|e| {
            let src = encode_word(&e.word).expect("encodable");
            e.prons.into_iter().map(move |p| Example {
                src: src.clone(),
                tgt: p,
            })
        })
        .filter(|e| e.src.len() < config.max_len && e.tgt.len() + 1 < config.max_len)
        .collect();
    let valid: Vec<Entry> = load(Split::Valid)
        .into_iter()
        .take(opts.valid_words)
        .collect();
    let vars: Vec<_> = g2p.params.vars().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: 0.0,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-9,
            weight_decay: 0.01,
        },
    )?;
    let dev = Device::Cpu;
    let start = std::time::Instant::now();
    let (mut step, mut tokens) = (0usize, 0usize);
    let mut last_valid = start;
    'epochs: loop {
        // Sort by length within shuffled chunks, cut into batches, shuffle the batches.
        examples.shuffle(&mut rng);
        for chunk in examples.chunks_mut(4096) {
            chunk.sort_by_key(|e| (e.src.len(), e.tgt.len()));
        }
        let mut batches: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < examples.len() {
            let mut j = i;
            let mut longest = 0;
            while j < examples.len() {
                let l = examples[j].src.len().max(examples[j].tgt.len() + 1);
                if (j - i + 1) * longest.max(l) > opts.batch_tokens && j > i {
                    break;
                }
                longest = longest.max(l);
                j += 1;
            }
            batches.push((i, j));
            i = j;
        }
        batches.shuffle(&mut rng);
        for (a, e) in batches {
            let batch = &examples[a..e];
            let srcs: Vec<&[u32]> = batch.iter().map(|x| x.src.as_slice()).collect();
            let (src, mask) = source_batch(&srcs, &dev)?;
            let tgts: Vec<&[u32]> = batch.iter().map(|x| x.tgt.as_slice()).collect();
            let (tin, tout, w) = target_batch(&tgts, &dev)?;
            let (b, nt) = tin.dims2()?;
            let wt = Tensor::from_vec(w.clone(), b * nt, &dev)?;
            let mode = Mode {
                train: Some(&g2p.params),
            };
            let mem = g2p.model.encode(&src, &mask, mode)?;
            let logits = g2p.model.decode(&tin, &mem, &mask, None, mode)?; // [B, Nt, V]
            let logits = logits.reshape((b * nt, config.tgt_vocab))?;
            let loss = smoothed_cross_entropy(&logits, &tout, &wt, opts.label_smoothing)?;
            let mut grads = loss.backward()?;
            clip_grad_norm(&vars, &mut grads, 1.0)?;
            step += 1;
            opt.set_learning_rate(
                opts.lr_scale * transformer_lr(step, config.d_model, opts.warmup),
            );
            opt.step(&grads)?;
            tokens += w.iter().filter(|&&x| x > 0.0).count() + mask.iter().filter(|&&m| m).count();
            let elapsed = start.elapsed().as_secs_f64();
            let mut valid_score = None;
            let out_of_time = elapsed >= opts.seconds || opts.max_steps.is_some_and(|m| step >= m);
            if last_valid.elapsed().as_secs_f64() >= opts.valid_every_s || out_of_time {
                let (per, wer, _) = g2p.evaluate(&valid, 256)?;
                valid_score = Some((per, wer));
                last_valid = std::time::Instant::now();
            }
            report(&Progress {
                step,
                loss: loss.to_scalar::<f32>()?,
                tokens_per_s: tokens as f64 / elapsed.max(1e-9),
                elapsed_s: elapsed,
                valid: valid_score,
            });
            if out_of_time {
                break 'epochs;
            }
        }
    }
    Ok(g2p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Head importance against finite differences of the loss in each gate, on a tiny random
    /// model: the same normalised |∂L/∂ξ_h| per layer, for every module, layer and head.
    #[test]
    fn head_importance_equals_finite_differences() {
        let config = Config {
            d_model: 16,
            heads: 2,
            kv_heads: 2,
            ff: 32,
            enc_layers: 1,
            dec_layers: 2,
            dropout: 0.0,
            ..default_config()
        };
        let g = G2p::new(&config, 7).unwrap();
        let word = "cat";
        let phones: Vec<u32> = ["K", "AE", "T"]
            .iter()
            .map(|p| phone_id(p).unwrap())
            .collect();
        let entries = [Entry {
            word: word.into(),
            prons: vec![phones.clone()],
        }];
        let got = g.head_importance(&entries).unwrap();
        let dev = Device::Cpu;
        let loss = |model: &Seq2Seq| -> f64 {
            let (src, mask) = source_batch(&[&encode_word(word).unwrap()], &dev).unwrap();
            let (tin, tout, w) = target_batch(&[&phones], &dev).unwrap();
            let wt = Tensor::from_vec(w, tout.dims1().unwrap(), &dev).unwrap();
            let mem = model.encode(&src, &mask, Mode::EVAL).unwrap();
            let logits = model.decode(&tin, &mem, &mask, None, Mode::EVAL).unwrap();
            let logits = logits
                .reshape((tout.dims1().unwrap(), config.tgt_vocab))
                .unwrap();
            smoothed_cross_entropy(&logits, &tout, &wt, 0.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        // Central differences, Richardson-extrapolated: (4·D(ε/2) − D(ε))/3 is off by O(ε⁴),
        // where D(ε) alone is off by O(ε²) (a gate scales a whole head: the loss bends); ε small
        // enough that the steps cross few of the feed-forward ReLU's kinks.
        let eps = 1e-2f32;
        for (module, layers) in &got {
            for (l, heads) in layers.iter().enumerate() {
                let raw: Vec<f64> = (0..config.heads)
                    .map(|h| {
                        let at = |x: f32| {
                            let mut m = g.model.clone();
                            let mut gv = vec![1.0f32; config.heads];
                            gv[h] = x;
                            let t = Some(Tensor::new(gv.as_slice(), &dev).unwrap());
                            match *module {
                                "encoder self-attention" => m.enc[l].attn.gates = t,
                                "decoder self-attention" => m.dec[l].self_attn.gates = t,
                                _ => m.dec[l].cross.gates = t,
                            }
                            loss(&m)
                        };
                        let d = |e: f32| (at(1.0 + e) - at(1.0 - e)) / (2.0 * e as f64);
                        ((4.0 * d(eps / 2.0) - d(eps)) / 3.0).abs()
                    })
                    .collect();
                let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
                for (h, (&got, want)) in heads.iter().zip(raw.iter().map(|x| x / norm)).enumerate()
                {
                    assert!(
                        (got as f64 - want).abs() < 5e-3,
                        "{module} layer {l} head {h}: {got} vs finite differences {want}"
                    );
                }
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].1.len(), 2, "two decoder layers of cross-attention");
    }

    /// Each module's A ⊙ ∂y/∂A, summed over a head's pairs, is ∂y/∂ξ_h for a gate ξ on that
    /// head's output (Σ_j P_ij dP_ij = dO_i·O_i): the fused backward's maps against candle's own
    /// gradient of the gates, for every module, layer, head and position.
    #[test]
    fn weight_grads_sum_to_the_gate_gradients() {
        let config = Config {
            d_model: 16,
            heads: 2,
            kv_heads: 2,
            ff: 32,
            enc_layers: 2,
            dec_layers: 2,
            dropout: 0.0,
            ..default_config()
        };
        let g = G2p::new(&config, 11).unwrap();
        let word = encode_word("cats").unwrap();
        let phones: Vec<u32> = ["K", "AE", "T", "S"]
            .iter()
            .map(|p| phone_id(p).unwrap())
            .collect();
        let dev = Device::Cpu;
        let h = config.heads;
        let all = g.weight_grads(&word, &phones).unwrap();
        assert_eq!(all.len(), phones.len() + 1);
        for (t, got) in all.iter().enumerate() {
            // The same logit, differentiated in gates of ones on every module.
            let mut m = g.model.clone();
            let mut gates = Vec::new();
            let mut gate = |a: &mut crate::mha::MultiHeadAttention| {
                let v = candle_core::Var::ones(h, candle_core::DType::F32, &dev).unwrap();
                a.gates = Some(v.as_tensor().clone());
                gates.push(v);
            };
            m.enc.iter_mut().for_each(|l| gate(&mut l.attn));
            m.dec.iter_mut().for_each(|l| gate(&mut l.self_attn));
            m.dec.iter_mut().for_each(|l| gate(&mut l.cross));
            let (src, mask) = source_batch(&[&word], &dev).unwrap();
            let (tin, _, _) = target_batch(&[&phones], &dev).unwrap();
            let mem = m.encode(&src, &mask, Mode::EVAL).unwrap();
            let logits = m.decode(&tin, &mem, &mask, None, Mode::EVAL).unwrap();
            let target = phones.get(t).copied().unwrap_or(EOS) as usize;
            let y = logits.get(0).unwrap().get(t).unwrap().get(target).unwrap();
            assert!((y.to_scalar::<f32>().unwrap() - got.value).abs() < 1e-5);
            let grads = y.backward().unwrap();
            let mut k = 0;
            for (maps, shape) in [&got.maps.encoder, &got.maps.decoder, &got.maps.cross] {
                let [layers, heads, nq, nk] = *shape;
                assert_eq!(maps.len(), layers * heads * nq * nk);
                for l in 0..layers {
                    let want = grads
                        .get(gates[k].as_tensor())
                        .map(|d| d.to_vec1::<f32>().unwrap())
                        .unwrap_or(vec![0.0; heads]);
                    for (hh, want) in want.iter().enumerate() {
                        let at = (l * heads + hh) * nq * nk;
                        let sum: f32 = maps[at..at + nq * nk].iter().sum();
                        assert!(
                            (sum - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "position {t}, module {k}, head {hh}: Σ A⊙∇A = {sum}, ∂y/∂ξ = {want}"
                        );
                    }
                    k += 1;
                }
            }
        }
        assert!(g.weight_grads(&[], &phones).is_err());
    }

    /// The maps recorded from the fused forward: the last decoder layer's cross-attention is
    /// what `cross_weights` computes by its own route, and every row sums to 1.
    #[test]
    fn recorded_maps_match_the_cross_weights() {
        let config = Config {
            d_model: 16,
            heads: 2,
            kv_heads: 2,
            ff: 32,
            enc_layers: 2,
            dec_layers: 2,
            dropout: 0.0,
            ..default_config()
        };
        let g = G2p::new(&config, 5).unwrap();
        let word = encode_word("phone").unwrap();
        let phones: Vec<u32> = ["F", "OW", "N"]
            .iter()
            .map(|p| phone_id(p).unwrap())
            .collect();
        let m = g.attention_maps(&word, &phones).unwrap();
        let dev = Device::Cpu;
        let (src, mask) = source_batch(&[&word], &dev).unwrap();
        let (tin, _, _) = target_batch(&[&phones], &dev).unwrap();
        let mem = g.model.encode(&src, &mask, Mode::EVAL).unwrap();
        let want = g.model.cross_weights(&tin, &mem, &mask).unwrap();
        let (data, [l, h, nt, ns]) = &m.cross;
        let last = &data[(l - 1) * h * nt * ns..];
        assert_eq!(last.len(), want.len());
        let err = last
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-6, "last cross-attention differs by {err}");
        for (data, [_, _, _, nk]) in [&m.encoder, &m.decoder, &m.cross] {
            for row in data.chunks(*nk) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
        // Decoder self-attention is causal: nothing above the diagonal.
        let (data, [_, _, nt, _]) = &m.decoder;
        for (r, row) in data.chunks(*nt).enumerate() {
            assert!(row[r % nt + 1..].iter().all(|&x| x == 0.0));
        }
    }
}
