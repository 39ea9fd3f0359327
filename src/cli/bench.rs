//! `mood bench`: forward throughput on random weights and inputs, beside the sgemm rate the `gemm`
//! crate reaches on the model's largest GEMM shape in the same process, so the two compare directly.
//! `--roofline` prints the analytic roofline prediction of the CUDA forward (src/roofline.rs)
//! without running anything.
//! `--device cuda` times the CUDA forward instead (the model's forward on src/model/cuda_exec.rs); `--device auto` takes
//! CUDA when a device is usable and says why not when it falls back to the CPU. `--data` times
//! image decoding instead (bench_data.rs), `--ood` OOD scoring (bench_ood.rs).

use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::backbone::Backbone;
use crate::model::{init, VisionTransformer, VitConfig};
use crate::profile;
use crate::tensor::Tensor;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model preset (timm name).
    #[arg(long, default_value = "beit_base_patch16_224")]
    pub arch: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed forward passes (after one warm-up pass).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Print a per-op time profile: of the timed passes (CPU); CUDA: each op of the forward timed
    /// by CUDA events beside its roofline (FLOPs, bytes, achieved rate, fraction of the bound),
    /// then each op run alone at the model's shapes.
    #[arg(long)]
    pub profile: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Time full fine-tuning steps (forward on the tape, cross-entropy, backward, AdamW) instead
    /// of inference forwards, on the CPU or (--device cuda, --precision) on the GPU.
    #[arg(long)]
    pub train: bool,
    /// Where to run: cpu, cuda, or auto (cuda if a device is usable, else cpu with a note).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// CUDA only: element type of the GEMM operands and activations (accumulation is f32).
    #[arg(long, value_enum, default_value_t = Precision::Bf16)]
    pub precision: Precision,
    /// CUDA only: the peak TFLOP/s that MFU is quoted against; default: the dense tensor-core
    /// peak of an H100/H200 SXM for the precision (989 bf16, 67 f32 without TF32), when the
    /// device is one.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Print the roofline prediction of the CUDA forward of --arch at --batch and --precision
    /// (per op: FLOPs, bytes moved, bound and time at the device's peaks; the predicted images/s)
    /// for --gpu (default: every known device), without running anything.
    #[arg(long)]
    pub roofline: bool,
    /// The device model the roofline is computed for (h100-sxm, h100-pcie, h200, a100, l40s,
    /// rtx4090, ...); default: the CUDA device's own name (the CPU stand-in: h200).
    #[arg(long, value_name = "NAME")]
    pub gpu: Option<String>,
    /// Time decoding + preprocessing of this image folder instead of a model (no model is run).
    #[arg(long, value_name = "DIR")]
    pub data: Option<std::path::PathBuf>,
    /// With --data: the preprocessing preset (mood, moodv2, imagenet, cifar).
    #[arg(long, default_value = "mood")]
    pub preset: String,
    /// With --data: the model input side the preset produces.
    #[arg(long, default_value_t = 224)]
    pub img_size: usize,
    /// Time OOD scoring instead of a model: fit METHOD (any of features, labels, logits or a head;
    /// the head is the class means scaled by 1/sqrt(dim)) on synthetic Gaussian features, then
    /// score --rows rows of --dim features (src/cli/bench_ood.rs).
    #[arg(long, value_name = "METHOD")]
    pub ood: Option<String>,
    /// With --ood: rows scored per timed pass.
    #[arg(long, default_value_t = 50_000)]
    pub rows: usize,
    /// With --ood: feature width.
    #[arg(long, default_value_t = 1024)]
    pub dim: usize,
    /// With --ood: classes of the synthetic train set (the Mahalanobis means).
    #[arg(long, default_value_t = 1000)]
    pub classes: usize,
    /// With --ood: rows the detector is fitted on (the kNN bank) [default: 10000].
    #[arg(long)]
    pub train_rows: Option<usize>,
    /// With --ood: a setting of the method, key=value (repeatable), e.g. k=50 for knn.
    #[arg(long = "method-arg", value_name = "KEY=VALUE")]
    pub method_args: Vec<String>,
}

pub use crate::backend::{Device, Precision};

