//! CUDA backend: the kernel sources (kernels/*.cu, embedded by build.rs), their NVRTC compilation
//! with a disk cache (`nvrtc`), the device (`device`: context, stream, cuBLAS, loaded modules), a
//! CUDA graph of the launches a closure queues (`graph`), and one launcher file per kernel family,
//! with the same stems as the CPU ops (`layernorm`, `attention`, `distance`, ...) plus `matmul`
//! (cuBLAS) and `lt` (cuBLASLt, the bias in the GEMM).
//!
//! Every entry point checks that the CUDA library it needs can be dlopened before touching cudarc,
//! because cudarc panics when a library is missing; a missing library is an `Error::Cuda`.

/// Launches kernel `$f` (called `$name` in errors) with launch shape `$cfg` and the arguments in
/// brackets, after the driver confirms that the kernel takes exactly that many parameters
/// (`CudaDevice::check_arity`): a launcher that drifted from its kernel is an error, where a GPU would
/// read garbage arguments. Expands to an unsafe launch: call it inside `unsafe` with the usual
/// SAFETY comment on the buffers.
macro_rules! launch {
    ($dev:expr, $f:expr, $name:expr, $cfg:expr, [$($arg:expr),+ $(,)?]) => {{
        let given = [$(stringify!($arg)),+].len();
        match $dev.check_arity(&$f, &$name, given) {
            Err(e) => Err(e),
            Ok(()) => $dev
                .stream()
                .launch_builder(&$f)
                $(.arg($arg))+
                .launch($cfg)
                .map(|_| ())
                .map_err($crate::backend::cuda::device::cuda_err($name)),
        }
    }};
}

pub mod attention;
pub mod conv;
pub mod conv_grad;
pub mod device;
pub mod distance;
pub mod elementwise;
pub mod flash_attention;
pub mod graph;
pub mod groupnorm;
pub mod layernorm;
pub mod loss;
pub mod lt;
pub mod matmul;
pub mod nvrtc;
pub mod optim;
pub mod patch_embed;
pub mod relpos;
pub mod softmax;
pub mod tensor_core;

pub use device::{probe, CudaDevice};

/// An element type the kernels store: the entry-point suffix it selects (`layernorm_fwd_bf16`) and
/// the host-side conversions the tests and uploads need. Arithmetic is always f32 in the kernels.
pub trait Storage:
    cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Default + 'static
{
    const NAME: &'static str;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Storage for f32 {
    const NAME: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Storage for half::bf16 {
    const NAME: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl Storage for half::f16 {
    const NAME: &'static str = "f16";
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// The raw device address of an optional buffer, 0 (the kernels' null) for None. Event tracking
/// is off (`CudaDevice::new`), so the guard cudarc returns records nothing and can drop here.
pub(crate) fn ptr_or_null<T>(
    stream: &cudarc::driver::CudaStream,
    s: Option<&cudarc::driver::CudaSlice<T>>,
) -> u64 {
    use cudarc::driver::DevicePtr;
    s.map_or(0, |s| s.device_ptr(stream).0)
}

/// As `ptr_or_null`, for a buffer the kernel writes.
pub(crate) fn ptr_mut_or_null<T>(
    stream: &cudarc::driver::CudaStream,
    s: Option<&mut cudarc::driver::CudaSlice<T>>,
) -> u64 {
    use cudarc::driver::DevicePtrMut;
    s.map_or(0, |s| s.device_ptr_mut(stream).0)
}

use std::path::PathBuf;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// (stem, CUDA C++ source) of every kernel family, sorted by stem: `attention`, `distance`, ...
pub fn kernel_sources() -> &'static [(&'static str, &'static str)] {
    generated::KERNEL_SOURCES
}

/// The source of one kernel family by stem.
pub fn kernel_source(stem: &str) -> Option<&'static str> {
    kernel_sources()
        .iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, src)| *src)
}

/// (file name, source) of every kernels/*.cuh header, sorted by name: `tensor_core.cuh`, ...
pub fn kernel_headers() -> &'static [(&'static str, &'static str)] {
    generated::KERNEL_HEADERS
}

/// `source` with each `#include "NAME"` of an embedded kernels/*.cuh replaced by the header's text
/// (NVRTC compiles a string and has no kernels/ directory to search), between `#line` markers so
/// that compiler messages still name the right file and line. Other includes stay as they are.
pub fn with_headers(source: &str, file: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for (i, line) in source.lines().enumerate() {
        let name = line
            .trim()
            .strip_prefix("#include")
            .map(str::trim)
            .and_then(|r| r.strip_prefix('"'))
            .and_then(|r| r.split('"').next());
        match name.and_then(|n| kernel_headers().iter().find(|(h, _)| *h == n)) {
            Some((h, text)) => {
                out.push_str(&format!("#line 1 \"{h}\"\n{text}\n"));
                out.push_str(&format!("#line {} \"{file}\"\n", i + 2));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// (stem, arch, PTX) compiled by nvcc at build time (build.rs); empty when the build had no nvcc.
pub fn kernel_ptx() -> &'static [(&'static str, &'static str, &'static str)] {
    generated::KERNEL_PTX
}

/// The embedded PTX of `stem` for the newest `compute_XY` a device of `capability` (major, minor)
/// can run, i.e. XY <= its capability: (arch, PTX). None if there is none (then NVRTC compiles).
pub fn embedded_ptx_for<'a>(
    entries: &[(&'a str, &'a str, &'a str)],
    stem: &str,
    capability: (i32, i32),
) -> Option<(&'a str, &'a str)> {
    let device = capability.0 * 10 + capability.1;
    entries
        .iter()
        .filter(|(s, _, _)| *s == stem)
        .filter_map(|&(_, arch, ptx)| {
            let n: i32 = arch.strip_prefix("compute_")?.parse().ok()?;
            (n <= device).then_some((n, arch, ptx))
        })
        .max_by_key(|(n, _, _)| *n)
        .map(|(_, arch, ptx)| (arch, ptx))
}

/// The file the dynamic loader mapped for a library already loaded in this process, read from
/// /proc/self/maps (cudarc keeps its handles private). `prefix` is e.g. `libnvrtc`: names
/// `prefix.so…` and `prefix64…` match, so libnvrtc-builtins and libcublasLt are not taken for
/// libnvrtc and libcublas. Linux only; elsewhere None.
pub fn loaded_library(prefix: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with(".so") || rest.starts_with("64"))
            })
        })
}

