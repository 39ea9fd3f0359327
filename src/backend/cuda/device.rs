//! One CUDA device ready for the launchers: the primary context, one stream that every kernel and
//! cuBLAS call is queued on, a cuBLAS handle bound to that stream, and the kernel modules, each
//! compiled by NVRTC (through the disk cache) for this device's compute capability the first time
//! one of its kernels is asked for.
//!
//! cudarc panics when a CUDA library cannot be dlopened, so `probe` checks every library it will
//! need, the device count and the driver version before anything else touches cudarc; each
//! failure is a one-line `Error::Cuda` saying what is missing and how to fix it.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError,
    LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::nvrtc::{self, Target};
use crate::error::{Error, Result};

/// The driver API version this build is compiled against (cudarc's `cuda-13000` feature): CUDA
/// 13.0, i.e. driver 580 or newer. NVRTC 13.0 also emits PTX 9.0, which older drivers reject.
pub const MIN_DRIVER_VERSION: i32 = 13000;

/// Maps any cudarc error to a one-line `Error::Cuda` naming the step that failed.
pub fn cuda_err<E: Debug>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
    let what = what.into();
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

/// As `cuda_err` for allocations and uploads: CUDA_ERROR_OUT_OF_MEMORY becomes
/// `Error::CudaOutOfMemory`, which callers that know the batch turn into advice.
fn alloc_err(what: String) -> impl FnOnce(DriverError) -> Error {
    move |e| {
        if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::CudaOutOfMemory(what)
        } else {
            Error::Cuda(format!("{what}: {e:?}"))
        }
    }
}

/// What `probe` found: the number of devices and the driver's CUDA version (e.g. 13000).
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub devices: usize,
    pub driver_version: i32,
}

/// Checks, in order, everything a `CudaDevice` needs, without any call that could panic:
/// libcuda, at least one device, a driver new enough, libnvrtc, libcublas(Lt).
pub fn probe() -> Result<Probe> {
    // SAFETY: is_culib_present only attempts dlopen of the candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Cuda(
            "no NVIDIA driver: libcuda.so.1 cannot be loaded (no GPU on this machine?)".into(),
        ));
    }
    let devices = CudaContext::device_count()
        .map_err(|e| Error::Cuda(format!("the NVIDIA driver is present but unusable: {e:?}")))?;
    if devices <= 0 {
        return Err(Error::Cuda("no CUDA device found".into()));
    }
    let mut driver_version = 0;
    // SAFETY: libcuda is loaded (checked above); the out-pointer is valid.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(cuda_err("cuDriverGetVersion"))?;
    if driver_version < MIN_DRIVER_VERSION {
        return Err(Error::Cuda(format!(
            "driver too old: it supports CUDA {}.{}, this build needs {}.{} (driver 580 or newer)",
            driver_version / 1000,
            driver_version % 1000 / 10,
            MIN_DRIVER_VERSION / 1000,
            MIN_DRIVER_VERSION % 1000 / 10
        )));
    }
    if !nvrtc::available() {
        return Err(Error::Cuda(
            "libnvrtc.so.13 not found: put the CUDA 13 lib directory (toolkit or pip wheel \
             nvidia/cu13/lib) on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    // SAFETY: as above, dlopen attempts only.
    let blas = unsafe { cudarc::cublas::sys::is_culib_present() }
        && unsafe { cudarc::cublaslt::sys::is_culib_present() };
    if !blas {
        return Err(Error::Cuda(
            "libcublas.so.13 / libcublasLt.so.13 not found: put their directory on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(Probe {
        devices: devices as usize,
        driver_version,
    })
}

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    name: String,
    capability: (i32, i32),
    sm_count: u32,
    driver_version: i32,
    /// NVRTC target: `sm_XY` (a CUBIN, no JIT at load) unless `MOOD_CUDA_ARCH` says otherwise.
    arch: String,
    /// `MOOD_CUDA_ARCH` was set: compile for it with NVRTC, never load the embedded nvcc PTX.
    arch_forced: bool,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    /// Parameter counts of the kernels launched so far, by name (`check_arity`).
    arity: Mutex<HashMap<String, usize>>,
}

/// Sets the default memory pool's release threshold to "never": by default the pool hands its
/// memory back to the driver at every synchronisation, so each batch's forward would allocate
/// from the driver again. Devices without memory pools (cudarc then allocates synchronously)
/// are left as they are.
fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    let pools = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .map_err(cuda_err("memory pool support"))?;
    if pools == 0 {
        return Ok(());
    }
    let pool = default_pool(ctx)?;
    let mut threshold = u64::MAX;
    // SAFETY: a plain driver call on the device's own pool with a valid value pointer.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(cuda_err("memory pool release threshold"))?;
    }
    Ok(())
}

fn default_pool(ctx: &CudaContext) -> Result<sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: a plain driver call on the context's own device with a valid out-pointer.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(cuda_err("default memory pool"))?;
    Ok(pool)
}

