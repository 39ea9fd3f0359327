//! The cuBLAS attention over one strided batch of heads, shared by the per-image forward
//! (`forward_gemm`: one image's heads in place in qkv) and the whole-batch one (`forward_batched`:
//! every image's heads split head-major first): S = scale·Q Kᵀ into f32, the bias add and the
//! softmax in f32, then O = P V in the storage precision. Only the two GEMMs differ between f32
//! and bf16; `AttentionGemms` holds them, so the sequence around them is written once.

use cudarc::cublas::sys::{cublasOperation_t, cudaDataType_t};
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::Dims;
use crate::backend::cuda::device::{as_i32, check_len, cuda_err, CudaDevice};
use crate::backend::cuda::{elementwise, softmax, Storage};
use crate::error::{Error, Result};

/// Where the heads of one strided batch sit: each head of q, k and v an [N, Dh] matrix with rows
/// `ld` elements apart, each head of the output one with rows `ld_out` apart, and consecutive
/// heads `stride` apart in all four. One image in place in qkv [N, 3·D] and out [N, D]:
/// (3·D, D, Dh); the batch split head-major: (Dh, Dh, N·Dh).
#[derive(Clone, Copy, Debug)]
pub(super) struct HeadLayout {
    pub ld: usize,
    pub ld_out: usize,
    pub stride: usize,
}

/// The two GEMMs of the cuBLAS attention at one storage precision, as cuBLAS is called for it:
/// f32 operands through sgemm; bf16 ones through GemmEx with f32 accumulation, P rounded to bf16
/// first (as autocast does). `what` names the caller in the error.
pub trait AttentionGemms: Storage {
    /// scores (f32) = the QKᵀ product `cfg` with A = k, B = q.
    ///
    /// # Safety
    /// Every matrix of `cfg` lies inside k, q and scores.
    unsafe fn qk_gemm(
        dev: &CudaDevice,
        cfg: &StridedBatchedConfig<f32>,
        k: &CudaView<Self>,
        q: &CudaView<Self>,
        scores: &mut CudaSlice<f32>,
        what: &str,
    ) -> Result<()>;

    /// out = the P·V product `cfg` with A = v and B = P, P from the f32 `probs`: as is at f32,
    /// rounded into `rounded` (as long as `probs`) at bf16.
    ///
    /// # Safety
    /// Every matrix of `cfg` lies inside v, probs (and rounded) and out.
    unsafe fn pv_gemm(
        dev: &CudaDevice,
        cfg: &StridedBatchedConfig<f32>,
        v: &CudaView<Self>,
        probs: &CudaSlice<f32>,
        rounded: Option<&mut CudaSlice<Self>>,
        out: &mut CudaViewMut<Self>,
        what: &str,
    ) -> Result<()>;
}

impl AttentionGemms for f32 {
    unsafe fn qk_gemm(
        dev: &CudaDevice,
        cfg: &StridedBatchedConfig<f32>,
        k: &CudaView<f32>,
        q: &CudaView<f32>,
        scores: &mut CudaSlice<f32>,
        what: &str,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { dev.blas().gemm_strided_batched(*cfg, k, q, scores) }
            .map_err(cuda_err(format!("{what} QKᵀ")))
    }

    unsafe fn pv_gemm(
        dev: &CudaDevice,
        cfg: &StridedBatchedConfig<f32>,
        v: &CudaView<f32>,
        probs: &CudaSlice<f32>,
        _rounded: Option<&mut CudaSlice<f32>>,
        out: &mut CudaViewMut<f32>,
        what: &str,
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { dev.blas().gemm_strided_batched(*cfg, v, probs, out) }
            .map_err(cuda_err(format!("{what} PV")))
    }
}

impl AttentionGemms for half::bf16 {
    unsafe fn qk_gemm(
        dev: &CudaDevice,
        cfg: &StridedBatchedConfig<f32>,
        k: &CudaView<half::bf16>,
        q: &CudaView<half::bf16>,
        scores: &mut CudaSlice<f32>,
        what: &str,
    ) -> Result<()> {
        let s = dev.stream();
        let (pk, _gk) = k.device_ptr(s);
        let (pq, _gq) = q.device_ptr(s);
        let (ps, _gs) = scores.device_ptr_mut(s);
        // SAFETY: the caller's contract.
        unsafe { gemm_ex_bf16(dev, cfg, pk, pq, (ps, cudaDataType_t::CUDA_R_32F)) }
            .map_err(cuda_err(format!("{what} QKᵀ (bf16 → f32)")))
    }

    unsafe fn pv_gemm(
        dev: &CudaDevice,
        cfg: &StridedBatchedConfig<f32>,
        v: &CudaView<half::bf16>,
        probs: &CudaSlice<f32>,
        rounded: Option<&mut CudaSlice<half::bf16>>,
        out: &mut CudaViewMut<half::bf16>,
        what: &str,
    ) -> Result<()> {
        let p = rounded.ok_or_else(no_rounded_probs)?;
        elementwise::cast(dev, probs, p)?;
        let s = dev.stream();
        let (pv, _gv) = v.device_ptr(s);
        let (pp, _gp) = p.device_ptr(s);
        let (po, _go) = out.device_ptr_mut(s);
        // SAFETY: the caller's contract; `p` is as long as `probs`.
        unsafe { gemm_ex_bf16(dev, cfg, pv, pp, (po, cudaDataType_t::CUDA_R_16BF)) }
            .map_err(cuda_err(format!("{what} PV (bf16)")))
    }
}

