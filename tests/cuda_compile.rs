//! Compile-checks every kernels/*.cu with NVRTC, no GPU needed: a CUBIN for sm_90 (the full ptxas
//! pass, `--ptxas-options=-v`) and PTX for compute_90. Fails on any compile error and on any
//! kernel that spills registers; prints each kernel's registers.
//!
//! NVRTC can crash its process, so each kernel file is compiled in a child: this binary re-runs
//! itself with `MOOD_CUDA_COMPILE_CHILD=<stem>`, and a crash fails that file's check, not the suite.
//!
//! Without libnvrtc on the loader path, the tests re-run themselves with NVRTC from the pinned
//! wheels in `.cuda-wheels/` (tools/nvrtc-wheels.sh installs them on first use): nothing is
//! skipped.

#![cfg(feature = "cuda")]

use std::process::Command;

mod common;

use mood::backend::cuda::{kernel_sources, nvrtc};

const CHILD_ENV: &str = "MOOD_CUDA_COMPILE_CHILD";
const CUBIN_ARCH: &str = "sm_90";
const PTX_ARCH: &str = "compute_90";

/// The child's half: compile one file, report on stdout, fail through a panic.
#[test]
fn child_compile() {
    let Ok(stem) = std::env::var(CHILD_ENV) else {
        return; // only meaningful when launched by `every_kernel_compiles_without_spills`
    };
    let verbose = vec!["--ptxas-options=-v".to_string()];
    let cubin = nvrtc::compile_uncached(&stem, CUBIN_ARCH, &verbose)
        .unwrap_or_else(|e| panic!("{stem}.cu for {CUBIN_ARCH}: {e}"));
    assert!(!cubin.image.is_empty(), "{stem}.cu: empty CUBIN");
    let report = nvrtc::ptxas_report(&cubin.log);
    assert!(
        !report.is_empty(),
        "{stem}.cu: no kernel in the ptxas report:\n{}",
        cubin.log
    );
    let mut spilled = Vec::new();
    for k in &report {
        println!(
            "REPORT {stem}.cu {:<28} {:>3} registers, {} B stack, spill {} B stores / {} B loads",
            k.name, k.registers, k.stack_bytes, k.spill_stores, k.spill_loads
        );
        if k.spill_stores != 0 || k.spill_loads != 0 {
            spilled.push(k.name.clone());
        }
    }
    assert!(spilled.is_empty(), "{stem}.cu: spills in {spilled:?}");
    let ptx = nvrtc::compile_uncached(&stem, PTX_ARCH, &[])
        .unwrap_or_else(|e| panic!("{stem}.cu for {PTX_ARCH}: {e}"));
    let text = String::from_utf8_lossy(&ptx.image);
    assert!(
        text.contains(".target sm_90"),
        "{stem}.cu: PTX lacks `.target sm_90`"
    );
    // Both directions, so that a kernel the report parser missed cannot go unchecked.
    let entries: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .filter_map(|l| l.split('(').next())
        .collect();
    let mut reported: Vec<&str> = report.iter().map(|k| k.name.as_str()).collect();
    let mut in_ptx = entries.clone();
    reported.sort_unstable();
    in_ptx.sort_unstable();
    assert_eq!(reported, in_ptx, "{stem}.cu: ptxas report vs PTX entries");
    println!(
        "REPORT {stem}.cu PTX {} bytes, CUBIN {} bytes",
        ptx.image.len(),
        cubin.image.len()
    );
}

#[test]
fn every_kernel_compiles_without_spills() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    if !nvrtc::available() {
        // NVRTC from the repository's pinned wheels (installed on first use), in a new process.
        common::cuda::rerun_with_nvrtc("every_kernel_compiles_without_spills");
        return;
    }
    let (major, minor) = nvrtc::version().expect("nvrtc version");
    println!(
        "NVRTC {major}.{minor} from {:?}, headers from {:?}",
        nvrtc::library_path(),
        nvrtc::include_dir()
    );
    let exe = std::env::current_exe().expect("own path");
    let mut failures = Vec::new();
    for (stem, _) in kernel_sources() {
        let out = Command::new(&exe)
            .args([
                "child_compile",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, stem)
            .output()
            .expect("spawn the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        // The harness prints "test child_compile ... " without a newline before the body's
        // output, so the marker may sit mid-line.
        for line in stdout.lines().filter_map(|l| l.split_once("REPORT ")) {
            println!("{}", line.1);
        }
        if !out.status.success() {
            // A signal (no exit code) means NVRTC crashed rather than reported an error.
            let how = match out.status.code() {
                Some(c) => format!("failed (exit {c})"),
                None => format!("CRASHED ({:?})", out.status),
            };
            eprintln!(
                "{stem}.cu {how}:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            failures.push(format!("{stem}.cu {how}"));
        }
    }
    assert!(failures.is_empty(), "kernel compile checks: {failures:?}");
}

const CACHE_CHILD_ENV: &str = "MOOD_CUDA_CACHE_CHILD";

/// The child's half of the cache check; XDG_CACHE_HOME points at a fresh directory.
#[test]
fn child_cache() {
    if std::env::var_os(CACHE_CHILD_ENV).is_none() {
        return;
    }
    let dir = nvrtc::cache_dir().expect("XDG_CACHE_HOME is set by the parent");
    let first = nvrtc::compile("softmax", PTX_ARCH, &[]).expect("compile");
    assert!(!first.from_cache, "an empty cache cannot hit");
    let again = nvrtc::compile("softmax", PTX_ARCH, &[]).expect("compile");
    assert!(
        again.from_cache,
        "the second compile must come from the cache"
    );
    assert_eq!(first.image, again.image);
    let other =
        nvrtc::compile("softmax", PTX_ARCH, &["-DMOOD_CACHE_PROBE=1".into()]).expect("compile");
    assert!(!other.from_cache, "other options are another entry");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("cache dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 4, "two entries of .ptx + .log: {names:?}");
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    println!("REPORT cache entries: {}", names.join(" "));
}

#[test]
fn nvrtc_disk_cache_roundtrip() {
    if std::env::var_os(CHILD_ENV).is_some() || std::env::var_os(CACHE_CHILD_ENV).is_some() {
        return;
    }
    if !nvrtc::available() {
        common::cuda::rerun_with_nvrtc("nvrtc_disk_cache_roundtrip");
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = Command::new(std::env::current_exe().expect("own path"))
        .args(["child_cache", "--exact", "--nocapture", "--test-threads=1"])
        .env(CACHE_CHILD_ENV, "1")
        .env("XDG_CACHE_HOME", tmp.path())
        .env_remove("MOOD_NVRTC_CACHE")
        .output()
        .expect("spawn the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines().filter_map(|l| l.split_once("REPORT ")) {
        println!("{}", line.1);
    }
    assert!(
        out.status.success(),
        "cache check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
