//! `attentive pool`: hierarchical attention pooling from .npy files. One level equals the f64
//! oracle (output, weights, gradients of h and of W, b, c); a document equals the oracle's two
//! levels chained (sentences hidden when they have no word); misuse is a clear error.

use attentive::reference::variants::han_pool;
use attentive::variants::han::Level;
mod common;
use common::write_npy as write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attentive-pool-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let f =
        npyz::NpyFile::new(std::io::BufReader::new(std::fs::File::open(path).unwrap())).unwrap();
    (f.shape().to_vec(), f.into_vec().unwrap())
}

fn attentive(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_attentive"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn values(n: usize, seed: u32, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((((i as u32).wrapping_mul(2654435761)) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .map(|x| x * amp)
        .collect()
}

fn close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
    let e = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(e < 1e-5 * scale, "{what}: off by {e:e} (scale {scale:e})");
}

/// Writes a level's W [A, D], b [A], c [A] as `w{suffix}` etc.; returns them and the flags.
fn level(d: &Path, suffix: &str, a: usize, dd: usize, seed: u32) -> ([Vec<f32>; 3], Vec<String>) {
    let x = [
        values(a * dd, seed, 0.5),
        values(a, seed + 1, 0.3),
        values(a, seed + 2, 1.0),
    ];
    let mut flags = Vec::new();
    for (name, (data, shape)) in ["w", "b", "c"].iter().zip(x.iter().zip([
        vec![a as u64, dd as u64],
        vec![a as u64],
        vec![a as u64],
    ])) {
        let f = d.join(format!("{name}{suffix}.npy"));
        write(&f, &shape, data);
        flags.push("--param".to_string());
        flags.push(format!("{name}{suffix}={}", f.display()));
        flags.push("--d-param".to_string());
        flags.push(format!(
            "{name}{suffix}={}",
            d.join(format!("d{name}{suffix}.npy")).display()
        ));
    }
    (x, flags)
}

