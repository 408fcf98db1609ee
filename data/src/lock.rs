//! An exclusive lock on an output directory (`DIR/.lock`), held for as long as a command writes
//! into it: a second `train`, `data build-synth` or `teacher score` into the same directory is
//! refused, naming the holder, instead of interleaving its files with the first one's. The lock
//! is the operating system's (`flock`), so it ends with its process, however that ends.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Name of the lock file inside a locked directory.
pub const LOCK_FILE: &str = ".lock";

/// Refuses to write into `out` when it holds anything but a lock and is not `what` (a command's
/// output, recognised by its `marker` subdirectory): a user's folder is never written into.
pub fn check_output_dir(out: &Path, marker: &str, what: &str) -> Result<()> {
    if !out.is_dir() || out.join(marker).is_dir() {
        return Ok(());
    }
    let listing = std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?;
    if listing.into_iter().any(|e| e.map_or(true, |e| e.file_name() != LOCK_FILE)) {
        bail!("{} is not empty and is not a {what} (no {marker}/); refusing to write into it", out.display());
    }
    Ok(())
}

/// Held while a command writes into its directory; dropping it releases the directory.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir` (which must exist) for `what` (e.g. "vpmoe-rt train"), or fails naming the
    /// process that holds it.
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening the lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)?;
                writeln!(file, "{what} (pid {})", std::process::id())?;
                Ok(DirLock { _file: file })
            }
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.rewind().and_then(|_| file.read_to_string(&mut holder));
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process" } else { holder };
                bail!("{} is in use by {holder}; wait for it to finish or choose another directory", dir.display())
            }
            Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("vpmoe-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = DirLock::acquire(&dir, "vpmoe-rt train").unwrap();
        let e = DirLock::acquire(&dir, "vpmoe-rt train").unwrap_err().to_string();
        assert!(e.contains("is in use by vpmoe-rt train (pid"), "{e}");
        drop(first);
        DirLock::acquire(&dir, "vpmoe-rt train").unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }
}
