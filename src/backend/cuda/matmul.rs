//! nn.Linear on cuBLAS: y[M, N] = act(x[M, K] · w[N, K]ᵀ + b[N]), the weight read in place in its
//! PyTorch layout, as `backend::linear`. f32 runs cublasSgemm (default math mode: no TF32, so it
//! is comparable with the CPU at f32 tolerance); bf16 runs cublasGemmEx with bf16 inputs and
//! output and f32 accumulation (CUBLAS_COMPUTE_32F). The bias and GELU are a second pass
//! (kernels/elementwise.cu), since a plain GEMM has no epilogue.
//!
//! cuBLAS is column-major. A row-major [R, C] matrix is the column-major [C, R] one, so
//! y[M, N] row-major = yᵀ [N, M] column-major = w·xᵀ with w taken transposed (column-major
//! [K, N] read as its transpose) and x as is (column-major [K, M]).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;

use super::device::{as_i32, check_len, cuda_err, CudaDevice};
use super::{elementwise, Storage};
use crate::backend::Activation;
use crate::error::{Error, Result};

/// out[M, N] = x[M, K] · w[N, K]ᵀ (no bias): also the cross term q·tᵀ of squared distances.
pub fn matmul_nt<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    out: &mut CudaSlice<T>,
    (m, k, n): (usize, usize, usize),
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    check_len("matmul x", x, m * k)?;
    check_len("matmul weight", w, n * k)?;
    check_len("matmul out", out, m * n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // cuBLAS would leave out untouched with beta = 0 and k = 0 on some versions; be explicit.
        return dev
            .stream()
            .memset_zeros(out)
            .map_err(cuda_err("zero matmul output"));
    }
    let (mi, ki, ni) = (as_i32("M", m)?, as_i32("K", k)?, as_i32("N", n)?);
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: ni,
        n: mi,
        k: ki,
        alpha: T::from_f32(1.0),
        lda: ki,
        ldb: ki,
        beta: T::from_f32(0.0),
        ldc: ni,
    };
    // SAFETY: w is [N, K] (lda K), x [M, K] (ldb K), out [M, N] (ldc N), all checked above.
    unsafe { dev.blas().gemm(cfg, w, x, out) }
        .map_err(cuda_err(format!("cuBLAS {} gemm {m}x{k}x{n}", T::NAME)))
}

/// y[M, N] = act(x[M, K] · w[N, K]ᵀ + b[N]); f32 or bf16 storage, the bias f32.
#[allow(clippy::too_many_arguments)]
pub fn linear<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    act: Activation,
    out: &mut CudaSlice<T>,
    (m, k, n): (usize, usize, usize),
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    if T::NAME == "f16" {
        return Err(Error::Cuda("linear: f32 or bf16 only".into()));
    }
    if let Some(b) = bias {
        check_len("linear bias", b, n)?;
    }
    matmul_nt(dev, x, w, out, (m, k, n))?;
    match (bias, act) {
        (None, Activation::None) => Ok(()),
        (Some(b), Activation::None) => elementwise::bias_add(dev, out, b, (m, n)),
        (b, Activation::Gelu) => elementwise::bias_gelu(dev, out, b, (m, n)),
    }
}
