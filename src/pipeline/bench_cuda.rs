//! The measurements of `mood bench --device cuda` (cli/bench_cuda.rs prints them): the forward's
//! times eager and as a CUDA graph, each op of the forward timed by CUDA events (`Timed`, for the
//! roofline profile), and each op of a block alone at the model's shapes.

use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice};

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
pub struct Times {
    pub resident: Vec<f64>,
    pub host: Vec<f64>,
    pub graphed: Vec<f64>,
    pub graphed_host: Vec<f64>,
}

/// The forward's times over `iters` passes each: images resident on the device, host to host,
/// and both as one CUDA graph launch a batch.
pub fn forward_times<T: Compute>(
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
    let pb = crate::progress::Progress::new(4 * iters as u64, "iter", "progress");
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
pub fn op_times<T: Compute>(
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
pub fn per_call(dev: &CudaDevice, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
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
pub type OpRow = (&'static str, String, usize, f64, f64);

/// Each op of a transformer block alone at the model's shapes (random data): its rows, timed over
/// the calls returned (`iters`, at least 10). Patch embedding, pooling and the head are left out
/// (well under 1% of the FLOPs).
pub fn op_rows<T: Compute>(
    dev: &CudaDevice,
    cfg: &VitConfig,
    b: usize,
    iters: usize,
) -> Result<(usize, Vec<OpRow>)>
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
    Ok((iters, rows))
}
