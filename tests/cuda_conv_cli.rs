//! ResNet and BiT through the command line on CUDA: `mood extract --arch <resnet|bit> --device
//! cuda [--precision bf16] --local` writes the store the CPU writes (features, logits, local
//! tokens) within the whole-model tolerances of tests/cuda_conv.rs (f32 1e-4 here: 1e-5 on the
//! model plus the store's path). At bf16 the tiny ResNet's features and logits within 5e-2 and
//! its local tokens within 1e-1 (element by element, before the averaging that pools them:
//! 5.6e-2 measured). BiT is checked at f32 only here: on these digits (flat images upscaled to
//! 48×48) each GroupNorm divides the bf16 operands' rounding by a small spread, and the tiny
//! BiT's bf16 store was measured 9.0e-2 (features), 1.0e-1 (logits) and 2.3e-1 (local tokens)
//! from the CPU's; tests/cuda_conv.rs bounds BiT at bf16 on timm's input and on random images.
//! `mood bench --arch ... --device cuda` times the device forward. On a real GPU where there is
//! one, else on the CPU stand-in for CUDA.

#![cfg(feature = "cuda")]

mod common;

use std::path::Path;

use common::{extract_arch, fixture, run_mood_env};

fn npy(path: &Path) -> Vec<f32> {
    mood::npy::read_f32(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .1
}

#[test]
fn extract_resnet_and_bit_on_cuda_match_the_cpu() {
    let (env, _stand_in) = common::cuda::cli_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let tmp = tempfile::tempdir().unwrap();
    for (arch, weights, bf16) in [
        (
            "test_tiny_resnet_basic_cifar",
            "resnet/tiny_resnet_basic_cifar.safetensors",
            true,
        ),
        ("test_tiny_bit", "bit/tiny_bit.safetensors", false),
    ] {
        let weights = fixture(weights).to_string_lossy().into_owned();
        let store = |name: &str, extra: &[&str]| {
            let out = tmp.path().join(format!("{arch}-{name}"));
            let mut args = vec!["--batch", "8", "--local"];
            args.extend_from_slice(extra);
            let (code, _, err) = extract_arch(arch, &weights, "digits:0-4@test", &out, &args, &env);
            assert_eq!(code, 0, "{arch} extract {extra:?}: {err}");
            out
        };
        let cpu = store("cpu", &["--device", "cpu"]);
        let cuda = store("cuda", &["--device", "cuda", "--precision", "f32"]);
        let low = bf16.then(|| store("bf16", &["--device", "cuda", "--precision", "bf16"]));
        for file in ["features.npy", "logits.npy", "local.npy"] {
            let want = npy(&cpu.join(file));
            let f32_err = common::parity_errors(&npy(&cuda.join(file)), &want).1;
            println!("{arch} {file}: cuda f32 max rel {f32_err:.2e}");
            assert!(f32_err < 1e-4, "{arch} {file}: f32 {f32_err}");
            if let Some(low) = &low {
                let err = common::parity_errors(&npy(&low.join(file)), &want).1;
                println!("{arch} {file}: cuda bf16 max rel {err:.2e}");
                let tol = if file == "local.npy" { 1e-1 } else { 5e-2 };
                assert!(err < tol, "{arch} {file}: bf16 {err}");
            }
        }
    }
}

#[test]
fn bench_times_a_resnet_on_cuda() {
    let (env, _) = common::cuda::cli_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for arch in ["test_tiny_resnet_bottleneck", "test_tiny_bit"] {
        let (code, out, err) = run_mood_env(
            &[
                "bench", "--arch", arch, "--device", "cuda", "--batch", "2", "--iters", "2",
                "--json",
            ],
            &env,
        );
        assert_eq!(code, 0, "{arch}: {err}");
        assert!(
            out.contains("\"device\":\"cuda: ") && out.contains("\"img_per_s\":"),
            "{arch}: {out}"
        );
    }
}

/// A conv net's batch too large for the device is refused before anything is uploaded, in one
/// line naming a batch that fits (from `model::cuda_conv_memory`'s count of what the forward
/// allocates); that batch then extracts, and one more image is refused. The stand-in reports a
/// 160 MiB device (`MOOD_CUDA_SIM_MEMORY_MIB`): 32 MiB after the 128 MiB of headroom. A real GPU
/// cannot be shrunk, so there only a batch that fits is checked.
#[test]
fn a_conv_batch_that_does_not_fit_names_one_that_does() {
    let (env, sim) = common::cuda::cli_env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if sim {
        env.push(("MOOD_CUDA_SIM_MEMORY_MIB", "160"));
    }
    let tmp = tempfile::tempdir().unwrap();
    let weights = fixture("resnet/tiny_resnet_basic_cifar.safetensors")
        .to_string_lossy()
        .into_owned();
    let extract = |batch: usize| {
        let out = tmp.path().join(format!("b{batch}"));
        let b = batch.to_string();
        let args = ["--batch", b.as_str(), "--device", "cuda", "--local"];
        let (code, _, err) = extract_arch(
            "test_tiny_resnet_basic_cifar",
            &weights,
            "digits@test",
            &out,
            &args,
            &env,
        );
        (code, err, out)
    };
    if !sim {
        let (code, err, _) = extract(16);
        assert_eq!(code, 0, "batch 16 of the tiny ResNet on a GPU: {err}");
        return;
    }
    let (code, err, _) = extract(200);
    assert_ne!(code, 0, "batch 200 in 32 MiB was not refused: {err}");
    let fits = common::cuda::refused_batch_and_named_fit(&err, 200);
    let (code, err, _) = extract(fits + 1);
    assert_ne!(code, 0, "--batch {} (one more than named) ran", fits + 1);
    assert!(err.contains("out of GPU memory"), "{err}");
    let (code, err, out) = extract(fits);
    assert_eq!(code, 0, "the named --batch {fits} did not extract: {err}");
    assert!(out.join("features.npy").exists());
    println!("--batch {fits} extracted");
}
