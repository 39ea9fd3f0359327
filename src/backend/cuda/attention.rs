//! Launcher of kernels/attention.cu: fused multi-head self-attention with an optional additive
//! bias [H, N, N] (BEiT's relative-position bias), read from the fused qkv activation [B·N, 3·D]
//! and written as [B·N, D], heads concatenated; same layout and math as
//! src/backend/cpu/attention.rs. bf16 or f16 storage, f32 softmax and accumulation; the head dim
//! must be one the kernel was instantiated for (64 or 80).
//!
//! `forward_f32` is the exact-precision path for any head dim: per image, two strided-batched
//! cuBLAS GEMMs over the heads around the bias add and the softmax kernel (the [H, N, N] scores
//! go through memory, which the fused kernel avoids). It is what an f32 model forward uses.
//!
//! `forward_batched_f32` / `forward_batched_bf16` do the same for the whole batch in a fixed number
//! of launches (heads split to [3, B, H, N, Dh] first, so that one strided batch spans images ×
//! heads), with their scratch made once (`BatchedScratch`).
//!
//! For training: `forward_keep_probs_{f32,bf16}` also hand back the probabilities P [B, H, N, N],
//! `backward_batched` is their backward from P (strided-batched cuBLAS over images × heads around
//! a softmax-backward kernel, f32 gradients), and `RelposScatter` turns the dense bias gradient
//! into BEiT's relative-position table gradient. Every sum runs in a fixed order (no atomics), so
//! two runs give the same bits.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, cuda_err, f32_or_bf16, nonempty, CudaDevice};
use super::matmul::{cudaDataType_t, data_type, gemm_rm, RowMajor};
use super::{elementwise, ptr_mut_or_null, ptr_or_null, softmax, Storage};
use crate::error::{Error, Result};

/// Query rows per block (kernels/attention.cu ATT_BQ).
const BQ: usize = 32;

/// The head dims the kernel is compiled for.
pub const HEAD_DIMS: [usize; 2] = [64, 80];

/// B images of N tokens with H heads of `dh`; `scale` is usually dh^-1/2.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub dh: usize,
}

pub fn forward<T: Storage>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    dims: &Dims,
    scale: f32,
) -> Result<()> {
    let Dims { b, n, h, dh } = *dims;
    if T::NAME == "f32" {
        return Err(Error::Cuda(
            "attention: the fused kernel takes bf16 or f16 (cast qkv first)".into(),
        ));
    }
    if !HEAD_DIMS.contains(&dh) {
        return Err(Error::Cuda(format!(
            "attention: head dim {dh} has no kernel (have {HEAD_DIMS:?})"
        )));
    }
    let d = h * dh;
    check_len("attention qkv", qkv, b * n * 3 * d)?;
    check_len("attention out", out, b * n * d)?;
    if let Some(bias) = bias {
        check_len("attention bias", bias, h * n * n)?;
    }
    let (ni, hi) = (as_i32("N", n)?, as_i32("H", h)?);
    if b == 0 || n == 0 || h == 0 {
        return Ok(());
    }
    if b > 65535 || h > 65535 {
        return Err(Error::Cuda(format!(
            "attention: grid dims B = {b}, H = {h} exceed 65535"
        )));
    }
    let name = format!("attention_fwd_{}_d{dh}", T::NAME);
    let f = dev.function("attention", &name)?;
    let s = dev.stream();
    let pb = ptr_or_null(s, bias);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BQ) as u32, h as u32, b as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: qkv, out and bias were checked against (B, N, H, Dh); Dh selects the kernel.
    unsafe { launch!(dev, f, name, cfg, [qkv, &pb, out, &ni, &hi, &scale]) }?;
    Ok(())
}

