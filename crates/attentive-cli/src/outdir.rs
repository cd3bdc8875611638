//! Outputs that appear whole or not at all: every file or folder the command writes is first
//! built beside its destination under a temporary name, then moved into place once complete,
//! so a failure (a bad word, a full disk, an interrupted run) never leaves a partial result.

use crate::error::CliError;
use std::path::{Path, PathBuf};

fn io(p: &Path, e: std::io::Error) -> CliError {
    CliError::Input {
        what: p.display().to_string(),
        reason: e.to_string(),
    }
}

/// A temporary sibling of `dest`: same folder (so the final rename stays on one file system),
/// hidden, named for this process.
pub fn sibling(dest: &Path) -> PathBuf {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    parent.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// A folder the command owns and rebuilds: `fill` writes its contents into a fresh temporary
/// folder, which then replaces `dest`. An existing `dest` is replaced only if every entry in it
/// is a file `ours` accepts (a previous run's output); otherwise the call fails before `fill`
/// runs. `check` alone (without building) is [`Folder::check`].
pub struct Folder<'a> {
    pub dest: &'a Path,
    pub ours: fn(&Path) -> bool,
}

impl Folder<'_> {
    /// Fails if `dest` exists and holds anything `ours` does not accept.
    pub fn check(&self) -> Result<(), CliError> {
        if !self.dest.exists() {
            return Ok(());
        }
        let entries = std::fs::read_dir(self.dest).map_err(|e| io(self.dest, e))?;
        for e in entries {
            let p = e.map_err(|e| io(self.dest, e))?.path();
            if !(p.is_file() && (self.ours)(&p)) {
                return Err(CliError::Input {
                    what: self.dest.display().to_string(),
                    reason: format!(
                        "exists and holds {}, which this command did not write; choose another --out",
                        p.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Builds the folder aside with `fill`, then swaps it in.
    pub fn build<T>(&self, fill: impl FnOnce(&Path) -> Result<T, CliError>) -> Result<T, CliError> {
        self.check()?;
        let tmp = sibling(self.dest);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let done = fill(&tmp).and_then(|t| {
            if self.dest.exists() {
                std::fs::remove_dir_all(self.dest).map_err(|e| io(self.dest, e))?;
            }
            std::fs::rename(&tmp, self.dest).map_err(|e| io(self.dest, e))?;
            Ok(t)
        });
        if done.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        done
    }
}

/// Writes one output file at the path it is given.
pub type Write<'w> = Box<dyn FnOnce(&Path) -> Result<(), CliError> + 'w>;

/// Writes each `(path, write)` to a temporary sibling, then, once all succeeded, moves them into
/// place; on any failure no destination is touched and the temporaries are removed.
pub fn files(outputs: Vec<(&Path, Write<'_>)>) -> Result<(), CliError> {
    let mut written = Vec::new();
    let mut result = Ok(());
    for (dest, write) in outputs {
        let tmp = sibling(dest);
        let r = write(&tmp);
        written.push((tmp, dest));
        if let Err(e) = r {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        for (tmp, dest) in &written {
            if let Err(e) = std::fs::rename(tmp, dest) {
                result = Err(io(dest, e));
                break;
            }
        }
    }
    for (tmp, _) in &written {
        let _ = std::fs::remove_file(tmp);
    }
    result
}