/// The default memory pool's release threshold (bytes kept across synchronisations).
pub fn pool_release_threshold(dev: &CudaDevice) -> Result<u64> {
    let pool = default_pool(&dev.ctx)?;
    let mut threshold = 0u64;
    // SAFETY: as in `keep_pool_memory`.
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(cuda_err("memory pool release threshold"))?;
    }
    Ok(threshold)
}

impl CudaDevice {
    /// Opens device `ordinal` after `probe` succeeded.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let p = probe()?;
        if ordinal >= p.devices {
            return Err(Error::Cuda(format!(
                "device {ordinal} requested but only {} found",
                p.devices
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("create context"))?;
        // Everything runs on one stream, whose order is the only synchronisation needed, so the
        // per-launch events cudarc records for cross-stream safety are pure overhead.
        // SAFETY: no slice is ever used on a second stream (the struct owns the only one).
        unsafe { ctx.disable_event_tracking() };
        // A created stream, not the legacy default one: only a created stream can be captured
        // into a CUDA graph (`super::graph`).
        let stream = ctx.new_stream().map_err(cuda_err("create stream"))?;
        keep_pool_memory(&ctx)?;
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err("create cuBLAS handle"))?;
        let name = ctx.name().map_err(cuda_err("device name"))?;
        let capability = ctx
            .compute_capability()
            .map_err(cuda_err("compute capability"))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("SM count"))? as u32;
        let forced = std::env::var("MOOD_CUDA_ARCH")
            .ok()
            .filter(|a| !a.is_empty());
        let arch_forced = forced.is_some();
        let arch = forced.unwrap_or_else(|| format!("sm_{}{}", capability.0, capability.1));
        Target::of_arch(&arch)?;
        Ok(CudaDevice {
            ctx,
            stream,
            blas,
            name,
            capability,
            sm_count: sm_count.max(1),
            driver_version: p.driver_version,
            arch,
            arch_forced,
            modules: Mutex::new(HashMap::new()),
            arity: Mutex::new(HashMap::new()),
        })
    }

