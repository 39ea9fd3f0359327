//! BEiT/MOOD's parameter groups: which tensors AdamW decays and the learning-rate scale of each
//! (layer-wise decay). A leaf module: the CPU optimiser (train::optim) and the device one
//! (backend::cuda::optim) both follow these rules, and the backend must not import train.

use std::collections::HashMap;

/// Per-parameter moment estimates, by parameter name.
pub type Moments = HashMap<String, Vec<f32>>;

/// BEiT/MOOD's parameter grouping: no weight decay for 1-D tensors (norms, biases, q/v biases,
/// layer scales), `.bias`, and the tokens. The 2-D relative-position tables are decayed, as in
/// MOOD's optimizer, unless `decay_rel_pos` is off (timm's grouping, `--no-decay-rel-pos`).
pub fn uses_weight_decay(name: &str, shape: &[usize], decay_rel_pos: bool) -> bool {
    !(shape.len() == 1
        || name.ends_with(".bias")
        || matches!(name, "cls_token" | "pos_embed" | "mask_token")
        || (!decay_rel_pos && name.contains("relative_position_bias_table")))
}

/// BEiT's layer id for layer-wise lr decay: embeddings 0, block i → i + 1, the rest depth + 1.
pub fn layer_id(name: &str, depth: usize) -> usize {
    if matches!(name, "cls_token" | "pos_embed" | "mask_token") || name.starts_with("patch_embed") {
        0
    } else if name.starts_with("rel_pos_bias") {
        depth + 1
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        rest.split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .map_or(depth + 1, |i| i + 1)
    } else {
        depth + 1
    }
}

/// lr multiplier of `name`: decay^(depth + 1 − layer_id).
pub fn layer_scale(name: &str, depth: usize, decay: f32) -> f32 {
    decay.powi((depth + 1 - layer_id(name, depth)) as i32)
}
