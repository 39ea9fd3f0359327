//! nn.Linear without activation on cuBLASLt, the bias in the GEMM's epilogue:
//!   y[M, N] = x[M, K] · w[N, K]ᵀ + b[N]
//! in one pass, where `matmul::linear` takes two (the GEMM, then `bias_add` over y). f32: f32
//! operands and output, CUBLAS_COMPUTE_32F (no TF32); bf16: bf16 operands and output with f32
//! accumulation. The bias stays f32 (CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = CUDA_R_32F): the f32
//! accumulator plus the f32 bias is rounded to T once.
//!
//! Layouts are cuBLAS's column-major ones, as in `matmul`: y row-major [M, N] is D = yᵀ
//! column-major [N, M] = op(A)·op(B) with A = w (stored column-major [K, N], ld K, transposed)
//! and B = x (column-major [K, M], ld K). The bias has one entry per row of D, that is per
//! output feature, as CUBLASLT_EPILOGUE_BIAS adds it.
//!
//! The heuristic's choice is kept per (M, K, N, T). Where cuBLASLt has no algorithm for a shape
//! (`linear_bias` returns Ok(false)) the caller runs `matmul::linear` instead. cuBLASLt's GELU
//! epilogue is the tanh approximation, not timm's exact GELU: fc1 keeps its GEMM and
//! `bias_gelu` pass.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::cublaslt::sys::{cublasComputeType_t, cudaDataType_t};
use cudarc::driver::CudaSlice;

use super::device::{check_len, cuda_err, f32_or_bf16, CudaDevice};
use super::{ptr_mut_or_null, ptr_or_null, Storage};
use crate::error::{Error, Result};

