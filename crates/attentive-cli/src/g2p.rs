//! `attentive train g2p` and `attentive demo`: the spelling-to-pronunciation model.

use crate::error::CliError;
use attentive_nn::g2p::{self, encode_word, phone_name, Entry, G2p, Split, TrainOptions};
use attentive_nn::transformer::Config;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The shipped checkpoint, trained by `attentive train g2p`.
static MODEL: &[u8] = include_bytes!("../model/g2p/model.safetensors");
static CONFIG: &str = include_str!("../model/g2p/config.json");

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Wall-clock minutes to train for.
    #[arg(long, default_value_t = 80.0)]
    minutes: f64,
    /// Seed of the initial weights and of the order of the training words.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the checkpoint (model.safetensors, config.json) goes.
    #[arg(long, default_value = "g2p-model")]
    out: PathBuf,
    /// Minutes between validation checks.
    #[arg(long, default_value_t = 5.0)]
    valid_every: f64,
    /// Train through candle's unfused attention instead of the fused kernel (for comparison).
    #[arg(long)]
    unfused: bool,
}

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Words to transcribe (default: a few examples).
    words: Vec<String>,
    /// Beam width (1 = greedy).
    #[arg(long, default_value_t = 1)]
    beam: usize,
    /// Print one JSON object as the last line: per, wer and the transcriptions.
    #[arg(long)]
    json: bool,
    /// Directory for the alignment heatmaps (one SVG per word) and the HTML page.
    #[arg(long, default_value = "g2p-demo")]
    out: PathBuf,
    /// Print the test words and exit.
    #[arg(long)]
    list_test_words: bool,
    /// A checkpoint directory to use instead of the shipped model.
    #[arg(long)]
    model: Option<PathBuf>,
}

fn nn_err(e: impl std::fmt::Display) -> CliError {
    CliError::Input {
        what: "model".into(),
        reason: e.to_string(),
    }
}

