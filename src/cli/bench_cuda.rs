//! `mood bench --device cuda`: the CUDA forward's throughput (the model's forward on
//! src/model/cuda_exec.rs) with the batch resident on the device, its host-to-host rate, the same
//! two as one CUDA graph launch a batch (src/model/cuda_model.rs), and the
//! roofline prediction for the device (src/roofline.rs) beside it. With `--profile`: each op of
//! the forward timed by CUDA events (its time, FLOPs, bytes, achieved TFLOP/s or GB/s and fraction
//! of its roofline), then each op of a block alone at the model's shapes, run by the same fused
//! kernels and library calls as the forward (every attention path), so that a short GPU session
//! sees where a forward's time goes and how far each op is from its bound. The measurements are
//! pipeline::bench_cuda; this file runs them and prints.

use std::sync::Arc;

use super::bench::{Args, Precision};
use crate::backend::cuda::CudaDevice;
use crate::error::Result;
use crate::model::{init, VisionTransformer, VitConfig};
use crate::pipeline::bench_cuda::{forward_times, op_alone, op_times};
use crate::roofline;
use crate::tensor::Tensor;

/// Median forward time of the CUDA model, from host images to host features and logits (the
/// upload and download are part of what feature extraction pays).
pub fn run(args: &Args, cfg: &VitConfig) -> Result<()> {
    // An unknown --gpu fails before anything runs.
    let named = args.gpu.as_deref().map(roofline::gpu).transpose()?;
    let dev = Arc::new(CudaDevice::new(0)?);
    if args.train {
        return super::bench_train::run(args, cfg, dev);
    }
    // The roofline's device: --gpu, else the device's own name; the stand-in is no GPU, so its
    // prediction is for the H200 (what the project's GPU sessions get).
    let roof_gpu = named.or_else(|| {
        if crate::cuda_stand_in::is_stand_in_device(dev.name()) {
            roofline::match_gpu("h200")
        } else {
            roofline::match_gpu(dev.name())
        }
    });
    dev.load_all()?; // NVRTC compiles (or reads its cache) before any timing
    let store = init::random_store(cfg, 0);
    let model = VisionTransformer::load(cfg, &store)?;
    let mut rng = init::Rng::new(1);
    let shape = [args.batch, cfg.in_chans, cfg.img_size, cfg.img_size];
    let n_in = shape.iter().product();
    let x = Tensor::from_vec(&shape, (0..n_in).map(|_| rng.normal() as f32).collect())?;
    let t = match args.precision {
        Precision::F32 => forward_times::<f32>(&dev, &model, &x, args.iters)?,
        Precision::Bf16 => forward_times::<half::bf16>(&dev, &model, &x, args.iters)?,
    };
    let (mut times, mut host) = (t.resident, t.host);
    let (mut graphed, mut graphed_host) = (t.graphed, t.graphed_host);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let stand_in = crate::cuda_stand_in::is_stand_in_device(dev.name());
    let ops = roofline::forward_ops(cfg, args.batch, args.precision);
    let pred = roof_gpu.map(|g| roofline::predict(&ops, g, args.batch));
    let (measured, alone_rows) = if args.profile {
        // Each op alone: enough calls for a GPU's timer; the stand-in's CPU times need no more.
        let calls = if stand_in {
            args.iters
        } else {
            args.iters.max(10)
        };
        let (cfg, b) = (&model.cfg, args.batch);
        match args.precision {
            Precision::F32 => (
                Some(op_times::<f32>(&dev, &model, &x, args.iters)?),
                Some(op_alone::<f32>(&dev, cfg, b, calls, &ops)?),
            ),
            Precision::Bf16 => (
                Some(op_times::<half::bf16>(&dev, &model, &x, args.iters)?),
                Some(op_alone::<half::bf16>(&dev, cfg, b, calls, &ops)?),
            ),
        }
    } else {
        (None, None)
    };
    // On the stand-in the per-op times are CPU times: no rate is quoted against a GPU roofline.
    let profile = measured
        .as_ref()
        .map(|m| roofline::profile(&ops, m, roof_gpu, !stand_in));
    let alone = alone_rows
        .as_ref()
        .map(|a| roofline::profile_alone(&ops, a, roof_gpu, !stand_in));
    let pred_json = pred
        .as_ref()
        .map(|p| roofline::prediction_json(p, args.precision));
    let precision = roofline::precision_name(args.precision);
    if stand_in {
        // The stand-in runs the kernels on the CPU: its times say nothing about any GPU.
        let per_batch = med(&mut times);
        let per_batch_graphed = med(&mut graphed);
        if args.json {
            let mut v = serde_json::json!({
                "mode": "forward",
                "device": dev.name(),
                "stand_in": true,
                "arch": cfg.name,
                "batch": args.batch,
                "precision": precision,
                "img_per_s": null,
                "tflop_per_s": null,
                "mfu": null,
                "predicted": pred_json,
            });
            if let Some((_, rows)) = profile {
                v["ops"] = rows;
            }
            if let Some((_, rows)) = alone {
                v["ops_alone"] = rows;
            }
            println!("{v}");
        } else {
            println!(
                "{} forward on {}: {} batches of {} ran ({per_batch:.2} s each, {per_batch_graphed:.2} s as a CUDA graph, CPU time). {}",
                cfg.name,
                dev.describe(),
                args.iters,
                args.batch,
                crate::cuda_stand_in::NO_GPU_FIGURES
            );
            if let Some((lines, _)) = profile {
                println!(
                    "  per-op profile of the forward, {} passes (CPU times on the stand-in; roofline: predicted for {}):",
                    args.iters,
                    roof_gpu.map_or("no GPU", |g| g.name)
                );
                for l in lines {
                    println!("{l}");
                }
            }
            if let Some((lines, _)) = alone {
                println!(
                    "  each op of a block alone at the model's shapes, as the forward runs it ({} calls each, CPU times):",
                    args.iters
                );
                for l in lines {
                    println!("{l}");
                }
            }
            if let Some(p) = &pred {
                println!(
                    "  a prediction, not a measurement: {}",
                    roofline::describe(p, args.precision)
                );
            }
        }
        return Ok(());
    }
    // The headline: images already on the device, as PyTorch benchmarks measure; the host-to-host
    // figure (upload of the batch, download of features and logits) is printed beside it.
    let (median, median_host) = (med(&mut times), med(&mut host));
    let img_s_graphed = args.batch as f64 / med(&mut graphed);
    let img_s_graphed_host = args.batch as f64 / med(&mut graphed_host);
    let img_s = args.batch as f64 / median;
    let img_s_host = args.batch as f64 / median_host;
    let gflop = cfg.flops_per_image() / 1e9;
    let tflops = img_s * gflop / 1e3;
    let peak = args
        .peak_tflops
        .or(roof_gpu.map(|g| g.peak_tflops(args.precision)));
    let mfu = peak.map(|p| tflops / p);
    let of_roofline = pred.as_ref().map(|p| img_s / p.img_per_s());
    if args.json {
        let mut v = serde_json::json!({
            "mode": "forward",
            "device": dev.name(),
            "precision": precision,
            "arch": cfg.name,
            "batch": args.batch,
            "img_per_s": img_s,
            "gflop_per_image": gflop,
            "tflop_per_s": tflops,
            "peak_tflop_per_s": peak,
            "mfu": mfu,
            "median_s": median,
            "img_per_s_host_to_host": img_s_host,
            "img_per_s_graphed": img_s_graphed,
            "img_per_s_graphed_host_to_host": img_s_graphed_host,
            "predicted": pred_json,
            "fraction_of_predicted": of_roofline,
        });
        if let Some((_, rows)) = profile {
            v["ops"] = rows;
        }
        if let Some((_, rows)) = alone {
            v["ops_alone"] = rows;
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} forward on {}, {precision}: batch {}: {img_s:.1} images/s ({:.2} ms per batch, images on the device, median of {})",
        cfg.name,
        dev.describe(),
        args.batch,
        1e3 * median,
        args.iters
    );
    match (peak, mfu) {
        (Some(p), Some(m)) => println!(
            "  {tflops:.1} TFLOP/s at {gflop:.2} GFLOP per image: MFU {:.1}% of {p} TFLOP/s",
            100.0 * m
        ),
        _ => println!(
            "  {tflops:.1} TFLOP/s at {gflop:.2} GFLOP per image (pass --peak-tflops for MFU)"
        ),
    }
    println!(
        "  host to host (upload images, download features and logits): {img_s_host:.1} images/s"
    );
    println!(
        "  as one CUDA graph launch a batch: {img_s_graphed:.1} images/s ({:.2} ms per batch, images on the device), {img_s_graphed_host:.1} images/s host to host",
        1e3 * args.batch as f64 / img_s_graphed
    );
    match (&pred, of_roofline) {
        (Some(p), Some(f)) => println!(
            "  {}; measured: {img_s:.0} images/s, {:.1}% of it",
            roofline::describe(p, args.precision),
            100.0 * f
        ),
        _ => println!(
            "  no roofline: `{}` is not in the device table (known: {}); --gpu NAME predicts for one",
            dev.name(),
            roofline::known_gpus()
        ),
    }
    if let Some((lines, _)) = profile {
        println!(
            "  per-op profile of the forward (CUDA events around each op, {} passes; roofline = max(FLOPs / peak, bytes / bandwidth){}):",
            args.iters,
            roof_gpu.map_or(String::new(), |g| format!(" on {}", g.name))
        );
        for l in lines {
            println!("{l}");
        }
    }
    if let (Some((lines, _)), Some(rows)) = (alone, &alone_rows) {
        let sum: f64 = rows.iter().map(|r| r.calls as f64 * r.seconds).sum();
        println!(
            "  each op of a block alone at the model's shapes, as the forward runs it ({} calls each):",
            args.iters.max(10)
        );
        for l in lines {
            println!("{l}");
        }
        println!(
            "    sum of the ops: {:.3} ms per forward; measured forward: {:.3} ms",
            1e3 * sum,
            1e3 * median
        );
    }
    Ok(())
}
