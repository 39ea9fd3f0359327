//! File writing that never leaves a half-written file under its final name.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary name used while `path` is being written: same directory, so rename is atomic.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to a temporary file, syncs it, then renames it to `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    with_atomic_file(path, |f| f.write_all(bytes))
}

/// Calls `fill` on a temporary file and renames it to `path` only if `fill` succeeded.
pub fn with_atomic_file(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(f);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// This machine's name, to tell a lock of a process here from one on another node of a shared
/// file system (where its pid means nothing).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Whether process `pid` of this machine is still running.
pub fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only asks whether the process exists; nothing is sent.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// One writer per output: a lock file holding "pid host", created exclusively, removed on drop.
/// A lock left by a process of this machine that is no longer running is taken over with a note.
pub struct Lock {
    path: PathBuf,
}

impl Lock {
    /// Takes the lock file `path` for writing `target` (named in the messages).
    pub fn acquire(path: &Path, target: &Path) -> Result<Lock> {
        let me = format!("{} {}", std::process::id(), hostname());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut f) => {
                    f.write_all(me.as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(|e| Error::io(path, e))?;
                    return Ok(Lock {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(path).unwrap_or_default();
                    let mut it = text.split_whitespace();
                    let pid: Option<u32> = it.next().and_then(|p| p.parse().ok());
                    let host = it.next().unwrap_or("").to_string();
                    match pid {
                        Some(pid) if host == hostname() && !pid_alive(pid) => {
                            eprintln!(
                                "note: {}: taking over the lock of process {pid}, which is no longer running",
                                target.display()
                            );
                            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
                        }
                        _ => {
                            return Err(Error::Usage(format!(
                                "{} is being written by another mood (process {} on {}; lock file {}): wait for it to finish, or delete the lock file if that process is gone",
                                target.display(),
                                pid.map_or("?".into(), |p| p.to_string()),
                                if host.is_empty() { "?" } else { &host },
                                path.display()
                            )))
                        }
                    }
                }
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        Err(Error::Usage(format!(
            "{}: could not take the lock {}",
            target.display(),
            path.display()
        )))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes the temporary files (`.NAME.PID.tmp`, from `temp_path`) in `dir` whose writer is no
/// longer running, optionally only those of `name`: a kill during a write leaves them behind.
/// Returns how many were removed.
pub fn remove_stale_temps(dir: &Path, name: Option<&str>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(inner) = file.strip_prefix('.').and_then(|f| f.strip_suffix(".tmp")) else {
            continue;
        };
        let Some((base, pid)) = inner.rsplit_once('.') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if name.is_some_and(|n| n != base) || pid_alive(pid) {
            continue;
        }
        if std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// `path` made absolute with its existing part resolved (symlinks, `..`), so that two spellings
/// of one place compare equal even when the end of `path` does not exist yet.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut head = abs.as_path();
    let mut tail = Vec::new();
    loop {
        if let Ok(c) = head.canonicalize() {
            let mut out = c;
            for t in tail.iter().rev() {
                out.push(t);
            }
            return out;
        }
        match (head.parent(), head.file_name()) {
            (Some(p), Some(f)) => {
                tail.push(f.to_os_string());
                head = p;
            }
            _ => return abs,
        }
    }
}

/// Refuses an output `out` (of option `flag`) that lies inside, or is, the input directory
/// `input` (named `what`): no command writes into what it reads.
pub fn refuse_inside(out: &Path, flag: &str, input: &Path, what: &str) -> Result<()> {
    let (o, i) = (resolve(out), resolve(input));
    if o.starts_with(&i) {
        return Err(Error::Usage(format!(
            "{flag} {} is inside {what} {}, which this command reads: write it elsewhere",
            out.display(),
            input.display()
        )));
    }
    Ok(())
}

/// The SHA-256 of a file's bytes, in lower-case hex (read in 1 MiB pieces).
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
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
