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

/// Writes `bytes` beside `dest` and commits them over it: readers see the old file or the new.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dest.with_file_name(name);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    commit(&tmp, dest)
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

/// Makes `to` a copy of the directory tree `from` whose files are hard links of the originals
/// (a copy where a link is impossible: another file system, a file system without links).
/// Names `skip` refuses are left out. Only sound when every writer of `to` replaces files by
/// rename rather than writing into them, as every index writer does ([`commit`]).
pub fn link_tree(from: &Path, to: &Path, skip: &dyn Fn(&str) -> bool) -> Result<()> {
    std::fs::create_dir(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let name = entry.file_name();
        if skip(&name.to_string_lossy()) {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let kind = entry.file_type().map_err(|e| Error::io(&src, e))?;
        if kind.is_dir() {
            link_tree(&src, &dst, skip)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&src).map_err(|e| Error::io(&src, e))?;
            #[cfg(unix)]
            std::os::unix::fs::symlink(&target, &dst).map_err(|e| Error::io(&dst, e))?;
            #[cfg(not(unix))]
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    Ok(())
}

/// Swaps two existing directories in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`):
/// after it, `a` holds what `b` held and the other way round, and no moment exists at which
/// either name is missing. `Ok(false)` when the platform or file system cannot (the caller
/// then falls back to two renames with a recovery rule).
pub fn exchange_dirs(a: &Path, b: &Path) -> Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let ca = CString::new(a.as_os_str().as_bytes())
            .map_err(|_| Error::Internal(format!("{}: NUL in path", a.display())))?;
        let cb = CString::new(b.as_os_str().as_bytes())
            .map_err(|_| Error::Internal(format!("{}: NUL in path", b.display())))?;
        // SAFETY: two valid NUL-terminated paths relative to the working directory; the call
        // reads them and touches nothing else of this process.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) | Some(libc::EPERM) => {
                Ok(false)
            }
            _ => Err(Error::io(b, e)),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
}
