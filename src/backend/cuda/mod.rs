//! CUDA backend. So far: the kernel sources (kernels/*.cu, embedded by build.rs) and their NVRTC
//! compilation with a disk cache (`nvrtc`). Launchers, one per kernel family, come next and reuse
//! the same stems as the CPU ops (`layernorm`, `attention`, `distance`, ...).
//!
//! Every entry point checks that the CUDA library it needs can be dlopened before touching cudarc,
//! because cudarc panics when a library is missing; a missing library is an `Error::Cuda`.

pub mod nvrtc;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_embedded_with_its_header() {
        let stems: Vec<&str> = kernel_sources().iter().map(|(s, _)| *s).collect();
        for want in [
            "attention",
            "distance",
            "elementwise",
            "layernorm",
            "patch_embed",
            "softmax",
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
