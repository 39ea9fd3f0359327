//! The driver API entry points mood and cudarc call (libcuda.so.1), on the stand-in: one device
//! with sm_90's limits, named so that no one takes it for a GPU.
//!
//! This file is the device and its one context (attributes, the reported memory: cuMemGetInfo,
//! synchronisation) and the error strings; the rest of the API is split by what it stands in for:
//!   - `stream`: streams and events (cuStream*, cuEvent*, cuLaunchHostFunc);
//!   - `mem`: allocations, the default memory pool, pinned host memory, copies and memsets (cuMem*);
//!   - `kernel`: modules, functions and launches (cuModule*, cuFunc*, cuLaunchKernel).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Mutex, Once};

use crate::graph;
use crate::*;

/// The device name: `mood info` and every store made on it show it.
pub const DEVICE_NAME: &str = "CPU stand-in, not a GPU (mood-cuda-sim, sm_90 limits)";
const SM_COUNT: c_int = 132;
/// sm_90: 48 KB of shared memory a block without the opt-in attribute, 227 KB with it.
const SMEM_DEFAULT: u32 = 48 * 1024;
const SMEM_OPTIN: u32 = 232_448;

type Result = u32;

/// Returns the sticky error, if one is set, from the calling entry point (here and in the
/// submodules, which are declared below it so that they see it).
macro_rules! check_sticky {
    () => {
        let s = sticky();
        if s != CUDA_SUCCESS {
            return s;
        }
    };
}

mod kernel;
mod mem;
mod stream;

static CONTEXT: u8 = 0;
static INIT: Once = Once::new();

fn context() -> *mut c_void {
    &CONTEXT as *const u8 as *mut c_void
}

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> Result {
    // SAFETY: installs a SIGSEGV/SIGBUS handler that only acts inside a kernel.
    INIT.call_once(|| unsafe { crate::launch::mood_sim_install_fault_handler() });
    CUDA_SUCCESS
}

/// The driver's private tables, which NVRTC asks a libcuda it finds for: the stand-in has none,
/// and says so as a driver does for a table it does not know.
#[no_mangle]
pub unsafe extern "C" fn cuGetExportTable(table: *mut *const c_void, _id: *const c_void) -> Result {
    if !table.is_null() {
        *table = std::ptr::null();
    }
    CUDA_ERROR_INVALID_VALUE
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> Result {
    *v = 13000;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> Result {
    *n = 1;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(d: *mut c_int, ordinal: c_int) -> Result {
    if ordinal != 0 {
        return fail(
            CUDA_ERROR_INVALID_DEVICE,
            format!("device {ordinal}: the stand-in has one device, 0"),
        );
    }
    *d = 0;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, _d: c_int) -> Result {
    let bytes = DEVICE_NAME.as_bytes();
    let n = bytes.len().min(len.max(1) as usize - 1);
    std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast(), n);
    *name.add(n) = 0;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut u8, _d: c_int) -> Result {
    std::ptr::write_bytes(uuid, 0x5a, 16);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut u8, d: c_int) -> Result {
    cuDeviceGetUuid_v2(uuid, d)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(v: *mut c_int, attr: c_int, _d: c_int) -> Result {
    *v = match attr {
        1 => 1024,                  // max threads per block
        2 | 3 => 1024,              // max block dim x, y
        4 => 64,                    // max block dim z
        5 => i32::MAX,              // max grid dim x
        6 | 7 => 65535,             // max grid dim y, z
        8 => SMEM_DEFAULT as c_int, // shared memory per block
        9 => 65536,                 // constant memory
        10 => 32,                   // warp size
        12 => 65536,                // registers per block
        13 => 1_980_000,            // clock kHz
        16 => SM_COUNT,             // multiprocessors
        36 => 2_619_000,            // memory clock kHz
        37 => 6144,                 // bus width
        38 => 50 * 1024 * 1024,     // L2
        39 => 2048,                 // threads per SM
        41 => 1,                    // unified addressing
        75 => 9,                    // compute capability major
        76 => 0,                    // minor
        81 => 233_472,              // shared memory per SM
        97 => SMEM_OPTIN as c_int,  // shared memory per block, opt-in
        115 => 1,                   // memory pools supported
        _ => 0,
    };
    CUDA_SUCCESS
}

fn host_memory() -> (usize, usize) {
    // SAFETY: sysconf has no preconditions.
    let (pages, avail, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_AVPHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let total = (pages.max(0) as usize).saturating_mul(page.max(0) as usize);
    let free = (avail.max(0) as usize).saturating_mul(page.max(0) as usize);
    crate::reported_memory::reported((free, total))
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, _d: c_int) -> Result {
    *bytes = host_memory().1;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> Result {
    check_sticky!();
    let (f, t) = host_memory();
    *free = f.saturating_sub(memory::in_use().min(f / 2));
    *total = t;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut *mut c_void, _d: c_int) -> Result {
    *ctx = context();
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(_d: c_int) -> Result {
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(_d: c_int) -> Result {
    reset_sticky();
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxSetFlags_v2(_d: c_int, _f: c_uint) -> Result {
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(_ctx: *mut c_void) -> Result {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut *mut c_void) -> Result {
    *ctx = context();
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(d: *mut c_int) -> Result {
    *d = 0;
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxPushCurrent_v2(_ctx: *mut c_void) -> Result {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(ctx: *mut *mut c_void) -> Result {
    if !ctx.is_null() {
        *ctx = context();
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> Result {
    if let Some(refused) = graph::refuse_context_sync() {
        return refused;
    }
    sticky()
}

#[no_mangle]
pub extern "C" fn cuCtxSetLimit(_l: c_int, _v: usize) -> Result {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: u32, s: *mut *const c_char) -> Result {
    *s = match detail(code) {
        Some(p) => p,
        None => {
            static NAMES: Mutex<Vec<(u32, &'static CStr)>> = Mutex::new(Vec::new());
            let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
            match names.iter().find(|(c, _)| *c == code) {
                Some((_, s)) => s.as_ptr(),
                None => {
                    let text = std::ffi::CString::new(code_name(code)).unwrap();
                    let leaked: &'static CStr = Box::leak(text.into_boxed_c_str());
                    names.push((code, leaked));
                    leaked.as_ptr()
                }
            }
        }
    };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: u32, s: *mut *const c_char) -> Result {
    static NAMES: Mutex<Vec<(u32, &'static CStr)>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    *s = match names.iter().find(|(c, _)| *c == code) {
        Some((_, s)) => s.as_ptr(),
        None => {
            let leaked: &'static CStr = Box::leak(
                std::ffi::CString::new(code_name(code))
                    .unwrap()
                    .into_boxed_c_str(),
            );
            names.push((code, leaked));
            leaked.as_ptr()
        }
    };
    CUDA_SUCCESS
}
