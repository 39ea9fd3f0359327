//! The CPU backend: the reference semantics of every op, fast enough to be the baseline
//! (rayon across rows/heads, the `gemm` crate for products, AVX2 exp/erf chosen at run time).
//! One file per op family; the same stems name the CUDA kernels.

pub mod attention;
pub mod conv;
pub mod conv_grad;
pub mod elementwise;
pub mod groupnorm;
pub mod layernorm;
pub mod matmul;
pub mod patch_embed;
pub mod reduce;
pub mod vecmath;

/// This machine's processor as a record says it: the model name of /proc/cpuinfo (or the
/// architecture where there is none) and the threads the computation runs on. Two CPUs may round
/// differently (AVX2 vs AVX-512 kernels), so stores record it; they still combine (see
/// `store::Identity::device`).
pub fn describe() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{model}, {} threads", rayon::current_num_threads())
}
