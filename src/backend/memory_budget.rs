//! Batch sizing against free device memory, shared by the model's CUDA forward
//! (model/cuda_model.rs, which measures its executor's buffer plan) and the GPU OOD scorer
//! (ood/cuda_score.rs), which must not depend on each other.

/// Headroom for what the buffer plans do not see: cuBLAS workspaces (32 MiB on Hopper), the
/// allocator's rounding, the driver's own reservations after a first launch.
pub const HEADROOM_BYTES: usize = 128 << 20;

/// The most scratch, in bytes, that ALPA's cross terms (and their backward) take at once: the
/// M × M view pairs are processed in blocks of query views × source views small enough that a
/// block's scores, their gradients and its attended values fit. At BEiT's sizes (M = 64 views,
/// T = 196 tokens, d = 80) all pairs at once would take about 1.5 GB; 256 MiB still makes each
/// block's GEMMs large (hundreds of view pairs, K = T or N = T·views), so the GPU stays busy while
/// the loss leaves most of the memory to the model. A single pair larger than this (T above
/// about 5,800 tokens) still runs, one pair per block.
/// (Here, outside the CUDA backend, so that the training memory estimate counts it in every
/// build.)
pub const ALPA_SCRATCH_BYTES: usize = 256 << 20;

/// The largest batch whose activations fit in `free_bytes` after `fixed_bytes`; 0 if not even one.
pub fn max_batch_that_fits(free_bytes: usize, per_image_bytes: usize, fixed_bytes: usize) -> usize {
    free_bytes.saturating_sub(fixed_bytes) / per_image_bytes.max(1)
}

/// The one-line explanation of a batch that does not fit, with the batch that would.
pub fn batch_too_large(
    batch: usize,
    free_bytes: usize,
    per_image_bytes: usize,
    fixed_bytes: usize,
) -> String {
    let mib = |b: usize| b.div_ceil(1 << 20);
    let need = batch
        .saturating_mul(per_image_bytes)
        .saturating_add(fixed_bytes);
    let fits = max_batch_that_fits(free_bytes, per_image_bytes, fixed_bytes);
    let advice = if fits == 0 {
        "not even one image fits: free GPU memory (other processes?) or use --precision bf16"
            .to_string()
    } else {
        format!("use --batch {fits} or less")
    };
    format!(
        "out of GPU memory: --batch {batch} needs about {} MiB, {} MiB are free; {advice}",
        mib(need),
        mib(free_bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_batch_divides_what_is_left_after_the_fixed_part() {
        assert_eq!(max_batch_that_fits(1000, 100, 0), 10);
        assert_eq!(max_batch_that_fits(1000, 100, 150), 8);
        assert_eq!(max_batch_that_fits(1000, 100, 1000), 0);
        assert_eq!(max_batch_that_fits(100, 100, 1000), 0, "no underflow");
        assert_eq!(max_batch_that_fits(1000, 0, 0), 1000, "no division by zero");
    }

    #[test]
    fn the_message_names_the_batch_asked_and_one_that_fits() {
        let m = batch_too_large(512, 1 << 30, 4 << 20, 128 << 20);
        assert!(m.contains("--batch 512"), "{m}");
        assert!(m.contains("use --batch 224 or less"), "{m}");
        assert!(!m.contains('\n'));
        let m = batch_too_large(8, 100 << 20, 4 << 20, 128 << 20);
        assert!(m.contains("not even one image fits"), "{m}");
    }
}
