//! `mood info`: version, CPU features, threads, and whether the CUDA libraries can be loaded.

use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    println!("mood {}", env!("CARGO_PKG_VERSION"));
    println!("cpu features: {}", cpu_features());
    println!("threads: {}", rayon::current_num_threads());
    println!("cuda: {}", cuda_status());
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