/// f32 attention on cuBLAS, same contract as `forward`; `scratch` = two buffers of H·N·N floats
/// (scores, then probabilities, for one image at a time).
pub fn forward_f32(
    dev: &CudaDevice,
    qkv: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    dims: &Dims,
    scale: f32,
    scratch: (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
) -> Result<()> {
    let Dims { b, n, h, dh } = *dims;
    let d = h * dh;
    check_len("attention qkv", qkv, b * n * 3 * d)?;
    check_len("attention out", out, b * n * d)?;
    if let Some(bias) = bias {
        check_len("attention bias", bias, h * n * n)?;
    }
    let hnn = h * n * n;
    let (scores, probs) = scratch;
    check_len("attention scores", scores, hnn)?;
    check_len("attention probs", probs, hnn)?;
    if b * n * h == 0 {
        return Ok(());
    }
    let (ni, dhi, hi) = (as_i32("N", n)?, as_i32("Dh", dh)?, as_i32("H", h)?);
    let (ld_qkv, ld_out) = (as_i32("3·D", 3 * d)?, as_i32("D", d)?);
    let (sdh, snn) = (dh as i64, (n * n) as i64);
    for img in 0..b {
        let base = img * n * 3 * d;
        let q = qkv.slice(base..base + n * 3 * d);
        let k = qkv.slice(base + d..base + n * 3 * d);
        let v = qkv.slice(base + 2 * d..base + n * 3 * d);
        // S_h[N, N] = scale · Q_h K_hᵀ: the nn.Linear layout again (K_h plays the weight).
        let qk = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: ni,
                n: ni,
                k: dhi,
                alpha: scale,
                lda: ld_qkv,
                ldb: ld_qkv,
                beta: 0.0,
                ldc: ni,
            },
            batch_size: hi,
            stride_a: sdh,
            stride_b: sdh,
            stride_c: snn,
        };
        // SAFETY: head h of K/Q starts h·Dh into its view and spans N rows of stride 3·D inside
        // this image's block; S holds H·N·N.
        unsafe { dev.blas().gemm_strided_batched(qk, &k, &q, scores) }
            .map_err(cuda_err("cuBLAS attention QKᵀ"))?;
        if let Some(bias) = bias {
            elementwise::bias_add(dev, scores, bias, (1, hnn))?;
        }
        softmax::rows(dev, scores, probs, (h * n, n), 1.0)?;
        let mut o = out.slice_mut(img * n * d..(img + 1) * n * d);
        // O_h[N, Dh] = P_h[N, N] · V_h[N, Dh], written at column h·Dh of the [N, D] output.
        let pv = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: dhi,
                n: ni,
                k: ni,
                alpha: 1.0,
                lda: ld_qkv,
                ldb: ni,
                beta: 0.0,
                ldc: ld_out,
            },
            batch_size: hi,
            stride_a: sdh,
            stride_b: snn,
            stride_c: sdh,
        };
        // SAFETY: V_h as above; P holds H·N·N; O_h spans N rows of stride D in this image's rows.
        unsafe { dev.blas().gemm_strided_batched(pv, &v, &*probs, &mut o) }
            .map_err(cuda_err("cuBLAS attention PV"))?;
    }
    Ok(())
}

