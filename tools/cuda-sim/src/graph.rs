//! Stream capture and CUDA graphs, with the driver's rules, so that a capture bug in mood fails on
//! the stand-in as it would on a GPU:
//!   - cuStreamBeginCapture puts a stream in capture mode (never the legacy default stream). Work
//!     queued on it (kernels, cuBLAS products, device-to-device copies, memsets, stream-ordered
//!     allocations and frees, host functions, event records) is recorded, not run: a kernel's
//!     parameter values are copied when it is recorded, as the driver copies them into the node;
//!     the buffers they point at are read when the graph runs.
//!   - Copies between host and device, and synchronising or querying a capturing stream, are
//!     refused (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED) and invalidate the capture, as are the
//!     synchronous "unsafe" calls (cuMemAlloc, cuMemFree, cuMemcpy*, cuMemset*, cuCtxSynchronize)
//!     from the capturing thread (thread-local mode) or any thread (global mode). Later work on an
//!     invalidated stream and cuStreamEndCapture answer CUDA_ERROR_STREAM_CAPTURE_INVALIDATED.
//!   - An allocation made during the capture belongs to the graph: its address is fixed when it is
//!     recorded, its bytes are poisoned again at every launch (graph memory holds nothing between
//!     launches), and it is unmapped with the graph. Freeing during the capture a buffer the
//!     capture did not allocate is refused: the graph would free it at every launch.
//!   - cuGraphLaunch runs the recorded steps in order; a failing step fails the launch with its
//!     code and says which step it was.
//!
//! Where the stand-in is stricter than a driver, it says so: a graph whose own allocations are not
//! all freed inside it is refused at cuGraphInstantiate (a driver would let it run once).

use std::ffi::{c_int, c_ulonglong, c_void};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;

use crate::*;

/// One recorded piece of work: Ok, or CUDA's code and what went wrong.
pub(crate) type Step = Box<dyn Fn() -> std::result::Result<(), (u32, String)> + Send + Sync>;

const MODE_GLOBAL: c_int = 0;
const MODE_THREAD_LOCAL: c_int = 1;
const MODE_RELAXED: c_int = 2;
const STATUS_NONE: c_int = 0;
const STATUS_ACTIVE: c_int = 1;
const STATUS_INVALIDATED: c_int = 2;

struct Capture {
    stream: usize,
    id: u64,
    mode: c_int,
    thread: ThreadId,
    steps: Vec<(String, Step)>,
    /// (address, bytes, freed during the capture) of each allocation made on the stream.
    allocs: Vec<(u64, usize, bool)>,
    /// Why the capture was invalidated, once it was.
    invalidated: Option<String>,
}

static CAPTURES: Mutex<Vec<Capture>> = Mutex::new(Vec::new());

fn captures() -> MutexGuard<'static, Vec<Capture>> {
    CAPTURES.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a graph holds: its steps and the allocations it owns (made and freed inside it).
struct Recorded {
    steps: Vec<(String, Step)>,
    owned: Vec<(u64, usize)>,
    /// Allocations made inside the capture and not freed there: the caller's buffers.
    left: Vec<(u64, usize)>,
}

impl Drop for Recorded {
    fn drop(&mut self) {
        for &(p, _) in &self.owned {
            memory::free(p);
        }
    }
}

impl Recorded {
    fn run(&self) -> std::result::Result<(), (u32, String)> {
        for (i, (what, step)) in self.steps.iter().enumerate() {
            step().map_err(|(code, msg)| {
                (
                    code,
                    format!("graph step {i} of {} ({what}): {msg}", self.steps.len()),
                )
            })?;
        }
        Ok(())
    }
}

/// The legacy default stream (null or CU_STREAM_LEGACY), which no capture may use.
fn is_legacy(stream: *mut c_void) -> bool {
    stream.is_null() || stream as usize == 1
}

/// Whether `stream` is capturing (its capture possibly invalidated already).
pub(crate) fn capturing(stream: *mut c_void) -> bool {
    let key = stream as usize;
    !is_legacy(stream) && captures().iter().any(|c| c.stream == key)
}

/// Records `step` (called `what` in errors) into the capture on `stream`: CUDA_SUCCESS, or
/// CUDA_ERROR_STREAM_CAPTURE_INVALIDATED when the capture was invalidated before.
pub(crate) fn record(
    stream: *mut c_void,
    what: &str,
    step: impl Fn() -> std::result::Result<(), (u32, String)> + Send + Sync + 'static,
) -> u32 {
    let mut caps = captures();
    let Some(c) = caps.iter_mut().find(|c| c.stream == stream as usize) else {
        return fail(
            CUDA_ERROR_ILLEGAL_STATE,
            format!("{what}: stream not capturing"),
        );
    };
    if let Some(why) = &c.invalidated {
        let why = why.clone();
        drop(caps);
        return fail(
            CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
            format!("{what} on a stream whose capture was invalidated ({why})"),
        );
    }
    c.steps.push((what.to_string(), Box::new(step)));
    CUDA_SUCCESS
}

