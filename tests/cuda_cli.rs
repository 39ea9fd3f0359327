//! The commands with `--device cuda`, end to end through the binary: extract (f32 and bf16,
//! --layers), forward, score, eval, bench and info, on a real GPU where there is one and on the CPU stand-in
//! for CUDA otherwise (tests/common/cuda.rs), against the same commands on the CPU.

#![cfg(feature = "cuda")]

mod common;

use std::path::Path;

use common::{extract_tiny_env, run_mood_env};

fn env() -> (Vec<(String, String)>, bool) {
    common::cuda::cli_env()
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn npy(path: &Path) -> Vec<f32> {
    mood::npy::read_f32(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .1
}

/// max |a − b| / (|b| + rms(b)), as tests/cuda_parity.rs.
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    common::parity_errors(a, b).1
}

#[test]
fn extract_and_forward_on_cuda_match_the_cpu() {
    let (env, stand_in) = env();
    let env = pairs(&env);
    let tmp = tempfile::tempdir().unwrap();
    let store = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        // --local: the patch tokens come from the device's forward too.
        let mut args = vec!["--batch", "8", "--local"];
        args.extend_from_slice(extra);
        let (code, _, err) = extract_tiny_env("digits:0-4@test", &out, &args, &env);
        assert_eq!(code, 0, "extract {extra:?}: {err}");
        (out, err)
    };
    let (cpu, _) = store("cpu", &["--device", "cpu"]);
    let (cuda, err) = store("cuda", &["--device", "cuda"]);
    let (bf16, _) = store("bf16", &["--device", "cuda", "--precision", "bf16"]);
    if stand_in {
        assert!(
            err.contains("CPU stand-in, not a GPU"),
            "the device line says so: {err}"
        );
    }
    for file in ["features.npy", "logits.npy", "local.npy"] {
        let want = npy(&cpu.join(file));
        let f32_err = max_rel(&npy(&cuda.join(file)), &want);
        let bf16_err = max_rel(&npy(&bf16.join(file)), &want);
        println!("{file}: cuda f32 max rel {f32_err:.2e}, bf16 {bf16_err:.2e}");
        assert!(f32_err < 1e-4, "{file}: f32 {f32_err}");
        assert!(bf16_err < 5e-2, "{file}: bf16 {bf16_err}");
    }
    assert_eq!(
        std::fs::read(cpu.join("labels.npy")).unwrap(),
        std::fs::read(cuda.join("labels.npy")).unwrap()
    );
    // The manifests: the kind and precision (compared on resume and merge) and the GPU's name,
    // as the device line on stderr names it (recorded only).
    let id = |dir: &Path| {
        mood::store::read_manifest(dir)
            .unwrap()
            .unwrap()
            .identity
            .unwrap()
    };
    let (on_cpu, on_gpu, on_bf16) = (id(&cpu), id(&cuda), id(&bf16));
    assert_eq!(
        (on_cpu.device.as_str(), on_cpu.precision.as_str()),
        ("cpu", "f32")
    );
    assert_eq!(
        (on_gpu.device.as_str(), on_gpu.precision.as_str()),
        ("cuda", "f32")
    );
    assert_eq!(on_bf16.precision, "bf16");
    assert!(
        !on_gpu.device_name.is_empty() && err.contains(&on_gpu.device_name),
        "{on_gpu:?}: {err}"
    );

    // forward: a .npy of images through the model on both devices.
    let x: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let input = tmp.path().join("x.npy");
    mood::npy::write_f32(&input, &[2, 3, 32, 32], &x).unwrap();
    let weights = common::tiny_weights();
    let forward = |device: &str| {
        let f = tmp.path().join(format!("f_{device}.npy"));
        let (code, _, err) = run_mood_env(
            &[
                "forward",
                "--arch",
                "test_tiny_beit",
                "--weights",
                &weights,
                "--input",
                input.to_str().unwrap(),
                "--features",
                f.to_str().unwrap(),
                "--device",
                device,
            ],
            &env,
        );
        assert_eq!(code, 0, "forward --device {device}: {err}");
        npy(&f)
    };
    let e = max_rel(&forward("cuda"), &forward("cpu"));
    assert!(e < 1e-4, "forward: {e}");
}