pub fn run(args: Args) -> Result<()> {
    if args.batch == 0 || args.iters == 0 {
        return Err(Error::Usage(
            "--batch and --iters must be at least 1".into(),
        ));
    }
    if args.roofline {
        return roofline_report(&args);
    }
    if let Some(dir) = &args.data {
        return super::bench_data::run(dir, &args.preset, args.img_size, args.iters, args.json);
    }
    if let Some(method) = &args.ood {
        return super::bench_ood::run(&args, method);
    }
    if let Some(cfg) = crate::model::resnet::ResNetConfig::preset(&args.arch) {
        return resnet_bench(&args, &cfg);
    }
    if let Some(cfg) = crate::model::bit::BitConfig::preset(&args.arch) {
        return bit_bench(&args, &cfg);
    }
    let cfg = crate::model::backbone::vit_preset(&args.arch)?;
    if crate::pipeline::device::on_cuda(args.device, "benchmarking", cuda_usable)?.is_some() {
        return cuda_bench(&args, &cfg);
    }
    let store = init::random_store(&cfg, 0);
    let model = VisionTransformer::load(&cfg, &store)?;
    let mut rng = init::Rng::new(1);
    let n_in = args.batch * cfg.in_chans * cfg.img_size * cfg.img_size;
    let x = Tensor::from_vec(
        &[args.batch, cfg.in_chans, cfg.img_size, cfg.img_size],
        (0..n_in).map(|_| rng.normal() as f32).collect(),
    )?;

    let mut params = store.float_tensors()?;
    let mut opt = crate::train::optim::AdamW::new(0.05, 0.75, cfg.depth);
    let labels: Vec<usize> = (0..args.batch).map(|i| i % cfg.num_classes).collect();
    let sc = crate::train::step::StepConfig {
        label_smoothing: 0.1,
        clip_grad: 1.0,
        ..Default::default()
    };
    let mut run_once = |params: &mut std::collections::BTreeMap<String, Tensor>| -> Result<()> {
        if args.train {
            crate::train::step::finetune_step(&cfg, params, &mut opt, &x, &labels, 1e-5, &sc)?;
        } else {
            model.forward(&x)?;
        }
        Ok(())
    };
    run_once(&mut params)?; // warm-up: page in weights, size the pools
    profile::enable(args.profile);
    profile::reset();
    let pb = crate::progress::Progress::new(args.iters as u64, "iter", "bench");
    let mut times = Vec::new();
    for _ in 0..args.iters {
        let t = Instant::now();
        run_once(&mut params)?;
        times.push(t.elapsed().as_secs_f64());
        pb.inc(1);
    }
    pb.finish_and_clear();
    profile::enable(false);
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let img_s = args.batch as f64 / median;
    // A training step costs about three forwards (forward, input and weight gradients).
    let gflop = cfg.flops_per_image() / 1e9 * if args.train { 3.0 } else { 1.0 };

    // The largest GEMM of the model: fc1, [B·N, D] x [D, F].
    let (m, k, n) = (args.batch * cfg.tokens(), cfg.embed_dim, cfg.mlp_hidden);
    let sgemm = sgemm_rate(m, k, n, args.iters.max(3));
    let mode = if args.train { "train" } else { "forward" };
    report_rate(
        &args,
        &cfg.name,
        mode,
        (img_s, median, gflop),
        ((m, k, n), sgemm),
    );
    if args.profile {
        let rows = profile::snapshot();
        let total: f64 = rows.iter().map(|r| r.1.as_secs_f64()).sum();
        println!(
            "  per-op profile over {} passes (wall time, % of profiled):",
            args.iters
        );
        for (op, d, calls) in rows {
            println!(
                "    {op:<12} {:>8.1} ms/pass {:>5.1}%  ({} calls/pass)",
                1e3 * d.as_secs_f64() / args.iters as f64,
                100.0 * d.as_secs_f64() / total,
                calls / args.iters as u64
            );
        }
    }
    Ok(())
}

/// `mood bench --roofline`: the analytic roofline of the CUDA forward (src/roofline.rs), for
/// --gpu or every known device; nothing is run, so no GPU is needed.
fn roofline_report(args: &Args) -> Result<()> {
    use crate::roofline;
    if crate::model::resnet::ResNetConfig::preset(&args.arch).is_some() {
        return Err(Error::Usage(format!(
            "--roofline: {} is a ResNet; the roofline covers the ViT/BEiT forward",
            args.arch
        )));
    }
    let cfg = crate::model::backbone::vit_preset(&args.arch)?;
    let ops = roofline::forward_ops(&cfg, args.batch, args.precision);
    let gpus: Vec<&'static roofline::Gpu> = match &args.gpu {
        Some(name) => vec![roofline::gpu(name)?],
        None => roofline::GPUS.iter().collect(),
    };
    let preds: Vec<_> = gpus
        .iter()
        .map(|g| roofline::predict(&ops, g, args.batch))
        .collect();
    if args.json {
        let mut v = serde_json::json!({
            "mode": "roofline",
            "arch": cfg.name,
            "batch": args.batch,
            "precision": roofline::precision_name(args.precision),
            "predictions": preds.iter().map(|p| roofline::prediction_json(p, args.precision)).collect::<Vec<_>>(),
        });
        if args.gpu.is_some() {
            v["ops"] = roofline::ops_json(&ops, gpus[0]);
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} forward, {}, batch {}: roofline prediction (analytic; nothing was run)",
        cfg.name,
        roofline::precision_name(args.precision),
        args.batch
    );
    if args.gpu.is_some() {
        println!("  {}", roofline::describe_gpu(gpus[0]));
        for line in roofline::table(&ops, gpus[0]) {
            println!("{line}");
        }
    }
    for p in &preds {
        println!("  {}", roofline::describe(p, args.precision));
    }
    Ok(())
}