/// bf16 attention on tensor cores through cuBLAS, same contract as `forward` for any head dim:
/// per image, scores = scale·Q Kᵀ from bf16 operands into f32 (GemmEx, f32 accumulation), the
/// bias add and softmax in f32, the probabilities rounded to bf16, then O = P V (bf16 GEMM, f32
/// accumulation). Trades the fused kernel's FMA loops for tensor-core GEMMs plus four passes over
/// the [H, N, N] scores; `scratch` = (scores, probs) f32 and probs bf16, H·N·N each.
pub fn forward_bf16_gemm(
    dev: &CudaDevice,
    qkv: &CudaSlice<half::bf16>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<half::bf16>,
    dims: &Dims,
    scale: f32,
    scratch: (
        &mut CudaSlice<f32>,
        &mut CudaSlice<f32>,
        &mut CudaSlice<half::bf16>,
    ),
) -> Result<()> {
    use cudarc::cublas::result::gemm_strided_batched_ex;
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType_t};
    use cudarc::driver::{DevicePtr, DevicePtrMut};

    let Dims { b, n, h, dh } = *dims;
    let d = h * dh;
    check_len("attention qkv", qkv, b * n * 3 * d)?;
    check_len("attention out", out, b * n * d)?;
    if let Some(bias) = bias {
        check_len("attention bias", bias, h * n * n)?;
    }
    let hnn = h * n * n;
    let (scores, probs, probs_bf16) = scratch;
    check_len("attention scores", scores, hnn)?;
    check_len("attention probs", probs, hnn)?;
    check_len("attention probs bf16", probs_bf16, hnn)?;
    if b * n * h == 0 {
        return Ok(());
    }
    let (ni, dhi, hi) = (as_i32("N", n)?, as_i32("Dh", dh)?, as_i32("H", h)?);
    let (ld_qkv, ld_out) = (as_i32("3·D", 3 * d)?, as_i32("D", d)?);
    let (sdh, snn) = (dh as i64, (n * n) as i64);
    let s = dev.stream();
    let zero = 0.0f32;
    for img in 0..b {
        let base = img * n * 3 * d;
        let q = qkv.slice(base..base + n * 3 * d);
        let k = qkv.slice(base + d..base + n * 3 * d);
        let v = qkv.slice(base + 2 * d..base + n * 3 * d);
        {
            let (pq, _gq) = q.device_ptr(s);
            let (pk, _gk) = k.device_ptr(s);
            let (ps, _gs) = scores.device_ptr_mut(s);
            // S_h = scale · Q_h K_hᵀ, laid out as in `forward_f32`, bf16 in and f32 out: cudarc's
            // safe wrapper ties C's type to A's, hence the raw call.
            // SAFETY: pointers into live buffers with the extents checked above; alpha/beta are
            // f32 as CUBLAS_COMPUTE_32F requires.
            unsafe {
                gemm_strided_batched_ex(
                    *dev.blas().handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    ni,
                    ni,
                    dhi,
                    (&scale) as *const f32 as *const _,
                    pk as *const _,
                    cudaDataType_t::CUDA_R_16BF,
                    ld_qkv,
                    sdh,
                    pq as *const _,
                    cudaDataType_t::CUDA_R_16BF,
                    ld_qkv,
                    sdh,
                    (&zero) as *const f32 as *const _,
                    ps as *mut _,
                    cudaDataType_t::CUDA_R_32F,
                    ni,
                    snn,
                    hi,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(cuda_err("cuBLAS attention QKᵀ (bf16 → f32)"))?;
        }
        if let Some(bias) = bias {
            elementwise::bias_add(dev, scores, bias, (1, hnn))?;
        }
        softmax::rows(dev, scores, probs, (h * n, n), 1.0)?;
        elementwise::cast(dev, probs, probs_bf16)?;
        let mut o = out.slice_mut(img * n * d..(img + 1) * n * d);
        let pv = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: dhi,
                n: ni,
                k: ni,
                alpha: half::bf16::ONE,
                lda: ld_qkv,
                ldb: ni,
                beta: half::bf16::ZERO,
                ldc: ld_out,
            },
            batch_size: hi,
            stride_a: sdh,
            stride_b: snn,
            stride_c: sdh,
        };
        // SAFETY: as in `forward_f32`, with bf16 elements.
        unsafe {
            dev.blas()
                .gemm_strided_batched(pv, &v, &*probs_bf16, &mut o)
        }
        .map_err(cuda_err("cuBLAS attention PV (bf16)"))?;
    }
    Ok(())
}

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
fn permute<T: Storage>(
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
fn at<T>(dev: &CudaDevice, s: &CudaSlice<T>, off: usize) -> u64 {
    ptr_or_null(dev.stream(), Some(s)) + (off * std::mem::size_of::<T>()) as u64
}

fn at_mut<T>(dev: &CudaDevice, s: &mut CudaSlice<T>, off: usize) -> u64 {
    ptr_mut_or_null(dev.stream(), Some(s)) + (off * std::mem::size_of::<T>()) as u64
}

/// Images per partial of the dbias sum: the CPU attention backward's IMAGES_PER_GROUP
/// (src/backend/cpu/attention.rs), so that dbias adds the images in the CPU's order.
const DBIAS_IMAGES: usize = 4;

/// Scratch of `backward_batched_with` for one (batch, dims, precision), made once and kept by a
/// training loop: head-major q, k, v (`qkvh`, 3·B·N·D) and dO (`doh`, B·N·D) in the GEMMs'
/// operand type, dP/dS (`ds`, B·H·N·N f32), the head-major dq, dk, dv (`dqkvh`, 3·B·N·D f32),
/// and for bf16 one B·H·N·N bf16 buffer that holds P, then dS, rounded for their GEMMs.
pub struct BackwardScratch<T> {
    qkvh: CudaSlice<T>,
    doh: CudaSlice<T>,
    ds: CudaSlice<f32>,
    dqkvh: CudaSlice<f32>,
    half: Option<CudaSlice<T>>,
    dims: (usize, usize, usize, usize),
}

impl<T: Storage> BackwardScratch<T> {
    pub fn new(dev: &CudaDevice, dims: &Dims) -> Result<BackwardScratch<T>> {
        f32_or_bf16::<T>("attention backward")?;
        let Dims { b, n, h, dh } = *dims;
        let (bnd, bhnn) = (b * n * h * dh, b * h * n * n);
        nonempty(
            &format!("attention backward (B = {b}, N = {n}, H = {h}, Dh = {dh})"),
            bnd,
        )?;
        Ok(BackwardScratch {
            qkvh: dev.empty::<T>(3 * bnd)?,
            doh: dev.empty::<T>(bnd)?,
            ds: dev.empty::<f32>(bhnn)?,
            dqkvh: dev.empty::<f32>(3 * bnd)?,
            half: (T::NAME != "f32")
                .then(|| dev.empty::<T>(bhnn))
                .transpose()?,
            dims: (b, n, h, dh),
        })
    }

    /// The dims this scratch was made for, as `Dims`.
    pub fn dims(&self) -> Dims {
        let (b, n, h, dh) = self.dims;
        Dims { b, n, h, dh }
    }
}

/// Gradients of the attention forward from its probabilities, for the whole batch:
/// qkv [B·N, 3·D] (T = f32 or bf16; q | k | v, head h at columns h·Dh of each), probs P
/// [B, H, N, N] f32 (from `forward_keep_probs_*`), dout [B·N, D] f32. Per (image b, head h):
///   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q,
/// returned as dqkv [B·N, 3·D] f32 in qkv's layout, and with `want_dbias` dbias [H, N, N] f32 =
/// Σ_b dS_b (groups of 4 images, then the groups, as the CPU adds them). Same math and layout as
/// `backend::cpu::attention::backward` (which uses scale = Dh^-1/2). Each product is ONE
/// strided-batched GEMM over the B·H heads (head-major copies of q, k, v and dO as in
/// `forward_batched_*`). bf16: the GEMM operands are bf16 (dO, P and dS rounded, as autocast
/// does) with f32 accumulation and f32 outputs; the softmax backward and dbias are f32
/// throughout. Makes its scratch for this call; a training loop keeps a `BackwardScratch` per
/// (batch, precision) and calls `backward_batched_with`.
pub fn backward_batched<T: Storage>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    probs: &CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    want_dbias: bool,
    dims: &Dims,
    scale: f32,
) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
    f32_or_bf16::<T>("attention backward")?;
    let Dims { b, n, h, dh } = *dims;
    let (bnd, bhnn) = (b * n * h * dh, b * h * n * n);
    // The buffers first, so a wrong length is named before the scratch's empty-shape refusal.
    check_len("attention backward qkv", qkv, 3 * bnd)?;
    check_len("attention backward probs", probs, bhnn)?;
    check_len("attention backward dout", dout, bnd)?;
    let mut ws = BackwardScratch::<T>::new(dev, dims)?;
    backward_batched_with(dev, qkv, probs, dout, want_dbias, dims, scale, &mut ws)
}

