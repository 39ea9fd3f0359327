//! How much device memory a CUDA forward batch needs, so that a batch too large for the GPU fails
//! before anything is allocated, naming a batch that fits. Pure arithmetic over the config (no
//! CUDA here), mirroring the buffers `cuda_vit::CudaVit::forward_device` allocates; the weights are
//! not counted because they are already resident when the check runs (free memory excludes them).

use crate::backend::Precision;
use crate::model::VitConfig;

pub use crate::backend::memory_budget::{max_batch_that_fits, HEADROOM_BYTES};

/// Bytes of one element of the activations between ops (the GEMM operands).
pub fn element_bytes(precision: Precision) -> usize {
    match precision {
        Precision::F32 => 4,
        Precision::Bf16 => 2,
    }
}

/// Device bytes one more image adds to a forward batch: the image, the patch embedding's im2col
/// columns and output (f32), the f32 residual stream, the per-block buffers (LayerNorm output,
/// qkv, attention output, projection, MLP hidden; plus the bf16 copy of the residual for the
/// LayerNorm input), and the pooled features, features and logits.
pub fn activation_bytes_per_image(cfg: &VitConfig, precision: Precision) -> usize {
    let e = element_bytes(precision);
    let (n, d, f) = (cfg.tokens(), cfg.embed_dim, cfg.mlp_hidden);
    let patches = n.saturating_sub(1);
    let image = cfg.in_chans * cfg.img_size * cfg.img_size * 4;
    let patch_embed = patches * (cfg.in_chans * cfg.patch_size * cfg.patch_size + d) * 4;
    let residual = n * d * 4;
    let ln_input = if precision == Precision::F32 {
        0
    } else {
        n * d * e
    };
    let block = n * (d + 3 * d + d + d + f) * e;
    let outputs = (2 * d + cfg.num_classes) * 4;
    image + patch_embed + residual + ln_input + block + outputs
}

/// Device bytes a forward needs whatever the batch: attention's score buffers, sized for one
/// image (the cuBLAS path: f32 scores and probabilities, plus their bf16 copy in bf16), and
/// `HEADROOM_BYTES`.
pub fn fixed_bytes(cfg: &VitConfig, precision: Precision, attention_gemm: bool) -> usize {
    let hnn = cfg.num_heads * cfg.tokens() * cfg.tokens();
    let scratch = match (precision, attention_gemm) {
        (Precision::F32, _) => 2 * hnn * 4,
        (Precision::Bf16, true) => 2 * hnn * 4 + hnn * 2,
        (Precision::Bf16, false) => 0,
    };
    scratch + HEADROOM_BYTES
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
    fn activations_scale_with_precision_and_model_size() {
        let base = VitConfig::preset("beit_base_patch16_224").unwrap();
        let f32b = activation_bytes_per_image(&base, Precision::F32);
        let bf16b = activation_bytes_per_image(&base, Precision::Bf16);
        assert!(bf16b < f32b, "bf16 {bf16b} >= f32 {f32b}");
        // BEiT-base, f32: 197 tokens × 4 B × (768 residual + 6·768 + 3072 block) = 6.7 MB, plus
        // the image (0.6 MB) and the patch embedding (1.2 MB): about 8.5 MB per image.
        assert!((8_000_000..9_000_000).contains(&f32b), "{f32b}");
        let large = VitConfig::preset("beit_large_patch16_224").unwrap();
        assert!(activation_bytes_per_image(&large, Precision::F32) > f32b);
        let hnn = 12 * 197 * 197;
        assert_eq!(
            fixed_bytes(&base, Precision::F32, false),
            8 * hnn + HEADROOM_BYTES
        );
        assert_eq!(fixed_bytes(&base, Precision::Bf16, false), HEADROOM_BYTES);
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
