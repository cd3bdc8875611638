//! `attentive train g2p` and `attentive demo`: the spelling-to-pronunciation model.

use crate::error::CliError;
use crate::outdir;
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
    /// The checkpoint folder (model.safetensors, config.json, the test score eval.json), written
    /// whole when training ends; a folder holding other files is refused before training.
    #[arg(long, default_value = "g2p-model")]
    out: PathBuf,
    /// Minutes between validation checks.
    #[arg(long, default_value_t = 5.0)]
    valid_every: f64,
    /// Train through candle's unfused attention instead of the fused kernel (for comparison).
    #[arg(long)]
    unfused: bool,
    /// What self-attention computes: exact (the fused kernel), linear (φ = elu + 1),
    /// performer (64 random features), lsh (2 rounds, chunks of 4; decoded without a cache),
    /// linformer (k = 8; the decoder keeps exact attention, having no causal form), gla (gates
    /// from the keys) or adaptive-span (up to 32 keys back; these two are causal only, so the
    /// encoder keeps exact attention). Cross-attention stays exact.
    #[arg(long, default_value = "exact", value_parser = clap::builder::PossibleValuesParser::new(attentive_nn::variants::SelfAttention::NAMES))]
    attention: String,
    /// Score the checkpoint on the first N words of the test split only (default: all of it),
    /// for quick runs; eval.json records how many.
    #[arg(long)]
    test_words: Option<usize>,
}

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Words to transcribe (default: six words of the held-out test split, which the model
    /// never saw in training).
    words: Vec<String>,
    /// Beam width (1 = greedy decoding).
    #[arg(long, default_value_t = 1)]
    beam: usize,
    /// Print one JSON object as the last line: the test score, the decoding, and each word's
    /// transcription beside the dictionary's.
    #[arg(long)]
    json: bool,
    /// Directory for the alignment heatmaps (one SVG per word) and the HTML page; each run
    /// replaces it whole.
    #[arg(long, default_value = "g2p-demo")]
    out: PathBuf,
    /// Print the test words and exit.
    #[arg(long)]
    list_test_words: bool,
    /// A checkpoint directory to use instead of the shipped model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Score the test split again even when a score of this checkpoint is cached.
    #[arg(long)]
    rescore: bool,
}

/// The default words: from the held-out test split (a test checks it), so what the demo shows is
/// what the model does on words it never trained on, right or wrong.
const SHOWCASE: [&str; 6] = [
    "electricity",
    "heirloom",
    "penultimate",
    "languish",
    "odometer",
    "christensen",
];

pub(crate) fn nn_err(e: impl std::fmt::Display) -> CliError {
    CliError::Input {
        what: "model".into(),
        reason: e.to_string(),
    }
}