/// `backward_batched` with the caller's scratch (`BackwardScratch::new` for these dims): only the
/// returned dqkv and dbias are allocated.
#[allow(clippy::too_many_arguments)]
pub fn backward_batched_with<T: Storage>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    probs: &CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    want_dbias: bool,
    dims: &Dims,
    scale: f32,
    ws: &mut BackwardScratch<T>,
) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
    f32_or_bf16::<T>("attention backward")?;
    let Dims { b, n, h, dh } = *dims;
    let d = h * dh;
    let (bnd, nn, bh) = (b * n * d, n * n, b * h);
    check_len("attention backward qkv", qkv, 3 * bnd)?;
    check_len("attention backward probs", probs, bh * nn)?;
    check_len("attention backward dout", dout, bnd)?;
    if ws.dims != (b, n, h, dh) {
        let w = ws.dims();
        return Err(Error::Cuda(format!(
            "attention backward: scratch made for B = {}, N = {}, H = {}, Dh = {}, called with \
             B = {b}, N = {n}, H = {h}, Dh = {dh}",
            w.b, w.n, w.h, w.dh
        )));
    }
    nonempty(
        &format!("attention backward (B = {b}, N = {n}, H = {h}, Dh = {dh})"),
        bnd,
    )?;
    let (bi, ni, hi, di) = (
        as_i32("B", b)?,
        as_i32("N", n)?,
        as_i32("H", h)?,
        as_i32("Dh", dh)?,
    );
    as_i32("H·N·N", h * nn)?;
    let rows = (bh * n) as i64;
    let ty = data_type::<T>();
    let ndh = n * dh;
    let BackwardScratch {
        qkvh,
        doh,
        ds,
        dqkvh,
        half,
        ..
    } = ws;

    // Head-major q, k, v (as the forward) and dO, in the GEMMs' operand type.
    permute(dev, "split", qkv, qkvh, 3 * bnd, dims)?;
    let name = format!("attention_split_grad_{}", T::NAME);
    let f = dev.function("attention", &name)?;
    let one = 1i32;
    // SAFETY: dout holds B·N·D values, doh as many (S = 1 part).
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(bnd),
            [dout, &mut *doh, &one, &bi, &ni, &hi, &di]
        )
    }?;
    // P as the dV GEMM's operand: itself in f32, rounded to bf16 (into `half`) for a bf16 GEMM.
    let p_op = match half.as_mut() {
        Some(p) => {
            elementwise::cast(dev, probs, p)?;
            at(dev, p, 0)
        }
        None => at(dev, probs, 0),
    };
    let mat = |ptr, ty, ld, stride, trans| RowMajor {
        ptr,
        ty,
        ld,
        stride,
        trans,
    };
    let f32_ty = cudaDataType_t::CUDA_R_32F;
    let (q_op, k_op, v_op) = (at(dev, qkvh, 0), at(dev, qkvh, bnd), at(dev, qkvh, 2 * bnd));
    let do_op = at(dev, doh, 0);
    let ds_ptr = at_mut(dev, ds, 0);
    let (dq, dk, dv) = (
        at_mut(dev, dqkvh, 0),
        at_mut(dev, dqkvh, bnd),
        at_mut(dev, dqkvh, 2 * bnd),
    );
    // SAFETY (the four GEMMs): every operand is a batch of B·H row-major matrices inside its
    // buffer: [N, Dh] (stride N·Dh) in qkvh (3 blocks of B·N·D), doh and dqkvh; [N, N] (stride
    // N·N) in P, dS and `half`; the scratch was checked against these dims above.
    unsafe {
        gemm_rm(
            dev,
            "attention backward dV = Pᵀ·dO",
            (n, dh, n),
            1.0,
            mat(p_op, ty, n, nn, true),
            mat(do_op, ty, dh, ndh, false),
            0.0,
            (dv, dh, ndh),
            bh,
        )?;
        gemm_rm(
            dev,
            "attention backward dP = dO·Vᵀ",
            (n, n, dh),
            1.0,
            mat(do_op, ty, dh, ndh, false),
            mat(v_op, ty, dh, ndh, true),
            0.0,
            (ds_ptr, n, nn),
            bh,
        )?;
    }
    let f = dev.function("attention", "attention_softmax_bwd_f32")?;
    // SAFETY: probs and ds hold B·H·N rows of N.
    unsafe {
        launch!(
            dev,
            f,
            "attention_softmax_bwd_f32",
            dev.warp_per_row(bh * n),
            [probs, &mut *ds, &rows, &ni]
        )
    }?;
    let dbias = if want_dbias {
        // Σ_b dS_b: dS read as [B, H·N·N] and summed by the column-sum kernels in the CPU's
        // image groups.
        let mut dbias = dev.empty::<f32>(h * nn)?;
        elementwise::column_sums_into(dev, ds, None, DBIAS_IMAGES, &mut dbias, false, (b, h * nn))?;
        Some(dbias)
    } else {
        None
    };
    // dS as the dQ/dK GEMMs' operand: itself in f32, rounded to bf16 (over P's copy) for bf16.
    let (ds_op, ds_ty) = match half.as_mut() {
        Some(p) => {
            elementwise::cast(dev, ds, p)?;
            (at(dev, p, 0), ty)
        }
        None => (ds_ptr, f32_ty),
    };
    // SAFETY: as above.
    unsafe {
        gemm_rm(
            dev,
            "attention backward dQ = s·dS·K",
            (n, dh, n),
            scale,
            mat(ds_op, ds_ty, n, nn, false),
            mat(k_op, ty, dh, ndh, false),
            0.0,
            (dq, dh, ndh),
            bh,
        )?;
        gemm_rm(
            dev,
            "attention backward dK = s·dSᵀ·Q",
            (n, dh, n),
            scale,
            mat(ds_op, ds_ty, n, nn, true),
            mat(q_op, ty, dh, ndh, false),
            0.0,
            (dk, dh, ndh),
            bh,
        )?;
    }
    let mut dqkv = dev.empty::<f32>(3 * bnd)?;
    let three = 3i32;
    let f = dev.function("attention", "attention_merge_grad_f32")?;
    // SAFETY: dqkvh and dqkv hold 3·B·N·D values.
    unsafe {
        launch!(
            dev,
            f,
            "attention_merge_grad_f32",
            dev.grid_stride(3 * bnd),
            [&*dqkvh, &mut dqkv, &three, &bi, &ni, &hi, &di]
        )
    }?;
    Ok((dqkv, dbias))
}

