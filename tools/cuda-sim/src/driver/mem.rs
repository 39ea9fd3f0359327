//! Device memory calls (cuMem*) on the stand-in: allocations (host mappings from `crate::memory`,
//! checked against the live allocations), the default memory pool's release threshold, pinned host
//! memory (plain host allocations), and synchronous or stream-ordered copies and memsets, which a
//! capturing stream records or refuses as the driver does (`graph`).

use std::ffi::{c_int, c_uint, c_void};

use super::Result;
use crate::graph;
use crate::*;

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(p: *mut u64, bytes: usize) -> Result {
    if let Some(refused) = graph::refuse_unsafe_call("cuMemAlloc") {
        return refused;
    }
    alloc(p, bytes)
}

unsafe fn alloc(p: *mut u64, bytes: usize) -> Result {
    check_sticky!();
    if bytes == 0 {
        return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc of 0 bytes".into());
    }
    match memory::alloc(bytes) {
        Some(a) => {
            *p = a;
            CUDA_SUCCESS
        }
        None => fail(
            CUDA_ERROR_OUT_OF_MEMORY,
            format!("cannot allocate {bytes} bytes: past MOOD_CUDA_SIM_MEMORY_MIB or out of host memory"),
        ),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(p: *mut u64, bytes: usize, s: *mut c_void) -> Result {
    check_sticky!();
    if graph::capturing(s) {
        return graph::alloc_in_capture(s, p, bytes);
    }
    alloc(p, bytes)
}

/// The one device's default memory pool: a handle, and the release threshold set on it (what a
/// real pool keeps cached across synchronisations instead of returning it to the driver).
static POOL_RELEASE_THRESHOLD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const POOL_HANDLE: usize = 0x9001;
const CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: c_int = 4;

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(pool: *mut *mut c_void, d: c_int) -> Result {
    if d != 0 || pool.is_null() {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("cuDeviceGetDefaultMemPool: device {d}"),
        );
    }
    *pool = POOL_HANDLE as *mut c_void;
    CUDA_SUCCESS
}

/// The release threshold behind `attr` of the default pool, or the error for a call on
/// anything else.
fn pool_threshold(
    call: &str,
    pool: *mut c_void,
    attr: c_int,
    value: *mut c_void,
) -> std::result::Result<Option<*mut u64>, Result> {
    if pool as usize != POOL_HANDLE || value.is_null() {
        return Err(fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("{call}: not the default pool"),
        ));
    }
    Ok((attr == CU_MEMPOOL_ATTR_RELEASE_THRESHOLD).then_some(value.cast()))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPoolSetAttribute(
    pool: *mut c_void,
    attr: c_int,
    value: *mut c_void,
) -> Result {
    match pool_threshold("cuMemPoolSetAttribute", pool, attr, value) {
        Err(e) => e,
        Ok(Some(v)) => {
            POOL_RELEASE_THRESHOLD.store(*v, std::sync::atomic::Ordering::Relaxed);
            CUDA_SUCCESS
        }
        Ok(None) => CUDA_SUCCESS,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPoolGetAttribute(
    pool: *mut c_void,
    attr: c_int,
    value: *mut c_void,
) -> Result {
    match pool_threshold("cuMemPoolGetAttribute", pool, attr, value) {
        Err(e) => e,
        Ok(Some(v)) => {
            *v = POOL_RELEASE_THRESHOLD.load(std::sync::atomic::Ordering::Relaxed);
            CUDA_SUCCESS
        }
        Ok(None) => CUDA_SUCCESS,
    }
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(p: u64) -> Result {
    if let Some(refused) = graph::refuse_unsafe_call("cuMemFree") {
        return refused;
    }
    free(p)
}

fn free(p: u64) -> Result {
    check_sticky!();
    if p == 0 || memory::free(p) {
        CUDA_SUCCESS
    } else {
        fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("cuMemFree({p:#x}): not the start of a live allocation"),
        )
    }
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(p: u64, s: *mut c_void) -> Result {
    check_sticky!();
    if graph::capturing(s) {
        return graph::free_in_capture(s, p);
    }
    free(p)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(p: *mut *mut c_void, bytes: usize) -> Result {
    let layout = std::alloc::Layout::from_size_align(bytes.max(1) + 16, 16).unwrap();
    let raw = std::alloc::alloc(layout);
    if raw.is_null() {
        return fail(
            CUDA_ERROR_OUT_OF_MEMORY,
            format!("host allocation of {bytes} bytes"),
        );
    }
    // The size sits in the 16 bytes before the returned pointer, for cuMemFreeHost.
    *(raw as *mut usize) = bytes.max(1) + 16;
    *p = raw.add(16).cast();
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(p: *mut *mut c_void, bytes: usize, _f: c_uint) -> Result {
    cuMemAllocHost_v2(p, bytes)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> Result {
    if !p.is_null() {
        let raw = (p as *mut u8).sub(16);
        let size = *(raw as *const usize);
        std::alloc::dealloc(raw, std::alloc::Layout::from_size_align(size, 16).unwrap());
    }
    CUDA_SUCCESS
}

unsafe fn copy(dst: u64, src: u64, n: usize, dst_dev: bool, src_dev: bool, what: &str) -> Result {
    check_sticky!();
    if dst_dev {
        if let Err(e) = memory::check(dst, n, &format!("{what} destination")) {
            return fail(CUDA_ERROR_INVALID_VALUE, e);
        }
    }
    if src_dev {
        if let Err(e) = memory::check(src, n, &format!("{what} source")) {
            return fail(CUDA_ERROR_INVALID_VALUE, e);
        }
    }
    if n > 0 {
        std::ptr::copy(src as *const u8, dst as *mut u8, n);
    }
    CUDA_SUCCESS
}

/// A synchronous copy or memset: refused while the calling thread captures (`graph`).
macro_rules! refuse_during_capture {
    ($what:expr) => {
        if let Some(refused) = graph::refuse_unsafe_call($what) {
            return refused;
        }
    };
}

/// A copy between host and device on stream `s`: a capture cannot hold one (the stand-in does
/// not model pinned host memory, whose copies a driver can capture).
macro_rules! refuse_on_capturing {
    ($s:expr, $what:expr) => {
        if let Some(refused) = graph::refuse_on_capturing($s, $what) {
            return refused;
        }
    };
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(dst: u64, src: *const c_void, n: usize) -> Result {
    refuse_during_capture!("cuMemcpyHtoD");
    copy(dst, src as u64, n, true, false, "cuMemcpyHtoD")
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: u64,
    src: *const c_void,
    n: usize,
    s: *mut c_void,
) -> Result {
    refuse_on_capturing!(s, "cuMemcpyHtoDAsync (a host-to-device copy)");
    copy(dst, src as u64, n, true, false, "cuMemcpyHtoDAsync")
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: u64, n: usize) -> Result {
    refuse_during_capture!("cuMemcpyDtoH");
    copy(dst as u64, src, n, false, true, "cuMemcpyDtoH")
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: u64,
    n: usize,
    s: *mut c_void,
) -> Result {
    refuse_on_capturing!(s, "cuMemcpyDtoHAsync (a device-to-host copy)");
    copy(dst as u64, src, n, false, true, "cuMemcpyDtoHAsync")
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: u64, src: u64, n: usize) -> Result {
    refuse_during_capture!("cuMemcpyDtoD");
    copy(dst, src, n, true, true, "cuMemcpyDtoD")
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: u64,
    src: u64,
    n: usize,
    s: *mut c_void,
) -> Result {
    if graph::capturing(s) {
        return graph::record(s, "cuMemcpyDtoDAsync", move || {
            // SAFETY: `copy` checks both ranges against the live allocations when the graph runs.
            match unsafe { copy(dst, src, n, true, true, "cuMemcpyDtoDAsync") } {
                CUDA_SUCCESS => Ok(()),
                code => Err((code, "device-to-device copy out of bounds".into())),
            }
        });
    }
    copy(dst, src, n, true, true, "cuMemcpyDtoDAsync")
}

unsafe fn memset(dst: u64, value: u32, width: usize, count: usize, what: &str) -> Result {
    check_sticky!();
    let Some(bytes) = count.checked_mul(width) else {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("{what}: {count} elements overflow"),
        );
    };
    if let Err(e) = memory::check(dst, bytes, what) {
        return fail(CUDA_ERROR_INVALID_VALUE, e);
    }
    match width {
        1 => std::ptr::write_bytes(dst as *mut u8, value as u8, count),
        _ => std::slice::from_raw_parts_mut(dst as *mut u32, count).fill(value),
    }
    CUDA_SUCCESS
}

/// A memset on stream `s`: run now, or recorded while `s` captures.
unsafe fn memset_on(
    s: *mut c_void,
    dst: u64,
    value: u32,
    width: usize,
    n: usize,
    what: &'static str,
) -> Result {
    if graph::capturing(s) {
        return graph::record(s, what, move || {
            // SAFETY: `memset` checks the range against the live allocations when the graph runs.
            match unsafe { memset(dst, value, width, n, what) } {
                CUDA_SUCCESS => Ok(()),
                code => Err((code, "memset out of bounds".into())),
            }
        });
    }
    memset(dst, value, width, n, what)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: u64, v: u8, n: usize) -> Result {
    refuse_during_capture!("cuMemsetD8");
    memset(dst, v as u32, 1, n, "cuMemsetD8")
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(dst: u64, v: u8, n: usize, s: *mut c_void) -> Result {
    memset_on(s, dst, v as u32, 1, n, "cuMemsetD8Async")
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: u64, v: u32, n: usize) -> Result {
    refuse_during_capture!("cuMemsetD32");
    memset(dst, v, 4, n, "cuMemsetD32")
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(dst: u64, v: u32, n: usize, s: *mut c_void) -> Result {
    memset_on(s, dst, v, 4, n, "cuMemsetD32Async")
}