fn no_rounded_probs() -> Error {
    Error::Cuda("attention: the bf16 scratch has no bf16 probabilities".into())
}

/// Checks the buffer that holds P rounded for the P·V GEMM: `len` elements at bf16, none needed
/// (and any ignored) at f32.
pub(super) fn check_rounded<T: Storage>(rounded: Option<&CudaSlice<T>>, len: usize) -> Result<()> {
    match rounded {
        Some(p) => check_len("attention probs bf16", p, len),
        None if T::NAME != "f32" => Err(no_rounded_probs()),
        None => Ok(()),
    }
}

/// `cfg` on bf16 A and B into C of type `c_ty`, through GemmEx with f32 accumulation: the one call
/// that writes bf16 products to f32 (cudarc's safe wrapper ties C's type to A's, hence the raw
/// call); for bf16 C it is the call cudarc's own bf16 GEMM makes.
///
/// # Safety
/// Every matrix of `cfg` lies inside the live buffers at a, b and c.
unsafe fn gemm_ex_bf16(
    dev: &CudaDevice,
    cfg: &StridedBatchedConfig<f32>,
    a: u64,
    b: u64,
    (c, c_ty): (u64, cudaDataType_t),
) -> std::result::Result<(), cudarc::cublas::result::CublasError> {
    use cudarc::cublas::result::gemm_strided_batched_ex;
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t};
    let g = &cfg.gemm;
    // SAFETY: the caller's contract; alpha and beta are f32 as CUBLAS_COMPUTE_32F requires.
    unsafe {
        gemm_strided_batched_ex(
            *dev.blas().handle(),
            g.transa,
            g.transb,
            g.m,
            g.n,
            g.k,
            (&g.alpha) as *const f32 as *const _,
            a as *const _,
            cudaDataType_t::CUDA_R_16BF,
            g.lda,
            cfg.stride_a,
            b as *const _,
            cudaDataType_t::CUDA_R_16BF,
            g.ldb,
            cfg.stride_b,
            (&g.beta) as *const f32 as *const _,
            c as *mut _,
            c_ty,
            g.ldc,
            cfg.stride_c,
            cfg.batch_size,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
}

/// A strided batch of `batch` column-major products C_i = alpha·op(A_i)·B_i (m×n, inner k), each
/// operand given as (leading dimension, batch stride) in elements; beta = 0.
fn strided(
    trans_a: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (lda, stride_a): (usize, usize),
    (ldb, stride_b): (usize, usize),
    (ldc, stride_c): (usize, usize),
    batch: usize,
) -> Result<StridedBatchedConfig<f32>> {
    Ok(StridedBatchedConfig {
        gemm: GemmConfig {
            transa: if trans_a {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            },
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: as_i32("attention GEMM m", m)?,
            n: as_i32("attention GEMM n", n)?,
            k: as_i32("attention GEMM k", k)?,
            alpha,
            lda: as_i32("attention GEMM lda", lda)?,
            ldb: as_i32("attention GEMM ldb", ldb)?,
            beta: 0.0,
            ldc: as_i32("attention GEMM ldc", ldc)?,
        },
        batch_size: as_i32("attention heads", batch)?,
        stride_a: stride_a as i64,
        stride_b: stride_b as i64,
        stride_c: stride_c as i64,
    })
}

/// O_i = softmax(scale·Q_i K_iᵀ + bias)·V_i for the B·H heads laid out as `at` (B = dims.b images,
/// the bias [H, N, N] added to each), the scores and probabilities going through `scores` and
/// `probs` (f32, B·H·N·N each) and, at bf16, P rounded through `rounded`. `what` names the
/// caller in a cuBLAS error.
///
/// # Safety
/// q, k, v and out hold every head of `at`; the callers check the scratch against B·H·N·N.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attend<T: AttentionGemms>(
    dev: &CudaDevice,
    what: &str,
    (q, k, v): (CudaView<T>, CudaView<T>, CudaView<T>),
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaViewMut<T>,
    dims: &Dims,
    at: HeadLayout,
    scale: f32,
    (scores, probs, rounded): (
        &mut CudaSlice<f32>,
        &mut CudaSlice<f32>,
        Option<&mut CudaSlice<T>>,
    ),
) -> Result<()> {
    let Dims { b, n, h, dh } = *dims;
    let (heads, nn) = (b * h, n * n);
    // S_i[N, N] = scale · Q_i K_iᵀ: the nn.Linear layout again (K_i plays the weight).
    let qk = strided(
        true,
        (n, n, dh),
        scale,
        (at.ld, at.stride),
        (at.ld, at.stride),
        (n, nn),
        heads,
    )?;
    // SAFETY: the caller's contract.
    unsafe { T::qk_gemm(dev, &qk, &k, &q, scores, what) }?;
    if let Some(bias) = bias {
        elementwise::bias_add(dev, scores, bias, (b, h * nn))?;
    }
    softmax::rows(dev, scores, probs, (heads * n, n), 1.0)?;
    // O_i[N, Dh] = P_i[N, N] · V_i[N, Dh], written where `at` puts head i of the output.
    let pv = strided(
        false,
        (dh, n, n),
        1.0,
        (at.ld, at.stride),
        (n, nn),
        (at.ld_out, at.stride),
        heads,
    )?;
    // SAFETY: the caller's contract.
    unsafe { T::pv_gemm(dev, &pv, &v, probs, rounded, out, what) }
}
