//! Where the CUDA tests run: on the real driver when this machine has a usable GPU (and
//! `MOOD_CUDA_SIM` is not 1), else on the CPU stand-in (tools/cuda-sim), by re-running the same
//! test in a child process whose loader path selects the stand-in. The child runs mood's
//! production CUDA code unchanged; nothing is SKIPPED.
//!
//! NVRTC (which compiles kernels/*.cu in both cases) comes from the loader path, else from the
//! repository's `.cuda-wheels/` (tools/nvrtc-wheels.sh, which this runs if needed).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use mood::backend::cuda::CudaDevice;

const CHILD: &str = "MOOD_CUDA_TEST_CHILD";

/// The stand-in cargo built for this test binary (a dev-dependency's cdylib sits in deps/).
pub fn stand_in_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    mood::cuda_stand_in::find_library(&exe).unwrap_or_else(|e| panic!("{e}"))
}

/// NVRTC's lib and include directories when they are not on the loader path already.
fn nvrtc_dirs() -> Option<(PathBuf, PathBuf)> {
    static DIRS: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    DIRS.get_or_init(|| {
        if mood::backend::cuda::nvrtc::available() {
            return None;
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new("bash")
            .arg(root.join("tools/nvrtc-wheels.sh"))
            .output()
            .expect("run tools/nvrtc-wheels.sh");
        assert!(
            out.status.success(),
            "tools/nvrtc-wheels.sh failed (NVRTC is needed to compile the kernels): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nv = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some((nv.join("lib"), nv.join("include")))
    })
    .clone()
}

/// The environment of a process that runs CUDA on the stand-in: the alias directory, then NVRTC,
/// first on the loader path.
pub fn stand_in_env() -> Vec<(String, OsString)> {
    let mut env = mood::cuda_stand_in::loader_env(&stand_in_library()).expect("stand-in aliases");
    if let Some((lib, include)) = nvrtc_dirs() {
        let path = env
            .iter_mut()
            .find(|(k, _)| k == "LD_LIBRARY_PATH")
            .unwrap();
        let mut p = path.1.clone();
        // After the aliases, before the rest: the aliases dir is first in `p`.
        let s = p.to_string_lossy().into_owned();
        let (first, rest) = s.split_once(':').unwrap_or((&s, ""));
        p = OsString::from(format!(
            "{first}:{}{}{rest}",
            lib.display(),
            if rest.is_empty() { "" } else { ":" }
        ));
        path.1 = p;
        env.push(("MOOD_CUDA_INCLUDE".into(), include.into_os_string()));
    }
    env
}

/// `stand_in_env` as (&str, &str) pairs for common::run_mood_env.
pub fn stand_in_env_strings() -> Vec<(String, String)> {
    stand_in_env()
        .into_iter()
        .map(|(k, v)| (k, v.to_string_lossy().into_owned()))
        .collect()
}

/// `MOOD_CUDA_SIM=1`: always the stand-in; `MOOD_CUDA_SIM=0`: only a real GPU (tools/
/// gpu_session.sh), failing where there is none; unset: a real GPU if usable, else the stand-in.
fn real_gpu_wanted() -> bool {
    std::env::var("MOOD_CUDA_SIM").map_or(true, |v| v != "1")
}

fn stand_in_refused(why: impl std::fmt::Display) {
    if std::env::var("MOOD_CUDA_SIM").is_ok_and(|v| v == "0") {
        panic!("MOOD_CUDA_SIM=0 asks for a real GPU, but: {why}");
    }
}

/// The device for the test `name` (its path within the test binary): Some in the process that
/// runs the test body, None where the body ran in a child on the stand-in (which then passed).
pub fn device(name: &str) -> Option<CudaDevice> {
    if std::env::var_os(CHILD).is_some() {
        let dev = CudaDevice::new(0).unwrap_or_else(|e| panic!("CUDA on the CPU stand-in: {e}"));
        println!("device: {}", dev.describe());
        return Some(dev);
    }
    if real_gpu_wanted() {
        match CudaDevice::new(0) {
            Ok(dev) => {
                println!("device: {}", dev.describe());
                return Some(dev);
            }
            Err(e) => stand_in_refused(e),
        }
    }
    run_in_child(name);
    None
}

/// Re-runs test `name` of this binary in a child process on the stand-in; panics if it fails.
pub fn run_in_child(name: &str) {
    let exe = std::env::current_exe().expect("test executable");
    let status = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .envs(stand_in_env())
        .env(CHILD, "1")
        .status()
        .expect("run the test on the CPU stand-in");
    assert!(
        status.success(),
        "{name} failed on the CPU stand-in (output above)"
    );
}

/// For a test binary with its own main (harness = false): the device where this process runs the
/// cases; otherwise runs this binary again with the same arguments on the stand-in and exits with
/// its status.
pub fn device_for_main() -> Option<CudaDevice> {
    if std::env::var_os(CHILD).is_some() || real_gpu_wanted() {
        match CudaDevice::new(0) {
            Ok(dev) => {
                println!("device: {}", dev.describe());
                return Some(dev);
            }
            Err(e) if std::env::var_os(CHILD).is_some() => {
                panic!("CUDA on the CPU stand-in: {e}")
            }
            Err(e) => stand_in_refused(e),
        }
    }
    let exe = std::env::current_exe().expect("test executable");
    let status = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .envs(stand_in_env())
        .env(CHILD, "1")
        .status()
        .expect("run on the CPU stand-in");
    std::process::exit(status.code().unwrap_or(1));
}

/// The environment for running the `mood` binary with `--device cuda`: nothing extra where this
/// machine has a usable GPU, else the stand-in's. The bool says whether it is the stand-in.
pub fn cli_env() -> (Vec<(String, String)>, bool) {
    let real = if real_gpu_wanted() {
        mood::backend::cuda::probe()
            .map_err(stand_in_refused)
            .is_ok()
    } else {
        false
    };
    if real {
        (Vec::new(), false)
    } else {
        (stand_in_env_strings(), true)
    }
}

/// NVRTC's part of `stand_in_env` alone: its lib directory on the loader path and its headers;
/// empty when NVRTC loads already.
pub fn nvrtc_env() -> Vec<(String, OsString)> {
    let Some((lib, include)) = nvrtc_dirs() else {
        return Vec::new();
    };
    let mut path = lib.into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
        path.push(":");
        path.push(old);
    }
    vec![
        ("LD_LIBRARY_PATH".into(), path),
        ("MOOD_CUDA_INCLUDE".into(), include.into_os_string()),
    ]
}

/// Re-runs test `name` with NVRTC from `.cuda-wheels/` on the loader path (NVRTC reads
/// LD_LIBRARY_PATH only at process start); panics if it fails, or if this is that run already.
pub fn rerun_with_nvrtc(name: &str) {
    const AGAIN: &str = "MOOD_NVRTC_TEST_CHILD";
    assert!(
        std::env::var_os(AGAIN).is_none(),
        "libnvrtc cannot be loaded even with .cuda-wheels on LD_LIBRARY_PATH ({:?})",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    );
    let status = Command::new(std::env::current_exe().expect("test executable"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .envs(nvrtc_env())
        .env(AGAIN, "1")
        .status()
        .expect("run the test with NVRTC");
    assert!(status.success(), "{name} failed (output above)");
}

/// The one-line refusal of a batch too large for the device (the last line of `stderr`) for
/// `--batch asked`, and the batch it names as fitting (checked to lie in 1..asked).
pub fn refused_batch_and_named_fit(stderr: &str, asked: usize) -> usize {
    let last = stderr.trim().lines().last().unwrap_or("");
    println!("refused: {last}");
    assert!(
        last.contains(&format!("out of GPU memory: --batch {asked} needs about")),
        "one line naming the batch: {stderr}"
    );
    let fits: usize = last
        .split("use --batch ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no batch that fits named: {last}"));
    assert!((1..asked).contains(&fits), "{fits}");
    fits
}
