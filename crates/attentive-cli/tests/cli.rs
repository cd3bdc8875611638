//! The `attentive` binary end to end: .npy in, .npy out, checked against the oracle; and every
//! bad input reported as an error with a non-zero exit code.

use attentive::{reference, Causal, Options, View};
mod common;
use common::write_npy as write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attentive-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let f =
        npyz::NpyFile::new(std::io::BufReader::new(std::fs::File::open(path).unwrap())).unwrap();
    (f.shape().to_vec(), f.into_vec().unwrap())
}

fn attentive(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32 * 2654435761u32) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

#[test]
fn attend_with_gradients_matches_the_oracle() {
    let d = dir("ok");
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let (qs, ks) = ([1usize, 4, 5, 8], [1usize, 2, 9, 8]);
    let (q, k, v) = (values(160, 1), values(144, 2), values(144, 3));
    let d_o = values(160, 4);
    let sh = |s: [usize; 4]| s.map(|x| x as u64);
    write(&d.join("q.npy"), &sh(qs), &q);
    write(&d.join("k.npy"), &sh(ks), &k);
    write(&d.join("v.npy"), &sh(ks), &v);
    write(&d.join("do.npy"), &sh(qs), &d_o);
    let slopes = attentive::positional::alibi_slopes(4);
    write(&d.join("slopes.npy"), &[4], &slopes);
    let (ok, err) = attentive(&[
        "attend",
        "--q",
        &p("q.npy"),
        "--k",
        &p("k.npy"),
        "--v",
        &p("v.npy"),
        "--out",
        &p("o.npy"),
        "--lse",
        &p("lse.npy"),
        "--causal",
        "bottom-right",
        "--softcap",
        "3",
        "--alibi-slopes",
        &p("slopes.npy"),
        "--window",
        "6,inf",
        "--grad-out",
        &p("do.npy"),
        "--dq",
        &p("dq.npy"),
        "--dk",
        &p("dk.npy"),
        "--dv",
        &p("dv.npy"),
    ]);
    assert!(ok, "{err}");
    let opts = Options::new()
        .causal(Causal::BottomRight)
        .softcap(3.0)
        .alibi(&slopes)
        .window(6, usize::MAX);
    let (qv, kv, vv) = (
        View::contiguous(&q, &qs).unwrap(),
        View::contiguous(&k, &ks).unwrap(),
        View::contiguous(&v, &ks).unwrap(),
    );
    let want = reference::forward::<f64>(qv, kv, vv, &opts).unwrap();
    let grads = reference::backward::<f64>(qv, kv, vv, View::contiguous(&d_o, &qs).unwrap(), &opts)
        .unwrap();
    for (file, shape, expect) in [
        ("o.npy", vec![1, 4, 5, 8], &want.o),
        ("lse.npy", vec![1, 4, 5], &want.lse),
        ("dq.npy", vec![1, 4, 5, 8], &grads.dq),
        ("dk.npy", vec![1, 2, 9, 8], &grads.dk),
        ("dv.npy", vec![1, 2, 9, 8], &grads.dv),
    ] {
        let (s, got) = read(&d.join(file));
        assert_eq!(s, shape, "{file}");
        for (g, w) in got.iter().zip(expect.iter()) {
            assert!((*g as f64 - w).abs() < 1e-5, "{file}: {g} vs {w}");
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let d = dir("bad");
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let s = [1u64, 2, 3, 4];
    write(&d.join("q.npy"), &s, &values(24, 5));
    write(&d.join("q64.npy"), &s, &[0.5f64; 24]);
    write(&d.join("q3.npy"), &[2, 3, 4], &values(24, 6));
    write(&d.join("mask.npy"), &[2, 2], &[true, false, true, true]);
    std::fs::write(
        d.join("junk.npy"),
        b"\x93NUMPY\x01\x00garbage that is not a header",
    )
    .unwrap();
    std::fs::write(d.join("empty.npy"), b"").unwrap();
    let base = |q: &str| {
        vec![
            "attend".to_string(),
            "--q".into(),
            p(q),
            "--k".into(),
            p("q.npy"),
            "--v".into(),
            p("q.npy"),
            "--out".into(),
            p("o.npy"),
        ]
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (base("missing.npy"), "missing.npy"),
        (base("junk.npy"), "junk.npy"),
        (base("empty.npy"), "empty.npy"),
        (base("q64.npy"), "float32"),
        (base("q3.npy"), "4 dimensions"),
        (
            [base("q.npy"), vec!["--scale".into(), "-1".into()]].concat(),
            "scale",
        ),
        (
            [base("q.npy"), vec!["--scale".into(), "inf".into()]].concat(),
            "scale",
        ),
        (
            [base("q.npy"), vec!["--softcap".into(), "0".into()]].concat(),
            "softcap",
        ),
        (
            [
                base("q.npy"),
                vec![
                    "--dropout".into(),
                    "1.5".into(),
                    "--seed".into(),
                    "3".into(),
                ],
            ]
            .concat(),
            "dropout",
        ),
        (
            [base("q.npy"), vec!["--mask".into(), p("mask.npy")]].concat(),
            "broadcast",
        ),
        (
            [base("q.npy"), vec!["--window".into(), "3".into()]].concat(),
            "L,R",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, err) = attentive(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(
            err.contains(needle),
            "{args:?}: stderr {err:?} lacks {needle:?}"
        );
    }
}

#[test]
fn bench_prints_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args([
            "bench",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--seq",
            "100",
            "--dim",
            "40",
            "--causal",
            "top-left",
            "--backward",
            "--iters",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let j: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(j["median_ms"].as_f64().unwrap() > 0.0);
    assert!(j["gflops"].as_f64().unwrap() > 0.0);
    assert!(j["peak_rss_mb"].as_f64().unwrap() > 0.0);
    assert_eq!(j["pairs"].as_u64().unwrap(), 2 * 100 * 101 / 2);
}

#[test]
fn bench_scaling_reports_every_thread_count_up_to_all_cores() {
    let out = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args(["bench", "--heads", "4", "--seq", "200", "--dim", "32"])
        .args(["--iters", "3", "--scaling", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let j: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let rows = j["scaling"].as_array().unwrap();
    let threads: Vec<u64> = rows
        .iter()
        .map(|r| r["threads"].as_u64().unwrap())
        .collect();
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    // 1, 2, 4, … below the core count, then the core count itself.
    let mut want: Vec<u64> = std::iter::successors(Some(1), |t| Some(2 * t))
        .take_while(|&t| t < cores)
        .collect();
    want.push(cores);
    assert_eq!(threads, want);
    assert_eq!(rows[0]["speedup"].as_f64(), Some(1.0));
    for r in rows {
        let (t, s, e) = (
            r["threads"].as_f64().unwrap(),
            r["speedup"].as_f64().unwrap(),
            r["efficiency"].as_f64().unwrap(),
        );
        assert!((e - s / t).abs() < 1e-9 && s > 0.0 && r["gflops"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn attend_with_a_pattern_and_documents_matches_the_oracle() {
    let d = dir("pattern");
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let s = [1usize, 2, 150, 8];
    let (q, k, v) = (values(2400, 5), values(2400, 6), values(2400, 7));
    let sh = s.map(|x| x as u64);
    write(&d.join("q.npy"), &sh, &q);
    write(&d.join("k.npy"), &sh, &k);
    write(&d.join("v.npy"), &sh, &v);
    // Three packed documents, as int64 ids.
    let docs: Vec<i64> = (0..150).map(|i| (i / 60) as i64).collect();
    write(&d.join("docs.npy"), &[150], &docs);
    let text = "sink:2,20+strided:16&causal";
    let (ok, err) = attentive(&[
        "attend",
        "--q",
        &p("q.npy"),
        "--k",
        &p("k.npy"),
        "--v",
        &p("v.npy"),
        "--out",
        &p("o.npy"),
        "--pattern",
        text,
        "--docs",
        &p("docs.npy"),
    ]);
    assert!(ok, "{err}");
    let pattern: attentive::Pattern = text.parse().unwrap();
    let ids: Vec<u32> = docs.iter().map(|&x| x as u32).collect();
    let opts = Options::new().pattern(&pattern).docs(&ids, &ids);
    let (qv, kv, vv) = (
        View::contiguous(&q, &s).unwrap(),
        View::contiguous(&k, &s).unwrap(),
        View::contiguous(&v, &s).unwrap(),
    );
    let want = reference::forward::<f64>(qv, kv, vv, &opts).unwrap();
    let (_, got) = read(&d.join("o.npy"));
    let err = got
        .iter()
        .zip(&want.o)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-5, "{err}");
    // Bad patterns and ids are errors that name what is wrong.
    let base = [
        "attend",
        "--q",
        &p("q.npy"),
        "--k",
        &p("k.npy"),
        "--v",
        &p("v.npy"),
        "--out",
        &p("o.npy"),
    ];
    let (ok, err) = attentive(&[&base[..], &["--pattern", "strided:0"]].concat());
    assert!(!ok && err.contains("stride"), "{err}");
    let (ok, err) = attentive(&[&base[..], &["--pattern", "window:3"]].concat());
    assert!(!ok && err.contains("window:3"), "{err}");
    write(&d.join("neg.npy"), &[150], &vec![-1i64; 150]);
    let (ok, err) = attentive(&[&base[..], &["--docs", &p("neg.npy")]].concat());
    assert!(!ok && err.contains("neg.npy"), "{err}");
    write(&d.join("short.npy"), &[7], &[0i32; 7]);
    let (ok, err) = attentive(&[&base[..], &["--docs", &p("short.npy")]].concat());
    assert!(!ok && err.contains("docs"), "{err}");
}

#[test]
fn bench_serves_timed_calls_on_inputs_from_a_directory() {
    use std::io::{BufRead, BufReader, Write};
    let d = dir("serve");
    let (qs, ks) = ([1usize, 4, 70, 16], [1usize, 2, 70, 16]);
    let (q, k, v, d_o) = (
        values(4480, 5),
        values(2240, 6),
        values(2240, 7),
        values(4480, 8),
    );
    let sh = |s: [usize; 4]| s.map(|x| x as u64);
    for (name, shape, data) in [
        ("q", qs, &q),
        ("k", ks, &k),
        ("v", ks, &v),
        ("do", qs, &d_o),
    ] {
        write(&d.join(format!("{name}.npy")), &sh(shape), data);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args([
            "bench",
            "--serve",
            "--backward",
            "--causal",
            "top-left",
            "--inputs",
        ])
        .arg(&d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ask = |line: &str| {
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        let mut reply = String::new();
        stdout.read_line(&mut reply).unwrap();
        reply.trim().to_string()
    };
    for _ in 0..3 {
        let secs: f64 = ask("run").parse().unwrap();
        assert!(secs > 0.0 && secs < 10.0, "{secs}");
    }
    let secs: f64 = ask(&format!("save {}", d.display())).parse().unwrap();
    assert!(secs > 0.0);
    let rss: u64 = ask("rss").parse().unwrap();
    assert!(rss > 1 << 20, "{rss}");
    ask("quit");
    assert!(child.wait().unwrap().success());

    let opts = Options::new().causal(Causal::TopLeft);
    let (qv, kv, vv) = (
        View::contiguous(&q, &qs).unwrap(),
        View::contiguous(&k, &ks).unwrap(),
        View::contiguous(&v, &ks).unwrap(),
    );
    let want = reference::forward::<f64>(qv, kv, vv, &opts).unwrap();
    let grads = reference::backward::<f64>(qv, kv, vv, View::contiguous(&d_o, &qs).unwrap(), &opts)
        .unwrap();
    for (file, expect) in [
        ("o.npy", &want.o),
        ("dq.npy", &grads.dq),
        ("dk.npy", &grads.dk),
        ("dv.npy", &grads.dv),
    ] {
        let (_, got) = read(&d.join(file));
        assert_eq!(got.len(), expect.len(), "{file}");
        for (g, w) in got.iter().zip(expect.iter()) {
            assert!((*g as f64 - w).abs() < 1e-5, "{file}: {g} vs {w}");
        }
    }

    // An unknown command is an error with a non-zero exit code.
    let out = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args(["bench", "--serve", "--inputs"])
        .arg(&d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"dance\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command"));
}

/// Every subcommand's output piped into a reader that goes away, once after its first line and
/// once before the program writes anything: the program ends with status 0 (or a clean error),
/// never a panic.
#[test]
fn a_closed_output_pipe_ends_each_subcommand_quietly() {
    use std::io::{BufRead, BufReader};
    let d = dir("pipe");
    let (q, kv) = (values(2 * 3 * 8, 1), values(2 * 5 * 8, 2));
    write(&d.join("q.npy"), &[1, 2, 3, 8], &q);
    write(&d.join("k.npy"), &[1, 2, 5, 8], &kv);
    write(&d.join("v.npy"), &[1, 2, 5, 8], &kv);
    let s = |p: &str| d.join(p).to_str().unwrap().to_string();
    let (qp, kp, vp, op, demo) = (s("q.npy"), s("k.npy"), s("v.npy"), s("o.npy"), s("demo"));
    let train_out = s("model");
    write(&d.join("maps.npy"), &[1, 1, 3, 3], &[1.0f32 / 3.0; 9]);
    std::fs::write(d.join("tokens.txt"), "a\nb\nc\n").unwrap();
    let (maps, tokens, viz) = (s("maps.npy"), s("tokens.txt"), s("viz"));
    let commands: Vec<Vec<&str>> = vec![
        vec!["--help"],
        vec!["--version"],
        vec!["attend", "--q", &qp, "--k", &kp, "--v", &vp, "--out", &op],
        vec!["bench", "--heads", "1", "--seq", "64", "--iters", "3"],
        vec![
            "bench", "--heads", "1", "--seq", "64", "--iters", "3", "--json",
        ],
        vec![
            "bench",
            "--heads",
            "1",
            "--seq",
            "64",
            "--iters",
            "3",
            "--scaling",
        ],
        vec!["peak", "--read-mib", "16"],
        vec!["demo", "--list-test-words"],
        vec!["demo", "--out", &demo, "--json"],
        vec!["train", "g2p", "--minutes", "0.02", "--out", &train_out],
        vec![
            "viz", "--maps", &maps, "--tokens", &tokens, "--out", &viz, "--json",
        ],
    ];
    for args in &commands {
        for early in [true, false] {
            let (reader, writer) = std::io::pipe().unwrap();
            let reader = if early {
                drop(reader);
                None
            } else {
                Some(reader)
            };
            let child = Command::new(env!("CARGO_BIN_EXE_attentive"))
                .args(args)
                .stdout(writer)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            if let Some(r) = reader {
                let mut line = String::new();
                BufReader::new(r).read_line(&mut line).unwrap();
            }
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !err.contains("panicked"),
                "{args:?} (closed early: {early}): {err}"
            );
            assert!(
                out.status.success()
                    || (out.status.code() == Some(1) && err.starts_with("error: ")),
                "{args:?} (closed early: {early}): {:?} {err}",
                out.status
            );
        }
    }
}

#[test]
fn peak_measures_both_ceilings() {
    let out = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args(["peak", "--threads", "1", "--read-mib", "32"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["threads"], 1);
    // A core of any machine this runs on does more than 1 GFLOP/s and reads more than 0.1 GB/s;
    // a probe that measured nothing (or was optimised away) would print 0 or infinity.
    for (key, floor) in [("fma_gflops", 1.0), ("read_gbps", 0.1)] {
        let x = j[key].as_f64().unwrap();
        assert!(x > floor && x < 1e5, "{key} = {x}");
    }
}

/// `attend` writes all its outputs or none: when one cannot be written, the others are not left
/// behind, and no temporary file remains.
#[test]
fn attend_writes_all_outputs_or_none() {
    let d = dir("all-or-none");
    let (q, kv) = (values(2 * 3 * 8, 3), values(2 * 5 * 8, 4));
    write(&d.join("q.npy"), &[1, 2, 3, 8], &q);
    write(&d.join("k.npy"), &[1, 2, 5, 8], &kv);
    write(&d.join("v.npy"), &[1, 2, 5, 8], &kv);
    let s = |p: &str| d.join(p).to_str().unwrap().to_string();
    let (ok, err) = attentive(&[
        "attend",
        "--q",
        &s("q.npy"),
        "--k",
        &s("k.npy"),
        "--v",
        &s("v.npy"),
        "--out",
        &s("o.npy"),
        "--lse",
        &s("missing-folder/lse.npy"),
    ]);
    assert!(!ok && err.contains("lse.npy"), "{err}");
    let mut left: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["k.npy", "q.npy", "v.npy"]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn requests_larger_than_memory_are_refused_with_their_size() {
    // A decode over 10⁹ keys (32 heads, D = 128: 15 TiB of keys) and a shape past the address
    // space: errors that give the size, at once, before anything is allocated.
    let t = std::time::Instant::now();
    let args = [
        "bench",
        "--seq",
        "1",
        "--kv-seq",
        "1000000000",
        "--heads",
        "32",
        "--dim",
        "128",
    ];
    let (ok, err) = attentive(&args);
    assert!(!ok);
    assert!(
        err.contains("16384000000000 bytes (14.9 TiB) would exceed"),
        "{err}"
    );
    let (ok, err) = attentive(&["bench", "--seq", "1", "--kv-seq", "100000000000000000"]);
    assert!(
        !ok && err.contains("more elements than memory can address"),
        "{err}"
    );
    // An input of no elements that declares 10¹⁰ rows: its output would need 40 GB per column.
    let d = dir("huge-rows");
    write(&d.join("q.npy"), &[1, 1, 10_000_000_000, 0], &[0.0f32; 0]);
    write(&d.join("k.npy"), &[1, 1, 2, 0], &[0.0f32; 0]);
    write(&d.join("v.npy"), &[1, 1, 2, 1024], &[0.5f32; 2048]);
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let (q, k, v, o) = (p("q.npy"), p("k.npy"), p("v.npy"), p("o.npy"));
    let (ok, err) = attentive(&["attend", "--q", &q, "--k", &k, "--v", &v, "--out", &o]);
    assert!(!ok && err.contains("would exceed"), "{err}");
    assert!(!d.join("o.npy").exists());
    assert!(t.elapsed().as_secs_f64() < 20.0);
}