pub fn train(a: TrainArgs) -> Result<(), CliError> {
    // Refused before training, not after: a folder holding more than a checkpoint.
    let folder = outdir::Folder {
        dest: &a.out,
        ours: checkpoint_file,
    };
    folder.check()?;
    let config = Config {
        attention: attentive_nn::variants::SelfAttention::parse(&a.attention)
            .expect("clap checked the name"),
        ..g2p::default_config()
    };
    if a.unfused && a.attention != "exact" {
        return Err(CliError::Input {
            what: "--unfused".into(),
            reason: "compares exact attention's two implementations: not with --attention".into(),
        });
    }
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
    let (per, wer) = folder.build(|dir| {
        attentive_nn::train::save_checkpoint(dir, &model.params, &config).map_err(nn_err)?;
        // The test-set score of this checkpoint, recorded beside it for `demo` to reproduce,
        // and cached where `demo` looks for it.
        let mut test = g2p::load(Split::Test);
        test.truncate(a.test_words.unwrap_or(usize::MAX));
        let (_, hash) = load_model(Some(dir))?;
        let path = score_path(Some(dir), hash);
        let Scored { per, wer, .. } = test_score(&model, hash, path.as_deref(), &test, true)?;
        let record = serde_json::json!({
            "per": per,
            "wer": wer,
            "test_words": test.len(),
            "minutes": a.minutes,
            "seed": a.seed,
            "attention": a.attention,
            "command": format!(
                "attentive train g2p --minutes {} --seed {} --attention {}{}",
                a.minutes,
                a.seed,
                a.attention,
                a.test_words.map_or(String::new(), |n| format!(" --test-words {n}"))
            ),
        });
        let path = dir.join("eval.json");
        std::fs::write(&path, format!("{record:#}\n")).map_err(|e| CliError::Input {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok((per, wer))
    })?;
    out!(
        "checkpoint written to {}; test set: PER {per:.2}%, WER {wer:.2}%",
        a.out.display()
    );
    Ok(())
}

/// The files a checkpoint folder holds (what `train` may replace).
fn checkpoint_file(p: &Path) -> bool {
    let name = p
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    ["model.safetensors", "config.json", "eval.json"].contains(&name.as_str())
        || (name.starts_with("g2p-test-score-") && name.ends_with(".json"))
}

/// A checkpoint and the FNV-1a hash of its bytes (config and weights), which keys its cached
/// test score.
pub(crate) fn load_model(dir: Option<&Path>) -> Result<(G2p, u64), CliError> {
    let read = |p: PathBuf| {
        std::fs::read(&p).map_err(|e| CliError::Input {
            what: p.display().to_string(),
            reason: e.to_string(),
        })
    };
    let (config, config_bytes, bytes): (Config, Vec<u8>, Vec<u8>) = match dir {
        Some(d) => (
            attentive_nn::train::load_config(d).map_err(nn_err)?,
            read(d.join("config.json"))?,
            read(d.join("model.safetensors"))?,
        ),
        None => (
            serde_json::from_str(CONFIG).map_err(nn_err)?,
            CONFIG.as_bytes().to_vec(),
            MODEL.to_vec(),
        ),
    };
    let m = G2p::new(&config, 0).map_err(nn_err)?;
    m.params.load_bytes(&bytes).map_err(nn_err)?;
    let hash = [config_bytes, bytes]
        .concat()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    Ok((m, hash))
}

/// Where a checkpoint's test score is cached: beside a checkpoint directory, or for the shipped
/// model in the user's cache directory (`$XDG_CACHE_HOME` or `~/.cache`, then `attentive/`).
fn score_path(model: Option<&Path>, hash: u64) -> Option<PathBuf> {
    let name = format!("g2p-test-score-{hash:016x}.json");
    match model {
        Some(d) => Some(d.join(name)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("attentive").join(name)),
    }
}

/// The test split's greedy PER and WER of this checkpoint: from the cache when it holds them
/// (same checkpoint hash, same test words), else computed and cached. Returns (per, wer, cached).
fn test_score(
    model: &G2p,
    hash: u64,
    path: Option<&Path>,
    test: &[Entry],
    rescore: bool,
) -> Result<Scored, CliError> {
    let key = format!("{hash:016x}");
    if let Some(j) = path
        .filter(|_| !rescore)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|j| j["checkpoint"] == key.as_str() && j["test_words"] == test.len())
    {
        let importance =
            serde_json::from_value::<Vec<(String, Vec<Vec<f32>>)>>(j["head_importance"].clone());
        if let (Some(per), Some(wer), Ok(importance)) =
            (j["per"].as_f64(), j["wer"].as_f64(), importance)
        {
            return Ok(Scored {
                per,
                wer,
                importance,
                cached: true,
            });
        }
    }
    let (per, wer) = evaluate(model, test)?;
    // Which heads matter (Michel et al.): |∂loss/∂gate| over the first held-out words.
    let importance = model
        .head_importance(&test[..test.len().min(IMPORTANCE_WORDS)])
        .map_err(|e| CliError::Input {
            what: "head importance".into(),
            reason: e.to_string(),
        })?
        .into_iter()
        .map(|(m, layers)| (m.to_string(), layers))
        .collect();
    let scored = Scored {
        per,
        wer,
        importance,
        cached: false,
    };
    if let Some(p) = path {
        cache_score(p, hash, &scored, test.len());
    }
    Ok(scored)
}

/// A checkpoint's greedy test score and head importances, and whether they came from the cache.
struct Scored {
    per: f64,
    wer: f64,
    /// Per attention module, `[layers][heads]`.
    importance: Vec<(String, Vec<Vec<f32>>)>,
    cached: bool,
}

/// Records a checkpoint's greedy test score where [`test_score`] looks for it. A cache that
/// cannot be written (a read-only directory) only costs the next call the scoring time.
fn cache_score(path: &Path, hash: u64, s: &Scored, words: usize) {
    let record = serde_json::json!({
        "checkpoint": format!("{hash:016x}"), "per": s.per, "wer": s.wer, "test_words": words,
        "decoding": "greedy", "head_importance": s.importance,
    });
    if path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .is_ok()
    {
        let _ = crate::outdir::write(path, format!("{record:#}\n").as_bytes());
    }
}

/// One step of the cheapest edit from the model's phonemes to the dictionary's.
#[derive(Clone, Copy, PartialEq)]
enum Edit {
    Same(u32),
    /// The model wrote the first where the dictionary has the second.
    Sub(u32, u32),
    /// A phoneme the model wrote that the dictionary does not have.
    Extra(u32),
    /// A dictionary phoneme the model left out.
    Missing(u32),
}

/// The edits of a minimal (Levenshtein) alignment of `model` to `dict`, in order.
fn edits(model: &[u32], dict: &[u32]) -> Vec<Edit> {
    let (n, m) = (model.len(), dict.len());
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=m).collect();
    for i in 1..=n {
        for j in 1..=m {
            d[i][j] = (d[i - 1][j - 1] + (model[i - 1] != dict[j - 1]) as usize)
                .min(d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1);
        }
    }
    let (mut i, mut j, mut out) = (n, m, Vec::new());
    while i > 0 || j > 0 {
        if i > 0 && j > 0 && d[i][j] == d[i - 1][j - 1] + (model[i - 1] != dict[j - 1]) as usize {
            out.push(if model[i - 1] == dict[j - 1] {
                Edit::Same(model[i - 1])
            } else {
                Edit::Sub(model[i - 1], dict[j - 1])
            });
            (i, j) = (i - 1, j - 1);
        } else if i > 0 && d[i][j] == d[i - 1][j] + 1 {
            out.push(Edit::Extra(model[i - 1]));
            i -= 1;
        } else {
            out.push(Edit::Missing(dict[j - 1]));
            j -= 1;
        }
    }
    out.reverse();
    out
}

