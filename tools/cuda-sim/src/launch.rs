//! cuLaunchKernel's work: copy the parameters, check every pointer parameter against the live
//! allocations, run the blocks of the grid over the stand-in's threads (each block on one OS
//! thread, its threads as fibers: cpp/runtime.cpp), then check the slack after every buffer the
//! kernel was handed. Errors carry CUDA's code and a one-line description.

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::memory;
use crate::table::KernelEntry;
use crate::{CUDA_ERROR_ILLEGAL_ADDRESS, CUDA_ERROR_LAUNCH_FAILED};

extern "C" {
    fn mood_sim_run_block(
        kernel: *const KernelEntry,
        grid: *const u32,
        block: *const u32,
        dyn_smem: u32,
        args: *mut *mut c_void,
        linear: u64,
        seed: u64,
        fault: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    pub fn mood_sim_install_fault_handler();
}

/// The thread order of every pass derives from this and the launch count, so a run repeats
/// exactly; MOOD_CUDA_SIM_SEED changes it.
fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static LAUNCHES: AtomicU64 = AtomicU64::new(0);
    let base = *SEED.get_or_init(|| {
        std::env::var("MOOD_CUDA_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed)
    });
    base ^ LAUNCHES
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

struct Args(Vec<*mut c_void>);
// SAFETY: the argument copies are only read while the launch runs.
unsafe impl Sync for Args {}

impl Args {
    fn to_vec(&self) -> Vec<*mut c_void> {
        self.0.clone()
    }
}

/// Copies of the parameter values `params` points at (cuLaunchKernel's kernelParams), one 8-byte
/// aligned buffer each: what a launch reads, and what a graph's kernel step keeps.
///
/// # Safety
/// `params` holds one valid pointer per kernel parameter, each to a value of its size.
pub unsafe fn copy_params(
    kernel: &'static KernelEntry,
    params: *mut *mut c_void,
) -> Result<Vec<Vec<u64>>, (u32, String)> {
    let name = kernel.name();
    let sizes = kernel.param_sizes();
    let mut storage: Vec<Vec<u64>> = Vec::with_capacity(sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        // SAFETY: the caller's contract.
        let src = unsafe { *params.add(i) } as *const u8;
        if src.is_null() {
            return Err((
                crate::CUDA_ERROR_INVALID_VALUE,
                format!("kernel {name}: kernelParams[{i}] is null"),
            ));
        }
        let mut v = vec![0u64; (size as usize).div_ceil(8).max(1)];
        // SAFETY: src points at `size` bytes (the caller's contract); v has room for them.
        unsafe { std::ptr::copy_nonoverlapping(src, v.as_mut_ptr().cast(), size as usize) };
        storage.push(v);
    }
    Ok(storage)
}

/// Runs `kernel` on the grid; `params` is cuLaunchKernel's kernelParams.
///
/// # Safety
/// `params` holds one valid pointer per kernel parameter, each to a value of its size.
pub unsafe fn run(
    kernel: &'static KernelEntry,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: u32,
    params: *mut *mut c_void,
) -> Result<(), (u32, String)> {
    // SAFETY: the caller's contract.
    let mut storage = unsafe { copy_params(kernel, params) }?;
    run_copied(kernel, grid, block, dyn_smem, &mut storage)
}

/// Runs `kernel` on the grid with parameter values copied by `copy_params`, after checking that
/// every pointer among them lies inside a live allocation.
pub fn run_copied(
    kernel: &'static KernelEntry,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: u32,
    storage: &mut [Vec<u64>],
) -> Result<(), (u32, String)> {
    let name = kernel.name();
    let mut buffers = Vec::new();
    for (i, (v, &is_ptr)) in storage.iter().zip(kernel.param_is_pointer()).enumerate() {
        if is_ptr == 1 && v[0] != 0 {
            let p = v[0];
            match memory::containing(p) {
                Some((base, _)) => buffers.push(base),
                None => {
                    return Err((
                        CUDA_ERROR_ILLEGAL_ADDRESS,
                        format!(
                            "kernel {name}: pointer argument {i} ({p:#x}) is not inside any live device allocation"
                        ),
                    ))
                }
            }
        }
    }
    let args = Args(storage.iter_mut().map(|v| v.as_mut_ptr().cast()).collect());
    let blocks = grid.iter().map(|&g| g as u64).product::<u64>();
    let seed = seed();
    let failed = AtomicBool::new(false);
    let first: Mutex<Option<(u32, String)>> = Mutex::new(None);
    (0..blocks).into_par_iter().for_each(|linear| {
        if failed.load(Ordering::Relaxed) {
            return;
        }
        let mut err = [0 as c_char; 512];
        let mut fault: *mut c_void = std::ptr::null_mut();
        let mut argv = args.to_vec();
        // SAFETY: the entry and the argument copies outlive the call; err has err.len() bytes.
        let rc = unsafe {
            mood_sim_run_block(
                kernel,
                grid.as_ptr(),
                block.as_ptr(),
                dyn_smem,
                argv.as_mut_ptr(),
                linear,
                seed,
                &mut fault,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            return;
        }
        failed.store(true, Ordering::Relaxed);
        // SAFETY: the runtime wrote a NUL-terminated message.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let e = if rc == 1 {
            let addr = fault as u64;
            let what = match memory::guarded_by(addr) {
                Some((base, size)) => format!(
                    "kernel {name} read or wrote past the end of a {size}-byte device buffer ({} bytes past it)",
                    addr - (base + size as u64)
                ),
                None => format!("{msg} (not inside any device buffer)"),
            };
            (CUDA_ERROR_ILLEGAL_ADDRESS, what)
        } else {
            (CUDA_ERROR_LAUNCH_FAILED, msg)
        };
        let mut f = first.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(e);
    });
    if let Some(e) = first.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    for base in buffers {
        memory::slack_intact(base)
            .map_err(|e| (CUDA_ERROR_ILLEGAL_ADDRESS, format!("kernel {name}: {e}")))?;
    }
    Ok(())
}
