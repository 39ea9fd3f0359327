//! nn.Linear on cuBLAS: y[M, N] = act(x[M, K] · w[N, K]ᵀ + b[N]), the weight read in place in its
//! PyTorch layout, as `backend::linear`. f32 runs cublasSgemm (default math mode: no TF32, so it
//! is comparable with the CPU at f32 tolerance); bf16 runs cublasGemmEx with bf16 inputs and
//! output and f32 accumulation (CUBLAS_COMPUTE_32F). The bias and GELU are a second pass
//! (kernels/elementwise.cu), since a plain GEMM has no epilogue (`lt` puts the bias of a linear
//! without activation in cuBLASLt's epilogue instead; the model forward uses it where it can).
//!
//! cuBLAS is column-major. A row-major [R, C] matrix is the column-major [C, R] one, so
//! y[M, N] row-major = yᵀ [N, M] column-major = w·xᵀ with w taken transposed (column-major
//! [K, N] read as its transpose) and x as is (column-major [K, M]).
//!
//! The backward (`linear_backward`, for training) runs its GEMMs through `gemm_rm`, which states
//! every product in row-major terms and always writes f32 (the gradients stay f32 whatever the
//! storage), and the bias gradient through `elementwise::sum_rows_into` (the CPU's fixed-order
//! column sums, bit for bit).

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;

pub(crate) use cudarc::cublas::sys::cudaDataType_t;

use super::device::{as_i32, check_len, cuda_err, f32_or_bf16, nonempty, CudaDevice};
use super::{elementwise, ptr_mut_or_null, ptr_or_null, Storage};
use crate::backend::Activation;
use crate::error::Result;

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
    f32_or_bf16::<T>("linear")?;
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

/// The cuBLAS element type of a storage type (f32 or bf16; f16 is refused by the callers).
pub(crate) fn data_type<T: Storage>() -> cudaDataType_t {
    match T::NAME {
        "bf16" => cudaDataType_t::CUDA_R_16BF,
        "f16" => cudaDataType_t::CUDA_R_16F,
        _ => cudaDataType_t::CUDA_R_32F,
    }
}

/// One operand of `gemm_rm`: a row-major matrix on the device (its raw address, element type and
/// row stride `ld` in elements), or a strided batch of them (`stride` elements apart), used as is
/// or transposed (`trans`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowMajor {
    pub ptr: u64,
    pub ty: cudaDataType_t,
    pub ld: usize,
    pub stride: usize,
    pub trans: bool,
}