/// BEiT's relative-position index [N·N] (table row of each (query i, key j) pair, i·N + j) turned
/// around once per model and uploaded: for each of the `rows` table rows, the ascending list of
/// pairs that read it (CSR: offsets [rows + 1], positions [N·N]). `grad` then sums the dense bias
/// gradient into the table gradient with one thread per output and no atomics.
pub struct RelposScatter {
    offsets: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    rows: usize,
    nn: usize,
}

impl RelposScatter {
    /// `index` [N·N] of table rows < `rows` (model/relpos.rs relative_position_index), N tokens.
    pub fn new(dev: &CudaDevice, index: &[usize], rows: usize, n: usize) -> Result<RelposScatter> {
        let nn = n * n;
        if index.len() != nn {
            return Err(Error::Cuda(format!(
                "relpos scatter: index holds {} entries, N = {n} tokens need {nn}",
                index.len()
            )));
        }
        as_i32("N·N", nn)?;
        as_i32("table rows", rows)?;
        if let Some((p, &ix)) = index.iter().enumerate().find(|(_, &ix)| ix >= rows) {
            return Err(Error::Cuda(format!(
                "relpos scatter: index[{p}] = {ix} is past the table's {rows} rows"
            )));
        }
        // Each table row's pairs in ascending order: the order in which the CPU's scatter adds.
        let (offsets, positions) = elementwise::csr_inverse(index, rows);
        Ok(RelposScatter {
            offsets: dev.upload(&offsets)?,
            positions: dev.upload(&positions)?,
            rows,
            nn,
        })
    }

