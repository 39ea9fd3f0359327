//! Masked image modelling (MOOD's pretext task) with a pixel-regression target.
//!
//! BEiT predicts the discrete tokens of a dVAE tokenizer for masked patches; we ship no tokenizer,
//! so the target is the patch's own pixels, normalised per patch (mean 0, unit variance, as MAE's
//! `norm_pix_loss` and SimMIM's regression). Masking is BEiT's block-wise scheme; the encoder, mask
//! token and relative-position tables are exactly BEiT's, so the pretrained encoder fine-tunes and
//! extracts features like any BEiT checkpoint. The head is one linear layer D → P·P·C (`mim_head`).

use crate::model::init::Rng;

/// BEiT's block-wise masking on a gh×gw grid: repeatedly mask random rectangles (area uniform in
/// [min_patches, remaining], aspect ratio log-uniform in [0.3, 1/0.3]) until `num_mask` patches are
/// masked or no rectangle adds any (ten tries each). Row-major mask of gh·gw entries.
pub fn block_mask(
    gh: usize,
    gw: usize,
    num_mask: usize,
    min_patches: usize,
    rng: &mut Rng,
) -> Vec<bool> {
    let mut mask = vec![false; gh * gw];
    let mut count = 0;
    let (la, lb) = (0.3f64.ln(), (1.0 / 0.3f64).ln());
    while count < num_mask {
        let budget = num_mask - count;
        let mut added = 0;
        for _ in 0..10 {
            let area =
                min_patches as f64 + rng.uniform() * (budget as f64 - min_patches as f64).max(0.0);
            let aspect = (la + rng.uniform() * (lb - la)).exp();
            let h = (area * aspect).sqrt().round() as usize;
            let w = (area / aspect).sqrt().round() as usize;
            if h == 0 || w == 0 || h >= gh || w >= gw {
                continue;
            }
            let top = (rng.next_u64() % (gh - h + 1) as u64) as usize;
            let left = (rng.next_u64() % (gw - w + 1) as u64) as usize;
            let already = (top..top + h)
                .flat_map(|i| (left..left + w).map(move |j| (i, j)))
                .filter(|&(i, j)| mask[i * gw + j])
                .count();
            let fresh = h * w - already;
            if fresh > 0 && fresh <= budget {
                for i in top..top + h {
                    for j in left..left + w {
                        mask[i * gw + j] = true;
                    }
                }
                added = fresh;
                break;
            }
        }
        if added == 0 {
            break;
        }
        count += added;
    }
    mask
}

/// Per-patch pixel targets [B·G, C·P·P] (im2col order), each normalised to mean 0 and unit
/// (unbiased) variance with eps 1e-6, as MAE's norm_pix_loss.
pub fn patch_targets(images: &[f32], b: usize, c: usize, s: usize, p: usize) -> Vec<f32> {
    let mut t = crate::backend::cpu::patch_embed::im2col(images, b, c, s, s, p);
    let k = c * p * p;
    for row in t.chunks_exact_mut(k) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / k as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (k as f64 - 1.0);
        let inv = 1.0 / (var + 1e-6).sqrt();
        row.iter_mut()
            .for_each(|v| *v = ((*v as f64 - mean) * inv) as f32);
    }
    t
}

/// Mean squared error and its gradient 2(pred − target)/len.
pub fn mse(pred: &[f32], target: &[f32]) -> (f32, Vec<f32>) {
    let n = pred.len() as f64;
    let loss = pred
        .iter()
        .zip(target)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / n;
    let grad = pred
        .iter()
        .zip(target)
        .map(|(a, b)| (2.0 * (*a - *b) as f64 / n) as f32)
        .collect();
    (loss as f32, grad)
}

/// Token rows of the masked patches in a [B·N, D] sequence (class token first in each image).
pub fn masked_token_rows(mask: &[bool], b: usize, g: usize) -> Vec<usize> {
    (0..b * g)
        .filter(|&i| mask[i])
        .map(|i| (i / g) * (g + 1) + 1 + i % g)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_mask_reaches_the_target_count_in_blocks() {
        let mut rng = Rng::new(3);
        for _ in 0..20 {
            let m = block_mask(14, 14, 75, 16, &mut rng);
            let n = m.iter().filter(|&&v| v).count();
            assert!((60..=75).contains(&n), "masked {n}");
        }
    }
}
