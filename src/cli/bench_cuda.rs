//! `mood bench --device cuda`: the CUDA forward's throughput (the model's forward on
//! src/model/cuda_exec.rs) with the batch resident on the device, its host-to-host rate, the same
//! two as one CUDA graph launch a batch (src/model/cuda_model.rs), and the
//! roofline prediction for the device (src/roofline.rs) beside it. With `--profile`: each op of
//! the forward timed by CUDA events (its time, FLOPs, bytes, achieved TFLOP/s or GB/s and fraction
//! of its roofline), then each op alone at the model's shapes (every attention path), so that a
//! short GPU session sees where a forward's time goes and how far each op is from its bound.

use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice};

use super::bench::{Args, Precision};
use crate::backend::cuda::attention::Dims as AttDims;
use crate::backend::cuda::device::cuda_err;
use crate::backend::cuda::{self as cu, CudaDevice};
use crate::backend::{Activation, Pool};
use crate::error::Result;
use crate::model::cuda_attention::{AttentionPath, Compute, Workspace};
use crate::model::cuda_exec::{CudaExec, DeviceValue};
use crate::model::cuda_model::CudaModel;
use crate::model::exec::Exec;
use crate::model::layers::{Linear, Norm, Param, RelBias};
use crate::model::{init, VisionTransformer, VitConfig};
use crate::roofline;
use crate::tensor::Tensor;

/// Forward times, seconds: eager and as one CUDA graph launch (`CudaModel::launch_graph`), each
/// with the images on the device and from host images to host outputs.
struct Times {
    resident: Vec<f64>,
    host: Vec<f64>,
    graphed: Vec<f64>,
    graphed_host: Vec<f64>,
}

/// Median forward time of the CUDA model, from host images to host features and logits (the
/// upload and download are part of what feature extraction pays).
pub fn run(args: &Args, cfg: &VitConfig) -> Result<()> {
    fn timed<T: Compute>(
        dev: &Arc<CudaDevice>,
        model: &VisionTransformer,
        x: &Tensor,
        iters: usize,
    ) -> Result<Times>
    where
        CudaBlas: Gemm<T>,
    {
        let mut gpu = CudaModel::<T>::new(Arc::clone(dev), model);
        let b = x.shape()[0];
        gpu.check_batch_fits(b)?; // before the batch's buffers: fail with a batch that fits
        gpu.exec.stage_input(x)?;
        for _ in 0..3 {
            gpu.forward_queued(x)?; // warm-up: cuBLAS heuristics, allocator pool
        }
        dev.sync()?;
        let pb = super::progress(4 * iters as u64, "iter");
        let mut resident = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            gpu.forward_queued(x)?;
            dev.sync()?;
            resident.push(t.elapsed().as_secs_f64());
            pb.inc(1);
        }
        // The same forward as one graph launch a batch: what the launch overhead costs eagerly.
        gpu.capture_graph(x)?;
        gpu.launch_graph()?;
        dev.sync()?;
        let mut graphed = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            gpu.launch_graph()?;
            dev.sync()?;
            graphed.push(t.elapsed().as_secs_f64());
            pb.inc(1);
        }
        gpu.set_graphs(true); // `forward` now replays that graph: upload, launch, download
        let mut graphed_host = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            gpu.forward(x)?;
            graphed_host.push(t.elapsed().as_secs_f64());
            pb.inc(1);
        }
        drop(gpu);
        let mut host = Vec::with_capacity(iters);
        let mut unstaged = CudaModel::<T>::new(Arc::clone(dev), model);
        unstaged.forward(x)?; // uploads the weights
        for _ in 0..iters {
            let t = Instant::now();
            unstaged.forward(x)?; // returns host tensors, so the device work is finished
            host.push(t.elapsed().as_secs_f64());
            pb.inc(1);
        }
        pb.finish_and_clear();
        Ok(Times {
            resident,
            host,
            graphed,
            graphed_host,
        })
    }

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
        Precision::F32 => timed::<f32>(&dev, &model, &x, args.iters)?,
        Precision::Bf16 => timed::<half::bf16>(&dev, &model, &x, args.iters)?,
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
    let measured = if args.profile {
        Some(match args.precision {
            Precision::F32 => op_times::<f32>(&dev, &model, &x, args.iters)?,
            Precision::Bf16 => op_times::<half::bf16>(&dev, &model, &x, args.iters)?,
        })
    } else {
        None
    };
    // On the stand-in the per-op times are CPU times: no rate is quoted against a GPU roofline.
    let profile = measured
        .as_ref()
        .map(|m| roofline::profile(&ops, m, roof_gpu, !stand_in));
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
        match args.precision {
            Precision::F32 => op_profile::<f32>(&dev, cfg, args.batch, args.iters, median)?,
            Precision::Bf16 => op_profile::<half::bf16>(&dev, cfg, args.batch, args.iters, median)?,
        }
    }
    Ok(())
}

