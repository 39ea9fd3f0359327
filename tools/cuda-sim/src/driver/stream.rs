//! Streams and events on the stand-in. Every call runs to completion before it returns, so a
//! stream is only a handle (and, while it captures, a recording: `graph`) and an event a time
//! stamp taken when it is recorded.

use std::ffi::{c_int, c_uint, c_void};
use std::time::Instant;

use super::Result;
use crate::graph;
use crate::*;

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
