//! Putting a process on the CPU stand-in for CUDA (tools/cuda-sim, built by
//! `cargo build --release -p mood-cuda-sim` and by `cargo test`).
//!
//! cudarc dlopens libcuda, libcublas and libcublasLt by bare name, and the dynamic loader reads
//! LD_LIBRARY_PATH once, at process start. So the stand-in is selected by a directory of aliases
//! (libcuda.so.1 -> libmood_cuda_sim.so, ...) put first on LD_LIBRARY_PATH of a new process: the
//! code under test is then mood's production CUDA path, unchanged. `MOOD_CUDA_SIM=1` makes the
//! `mood` binary re-execute itself that way (`reexec_if_requested`); tests/common/cuda.rs does
//! the same for test binaries.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The stand-in library's file name.
pub const LIBRARY: &str = "libmood_cuda_sim.so";

/// The names cudarc tries for the three libraries, first to last.
const ALIASES: [&str; 6] = [
    "libcuda.so",
    "libcuda.so.1",
    "libcublas.so",
    "libcublas.so.13",
    "libcublasLt.so",
    "libcublasLt.so.13",
];

/// Set in the re-executed process, so it does not re-execute again.
const ACTIVE: &str = "MOOD_CUDA_SIM_ACTIVE";

/// The stand-in next to `exe`: `MOOD_CUDA_SIM_LIB` if set, else the newer of the one in the
/// executable's directory and the one in its `deps/` (where cargo puts a dev-dependency's cdylib).
pub fn find_library(exe: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MOOD_CUDA_SIM_LIB").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Cuda(format!(
                "MOOD_CUDA_SIM_LIB={} is not a file",
                p.display()
            )))
        };
    }
    let dir = exe.parent().unwrap_or(Path::new("."));
    // Both places can hold a build (`cargo build -p mood-cuda-sim` writes the first, `cargo test`
    // the second): the newer one, so that a stale copy cannot lack entry points the code needs.
    let modified = |p: &PathBuf| p.metadata().and_then(|m| m.modified()).ok();
    [dir.join(LIBRARY), dir.join("deps").join(LIBRARY)]
        .into_iter()
        .filter(|p| p.is_file())
        .max_by_key(modified)
        .ok_or_else(|| {
            Error::Cuda(format!(
                "the CPU stand-in ({LIBRARY}) is not next to {}: build it with \
                 `cargo build --release -p mood-cuda-sim`, or set MOOD_CUDA_SIM_LIB",
                exe.display()
            ))
        })
}

/// A directory beside `library` holding its aliases under the CUDA libraries' names, made (once,
/// atomically: a temporary directory renamed into place) if missing.
pub fn alias_dir(library: &Path) -> Result<PathBuf> {
    let library = library.canonicalize().map_err(|e| Error::io(library, e))?;
    let parent = library.parent().unwrap_or(Path::new("/"));
    let dir = parent.join("cuda-sim-aliases");
    let complete = |d: &Path| {
        ALIASES
            .iter()
            .all(|a| std::fs::read_link(d.join(a)).is_ok_and(|t| t == library))
    };
    // Threads of one process take turns; processes may still race, so a lost race (another
    // process replacing the directory between our rename and our check) is retried.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = MAKING.lock().unwrap_or_else(|p| p.into_inner());
    for _attempt in 0..5 {
        if complete(&dir) {
            return Ok(dir);
        }
        let tmp = parent.join(format!(".cuda-sim-aliases.{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        for a in ALIASES {
            std::os::unix::fs::symlink(&library, tmp.join(a))
                .map_err(|e| Error::io(tmp.join(a), e))?;
        }
        if !complete(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process made it first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    if complete(&dir) {
        Ok(dir)
    } else {
        Err(Error::Cuda(format!(
            "could not make the stand-in's alias directory {}",
            dir.display()
        )))
    }
}

/// The environment that selects the stand-in at `library` in a new process: its alias
/// directory first on LD_LIBRARY_PATH (NVRTC's directory, already there, stays after it).
pub fn loader_env(library: &Path) -> Result<Vec<(String, OsString)>> {
    let dir = alias_dir(library)?;
    let mut path = OsString::from(dir);
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
        path.push(":");
        path.push(old);
    }
    Ok(vec![
        ("LD_LIBRARY_PATH".into(), path),
        (ACTIVE.into(), "1".into()),
    ])
}

/// With `MOOD_CUDA_SIM=1`, re-executes this process on the stand-in (once): returns only if the
/// variable is unset or this process already runs on it, or with the error that prevented it.
pub fn reexec_if_requested() -> Result<()> {
    if std::env::var("MOOD_CUDA_SIM").map_or(true, |v| v != "1")
        || std::env::var_os(ACTIVE).is_some()
    {
        return Ok(());
    }
    let exe =
        std::env::current_exe().map_err(|e| Error::Cuda(format!("current executable: {e}")))?;
    let env = loader_env(&find_library(&exe)?)?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .envs(env)
        .exec();
    Err(Error::Cuda(format!(
        "re-executing {} on the CPU stand-in: {err}",
        exe.display()
    )))
}

/// Whether this process runs on the stand-in: its device names itself so, and mood's labels
/// (`mood info`, bench, store manifests) say that it is not a GPU.
pub fn is_stand_in_device(name: &str) -> bool {
    name.starts_with("CPU stand-in")
}

/// Whether the stand-in library is loaded in this process (read from /proc/self/maps, where the
/// aliases resolve to its real file name).
pub fn loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|m| m.contains(LIBRARY))
}

/// The line commands print instead of throughput figures on the stand-in.
pub const NO_GPU_FIGURES: &str =
    "CUDA ran on the CPU stand-in, not a GPU: no images/s, rows/s, TFLOP/s or MFU are reported";
