//! `mood info`: version, CPU features, threads, whether the CUDA libraries can be loaded and from
//! where, and device 0 (name, compute capability, memory, driver) when there is one.

use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    println!("mood {}", env!("CARGO_PKG_VERSION"));
    // The processor as stores record it (identity.device_name), then what its kernels use.
    println!("cpu: {}", crate::backend::cpu::describe());
    println!("cpu features: {}", cpu_features());
    println!("threads: {}", rayon::current_num_threads());
    println!("cuda: {}", cuda_status());
    #[cfg(feature = "cuda")]
    cuda_libraries();
    Ok(())
}

fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = Vec::new();
        macro_rules! feat {
            ($($name:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($name) { f.push($name); }
            )*};
        }
        feat!("sse4.2", "avx", "avx2", "fma", "avx512f");
        f.join(" ")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

#[cfg(feature = "cuda")]
fn cuda_status() -> String {
    // cudarc panics when a library is missing, so probe with dlopen first (is_culib_present).
    // SAFETY: these only attempt to dlopen the libraries and report success.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver {
        return "not found (no libcuda; the CPU backend is used)".into();
    }
    // SAFETY: as above.
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    // SAFETY: as above.
    let cublas = unsafe { cudarc::cublas::sys::is_culib_present() };
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) => format!(
            "driver found, {n} device(s); nvrtc {}, cublas {}",
            yes(nvrtc),
            yes(cublas)
        ),
        Err(e) => format!("driver found but unusable: {e}"),
    }
}

/// Where NVRTC, its headers and cuBLAS were found: the first things to check when kernels fail
/// to compile or load on a new machine.
#[cfg(feature = "cuda")]
fn cuda_libraries() {
    use crate::backend::cuda::{self, nvrtc};
    let shown = |p: Option<std::path::PathBuf>| match p {
        Some(p) => p.display().to_string(),
        None => "not found".to_string(),
    };
    match nvrtc::version() {
        Ok((major, minor)) => {
            println!("nvrtc: {major}.{minor} at {}", shown(nvrtc::library_path()));
            println!(
                "nvrtc headers (cuda_fp16.h, cuda_bf16.h): {}",
                match nvrtc::include_dir() {
                    Some(p) => p.display().to_string(),
                    None => "not found (set MOOD_CUDA_INCLUDE)".to_string(),
                }
            );
        }
        Err(_) => {
            println!("nvrtc: not found (put the directory of libnvrtc.so.13 on LD_LIBRARY_PATH)")
        }
    }
    let (blas, lt) = cuda::cublas_paths();
    println!("cublas: {}", shown(blas));
    println!("cublasLt: {}", shown(lt));
    println!("nvrtc cache: {}", shown(nvrtc::cache_dir()));
    let stems: Vec<&str> = cuda::kernel_sources().iter().map(|(s, _)| *s).collect();
    println!("kernels: {}", stems.join(" "));
    let mut archs: Vec<&str> = cuda::kernel_ptx().iter().map(|(_, a, _)| *a).collect();
    archs.sort_unstable();
    archs.dedup();
    println!(
        "embedded PTX: {}",
        if archs.is_empty() {
            "none (built without nvcc; NVRTC compiles the kernels at run time)".to_string()
        } else {
            format!("{} (nvcc at build time)", archs.join(" "))
        }
    );
    // SAFETY: only attempts dlopen. Without libcuda the `cuda:` line above has said so already.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return;
    }
    // The full check a CUDA run makes first (driver version, every library), then device 0.
    match cuda::CudaDevice::new(0) {
        Ok(dev) => println!("cuda device 0: {}", dev.describe()),
        Err(e) => println!("cuda device 0: unusable: {e}"),
    }
}

#[cfg(feature = "cuda")]
fn yes(b: bool) -> &'static str {
    if b {
        "found"
    } else {
        "not found"
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_status() -> String {
    "not compiled in (build with the `cuda` feature)".into()
}
