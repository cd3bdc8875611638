//! `attentive viz`: what a model attends to, as one offline HTML page, SVG files and JSON
//! (attentive-viz), for a BERT-family model's attention on a text or for maps from elsewhere.

use crate::error::CliError;
use crate::outdir;
use attentive_models::Target;
use attentive_viz::relevance::{relevance, Weighted};
use attentive_viz::{Fusion, Maps, Reading, Relevance, Report};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct VizArgs {
    /// A BERT-family model (as for `embed`): its attention on TEXT.
    #[arg(long, conflicts_with_all = ["maps", "tokens", "g2p"], required_unless_present_any = ["maps", "g2p"])]
    model: Option<PathBuf>,
    /// The G2P model's attention (the shipped checkpoint) on this word, as it transcribes it.
    #[arg(long, value_name = "WORD", conflicts_with_all = ["maps", "tokens"])]
    g2p: Option<String>,
    /// Which of the G2P model's attention modules: the encoder's over the letters, the
    /// decoder's over the phonemes, or cross-attention (phonemes over letters).
    #[arg(long, value_enum, default_value = "cross", requires = "g2p")]
    module: ModuleArg,
    /// Maps from elsewhere: float32 .npy of shape [layers, heads, N, N] (or [heads, N, N], or
    /// [N, N]) ...
    #[arg(long, value_name = "FILE.npy", requires = "tokens")]
    maps: Option<PathBuf>,
    /// ... and their tokens, one a line.
    #[arg(long, value_name = "FILE.txt")]
    tokens: Option<PathBuf>,
    /// The folder to write: index.html, attention.json and one SVG per view. Replaced whole; a
    /// folder holding anything else is refused.
    #[arg(long, default_value = "viz")]
    out: PathBuf,
    /// How a layer's heads are fused for rollout and flow.
    #[arg(long, value_enum, default_value = "mean")]
    fusion: FusionArg,
    /// Also compute attention flow for these output positions (each is many max-flows: short
    /// inputs only).
    #[arg(long, value_delimiter = ',', value_name = "I,J,…")]
    flow: Vec<usize>,
    /// Gradient-weighted relevance (with --model) of this dimension of TEXT's embedding.
    #[arg(long, value_name = "K", conflicts_with_all = ["relevance_to", "maps", "g2p"])]
    relevance_dim: Option<usize>,
    /// Gradient-weighted relevance (with --model) of the cosine similarity of TEXT's embedding
    /// and this text's.
    #[arg(long, value_name = "OTHER", conflicts_with_all = ["maps", "g2p"])]
    relevance_to: Option<String>,
    /// Print attention.json's object as the last line.
    #[arg(long)]
    json: bool,
    /// The text to look at (with --model).
    text: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModuleArg {
    Encoder,
    Decoder,
    Cross,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FusionArg {
    Mean,
    Max,
    Min,
}

fn input(what: impl Into<String>, reason: impl ToString) -> CliError {
    CliError::Input {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// A file this command writes (and may replace).
fn ours(p: &Path) -> bool {
    p.extension()
        .is_some_and(|x| x == "svg" || x == "png" || x == "html" || x == "json")
}

pub fn viz(a: VizArgs) -> Result<(), CliError> {
    let folder = outdir::Folder { dest: &a.out, ours };
    folder.check()?;
    let target = match (a.relevance_dim, &a.relevance_to) {
        (Some(d), _) => Some((Target::Dimension(d), None)),
        (None, Some(other)) => Some((Target::Similarity, Some(other.as_str()))),
        (None, None) => None,
    };
    let Loaded {
        maps,
        subtitle,
        reading,
        rows,
        relevance,
    } = match (&a.model, &a.maps) {
        _ if a.g2p.is_some() => from_g2p(a.g2p.as_deref().unwrap_or_default(), a.module)?,
        (Some(model), _) => from_model(model, a.text.as_deref(), target)?,
        (None, Some(maps)) => {
            let tokens = a
                .tokens
                .as_deref()
                .ok_or_else(|| input("--maps", "needs --tokens"))?;
            from_npy(maps, tokens)?
        }
        (None, None) => {
            return Err(input(
                "viz",
                "give --model PATH TEXT or --maps FILE --tokens FILE",
            ))
        }
    };
    let title = a
        .text
        .as_deref()
        .or(a.g2p.as_deref())
        .unwrap_or("Attention maps");
    let mut report = Report::new(&maps, title);
    report.subtitle = subtitle;
    report.fusion = match a.fusion {
        FusionArg::Mean => Fusion::Mean,
        FusionArg::Max => Fusion::Max,
        FusionArg::Min => Fusion::Min,
    };
    report.reading = reading;
    report.rows = rows;
    report.flow_rows = a.flow.clone();
    report.relevance = relevance;
    let out = report.build().map_err(|e| input("attention maps", e))?;
    let files = folder.build(|dir| {
        let mut names = vec!["index.html".to_string(), "attention.json".to_string()];
        write(&dir.join("index.html"), out.html.as_bytes())?;
        let json = serde_json::to_string(&out.json).map_err(|e| input("attention.json", e))?;
        write(&dir.join("attention.json"), json.as_bytes())?;
        for (name, svg) in &out.svgs {
            write(&dir.join(name), svg.as_bytes())?;
            names.push(name.clone());
        }
        // Each view also as PNG at twice its size, rendered in parallel.
        use rayon::prelude::*;
        let pngs: Vec<(String, Vec<u8>)> = out
            .svgs
            .par_iter()
            .map(|(name, svg)| {
                let png = attentive_viz::png::png(svg, 2.0).map_err(|e| input(name.clone(), e))?;
                Ok((name.replace(".svg", ".png"), png))
            })
            .collect::<Result<_, CliError>>()?;
        for (name, png) in pngs {
            write(&dir.join(&name), &png)?;
            names.push(name);
        }
        Ok(names)
    })?;
    let [l, h, nq, nk] = maps.shape();
    out!(
        "{l} layers × {h} heads over {nq}×{nk} tokens → {} ({} files: index.html, attention.json, each view as SVG and PNG)",
        a.out.display(),
        files.len()
    );
    for w in maps.row_sum_warnings().iter().take(3) {
        out!(
            "warning: layer {}, head {}, row {} sums to {:.4}, not 1 (kept as given)",
            w.layer,
            w.head,
            w.row,
            w.sum
        );
    }
    if a.json {
        out!("{}", out.json);
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    std::fs::write(path, bytes).map_err(|e| input(path.display().to_string(), e))
}

/// What a report is built from.
struct Loaded {
    maps: Maps,
    subtitle: String,
    reading: Option<Reading>,
    rows: Option<Vec<bool>>,
    relevance: Option<Relevance>,
}

/// A BERT's attention on `text`: every layer's maps from the kernel, its tokens, the reading
/// its pooling implies ([CLS]'s row, or the mean of the rows), and with a `target`, the
/// gradient-weighted relevance of that output (a dimension, or the similarity to another text).
fn from_model(
    path: &Path,
    text: Option<&str>,
    target: Option<(Target, Option<&str>)>,
) -> Result<Loaded, CliError> {
    let text = text.ok_or_else(|| input("viz --model", "give the TEXT to look at"))?;
    if text.trim().is_empty() {
        return Err(input("TEXT", "is empty: give some words to look at"));
    }
    let model = attentive_models::SentenceEncoder::load(path).map_err(|e| input("model", e))?;
    let reading_of = |n: usize| match model.pooling.cls {
        true => Reading::Row(0),
        false => Reading::MeanOf(vec![true; n]),
    };
    let c = &model.bert.config;
    let (layers, heads) = (c.num_hidden_layers, c.num_attention_heads);
    let batch = model.tokenize(&[text]).map_err(|e| input("model", e))?;
    let n = batch.n;
    let mut explained = None;
    let data: Vec<f32> = match target {
        None => {
            let out = model
                .bert
                .forward(&batch.ids, &batch.mask, Some(&batch.types), n, true)
                .map_err(|e| input("model", e))?;
            out.attentions.unwrap_or_default().concat()
        }
        Some((target, other)) => {
            if other.is_some_and(|o| o.trim().is_empty()) {
                return Err(input(
                    "--relevance-to",
                    "is empty: give the text to compare with",
                ));
            }
            let texts: Vec<&str> = std::iter::once(text).chain(other).collect();
            let ex = model
                .explain(&texts, target.clone())
                .map_err(|e| input("relevance", e))?;
            let weighted = |s: usize| {
                let m = ex.sentences[s].tokens.len();
                Weighted::new(ex.sentences[s].weight_grads.concat(), [layers, heads, m, m])
                    .map_err(|e| input("relevance", e))
            };
            let partner = match ex.sentences.get(1) {
                None => None,
                Some(p) => {
                    let m = p.tokens.len();
                    let mut r = relevance(&weighted(1)?)
                        .map_err(|e| input("relevance", e))?
                        .pop()
                        .expect("at least one layer");
                    (0..m).for_each(|i| r[i * m + i] -= 1.0);
                    let reading = reading_of(m);
                    let values = reading.read(&r, m).map_err(|e| input("relevance", e))?;
                    let title = format!(
                        "The other sentence: {} of R − I",
                        reading.describe(&p.tokens)
                    );
                    Some((title, p.tokens.clone(), values))
                }
            };
            explained = Some(Relevance {
                weighted: weighted(0)?,
                target: target.describe(),
                value: ex.value,
                partner,
            });
            ex.sentences[0].attentions.concat()
        }
    };
    let tokens = model.token_strings(&batch.ids);
    let mut subtitle = format!(
        "{} · {layers} layers × {heads} heads · {n} tokens",
        path.file_name()
            .map_or(String::new(), |f| f.to_string_lossy().into_owned())
    );
    if batch.truncated[0] {
        subtitle += &format!(
            " (the text was cut at the model's {} tokens)",
            model.max_len
        );
    }
    let maps = Maps::self_attention(data, [layers, heads, n], tokens)
        .map_err(|e| input("attention maps", e))?;
    Ok(Loaded {
        maps,
        subtitle,
        reading: Some(reading_of(n)),
        rows: Some(batch.mask),
        relevance: explained,
    })
}

/// The G2P model's attention on `word` as it transcribes it (greedy decoding, then teacher
/// forcing on its own phonemes): one module's maps, every layer and head.
fn from_g2p(word: &str, module: ModuleArg) -> Result<Loaded, CliError> {
    use attentive_nn::g2p::{encode_word, phone_name};
    let (model, _) = crate::g2p::load_model(None)?;
    let max = model.model.config.max_len;
    let word = word.to_lowercase();
    let code = encode_word(&word)
        .filter(|c| !c.is_empty() && c.len() < max)
        .ok_or_else(|| {
            input(
                format!("--g2p '{word}'"),
                format!("must be 1 to {} letters a–z or apostrophes", max - 1),
            )
        })?;
    let g2p_err = crate::g2p::nn_err;
    let phones = model.greedy(&[&code]).map_err(g2p_err)?.remove(0);
    let maps = model.attention_maps(&code, &phones).map_err(g2p_err)?;
    let letters: Vec<String> = word.chars().map(String::from).collect();
    let written: Vec<String> = std::iter::once("<s>".to_string())
        .chain(phones.iter().map(|&p| phone_name(p).to_string()))
        .collect();
    let ((data, shape), q, k, what) = match module {
        ModuleArg::Encoder => (maps.encoder, &letters, &letters, "encoder self-attention"),
        ModuleArg::Decoder => (maps.decoder, &written, &written, "decoder self-attention"),
        ModuleArg::Cross => (maps.cross, &written, &letters, "cross-attention"),
    };
    let subtitle = format!(
        "G2P (the shipped checkpoint) · {what} · {word} → {} · {} layers × {} heads",
        written[1..].join(" "),
        shape[0],
        shape[1]
    );
    let m = Maps::new(data, shape, q.clone(), k.clone()).map_err(|e| input("G2P maps", e))?;
    Ok(Loaded {
        maps: m,
        subtitle,
        reading: None,
        rows: None,
        relevance: None,
    })
}

/// Maps and tokens from files: `[L, H, N, N]`, `[H, N, N]` or `[N, N]` float32.
fn from_npy(maps: &Path, tokens: &Path) -> Result<Loaded, CliError> {
    let arr = crate::npy::read_f32(maps)?;
    let text =
        std::fs::read_to_string(tokens).map_err(|e| input(tokens.display().to_string(), e))?;
    let tokens: Vec<String> = text.lines().map(str::to_string).collect();
    if tokens.is_empty() {
        return Err(input("--tokens", "holds no token"));
    }
    let shape: [usize; 4] = match arr.shape.as_slice() {
        &[l, h, q, k] => [l, h, q, k],
        &[h, q, k] => [1, h, q, k],
        &[q, k] => [1, 1, q, k],
        s => {
            return Err(input(
                maps.display().to_string(),
                format!("shape {s:?}: expected [layers, heads, N, N], [heads, N, N] or [N, N]"),
            ))
        }
    };
    let m = Maps::new(arr.data, shape, tokens.clone(), tokens)
        .map_err(|e| input(maps.display().to_string(), e))?;
    let subtitle = format!(
        "{} · {} layers × {} heads",
        maps.display(),
        shape[0],
        shape[1]
    );
    Ok(Loaded {
        maps: m,
        subtitle,
        reading: None,
        rows: None,
        relevance: None,
    })
}