/// `what` cannot be captured: the capture on `stream`, if any, is invalidated and the call
/// refused; None when the stream is not capturing (the call goes ahead).
pub(crate) fn refuse_on_capturing(stream: *mut c_void, what: &str) -> Option<u32> {
    if !capturing(stream) {
        return None;
    }
    let why = format!("{what} on a capturing stream");
    invalidate(|c| c.stream == stream as usize, &why);
    Some(fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, why))
}

/// A synchronous call the driver calls unsafe during capture: refused (invalidating the captures
/// it would break) while this thread captures in thread-local mode or any thread in global mode.
pub(crate) fn refuse_unsafe_call(what: &str) -> Option<u32> {
    let me = std::thread::current().id();
    let breaks =
        |c: &Capture| c.mode == MODE_GLOBAL || (c.mode == MODE_THREAD_LOCAL && c.thread == me);
    if !captures()
        .iter()
        .any(|c| breaks(c) && c.invalidated.is_none())
    {
        return None;
    }
    let why = format!("{what} (a synchronous call) while a stream captures");
    invalidate(breaks, &why);
    Some(fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, why))
}

/// cuCtxSynchronize would wait for work that only exists as a recording: refused during any
/// capture.
pub(crate) fn refuse_context_sync() -> Option<u32> {
    if captures().iter().all(|c| c.invalidated.is_some()) {
        return None;
    }
    let why = "cuCtxSynchronize while a stream captures".to_string();
    invalidate(|_| true, &why);
    Some(fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, why))
}

fn invalidate(which: impl Fn(&Capture) -> bool, why: &str) {
    for c in captures().iter_mut().filter(|c| which(c)) {
        c.invalidated.get_or_insert_with(|| why.to_string());
    }
}

/// cuMemAllocAsync on a capturing stream: the address is fixed now, the graph owns the memory.
pub(crate) fn alloc_in_capture(stream: *mut c_void, p: *mut u64, bytes: usize) -> u32 {
    if bytes == 0 {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            "cuMemAllocAsync of 0 bytes".into(),
        );
    }
    let Some(a) = memory::alloc(bytes) else {
        return fail(
            CUDA_ERROR_OUT_OF_MEMORY,
            format!("cannot allocate {bytes} bytes: past MOOD_CUDA_SIM_MEMORY_MIB or out of host memory"),
        );
    };
    let rc = record(stream, "cuMemAllocAsync", move || {
        // Graph memory holds nothing from one launch to the next.
        // SAFETY: the graph's own allocation of `bytes` bytes, mapped while the graph lives.
        unsafe { std::ptr::write_bytes(a as *mut u8, memory::POISON, bytes) };
        Ok(())
    });
    if rc != CUDA_SUCCESS {
        memory::free(a);
        return rc;
    }
    if let Some(c) = captures().iter_mut().find(|c| c.stream == stream as usize) {
        c.allocs.push((a, bytes, false));
    }
    // SAFETY: the caller's out-pointer.
    unsafe { *p = a };
    CUDA_SUCCESS
}

