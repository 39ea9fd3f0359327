//! The whole-batch attention forwards (`forward_batched_f32`, `forward_batched_bf16`): q, k, v
//! split head-major once, then one strided-batched GEMM over images × heads for the scores and one
//! for P·V around the bias add and the softmax, in a fixed number of launches whatever B; and the
//! variants that keep the probabilities for the backward (`forward_keep_probs_*`).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::Dims;
use crate::backend::cuda::device::{as_i32, check_len, cuda_err, nonempty, CudaDevice};
use crate::backend::cuda::{elementwise, ptr_mut_or_null, ptr_or_null, softmax, Storage};
use crate::error::{Error, Result};

/// Scratch of `forward_batched_f32` / `forward_batched_bf16` for B images at once, made once per
/// (batch, dims): q, k, v head-major (`qkvh`, 3·B·N·D), the head-major output (`oh`, B·N·D), the
/// scores and probabilities (B·H·N·N f32 each), and for bf16 the probabilities rounded to bf16.
pub struct BatchedScratch<T> {
    pub qkvh: CudaSlice<T>,
    pub oh: CudaSlice<T>,
    pub scores: CudaSlice<f32>,
    pub probs: CudaSlice<f32>,
    pub probs_half: Option<CudaSlice<half::bf16>>,
}

impl<T: Storage> BatchedScratch<T> {
    pub fn new(dev: &CudaDevice, dims: &Dims) -> Result<BatchedScratch<T>> {
        let Dims { b, n, h, dh } = *dims;
        let (bnd, bhnn) = ((b * n * h * dh).max(1), (b * h * n * n).max(1));
        Ok(BatchedScratch {
            qkvh: dev.zeros::<T>(3 * bnd)?,
            oh: dev.zeros::<T>(bnd)?,
            scores: dev.zeros::<f32>(bhnn)?,
            probs: dev.zeros::<f32>(bhnn)?,
            probs_half: if T::NAME == "bf16" {
                Some(dev.zeros::<half::bf16>(bhnn)?)
            } else {
                None
            },
        })
    }
}

/// qkv [B·N, 3·D] → scratch.qkvh [3, B, H, N, Dh], checking every buffer on the way.
fn split_heads<T: Storage>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    out: &CudaSlice<T>,
    dims: &Dims,
    ws: &mut BatchedScratch<T>,
) -> Result<bool> {
    let Dims { b, n, h, dh } = *dims;
    let (d, bhnn) = (h * dh, b * h * n * n);
    check_len("attention qkv", qkv, b * n * 3 * d)?;
    check_len("attention out", out, b * n * d)?;
    if let Some(bias) = bias {
        check_len("attention bias", bias, h * n * n)?;
    }
    check_len("attention qkvh", &ws.qkvh, (b * n * d).max(1) * 3)?;
    check_len("attention oh", &ws.oh, (b * n * d).max(1))?;
    check_len("attention scores", &ws.scores, bhnn.max(1))?;
    check_len("attention probs", &ws.probs, bhnn.max(1))?;
    if let Some(p) = &ws.probs_half {
        check_len("attention probs bf16", p, bhnn.max(1))?;
    }
    if b * n * d == 0 {
        return Ok(false);
    }
    permute(dev, "split", qkv, &mut ws.qkvh, 3 * b * n * d, dims)?;
    Ok(true)
}

/// attention_{split,merge}_heads_T over `count` output elements.
pub(super) fn permute<T: Storage>(
    dev: &CudaDevice,
    which: &str,
    src: &CudaSlice<T>,
    dst: &mut CudaSlice<T>,
    count: usize,
    dims: &Dims,
) -> Result<()> {
    let Dims { b, n, h, dh } = *dims;
    let (bi, ni, hi, di) = (
        as_i32("B", b)?,
        as_i32("N", n)?,
        as_i32("H", h)?,
        as_i32("Dh", dh)?,
    );
    let name = format!("attention_{which}_heads_{}", T::NAME);
    let f = dev.function("attention", &name)?;
    // SAFETY: the caller checked src and dst against (B, N, H, Dh): count elements each way.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(count),
            [src, dst, &bi, &ni, &hi, &di]
        )
    }
}