/// The model's forward on `CudaExec` with a CUDA event recorded on the stream after every op (and
/// one before the first), so each op's time is the stream's time between its two events: what
/// it costs inside the forward, launch gaps included. Ops are named as `roofline::forward_ops`
/// names them.
struct Timed<'e, T: Compute> {
    exec: &'e mut CudaExec<T>,
    /// Embedding width, MLP width, images in the batch: to name the linear layers and norms.
    d: usize,
    hidden: usize,
    batch: usize,
    events: Vec<(&'static str, CudaEvent)>,
}

fn record(dev: &CudaDevice) -> Result<CudaEvent> {
    dev.stream()
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(cuda_err("record a CUDA event"))
}

impl<'e, T: Compute> Timed<'e, T>
where
    CudaBlas: Gemm<T>,
{
    fn new(exec: &'e mut CudaExec<T>, cfg: &VitConfig, batch: usize) -> Result<Self> {
        let start = record(exec.device())?;
        Ok(Timed {
            exec,
            d: cfg.embed_dim,
            hidden: cfg.mlp_hidden,
            batch,
            events: vec![("", start)],
        })
    }

    fn mark<V>(&mut self, name: &'static str, v: V) -> Result<V> {
        let e = record(self.exec.device())?;
        self.events.push((name, e));
        Ok(v)
    }

    fn linear_name(&self, l: &Linear) -> &'static str {
        let (d, f) = (self.d, self.hidden);
        // The transformer blocks' layers, by timm's names (as the executor tells them apart).
        if !l.w.name.starts_with("blocks.") {
            return "head";
        }
        match l.w.value.shape() {
            [n, k] if (*n, *k) == (3 * d, d) => "qkv",
            [n, k] if (*n, *k) == (d, d) => "proj",
            [n, k] if (*n, *k) == (f, d) => "fc1+gelu",
            [n, k] if (*n, *k) == (d, f) => "fc2",
            _ => "linear",
        }
    }

    /// Waits for the stream; each op's seconds, in the order run.
    fn finish(self) -> Result<Vec<(&'static str, f64)>> {
        self.exec.device().sync()?;
        self.events
            .windows(2)
            .map(|w| {
                let ms = w[0]
                    .1
                    .elapsed_ms(&w[1].1)
                    .map_err(cuda_err("time between CUDA events"))?;
                Ok((w[1].0, f64::from(ms) / 1e3))
            })
            .collect()
    }
}

impl<T: Compute> Exec for Timed<'_, T>
where
    CudaBlas: Gemm<T>,
{
    type V = DeviceValue<T>;

    fn input(&mut self, images: &Tensor) -> Result<Self::V> {
        let v = self.exec.input(images)?;
        self.mark("input", v)
    }

    fn patch_embed(&mut self, images: &Self::V, w: &Param, b: &Param) -> Result<Self::V> {
        let v = self.exec.patch_embed(images, w, b)?;
        self.mark("patch_embed", v)
    }

    fn assemble_tokens(
        &mut self,
        patches: Self::V,
        cls: &Param,
        pos: Option<&Param>,
        b: usize,
    ) -> Result<Self::V> {
        let v = self.exec.assemble_tokens(patches, cls, pos, b)?;
        self.mark("assemble_tokens", v)
    }

    fn layernorm(&mut self, x: &Self::V, norm: &Norm, eps: f32) -> Result<Self::V> {
        let name = if x.shape().first().is_some_and(|&m| m > self.batch) {
            "layernorm"
        } else {
            "final_norm"
        };
        let v = self.exec.layernorm(x, norm, eps)?;
        self.mark(name, v)
    }

    fn linear(&mut self, x: &Self::V, l: &Linear, act: Activation) -> Result<Self::V> {
        let name = self.linear_name(l);
        let v = self.exec.linear(x, l, act)?;
        self.mark(name, v)
    }

    fn attention(
        &mut self,
        qkv: Self::V,
        bias: Option<&RelBias>,
        b: usize,
        n: usize,
        heads: usize,
    ) -> Result<Self::V> {
        let v = self.exec.attention(qkv, bias, b, n, heads)?;
        self.mark("attention", v)
    }

    fn residual(
        &mut self,
        x: Self::V,
        y: Self::V,
        gamma: Option<&Param>,
        block: usize,
    ) -> Result<Self::V> {
        let v = self.exec.residual(x, y, gamma, block)?;
        self.mark("residual", v)
    }

    fn residual_layernorm(
        &mut self,
        x: Self::V,
        y: Self::V,
        gamma: Option<&Param>,
        block: usize,
        norm: &Norm,
        eps: f32,
    ) -> Result<(Self::V, Self::V)> {
        let v = self
            .exec
            .residual_layernorm(x, y, gamma, block, norm, eps)?;
        self.mark("residual+layernorm", v)
    }

    fn pool(&mut self, x: Self::V, b: usize, how: Pool) -> Result<Self::V> {
        let v = self.exec.pool(x, b, how)?;
        self.mark("pool", v)
    }

    fn mask_rows(&mut self, x: Self::V, mask: &[bool], token: &Param) -> Result<Self::V> {
        let v = self.exec.mask_rows(x, mask, token)?;
        self.mark("mask_rows", v)
    }

    fn gather_rows(&mut self, x: &Self::V, rows: &[usize]) -> Result<Self::V> {
        let v = self.exec.gather_rows(x, rows)?;
        self.mark("gather_rows", v)
    }

    fn to_host(&mut self, v: &Self::V) -> Result<Tensor> {
        let t = self.exec.to_host(v)?;
        self.mark("to_host", t)
    }
}