/// cuMemFreeAsync on a capturing stream: a free node for memory the capture allocated; refused
/// for any other buffer.
pub(crate) fn free_in_capture(stream: *mut c_void, p: u64) -> u32 {
    let mine = {
        let mut caps = captures();
        let c = caps.iter_mut().find(|c| c.stream == stream as usize);
        match c.and_then(|c| c.allocs.iter_mut().find(|a| a.0 == p && !a.2)) {
            Some(a) => {
                a.2 = true;
                true
            }
            None => false,
        }
    };
    if !mine {
        let why = format!(
            "cuMemFreeAsync({p:#x}) during capture of a buffer allocated outside it (the graph \
             would free it at every launch)"
        );
        invalidate(|c| c.stream == stream as usize, &why);
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, why);
    }
    record(stream, "cuMemFreeAsync", || Ok(()))
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(stream: *mut c_void, mode: c_int) -> u32 {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let s = sticky();
    if s != CUDA_SUCCESS {
        return s;
    }
    if is_legacy(stream) {
        return fail(
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            "cuStreamBeginCapture on the legacy default stream (capture needs a created stream)"
                .into(),
        );
    }
    if !matches!(mode, MODE_GLOBAL | MODE_THREAD_LOCAL | MODE_RELAXED) {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            format!("cuStreamBeginCapture: capture mode {mode}"),
        );
    }
    let mut caps = captures();
    if caps.iter().any(|c| c.stream == stream as usize) {
        drop(caps);
        return fail(
            CUDA_ERROR_ILLEGAL_STATE,
            "cuStreamBeginCapture: the stream is capturing already".into(),
        );
    }
    caps.push(Capture {
        stream: stream as usize,
        id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        mode,
        thread: std::thread::current().id(),
        steps: Vec::new(),
        allocs: Vec::new(),
        invalidated: None,
    });
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture(stream: *mut c_void, mode: c_int) -> u32 {
    cuStreamBeginCapture_v2(stream, mode)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(stream: *mut c_void, graph: *mut *mut c_void) -> u32 {
    if graph.is_null() {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            "cuStreamEndCapture: null graph".into(),
        );
    }
    *graph = std::ptr::null_mut();
    let mut caps = captures();
    let Some(i) = caps.iter().position(|c| c.stream == stream as usize) else {
        drop(caps);
        return fail(
            CUDA_ERROR_ILLEGAL_STATE,
            "cuStreamEndCapture: the stream is not capturing".into(),
        );
    };
    let me = std::thread::current().id();
    if caps[i].mode != MODE_RELAXED && caps[i].thread != me {
        drop(caps);
        return fail(
            CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD,
            "cuStreamEndCapture from another thread than cuStreamBeginCapture".into(),
        );
    }
    let c = caps.remove(i);
    drop(caps);
    let owned: Vec<(u64, usize)> = c
        .allocs
        .iter()
        .filter(|a| a.2)
        .map(|a| (a.0, a.1))
        .collect();
    let left: Vec<(u64, usize)> = c
        .allocs
        .iter()
        .filter(|a| !a.2)
        .map(|a| (a.0, a.1))
        .collect();
    if let Some(why) = c.invalidated {
        // The graph's memory goes with it; what was left allocated is the caller's to free.
        for (p, _) in owned {
            memory::free(p);
        }
        return fail(
            CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
            format!("the capture was invalidated: {why}"),
        );
    }
    *graph = handle(Arc::new(Recorded {
        steps: c.steps,
        owned,
        left,
    }));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(stream: *mut c_void, status: *mut c_int) -> u32 {
    if status.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *status = match captures().iter().find(|c| c.stream == stream as usize) {
        None => STATUS_NONE,
        Some(c) if c.invalidated.is_some() => STATUS_INVALIDATED,
        Some(_) => STATUS_ACTIVE,
    };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetCaptureInfo(
    stream: *mut c_void,
    status: *mut c_int,
    id: *mut c_ulonglong,
) -> u32 {
    let rc = cuStreamIsCapturing(stream, status);
    if rc == CUDA_SUCCESS && !id.is_null() {
        if let Some(c) = captures().iter().find(|c| c.stream == stream as usize) {
            *id = c.id;
        }
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut *mut c_void,
    graph: *mut c_void,
    _flags: c_ulonglong,
) -> u32 {
    if exec.is_null() || graph.is_null() {
        return fail(
            CUDA_ERROR_INVALID_VALUE,
            "cuGraphInstantiate: null graph or out-pointer".into(),
        );
    }
    let g = &*graph.cast::<Arc<Recorded>>();
    if let Some(&(p, bytes)) = g.left.first() {
        return fail(
            CUDA_ERROR_NOT_SUPPORTED,
            format!(
                "cuGraphInstantiate: {} allocation(s) made in the capture are not freed in it \
                 (first: {bytes} bytes at {p:#x}); the stand-in runs graphs that free what they \
                 allocate",
                g.left.len()
            ),
        );
    }
    *exec = handle(Arc::clone(g));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiate_v2(
    exec: *mut *mut c_void,
    graph: *mut c_void,
    flags: c_ulonglong,
) -> u32 {
    cuGraphInstantiateWithFlags(exec, graph, flags)
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: *mut c_void, stream: *mut c_void) -> u32 {
    let s = sticky();
    if s != CUDA_SUCCESS {
        return s;
    }
    if exec.is_null() {
        return fail(CUDA_ERROR_INVALID_VALUE, "cuGraphLaunch: null graph".into());
    }
    let g = Arc::clone(&*exec.cast::<Arc<Recorded>>());
    if capturing(stream) {
        // A graph launched into a capture becomes one step of the outer graph.
        return record(stream, "cuGraphLaunch", move || g.run());
    }
    match g.run() {
        Ok(()) => CUDA_SUCCESS,
        Err((code, msg)) => fail(code, format!("cuGraphLaunch: {msg}")),
    }
}

#[no_mangle]
pub extern "C" fn cuGraphUpload(_exec: *mut c_void, _stream: *mut c_void) -> u32 {
    sticky()
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: *mut c_void) -> u32 {
    drop_handle::<Arc<Recorded>>(exec);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(graph: *mut c_void) -> u32 {
    drop_handle::<Arc<Recorded>>(graph);
    CUDA_SUCCESS
}