/// `mood bench --arch resnet*`: the CPU forward of a ResNet with random weights, in the same JSON
/// as the ViT rows (tools/bench_pytorch.py reads it); the sgemm reference is the largest
/// convolution GEMM, layer1's 3×3 as im2col rows.
fn resnet_bench(args: &Args, cfg: &crate::model::resnet::ResNetConfig) -> Result<()> {
    use crate::model::resnet::{flops_per_image, random_store, ResNet};
    if args.train {
        return Err(Error::Usage(
            "--train: ResNets are inference only in this version".into(),
        ));
    }
    let backbone = Backbone::ResNet(Box::new(ResNet::load(cfg, &random_store(cfg, 0))?));
    let Backbone::ResNet(model) = &backbone else {
        unreachable!("built as a ResNet")
    };
    let shape = [args.batch, cfg.in_chans, cfg.img_size, cfg.img_size];
    let (mut run, on) = crate::pipeline::device::runner_described(
        &backbone,
        args.device,
        args.precision,
        args.batch,
    )?;
    let median = median_forward_seconds(args, &shape, |x| run.forward(x).map(|_| ()))?;
    if on != "cpu" {
        let rate = (
            args.batch as f64 / median,
            median,
            flops_per_image(model) / 1e9,
        );
        report_device_rate(args, &cfg.name, &on, rate);
        return Ok(());
    }
    let img_s = args.batch as f64 / median;
    let gflop = flops_per_image(model) / 1e9;
    let l1 = &model.blocks[0].convs
        [usize::from(cfg.block == crate::model::resnet::BlockKind::Bottleneck)]
    .cv;
    // layer1 runs at the input size (CIFAR stem) or a quarter of it (stride-2 stem and max-pool).
    let side = if cfg.cifar_stem {
        cfg.img_size
    } else {
        cfg.img_size / 4
    };
    let (m, k, n) = (args.batch * side * side, l1.patch_len(), l1.cout);
    let sgemm = sgemm_rate(m, k, n, args.iters.max(3));
    report_rate(
        args,
        &cfg.name,
        "forward",
        (img_s, median, gflop),
        ((m, k, n), sgemm),
    );
    Ok(())
}

/// `mood bench --arch resnetv2_*_bit`: the CPU forward of a BiT ResNet-v2 with random weights,
/// as `resnet_bench`; the sgemm reference is stage 1's 3×3 convolution as im2col rows.
fn bit_bench(args: &Args, cfg: &crate::model::bit::BitConfig) -> Result<()> {
    use crate::model::bit::{random_store, Bit};
    if args.train {
        return Err(Error::Usage(
            "--train: BiT ResNet-v2 is inference only in this version".into(),
        ));
    }
    let backbone = Backbone::Bit(Box::new(Bit::load(cfg, &random_store(cfg, 0))?));
    let Backbone::Bit(model) = &backbone else {
        unreachable!("built as a BiT")
    };
    let shape = [args.batch, cfg.in_chans, cfg.img_size, cfg.img_size];
    let (mut run, on) = crate::pipeline::device::runner_described(
        &backbone,
        args.device,
        args.precision,
        args.batch,
    )?;
    let median = median_forward_seconds(args, &shape, |x| run.forward(x).map(|_| ()))?;
    if on != "cpu" {
        let rate = (
            args.batch as f64 / median,
            median,
            model.flops_per_image() / 1e9,
        );
        report_device_rate(args, &cfg.name, &on, rate);
        return Ok(());
    }
    let cv = &model.blocks[0].convs[1].cv;
    let side = cfg.img_size / 4;
    let (m, k, n) = (args.batch * side * side, cv.patch_len(), cv.cout);
    let sgemm = sgemm_rate(m, k, n, args.iters.max(3));
    report_rate(
        args,
        &cfg.name,
        "forward",
        (
            args.batch as f64 / median,
            median,
            model.flops_per_image() / 1e9,
        ),
        ((m, k, n), sgemm),
    );
    Ok(())
}

