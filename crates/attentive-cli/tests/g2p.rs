//! `attentive demo` and `attentive train g2p` end to end.

use std::path::PathBuf;
use std::process::Command;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attentive-g2p-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> (bool, String, String) {
    run_cached(args, &dir("cache"))
}

/// `run` with the shipped model's test score cached under `cache`.
fn run_cached(args: &[&str], cache: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("output")).expect("last line is JSON")
}

#[test]
fn demo_reproduces_the_recorded_test_score_and_writes_alignments() {
    let out = dir("demo");
    let o = out.to_str().unwrap();
    let (ok, stdout, stderr) = run(&["demo", "--json", "--out", o, "attention", "cat"]);
    assert!(ok, "{stderr}");
    let j = last_json(&stdout);
    // Head importance of every attention module: 3 layers × 4 heads, each layer of unit norm.
    let modules = j["head_importance"].as_array().unwrap();
    assert_eq!(modules.len(), 3);
    for m in modules {
        for layer in m["layers"].as_array().unwrap() {
            let v: Vec<f64> = layer
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(v.len(), 4);
            assert!(
                (v.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-5,
                "{m}"
            );
        }
    }
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/model/g2p/eval.json"))
            .unwrap(),
    )
    .unwrap();
    let (per, want) = (j["per"].as_f64().unwrap(), rec["per"].as_f64().unwrap());
    assert!(
        (per - want).abs() <= 0.1,
        "demo PER {per} vs recorded {want}"
    );
    assert_eq!(j["test_words"], rec["test_words"]);
    let t = j["transcriptions"].as_array().unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t[0]["word"], "attention");
    assert!(!t[0]["phones"].as_str().unwrap().is_empty());
    for f in ["attention.svg", "cat.svg", "index.html"] {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(text.contains("<svg"), "{f} holds a heatmap");
        // Self-contained: the only URL is the SVG namespace.
        assert!(
            !text
                .replace("http://www.w3.org/2000/svg", "")
                .contains("http"),
            "{f}"
        );
    }
    // Beam search gives a transcription too.
    let (ok, stdout, stderr) = run(&["demo", "--json", "--beam", "4", "--out", o, "cat"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        last_json(&stdout)["transcriptions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Bad words are errors, not panics.
    let (ok, _, stderr) = run(&["demo", "--out", o, "c4t"]);
    assert!(!ok && stderr.contains("c4t"), "{stderr}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_demo_shows_held_out_words_beside_the_dictionary_and_caches_its_score() {
    let (out, cache) = (dir("showcase"), dir("showcase-cache"));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&cache);
    let o = out.to_str().unwrap();
    let mut seconds = Vec::new();
    for call in 0..2 {
        let (ok, stdout, stderr) = run_cached(&["demo", "--json", "--out", o], &cache);
        assert!(ok, "{stderr}");
        let j = last_json(&stdout);
        assert_eq!(j["score"]["cached"], call == 1, "call {call}");
        assert_eq!(j["decoding"]["mode"], "greedy");
        seconds.push(j["seconds"].as_f64().unwrap());
        let page = std::fs::read_to_string(out.join("index.html")).unwrap();
        assert!(page.contains("held-out test split") && page.contains("ARPAbet key"));
        let t = j["transcriptions"].as_array().unwrap();
        assert!(t.len() >= 5);
        for w in t {
            let word = w["word"].as_str().unwrap();
            assert_eq!(
                attentive_nn::g2p::split_of(word),
                attentive_nn::g2p::Split::Test,
                "{word} is not a test word"
            );
            assert_eq!(w["split"], "test");
            // Both pronunciations on the page, the dictionary's as the dictionary has it.
            let dict = w["dictionary"].as_str().unwrap();
            let entry = attentive_nn::g2p::lookup(word).unwrap();
            assert!(entry.prons.iter().any(|p| p
                .iter()
                .map(|&x| attentive_nn::g2p::phone_name(x))
                .collect::<Vec<_>>()
                .join(" ")
                == dict));
            let section = page.split(&format!("<h2>{word}</h2>")).nth(1).unwrap();
            let section = section.split("</section>").next().unwrap();
            for row in ["<th>model</th>", "<th>dictionary</th>"] {
                assert!(section.contains(row), "{word}: no {row} row");
            }
            for p in dict.split(' ') {
                assert!(
                    section.contains(&format!(">{p}</td>")),
                    "{word}: {p} not shown"
                );
            }
            let errors = section.matches("class=\"err\"").count();
            assert_eq!(errors > 0, w["errors"].as_u64().unwrap() > 0, "{word}");
        }
    }
    println!(
        "demo with the score computed: {:.2} s; with it cached: {:.2} s",
        seconds[0], seconds[1]
    );
    // Another run replaces the folder whole: the old words' files go.
    let (ok, stdout, stderr) = run_cached(
        &["demo", "--json", "--beam", "3", "--out", o, "cat"],
        &cache,
    );
    assert!(ok, "{stderr}");
    let j = last_json(&stdout);
    assert_eq!(j["decoding"]["width"], 3);
    // Gradient-weighted relevance reads "cat" letter by letter: K from c, AE from a, T from t.
    let cat = &j["transcriptions"][0];
    assert_eq!(cat["phones"], "K AE T");
    let rel: Vec<Vec<f32>> = serde_json::from_value(cat["relevance"].clone()).unwrap();
    for (t, row) in rel.iter().enumerate() {
        let top = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(top, t, "phoneme {t} of cat: relevance {row:?}");
    }
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "cat-headview.svg",
            "cat-relevance.svg",
            "cat.svg",
            "index.html"
        ]
    );
    assert!(std::fs::read_to_string(out.join("index.html"))
        .unwrap()
        .contains("beam search, width 3"));
    // A failing word leaves the previous folder as it was, and nothing beside it.
    let (ok, _, _) = run_cached(&["demo", "--out", o, "dog", "d0g"], &cache);
    assert!(!ok);
    let after: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(after.len(), files.len());
    let parent: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("showcase.tmp"))
        .collect();
    assert!(parent.is_empty(), "{parent:?}");
    // A folder that is not a demo's is never replaced.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let (ok, _, stderr) = run_cached(&["demo", "--out", o, "cat"], &cache);
    assert!(!ok && stderr.contains("choose another --out"), "{stderr}");
    assert!(out.join("notes.txt").exists());
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn test_words_are_listed_and_disjoint_from_training() {
    let (ok, stdout, _) = run(&["demo", "--list-test-words"]);
    assert!(ok);
    let words: Vec<&str> = stdout.lines().collect();
    assert!(words.len() > 5000, "{} test words", words.len());
    for w in words.iter().take(200) {
        assert_eq!(
            attentive_nn::g2p::split_of(w),
            attentive_nn::g2p::Split::Test,
            "{w}"
        );
    }
}

