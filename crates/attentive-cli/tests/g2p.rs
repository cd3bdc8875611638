//! `attentive demo` and `attentive train g2p` end to end.

use std::path::PathBuf;
use std::process::Command;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attentive-g2p-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args(args)
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
    let (ok, stdout, stderr) = run(&["demo", "--json", "--model", o, "--out", o, "cat"]);
    assert!(ok, "{stderr}");
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
