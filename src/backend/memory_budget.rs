//! Batch sizing against free device memory, shared by the model's forward (model/gpu_memory.rs)
//! and the GPU OOD scorer (ood/cuda_score.rs), which must not depend on each other.

/// Headroom for what the estimates do not see: cuBLAS workspaces (32 MiB on Hopper), the
/// allocator's rounding, the driver's own reservations after a first launch.
pub const HEADROOM_BYTES: usize = 128 << 20;

/// The largest batch whose activations fit in `free_bytes` after `fixed_bytes`; 0 if not even one.
pub fn max_batch_that_fits(free_bytes: usize, per_image_bytes: usize, fixed_bytes: usize) -> usize {
    free_bytes.saturating_sub(fixed_bytes) / per_image_bytes.max(1)
}