#[test]
fn score_and_eval_on_cuda_match_the_cpu() {
    let (env, _) = env();
    let env = pairs(&env);
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    for (name, spec) in [
        ("train", "digits:0-4@train"),
        ("id", "digits:0-4@test"),
        ("ood", "digits:5-9@test"),
    ] {
        let (code, _, err) =
            extract_tiny_env(spec, &tmp.path().join(name), &["--batch", "32"], &[]);
        assert_eq!(code, 0, "{err}");
    }
    let train = p("train");
    let fit = |method: &str, extra: &[&str]| {
        let det = p(&format!("{method}.safetensors"));
        let mut args = vec!["fit", "--method", method, "--train", &train, "-o", &det];
        args.extend_from_slice(extra);
        let (code, _, err) = run_mood_env(&args, &[]);
        assert_eq!(code, 0, "{err}");
        det
    };
    // max |cpu − cuda| / (|cpu| + 1) over the rows.
    let apart = |cpu: &[f32], cuda: &[f32]| {
        cpu.iter()
            .zip(cuda)
            .map(|(a, b)| (a - b).abs() / (a.abs() + 1.0))
            .fold(0f32, f32::max)
    };
    let det = fit("mahalanobis", &[]);
    let score = |det: &str, device: &str| {
        let out = p(&format!("scores_{device}.npy"));
        let (code, _, err) = run_mood_env(
            &[
                "score",
                "--detector",
                det,
                "--features",
                &p("ood"),
                "-o",
                &out,
                "--device",
                device,
            ],
            &env,
        );
        assert_eq!(code, 0, "score --device {device}: {err}");
        npy(Path::new(&out))
    };
    // The tiny BEiT's features end in a LayerNorm, so their covariance has a near-null direction
    // that pinvh keeps (eigenvalue ~1e-14 of the largest): whitened, it carries a component near
    // 1e6 that every row and mean share. f32 rounding of that component moves the CPU and GPU
    // scores apart by up to ~0.3% (both differ from an f64 numpy reference by more), so the bound
    // here is 1e-2; kNN below, with no whitening, agrees to 1e-4.
    let (cpu, cuda) = (score(&det, "cpu"), score(&det, "cuda"));
    let e = apart(&cpu, &cuda);
    assert!(e < 1e-2, "mahalanobis score: cuda vs cpu {e}");
    assert!(
        cpu.iter().all(|&v| v < 0.0),
        "no OOD row at distance 0 from a class mean"
    );
    let det = fit("knn", &["--method-arg", "k=5"]);
    let (cpu, cuda) = (score(&det, "cpu"), score(&det, "cuda"));
    let e = apart(&cpu, &cuda);
    assert!(e < 1e-4, "knn score: cuda vs cpu {e}");

    let eval = |device: &str| {
        let (code, out, err) = run_mood_env(
            &[
                "eval",
                "--train",
                &p("train"),
                "--id",
                &p("id"),
                "--ood",
                &format!("near={}", p("ood")),
                "--methods",
                "knn,msp,energy",
                "--method-arg",
                "knn.k=5",
                "--device",
                device,
            ],
            &env,
        );
        assert_eq!(code, 0, "eval --device {device}: {err}");
        out
    };
    assert_eq!(eval("cuda"), eval("cpu"), "the same table on both devices");
}

