//! `mood finetune` and `mood pretrain` with `--device cuda`, end to end through the binary, on a
//! real GPU where there is one and on the CPU stand-in otherwise (tests/common/cuda.rs):
//!   - fine-tuning the tiny BEiT on three of the digits for 10 epochs (the tiny model is at
//!     chance after 3: 33%, 72% after 10 on the CPU) reaches the CPU run's held-out accuracy
//!     within 1 point (f32), bf16 autocast learns too, and two CUDA runs write bit-identical
//!     checkpoints;
//!   - `--mos-groups` and `--alpa` on the device end at the CPU run's loss and accuracy, and
//!     repeat bit for bit;
//!   - masked image modelling on the device lowers the reconstruction loss as the CPU run does;
//!   - a bf16 checkpoint is not resumed at f32;
//!   - `mood bench --train --device cuda` times that same step (its first loss is the CPU's).

#![cfg(feature = "cuda")]

mod common;

use std::path::Path;

use common::run_mood_env;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn finetune(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let o = s(out);
    let mut args = vec![
        "finetune",
        "--arch",
        "test_tiny_beit",
        "--data",
        "digits:0-2",
        "--epochs",
        "10",
        "--batch",
        "16",
        "--lr",
        "1e-3",
        "--warmup-epochs",
        "1",
        "--layer-decay",
        "1",
        "--seed",
        "0",
        "-o",
        &o,
    ];
    args.extend_from_slice(extra);
    run_mood_env(&args, env)
}

/// The "held-out accuracy: X%" the command printed.
fn accuracy(stdout: &str) -> f32 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("held-out accuracy:"))
        .unwrap_or_else(|| panic!("no accuracy line in {stdout}"));
    line.split_whitespace()
        .nth(2)
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap()
}

#[test]
fn finetune_on_cuda_matches_the_cpu_and_repeats() {
    let (env, _) = common::cuda::cli_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let (code, stdout, err) = finetune(&out, extra, &env);
        assert_eq!(code, 0, "finetune {extra:?}: {err}");
        (out, accuracy(&stdout), err)
    };
    let (_, cpu, _) = run("cpu.safetensors", &["--device", "cpu"]);
    let (a, gpu, err) = run("a.safetensors", &["--device", "cuda"]);
    assert!(err.contains("cuda: "), "the device is named: {err}");
    let (b, _, _) = run("b.safetensors", &["--device", "cuda"]);
    let (bf16_ck, bf16, _) = run(
        "bf16.safetensors",
        &["--device", "cuda", "--precision", "bf16"],
    );
    println!("held-out accuracy: cpu {cpu:.2}%, cuda f32 {gpu:.2}%, cuda bf16 {bf16:.2}%");
    assert_ne!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&bf16_ck).unwrap(),
        "bf16 autocast trained the same weights as f32"
    );
    assert!(
        (cpu - gpu).abs() <= 1.0,
        "CUDA f32 {gpu}% vs CPU {cpu}%: more than 1 point apart"
    );
    assert!(
        bf16 > 55.0,
        "bf16 autocast did not learn (chance is 33%): {bf16}%"
    );
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "two CUDA runs with one seed wrote different checkpoints"
    );

    // A bf16 checkpoint continued at f32 is another recipe, and the reverse: refused in one line
    // naming both precisions.
    for (ck, extra, want) in [
        (
            &bf16_ck,
            &[][..],
            "--precision (the checkpoint: bf16, this run: f32)",
        ),
        (
            &a,
            &["--precision", "bf16"][..],
            "--precision (the checkpoint: f32, this run: bf16)",
        ),
    ] {
        let args: Vec<&str> = ["--device", "cuda", "--resume"]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        let (code, _, err) = finetune(ck, &args, &env);
        assert_ne!(code, 0);
        let last = err.trim().lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: cannot resume") && last.contains(want),
            "one line naming {want}: {err}"
        );
    }
}

