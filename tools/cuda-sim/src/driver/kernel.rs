//! Modules, functions and launches on the stand-in: a module is the kernel list of the image mood
//! loads (`crate::module`), a function one of the host-compiled kernels (`crate::table`) with the
//! shared memory limits sm_90 enforces, and cuLaunchKernel checks the launch shape as a GPU does
//! before it runs the grid (`crate::launch`) or, on a capturing stream, records it (`graph`).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use super::{Result, SMEM_DEFAULT, SMEM_OPTIN};
use crate::graph;
use crate::table::KernelEntry;
use crate::*;

struct Module {
    kernels: HashMap<String, u32>,
    functions: Mutex<HashMap<String, Box<Function>>>,
}

struct Function {
    entry: &'static KernelEntry,
    static_smem: u32,
    max_dynamic_smem: AtomicU32,
}

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