    /// One line for logs: name, compute capability, SMs, memory, driver, where kernels come from.
    pub fn describe(&self) -> String {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let memory = match self.memory() {
            Ok((free, total)) => format!("{:.1} GiB, {:.1} GiB free", gib(total), gib(free)),
            Err(_) => "memory unknown".to_string(),
        };
        // Every kernel file is embedded for the same archs, so one stem stands for all.
        let embedded = super::embedded_ptx_for(super::kernel_ptx(), "softmax", self.capability)
            .filter(|_| !self.arch_forced);
        let kernels = match embedded {
            Some((arch, _)) => format!("kernels: nvcc PTX {arch} embedded at build time"),
            None => format!("kernels built by NVRTC for {}", self.arch),
        };
        format!(
            "{} (sm_{}{}, {} SMs, {memory}, driver CUDA {}.{}, {kernels})",
            self.name,
            self.capability.0,
            self.capability.1,
            self.sm_count,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10,
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(cuda_err("device memory"))
    }

    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// The kernel `name` of kernels/<stem>.cu, compiling and loading the module on first use.
    pub fn function(&self, stem: &str, name: &str) -> Result<CudaFunction> {
        let module = {
            let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match mods.get(stem) {
                Some(m) => m.clone(),
                None => {
                    let m = self.load_module(stem)?;
                    mods.insert(stem.to_string(), m.clone());
                    m
                }
            }
        };
        module
            .load_function(name)
            .map_err(cuda_err(format!("kernel `{name}` in {stem}.cu")))
    }

    /// nvcc's PTX embedded at build time when there is one this GPU runs (`embedded_ptx_for`),
    /// else NVRTC. A driver that refuses the embedded PTX (e.g. newer than it can JIT) only costs
    /// a note and the NVRTC path.
    fn load_module(&self, stem: &str) -> Result<Arc<CudaModule>> {
        let embedded = super::embedded_ptx_for(super::kernel_ptx(), stem, self.capability);
        if let Some((arch, ptx)) = embedded.filter(|_| !self.arch_forced) {
            match self.ctx.load_module(Ptx::from_src(ptx.to_string())) {
                Ok(m) => return Ok(m),
                Err(e) => eprintln!(
                    "note: embedded {stem}.cu PTX ({arch}) refused by the driver ({e:?}); compiling with NVRTC"
                ),
            }
        }
        self.load_module_nvrtc(stem)
    }

    fn load_module_nvrtc(&self, stem: &str) -> Result<Arc<CudaModule>> {
        match self.load_module_for(stem, &self.arch) {
            Ok(m) => Ok(m),
            // A CUBIN the driver refuses (or an NVRTC that does not know this sm_XY) may still
            // work as PTX, which the driver JIT-compiles; say both reasons if that fails too.
            Err(first) if self.arch.starts_with("sm_") => {
                let ptx_arch = self.arch.replacen("sm_", "compute_", 1);
                self.load_module_for(stem, &ptx_arch)
                    .map_err(|second| Error::Cuda(format!("{first}; then as PTX: {second}")))
            }
            Err(e) => Err(e),
        }
    }

    fn load_module_for(&self, stem: &str, arch: &str) -> Result<Arc<CudaModule>> {
        let compiled = nvrtc::compile(stem, arch, &[])?;
        let image = match compiled.target {
            Target::Cubin => Ptx::from_binary(compiled.image),
            Target::Ptx => {
                // NVRTC's PTX ends in a NUL that CString::new (inside cudarc) would reject.
                let text = String::from_utf8_lossy(&compiled.image);
                Ptx::from_src(text.trim_end_matches('\0').to_string())
            }
        };
        self.ctx
            .load_module(image)
            .map_err(cuda_err(format!("load {stem}.cu ({arch})")))
    }

    /// Checks that kernel `f` (called `name`) takes `given` parameters: a launcher that passes
    /// another number would have the GPU read garbage as arguments. The driver is asked once per
    /// kernel name; launches after the first are a map lookup.
    pub fn check_arity(&self, f: &CudaFunction, name: &str, given: usize) -> Result<()> {
        let n = {
            let mut known = self.arity.lock().unwrap_or_else(|e| e.into_inner());
            *known
                .entry(name.to_string())
                .or_insert_with(|| param_count(f))
        };
        if n != given {
            return Err(Error::Cuda(format!(
                "kernel {name} takes {n} parameters, its launcher passes {given}"
            )));
        }
        Ok(())
    }

    /// Compiles and loads every kernel family now (so that timings exclude NVRTC).
    pub fn load_all(&self) -> Result<()> {
        for (stem, _) in super::kernel_sources() {
            let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            if !mods.contains_key(*stem) {
                let m = self.load_module(stem)?;
                mods.insert(stem.to_string(), m);
            }
        }
        Ok(())
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(alloc_err(format!("upload {} elements", host.len())))
    }

    /// Copies device memory back (waits for the queued work that produces it).
    pub fn download<T: DeviceRepr + Clone + Default>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        let v = self
            .stream
            .clone_dtoh(dev)
            .map_err(cuda_err(format!("download {} elements", dev.len())))?;
        self.sync()?;
        Ok(v)
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n)
            .map_err(alloc_err(format!("allocate {n} elements")))
    }

    /// A buffer for a kernel that writes all of it before anything reads it: no zero fill (on
    /// the CPU stand-in for CUDA every allocation starts as 0xFF bytes, NaN in every float type,
    /// so a read before the write shows up in the parity tests).
    pub fn empty<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: cudarc marks uninitialised device memory unsafe to hand out; every caller
        // writes the whole buffer with a kernel or a GEMM before reading it.
        unsafe { self.stream.alloc::<T>(n) }.map_err(alloc_err(format!("allocate {n} elements")))
    }

    /// Waits for everything queued; a kernel fault surfaces here.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    /// The launch shape of the grid-stride kernels: 256 threads, at most 8 blocks per SM.
    pub fn grid_stride(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 8 * self.sm_count as usize);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The launch shape of the one-warp-per-row kernels: 4 warps per block.
    pub fn warp_per_row(&self, rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(4).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The number of parameters kernel `f` takes, asked of the driver: it answers
/// CUDA_ERROR_INVALID_VALUE for an index past the last one.
fn param_count(f: &CudaFunction) -> usize {
    let exists = |i: usize| {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: a live function handle and valid out-pointers.
        let r = unsafe { sys::cuFuncGetParamInfo(f.cu_function(), i, &mut offset, &mut size) };
        r == sys::CUresult::CUDA_SUCCESS
    };
    (0..256).find(|&i| !exists(i)).unwrap_or(256)
}

/// A kernel argument that a `u32`/`i32` must hold; sizes beyond it are an error, not a wrap.
pub fn as_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda(format!("{what} = {v} exceeds the kernel's i32")))
}

/// Checks that a device buffer holds exactly `want` elements.
pub fn check_len<T>(what: &str, s: &CudaSlice<T>, want: usize) -> Result<()> {
    if s.len() != want {
        return Err(Error::Cuda(format!(
            "{what}: device buffer holds {} elements, the shape needs {want}",
            s.len()
        )));
    }
    Ok(())
}

/// An output of `n` elements must exist: CUDA allocates no empty buffer (0-byte allocations are
/// refused), and an empty gradient is a caller's shape mistake, said in one line rather than as
/// a failed allocation.
pub fn nonempty(what: &str, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Cuda(format!(
            "{what}: empty shape (no device buffer holds zero elements)"
        )));
    }
    Ok(())
}

/// Refuses f16 storage for the ops that exist in f32 and bf16 only.
pub fn f32_or_bf16<T: super::Storage>(op: &str) -> Result<()> {
    if T::NAME == "f16" {
        return Err(Error::Cuda(format!("{op}: f32 or bf16 only")));
    }
    Ok(())
}