/// A convolutional net's forward rate on the device `on` ("cuda: <name>"): images in from the
/// host and features and logits back, as extraction runs it.
fn report_device_rate(args: &Args, arch: &str, on: &str, (img_s, median, gflop): (f64, f64, f64)) {
    let precision = format!("{:?}", args.precision).to_lowercase();
    if args.json {
        println!(
            "{{\"mode\":\"forward\",\"arch\":\"{arch}\",\"device\":\"{on}\",\"precision\":\"{precision}\",\"batch\":{},\"img_per_s\":{img_s:.4},\"gflop_per_image\":{gflop:.3},\"gflop_per_s\":{:.2},\"median_s\":{median:.5}}}",
            args.batch,
            img_s * gflop
        );
    } else {
        println!(
            "{arch} forward on {on} ({precision}): batch {}: {img_s:.2} images/s ({median:.4} s per batch, median of {}, host transfers included)",
            args.batch, args.iters
        );
        println!(
            "  {:.1} GFLOP/s at {gflop:.2} GFLOP per image",
            img_s * gflop
        );
    }
}

/// The median seconds of `args.iters` calls of `forward` on one random normal batch of `shape`,
/// after one warm-up call (the convolutional benches; a progress bar meanwhile).
fn median_forward_seconds(
    args: &Args,
    shape: &[usize; 4],
    mut forward: impl FnMut(&Tensor) -> Result<()>,
) -> Result<f64> {
    let mut rng = init::Rng::new(1);
    let n_in: usize = shape.iter().product();
    let x = Tensor::from_vec(shape, (0..n_in).map(|_| rng.normal() as f32).collect())?;
    forward(&x)?; // warm-up
    let pb = crate::progress::Progress::new(args.iters as u64, "iter", "bench");
    let mut times = Vec::new();
    for _ in 0..args.iters {
        let t = Instant::now();
        forward(&x)?;
        times.push(t.elapsed().as_secs_f64());
        pb.inc(1);
    }
    pb.finish_and_clear();
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Prints a CPU model bench (`mode` "forward" or "train") as one JSON line (`--json`, what
/// tools/bench_pytorch.py reads) or as text: images/s, median seconds and GFLOP per image, beside
/// the `gemm` crate's rate on the model's reference GEMM shape.
fn report_rate(
    args: &Args,
    arch: &str,
    mode: &str,
    (img_s, median, gflop): (f64, f64, f64),
    ((m, k, n), sgemm): ((usize, usize, usize), f64),
) {
    let model_rate = img_s * gflop;
    let threads = rayon::current_num_threads();
    if args.json {
        println!(
            "{{\"mode\":\"{mode}\",\"arch\":\"{arch}\",\"batch\":{},\"threads\":{threads},\"img_per_s\":{img_s:.4},\"gflop_per_image\":{gflop:.3},\"gflop_per_s\":{model_rate:.2},\"sgemm_shape\":[{m},{k},{n}],\"sgemm_gflop_per_s\":{sgemm:.2},\"fraction_of_sgemm\":{:.4},\"median_s\":{median:.5}}}",
            args.batch,
            model_rate / sgemm
        );
    } else {
        let what = if mode == "train" {
            "training steps"
        } else {
            "forward"
        };
        println!(
            "{arch} {what}: batch {}, {threads} threads: {img_s:.2} images/s ({median:.3} s per batch, median of {})",
            args.batch, args.iters
        );
        println!("  {model_rate:.1} GFLOP/s at {gflop:.2} GFLOP per image");
        println!(
            "  gemm crate sgemm on {m}x{k}x{n}: {sgemm:.1} GFLOP/s -> model runs at {:.1}% of it",
            100.0 * model_rate / sgemm
        );
    }
}

/// Median-of-`reps` GFLOP/s of out[m, n] = a[m, k]·w[n, k]ᵀ through the same call the model uses
/// (a median, like the model's timing, so a lucky boost on this shared machine favours neither).
pub fn sgemm_rate(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let a = vec![0.5f32; m * k];
    let w = vec![0.25f32; n * k];
    let mut out = vec![0.0f32; m * n];
    crate::backend::cpu::matmul::linear_nobias(&a, &w, m, k, n, &mut out);
    let mut times: Vec<f64> = (0..reps.max(3))
        .map(|_| {
            let t = Instant::now();
            crate::backend::cpu::matmul::linear_nobias(&a, &w, m, k, n, &mut out);
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    2.0 * (m * n * k) as f64 / times[times.len() / 2] / 1e9
}

#[cfg(feature = "cuda")]
fn cuda_usable() -> Result<()> {
    crate::backend::cuda::probe().map(|_| ())
}

#[cfg(not(feature = "cuda"))]
fn cuda_usable() -> Result<()> {
    Err(Error::Cuda(
        "this binary was built without the `cuda` feature".into(),
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda_bench(_args: &Args, _cfg: &VitConfig) -> Result<()> {
    cuda_usable()
}

#[cfg(feature = "cuda")]
fn cuda_bench(args: &Args, cfg: &VitConfig) -> Result<()> {
    super::bench_cuda::run(args, cfg)
}
