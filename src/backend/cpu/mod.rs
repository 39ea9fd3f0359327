//! The CPU backend: the reference semantics of every op, fast enough to be the baseline
//! (rayon across rows/heads, the `gemm` crate for products, AVX2 exp/erf chosen at run time).
//! One file per op family; the same stems name the CUDA kernels.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod layernorm;
pub mod matmul;
pub mod patch_embed;
pub mod reduce;
pub mod vecmath;