/// A word as the demo shows it.
struct Shown {
    word: String,
    phones: Vec<u32>,
    /// Decoding stopped at the decoder's length limit before the end-of-word symbol.
    cut: bool,
    /// The dictionary's split of the word, when the dictionary has it.
    split: Option<Split>,
    /// The dictionary pronunciation closest to the model's, and the edits between them.
    closest: Option<(Vec<u32>, Vec<Edit>)>,
    align: Vec<Vec<f32>>,
    /// Row t: gradient-weighted relevance of each letter to phoneme t; `None` for a model whose
    /// self-attention forms no weights (a variant other than exact).
    relevance: Option<Vec<Vec<f32>>>,
}

impl Shown {
    fn errors(&self) -> Option<usize> {
        self.closest
            .as_ref()
            .map(|(_, e)| e.iter().filter(|e| !matches!(e, Edit::Same(_))).count())
    }

    fn split_note(&self) -> &'static str {
        match self.split {
            Some(Split::Test) => "held-out test word",
            Some(Split::Valid) => "validation word (not trained on)",
            Some(Split::Train) => "training word (the model trained on it)",
            None => "not in the dictionary",
        }
    }
}

fn names(p: &[u32]) -> String {
    p.iter()
        .map(|&x| phone_name(x))
        .collect::<Vec<_>>()
        .join(" ")
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
    let io = |p: &Path, e: std::io::Error| CliError::Input {
        what: p.display().to_string(),
        reason: e.to_string(),
    };
    // The folder is replaced whole at the end; one that is not a demo's is refused up front.
    let folder = outdir::Folder {
        dest: &a.out,
        ours: |p| p.extension().is_some_and(|x| x == "svg" || x == "html"),
    };
    folder.check()?;
    let (model, hash) = load_model(a.model.as_deref())?;
    let max_len = model.model.config.max_len;
    let words: Vec<String> = if a.words.is_empty() {
        SHOWCASE.map(String::from).to_vec()
    } else {
        a.words.iter().map(|w| w.to_lowercase()).collect()
    };
    let mut shown = Vec::new();
    for w in &words {
        let Some(code) = encode_word(w).filter(|c| !c.is_empty() && c.len() < max_len) else {
            return Err(CliError::Input {
                what: format!("word '{w}'"),
                reason: format!(
                    "must be 1 to {} letters a–z or apostrophes (the encoder's limit)",
                    max_len - 1
                ),
            });
        };
        let phones = if a.beam > 1 {
            model.beam(&code, a.beam).map_err(nn_err)?
        } else {
            model.greedy(&[&code]).map_err(nn_err)?.remove(0)
        };
        let align = model.alignment(&code, &phones).map_err(nn_err)?;
        let exact = model.model.config.attention == attentive_nn::variants::SelfAttention::Exact;
        let relevance = exact
            .then(|| letter_relevance(&model, &code, &phones))
            .transpose()?;
        let entry = g2p::lookup(w);
        let closest = entry.as_ref().map(|e| {
            let best = e
                .prons
                .iter()
                .min_by_key(|r| g2p::edit_distance(&phones, r))
                .expect("every entry has a pronunciation");
            (best.clone(), edits(&phones, best))
        });
        shown.push(Shown {
            word: w.clone(),
            cut: phones.len() + 1 >= max_len,
            phones,
            split: entry.map(|_| g2p::split_of(w)),
            closest,
            align,
            relevance,
        });
    }
    let decoding = if a.beam > 1 {
        format!("beam search, width {}", a.beam)
    } else {
        "greedy".to_string()
    };
    for s in &shown {
        let marked: Vec<String> = match &s.closest {
            Some((_, e)) => e
                .iter()
                .filter_map(|e| match *e {
                    Edit::Same(p) => Some(phone_name(p).to_string()),
                    Edit::Sub(p, _) | Edit::Extra(p) => Some(format!("[{}]", phone_name(p))),
                    Edit::Missing(_) => None,
                })
                .collect(),
            None => s
                .phones
                .iter()
                .map(|&p| phone_name(p).to_string())
                .collect(),
        };
        out!(
            "{:>16}  model:      {}{}",
            s.word,
            marked.join(" "),
            if s.cut {
                "  (cut at the decoder's length limit)"
            } else {
                ""
            }
        );
        match (&s.closest, s.errors()) {
            (Some((d, _)), Some(n)) => out!(
                "{:>16}  dictionary: {}  ({}; {})",
                "",
                names(d),
                if n == 0 {
                    "exact".to_string()
                } else {
                    format!("{n} phoneme error{}", if n == 1 { "" } else { "s" })
                },
                s.split_note()
            ),
            _ => out!("{:>16}  {}", "", s.split_note()),
        }
    }
    out!("decoding: {decoding}; [X] marks a phoneme that differs from the dictionary's");
    let cache = score_path(a.model.as_deref(), hash);
    let t_score = Instant::now();
    let Scored {
        per,
        wer,
        importance,
        cached,
    } = test_score(&model, hash, cache.as_deref(), &test, a.rescore)?;
    out!(
        "test set: {} held-out words, PER {per:.2}%, WER {wer:.2}% (greedy decoding; {}), {:.1} s in all",
        test.len(),
        match (&cache, cached) {
            (Some(p), true) => format!("cached in {}", p.display()),
            _ => format!("scored in {:.1} s", t_score.elapsed().as_secs_f64()),
        },
        t0.elapsed().as_secs_f64()
    );
    folder.build(|dir| {
        let mut page = String::from(HTML_HEAD);
        page.push_str(&format!(
            "<p>Decoding: <b>{decoding}</b>. {}</p>\n",
            if a.words.is_empty() {
                "The words are from the held-out test split of the dictionary: the model never saw them in training."
            } else {
                "Each word says whether the model saw it in training."
            }
        ));
        for s in &shown {
            let (svg, head_view, relevance) = alignment_svgs(s);
            let stem = sanitize(&s.word);
            for (file, text) in [
                (format!("{stem}.svg"), Some(&svg)),
                (format!("{stem}-headview.svg"), Some(&head_view)),
                (format!("{stem}-relevance.svg"), relevance.as_ref()),
            ] {
                let Some(text) = text else { continue };
                let file = dir.join(file);
                std::fs::write(&file, text).map_err(|e| io(&file, e))?;
            }
            let relevance = relevance.unwrap_or_else(|| {
                "<p class=\"note\">No relevance picture: this model's self-attention forms no \
                 attention weights.</p>"
                    .to_string()
            });
            page.push_str(&format!(
                "<section><h2>{}</h2><p class=\"note\">{}{}</p>{}{svg}{head_view}{relevance}</section>\n",
                s.word,
                s.split_note(),
                if s.cut { "; cut at the decoder's length limit" } else { "" },
                comparison_html(s)
            ));
        }
        page.push_str(&format!(
            "<p>Test set: {} held-out words, phoneme error rate {per:.2}%, word error rate {wer:.2}% \
             (greedy decoding).</p>\n{}{}</body></html>\n",
            test.len(),
            importance_html(&importance, test.len().min(IMPORTANCE_WORDS)),
            arpabet_key()
        ));
        let html = dir.join("index.html");
        std::fs::write(&html, page).map_err(|e| io(&html, e))
    })?;
    out!(
        "alignments: {} (one SVG per word and {})",
        a.out.display(),
        a.out.join("index.html").display()
    );
    if a.json {
        let obj = serde_json::json!({
            "per": per,
            "wer": wer,
            "test_words": test.len(),
            "score": {"decoding": "greedy", "cached": cached},
            "decoding": if a.beam > 1 { serde_json::json!({"mode": "beam", "width": a.beam}) }
                        else { serde_json::json!({"mode": "greedy"}) },
            "seconds": t0.elapsed().as_secs_f64(),
            "head_importance": importance.iter().map(|(m, layers)| serde_json::json!({
                "module": m, "layers": layers,
            })).collect::<Vec<_>>(),
            "transcriptions": shown.iter().map(|s| serde_json::json!({
                "word": s.word,
                "phones": names(&s.phones),
                "dictionary": s.closest.as_ref().map(|(d, _)| names(d)),
                "errors": s.errors(),
                "split": s.split.map(|x| format!("{x:?}").to_lowercase()),
                "cut": s.cut,
                "relevance": s.relevance,
            })).collect::<Vec<_>>(),
        });
        out!("{obj}");
    }
    Ok(())
}

