//! `mood bench --train --device cuda`: fine-tuning steps on one CUDA device, the step `mood
//! finetune --device cuda` takes (the forward on the device's tape, label-smoothed cross-entropy,
//! backward, the gradient norm and clipping, one multi-tensor AdamW over the f32 masters), on
//! random weights and images. Each timed step ends with a stream synchronisation, so a step's time
//! is all of its device work. FLOPs per image are three forwards' (forward, input gradients,
//! weight gradients), as the CPU's `--train` counts them; tools/bench_pytorch.py --device cuda
//! --train times timm's step under bf16 autocast beside it.

use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{CudaBlas, Gemm};

use super::bench::{Args, Precision};
use crate::backend::cuda::CudaDevice;
use crate::error::Result;
use crate::model::cuda_attention::Compute;
use crate::model::{init, VitConfig};
use crate::roofline;
use crate::tensor::Tensor;
use crate::train::device::{OnCuda, TrainDevice};
use crate::train::optim::AdamW;
use crate::train::step::{finetune_step_on, StepConfig};

/// Warm-up steps before timing: cuBLAS heuristics, the allocator pool, NVRTC's first loads.
const WARM_UP: usize = 2;

/// (seconds per step, the loss of the first warm-up step and of the last step) for `iters` timed
/// steps at precision T.
fn timed_steps<T: Compute>(
    dev: &Arc<CudaDevice>,
    cfg: &VitConfig,
    batch: usize,
    iters: usize,
) -> Result<(Vec<f64>, f32, f32)>
where
    CudaBlas: Gemm<T>,
{
    let store = init::random_store(cfg, 0);
    let mut params = store.float_tensors()?;
    let mut rng = init::Rng::new(1);
    let shape = [batch, cfg.in_chans, cfg.img_size, cfg.img_size];
    let n_in = shape.iter().product();
    let x = Tensor::from_vec(&shape, (0..n_in).map(|_| rng.normal() as f32).collect())?;
    let labels: Vec<usize> = (0..batch).map(|i| i % cfg.num_classes).collect();
    // The CPU bench's settings (bench.rs), so the two rows time the same step.
    let sc = StepConfig {
        label_smoothing: 0.1,
        clip_grad: 1.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(0.05, 0.75, cfg.depth);
    let mut on = OnCuda::<T>::new(Arc::clone(dev), &cfg.name, cfg.head_dim());
    on.start(&params, &opt)?;
    let mut step = |params: &mut _, opt: &mut _| {
        finetune_step_on(&mut on, cfg, params, opt, &x, &labels, 1e-5, &sc).map(|s| s.loss)
    };
    let first = step(&mut params, &mut opt)?;
    for _ in 1..WARM_UP {
        step(&mut params, &mut opt)?;
    }
    dev.sync()?;
    let pb = super::progress(iters as u64, "step");
    let mut times = Vec::with_capacity(iters);
    let mut last = first;
    for _ in 0..iters {
        let t = Instant::now();
        last = step(&mut params, &mut opt)?;
        dev.sync()?;
        times.push(t.elapsed().as_secs_f64());
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((times, first, last))
}

pub fn run(args: &Args, cfg: &VitConfig, dev: Arc<CudaDevice>) -> Result<()> {
    dev.load_all()?; // NVRTC compiles (or reads its cache) before any timing
    let (mut times, first, last) = match args.precision {
        Precision::F32 => timed_steps::<f32>(&dev, cfg, args.batch, args.iters)?,
        Precision::Bf16 => timed_steps::<half::bf16>(&dev, cfg, args.batch, args.iters)?,
    };
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let precision = roofline::precision_name(args.precision);
    let stand_in = crate::cuda_stand_in::is_stand_in_device(dev.name());
    // On the stand-in the kernels run on the CPU: its times say nothing about any GPU.
    let img_s = (!stand_in).then(|| args.batch as f64 / median);
    let gflop = 3.0 * cfg.flops_per_image() / 1e9;
    let tflops = img_s.map(|r| r * gflop / 1e3);
    let peak = args.peak_tflops.or_else(|| {
        (!stand_in)
            .then(|| roofline::match_gpu(dev.name()))
            .flatten()
            .map(|g| g.peak_tflops(args.precision))
    });
    let mfu = tflops.zip(peak).map(|(t, p)| t / p);
    if args.json {
        let v = serde_json::json!({
            "mode": "train",
            "device": dev.name(),
            "stand_in": stand_in,
            "arch": cfg.name,
            "batch": args.batch,
            "precision": precision,
            "img_per_s": img_s,
            "gflop_per_image": gflop,
            "tflop_per_s": tflops,
            "peak_tflop_per_s": peak,
            "mfu": mfu,
            "median_s": median,
            "loss_first": first,
            "loss_last": last,
        });
        println!("{v}");
        return Ok(());
    }
    let Some(img_s) = img_s else {
        println!(
            "{} training steps on {}, {precision}: {} steps of batch {} ran ({median:.2} s each, CPU time; loss {first:.4} -> {last:.4}). {}",
            cfg.name,
            dev.describe(),
            args.iters,
            args.batch,
            crate::cuda_stand_in::NO_GPU_FIGURES
        );
        return Ok(());
    };
    println!(
        "{} training steps on {}, {precision}: batch {}: {img_s:.1} images/s ({:.2} ms per step, median of {}; loss {first:.4} -> {last:.4})",
        cfg.name,
        dev.describe(),
        args.batch,
        1e3 * median,
        args.iters
    );
    let tflops = img_s * gflop / 1e3;
    match mfu.zip(peak) {
        Some((m, p)) => println!(
            "  {tflops:.1} TFLOP/s at {gflop:.2} GFLOP per image (3 forwards): MFU {:.1}% of {p} TFLOP/s",
            100.0 * m
        ),
        None => println!(
            "  {tflops:.1} TFLOP/s at {gflop:.2} GFLOP per image (3 forwards; pass --peak-tflops for MFU)"
        ),
    }
    Ok(())
}