/// C[m, n] = alpha·op(A)[m, k]·op(B)[k, n] + beta·C, all row-major, C f32 (row stride `ldc`,
/// batch stride `stride_c`), over `batch` matrices; A and B f32 or bf16 (then multiplied in f32:
/// CUBLAS_COMPUTE_32F, as autocast's bf16 GEMMs). In cuBLAS's column-major terms this is
/// Cᵀ = op(B)ᵀ·op(A)ᵀ, so B goes first and each transpose flag stays with its operand: a row-major
/// [r, c] buffer is the column-major [c, r] one.
///
/// # Safety
/// Every operand's batch of matrices lies inside its live allocation (the callers check lengths).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rm(
    dev: &CudaDevice,
    what: &str,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: RowMajor,
    b: RowMajor,
    beta: f32,
    (c, ldc, stride_c): (u64, usize, usize),
    batch: usize,
) -> Result<()> {
    use cudarc::cublas::result::gemm_strided_batched_ex;
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (mi, ni, ki) = (as_i32("M", m)?, as_i32("N", n)?, as_i32("K", k)?);
    let (lda, ldb, ldci) = (
        as_i32("lda", a.ld)?,
        as_i32("ldb", b.ld)?,
        as_i32("ldc", ldc)?,
    );
    let bi = as_i32("batch", batch)?;
    // SAFETY: the caller's contract; alpha and beta are f32 as CUBLAS_COMPUTE_32F requires.
    unsafe {
        gemm_strided_batched_ex(
            *dev.blas().handle(),
            op(b.trans),
            op(a.trans),
            ni,
            mi,
            ki,
            (&alpha) as *const f32 as *const _,
            b.ptr as *const _,
            b.ty,
            ldb,
            b.stride as i64,
            a.ptr as *const _,
            a.ty,
            lda,
            a.stride as i64,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            cudaDataType_t::CUDA_R_32F,
            ldci,
            stride_c as i64,
            bi,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(cuda_err(format!(
        "cuBLAS {what} ({m}x{n}x{k}, batch {batch})"
    )))
}

/// (dx [M, K], dw [N, K], db [N] when asked), all f32: what `linear_backward` returns.
pub type LinearGrads = (CudaSlice<f32>, CudaSlice<f32>, Option<CudaSlice<f32>>);

/// Gradients of `linear` (y = x·wᵀ + b) from dy [M, N] (f32), with x [M, K] and w [N, K] in T:
///   dx [M, K] = dy·w,   dw [N, K] = dyᵀ·x,   db [N] = Σ_i dy[i, :]   (all f32).
/// f32: the GEMMs in f32 (sgemm semantics). bf16: dy is rounded to bf16 (as autocast feeds a bf16
/// GEMM) and the GEMMs take bf16 operands with f32 accumulation and f32 output. db sums the f32 dy
/// in the CPU's fixed order (`elementwise::sum_rows_into`): the CPU's bits, on every run.
pub fn linear_backward<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    dy: &CudaSlice<f32>,
    want_db: bool,
    dims: (usize, usize, usize),
) -> Result<LinearGrads> {
    let (m, k, n) = dims;
    nonempty(
        &format!("linear backward (M = {m}, K = {k}, N = {n})"),
        m * k * n,
    )?;
    let mut dx = dev.empty::<f32>(m * k)?;
    let mut dw = dev.empty::<f32>(n * k)?;
    let mut db = want_db.then(|| dev.empty::<f32>(n)).transpose()?;
    linear_backward_into(
        dev,
        x,
        w,
        dy,
        Some(&mut dx),
        &mut dw,
        db.as_mut(),
        false,
        dims,
    )?;
    Ok((dx, dw, db))
}

/// `linear_backward` into given buffers: dx [M, K] (skipped when None, e.g. for a first layer whose
/// input needs no gradient), dw [N, K], db [N] (skipped when None). With `accumulate` the
/// gradients are added to what the buffers hold (GEMM beta = 1), so a weight used twice, or a
/// gradient accumulated over micro-batches, needs no extra pass; otherwise they are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_into<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    dy: &CudaSlice<f32>,
    dx: Option<&mut CudaSlice<f32>>,
    dw: &mut CudaSlice<f32>,
    db: Option<&mut CudaSlice<f32>>,
    accumulate: bool,
    (m, k, n): (usize, usize, usize),
) -> Result<()> {
    f32_or_bf16::<T>("linear backward")?;
    check_len("linear backward x", x, m * k)?;
    check_len("linear backward weight", w, n * k)?;
    check_len("linear backward dy", dy, m * n)?;
    check_len("linear backward dw", dw, n * k)?;
    if let Some(dx) = &dx {
        check_len("linear backward dx", dx, m * k)?;
    }
    if let Some(db) = &db {
        check_len("linear backward db", db, n)?;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    let s = dev.stream();
    // The GEMM operand dy: as given for f32, rounded to bf16 for a bf16 GEMM.
    let dy_half = if T::NAME == "f32" || m * n == 0 {
        None
    } else {
        let mut h = dev.empty::<T>(m * n)?;
        elementwise::cast(dev, dy, &mut h)?;
        Some(h)
    };
    let (pdy, ty) = match &dy_half {
        Some(h) => (ptr_or_null(s, Some(h)), data_type::<T>()),
        None => (ptr_or_null(s, Some(dy)), cudaDataType_t::CUDA_R_32F),
    };
    let rm = |ptr, ty, ld, trans| RowMajor {
        ptr,
        ty,
        ld,
        stride: 0,
        trans,
    };
    let (px, pw) = (ptr_or_null(s, Some(x)), ptr_or_null(s, Some(w)));
    if let Some(dx) = dx {
        if m * k > 0 {
            if n == 0 {
                // A GEMM over an empty inner dim: the gradient is 0 (cuBLAS may skip the write).
                if !accumulate {
                    s.memset_zeros(dx).map_err(cuda_err("zero linear dx"))?;
                }
            } else {
                let pdx = ptr_mut_or_null(s, Some(dx));
                // dx[M, K] = dy[M, N] · w[N, K]
                // SAFETY: dy is [M, N], w [N, K], dx [M, K], all checked above.
                unsafe {
                    gemm_rm(
                        dev,
                        "linear backward dx = dy·w",
                        (m, k, n),
                        1.0,
                        rm(pdy, ty, n.max(1), false),
                        rm(pw, data_type::<T>(), k.max(1), false),
                        beta,
                        (pdx, k.max(1), 0),
                        1,
                    )
                }?;
            }
        }
    }
    if n * k > 0 {
        if m == 0 {
            if !accumulate {
                s.memset_zeros(dw).map_err(cuda_err("zero linear dw"))?;
            }
        } else {
            let pdw = ptr_mut_or_null(s, Some(dw));
            // dw[N, K] = dy[M, N]ᵀ · x[M, K]
            // SAFETY: as above; dw is [N, K].
            unsafe {
                gemm_rm(
                    dev,
                    "linear backward dw = dyᵀ·x",
                    (n, k, m),
                    1.0,
                    rm(pdy, ty, n.max(1), true),
                    rm(px, data_type::<T>(), k.max(1), false),
                    beta,
                    (pdw, k.max(1), 0),
                    1,
                )
            }?;
        }
    }
    if let Some(db) = db {
        elementwise::sum_rows_into(dev, dy, db, accumulate, (m, n))?;
    }
    Ok(())
}
