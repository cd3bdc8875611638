//! Outputs that appear whole or not at all: every file or folder the command writes is first
//! built beside its destination under a temporary name, flushed to the disk, then moved into
//! place once complete, so a failure (a bad word, a full disk, a process killed at any instant)
//! never leaves a partial result: the old output or the new one.

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

    /// Builds the folder aside with `fill`, flushes its files, then swaps it in: in one step
    /// where the system can exchange two folders (Linux), so that `dest` is at every instant
    /// the old folder or the new one.
    pub fn build<T>(&self, fill: impl FnOnce(&Path) -> Result<T, CliError>) -> Result<T, CliError> {
        self.check()?;
        remove_stale(self.dest);
        let tmp = sibling(self.dest);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let done = fill(&tmp).and_then(|t| {
            for e in std::fs::read_dir(&tmp).map_err(|e| io(&tmp, e))? {
                let p = e.map_err(|e| io(&tmp, e))?.path();
                sync(&p)?;
            }
            sync_dir(&tmp)?;
            swap_in(&tmp, self.dest)?;
            Ok(t)
        });
        let _ = std::fs::remove_dir_all(&tmp);
        done
    }
}

/// Moves the folder `new` to `dest`. Where `dest` exists, the two are exchanged in one step
/// (Linux's `renameat2(RENAME_EXCHANGE)`) and the old one is left at `new` to be removed;
/// elsewhere, or on a file system without the exchange, the old folder is moved aside first.
fn swap_in(new: &Path, dest: &Path) -> Result<(), CliError> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dest.exists() {
        std::fs::rename(new, dest).map_err(|e| io(dest, e))?;
        return sync_dir(parent);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        if let (Ok(a), Ok(b)) = (c(new), c(dest)) {
            // SAFETY: both are NUL-terminated paths that live across the call.
            let r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
            if r == 0 {
                return sync_dir(parent);
            }
        }
    }
    let old = parent.join(format!(
        ".{}.old-{}",
        dest.file_name()
            .map_or("out".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    std::fs::rename(dest, &old).map_err(|e| io(dest, e))?;
    std::fs::rename(new, dest).map_err(|e| io(dest, e))?;
    let _ = std::fs::remove_dir_all(&old);
    sync_dir(parent)
}

/// Removes what killed runs left beside `dest`: temporary siblings (`.NAME.tmp-PID`,
/// `.NAME.old-PID`) of processes no longer running (Linux; elsewhere nothing is removed).
fn remove_stale(dest: &Path) {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let name = name.to_string_lossy();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        let pid = [".tmp-", ".old-"]
            .iter()
            .find_map(|tag| f.strip_prefix(&format!(".{name}{tag}")));
        let dead = pid.is_some_and(|pid| {
            pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists()
        });
        if dead && Path::new("/proc/self").exists() {
            let p = e.path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
}

/// Flushes a written file to the disk.
fn sync(p: &Path) -> Result<(), CliError> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(p, e))
}

/// Flushes a folder's entries to the disk.
fn sync_dir(p: &Path) -> Result<(), CliError> {
    attentive_nn::train::sync_dir(p).map_err(|e| io(p, e))
}

/// Writes `bytes` to `dest` whole or not at all (attentive-nn's `write_atomically`).
pub fn write(dest: &Path, bytes: &[u8]) -> Result<(), CliError> {
    attentive_nn::train::write_atomically(dest, |p| std::fs::write(p, bytes))
        .map_err(|e| io(dest, e))
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
        let r = write(&tmp).and_then(|()| sync(&tmp));
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
            let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
            if let Err(e) = sync_dir(parent.unwrap_or(Path::new("."))) {
                result = Err(e);
                break;
            }
        }
    }
    for (tmp, _) in &written {
        let _ = std::fs::remove_file(tmp);
    }
    result
}
