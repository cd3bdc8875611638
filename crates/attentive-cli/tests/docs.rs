//! The API documentation as a reader gets it: `cargo doc --no-deps --workspace` builds without
//! a warning, its front page is the library's, and the math of the doc comments reaches KaTeX
//! intact (rustdoc's Markdown neither eats a LaTeX backslash nor turns subscripts into italics).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `$…$` and `$$…$$` spans of a text, skipping code spans; `None` where a `$` is unclosed.
fn math_spans(text: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let (mut in_code, mut cur): (bool, Option<String>) = (false, None);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, &mut cur) {
            ('`', None) => in_code = !in_code,
            ('$', None) if !in_code => {
                if chars.peek() == Some(&'$') {
                    chars.next();
                }
                cur = Some(String::new());
            }
            ('$', Some(s)) => {
                if chars.peek() == Some(&'$') {
                    chars.next();
                }
                spans.push(std::mem::take(s));
                cur = None;
            }
            (c, Some(s)) => s.push(c),
            _ => {}
        }
    }
    spans
}

/// Each doc comment block of a Rust file, its lines joined, fenced code blocks removed.
fn doc_blocks(src: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let (mut cur, mut fence) = (String::new(), false);
    for line in src.lines() {
        let t = line.trim_start();
        let doc = t.strip_prefix("///").or_else(|| t.strip_prefix("//!"));
        match doc {
            Some(d) => {
                if d.trim_start().starts_with("```") {
                    fence = !fence;
                } else if !fence {
                    cur.push_str(d);
                    cur.push('\n');
                }
            }
            None if !cur.is_empty() => blocks.push(std::mem::take(&mut cur)),
            None => {}
        }
    }
    blocks.push(cur);
    blocks
}

/// Every file below `dir` whose name ends in `.ext`.
fn files_with(ext: &str, dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_with(ext, &p, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

/// Places where Markdown would change a doc comment's LaTeX: a single backslash before the
/// punctuation Markdown unescapes (`\,` renders as `,`; write `\\,`), and an `_` after
/// punctuation, which can open emphasis (`\mathrm{LSE}_i`; write `\_`).
#[test]
fn doc_comment_math_survives_markdown() {
    let mut files = Vec::new();
    files_with("rs", &root().join("crates"), &mut files);
    let mut bad = Vec::new();
    let mut count = 0;
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        for block in doc_blocks(&src) {
            for span in math_spans(&block) {
                count += 1;
                let b: Vec<char> = span.chars().collect();
                for i in 0..b.len() {
                    let run = b[..i].iter().rev().take_while(|&&c| c == '\\').count();
                    let lost = b[i] == '\\'
                        && run == 0
                        && b.get(i + 1).is_some_and(|c| "!,;:{}|".contains(*c));
                    let emph = b[i] == '_'
                        && run == 0
                        && i > 0
                        && (b[i - 1].is_ascii_punctuation() || "’'".contains(b[i - 1]));
                    if lost || emph {
                        bad.push(format!("{}: ${span}$", f.display()));
                        break;
                    }
                }
            }
        }
    }
    assert!(count > 100, "found only {count} math spans");
    assert!(
        bad.is_empty(),
        "math Markdown would change:\n{}",
        bad.join("\n")
    );
}

#[test]
fn cargo_doc_builds_cleanly_with_the_library_on_the_front_page() {
    let root = root();
    let header = root.join("docs/katex-header.html");
    let target = root.join("target/doc-check");
    let out = Command::new(env!("CARGO"))
        .args(["doc", "--no-deps", "--workspace", "--target-dir"])
        .arg(&target)
        .current_dir(&root)
        // A sanitizer run's compiler flags (fuzz/sanitize.sh) would reach the procedural
        // macros, which the compiler loads and cannot load so built: the docs build without them.
        .env_remove("RUSTFLAGS")
        .env(
            "RUSTDOCFLAGS",
            format!("-D warnings --html-in-header {}", header.display()),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo doc failed:\n{err}");
    assert!(!err.contains("warning"), "cargo doc warned:\n{err}");
    let front = std::fs::read_to_string(target.join("doc/attentive/index.html")).unwrap();
    assert!(front.contains("Crate <span>attentive</span>") || front.contains("Crate attentive"));
    for item in [
        "fn.forward.html",
        "fn.backward.html",
        "struct.HugeVec.html",
        "reference/index.html",
    ] {
        assert!(front.contains(item), "the front page does not list {item}");
    }
    assert!(!front.contains("AttendArgs") && !front.contains("fn.main.html"));
    // Every page carries the KaTeX header, and no math span holds Markdown's markup.
    let mut pages = Vec::new();
    for krate in ["attentive", "attentive_nn"] {
        files_with("html", &target.join("doc").join(krate), &mut pages);
    }
    let mut spans = 0;
    for p in &pages {
        let html = std::fs::read_to_string(p).unwrap();
        // (Pages without a <main> are redirects to an item's re-exported path.)
        let Some(main) = html.split("<main>").nth(1) else {
            continue;
        };
        assert!(
            html.contains("katex.min.js"),
            "{} lacks the KaTeX header",
            p.display()
        );
        let text = strip_code(main);
        for span in math_spans(&text) {
            spans += 1;
            assert!(
                !["<em>", "</em>", "<strong>", "<a "]
                    .iter()
                    .any(|t| span.contains(t)),
                "{}: markup inside ${span}$",
                p.display()
            );
        }
    }
    assert!(
        spans > 100,
        "found only {spans} math spans in the built pages"
    );
}

/// The HTML without its `<pre>` blocks and `<code>` spans (which hold `$` of their own).
fn strip_code(html: &str) -> String {
    let mut s = html.to_string();
    for (open, close) in [("<pre", "</pre>"), ("<code>", "</code>")] {
        while let Some(a) = s.find(open) {
            let Some(b) = s[a..].find(close) else { break };
            s.replace_range(a..a + b + close.len(), "");
        }
    }
    s
}