#[test]
fn bench_and_info_say_when_cuda_is_the_cpu_stand_in() {
    let (env, stand_in) = env();
    if !stand_in {
        return; // a real GPU: its figures are real
    }
    let env = pairs(&env);
    let (code, out, err) = run_mood_env(&["info"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("CPU stand-in, not a GPU"), "{out}");
    let (code, out, err) = run_mood_env(
        &[
            "bench",
            "--device",
            "cuda",
            "--arch",
            "test_tiny_vit",
            "--batch",
            "2",
            "--iters",
            "1",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("not a GPU"), "{out}");
    for figure in ["images/s", "TFLOP/s", "MFU"] {
        assert!(
            !out.contains(&format!(": {figure}")) && !out.contains(&format!(" {figure} (")),
            "{out}"
        );
    }
    let (code, out, err) = run_mood_env(
        &[
            "bench",
            "--ood",
            "mahalanobis",
            "--rows",
            "200",
            "--dim",
            "16",
            "--classes",
            "4",
            "--train-rows",
            "400",
            "--device",
            "cuda",
            "--iters",
            "1",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("not a GPU") && !out.contains(" rows/s ("),
        "{out}"
    );
    assert!(
        out.contains("max |diff|"),
        "the agreement with the CPU is still shown: {out}"
    );
}

#[test]
fn mood_cuda_sim_1_runs_the_binary_on_the_stand_in() {
    let (env, stand_in) = env();
    if !stand_in {
        return;
    }
    // Only NVRTC's part of the environment, and the switch: the binary finds the stand-in itself.
    let mut env: Vec<(&str, &str)> = pairs(&env)
        .into_iter()
        .filter(|(k, _)| *k == "MOOD_CUDA_INCLUDE")
        .collect();
    let lib = common::cuda::stand_in_library();
    let lib = lib.to_string_lossy().into_owned();
    let nvrtc_path = common::cuda::stand_in_env_strings()
        .into_iter()
        .find(|(k, _)| k == "LD_LIBRARY_PATH")
        .map(|(_, v)| {
            v.split_once(':')
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    env.push(("LD_LIBRARY_PATH", &nvrtc_path));
    env.push(("MOOD_CUDA_SIM", "1"));
    env.push(("MOOD_CUDA_SIM_LIB", &lib));
    let (code, out, err) = run_mood_env(&["info"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("cuda device 0: CPU stand-in, not a GPU"),
        "{out}"
    );
    // A stand-in that is not there: one line saying how to build it.
    env.retain(|(k, _)| *k != "MOOD_CUDA_SIM_LIB");
    env.push(("MOOD_CUDA_SIM_LIB", "/nonexistent/libmood_cuda_sim.so"));
    let (code, _, err) = run_mood_env(&["info"], &env);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("MOOD_CUDA_SIM_LIB"), "{err}");
}

#[test]
fn extract_odin_on_cuda_matches_the_cpu() {
    let (env, _) = env();
    let env = pairs(&env);
    let tmp = tempfile::tempdir().unwrap();
    let store = |name: &str, device: &str| {
        let out = tmp.path().join(name);
        let args = ["--batch", "8", "--odin", "--device", device];
        let (code, _, err) = extract_tiny_env("digits:0-4@test", &out, &args, &env);
        assert_eq!(code, 0, "extract --odin --device {device}: {err}");
        npy(&out.join("odin.npy"))
    };
    let cpu = store("cpu", "cpu");
    let cuda = store("cuda", "cuda");
    // The scores are max softmax(z'/1000) of the perturbed input: ~1/C plus a small signal, so
    // compare their spread around the mean, where ODIN's information is.
    let mean = cpu.iter().sum::<f32>() / cpu.len() as f32;
    let spread: Vec<f32> = cpu.iter().map(|v| v - mean).collect();
    let got: Vec<f32> = cuda.iter().map(|v| v - mean).collect();
    let err = max_rel(&got, &spread);
    println!(
        "odin.npy: {} scores, cuda f32 vs cpu max rel (around the mean) {err:.2e}",
        cpu.len()
    );
    assert!(err <= 1e-3, "ODIN on CUDA differs from the CPU: {err}");
}

/// `--layers`: the per-block hook of the one forward runs on the CUDA executor too.
#[test]
fn extract_layers_on_cuda_matches_the_cpu() {
    let (env, _) = env();
    let env = pairs(&env);
    let tmp = tempfile::tempdir().unwrap();
    let store = |device: &str| {
        let out = tmp.path().join(device);
        let args = ["--batch", "8", "--layers", "1,2", "--device", device];
        let (code, _, err) = extract_tiny_env("digits:0-4@test", &out, &args, &env);
        assert_eq!(code, 0, "extract --layers 1,2 --device {device}: {err}");
        let (shape, v) = mood::npy::read_f32(&out.join("layers.npy")).unwrap();
        (shape, v, npy(&out.join("features.npy")))
    };
    let (cpu_shape, cpu, cpu_f) = store("cpu");
    let (cuda_shape, cuda, cuda_f) = store("cuda");
    assert_eq!(cpu_shape, cuda_shape);
    assert_eq!(cpu_shape[1], 2, "[n, blocks, D]");
    let err = max_rel(&cuda, &cpu);
    let f_err = max_rel(&cuda_f, &cpu_f);
    println!(
        "layers.npy {cpu_shape:?}: cuda f32 vs cpu max rel {err:.2e} (features.npy {f_err:.2e})"
    );
    assert!(err < 1e-4, "layers.npy on CUDA differs from the CPU: {err}");
    assert!(f_err < 1e-4, "features.npy with --layers: {f_err}");
}
