//! The exported cuBLAS entry points (handle, stream, modes, Sgemm, GemmEx and their strided
//! batches) and cuBLASLt's handle, each checking its arguments and handing the product to the
//! engine in `blas`.

use super::*;

#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(h: *mut *mut c_void) -> u32 {
    *h = handle(Handle {
        pointer_mode_device: false,
        math_mode: 0,
        stream: 0,
    });
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasDestroy_v2(h: *mut c_void) -> u32 {
    drop_handle::<Handle>(h);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetStream_v2(h: *mut c_void, s: *mut c_void) -> u32 {
    if h.is_null() {
        return NOT_INITIALIZED;
    }
    (*h.cast::<Handle>()).stream = s as usize;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetVersion_v2(_h: *mut c_void, v: *mut c_int) -> u32 {
    *v = 130000;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cublasSetWorkspace_v2(_h: *mut c_void, _p: *mut c_void, _n: usize) -> u32 {
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetMathMode(h: *mut c_void, mode: c_int) -> u32 {
    (*h.cast::<Handle>()).math_mode = mode;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetMathMode(h: *mut c_void, mode: *mut c_int) -> u32 {
    *mode = (*h.cast::<Handle>()).math_mode;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetPointerMode_v2(h: *mut c_void, mode: c_int) -> u32 {
    (*h.cast::<Handle>()).pointer_mode_device = mode == 1;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetPointerMode_v2(h: *mut c_void, mode: *mut c_int) -> u32 {
    *mode = (*h.cast::<Handle>()).pointer_mode_device as c_int;
    SUCCESS
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasSgemm_v2(
    h: *mut c_void,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: u64,
    lda: c_int,
    b: u64,
    ldb: c_int,
    beta: *const f32,
    c: u64,
    ldc: c_int,
) -> u32 {
    let s = shape(ta, tb, m, n, k, lda, ldb, ldc);
    gemm_batched(
        h,
        s,
        (alpha.cast(), beta.cast()),
        (a, Ty::F32, 0),
        (b, Ty::F32, 0),
        (c, Ty::F32, 0),
        1,
        "cublasSgemm",
    )
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasSgemmStridedBatched(
    h: *mut c_void,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: u64,
    lda: c_int,
    sa: c_longlong,
    b: u64,
    ldb: c_int,
    sb: c_longlong,
    beta: *const f32,
    c: u64,
    ldc: c_int,
    sc: c_longlong,
    batches: c_int,
) -> u32 {
    let s = shape(ta, tb, m, n, k, lda, ldb, ldc);
    gemm_batched(
        h,
        s,
        (alpha.cast(), beta.cast()),
        (a, Ty::F32, sa),
        (b, Ty::F32, sb),
        (c, Ty::F32, sc),
        batches,
        "cublasSgemmStridedBatched",
    )
}

/// f32 arithmetic: CUBLAS_COMPUTE_32F, its pedantic and fast variants (the stand-in computes all of
/// them in full f32, where a GPU's TF32 or bf16 fast modes round the inputs).
fn compute_is_f32(compute: c_int) -> bool {
    matches!(compute, 68 | 69 | 74 | 75 | 77)
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasGemmEx(
    h: *mut c_void,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: u64,
    atype: c_int,
    lda: c_int,
    b: u64,
    btype: c_int,
    ldb: c_int,
    beta: *const c_void,
    c: u64,
    ctype: c_int,
    ldc: c_int,
    compute: c_int,
    algo: c_int,
) -> u32 {
    // One matrix of the strided-batched form.
    cublasGemmStridedBatchedEx(
        h, ta, tb, m, n, k, alpha, a, atype, lda, 0, b, btype, ldb, 0, beta, c, ctype, ldc, 0, 1,
        compute, algo,
    )
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasGemmStridedBatchedEx(
    h: *mut c_void,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: u64,
    atype: c_int,
    lda: c_int,
    sa: c_longlong,
    b: u64,
    btype: c_int,
    ldb: c_int,
    sb: c_longlong,
    beta: *const c_void,
    c: u64,
    ctype: c_int,
    ldc: c_int,
    sc: c_longlong,
    batches: c_int,
    compute: c_int,
    _algo: c_int,
) -> u32 {
    let (Some(at), Some(bt), Some(ct)) = (Ty::of(atype), Ty::of(btype), Ty::of(ctype)) else {
        return NOT_SUPPORTED;
    };
    if !compute_is_f32(compute) {
        return NOT_SUPPORTED;
    }
    let s = shape(ta, tb, m, n, k, lda, ldb, ldc);
    gemm_batched(
        h,
        s,
        (alpha, beta),
        (a, at, sa),
        (b, bt, sb),
        (c, ct, sc),
        batches,
        "cublasGemmStridedBatchedEx",
    )
}

// cuBLASLt's handle; its matmul and descriptors are in `crate::lt`.

#[no_mangle]
pub unsafe extern "C" fn cublasLtCreate(h: *mut *mut c_void) -> u32 {
    *h = handle(0u64);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtDestroy(h: *mut c_void) -> u32 {
    drop_handle::<u64>(h);
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cublasLtGetVersion() -> usize {
    130000
}