/// The model's phonemes above the dictionary's, aligned, with every difference marked.
fn comparison_html(s: &Shown) -> String {
    let Some((_, e)) = &s.closest else {
        return format!("<p>model: /{}/</p>", names(&s.phones));
    };
    let (mut top, mut bottom) = (String::new(), String::new());
    for e in e {
        let (m, d, bad) = match *e {
            Edit::Same(p) => (phone_name(p), phone_name(p), false),
            Edit::Sub(p, q) => (phone_name(p), phone_name(q), true),
            Edit::Extra(p) => (phone_name(p), "–", true),
            Edit::Missing(q) => ("–", phone_name(q), true),
        };
        let class = if bad { " class=\"err\"" } else { "" };
        top.push_str(&format!("<td{class}>{m}</td>"));
        bottom.push_str(&format!("<td{class}>{d}</td>"));
    }
    let n = s.errors().unwrap_or(0);
    format!(
        "<table class=\"cmp\"><tr><th>model</th>{top}</tr><tr><th>dictionary</th>{bottom}</tr></table>\
         <p>{}</p>",
        if n == 0 { "exactly the dictionary's".to_string() } else { format!("{n} phoneme error{}", if n == 1 { "" } else { "s" }) }
    )
}

/// The 39 ARPAbet phonemes of the CMU Pronouncing Dictionary, each with an example word (the
/// dictionary's own key).
/// Held-out words the head importances are averaged over.
const IMPORTANCE_WORDS: usize = 200;