#[test]
fn a_one_minute_training_run_writes_a_usable_checkpoint() {
    let out = dir("train");
    let o = out.to_str().unwrap();
    let (ok, stdout, stderr) = run(&[
        "train",
        "g2p",
        "--minutes",
        "1",
        "--valid-every",
        "0.5",
        "--out",
        o,
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("test set: PER"), "{stdout}");
    assert!(stderr.contains("valid PER"), "{stderr}");
    for f in ["model.safetensors", "config.json", "eval.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let demo = out.join("demo");
    let (ok, stdout, stderr) = run(&[
        "demo",
        "--json",
        "--model",
        o,
        "--out",
        demo.to_str().unwrap(),
        "cat",
    ]);
    assert!(ok, "{stderr}");
    // Training cached the score it measured, so the demo did not score the test split again.
    assert_eq!(last_json(&stdout)["score"]["cached"], true);
    // The checkpoint reloads to the score training recorded for it.
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let (per, want) = (
        last_json(&stdout)["per"].as_f64().unwrap(),
        rec["per"].as_f64().unwrap(),
    );
    assert!(
        (per - want).abs() <= 0.1,
        "demo PER {per} vs recorded {want}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// The checkpoint in `dir` loads as `attentive demo` loads it: configuration, every weight of
/// the right shape, and the recorded score. Returns the weights' bytes.
fn load_checkpoint(dir: &std::path::Path) -> Result<Vec<u8>, String> {
    let config: attentive_nn::transformer::Config =
        attentive_nn::train::load_config(dir).map_err(|e| e.to_string())?;
    let model = attentive_nn::g2p::G2p::new(&config, 0).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(dir.join("model.safetensors")).map_err(|e| e.to_string())?;
    model.params.load_bytes(&bytes).map_err(|e| e.to_string())?;
    let eval = std::fs::read_to_string(dir.join("eval.json")).map_err(|e| e.to_string())?;
    let eval: serde_json::Value = serde_json::from_str(&eval).map_err(|e| e.to_string())?;
    eval["per"].as_f64().ok_or("eval.json has no per")?;
    Ok(bytes)
}

#[test]
fn a_training_run_killed_while_it_saves_leaves_the_old_checkpoint_or_the_new() {
    let root = dir("killed");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let out = root.join("ck");
    let o = out.to_str().unwrap().to_string();
    let train = |seed: u32| {
        Command::new(env!("CARGO_BIN_EXE_attentive"))
            .args([
                "train",
                "g2p",
                "--minutes",
                "0.005",
                "--test-words",
                "20",
                "--out",
                &o,
            ])
            .args(["--seed", &seed.to_string()])
            .env("XDG_CACHE_HOME", root.join("cache"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // A run's save begins when it makes its temporary folder beside `out`.
    let saving = |pid: u32| root.join(format!(".ck.tmp-{pid}")).exists();
    // Runs `child`, polling every millisecond, until it exits or until `kill_at` (given when
    // its save began, in seconds since `start`) says it is time to kill it. Returns (None, how
    // long its save took) if it exited, else (Some(when its save began, if it had), when it
    // was killed).
    let watch = |child: &mut std::process::Child,
                 start: std::time::Instant,
                 kill_at: &dyn Fn(Option<f64>) -> f64|
     -> (Option<Option<f64>>, f64) {
        let mut began = None;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success());
                return (None, start.elapsed().as_secs_f64() - began.unwrap_or(0.0));
            }
            let s = start.elapsed().as_secs_f64();
            if began.is_none() && saving(child.id()) {
                began = Some(s);
            }
            if s >= kill_at(began) {
                child.kill().unwrap();
                child.wait().unwrap();
                return (Some(began), s);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    // One whole run: the old checkpoint, how long a run takes and how long its save takes.
    let t = std::time::Instant::now();
    let (outcome, mut save) = watch(&mut train(1), t, &|_| f64::INFINITY);
    assert!(outcome.is_none());
    let mut whole = t.elapsed().as_secs_f64();
    let mut known = vec![load_checkpoint(&out).expect("the first checkpoint")];
    // 50 runs killed (SIGKILL): even runs at a moment drawn over the whole run and a little past
    // its end, odd runs at a moment drawn over the save, from the appearance of the temporary
    // folder to a little past the save's end. Both lengths are those of the last run that
    // finished, as the machine's load changes.
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    let (mut killed, mut in_save, mut finished) = (0, 0, 0);
    for run in 0..50u32 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let u = (state >> 11) as f64 / (1u64 << 53) as f64;
        let (w, s) = (whole, save);
        let kill_at = move |began: Option<f64>| match (run % 2, began) {
            (0, _) => w * 1.1 * u,
            (_, Some(b)) => b + s * 1.2 * u,
            (_, None) => f64::INFINITY,
        };
        let t = std::time::Instant::now();
        let at = match watch(&mut train(2 + run), t, &kill_at) {
            (None, took_to_save) => {
                finished += 1;
                (whole, save) = (t.elapsed().as_secs_f64(), took_to_save);
                whole
            }
            (Some(began), at) => {
                killed += 1;
                in_save += usize::from(began.is_some());
                at
            }
        };
        // Whatever the moment, the folder holds one whole checkpoint: the last one written.
        let bytes = load_checkpoint(&out).unwrap_or_else(|e| panic!("run {run} at {at:.3} s: {e}"));
        if !known.contains(&bytes) {
            known.push(bytes);
        }
    }
    eprintln!(
        "{killed} runs killed ({in_save} while saving), {finished} finished; {} checkpoints seen",
        known.len()
    );
    assert!(
        killed >= 25 && in_save >= 15,
        "only {killed} of 50 runs were killed, {in_save} while saving: the moments missed the saves"
    );
    // What killed runs leave beside the folder is removed by the next run: at most the last.
    let strays = std::fs::read_dir(&root)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".ck.")
        })
        .count();
    assert!(strays <= 1, "{strays} temporary folders left");
    std::fs::remove_dir_all(&root).unwrap();
}
