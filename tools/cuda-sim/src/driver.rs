//! The driver API entry points mood and cudarc call (libcuda.so.1), on the stand-in: one device
//! with sm_90's limits, named so that no one takes it for a GPU.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Instant;

use crate::graph;
use crate::table::KernelEntry;
use crate::*;

/// The device name: `mood info` and every store made on it show it.
pub const DEVICE_NAME: &str = "CPU stand-in, not a GPU (mood-cuda-sim, sm_90 limits)";
const SM_COUNT: c_int = 132;
/// sm_90: 48 KB of shared memory a block without the opt-in attribute, 227 KB with it.
const SMEM_DEFAULT: u32 = 48 * 1024;
const SMEM_OPTIN: u32 = 232_448;

type Result = u32;

macro_rules! check_sticky {
    () => {
        let s = sticky();
        if s != CUDA_SUCCESS {
            return s;
        }
    };
}

struct Module {
    kernels: HashMap<String, u32>,
    functions: Mutex<HashMap<String, Box<Function>>>,
}

struct Function {
    entry: &'static KernelEntry,
    static_smem: u32,
    max_dynamic_smem: AtomicU32,
}

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

// Streams and events: the stand-in runs every call to completion, so a stream is only a handle
// (and, while it captures, a recording: `graph`) and an event a time stamp.

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(s: *mut *mut c_void, _flags: c_uint) -> Result {
    *s = handle(0u64);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    s: *mut *mut c_void,
    flags: c_uint,
    _p: c_int,
) -> Result {
    cuStreamCreate(s, flags)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(s: *mut c_void) -> Result {
    drop_handle::<u64>(s);
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(s: *mut c_void) -> Result {
    if let Some(refused) = graph::refuse_on_capturing(s, "cuStreamSynchronize") {
        return refused;
    }
    sticky()
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(s: *mut c_void) -> Result {
    if let Some(refused) = graph::refuse_on_capturing(s, "cuStreamQuery") {
        return refused;
    }
    sticky()
}

#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(_s: *mut c_void, _e: *mut c_void, _f: c_uint) -> Result {
    sticky()
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetPriority(_s: *mut c_void, p: *mut c_int) -> Result {
    *p = 0;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(lo: *mut c_int, hi: *mut c_int) -> Result {
    *lo = 0;
    *hi = 0;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(
    s: *mut c_void,
    f: Option<unsafe extern "C" fn(*mut c_void)>,
    data: *mut c_void,
) -> Result {
    check_sticky!();
    if graph::capturing(s) {
        let data = data as usize;
        return graph::record(s, "cuLaunchHostFunc", move || {
            if let Some(f) = f {
                // SAFETY: the caller keeps `data` valid for as long as the graph may run.
                unsafe { f(data as *mut c_void) };
            }
            Ok(())
        });
    }
    if let Some(f) = f {
        f(data);
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(e: *mut *mut c_void, _flags: c_uint) -> Result {
    *e = handle(Instant::now());
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(e: *mut c_void, s: *mut c_void) -> Result {
    check_sticky!();
    if graph::capturing(s) {
        // An event node: the time stamp is taken when the graph runs.
        let e = e as usize;
        return graph::record(s, "cuEventRecord", move || {
            // SAFETY: the caller keeps the event alive while the graph may run.
            unsafe { *(e as *mut Instant) = Instant::now() };
            Ok(())
        });
    }
    *e.cast::<Instant>() = Instant::now();
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(
    e: *mut c_void,
    s: *mut c_void,
    _f: c_uint,
) -> Result {
    cuEventRecord(e, s)
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(_e: *mut c_void) -> Result {
    sticky()
}

#[no_mangle]
pub extern "C" fn cuEventQuery(_e: *mut c_void) -> Result {
    sticky()
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    a: *mut c_void,
    b: *mut c_void,
) -> Result {
    let (a, b) = (*a.cast::<Instant>(), *b.cast::<Instant>());
    *ms = b.saturating_duration_since(a).as_secs_f32() * 1e3;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    a: *mut c_void,
    b: *mut c_void,
) -> Result {
    cuEventElapsedTime_v2(ms, a, b)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(e: *mut c_void) -> Result {
    drop_handle::<Instant>(e);
    CUDA_SUCCESS
}

// Memory.

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
            format!("cannot map {bytes} bytes of host memory"),
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

// Modules and kernels.

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(m: *mut *mut c_void, image: *const c_void) -> Result {
    check_sticky!();
    if image.is_null() {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            "cuModuleLoadData: null image".into(),
        );
    }
    match crate::module::parse(image.cast()) {
        Ok(img) => {
            let module = Box::new(Module {
                kernels: img.kernels,
                functions: Mutex::new(HashMap::new()),
            });
            *m = Box::into_raw(module).cast();
            CUDA_SUCCESS
        }
        Err(e) => fail(CUDA_ERROR_INVALID_IMAGE, format!("cuModuleLoadData: {e}")),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    m: *mut *mut c_void,
    image: *const c_void,
    _n: c_uint,
    _o: *mut c_void,
    _v: *mut *mut c_void,
) -> Result {
    cuModuleLoadData(m, image)
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(m: *mut c_void) -> Result {
    drop_handle::<Module>(m);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    f: *mut *mut c_void,
    m: *mut c_void,
    name: *const c_char,
) -> Result {
    check_sticky!();
    if m.is_null() || name.is_null() {
        return fail(
            CUDA_ERROR_INVALID_HANDLE,
            "cuModuleGetFunction: null module or name".into(),
        );
    }
    let module = &*m.cast::<Module>();
    let name = CStr::from_ptr(name).to_string_lossy().into_owned();
    let Some(&static_smem) = module.kernels.get(&name) else {
        return fail(
            CUDA_ERROR_NOT_FOUND,
            format!("no kernel named `{name}` in the loaded module"),
        );
    };
    let Some(entry) = crate::table::find(&name) else {
        return fail(
            CUDA_ERROR_NOT_FOUND,
            format!(
                "kernel `{name}` is in the module but not in the stand-in: it was built from other \
                 kernel sources (rebuild it: cargo build --release -p mood-cuda-sim)"
            ),
        );
    };
    let mut fns = module.functions.lock().unwrap_or_else(|e| e.into_inner());
    let func = fns.entry(name).or_insert_with(|| {
        Box::new(Function {
            entry,
            static_smem,
            max_dynamic_smem: AtomicU32::new(SMEM_DEFAULT.saturating_sub(static_smem)),
        })
    });
    *f = (&**func as *const Function).cast_mut().cast();
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(f: *mut c_void, attr: c_int, value: c_int) -> Result {
    check_sticky!();
    let func = &*f.cast::<Function>();
    if attr == 8 {
        let v = value.max(0) as u32;
        if v + func.static_smem > SMEM_OPTIN {
            return fail(
                CUDA_ERROR_INVALID_VALUE,
                format!(
                    "kernel {}: {v} bytes of dynamic shared memory + {} static exceed sm_90's {SMEM_OPTIN}",
                    func.entry.name(),
                    func.static_smem
                ),
            );
        }
        func.max_dynamic_smem.store(v, Ordering::Relaxed);
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(v: *mut c_int, attr: c_int, f: *mut c_void) -> Result {
    let func = &*f.cast::<Function>();
    *v = match attr {
        0 => match func.entry.max_threads {
            0 => 1024,
            n => n as c_int,
        },
        1 => func.static_smem as c_int,
        4 => 32,
        5 | 6 => 90,
        8 => func.max_dynamic_smem.load(Ordering::Relaxed) as c_int,
        _ => 0,
    };
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuFuncSetCacheConfig(_f: *mut c_void, _c: c_int) -> Result {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetParamCount(f: *mut c_void, n: *mut usize) -> Result {
    *n = (*f.cast::<Function>()).entry.nparams as usize;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetParamInfo(
    f: *mut c_void,
    index: usize,
    offset: *mut usize,
    size: *mut usize,
) -> Result {
    let layout = (*f.cast::<Function>()).entry.param_layout();
    match layout.get(index) {
        Some(&(o, s)) => {
            if !offset.is_null() {
                *offset = o;
            }
            if !size.is_null() {
                *size = s;
            }
            CUDA_SUCCESS
        }
        None => CUDA_ERROR_INVALID_VALUE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> Result {
    check_sticky!();
    if f.is_null() {
        return fail(
            CUDA_ERROR_INVALID_HANDLE,
            "cuLaunchKernel: null function".into(),
        );
    }
    let func = &*f.cast::<Function>();
    let name = func.entry.name();
    let threads = bx as u64 * by as u64 * bz as u64;
    let refuse = |code, what: String| fail(code, format!("launch of {name}: {what}"));
    if [gx, gy, gz, bx, by, bz].contains(&0) {
        return refuse(
            CUDA_ERROR_INVALID_VALUE,
            format!("a zero grid or block dimension (grid {gx}x{gy}x{gz}, block {bx}x{by}x{bz})"),
        );
    }
    if bx > 1024 || by > 1024 || bz > 64 || threads > 1024 {
        return refuse(
            CUDA_ERROR_INVALID_VALUE,
            format!("block {bx}x{by}x{bz} = {threads} threads; the limit is 1024 (x, y <= 1024, z <= 64)"),
        );
    }
    if gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
        return refuse(
            CUDA_ERROR_INVALID_VALUE,
            format!("grid {gx}x{gy}x{gz} exceeds 2^31-1 x 65535 x 65535"),
        );
    }
    let bound = func.entry.max_threads;
    if bound != 0 && threads > bound as u64 {
        return refuse(
            CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
            format!("{threads} threads a block, but the kernel's __launch_bounds__ is {bound}"),
        );
    }
    let max_dyn = func.max_dynamic_smem.load(Ordering::Relaxed);
    if smem > max_dyn {
        return refuse(
            CUDA_ERROR_INVALID_VALUE,
            format!(
                "{smem} bytes of dynamic shared memory (+{} static); the limit is {max_dyn} \
                 (48 KB a block in all unless cuFuncSetAttribute opts in to up to {SMEM_OPTIN})",
                func.static_smem
            ),
        );
    }
    if !extra.is_null() {
        return refuse(
            CUDA_ERROR_NOT_SUPPORTED,
            "the `extra` parameter buffer (the stand-in takes kernelParams)".into(),
        );
    }
    if params.is_null() && func.entry.nparams > 0 {
        return refuse(
            CUDA_ERROR_INVALID_VALUE,
            format!(
                "kernelParams is null, the kernel takes {} parameters",
                func.entry.nparams
            ),
        );
    }
    let (entry, grid, block) = (func.entry, [gx, gy, gz], [bx, by, bz]);
    if graph::capturing(stream) {
        // A kernel node: the parameter values as they are now, the buffers as they are then.
        let stored = match crate::launch::copy_params(entry, params) {
            Ok(s) => s,
            Err((code, msg)) => return fail(code, msg),
        };
        return graph::record(stream, &format!("kernel {name}"), move || {
            let mut args = stored.clone();
            crate::launch::run_copied(entry, grid, block, smem, &mut args)
        });
    }
    match crate::launch::run(entry, grid, block, smem, params) {
        Ok(()) => CUDA_SUCCESS,
        Err((code, msg)) => fail(code, msg),
    }
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
