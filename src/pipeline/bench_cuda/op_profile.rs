//! The two per-op profiles of `mood bench --device cuda --profile`: each op inside the forward,
//! timed by CUDA events between ops (`op_times`), and each op of a transformer block alone at the
//! model's shapes (`op_alone`), run by the kernels and library calls the forward runs: the first
//! LayerNorm reading the f32 residual and writing T (`layernorm_fwd_f32_bf16` in bf16), the
//! residual and the next LayerNorm in one pass (`residual_layernorm_*`), qkv, proj and fc2 on
//! cuBLASLt with the bias in the epilogue (cuBLAS and a bias pass where cuBLASLt has no algorithm,
//! as in the forward), fc1 on cuBLAS then bias + exact GELU in one pass (`bias_gelu`), and every
//! attention path that takes the shape. Op names are those of `roofline::forward_ops`.

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

/// Each op of a transformer block alone at the model's shapes (random data), run as the forward
/// runs it, `iters` calls after a warm-up: its seconds per call, with the calls per forward of
/// its `ops` entry. Patch embedding, pooling and the head are left out (well under 1% of the
/// FLOPs).
pub fn op_alone<T: Compute>(
    dev: &CudaDevice,
    cfg: &VitConfig,
    b: usize,
    iters: usize,
    ops: &[roofline::Op],
) -> Result<Vec<roofline::Alone>>
where
    CudaBlas: Gemm<T>,
{
    let (n, d, f, h) = (cfg.tokens(), cfg.embed_dim, cfg.mlp_hidden, cfg.num_heads);
    let bn = b * n;
    let calls = |op: &str| ops.iter().find(|o| o.name == op).map_or(0, |o| o.calls);
    let mut rng = init::Rng::new(3);
    let mut rand = |len: usize, std: f32| -> Vec<f32> {
        (0..len).map(|_| rng.normal() as f32 * std).collect()
    };
    let up = |v: Vec<f32>| -> Result<CudaSlice<T>> {
        dev.upload(&v.into_iter().map(T::from_f32).collect::<Vec<T>>())
    };
    // The f32 residual stream, a branch output y and a norm's output h at T.
    let mut x32 = dev.upload(&rand(bn * d, 1.0))?;
    let y = up(rand(bn * d, 1.0))?;
    let mut ht = dev.zeros::<T>(bn * d)?;
    let (gamma, beta) = (dev.upload(&vec![1.0f32; d])?, dev.zeros::<f32>(d)?);
    // BEiT's layer scale; None where the model has none, as the forward passes it.
    let ls = dev.upload(&vec![0.1f32; d])?;
    let ls = cfg.layer_scale.then_some(&ls);
    let (w_qkv, b_qkv) = (up(rand(3 * d * d, 0.02))?, dev.zeros::<f32>(3 * d)?);
    let (w_proj, b_d) = (up(rand(d * d, 0.02))?, dev.zeros::<f32>(d)?);
    let (w_fc1, b_f) = (up(rand(f * d, 0.02))?, dev.zeros::<f32>(f)?);
    let w_fc2 = up(rand(d * f, 0.02))?;
    let mut qkv = up(rand(bn * 3 * d, 1.0))?;
    let (mut att, mut mlp) = (dev.zeros::<T>(bn * d)?, dev.zeros::<T>(bn * f)?);
    let mut out_d = dev.zeros::<T>(bn * d)?;
    let bias = dev.upload(&rand(h * n * n, 0.5))?;
    let ad = AttDims {
        b,
        n,
        h,
        dh: cfg.head_dim(),
    };
    let rows_shape = format!("[{bn}, {d}]");
    let mut rows = Vec::new();
    let mut row = |op: &'static str, runs: String, shape: String, calls: usize, seconds: f64| {
        rows.push(roofline::Alone {
            op,
            runs,
            shape,
            calls,
            seconds,
        })
    };

    let t = per_call(dev, iters, || {
        cu::layernorm::forward_from_f32(dev, &x32, &gamma, &beta, &mut ht, None, (bn, d), cfg.eps)
    })?;
    let ln_kernel = match T::NAME {
        "f32" => "layernorm_fwd_f32".to_string(),
        t => format!("layernorm_fwd_f32_{t}"),
    };
    row(
        "layernorm",
        ln_kernel,
        rows_shape.clone(),
        calls("layernorm"),
        t,
    );

    // The forward's linears in the order it runs them. qkv, proj, fc2: cuBLASLt with the bias in
    // its epilogue where it has an algorithm for the shape, else cuBLAS and a bias pass.
    let mut lt = cu::lt::Lt::new(dev).ok();
    let mut linear = |x: &CudaSlice<T>,
                      w: &CudaSlice<T>,
                      bias: &CudaSlice<f32>,
                      act: Activation,
                      out: &mut CudaSlice<T>,
                      (k, nn): (usize, usize)|
     -> Result<(String, String, f64)> {
        let shape = format!("{bn}x{k}x{nn}");
        if let (Activation::None, Some(lt)) = (act, lt.as_mut()) {
            if lt.linear_bias(dev, x, w, bias, out, (bn, k, nn))? {
                let t = per_call(dev, iters, || {
                    lt.linear_bias(dev, x, w, bias, out, (bn, k, nn)).map(drop)
                })?;
                return Ok(("cuBLASLt, bias in the epilogue".into(), shape, t));
            }
        }
        let t = per_call(dev, iters, || {
            cu::matmul::linear(dev, x, w, Some(bias), act, out, (bn, k, nn))
        })?;
        let pass = match act {
            Activation::None => "bias_add",
            Activation::Gelu => "bias_gelu",
        };
        Ok((format!("cuBLAS, then {pass}_{}", T::NAME), shape, t))
    };
    let (runs, shape, t) = linear(&ht, &w_qkv, &b_qkv, Activation::None, &mut qkv, (d, 3 * d))?;
    row("qkv", runs, shape, calls("qkv"), t);

    // Every attention path that takes this shape (bf16: flash, fused, cuBLAS), so that a GPU run
    // shows which to keep; only the one the forward takes has its calls.
    // The forward's path: its choice, or cuBLAS where that refuses these dims (`attention_ref`).
    let chosen = match AttentionPath::choose(T::NAME, &cfg.name, ad.dh) {
        p if p.refuses(T::NAME, &ad).is_some() => AttentionPath::Gemm,
        p => p,
    };
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
        let runs = match path {
            AttentionPath::Flash => "flash attention",
            AttentionPath::Fused => "fused attention",
            AttentionPath::Gemm => "cuBLAS attention",
        };
        let shape = format!("B={b} N={n} H={h} Dh={}", ad.dh);
        let calls = if path == chosen {
            calls("attention")
        } else {
            0
        };
        row("attention", runs.into(), shape, calls, t);
    }
    let (runs, shape, t) = linear(&att, &w_proj, &b_d, Activation::None, &mut out_d, (d, d))?;
    row("proj", runs, shape, calls("proj"), t);

    let t = per_call(dev, iters, || {
        cu::layernorm::residual_forward(
            dev,
            &mut x32,
            &y,
            ls,
            (&gamma, &beta),
            &mut ht,
            None,
            (bn, d),
            cfg.eps,
        )
    })?;
    let runs = format!("residual_layernorm_{}", T::NAME);
    let c = calls("residual+layernorm");
    row("residual+layernorm", runs, rows_shape.clone(), c, t);
    let (runs, shape, t) = linear(&ht, &w_fc1, &b_f, Activation::Gelu, &mut mlp, (d, f))?;
    row("fc1+gelu", runs, shape, calls("fc1+gelu"), t);
    let (runs, shape, t) = linear(&mlp, &w_fc2, &b_d, Activation::None, &mut out_d, (f, d))?;
    row("fc2", runs, shape, calls("fc2"), t);

    let t = per_call(dev, iters, || {
        cu::elementwise::residual(dev, &mut x32, &y, ls, (bn, d))
    })?;
    let runs = format!("residual_scale_{}", T::NAME);
    row("residual", runs, rows_shape, calls("residual"), t);
    Ok(rows)
}