/// S_bh = scale·Q_bh K_bhᵀ as ONE strided batch over the B·H head-major [N, Dh] matrices of
/// qkvh (k at offset B·N·D, stride N·Dh; S stride N·N), and O_bh = P_bh V_bh likewise (v at
/// 2·B·N·D): the nn.Linear layouts of `forward_f32` with ld = Dh.
fn qk_config<A>(dims: &Dims, alpha: A, beta: A) -> Result<StridedBatchedConfig<A>> {
    let Dims { b, n, h, dh } = *dims;
    let (ni, dhi) = (as_i32("N", n)?, as_i32("Dh", dh)?);
    Ok(StridedBatchedConfig {
        gemm: GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: ni,
            n: ni,
            k: dhi,
            alpha,
            lda: dhi,
            ldb: dhi,
            beta,
            ldc: ni,
        },
        batch_size: as_i32("B·H", b * h)?,
        stride_a: (n * dh) as i64,
        stride_b: (n * dh) as i64,
        stride_c: (n * n) as i64,
    })
}

fn pv_config<A>(dims: &Dims, alpha: A, beta: A) -> Result<StridedBatchedConfig<A>> {
    let Dims { b, n, h, dh } = *dims;
    let (ni, dhi) = (as_i32("N", n)?, as_i32("Dh", dh)?);
    Ok(StridedBatchedConfig {
        gemm: GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: dhi,
            n: ni,
            k: ni,
            alpha,
            lda: dhi,
            ldb: ni,
            beta,
            ldc: dhi,
        },
        batch_size: as_i32("B·H", b * h)?,
        stride_a: (n * dh) as i64,
        stride_b: (n * n) as i64,
        stride_c: (n * dh) as i64,
    })
}

/// `forward_f32` for the whole batch in a fixed number of launches, whatever B: split heads, ONE
/// strided-batched sgemm for the scores, the bias add (broadcast over images) and the softmax
/// over all B·H·N rows, ONE sgemm for P·V, merge heads. Same contract and head dims as
/// `forward_f32`; `ws` from `BatchedScratch::new` for these dims.
pub fn forward_batched_f32(
    dev: &CudaDevice,
    qkv: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    dims: &Dims,
    scale: f32,
    ws: &mut BatchedScratch<f32>,
) -> Result<()> {
    if !split_heads(dev, qkv, bias, out, dims, ws)? {
        return Ok(());
    }
    let Dims { b, n, h, dh } = *dims;
    let bnd = b * n * h * dh;
    let q = ws.qkvh.slice(0..bnd);
    let k = ws.qkvh.slice(bnd..2 * bnd);
    let v = ws.qkvh.slice(2 * bnd..3 * bnd);
    // SAFETY: q, k, v hold B·H matrices of N·Dh, the scores B·H of N·N (checked in split_heads).
    unsafe {
        dev.blas()
            .gemm_strided_batched(qk_config(dims, scale, 0.0)?, &k, &q, &mut ws.scores)
    }
    .map_err(cuda_err("cuBLAS batched attention QKᵀ"))?;
    if let Some(bias) = bias {
        elementwise::bias_add(dev, &mut ws.scores, bias, (b, h * n * n))?;
    }
    softmax::rows(dev, &ws.scores, &mut ws.probs, (b * h * n, n), 1.0)?;
    // SAFETY: as above; oh holds B·H matrices of N·Dh.
    unsafe {
        dev.blas()
            .gemm_strided_batched(pv_config(dims, 1.0, 0.0)?, &v, &ws.probs, &mut ws.oh)
    }
    .map_err(cuda_err("cuBLAS batched attention PV"))?;
    permute(dev, "merge", &ws.oh, out, bnd, dims)
}