/// cuBLASLt's recommended workspace: 32 MiB on Hopper and later, 4 MiB before.
fn workspace_bytes(capability: (i32, i32)) -> usize {
    if capability.0 >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// A cuBLASLt handle, its workspace and the algorithms chosen so far.
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algos: HashMap<(usize, usize, usize, &'static str), Option<sys::cublasLtMatmulAlgo_t>>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle came from cublasLtCreate and is destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Destroys a cuBLASLt descriptor when it goes out of scope.
struct Guard<H: Copy>(H, unsafe fn(H) -> std::result::Result<(), lt::CublasError>);

impl<H: Copy> Drop for Guard<H> {
    fn drop(&mut self) {
        // SAFETY: each guard owns a descriptor created just before it and destroyed once.
        let _ = unsafe { (self.1)(self.0) };
    }
}

/// Sets one attribute of a matmul descriptor from a plain value.
///
/// # Safety
/// `V` is the attribute's documented type.
unsafe fn set_desc<V>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &V,
) -> Result<()> {
    // SAFETY: v is a live value of size_of::<V>() bytes.
    unsafe {
        lt::set_matmul_desc_attribute(desc, attr, (v as *const V).cast::<c_void>(), size_of::<V>())
    }
    .map_err(cuda_err(format!("cuBLASLt matmul attribute {attr:?}")))
}

impl Lt {
    /// A handle on `dev` and its workspace (`workspace_size` bytes, allocated once).
    pub fn new(dev: &CudaDevice) -> Result<Lt> {
        // SAFETY: a presence check only; cudarc would panic on a missing library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda(
                "libcublasLt.so.13 not found: put its directory on LD_LIBRARY_PATH".into(),
            ));
        }
        let handle = lt::create_handle().map_err(cuda_err("cublasLtCreate"))?;
        let workspace = dev.zeros::<u8>(workspace_bytes(dev.capability()));
        let workspace = match workspace {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: the handle was just created and is not used again.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e);
            }
        };
        Ok(Lt {
            handle,
            workspace,
            algos: HashMap::new(),
        })
    }

    /// Bytes of device memory the workspace holds.
    pub fn workspace_size(&self) -> usize {
        self.workspace.len()
    }

    /// y[M, N] = x[M, K]·w[N, K]ᵀ + b[N] in one cuBLASLt call; Ok(false), with y untouched, where
    /// cuBLASLt has no algorithm for this shape and type.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_bias<T: Storage>(
        &mut self,
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: &CudaSlice<f32>,
        out: &mut CudaSlice<T>,
        (m, k, n): (usize, usize, usize),
    ) -> Result<bool> {
        f32_or_bf16::<T>("cuBLASLt linear")?;
        check_len("linear x", x, m * k)?;
        check_len("linear weight", w, n * k)?;
        check_len("linear bias", bias, n)?;
        check_len("linear out", out, m * n)?;
        if m == 0 || n == 0 || k == 0 {
            return Ok(false);
        }
        let ty = match T::NAME {
            "bf16" => cudaDataType_t::CUDA_R_16BF,
            _ => cudaDataType_t::CUDA_R_32F,
        };
        let desc = lt::create_matmul_desc(
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudaDataType_t::CUDA_R_32F,
        )
        .map_err(cuda_err("cublasLtMatmulDescCreate"))?;
        let _desc = Guard(desc, lt::destroy_matmul_desc);
        let s = dev.stream();
        let pb = ptr_or_null(s, Some(bias));
        // SAFETY: each value has its attribute's documented type (cublasOperation_t,
        // cublasLtEpilogue_t, a device pointer, cudaDataType_t).
        unsafe {
            use sys::cublasLtMatmulDescAttributes_t as A;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
            set_desc(
                desc,
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &pb)?;
            set_desc(
                desc,
                A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &cudaDataType_t::CUDA_R_32F,
            )?;
        }
        let layout = |rows: usize, cols: usize, ld: usize| {
            let l = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
                .map_err(cuda_err("cublasLtMatrixLayoutCreate"))?;
            Ok::<_, Error>(Guard(l, lt::destroy_matrix_layout))
        };
        // A = w: column-major [K, N]; B = x: [K, M]; C = D = yᵀ: [N, M].
        let (a, b, c) = (layout(k, n, k)?, layout(k, m, k)?, layout(n, m, n)?);
        let key = (m, k, n, T::NAME);
        if !self.algos.contains_key(&key) {
            let pref =
                lt::create_matmul_pref().map_err(cuda_err("cublasLtMatmulPreferenceCreate"))?;
            let _pref = Guard(pref, lt::destroy_matmul_pref);
            let max = self.workspace.len();
            // SAFETY: MAX_WORKSPACE_BYTES is a uint64_t.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&(max as u64) as *const u64).cast(),
                    size_of::<u64>(),
                )
            }
            .map_err(cuda_err("cuBLASLt workspace preference"))?;
            // SAFETY: every descriptor is live; the query writes one result.
            let found = unsafe {
                lt::get_matmul_algo_heuristic(self.handle, desc, a.0, b.0, c.0, c.0, pref)
            };
            let algo = match found {
                Ok(h) if h.workspaceSize <= max => Some(h.algo),
                Ok(_) => None,
                Err(e)
                    if e.0
                        == cudarc::cublaslt::sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED =>
                {
                    None
                }
                Err(e) => {
                    return Err(Error::Cuda(format!(
                        "cuBLASLt heuristic ({m}x{k}x{n} {}): {e:?}",
                        T::NAME
                    )))
                }
            };
            self.algos.insert(key, algo);
        }
        let Some(algo) = self.algos[&key] else {
            return Ok(false);
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (px, pw) = (ptr_or_null(s, Some(x)), ptr_or_null(s, Some(w)));
        let py = ptr_mut_or_null(s, Some(out));
        let pws = ptr_mut_or_null(s, Some(&mut self.workspace));
        // SAFETY: w is [N, K], x [M, K], out [M, N] and bias [N], all checked above; beta = 0,
        // so C (out) is not read; the workspace is the handle's own.
        unsafe {
            lt::matmul(
                self.handle,
                desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                pw as *const c_void,
                a.0,
                px as *const c_void,
                b.0,
                py as *const c_void,
                c.0,
                py as *mut c_void,
                c.0,
                &algo,
                pws as *mut c_void,
                self.workspace.len(),
                s.cu_stream() as *mut _,
            )
        }
        .map_err(cuda_err(format!("cuBLASLt {} linear {m}x{k}x{n}", T::NAME)))?;
        Ok(true)
    }
}