/// Per op of the forward (in the order first run), its calls and seconds per forward, averaged
/// over `iters` passes timed by `Timed` after one warm-up pass.
fn op_times<T: Compute>(
    dev: &Arc<CudaDevice>,
    model: &VisionTransformer,
    x: &Tensor,
    iters: usize,
) -> Result<Vec<roofline::Measured>>
where
    CudaBlas: Gemm<T>,
{
    let mut gpu = CudaModel::<T>::new(Arc::clone(dev), model);
    gpu.exec.stage_input(x)?;
    gpu.forward_queued(x)?; // warm-up: uploads, cuBLAS heuristics, allocator pool
    dev.sync()?;
    let b = x.shape()[0];
    let mut rows: Vec<roofline::Measured> = Vec::new();
    for _ in 0..iters {
        let mut timed = Timed::new(&mut gpu.exec, &model.cfg, b)?;
        drop(model.forward_with(&mut timed, x)?);
        let mut calls: Vec<(&'static str, usize)> = Vec::new();
        for (name, secs) in timed.finish()? {
            match rows.iter_mut().find(|r| r.name == name) {
                Some(r) => r.seconds += secs,
                None => rows.push(roofline::Measured {
                    name,
                    calls: 0,
                    seconds: secs,
                }),
            }
            match calls.iter_mut().find(|c| c.0 == name) {
                Some(c) => c.1 += 1,
                None => calls.push((name, 1)),
            }
        }
        for (name, n) in calls {
            if let Some(r) = rows.iter_mut().find(|r| r.name == name) {
                r.calls = n;
            }
        }
    }
    for r in &mut rows {
        r.seconds /= iters as f64;
    }
    Ok(rows)
}

/// Seconds per call of `f`, over `iters` calls after one warm-up, with the device drained before
/// and after (so launch overhead counts, as it does inside a forward).
fn per_call(dev: &CudaDevice, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.sync()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.sync()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// One row of the op profile: op, shape, calls per block, seconds per call, FLOPs per call.
type OpRow = (&'static str, String, usize, f64, f64);

/// Each op of a transformer block alone at the model's shapes (random data), its time per call and
/// per forward (× calls per block × depth), beside the measured forward. Patch embedding, pooling
/// and the head are left out (well under 1% of the FLOPs).
fn op_profile<T: Compute>(
    dev: &CudaDevice,
    cfg: &VitConfig,
    b: usize,
    iters: usize,
    forward_s: f64,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let (n, d, f, h) = (cfg.tokens(), cfg.embed_dim, cfg.mlp_hidden, cfg.num_heads);
    let bn = b * n;
    let iters = iters.max(10);
    let mut rng = init::Rng::new(3);
    let mut rand = |len: usize, std: f32| -> Vec<f32> {
        (0..len).map(|_| rng.normal() as f32 * std).collect()
    };
    let up = |v: Vec<f32>| -> Result<CudaSlice<T>> {
        dev.upload(&v.into_iter().map(T::from_f32).collect::<Vec<T>>())
    };
    let x32 = dev.upload(&rand(bn * d, 1.0))?;
    let (gamma, beta) = (dev.upload(&vec![1.0f32; d])?, dev.zeros::<f32>(d)?);
    let mut yt = dev.zeros::<T>(bn * d)?;
    let (w_qkv, b_qkv) = (up(rand(3 * d * d, 0.02))?, dev.zeros::<f32>(3 * d)?);
    let (w_proj, b_d) = (up(rand(d * d, 0.02))?, dev.zeros::<f32>(d)?);
    let (w_fc1, b_f) = (up(rand(f * d, 0.02))?, dev.zeros::<f32>(f)?);
    let w_fc2 = up(rand(d * f, 0.02))?;
    let mut qkv = up(rand(bn * 3 * d, 1.0))?;
    let (mut att, mut mlp) = (dev.zeros::<T>(bn * d)?, dev.zeros::<T>(bn * f)?);
    let bias = dev.upload(&rand(h * n * n, 0.5))?;
    let ad = AttDims {
        b,
        n,
        h,
        dh: cfg.head_dim(),
    };
    let mut resid = dev.upload(&rand(bn * d, 1.0))?;
    let gemm = |k: usize, nn: usize| 2.0 * (bn * k * nn) as f64;
    let mut rows: Vec<OpRow> = Vec::new();
    // The forward normalises the f32 residual stream into f32 (autocast's rule), then casts.
    let mut y32 = dev.zeros::<f32>(bn * d)?;
    let ln = per_call(dev, iters, || {
        cu::layernorm::forward(dev, &x32, &gamma, &beta, &mut y32, None, (bn, d), cfg.eps)
    })?;
    rows.push(("layernorm", format!("[{bn}, {d}]"), 2, ln, 0.0));
    if T::NAME != "f32" {
        let t = per_call(dev, iters, || cu::elementwise::cast(dev, &x32, &mut yt))?;
        rows.push(("cast f32->T", format!("[{bn}, {d}]"), 2, t, 0.0));
    }
    let mut lin = |name,
                   w: &CudaSlice<T>,
                   bias: &CudaSlice<f32>,
                   act,
                   x: &CudaSlice<T>,
                   out: &mut CudaSlice<T>,
                   k: usize,
                   nn: usize|
     -> Result<()> {
        let t = per_call(dev, iters, || {
            cu::matmul::linear(dev, x, w, Some(bias), act, out, (bn, k, nn))
        })?;
        rows.push((name, format!("{bn}x{k}x{nn}"), 1, t, gemm(k, nn)));
        Ok(())
    };
    lin(
        "linear qkv",
        &w_qkv,
        &b_qkv,
        Activation::None,
        &yt,
        &mut qkv,
        d,
        3 * d,
    )?;
    lin(
        "linear proj",
        &w_proj,
        &b_d,
        Activation::None,
        &att,
        &mut yt,
        d,
        d,
    )?;
    lin(
        "linear fc1+gelu",
        &w_fc1,
        &b_f,
        Activation::Gelu,
        &yt,
        &mut mlp,
        d,
        f,
    )?;
    lin(
        "linear fc2",
        &w_fc2,
        &b_d,
        Activation::None,
        &mlp,
        &mut yt,
        f,
        d,
    )?;
    // Every attention path that takes this shape (bf16: flash, fused, cuBLAS), so that a GPU run
    // shows which to keep; only the one the forward chose counts towards the per-forward sum.
    let chosen = AttentionPath::choose(T::NAME, &cfg.name, ad.dh);
    for path in [
        AttentionPath::Flash,
        AttentionPath::Fused,
        AttentionPath::Gemm,
    ] {
        if path.refuses(T::NAME, &ad).is_some() {
            continue;
        }
        let mut ws = match path {
            AttentionPath::Gemm => Some(Workspace::<T>::new(dev, &ad)?),
            _ => None,
        };
        let t = per_call(dev, iters, || {
            T::attention(dev, path, &qkv, Some(&bias), &mut att, &ad, ws.as_mut())
        })?;
        let name = match path {
            AttentionPath::Flash => "attention flash",
            AttentionPath::Fused => "attention fused",
            AttentionPath::Gemm => "attention cuBLAS",
        };
        let shape = format!("B={b} N={n} H={h} Dh={}", ad.dh);
        let calls = usize::from(path == chosen);
        rows.push((name, shape, calls, t, 4.0 * (b * n * n * d) as f64));
    }
    let t = per_call(dev, iters, || {
        cu::elementwise::residual(dev, &mut resid, &yt, Some(&gamma), (bn, d))
    })?;
    rows.push(("residual", format!("[{bn}, {d}]"), 2, t, 0.0));

    println!("  per-op profile, each op alone at the model's shapes ({iters} calls each):");
    println!(
        "    {:<16} {:<24} {:>9} {:>9} {:>12} {:>6}",
        "op", "shape", "us/call", "TFLOP/s", "ms/forward", "share"
    );
    let per_forward = |r: &OpRow| r.3 * (r.2 * cfg.depth) as f64;
    let total: f64 = rows.iter().map(per_forward).sum();
    for r in &rows {
        let tf = if r.4 > 0.0 {
            format!("{:.1}", r.4 / r.3 / 1e12)
        } else {
            "-".into()
        };
        println!(
            "    {:<16} {:<24} {:>9.1} {:>9} {:>12.3} {:>5.1}%",
            r.0,
            r.1,
            1e6 * r.3,
            tf,
            1e3 * per_forward(r),
            100.0 * per_forward(r) / total
        );
    }
    println!(
        "    sum of the ops: {:.3} ms per forward; measured forward: {:.3} ms",
        1e3 * total,
        1e3 * forward_s
    );
    Ok(())
}
