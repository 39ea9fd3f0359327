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
//!
//! This file holds the per-image forwards (the fused kernel, cuBLAS f32 and bf16); `batched` the
//! whole-batch forwards and their keep-probabilities variants, `backward` the training backward
//! and the relative-position table gradient. All are re-exported here.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, cuda_err, CudaDevice};
use super::{elementwise, ptr_or_null, softmax, Storage};
use crate::error::{Error, Result};

mod backward;
mod batched;

pub use backward::{
    backward_batched, backward_batched_with, relpos_table_grad, BackwardScratch, RelposScatter,
};
pub use batched::{
    forward_batched_bf16, forward_batched_f32, forward_keep_probs_bf16,
    forward_keep_probs_bf16_into, forward_keep_probs_f32, forward_keep_probs_f32_into,
    BatchedScratch,
};

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
