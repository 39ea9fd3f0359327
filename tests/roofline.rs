//! The roofline of the CUDA forward (src/roofline.rs): its FLOP count against the published one,
//! `mood bench --roofline` (deterministic, no GPU needed; an unknown --gpu is a one-line error),
//! the fused ops' byte counts against their kernels' reads and writes, and `mood bench --device
//! cuda --profile`: a row per op of the forward, and a row per op of a block timed alone as the
//! forward runs it, on a real GPU where there is one and on the CPU stand-in otherwise.

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

/// The fused ops' bytes, from their kernels' signatures: the residual stream is f32, the branch
/// outputs and the norms' outputs are at the precision (s bytes), the LayerNorm's γ, β and BEiT's
/// layer scale are f32 [D], a GEMM's bias f32 [N].
#[test]
fn fused_ops_count_the_bytes_their_kernels_move() {
    for arch in ["beit_base_patch16_224", "vit_base_patch16_224"] {
        for (p, s) in [(Precision::Bf16, 2.0), (Precision::F32, 4.0)] {
            let cfg = VitConfig::preset(arch).unwrap();
            let b = 4;
            let ops = roofline::forward_ops(&cfg, b, p);
            let op = |name: &str| ops.iter().find(|o| o.name == name).unwrap().clone();
            let (bn, d) = ((b * cfg.tokens()) as f64, cfg.embed_dim as f64);
            let ls = if cfg.layer_scale { 4.0 * d } else { 0.0 };
            let norm = 2.0 * 4.0 * d;
            // residual_layernorm_*: x (f32) and y (T) read, x (f32) and h (T) written a token.
            let r = op("residual+layernorm");
            assert_eq!(
                r.bytes,
                bn * (4.0 * d + s * d) + bn * (4.0 * d + s * d) + ls + norm
            );
            assert_eq!(r.calls, 2 * cfg.depth - 1, "{arch}");
            // layernorm_fwd_f32(_bf16): x (f32) read, y (T) written; the first block's norm1.
            let l = op("layernorm");
            assert_eq!(l.bytes, bn * 4.0 * d + bn * s * d + norm);
            assert_eq!(l.calls, 1);
            // residual_scale_*: the last block's second residual, x read and written, y read.
            let r = op("residual");
            assert_eq!(r.bytes, 2.0 * bn * 4.0 * d + bn * s * d + ls);
            assert_eq!(r.calls, 1);
            // cuBLASLt with the bias in the epilogue: x, w and y once at T, the f32 bias once.
            let hid = cfg.mlp_hidden as f64;
            for (name, k, n) in [
                ("qkv", d, 3.0 * d),
                ("proj", d, d),
                ("fc1+gelu", d, hid),
                ("fc2", hid, d),
            ] {
                let g = op(name);
                assert_eq!(g.bytes, s * (bn * k + n * k + bn * n) + 4.0 * n, "{name}");
                assert_eq!(g.flops, 2.0 * bn * k * n, "{name}");
            }
        }
    }
}

/// `--profile`'s table of each op alone times what the forward runs (the fused LayerNorms,
/// cuBLASLt's bias epilogue, bias + GELU in one pass), with each op's calls and bytes from the
/// roofline. On the stand-in the times are CPU times; the rows and what runs them are what count.
#[cfg(feature = "cuda")]
#[test]
fn profile_times_each_op_as_the_forward_runs_it() {
    let (env, stand_in) = common::cuda::cli_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for (precision, p) in [("bf16", Precision::Bf16), ("f32", Precision::F32)] {
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
            "--precision",
            precision,
            "--gpu",
            "h200",
        ];
        let (code, out, err) = common::run_mood_env(&args, &env);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("each op of a block alone"), "{out}");
        for kernel in [
            format!("residual_layernorm_{precision}"),
            match p {
                Precision::Bf16 => "layernorm_fwd_f32_bf16".to_string(),
                Precision::F32 => "layernorm_fwd_f32".to_string(),
            },
        ] {
            assert!(out.contains(&kernel), "{kernel}: {out}");
        }
        let (code, json, err) = common::run_mood_env(&[&args[..], &["--json"]].concat(), &env);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value =
            serde_json::from_str(json.trim().lines().last().unwrap()).unwrap();
        let rows = v["ops_alone"].as_array().expect("ops_alone rows");
        let cfg = VitConfig::preset("test_tiny_beit").unwrap();
        let ops = roofline::forward_ops(&cfg, 2, p);
        let block_ops = [
            "layernorm",
            "qkv",
            "attention",
            "proj",
            "residual+layernorm",
            "fc1+gelu",
            "fc2",
            "residual",
        ];
        for name in block_ops {
            let op = ops.iter().find(|o| o.name == name).unwrap();
            let mine: Vec<_> = rows.iter().filter(|r| r["op"] == name).collect();
            assert!(!mine.is_empty(), "no row for {name}: {v}");
            // One attention path is the forward's: the others are listed with 0 calls.
            let calls: u64 = mine.iter().map(|r| r["calls"].as_u64().unwrap()).sum();
            assert_eq!(calls as usize, op.calls, "{name}: {v}");
            for r in &mine {
                let mb = r["mb_per_call"].as_f64().unwrap();
                assert!(
                    (mb - op.bytes / 1e6).abs() <= 1e-9 * mb.max(1.0),
                    "{name}: {r}"
                );
                assert!(r["roofline_us"].as_f64().unwrap() > 0.0, "{name}: {r}");
                if stand_in {
                    assert!(r["fraction_of_roofline"].is_null(), "{r}");
                }
            }
        }
        let runs = |name: &str| rows.iter().find(|r| r["op"] == name).unwrap()["runs"].clone();
        for name in ["qkv", "proj", "fc2"] {
            let r = runs(name);
            assert!(r.as_str().unwrap().contains("cuBLASLt"), "{name}: {r}");
        }
        assert_eq!(
            runs("fc1+gelu"),
            format!("cuBLAS, then bias_gelu_{precision}")
        );
        assert_eq!(
            runs("residual+layernorm"),
            format!("residual_layernorm_{precision}")
        );
        assert_eq!(runs("residual"), format!("residual_scale_{precision}"));
        assert!(rows
            .iter()
            .all(|r| block_ops.contains(&r["op"].as_str().unwrap())));
    }
}