pub fn train(a: TrainArgs) -> Result<(), CliError> {
    let config = g2p::default_config();
    let opts = TrainOptions {
        seconds: a.minutes * 60.0,
        seed: a.seed,
        valid_every_s: a.valid_every * 60.0,
        unfused: a.unfused,
        ..Default::default()
    };
    let bar = indicatif::ProgressBar::new(opts.seconds.ceil() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] ETA {eta} | {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut last_valid = String::from("valid PER -");
    let mut last_line = 0.0;
    let model = g2p::train(&config, &opts, |p| {
        // Without a terminal the bar is hidden: a line every half minute shows progress instead.
        let quiet_tick = bar.is_hidden() && p.elapsed_s - last_line >= 30.0;
        if let Some((per, wer)) = p.valid {
            last_valid = format!("valid PER {per:.2}% WER {wer:.1}%");
        }
        if p.valid.is_some() || quiet_tick {
            last_line = p.elapsed_s;
            let line = format!(
                "step {:6}  {:7.1} s  loss {:.4}  {:.0} tokens/s  {last_valid}",
                p.step, p.elapsed_s, p.loss, p.tokens_per_s
            );
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
        bar.set_position(p.elapsed_s as u64);
        bar.set_message(format!(
            "step {} loss {:.4} {:.0} tokens/s {last_valid}",
            p.step, p.loss, p.tokens_per_s
        ));
    })
    .map_err(nn_err)?;
    bar.finish();
    attentive_nn::train::save_checkpoint(&a.out, &model.params, &config).map_err(nn_err)?;
    // The test-set score of this checkpoint, recorded beside it for `demo` to reproduce.
    let test = g2p::load(Split::Test);
    let (per, wer) = evaluate(&model, &test)?;
    let record = serde_json::json!({
        "per": per,
        "wer": wer,
        "test_words": test.len(),
        "minutes": a.minutes,
        "seed": a.seed,
        "command": format!("attentive train g2p --minutes {} --seed {}", a.minutes, a.seed),
    });
    let path = a.out.join("eval.json");
    std::fs::write(&path, format!("{record:#}\n")).map_err(|e| CliError::Input {
        what: path.display().to_string(),
        reason: e.to_string(),
    })?;
    out!(
        "checkpoint written to {}; test set: PER {per:.2}%, WER {wer:.2}%",
        a.out.display()
    );
    Ok(())
}

fn load_model(dir: Option<&Path>) -> Result<G2p, CliError> {
    let (config, bytes): (Config, Vec<u8>) = match dir {
        Some(d) => (
            attentive_nn::train::load_config(d).map_err(nn_err)?,
            std::fs::read(d.join("model.safetensors")).map_err(|e| CliError::Input {
                what: d.join("model.safetensors").display().to_string(),
                reason: e.to_string(),
            })?,
        ),
        None => (
            serde_json::from_str(CONFIG).map_err(nn_err)?,
            MODEL.to_vec(),
        ),
    };
    let m = G2p::new(&config, 0).map_err(nn_err)?;
    m.params.load_bytes(&bytes).map_err(nn_err)?;
    Ok(m)
}

pub fn demo(a: DemoArgs) -> Result<(), CliError> {
    let test = g2p::load(Split::Test);
    if a.list_test_words {
        for e in &test {
            out!("{}", e.word);
        }
        return Ok(());
    }
    let t0 = Instant::now();
    let model = load_model(a.model.as_deref())?;
    let words: Vec<String> = if a.words.is_empty() {
        [
            "attention",
            "transformer",
            "pronunciation",
            "rust",
            "weighed",
        ]
        .map(String::from)
        .to_vec()
    } else {
        a.words.iter().map(|w| w.to_lowercase()).collect()
    };
    std::fs::create_dir_all(&a.out).map_err(|e| CliError::Input {
        what: a.out.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut results = Vec::new();
    let mut page = String::from(HTML_HEAD);
    for w in &words {
        let Some(code) =
            encode_word(w).filter(|c| !c.is_empty() && c.len() < model.model.config.max_len)
        else {
            return Err(CliError::Input {
                what: format!("word '{w}'"),
                reason: "must be 1 to 39 letters a–z or apostrophes".into(),
            });
        };
        let phones = if a.beam > 1 {
            model.beam(&code, a.beam).map_err(nn_err)?
        } else {
            model.greedy(&[&code]).map_err(nn_err)?.remove(0)
        };
        let align = model.alignment(&code, &phones).map_err(nn_err)?;
        let names: Vec<&str> = phones.iter().map(|&p| phone_name(p)).collect();
        out!("{w:>16}  {}", names.join(" "));
        let svg = heatmap_svg(w, &names, &align);
        let file = a.out.join(format!("{}.svg", sanitize(w)));
        std::fs::write(&file, &svg).map_err(|e| CliError::Input {
            what: file.display().to_string(),
            reason: e.to_string(),
        })?;
        page.push_str(&format!(
            "<section><h2>{w}</h2><p>/{}/</p>{svg}</section>\n",
            names.join(" ")
        ));
        results.push((w.clone(), names.join(" ")));
    }
    let (per, wer) = evaluate(&model, &test)?;
    out!(
        "test set: {} words, PER {per:.2}%, WER {wer:.2}% (greedy), {:.1} s",
        test.len(),
        t0.elapsed().as_secs_f64()
    );
    page.push_str(&format!(
        "<p>Test set: {} held-out words, phoneme error rate {per:.2}%, word error rate {wer:.2}%.</p></body></html>\n",
        test.len()
    ));
    let html = a.out.join("index.html");
    std::fs::write(&html, page).map_err(|e| CliError::Input {
        what: html.display().to_string(),
        reason: e.to_string(),
    })?;
    out!(
        "alignments: {} (one SVG per word and {})",
        a.out.display(),
        html.display()
    );
    if a.json {
        let obj = serde_json::json!({
            "per": per,
            "wer": wer,
            "test_words": test.len(),
            "transcriptions": results.iter().map(|(w, p)| serde_json::json!({"word": w, "phones": p})).collect::<Vec<_>>(),
        });
        out!("{obj}");
    }
    Ok(())
}

/// Greedy test-set PER and WER (%).
pub fn evaluate(model: &G2p, test: &[Entry]) -> Result<(f64, f64), CliError> {
    let (per, wer, _) = model.evaluate(test, 512).map_err(nn_err)?;
    Ok((per, wer))
}

fn sanitize(w: &str) -> String {
    w.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

const HTML_HEAD: &str = "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>attentive: \
what the model looked at</title><style>body{font-family:sans-serif;margin:2em;max-width:60em}\
section{display:inline-block;margin:1em;vertical-align:top}</style></head><body>\
<h1>Cross-attention alignments</h1><p>Each row is a phoneme the model wrote; each column a letter \
it read. Darker cells carry more attention weight (last decoder layer, averaged over heads).</p>\n";

/// A heatmap of `align` (rows: phonemes, columns: letters) as a self-contained SVG.
pub fn heatmap_svg(word: &str, phones: &[&str], align: &[Vec<f32>]) -> String {
    let letters: Vec<char> = word.chars().collect();
    let (cell, left, top) = (28.0, 44.0, 28.0);
    let (w, h) = (
        left + cell * letters.len() as f64 + 8.0,
        top + cell * phones.len() as f64 + 8.0,
    );
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"monospace\" font-size=\"13\">"
    );
    for (c, l) in letters.iter().enumerate() {
        let x = left + cell * c as f64 + cell / 2.0;
        s.push_str(&format!(
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{l}</text>",
            top - 8.0
        ));
    }
    for (r, p) in phones.iter().enumerate() {
        let y = top + cell * r as f64;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{p}</text>",
            left - 6.0,
            y + cell * 0.65
        ));
        for (c, &a) in align
            .get(r)
            .map(|v| v.as_slice())
            .unwrap_or(&[])
            .iter()
            .enumerate()
        {
            let shade = (255.0 * (1.0 - a.clamp(0.0, 1.0))) as u8;
            s.push_str(&format!(
                "<rect x=\"{}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({shade},{shade},255)\" stroke=\"#ddd\"><title>{p} ← {}: {a:.3}</title></rect>",
                left + cell * c as f64,
                letters.get(c).copied().unwrap_or('?'),
            ));
        }
    }
    s.push_str("</svg>");
    s
}