    /// dtable [rows, H] (f32), dtable[r, h] = Σ over the pairs p of row r of dbias[h, p]: the table
    /// gradient of `model::relpos::scatter_bias_grad` from dbias [H, N, N] (f32), in its order.
    pub fn grad(
        &self,
        dev: &CudaDevice,
        dbias: &CudaSlice<f32>,
        h: usize,
    ) -> Result<CudaSlice<f32>> {
        check_len("relpos dbias", dbias, h * self.nn)?;
        let total = self.rows * h;
        as_i32("H", h)?;
        as_i32("rows·H", total)?;
        nonempty(
            &format!("relpos table gradient ({} rows, H = {h})", self.rows),
            total,
        )?;
        let mut dtable = dev.empty::<f32>(total)?;
        // SAFETY: every position is < N·N (checked in `new`) and h < H, so h·N·N + position lies
        // inside dbias [H, N·N]; dtable holds rows·H.
        unsafe {
            elementwise::csr_sum(
                dev,
                dbias,
                &self.offsets,
                &self.positions,
                &mut dtable,
                (self.rows, h),
                (1, self.nn as i64),
            )
        }?;
        Ok(dtable)
    }
}

/// The relative-position table gradient [rows, H] from dbias [H, N, N] and the index [N·N]: a
/// one-off `RelposScatter::new(..).grad(..)` (a training loop keeps the `RelposScatter`).
pub fn relpos_table_grad(
    dev: &CudaDevice,
    dbias: &CudaSlice<f32>,
    index: &[usize],
    rows: usize,
    h: usize,
) -> Result<CudaSlice<f32>> {
    let n = (index.len() as f64).sqrt().round() as usize;
    RelposScatter::new(dev, index, rows, n)?.grad(dev, dbias, h)
}
