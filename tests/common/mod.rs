//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

#[cfg(feature = "cuda")]
pub mod cuda;

/// Runs the `mood` binary with `args` on two threads: exit code, stdout, stderr.
pub fn run_mood(args: &[&str]) -> (i32, String, String) {
    run_mood_env(args, &[])
}

/// `run_mood` with extra environment variables.
pub fn run_mood_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mood"))
        .args(["--threads", "2"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run mood");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The tiny BEiT fixture (timm weights of `test_tiny_beit`), as a command-line argument.
pub fn tiny_weights() -> String {
    fixture("timm/tiny_beit.safetensors")
        .to_string_lossy()
        .into_owned()
}

/// `mood extract` of the tiny BEiT fixture over `data` into `out`, then `extra` arguments:
/// exit code, stdout, stderr.
pub fn extract_tiny(data: &str, out: &Path, extra: &[&str]) -> (i32, String, String) {
    extract_tiny_env(data, out, extra, &[])
}

/// `extract_tiny` with extra environment variables.
pub fn extract_tiny_env(
    data: &str,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    extract_arch("test_tiny_beit", &tiny_weights(), data, out, extra, env)
}

/// tests/fixtures/<rel>. The repository root is the build's, unless `MOOD_REPO_ROOT` names another:
/// test binaries built here and run on another machine (tools/gpu_session.sh) find their fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    std::env::var_os("MOOD_REPO_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("tests/fixtures")
        .join(rel)
}

/// Max |a - b|, failing with the first offending index when it exceeds `tol`.
pub fn assert_max_abs(ours: &[f32], reference: &[f32], tol: f32, what: &str) -> f32 {
    assert_eq!(ours.len(), reference.len(), "{what}: length differs");
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let d = (a - b).abs();
        assert!(
            d.is_finite(),
            "{what}: non-finite at {i}: ours {a}, reference {b}"
        );
        if d > worst.0 {
            worst = (d, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= tol,
        "{what}: max |diff| {} > {tol} at index {i} (ours {}, reference {})",
        worst.0,
        ours[i],
        reference[i]
    );
    worst.0
}

/// (max abs error, max rel error), rel_i = |got_i − want_i| / (|want_i| + rms(want)): the measure of
/// tests/cuda_parity.rs. NaN or inf where the other side differs counts as an infinite error.
pub fn parity_errors(got: &[f32], want: &[f32]) -> (f32, f32) {
    let rms = (want.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / want.len().max(1) as f64)
        .sqrt() as f32;
    let (mut abs, mut rel) = (0.0f32, 0.0f32);
    for (&g, &w) in got.iter().zip(want) {
        let e = if g == w || (g.is_nan() && w.is_nan()) {
            0.0
        } else if !g.is_finite() || !w.is_finite() {
            f32::INFINITY
        } else {
            (g - w).abs()
        };
        abs = abs.max(e);
        rel = rel.max(if e == 0.0 { 0.0 } else { e / (w.abs() + rms) });
    }
    (abs, rel)
}

/// Every file of `dir` (not sub-directories) with its bytes, sorted by name.
pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// `mood extract` with any architecture and weights.
pub fn extract_arch(
    arch: &str,
    weights: &str,
    data: &str,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let o = out.to_string_lossy().into_owned();
    let mut args = vec![
        "extract",
        "--arch",
        arch,
        "--weights",
        weights,
        "--data",
        data,
        "--out",
        &o,
    ];
    args.extend_from_slice(extra);
    run_mood_env(&args, env)
}

/// Rewrites the manifest.json of the store at `dir` through `edit`.
pub fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("manifest")).expect("json");
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Asserts a failure with exit code != 0, no panic, one line on stderr (notes aside), containing
/// every string of `want`.
pub fn assert_refused(r: &(i32, String, String), want: &[&str]) {
    let (code, _, err) = r;
    assert_ne!(*code, 0, "expected a refusal: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line: {err}");
    for w in want {
        assert!(err.contains(w), "`{w}` not in: {err}");
    }
}

/// A process id that no running process has: a child that has exited and been reaped.
pub fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// This machine's name as the lock files record it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What a run of the binary under [`run_mood_limited`] gave.
pub struct LimitedRun {
    /// Exit code; None when a signal ended it (an abort, or the kill at the deadline).
    pub code: Option<i32>,
    pub stderr: String,
    pub elapsed: std::time::Duration,
    pub timed_out: bool,
}

/// Runs the `mood` binary on two threads with its address space limited to `max_bytes`
/// (setrlimit in the child before exec, so an allocation past it fails inside mood) and killed
/// after `deadline`: a hostile file must be refused in bounded memory and time.
pub fn run_mood_limited(
    args: &[&str],
    max_bytes: u64,
    deadline: std::time::Duration,
) -> LimitedRun {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mood"));
    cmd.args(["--threads", "2"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's state.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: max_bytes as libc::rlim_t,
                rlim_max: max_bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = std::time::Instant::now();
    let mut child = cmd.spawn().expect("run mood");
    // stderr is read on a thread so a chatty child cannot block on a full pipe.
    let mut pipe = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut s).ok();
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for mood") {
            break st;
        }
        if start.elapsed() > deadline {
            timed_out = true;
            child.kill().ok();
            break child.wait().expect("wait for mood");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    LimitedRun {
        code: status.code(),
        stderr: reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        timed_out,
    }
}

/// How `synthetic_store` places its rows.
pub struct Synthetic {
    pub dim: usize,
    pub classes: usize,
    /// OOD rows: every coordinate around this value; ID rows (None): 4.0 on their class's axis.
    pub shift: Option<f32>,
    /// Every value multiplied by it (huge features for overflow checks).
    pub scale: f32,
    /// Labels to save (None: no labels.npy); `Some(vec![])` means i % classes.
    pub labels: Option<Vec<usize>>,
}

impl Default for Synthetic {
    fn default() -> Synthetic {
        Synthetic {
            dim: 6,
            classes: 3,
            shift: None,
            scale: 1.0,
            labels: Some(Vec::new()),
        }
    }
}

/// A feature store of `n` Gaussian rows written with the store writer, with an identity-like
/// head that reads the class axes: what the OOD command tests fit and score on.
pub fn synthetic_store(dir: &Path, n: usize, seed: u64, s: Synthetic) {
    let (d, c) = (s.dim, s.classes);
    let mut rng = mood::rng::Rng::new(seed);
    let y: Vec<usize> = match &s.labels {
        Some(given) if !given.is_empty() => given.clone(),
        _ => (0..n).map(|i| i % c).collect(),
    };
    let f: Vec<f32> = (0..n * d)
        .map(|k| {
            let centre = match s.shift {
                Some(v) => v,
                None if k % d == y[k / d] => 4.0,
                None => 0.0,
            };
            s.scale * (centre + rng.normal() as f32)
        })
        .collect();
    let head = mood::features::Head {
        weight: (0..c * d)
            .map(|k| if k % d == k / d { 1.0 } else { 0.0 })
            .collect(),
        bias: vec![0.0; c],
        fc_norm: None,
    };
    let features = mood::Tensor::from_vec(&[n, d], f).unwrap();
    mood::store::write(
        dir,
        mood::store::Contents {
            features: &features,
            logits: None,
            labels: s.labels.as_ref().map(|_| &y[..]),
            local: None,
            head: Some(&head),
            odin: None,
            manifest: mood::store::Manifest {
                model: "synthetic".into(),
                ..Default::default()
            },
        },
    )
    .unwrap();
}

/// `n` square crops of each bundled photograph, as PNGs under `root/<photo>/` (an image folder
/// with two classes).
pub fn photo_crops(root: &Path, n: usize) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    for name in ["china", "flower"] {
        let img = image::open(data.join(format!("{name}.jpg")))
            .unwrap()
            .to_rgb8();
        std::fs::create_dir_all(root.join(name)).unwrap();
        for i in 0..n {
            let s = 60 + (i * 37) % 140;
            let (x, y) = (
                (i * 53) % (img.width() as usize - s),
                (i * 29) % (img.height() as usize - s),
            );
            let crop =
                image::imageops::crop_imm(&img, x as u32, y as u32, s as u32, s as u32).to_image();
            crop.save(root.join(name).join(format!("{i:03}.png")))
                .unwrap();
        }
    }
}

/// A safetensors fixture under tests/fixtures, read whole; the tests add their own accessors.
pub struct SafetensorsFixture {
    pub bytes: Vec<u8>,
}

impl SafetensorsFixture {
    pub fn read(rel: &str) -> SafetensorsFixture {
        let path = fixture(rel);
        SafetensorsFixture {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    pub fn st(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.bytes).unwrap()
    }

    /// (shape, values) of the f32 tensor `name`.
    pub fn get(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (t.shape().to_vec(), v)
    }
}
