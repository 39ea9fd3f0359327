//! mood-cuda-sim: a CPU stand-in for the CUDA driver (libcuda), cuBLAS and cuBLASLt, so that mood's
//! CUDA backend, unchanged, runs and is tested on a machine without a GPU.
//!
//! The tests put this library on the loader path under the names cudarc dlopens (libcuda.so.1,
//! libcublas.so.13, libcublasLt.so.13, ...): tests/common/cuda.rs, or `MOOD_CUDA_SIM=1` for the
//! mood binary. Device memory is host memory (`memory`); modules are the NVRTC images mood
//! compiles, read only for their kernel list (`module`); kernels are kernels/*.cu compiled for
//! the host by build.rs with include/mood_sim.h, each block's threads run as fibers
//! (cpp/runtime.cpp, `launch`); cuBLAS GEMMs run on the `gemm` crate (`blas`), cuBLASLt's matmul with its bias
//! epilogue too (`lt`).
//!
//! What a GPU refuses, this refuses with the same codes: over 1024 threads a block, more shared
//! memory than sm_90 allows without the opt-in attribute, unknown kernel names, pointers outside
//! every allocation. It also looks for bugs a GPU hides: new memory is NaN bytes, the thread
//! order changes between barriers, writes past a buffer's end fault or are found in its slack.
//! Work is synchronous: every call has finished when it returns, except on a stream that is being
//! captured into a CUDA graph, where it is recorded and runs at each cuGraphLaunch (`graph`).

#![allow(non_snake_case)]
#![allow(clippy::missing_safety_doc)]

mod blas;
mod driver;
mod graph;
mod launch;
mod lt;
mod memory;
mod module;
mod reported_memory;
mod table;

use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

pub use table::all as kernels;

pub(crate) const CUDA_SUCCESS: u32 = 0;
pub(crate) const CUDA_ERROR_INVALID_VALUE: u32 = 1;
pub(crate) const CUDA_ERROR_OUT_OF_MEMORY: u32 = 2;
pub(crate) const CUDA_ERROR_INVALID_DEVICE: u32 = 101;
pub(crate) const CUDA_ERROR_INVALID_IMAGE: u32 = 200;
pub(crate) const CUDA_ERROR_INVALID_HANDLE: u32 = 400;
pub(crate) const CUDA_ERROR_ILLEGAL_STATE: u32 = 401;
pub(crate) const CUDA_ERROR_NOT_FOUND: u32 = 500;
pub(crate) const CUDA_ERROR_ILLEGAL_ADDRESS: u32 = 700;
pub(crate) const CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: u32 = 701;
pub(crate) const CUDA_ERROR_LAUNCH_FAILED: u32 = 719;
pub(crate) const CUDA_ERROR_NOT_SUPPORTED: u32 = 801;
pub(crate) const CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: u32 = 900;
pub(crate) const CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: u32 = 901;
pub(crate) const CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD: u32 = 908;

/// CUDA's name for a result code.
pub(crate) fn code_name(code: u32) -> &'static str {
    match code {
        0 => "CUDA_SUCCESS",
        1 => "CUDA_ERROR_INVALID_VALUE",
        2 => "CUDA_ERROR_OUT_OF_MEMORY",
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        101 => "CUDA_ERROR_INVALID_DEVICE",
        200 => "CUDA_ERROR_INVALID_IMAGE",
        201 => "CUDA_ERROR_INVALID_CONTEXT",
        400 => "CUDA_ERROR_INVALID_HANDLE",
        401 => "CUDA_ERROR_ILLEGAL_STATE",
        500 => "CUDA_ERROR_NOT_FOUND",
        700 => "CUDA_ERROR_ILLEGAL_ADDRESS",
        701 => "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        719 => "CUDA_ERROR_LAUNCH_FAILED",
        801 => "CUDA_ERROR_NOT_SUPPORTED",
        900 => "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
        901 => "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
        908 => "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
        _ => "CUDA_ERROR_UNKNOWN",
    }
}

/// The description cuGetErrorString gives for the most recent error of each code: what the
/// stand-in found (which kernel, which buffer), so that mood's one-line error says it.
static DETAIL: Mutex<Vec<(u32, &'static std::ffi::CStr)>> = Mutex::new(Vec::new());

/// An error that, as on a GPU, leaves the context unusable: every later call returns it.
static STICKY: AtomicU32 = AtomicU32::new(CUDA_SUCCESS);

pub(crate) fn fail(code: u32, detail: String) -> u32 {
    let text = CString::new(format!("{detail} [CPU stand-in]")).unwrap_or_default();
    let leaked: &'static std::ffi::CStr = Box::leak(text.into_boxed_c_str());
    let mut d = DETAIL.lock().unwrap_or_else(|e| e.into_inner());
    d.retain(|(c, _)| *c != code);
    d.push((code, leaked));
    if matches!(code, CUDA_ERROR_ILLEGAL_ADDRESS | CUDA_ERROR_LAUNCH_FAILED) {
        STICKY.store(code, Ordering::SeqCst);
    }
    code
}

pub(crate) fn sticky() -> u32 {
    STICKY.load(Ordering::SeqCst)
}

pub(crate) fn reset_sticky() {
    STICKY.store(CUDA_SUCCESS, Ordering::SeqCst);
}

pub(crate) fn detail(code: u32) -> Option<*const c_char> {
    let d = DETAIL.lock().unwrap_or_else(|e| e.into_inner());
    d.iter().find(|(c, _)| *c == code).map(|(_, s)| s.as_ptr())
}

/// An opaque handle (stream, event, module, cuBLAS handle) owning `v`.
pub(crate) fn handle<T>(v: T) -> *mut std::ffi::c_void {
    Box::into_raw(Box::new(v)).cast()
}

/// Frees a handle made by `handle::<T>`; null is ignored.
///
/// # Safety
/// `h` is null or came from `handle::<T>` and is not used again.
pub(crate) unsafe fn drop_handle<T>(h: *mut std::ffi::c_void) {
    if !h.is_null() {
        drop(Box::from_raw(h.cast::<T>()));
    }
}