/// `forward_bf16_gemm` for the whole batch in a fixed number of launches (as
/// `forward_batched_f32`): scores from bf16 operands into f32 (GemmEx, f32 accumulation), bias
/// and softmax in f32, probabilities rounded to bf16, O = P V in bf16 with f32 accumulation. Any
/// head dim: this is the fallback of `flash_attention::forward`.
pub fn forward_batched_bf16(
    dev: &CudaDevice,
    qkv: &CudaSlice<half::bf16>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<half::bf16>,
    dims: &Dims,
    scale: f32,
    ws: &mut BatchedScratch<half::bf16>,
) -> Result<()> {
    use cudarc::cublas::result::gemm_strided_batched_ex;
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
    use cudarc::driver::{DevicePtr, DevicePtrMut};

    if ws.probs_half.is_none() {
        return Err(Error::Cuda(
            "attention: the bf16 scratch has no bf16 probabilities".into(),
        ));
    }
    if !split_heads(dev, qkv, bias, out, dims, ws)? {
        return Ok(());
    }
    let Dims { b, n, h, dh } = *dims;
    let bnd = b * n * h * dh;
    let cfg = qk_config(dims, scale, 0.0f32)?;
    let s = dev.stream();
    {
        let (q, k) = (ws.qkvh.slice(0..bnd), ws.qkvh.slice(bnd..2 * bnd));
        let (pq, _gq) = q.device_ptr(s);
        let (pk, _gk) = k.device_ptr(s);
        let (ps, _gs) = ws.scores.device_ptr_mut(s);
        let g = &cfg.gemm;
        // SAFETY: as in `forward_bf16_gemm`, over the B·H head-major matrices checked in
        // split_heads; alpha/beta are f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            gemm_strided_batched_ex(
                *dev.blas().handle(),
                g.transa,
                g.transb,
                g.m,
                g.n,
                g.k,
                (&g.alpha) as *const f32 as *const _,
                pk as *const _,
                cudaDataType_t::CUDA_R_16BF,
                g.lda,
                cfg.stride_a,
                pq as *const _,
                cudaDataType_t::CUDA_R_16BF,
                g.ldb,
                cfg.stride_b,
                (&g.beta) as *const f32 as *const _,
                ps as *mut _,
                cudaDataType_t::CUDA_R_32F,
                g.ldc,
                cfg.stride_c,
                cfg.batch_size,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cuda_err("cuBLAS batched attention QKᵀ (bf16 → f32)"))?;
    }
    if let Some(bias) = bias {
        elementwise::bias_add(dev, &mut ws.scores, bias, (b, h * n * n))?;
    }
    softmax::rows(dev, &ws.scores, &mut ws.probs, (b * h * n, n), 1.0)?;
    let probs_half = ws.probs_half.as_mut().expect("checked above");
    elementwise::cast(dev, &ws.probs, probs_half)?;
    let v = ws.qkvh.slice(2 * bnd..3 * bnd);
    let pv = pv_config(dims, half::bf16::ONE, half::bf16::ZERO)?;
    // SAFETY: as in `forward_batched_f32`, with bf16 elements.
    unsafe {
        dev.blas()
            .gemm_strided_batched(pv, &v, &*probs_half, &mut ws.oh)
    }
    .map_err(cuda_err("cuBLAS batched attention PV (bf16)"))?;
    permute(dev, "merge", &ws.oh, out, bnd, dims)
}

/// Runs `fwd` (one of the batched forwards) with the caller's `probs` [B, H, N, N] swapped in as
/// the scratch's probabilities: the softmax writes P there in place, so keeping it costs no copy.
fn keep_probs_into<T: Storage>(
    dims: &Dims,
    ws: &mut BatchedScratch<T>,
    probs: &mut CudaSlice<f32>,
    fwd: impl FnOnce(&mut BatchedScratch<T>) -> Result<()>,
) -> Result<()> {
    let Dims { b, n, h, dh } = *dims;
    let bhnn = b * h * n * n;
    nonempty(
        &format!("attention keep-probs (B = {b}, N = {n}, H = {h}, Dh = {dh})"),
        bhnn * dh,
    )?;
    check_len("attention probs scratch", &ws.probs, bhnn)?;
    check_len("attention kept probs", probs, bhnn)?;
    std::mem::swap(&mut ws.probs, probs);
    let r = fwd(ws);
    // Swapped back whatever happened, so the scratch keeps its own buffer.
    std::mem::swap(&mut ws.probs, probs);
    r
}