/// The head importances as a table per attention module: a row per layer, a column per head.
fn importance_html(importance: &[(String, Vec<Vec<f32>>)], words: usize) -> String {
    let mut s = format!(
        "<h2>Which heads matter</h2><p class=\"note\">Head importance (Michel et al., 2019): the mean \
         over {words} held-out words of |∂loss/∂ξ<sub>h</sub>| for a gate ξ<sub>h</sub> on each \
         head's output, each layer's values divided by their norm. Darker: the loss depends more \
         on that head.</p>"
    );
    for (module, layers) in importance {
        s += &format!("<table class=\"cmp\"><tr><th>{module}</th>");
        for h in 0..layers.first().map_or(0, Vec::len) {
            s += &format!("<th>head {h}</th>");
        }
        s += "</tr>";
        for (l, heads) in layers.iter().enumerate() {
            s += &format!("<tr><th>layer {l}</th>");
            for &x in heads {
                s += &format!(
                    "<td style=\"background:{}\">{x:.2}</td>",
                    attentive_viz::svg::colour(x * 0.6, 1.0)
                );
            }
            s += "</tr>";
        }
        s += "</table>";
    }
    s
}

fn arpabet_key() -> String {
    const KEY: [(&str, &str, &str); 39] = [
        ("AA", "odd", "AA D"),
        ("AE", "at", "AE T"),
        ("AH", "hut", "HH AH T"),
        ("AO", "ought", "AO T"),
        ("AW", "cow", "K AW"),
        ("AY", "hide", "HH AY D"),
        ("B", "be", "B IY"),
        ("CH", "cheese", "CH IY Z"),
        ("D", "dee", "D IY"),
        ("DH", "thee", "DH IY"),
        ("EH", "Ed", "EH D"),
        ("ER", "hurt", "HH ER T"),
        ("EY", "ate", "EY T"),
        ("F", "fee", "F IY"),
        ("G", "green", "G R IY N"),
        ("HH", "he", "HH IY"),
        ("IH", "it", "IH T"),
        ("IY", "eat", "IY T"),
        ("JH", "gee", "JH IY"),
        ("K", "key", "K IY"),
        ("L", "lee", "L IY"),
        ("M", "me", "M IY"),
        ("N", "knee", "N IY"),
        ("NG", "ping", "P IH NG"),
        ("OW", "oat", "OW T"),
        ("OY", "toy", "T OY"),
        ("P", "pee", "P IY"),
        ("R", "read", "R IY D"),
        ("S", "sea", "S IY"),
        ("SH", "she", "SH IY"),
        ("T", "tea", "T IY"),
        ("TH", "theta", "TH EY T AH"),
        ("UH", "hood", "HH UH D"),
        ("UW", "two", "T UW"),
        ("V", "vee", "V IY"),
        ("W", "we", "W IY"),
        ("Y", "yield", "Y IY L D"),
        ("Z", "zee", "Z IY"),
        ("ZH", "seizure", "S IY ZH ER"),
    ];
    let rows: String = KEY
        .iter()
        .map(|(p, w, t)| format!("<tr><td><b>{p}</b></td><td>{w}</td><td>{t}</td></tr>"))
        .collect();
    format!(
        "<h2>ARPAbet key</h2><table class=\"key\"><tr><th>phoneme</th><th>as in</th><th>spelled</th></tr>{rows}</table>\n"
    )
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
section{display:inline-block;margin:1em;vertical-align:top}.note{color:#555}\
table.cmp{border-collapse:collapse;font-family:monospace;margin:.5em 0}table.cmp td,table.cmp th{padding:2px 5px;\
text-align:center}table.cmp th{text-align:right;font-weight:normal;color:#555}td.err{background:#fdd;\
color:#a00;font-weight:bold}table.key td{padding:1px 8px;font-family:monospace}</style></head><body>\
<h1>Cross-attention alignments</h1><p>Each row is a phoneme the model wrote; each column a letter \
it read. Darker cells carry more attention weight (last decoder layer, averaged over heads). The third \
picture of each word is gradient-weighted relevance (Chefer, Gur &amp; Wolf, 2021): every layer's \
attention weighted by the gradient of that phoneme's logit and chained through the encoder, the \
decoder and cross-attention.</p>\n";

/// Gradient-weighted relevance of each letter to each phoneme of a decoded word (Chefer et
/// al., 2021, encoder–decoder rules): for phoneme t, the maps of its logit's backward chained
/// by [`attentive_viz::relevance::relevance_encoder_decoder`], row t of $R^{ti}$.
fn letter_relevance(model: &G2p, code: &[u32], phones: &[u32]) -> Result<Vec<Vec<f32>>, CliError> {
    let ns = code.len();
    let weighted = |(data, shape): &(Vec<f32>, [usize; 4])| {
        attentive_viz::relevance::Weighted::new(data.clone(), *shape).map_err(nn_err)
    };
    let all = model.weight_grads(code, phones).map_err(nn_err)?;
    all.iter()
        .take(phones.len())
        .enumerate()
        .map(|(t, w)| {
            let r = attentive_viz::relevance::relevance_encoder_decoder(
                &weighted(&w.maps.encoder)?,
                &weighted(&w.maps.decoder)?,
                &weighted(&w.maps.cross)?,
            )
            .map_err(nn_err)?;
            Ok(r.cross[t * ns..(t + 1) * ns].to_vec())
        })
        .collect()
}

/// A word's cross-attention alignment (rows: the phonemes written, columns: the letters read) as
/// attentive-viz draws it: a heatmap, and the head view (letters on the right, each phoneme's
/// lines to the letters it read).
fn alignment_svgs(s: &Shown) -> (String, String, Option<String>) {
    let phones: Vec<String> = s
        .phones
        .iter()
        .map(|&p| phone_name(p).to_string())
        .collect();
    let letters: Vec<String> = s.word.chars().map(String::from).collect();
    let (nq, nk) = (phones.len(), letters.len());
    // Rows as decoded; a row shorter than the word (none is) is padded with zeros.
    let flat: Vec<f32> = (0..nq)
        .flat_map(|r| (0..nk).map(move |c| (r, c)))
        .map(|(r, c)| {
            s.align
                .get(r)
                .and_then(|row| row.get(c))
                .copied()
                .unwrap_or(0.0)
        })
        .collect();
    let title = format!("{}: what each phoneme read", s.word);
    let rel_title = format!("{}: which letters each phoneme depends on", s.word);
    let relevance = s.relevance.as_ref().map(|r| {
        let flat: Vec<f32> = r.iter().flatten().copied().collect();
        attentive_viz::svg::heatmap(&flat, (nq, nk), &phones, &letters, &rel_title)
    });
    (
        attentive_viz::svg::heatmap(&flat, (nq, nk), &phones, &letters, &title),
        attentive_viz::svg::head_view(&flat, (nq, nk), &phones, &letters, &title),
        relevance,
    )
}
