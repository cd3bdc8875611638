//! `attentive attend --variant`: each variant's outputs and gradients from .npy files equal its
//! f64 oracle's, parameters come in as `--param NAME=FILE.npy`, and misuse is a clear error.

use attentive::reference::variants as oracle;
use attentive::variants::{
    adaptive_span, additive, gated, linear, linformer, lsh, nystrom, performer,
};
use attentive::View;
mod common;
use common::write_npy as write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attentive-variants-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
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

fn values(n: usize, seed: u32, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((((i as u32).wrapping_mul(2654435761)) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .map(|x| x * amp)
        .collect()
}

/// The largest difference, in f64.
fn worst(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
}

const S: [usize; 4] = [1, 2, 40, 8];

/// Writes q, k, v and grad-out; returns them.
fn inputs(d: &Path) -> [Vec<f32>; 4] {
    let n: usize = S.iter().product();
    let x = [
        values(n, 1, 0.6),
        values(n, 7, 0.6),
        values(n, 13, 1.0),
        values(n, 29, 1.0),
    ];
    for (name, data) in ["q", "k", "v", "g"].iter().zip(&x) {
        write(&d.join(format!("{name}.npy")), &S.map(|s| s as u64), data);
    }
    x
}

fn run(d: &Path, extra: &[&str]) -> (bool, String) {
    let p = |f: &str| d.join(f).display().to_string();
    let mut args: Vec<String> = [
        "attend",
        "--q",
        &p("q.npy"),
        "--k",
        &p("k.npy"),
        "--v",
        &p("v.npy"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--out", &p("o.npy"), "--grad-out", &p("g.npy")].map(String::from));
    args.extend(
        [
            "--dq",
            &p("dq.npy"),
            "--dk",
            &p("dk.npy"),
            "--dv",
            &p("dv.npy"),
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    attentive(&refs)
}

fn check(d: &Path, want: (&[f64], &[f64], &[f64], &[f64]), what: &str) {
    for (file, w) in [
        ("o.npy", want.0),
        ("dq.npy", want.1),
        ("dk.npy", want.2),
        ("dv.npy", want.3),
    ] {
        let (shape, got) = read(&d.join(file));
        assert_eq!(shape, S.map(|s| s as u64), "{what} {file}");
        let scale = w.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
        let e = worst(&got, w);
        assert!(
            e < 1e-5 * scale,
            "{what} {file}: off by {e:e} (scale {scale:e})"
        );
    }
}

#[test]
fn every_variant_from_files_equals_its_oracle() {
    let d = dir("all");
    let x = inputs(&d);
    let v = |i: usize| View::contiguous(&x[i], &S).unwrap();
    // Linear, causal.
    let (ok, err) = run(&d, &["--variant", "linear", "--causal", "top-left"]);
    assert!(ok, "{err}");
    let opts = linear::Linear {
        causal: true,
        ..Default::default()
    };
    let w = oracle::linear::<f64>(v(0), v(1), v(2), v(3), &opts).unwrap();
    check(&d, (&w.0, &w.1, &w.2, &w.3), "linear");
    // GLA with gates, and their gradient.
    let gates: Vec<f32> = values(S.iter().product(), 3, 0.5)
        .iter()
        .map(|x| -x.abs())
        .collect();
    write(&d.join("gates.npy"), &S.map(|s| s as u64), &gates);
    let gp = format!("gates={}", d.join("gates.npy").display());
    let dg = format!("gates={}", d.join("dg.npy").display());
    let (ok, err) = run(
        &d,
        &[
            "--variant",
            "gla",
            "--causal",
            "top-left",
            "--param",
            &gp,
            "--d-param",
            &dg,
        ],
    );
    assert!(ok, "{err}");
    let gv = View::contiguous(&gates, &S).unwrap();
    let w = oracle::gated::<f64>(
        v(0),
        v(1),
        v(2),
        v(3),
        &gated::Gated::new(gated::Decay::Gates(gv)),
    )
    .unwrap();
    check(&d, (&w.0, &w.1, &w.2, &w.3), "gla");
    let (shape, got) = read(&d.join("dg.npy"));
    assert_eq!(shape, S.map(|s| s as u64));
    let scale = w.4.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
    assert!(worst(&got, &w.4) < 1e-4 * scale, "gla d-param");
    // Performer with its features from a file.
    let feats = performer::draw_features(24, S[3], 4);
    write(&d.join("w.npy"), &[24, S[3] as u64], &feats);
    let wp = format!("features={}", d.join("w.npy").display());
    let (ok, err) = run(&d, &["--variant", "performer", "--param", &wp]);
    assert!(ok, "{err}");
    let w = oracle::performer::<f64>(v(0), v(1), v(2), v(3), &performer::Performer::new(&feats))
        .unwrap();
    check(&d, (&w.0, &w.1, &w.2, &w.3), "performer");
    // Linformer with E (F shared) and E's gradient.
    let e = values(S[2] * 6, 5, 0.3);
    write(&d.join("e.npy"), &[S[2] as u64, 6], &e);
    let ep = format!("e={}", d.join("e.npy").display());
    let de = format!("e={}", d.join("de.npy").display());
    let (ok, err) = run(
        &d,
        &["--variant", "linformer", "--param", &ep, "--d-param", &de],
    );
    assert!(ok, "{err}");
    let w = oracle::linformer::<f64>(
        v(0),
        v(1),
        v(2),
        v(3),
        &linformer::Linformer::new(&e, None, 6),
    )
    .unwrap();
    check(&d, (&w.0, &w.1, &w.2, &w.3), "linformer");
    let (shape, got) = read(&d.join("de.npy"));
    assert_eq!(shape, [S[2] as u64, 6]);
    let scale = w.4.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
    assert!(worst(&got, &w.4) < 1e-4 * scale, "linformer d-param");
    let (ok, err) = run(
        &d,
        &[
            "--variant",
            "linformer",
            "--param",
            &ep,
            "--causal",
            "top-left",
        ],
    );
    assert!(!ok && err.contains("no causal form"), "{err}");
    // Adaptive span: z per head, its gradient against the rule's oracle.
    let z = [0.3f32, 0.7];
    write(&d.join("z.npy"), &[2], &z);
    let zp = format!("z={}", d.join("z.npy").display());
    let dz = format!("z={}", d.join("dz.npy").display());
    let span_args = [
        "--variant",
        "adaptive-span",
        "--param",
        &zp,
        "--max-span",
        "24",
        "--ramp",
        "6",
        "--d-param",
        &dz,
    ];
    let (ok, err) = run(&d, &span_args);
    assert!(ok, "{err}");
    let span = adaptive_span::AdaptiveSpan {
        current: &z,
        max_span: 24,
        ramp: 6,
    };
    let o = attentive::reference::forward::<f64>(v(0), v(1), v(2), &span.options()).unwrap();
    let g = attentive::reference::backward::<f64>(v(0), v(1), v(2), v(3), &span.options()).unwrap();
    check(&d, (&o.o, &g.dq, &g.dk, &g.dv), "adaptive-span");
    let (_, got) = read(&d.join("dz.npy"));
    let scale = g.d_params.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
    assert!(
        worst(&got, &g.d_params) < 1e-4 * scale,
        "adaptive-span d-param"
    );
    // Bahdanau with its three weights, and each weight's gradient.
    let a = 5;
    let (wq, wk, wv) = (
        values(a * S[3], 17, 0.4),
        values(a * S[3], 19, 0.4),
        values(a, 23, 1.0),
    );
    write(&d.join("wq.npy"), &[a as u64, S[3] as u64], &wq);
    write(&d.join("wk.npy"), &[a as u64, S[3] as u64], &wk);
    write(&d.join("wv.npy"), &[a as u64], &wv);
    let f = |s: &str| d.join(s).display().to_string();
    let (pq, pk, pv) = (
        format!("w_q={}", f("wq.npy")),
        format!("w_k={}", f("wk.npy")),
        format!("v={}", f("wv.npy")),
    );
    let (gq, gk, gvv) = (
        format!("w_q={}", f("dwq.npy")),
        format!("w_k={}", f("dwk.npy")),
        format!("v={}", f("dwv.npy")),
    );
    let args = [
        "--variant",
        "additive",
        "--param",
        &pq,
        "--param",
        &pk,
        "--param",
        &pv,
        "--d-param",
        &gq,
        "--d-param",
        &gk,
        "--d-param",
        &gvv,
    ];
    let (ok, err) = run(&d, &args);
    assert!(ok, "{err}");
    let opts = additive::Additive {
        score: additive::Score::Additive {
            w_q: &wq,
            w_k: &wk,
            v: &wv,
        },
        key_mask: None,
        local: None,
    };
    let w = oracle::additive::<f64>(v(0), v(1), v(2), v(3), &opts).unwrap();
    check(&d, (&w.0, &w.1, &w.2, &w.3), "additive");
    for (file, want) in [
        ("dwq.npy", &w.4[0]),
        ("dwk.npy", &w.4[1]),
        ("dwv.npy", &w.4[2]),
    ] {
        let (_, got) = read(&d.join(file));
        let scale = want.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
        assert!(worst(&got, want) < 1e-4 * scale, "additive {file}");
    }
    // Nyström: output against its oracle (its gradients are held to finite differences in the
    // engine's tests); 40 positions in 8 segments.
    let (ok, err) = run(&d, &["--variant", "nystrom", "--landmarks", "8"]);
    assert!(ok, "{err}");
    let want = oracle::nystrom::<f64>(v(0), v(1), v(2), &nystrom::Nystrom::new(8)).unwrap();
    let (_, got) = read(&d.join("o.npy"));
    assert!(worst(&got, &want) < 1e-5, "nystrom");
    let (ok, err) = run(&d, &["--variant", "nystrom", "--landmarks", "7"]);
    assert!(!ok && err.contains("landmarks"), "{err}");
    let (ok, err) = run(&d, &["--variant", "luong-dot", "--d-param", &gq]);
    assert!(
        !ok && err.contains("gives gradients of: no parameter"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// LSH (keys = queries, rotations from a file, causal) and Luong local-p (general score, the
/// centre's weights' gradients) from files equal their oracles.
#[test]
fn lsh_and_local_p_from_files_equal_their_oracles() {
    let d = dir("lsh");
    let [q, _, vv, g] = inputs(&d);
    write(&d.join("k.npy"), &S.map(|s| s as u64), &q);
    fn view(x: &[f32]) -> View<'_> {
        View::contiguous(x, &S).unwrap()
    }
    let rot = lsh::draw_rotations(3, S[3], 6, 5);
    write(&d.join("rot.npy"), &[3, S[3] as u64, 3], &rot);
    let pr = format!("rotations={}", d.join("rot.npy").display());
    let (ok, err) = run(
        &d,
        &[
            "--variant",
            "lsh",
            "--param",
            &pr,
            "--bucket-size",
            "8",
            "--causal",
            "top-left",
        ],
    );
    assert!(ok, "{err}");
    let opts = lsh::Lsh::new(&rot, 3, 6, 8).causal(true);
    let w = oracle::lsh::<f64>(view(&q), view(&vv), view(&g), &opts).unwrap();
    let zero = vec![0.0f64; w.1.len()];
    check(&d, (&w.0, &w.1, &zero, &w.2), "lsh");
    let (ok, err) = run(
        &d,
        &["--variant", "lsh", "--param", &pr, "--bucket-size", "7"],
    );
    assert!(!ok && err.contains("bucket_size"), "{err}");
    // Keys other than the queries.
    write(&d.join("k.npy"), &S.map(|s| s as u64), &vv);
    let (ok, err) = run(
        &d,
        &["--variant", "lsh", "--param", &pr, "--bucket-size", "8"],
    );
    assert!(!ok && err.contains("same tensor as q and k"), "{err}");
    // Local-p with the general score.
    let k = values(S.iter().product(), 7, 0.6);
    write(&d.join("k.npy"), &S.map(|s| s as u64), &k);
    let (a, dd) = (5, S[3]);
    let (w_p, v_p, wg) = (
        values(a * dd, 3, 0.5),
        values(a, 9, 1.0),
        values(dd * dd, 11, 0.3),
    );
    let mut args = vec![
        "--variant".to_string(),
        "luong-local".into(),
        "--half-width".into(),
        "6".into(),
    ];
    for (name, data, shape) in [
        ("w_p", &w_p, vec![a as u64, dd as u64]),
        ("v_p", &v_p, vec![a as u64]),
        ("w", &wg, vec![dd as u64, dd as u64]),
    ] {
        let f = d.join(format!("{name}.npy"));
        write(&f, &shape, data);
        args.extend(["--param".into(), format!("{name}={}", f.display())]);
        args.extend([
            "--d-param".into(),
            format!("{name}={}", d.join(format!("d{name}.npy")).display()),
        ]);
    }
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (ok, err) = run(&d, &refs);
    assert!(ok, "{err}");
    let opts = additive::Additive {
        score: additive::Score::General { w: &wg },
        key_mask: None,
        local: Some(additive::Local {
            w_p: &w_p,
            v_p: &v_p,
            half_width: 6,
            sigma: None,
        }),
    };
    let w = oracle::additive::<f64>(view(&q), view(&k), view(&vv), view(&g), &opts).unwrap();
    check(&d, (&w.0, &w.1, &w.2, &w.3), "luong-local");
    for (file, want) in [
        ("dw.npy", &w.4[0]),
        ("dw_p.npy", &w.4[3]),
        ("dv_p.npy", &w.4[4]),
    ] {
        let (_, got) = read(&d.join(file));
        let scale = want.iter().fold(1e-3f64, |a, x| a.max(x.abs()));
        assert!(worst(&got, want) < 1e-4 * scale, "luong-local {file}");
    }
    let (ok, err) = run(&d, &["--variant", "luong-local", "--param", &args[5]]);
    assert!(
        !ok && err.contains("needs --param w_p=FILE.npy v_p=FILE.npy"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn misuse_is_a_clear_error() {
    let d = dir("bad");
    inputs(&d);
    for (args, says) in [
        (vec!["--variant", "performer"], "needs --param features"),
        (
            vec!["--variant", "gla", "--causal", "top-left"],
            "needs --param gates",
        ),
        (vec!["--variant", "gla"], "causal only"),
        (
            vec!["--variant", "linear", "--param", "w=x.npy"],
            "takes no parameters",
        ),
        (
            vec!["--variant", "linear", "--softcap", "5"],
            "option of exact attention",
        ),
    ] {
        let (ok, err) = run(&d, &args);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
        assert!(!d.join("o.npy").exists(), "{args:?} wrote an output");
    }
    // Features of the wrong width.
    write(&d.join("w.npy"), &[4, 3], &[0.5f32; 12]);
    let wp = format!("features={}", d.join("w.npy").display());
    let (ok, err) = run(&d, &["--variant", "performer", "--param", &wp]);
    assert!(!ok && err.contains("expected [m, 8]"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}