/// `--mos-groups` (the group softmax on the device) and `--alpa` (ALPA's MLPs and cross-view
/// attention on the device) with `--device cuda`: 2 epochs on three digits end at the CPU run's
/// mean loss (within 1e-3 relative) and held-out accuracy (within 1 point), and two CUDA runs
/// write bit-identical checkpoints.
#[test]
fn mos_and_alpa_finetune_on_cuda_match_the_cpu_and_repeat() {
    let (env, _) = common::cuda::cli_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let tmp = tempfile::tempdir().unwrap();
    for (loss, extra) in [
        ("mos", &["--mos-groups", "2,1"][..]),
        ("alpa", &["--alpa", "0.5", "--alpa-dim", "16"][..]),
    ] {
        let run = |device: &str, name: &str| {
            let out = tmp.path().join(format!("{loss}-{name}.safetensors"));
            let o = s(&out);
            let mut args = vec![
                "finetune",
                "--arch",
                "test_tiny_beit",
                "--data",
                "digits:0-2",
                "--epochs",
                "2",
                "--batch",
                "16",
                "--lr",
                "1e-3",
                "--warmup-epochs",
                "1",
                "--layer-decay",
                "1",
                "--seed",
                "0",
                "--device",
                device,
                "-o",
                &o,
            ];
            args.extend_from_slice(extra);
            let (code, stdout, err) = run_mood_env(&args, &env);
            assert_eq!(code, 0, "finetune {args:?}: {err}");
            // "last epoch mean loss X; wrote ..."
            let mean: f32 = err
                .lines()
                .find_map(|l| l.strip_prefix("last epoch mean loss "))
                .and_then(|l| l.split(';').next())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no loss line: {err}"));
            (out, mean, accuracy(&stdout))
        };
        let (_, cl, ca) = run("cpu", "cpu");
        let (a, gl, ga) = run("cuda", "a");
        let (b, _, _) = run("cuda", "b");
        println!("{loss}: mean loss cpu {cl:.6} cuda {gl:.6}; accuracy cpu {ca:.2}% cuda {ga:.2}%");
        assert!(
            (gl - cl).abs() <= 1e-3 * cl.abs(),
            "{loss}: CUDA mean loss {gl} vs CPU {cl}"
        );
        assert!((ga - ca).abs() <= 1.0, "{loss}: CUDA {ga}% vs CPU {ca}%");
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{loss}: two CUDA runs with one seed wrote different checkpoints"
        );
    }
}

#[test]
fn pretrain_on_cuda_lowers_the_loss_as_the_cpu() {
    let (env, _) = common::cuda::cli_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let tmp = tempfile::tempdir().unwrap();
    let run = |device: &str| {
        let out = s(&tmp.path().join(format!("{device}.safetensors")));
        let (code, _, err) = run_mood_env(
            &[
                "pretrain",
                "--arch",
                "test_tiny_beit",
                "--data",
                "digits:0-4",
                "--epochs",
                "3",
                "--batch",
                "32",
                "--lr",
                "2e-3",
                "--device",
                device,
                "-o",
                &out,
            ],
            &env,
        );
        assert_eq!(code, 0, "pretrain --device {device}: {err}");
        // "reconstruction loss A (first epoch) -> B (last)"
        let line = err
            .lines()
            .find(|l| l.starts_with("reconstruction loss"))
            .unwrap_or_else(|| panic!("no loss line: {err}"))
            .to_string();
        let nums: Vec<f32> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (nums[0], nums[1])
    };
    let (c0, c1) = run("cpu");
    let (g0, g1) = run("cuda");
    println!("MIM loss: cpu {c0:.4} -> {c1:.4}, cuda {g0:.4} -> {g1:.4}");
    assert!(g1 < g0, "the CUDA run did not lower the loss");
    assert!(
        (g0 - c0).abs() <= 1e-3 * c0.abs() && (g1 - c1).abs() <= 1e-2 * c1.abs(),
        "CUDA and CPU losses differ: cpu {c0} -> {c1}, cuda {g0} -> {g1}"
    );
}

/// `mood demo --device cuda`: both models train and are extracted on the device (ODIN included),
/// and the run's tables come out; a short run, against the same short run on the CPU.
#[test]
fn demo_on_cuda_runs_end_to_end() {
    let (env, _) = common::cuda::cli_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let demo = |device: &str| {
        let (code, out, err) = run_mood_env(
            &[
                "demo",
                "--pretrain-epochs",
                "1",
                "--finetune-epochs",
                "1",
                "--device",
                device,
            ],
            &env,
        );
        assert_eq!(code, 0, "demo --device {device}: {err}");
        out
    };
    let cpu = demo("cpu");
    let gpu = demo("cuda");
    assert!(gpu.contains("cuda: "), "names the device: {gpu}");
    // The same training on both devices: the first reported AUROC line of each method table
    // agrees to the table's rounding, or nearly (f32 sums in another order).
    let maha = |out: &str| -> (f32, f32) {
        let line = out
            .lines()
            .find(|l| l.starts_with("MOOD's detector (mahalanobis)"))
            .unwrap_or_else(|| panic!("no summary line: {out}"))
            .to_string();
        // "... average AUROC: (a) 93.89 vs (b) 91.68. 11 s in all"
        let nums: Vec<f32> = line
            .split_whitespace()
            .filter_map(|w| w.trim_end_matches('.').parse().ok())
            .collect();
        (nums[0], nums[1])
    };
    let (c, g) = (maha(&cpu), maha(&gpu));
    println!(
        "demo mahalanobis AUROC: cpu (a) {} (b) {}, cuda (a) {} (b) {}",
        c.0, c.1, g.0, g.1
    );
    assert!(
        (c.0 - g.0).abs() <= 0.5 && (c.1 - g.1).abs() <= 0.5,
        "CPU {c:?} and CUDA {g:?} demos differ by more than half a point"
    );
}

