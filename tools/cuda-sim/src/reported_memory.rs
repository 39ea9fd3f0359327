//! The device memory the stand-in reports (cuMemGetInfo, cuDeviceTotalMem): the host's, unless
//! `MOOD_CUDA_SIM_MEMORY_MIB` sets a total, so that a test can make a batch too large for the
//! "device" without allocating anything near the host's memory. With it set, free is the total
//! less what live buffers hold (cuMemGetInfo subtracts those), and an allocation that would take
//! the live buffers past the total fails with CUDA_ERROR_OUT_OF_MEMORY, as on a GPU of that size.

/// The total set by `MOOD_CUDA_SIM_MEMORY_MIB`, in bytes.
pub fn limit() -> Option<usize> {
    std::env::var("MOOD_CUDA_SIM_MEMORY_MIB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|mib| mib.saturating_mul(1 << 20))
}

/// (free, total) bytes: `host` as measured, or the total asked for by the environment, all free.
pub fn reported(host: (usize, usize)) -> (usize, usize) {
    match limit() {
        Some(total) => (total, total),
        None => host,
    }
}
