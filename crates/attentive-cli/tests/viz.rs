//! `attentive viz` end to end: maps from a .npy file and a token list to index.html,
//! attention.json and SVG views, every bad input a clear error; and the page in a real browser
//! (headless Chromium from file://: no network request, no console error, a click on the model
//! view changes the heatmap shown, and a screenshot).

mod common;
use common::{wheel, write_npy};
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attentive-viz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn attentive(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

const TOKENS: [&str; 4] = ["[CLS]", "hello", "world", "[SEP]"];

/// Two layers × three heads over four tokens, rows summing to 1, every map different.
fn maps() -> Vec<f32> {
    let mut d = Vec::new();
    for m in 0..6 {
        for i in 0..4 {
            let row: Vec<f32> = (0..4)
                .map(|j| 1.0 + ((i * 7 + j * 3 + m * 5) % 11) as f32)
                .collect();
            let s: f32 = row.iter().sum();
            d.extend(row.iter().map(|x| x / s));
        }
    }
    d
}

/// The maps and tokens as files in `d`.
fn inputs(d: &Path, data: &[f32], shape: &[u64], tokens: &[&str]) -> (String, String) {
    let (m, t) = (d.join("maps.npy"), d.join("tokens.txt"));
    write_npy(&m, shape, data);
    std::fs::write(&t, tokens.join("\n")).unwrap();
    (m.display().to_string(), t.display().to_string())
}

#[test]
fn maps_from_a_file_give_every_view_and_number() {
    let d = dir("npy");
    let data = maps();
    let (m, t) = inputs(&d, &data, &[2, 3, 4, 4], &TOKENS);
    let out = d.join("out").display().to_string();
    let (ok, text) = attentive(&["viz", "--maps", &m, "--tokens", &t, "--out", &out, "--json"]);
    assert!(ok, "{text}");
    let json: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(json["tokens"][1], "hello");
    // Every weight as given: layer 1, head 2, row 3, column 0.
    let at = ((1 * 3 + 2) * 4 + 3) * 4;
    assert_eq!(
        json["attentions"][1][2][3][0].as_f64().unwrap() as f32,
        data[at]
    );
    assert_eq!(json["head_stats"].as_array().unwrap().len(), 6);
    assert_eq!(json["rollout"].as_array().unwrap().len(), 4);
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("out/attention.json")).unwrap()).unwrap();
    assert_eq!(file, json);
    for f in [
        "index.html",
        "heatmap-L1-H2.svg",
        "headview-L0-H0.svg",
        "layer-mean-L1.svg",
        "rollout.svg",
    ] {
        assert!(d.join("out").join(f).is_file(), "no {f}");
        if let Some(stem) = f.strip_suffix(".svg") {
            let png = std::fs::read(d.join("out").join(format!("{stem}.png"))).unwrap();
            assert!(png.starts_with(b"\x89PNG"), "{f} has no PNG beside it");
        }
    }
    // Run again: the folder is the command's own, replaced whole.
    assert!(attentive(&["viz", "--maps", &m, "--tokens", &t, "--out", &out]).0);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = dir("bad");
    let data = maps();
    let out = d.join("out").display().to_string();
    let expect_err = |args: &[&str], says: &str| {
        let (ok, text) = attentive(args);
        assert!(!ok, "{args:?} succeeded: {text}");
        assert!(
            text.contains(says),
            "{args:?}: {text:?} does not say {says:?}"
        );
    };
    // Three tokens for maps of four.
    let (m, t) = inputs(&d, &data, &[2, 3, 4, 4], &TOKENS[..3]);
    expect_err(
        &["viz", "--maps", &m, "--tokens", &t, "--out", &out],
        "3 query and 3 key tokens",
    );
    // A NaN and a negative weight.
    for (bad, says) in [(f32::NAN, "NaN"), (-0.5, "-0.5")] {
        let mut x = data.clone();
        x[5] = bad;
        let (m, t) = inputs(&d, &x, &[2, 3, 4, 4], &TOKENS);
        expect_err(&["viz", "--maps", &m, "--tokens", &t, "--out", &out], says);
    }
    // A wrong rank, an empty token file, no text for a model.
    let (m, t) = inputs(&d, &data, &[2, 3, 4, 2, 2], &TOKENS);
    expect_err(
        &["viz", "--maps", &m, "--tokens", &t, "--out", &out],
        "expected [layers, heads, N, N]",
    );
    let (m, t) = inputs(&d, &data, &[2, 3, 4, 4], &[]);
    expect_err(
        &["viz", "--maps", &m, "--tokens", &t, "--out", &out],
        "token",
    );
    expect_err(&["viz", "--maps", &m], "--tokens");
    // A flow request too large, and one past the tokens.
    let (m, t) = inputs(&d, &data, &[2, 3, 4, 4], &TOKENS);
    expect_err(
        &[
            "viz", "--maps", &m, "--tokens", &t, "--out", &out, "--flow", "9",
        ],
        "row 9 is out of range",
    );
    // A folder that is not the command's.
    std::fs::create_dir_all(d.join("mine")).unwrap();
    std::fs::write(d.join("mine/notes.txt"), "keep").unwrap();
    let mine = d.join("mine").display().to_string();
    expect_err(
        &["viz", "--maps", &m, "--tokens", &t, "--out", &mine],
        "did not write",
    );
    assert!(d.join("mine/notes.txt").is_file());
    // Rows that do not sum to 1: drawn as given, with a warning.
    let mut x = data.clone();
    x[0] += 0.5;
    let (m, t) = inputs(&d, &x, &[2, 3, 4, 4], &TOKENS);
    let (ok, text) = attentive(&["viz", "--maps", &m, "--tokens", &t, "--out", &out]);
    assert!(
        ok && text.contains("layer 0, head 0, row 0 sums to 1.5"),
        "{text}"
    );
}

