//! File-system primitives every writer shares: the atomic commit (write aside, fsync, rename),
//! directory syncs, streaming digests, and the advisory lock that keeps two processes off one
//! output or index. This module must never know what the files contain.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// fsync then rename, so a crash leaves either the old or the new file.
pub fn commit(tmp: &Path, dest: &Path) -> Result<()> {
    if let Ok(f) = File::open(tmp) {
        let _ = f.sync_all();
    }
    std::fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))
}

/// fsync of a file's contents.
pub fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// fsync of a directory (makes renames in it durable); best effort.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Hex sha256 of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// An exclusive advisory lock held while an output (or an index) is being written. The OS drops
/// it when the process dies, so a killed run never leaves a stale lock behind.
#[derive(Debug)]
pub struct PathLock {
    _file: File,
    path: PathBuf,
}

impl PathLock {
    /// Locks `target` through the hidden sibling `.<name>.lock`; fails at once (no waiting) when
    /// another process holds it.
    pub fn acquire(target: &Path) -> Result<PathLock> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "output".into());
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let path = parent.join(format!(".{name}.lock"));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = std::io::Read::read_to_string(&mut f, &mut holder);
                let holder = holder.trim();
                return Err(Error::Locked {
                    path: target.to_path_buf(),
                    holder: if holder.is_empty() {
                        "unknown pid".into()
                    } else {
                        holder.to_string()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        // Who holds it, for the message another process prints; best effort.
        let _ = f.set_len(0);
        let _ = f.write_all(format!("pid {}", std::process::id()).as_bytes());
        let _ = f.flush();
        Ok(PathLock { _file: f, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