/// `mood bench --train --device cuda` times the step `mood finetune --device cuda` takes: its first
/// step's loss is the CPU step's on the same random weights, images and labels (the bench's own
/// recipe: random_store seed 0, images from Rng seed 1, label i mod classes), and on the stand-in
/// it reports no GPU rate.
#[test]
fn bench_train_on_cuda_takes_the_cpu_step() {
    use mood::model::{backbone::vit_preset, init};
    use mood::tensor::Tensor;
    use mood::train::optim::AdamW;
    use mood::train::step::{finetune_step, StepConfig};

    let (env, stand_in) = common::cuda::cli_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_mood_env(
        &[
            "bench",
            "--train",
            "--device",
            "cuda",
            "--precision",
            "f32",
            "--arch",
            "test_tiny_beit",
            "--batch",
            "3",
            "--iters",
            "1",
            "--json",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(v["mode"], "train");
    assert_eq!(v["stand_in"], stand_in, "{v}");
    assert_eq!(v["img_per_s"].is_null(), stand_in, "{v}");

    let cfg = vit_preset("test_tiny_beit").unwrap();
    let mut params = init::random_store(&cfg, 0).float_tensors().unwrap();
    let mut rng = init::Rng::new(1);
    let shape = [3, cfg.in_chans, cfg.img_size, cfg.img_size];
    let n: usize = shape.iter().product();
    let x = Tensor::from_vec(&shape, (0..n).map(|_| rng.normal() as f32).collect()).unwrap();
    let labels: Vec<usize> = (0..3).map(|i| i % cfg.num_classes).collect();
    let sc = StepConfig {
        label_smoothing: 0.1,
        clip_grad: 1.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(0.05, 0.75, cfg.depth);
    let cpu = finetune_step(&cfg, &mut params, &mut opt, &x, &labels, 1e-5, &sc)
        .unwrap()
        .loss;
    let gpu = v["loss_first"].as_f64().unwrap() as f32;
    println!("first step's loss: cpu {cpu}, cuda f32 {gpu}");
    assert!(
        (cpu - gpu).abs() <= 1e-5 * cpu.abs(),
        "CUDA bench step's loss {gpu} vs the CPU step's {cpu}"
    );
}

/// A training batch too large for the device is refused before anything runs, in one line that
/// names the largest batch that fits; that batch then trains, and one more image is refused.
/// The stand-in reports a 132 MiB device (`MOOD_CUDA_SIM_MEMORY_MIB`), small enough that the
/// tiny BEiT's batch of 300 cannot fit after the 128 MiB of headroom; a real GPU cannot be
/// shrunk, so there only the first part (a batch that fits is not refused) is checked.
#[test]
fn a_training_batch_that_does_not_fit_names_one_that_does() {
    let (env, sim) = common::cuda::cli_env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if sim {
        env.push(("MOOD_CUDA_SIM_MEMORY_MIB", "132"));
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fit.safetensors");
    let train = |batch: usize| {
        let (b, o) = (batch.to_string(), s(&out));
        let args = [
            "finetune",
            "--arch",
            "test_tiny_beit",
            "--data",
            "digits:0-2",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--batch",
            &b,
            "--device",
            "cuda",
            "-o",
            &o,
        ];
        run_mood_env(&args, &env)
    };
    if !sim {
        let (code, _, err) = train(16);
        assert_eq!(code, 0, "batch 16 of the tiny model on a GPU: {err}");
        return;
    }
    let (code, _, err) = train(300);
    assert_ne!(code, 0, "batch 300 in 132 MiB was not refused: {err}");
    let fits = common::cuda::refused_batch_and_named_fit(&err, 300);
    assert!(!out.exists(), "a refused run wrote a checkpoint");
    let (code, _, err) = train(fits + 1);
    assert_ne!(
        code,
        0,
        "--batch {} (one more than named) was not refused",
        fits + 1
    );
    assert!(err.contains("out of GPU memory"), "{err}");
    let (code, stdout, err) = train(fits);
    assert_eq!(code, 0, "the named --batch {fits} did not train: {err}");
    println!("--batch {fits}: {}", stdout.lines().last().unwrap_or(""));
    assert!(out.exists());
}