/// Chromium, when this machine has it; CI (`ATTENTIVE_REQUIRE_BROWSER`) requires it.
fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(name))
                    .find(|c| c.is_file())
            })
        });
    if found.is_none() {
        assert!(
            std::env::var_os("ATTENTIVE_REQUIRE_BROWSER").is_none(),
            "ATTENTIVE_REQUIRE_BROWSER is set but no chromium is on PATH (apt-get install chromium)"
        );
        eprintln!("skipped: no chromium on PATH (apt-get install chromium)");
    }
    found
}

fn headless(browser: &Path, d: &Path, args: &[&str]) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        // The browser's own background traffic (updates, accounts, spelling dictionaries) off,
        // so that any request in the log is the page's.
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-client-side-phishing-detection",
            "--disable-features=SpellCheck,OptimizationHints,MediaRouter,Translate",
            "--no-pings",
            "--no-default-browser-check",
            // And nothing resolves: whatever is left of it never leaves the machine.
            "--host-resolver-rules=MAP * ~NOTFOUND",
        ])
        .arg(format!("--user-data-dir={}", d.join("profile").display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn the_page_works_offline_in_a_real_browser() {
    let Some(browser) = chromium() else { return };
    let d = dir("browser");
    let (m, t) = inputs(&d, &maps(), &[2, 3, 4, 4], &TOKENS);
    let out = d.join("out");
    assert!(
        attentive(&[
            "viz",
            "--maps",
            &m,
            "--tokens",
            &t,
            "--out",
            &out.display().to_string()
        ])
        .0
    );
    let page = out.join("index.html");
    // A page beside it loads index.html in a frame, clicks layer 1 head 2 in the model view,
    // and writes what the page then shows.
    let harness = d.join("harness.html");
    std::fs::write(
        &harness,
        format!(
            r#"<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="f" src="{}" width="1200" height="900"></iframe>
<script>
document.getElementById('f').addEventListener('load', () => {{
  const doc = document.getElementById('f').contentDocument;
  const shown = () => [...doc.querySelectorAll('.view')].filter(v => !v.hidden).map(v => v.dataset.l + '/' + v.dataset.h).join(',');
  const before = shown();
  doc.querySelector('.thumb[data-l="1"][data-h="2"]').click();
  const after = shown();
  const title = doc.getElementById('head-title').textContent;
  const rects = doc.querySelector('.view:not([hidden]) svg').querySelectorAll('rect').length;
  // Every resource the page loaded (images, scripts, styles, fetches): there should be none.
  const loaded = doc.defaultView.performance.getEntriesByType('resource').map(e => e.name);
  document.getElementById('result').textContent = 'requests=' + loaded.length + ' [' + loaded.join(' ') + '] before=' + before + ' after=' + after + ' title=' + title + ' rects=' + rects;
}});
</script></body></html>"#,
            page.file_name().unwrap().to_string_lossy()
        ),
    )
    .unwrap();
    std::fs::copy(&page, d.join("index.html")).unwrap();
    let text = headless(
        &browser,
        &d,
        &[
            "--allow-file-access-from-files",
            "--virtual-time-budget=5000",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            &format!("file://{}", harness.display()),
        ],
    );
    let result = text
        .split("<pre id=\"result\">")
        .nth(1)
        .and_then(|r| r.split("</pre>").next())
        .unwrap_or("");
    assert!(
        result.starts_with("requests=0 [] "),
        "the page loaded resources: {result:?}"
    );
    assert!(
        result.contains(" before=0/0 after=1/2 title=Layer 1, head 2 rects="),
        "the click did not change the heatmap: {result:?}"
    );
    let rects: usize = result.rsplit('=').next().unwrap().parse().unwrap();
    assert!(rects >= 16, "the heatmap shown has {rects} cells");
    // No console error from the page.
    for line in text.lines().filter(|l| l.contains("CONSOLE")) {
        assert!(!line.contains("rror"), "console: {line}");
    }
    let shot = d.join("page.png");
    headless(
        &browser,
        &d,
        &[
            "--hide-scrollbars",
            "--window-size=1200,1600",
            &format!("--screenshot={}", shot.display()),
            &format!("file://{}", page.display()),
        ],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot of {} bytes",
        png.len()
    );
}

/// MiniLM's maps, rollout and reading row in attention.json against the same quantities from
/// HF transformers' `output_attentions` (the golden file of the model tests), the rollout of
/// HF's maps computed here naively in f64.
#[test]
fn minilm_maps_and_rollout_equal_those_of_hf_transformers() {
    let Some(model) = wheel() else { return };
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../attentive-models/tests/golden/minilm.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let d = dir("minilm");
    let mut checked = 0;
    for s in golden["sentences"].as_array().unwrap() {
        let Some(hf) = s.get("attentions").and_then(|a| a.as_array()) else {
            continue;
        };
        let text = s["text"].as_str().unwrap();
        let out = d.join(format!("out{checked}")).display().to_string();
        let (ok, printed) = attentive(&[
            "viz",
            "--model",
            &model.display().to_string(),
            "--out",
            &out,
            "--json",
            text,
        ]);
        assert!(ok, "{printed}");
        let j: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
        let n = s["input_ids"].as_array().unwrap().len();
        assert_eq!(j["tokens"].as_array().unwrap().len(), n);
        // HF's maps as f64 [L][H][n][n].
        let hf: Vec<Vec<Vec<Vec<f64>>>> =
            serde_json::from_value(serde_json::Value::Array(hf.clone())).unwrap();
        let ours: Vec<Vec<Vec<Vec<f64>>>> =
            serde_json::from_value(j["attentions"].clone()).unwrap();
        let worst = |a: &[Vec<f64>], b: &[Vec<f64>]| {
            a.iter()
                .flatten()
                .zip(b.iter().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
        };
        for (l, (o, h)) in ours.iter().zip(&hf).enumerate() {
            for (head, (o, h)) in o.iter().zip(h).enumerate() {
                assert!(
                    worst(o, h) <= 1e-5,
                    "{text}: layer {l} head {head}: {}",
                    worst(o, h)
                );
            }
        }
        // Rollout of HF's maps: Â = rownorm(mean_h A + I), J = Â_L ⋯ Â_1.
        let mut jr: Option<Vec<Vec<f64>>> = None;
        for layer in &hf {
            let mut a: Vec<Vec<f64>> = (0..n)
                .map(|i| {
                    (0..n)
                        .map(|c| layer.iter().map(|h| h[i][c]).sum::<f64>() / layer.len() as f64)
                        .collect()
                })
                .collect();
            for (i, row) in a.iter_mut().enumerate() {
                row[i] += 1.0;
                let s: f64 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= s);
            }
            jr = Some(match jr {
                None => a,
                Some(prev) => (0..n)
                    .map(|i| {
                        (0..n)
                            .map(|c| (0..n).map(|t| a[i][t] * prev[t][c]).sum())
                            .collect()
                    })
                    .collect(),
            });
        }
        let want = jr.unwrap();
        let got: Vec<Vec<f64>> = serde_json::from_value(j["rollout"].clone()).unwrap();
        assert!(
            worst(&got, &want) <= 1e-5,
            "{text}: rollout {}",
            worst(&got, &want)
        );
        // MiniLM is mean-pooled: the reading is the mean of the (all real) rows.
        let reading: Vec<f64> =
            serde_json::from_value(j["rollout_reading"]["values"].clone()).unwrap();
        for c in 0..n {
            let m = want.iter().map(|r| r[c]).sum::<f64>() / n as f64;
            assert!((reading[c] - m).abs() <= 1e-5, "{text}: reading [{c}]");
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "the golden file has {checked} sentences with maps"
    );
}

/// Gradient-weighted relevance on MiniLM from the command line: the explained value is the
/// one HF's embeddings give (a dimension of one, the cosine of two), the maps are those shown
/// without relevance, relevance adds to the identity only where attention put weight, and
/// bad requests are clear errors. (The backward pass itself is tested against finite
/// differences of an f64 oracle in attentive-models' tests/tiny.rs.)
#[test]
fn minilm_relevance_explains_the_values_hf_computes() {
    let Some(model) = wheel() else { return };
    let model = model.display().to_string();
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../attentive-models/tests/golden/minilm.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let s = &golden["sentences"];
    let emb = |i: usize| -> Vec<f64> { serde_json::from_value(s[i]["embedding"].clone()).unwrap() };
    let (a, b) = (
        s[0]["text"].as_str().unwrap(),
        s[1]["text"].as_str().unwrap(),
    );
    let d = dir("relevance");
    let run = |extra: &[&str], text: &str, out: &str| -> serde_json::Value {
        let out = d.join(out).display().to_string();
        let mut args = vec!["viz", "--model", &model, "--out", &out, "--json"];
        args.extend_from_slice(extra);
        args.push(text);
        let (ok, printed) = attentive(&args);
        assert!(ok, "{printed}");
        serde_json::from_str(printed.lines().last().unwrap()).unwrap()
    };
    let plain = run(&[], a, "plain");
    let dim = run(&["--relevance-dim", "7"], a, "dim");
    let sim = run(&["--relevance-to", b], a, "sim");
    let value = |j: &serde_json::Value| j["relevance"]["value"].as_f64().unwrap();
    assert!((value(&dim) - emb(0)[7]).abs() < 1e-5, "{}", value(&dim));
    let cos: f64 = emb(0).iter().zip(emb(1)).map(|(x, y)| x * y).sum();
    assert!((value(&sim) - cos).abs() < 1e-5, "{} vs {cos}", value(&sim));
    for j in [&dim, &sim] {
        // The same maps as without relevance (a separate forward, so to rounding).
        let flat = |v: &serde_json::Value| -> Vec<f64> {
            let a: Vec<Vec<Vec<Vec<f64>>>> = serde_json::from_value(v.clone()).unwrap();
            a.into_iter().flatten().flatten().flatten().collect()
        };
        let (x, y) = (flat(&j["attentions"]), flat(&plain["attentions"]));
        assert_eq!(x.len(), y.len());
        let worst = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "maps differ by {worst}");
        let r: Vec<Vec<f64>> = serde_json::from_value(j["relevance"]["matrix"].clone()).unwrap();
        let n = r.len();
        for (i, row) in r.iter().enumerate() {
            for (c, &x) in row.iter().enumerate() {
                assert!(
                    x >= (i == c) as u8 as f64 - 1e-6,
                    "R − I must be ≥ 0: R[{i}][{c}] = {x}"
                );
            }
        }
        let reading: Vec<f64> =
            serde_json::from_value(j["relevance"]["reading"]["values"].clone()).unwrap();
        assert_eq!(reading.len(), n);
        assert!(reading.iter().any(|&x| x > 0.0));
    }
    let partner = &sim["relevance"]["partner"];
    assert_eq!(
        partner["tokens"].as_array().unwrap().len(),
        s[1]["input_ids"].as_array().unwrap().len()
    );
    for f in [
        "relevance.svg",
        "relevance-reading.svg",
        "relevance-partner.png",
    ] {
        assert!(d.join("sim").join(f).is_file(), "{f}");
    }
    for (args, says) in [
        (vec!["--relevance-dim", "384"], "past the embedding"),
        (vec!["--relevance-to", " "], "is empty"),
    ] {
        let out = d.join("bad").display().to_string();
        let mut all = vec!["viz", "--model", &model, "--out", &out];
        all.extend(args);
        all.push(a);
        let (ok, printed) = attentive(&all);
        assert!(!ok && printed.contains(says), "{printed}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// The G2P model's three attention modules through the same views: the letters and phonemes as
/// tokens, every row a distribution, rollout for the two self-attentions only, the decoder's
/// self-attention causal; a word the model cannot read is a clear error.
#[test]
fn g2p_modules_are_viewed_like_any_maps() {
    let d = dir("g2p");
    let mut phones: Option<Vec<String>> = None;
    for module in ["encoder", "decoder", "cross"] {
        let out = d.join(module).display().to_string();
        let (ok, printed) = attentive(&[
            "viz", "--g2p", "phone", "--module", module, "--out", &out, "--json",
        ]);
        assert!(ok, "{printed}");
        let j: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
        let tokens = |k: &str| -> Vec<String> { serde_json::from_value(j[k].clone()).unwrap() };
        let (q, k) = (tokens("q_tokens"), tokens("k_tokens"));
        let letters: Vec<String> = "phone".chars().map(String::from).collect();
        match module {
            "encoder" => assert_eq!((&q, &k), (&letters, &letters)),
            _ => {
                assert_eq!(q[0], "<s>");
                assert_eq!(
                    k,
                    if module == "cross" {
                        letters
                    } else {
                        q.clone()
                    }
                );
                match &phones {
                    None => phones = Some(q.clone()),
                    Some(p) => assert_eq!(p, &q),
                }
            }
        }
        assert_eq!(j.get("rollout").is_some(), module != "cross", "{module}");
        let a: Vec<Vec<Vec<Vec<f64>>>> = serde_json::from_value(j["attentions"].clone()).unwrap();
        for layer in &a {
            for head in layer {
                for (i, row) in head.iter().enumerate() {
                    assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5);
                    if module == "decoder" {
                        assert!(row[i + 1..].iter().all(|&x| x == 0.0), "causal");
                    }
                }
            }
        }
    }
    let (ok, printed) = attentive(&[
        "viz",
        "--g2p",
        "x1",
        "--out",
        &d.join("bad").display().to_string(),
    ]);
    assert!(!ok && printed.contains("letters a–z"), "{printed}");
    let _ = std::fs::remove_dir_all(&d);
}
