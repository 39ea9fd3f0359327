//! The roofline of the CUDA forward (src/roofline.rs): its FLOP count against the published one,
//! `mood bench --roofline` (deterministic, no GPU needed; an unknown --gpu is a one-line error),
//! and `mood bench --device cuda --profile`, a row per op of the forward, on a real GPU where there
//! is one and on the CPU stand-in otherwise.

mod common;

use mood::model::VitConfig;
use mood::roofline::{self, Precision};

fn flops_per_image(arch: &str) -> f64 {
    let cfg = VitConfig::preset(arch).unwrap();
    let ops = roofline::forward_ops(&cfg, 1, Precision::Bf16);
    ops.iter().map(|o| o.calls as f64 * o.flops).sum()
}

/// timm counts 17.58 GMACs per image for beit_base_patch16_224 and 61.6 for
/// beit_large_patch16_224 (`infer_gmacs` in huggingface/pytorch-image-models
/// results/benchmark-infer-amp-nchw-pt291-cu128-4090.csv, commit 90cae8c5ab83; the timm model
/// card of beit_base_patch16_224.in22k_ft_in22k_in1k lists "GMACs: 17.6"). fvcore-style counters
/// call a multiply-add one "FLOP", so the ~17.6 "GFLOPs" quoted for ViT-B/BEiT-B are MACs: the
/// roofline counts 2 FLOPs per MAC.
#[test]
fn beit_flops_match_the_published_count() {
    for (arch, gmacs) in [
        ("beit_base_patch16_224", 17.58),
        ("beit_large_patch16_224", 61.6),
    ] {
        let macs = flops_per_image(arch) / 2.0 / 1e9;
        println!("{arch}: {macs:.3} GMACs per image (timm: {gmacs})");
        assert!((macs / gmacs - 1.0).abs() < 0.005, "{arch}: {macs} GMACs");
    }
}

#[test]
fn the_prediction_is_deterministic() {
    let args = [
        "bench",
        "--roofline",
        "--arch",
        "beit_base_patch16_224",
        "--batch",
        "256",
        "--precision",
        "bf16",
        "--gpu",
        "h200",
    ];
    let (code, first, err) = common::run_mood(&args);
    assert_eq!(code, 0, "{err}");
    let (_, second, _) = common::run_mood(&args);
    assert_eq!(first, second);
    for op in [
        "qkv",
        "attention",
        "layernorm",
        "residual",
        "fc1+gelu",
        "fc2",
    ] {
        assert!(
            first.lines().any(|l| l.trim_start().starts_with(op)),
            "{op}: {first}"
        );
    }
    assert!(first.contains("nothing was run"), "{first}");
    // The figures follow from the model, the batch and the H200's datasheet alone.
    let cfg = VitConfig::preset("beit_base_patch16_224").unwrap();
    let ops = roofline::forward_ops(&cfg, 256, Precision::Bf16);
    let h200 = roofline::gpu("h200").unwrap();
    let p = roofline::predict(&ops, h200, 256);
    assert_eq!(p, roofline::predict(&ops, h200, 256));
    assert!(
        first.contains(&format!("predicted on H200: {:.0} images/s", p.img_per_s())),
        "{first}"
    );
    // The roofline can never beat the compute bound alone.
    assert!(p.img_per_s() < 256.0 / (p.flops / 989e12));
    let (code, json, err) = common::run_mood(&[&args[..], &["--json"]].concat());
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["predictions"][0]["gpu"], "H200");
    assert!((v["predictions"][0]["img_per_s"].as_f64().unwrap() - p.img_per_s()).abs() < 1e-6);
    assert_eq!(v["ops"].as_array().unwrap().len(), ops.len());
}

#[test]
fn every_known_gpu_without_gpu_and_an_unknown_one_is_refused() {
    let (code, out, err) = common::run_mood(&["bench", "--roofline", "--batch", "256"]);
    assert_eq!(code, 0, "{err}");
    for g in roofline::GPUS {
        assert!(out.contains(&format!("predicted on {}:", g.name)), "{out}");
    }
    let (code, out, err) = common::run_mood(&["bench", "--roofline", "--gpu", "tpu-v5"]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("unknown GPU `tpu-v5`") && err.contains("H100 SXM") && err.contains("H200"),
        "{err}"
    );
}

#[cfg(feature = "cuda")]
#[test]
fn profile_on_cuda_prints_a_row_per_op() {
    let (env, stand_in) = common::cuda::cli_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args = [
        "bench",
        "--device",
        "cuda",
        "--arch",
        "test_tiny_beit",
        "--batch",
        "2",
        "--iters",
        "1",
        "--profile",
        "--gpu",
        "h100-sxm",
    ];
    let (code, out, err) = common::run_mood_env(&args, &env);
    assert_eq!(code, 0, "{err}");
    let cfg = VitConfig::preset("test_tiny_beit").unwrap();
    let ops = roofline::forward_ops(&cfg, 2, Precision::Bf16);
    for op in &ops {
        let row = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(op.name))
            .unwrap_or_else(|| panic!("no row for {}: {out}", op.name));
        let calls: usize = row.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_eq!(calls, op.calls, "{row}");
    }
    assert!(out.contains("predicted on H100 SXM:"), "{out}");
    if stand_in {
        assert!(out.contains("a prediction, not a measurement"), "{out}");
        assert!(!out.contains(" images/s ("), "no measured rate: {out}");
    }
    let (code, json, err) = common::run_mood_env(&[&args[..], &["--json"]].concat(), &env);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(json.trim().lines().last().unwrap()).unwrap();
    assert_eq!(v["ops"].as_array().unwrap().len(), ops.len(), "{v}");
    assert_eq!(v["predicted"]["gpu"], "H100 SXM");
    if stand_in {
        assert!(v["img_per_s"].is_null() && v["ops"][0]["fraction_of_roofline"].is_null());
    } else {
        assert!(v["fraction_of_predicted"].as_f64().is_some());
    }
}