#[test]
fn one_level_and_a_document_equal_the_oracle() {
    let d = dir("all");
    let p = |f: &str| d.join(f).display().to_string();
    // One level: 3 groups of 5 rows, D = 4, A = 6; group 1 has no visible row.
    let (g, n, dd, a) = (3, 5, 4, 6);
    let h = values(g * n * dd, 3, 1.0);
    let mask: Vec<bool> = (0..g * n).map(|i| i / n != 1 && i % n != 3).collect();
    let ds = values(g * dd, 9, 1.0);
    write(&d.join("h.npy"), &[g as u64, n as u64, dd as u64], &h);
    write(&d.join("m.npy"), &[g as u64, n as u64], &mask);
    write(&d.join("ds.npy"), &[g as u64, dd as u64], &ds);
    let ([w, b, c], flags) = level(&d, "", a, dd, 20);
    let mut args: Vec<String> = ["pool", "--h", &p("h.npy"), "--mask", &p("m.npy"), "--out"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([
        p("s.npy"),
        "--weights".into(),
        p("alpha.npy"),
        "--grad-out".into(),
    ]);
    args.extend([p("ds.npy"), "--dh".into(), p("dh.npy")]);
    args.extend(flags);
    let (ok, err) = attentive(&args);
    assert!(ok, "{err}");
    let lv = Level {
        w: &w,
        b: &b,
        c: &c,
    };
    let want = han_pool::<f64>(&h, (g, n, dd), Some(&mask), &lv, &ds).unwrap();
    for (file, want) in [
        ("s.npy", &want.0),
        ("alpha.npy", &want.1),
        ("dh.npy", &want.2),
        ("dw.npy", &want.3),
        ("db.npy", &want.4),
        ("dc.npy", &want.5),
    ] {
        close(&read(&d.join(file)).1, want, file);
    }
    let (shape, s) = read(&d.join("s.npy"));
    assert_eq!(shape, [g as u64, dd as u64]);
    assert!(
        s[dd..2 * dd].iter().all(|&x| x == 0.0),
        "a hidden group pools to 0"
    );

    // A document: 2 documents × 3 sentences × 4 words, D = 4; document 0's sentence 2 empty.
    let (docs, sents, words) = (2, 3, 4);
    let h = values(docs * sents * words * dd, 5, 1.0);
    let mask: Vec<bool> = (0..docs * sents * words)
        .map(|i| i / words != 2 && i % words != 1)
        .collect();
    let dd_doc = values(docs * dd, 11, 1.0);
    let shape4 = [docs as u64, sents as u64, words as u64, dd as u64];
    write(&d.join("h4.npy"), &shape4, &h);
    write(&d.join("m4.npy"), &shape4[..3], &mask);
    write(&d.join("dd.npy"), &[docs as u64, dd as u64], &dd_doc);
    let ([ww, wb, wc], mut flags) = level(&d, "_word", a, dd, 30);
    let ([sw, sb, sc], f2) = level(&d, "_sent", 3, dd, 40);
    flags.extend(f2);
    let mut args: Vec<String> = ["pool", "--h", &p("h4.npy"), "--mask", &p("m4.npy")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([
        "--out".into(),
        p("doc.npy"),
        "--sentences".into(),
        p("sv.npy"),
    ]);
    args.extend([
        "--grad-out".into(),
        p("dd.npy"),
        "--dh".into(),
        p("dh4.npy"),
    ]);
    args.extend(flags);
    let (ok, err) = attentive(&args);
    assert!(ok, "{err}");
    // The oracle, level by level: words, then sentences (hidden when they have no word).
    let word = Level {
        w: &ww,
        b: &wb,
        c: &wc,
    };
    let sent = Level {
        w: &sw,
        b: &sb,
        c: &sc,
    };
    let zeros = vec![0.0f32; docs * sents * dd];
    let sv = han_pool::<f64>(&h, (docs * sents, words, dd), Some(&mask), &word, &zeros).unwrap();
    let sv32: Vec<f32> = sv.0.iter().map(|&x| x as f32).collect();
    let smask: Vec<bool> = (0..docs * sents)
        .map(|s| mask[s * words..(s + 1) * words].iter().any(|&x| x))
        .collect();
    let top = han_pool::<f64>(&sv32, (docs, sents, dd), Some(&smask), &sent, &dd_doc).unwrap();
    close(&read(&d.join("sv.npy")).1, &sv.0, "sentence vectors");
    close(&read(&d.join("doc.npy")).1, &top.0, "documents");
    close(&read(&d.join("dw_sent.npy")).1, &top.3, "dW_sent");
    // The words' gradients: the sentence level's dh is the word level's output gradient.
    let dsv: Vec<f32> = top.2.iter().map(|&x| x as f32).collect();
    let low = han_pool::<f64>(&h, (docs * sents, words, dd), Some(&mask), &word, &dsv).unwrap();
    close(&read(&d.join("dh4.npy")).1, &low.2, "dh");
    close(&read(&d.join("dc_word.npy")).1, &low.5, "dc_word");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn misuse_is_a_clear_error() {
    let d = dir("bad");
    let p = |f: &str| d.join(f).display().to_string();
    write(&d.join("h.npy"), &[2, 3, 4], &values(24, 1, 1.0));
    write(&d.join("h2.npy"), &[6, 4], &values(24, 1, 1.0));
    let (_, flags) = level(&d, "", 5, 4, 1);
    // The weights only (no gradients asked for).
    let flags: Vec<String> = flags
        .chunks(2)
        .filter(|c| c[0] == "--param")
        .flatten()
        .cloned()
        .collect();
    let run = |h: &str, extra: &[String]| {
        let mut args: Vec<String> = ["pool", "--h", &p(h), "--out", &p("o.npy")]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().cloned());
        attentive(&args)
    };
    let (ok, err) = run("h2.npy", &flags);
    assert!(
        !ok && err.contains("expected [DOCS, SENTENCES, WORDS, D] or [GROUPS, N, D]"),
        "{err}"
    );
    let (ok, err) = run("h.npy", &flags[..2]);
    assert!(!ok && err.contains("needs b=FILE.npy"), "{err}");
    let mut bad = flags[..2].to_vec();
    bad.extend(["--param".into(), format!("w_word={}", p("w.npy"))]);
    let (ok, err) = run("h.npy", &bad);
    assert!(!ok && err.contains("this input takes w, b, c"), "{err}");
    write(&d.join("w5.npy"), &[5, 3], &values(15, 2, 1.0));
    let mut wrong = flags.clone();
    let i = wrong.iter().position(|f| f.starts_with("w=")).unwrap();
    wrong[i] = format!("w={}", p("w5.npy"));
    let (ok, err) = run("h.npy", &wrong);
    assert!(
        !ok && err.contains("w: expected 20 elements, got 15"),
        "{err}"
    );
    assert!(!d.join("o.npy").exists());
    let _ = std::fs::remove_dir_all(&d);
}