/// A fresh P [B, H, N, N] for `keep_probs_into` (each layer's P must live until its backward).
fn fresh_probs(dev: &CudaDevice, dims: &Dims) -> Result<CudaSlice<f32>> {
    let Dims { b, n, h, dh } = *dims;
    nonempty(
        &format!("attention keep-probs (B = {b}, N = {n}, H = {h}, Dh = {dh})"),
        b * h * n * n * dh,
    )?;
    dev.empty::<f32>(b * h * n * n)
}

/// `forward_batched_f32` that also returns the softmax probabilities P [B, H, N, N] (f32, rows
/// summing to 1) of softmax(scale·Q_bh K_bhᵀ + bias_h): what `backward_batched` reads, as
/// `backend::attention_keep_probs` on the CPU. qkv [B·N, 3·D], bias [H, N, N] or None, out
/// [B·N, D]; `ws` from `BatchedScratch::new` for these dims. Allocates P; a caller that keeps
/// its P buffers (one per layer) passes them to `forward_keep_probs_f32_into` instead.
pub fn forward_keep_probs_f32(
    dev: &CudaDevice,
    qkv: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    dims: &Dims,
    scale: f32,
    ws: &mut BatchedScratch<f32>,
) -> Result<CudaSlice<f32>> {
    let mut probs = fresh_probs(dev, dims)?;
    forward_keep_probs_f32_into(dev, qkv, bias, out, dims, scale, ws, &mut probs)?;
    Ok(probs)
}

/// `forward_keep_probs_f32` writing P into the caller's `probs` [B, H, N, N]: no allocation.
#[allow(clippy::too_many_arguments)]
pub fn forward_keep_probs_f32_into(
    dev: &CudaDevice,
    qkv: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    dims: &Dims,
    scale: f32,
    ws: &mut BatchedScratch<f32>,
    probs: &mut CudaSlice<f32>,
) -> Result<()> {
    keep_probs_into(dims, ws, probs, |ws| {
        forward_batched_f32(dev, qkv, bias, out, dims, scale, ws)
    })
}

/// `forward_batched_bf16` that also returns P [B, H, N, N] in f32 (before the rounding to bf16
/// that feeds P·V), as `forward_keep_probs_f32`.
pub fn forward_keep_probs_bf16(
    dev: &CudaDevice,
    qkv: &CudaSlice<half::bf16>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<half::bf16>,
    dims: &Dims,
    scale: f32,
    ws: &mut BatchedScratch<half::bf16>,
) -> Result<CudaSlice<f32>> {
    let mut probs = fresh_probs(dev, dims)?;
    forward_keep_probs_bf16_into(dev, qkv, bias, out, dims, scale, ws, &mut probs)?;
    Ok(probs)
}

/// `forward_keep_probs_bf16` writing P into the caller's `probs` [B, H, N, N]: no allocation.
#[allow(clippy::too_many_arguments)]
pub fn forward_keep_probs_bf16_into(
    dev: &CudaDevice,
    qkv: &CudaSlice<half::bf16>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<half::bf16>,
    dims: &Dims,
    scale: f32,
    ws: &mut BatchedScratch<half::bf16>,
    probs: &mut CudaSlice<f32>,
) -> Result<()> {
    keep_probs_into(dims, ws, probs, |ws| {
        forward_batched_bf16(dev, qkv, bias, out, dims, scale, ws)
    })
}

/// The device address of element `off` of a buffer of T.
pub(super) fn at<T>(dev: &CudaDevice, s: &CudaSlice<T>, off: usize) -> u64 {
    ptr_or_null(dev.stream(), Some(s)) + (off * std::mem::size_of::<T>()) as u64
}

pub(super) fn at_mut<T>(dev: &CudaDevice, s: &mut CudaSlice<T>, off: usize) -> u64 {
    ptr_mut_or_null(dev.stream(), Some(s)) + (off * std::mem::size_of::<T>()) as u64
}