/// Where libcublas and libcublasLt were found, loading them if present (they load without a GPU);
/// None for a library the loader cannot find.
pub fn cublas_paths() -> (Option<PathBuf>, Option<PathBuf>) {
    // SAFETY: is_culib_present only attempts dlopen; culib() runs only once it succeeded and just
    // keeps the library loaded.
    let blas = unsafe { cudarc::cublas::sys::is_culib_present() }
        .then(|| {
            unsafe { cudarc::cublas::sys::culib() };
            loaded_library("libcublas")
        })
        .flatten();
    // SAFETY: as above.
    let lt = unsafe { cudarc::cublaslt::sys::is_culib_present() }
        .then(|| {
            unsafe { cudarc::cublaslt::sys::culib() };
            loaded_library("libcublasLt")
        })
        .flatten();
    (blas, lt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_ptx_when_built_with_nvcc_covers_every_kernel_file() {
        let ptx = kernel_ptx();
        if ptx.is_empty() {
            return; // built without nvcc (CI): NVRTC is the only path
        }
        for (stem, _) in kernel_sources() {
            for arch in ["compute_80", "compute_90"] {
                let (_, _, text) = ptx
                    .iter()
                    .find(|(s, a, _)| s == stem && *a == arch)
                    .unwrap_or_else(|| panic!("no embedded PTX for {stem}.cu {arch}"));
                let target = arch.replace("compute_", ".target sm_");
                assert!(text.contains(&target), "{stem}.cu {arch}: no `{target}`");
                assert!(
                    text.contains(".visible .entry"),
                    "{stem}.cu {arch}: no entry"
                );
            }
        }
    }

    #[test]
    fn embedded_ptx_is_the_newest_arch_the_device_runs() {
        let e = [
            ("softmax", "compute_80", "ptx80"),
            ("softmax", "compute_90", "ptx90"),
            ("layernorm", "compute_80", "ln80"),
            ("softmax", "sm_70", "not ptx"),
        ];
        assert_eq!(
            embedded_ptx_for(&e, "softmax", (9, 0)),
            Some(("compute_90", "ptx90"))
        );
        assert_eq!(
            embedded_ptx_for(&e, "softmax", (10, 0)),
            Some(("compute_90", "ptx90"))
        );
        assert_eq!(
            embedded_ptx_for(&e, "softmax", (8, 9)),
            Some(("compute_80", "ptx80"))
        );
        assert_eq!(embedded_ptx_for(&e, "softmax", (7, 5)), None);
        assert_eq!(embedded_ptx_for(&e, "attention", (9, 0)), None);
        assert_eq!(
            embedded_ptx_for(&e, "layernorm", (9, 0)),
            Some(("compute_80", "ln80"))
        );
    }

    #[test]
    fn embedded_headers_are_spliced_in_with_line_markers() {
        assert!(kernel_headers()
            .iter()
            .any(|(h, _)| *h == "tensor_core.cuh"));
        let src = "// x\n#include <cuda_bf16.h>\n#include \"tensor_core.cuh\"\nint y;\n";
        let out = with_headers(src, "t.cu");
        assert!(out.contains("#include <cuda_bf16.h>"));
        assert!(out.contains("#line 1 \"tensor_core.cuh\"\n// Tensor-core"));
        assert!(out.contains("tc_mma_bf16"));
        assert!(out.ends_with("#line 4 \"t.cu\"\nint y;\n"));
        assert_eq!(
            with_headers("#include \"nope.cuh\"\n", "t.cu"),
            "#include \"nope.cuh\"\n"
        );
    }

    #[test]
    fn every_kernel_file_is_embedded_with_its_header() {
        let stems: Vec<&str> = kernel_sources().iter().map(|(s, _)| *s).collect();
        for want in [
            "attention",
            "conv",
            "conv_grad",
            "distance",
            "elementwise",
            "flash_attention",
            "groupnorm",
            "layernorm",
            "loss",
            "optim",
            "patch_embed",
            "relpos",
            "softmax",
            "tensor_core",
        ] {
            assert!(stems.contains(&want), "kernels/{want}.cu not embedded");
        }
        for (stem, src) in kernel_sources() {
            // House rule: a kernel file opens with the math it computes and its launch shape.
            assert!(src.starts_with("//"), "{stem}.cu must open with a comment");
            assert!(src.contains("Launch shape"), "{stem}.cu: no launch shape");
        }
    }
}
