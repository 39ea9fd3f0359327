//! Checkpoint key names → timm's names, the only names model code uses.
//!
//! - wrapper prefixes are stripped: `module.` (DeepSpeed / DataParallel), `model.`, `encoder.`;
//!   (nesting under a "model"/"module"/"state_dict" dict entry is resolved by the .pth reader);
//! - mmpretrain BEiT names (MOODv2 checkpoints) are mapped onto timm's (`backbone.layers.{i}.ln1` →
//!   `blocks.{i}.norm1`, `ffn.layers.0.0` → `mlp.fc1`, `head.fc` → `head`, ...). This map follows
//!   mmpretrain's source; no MOODv2 file has been opened to confirm it.
//! - keys of the pretraining heads (`lm_head.*`, `mask_token`) are kept but marked ignored, so they
//!   are not reported as unused.

use std::collections::BTreeMap;

/// Keys that a classification model never reads, on purpose.
pub fn is_ignored(name: &str) -> bool {
    name.starts_with("lm_head.")
        || name.starts_with("optim.") // AdamW state in our training checkpoints
        || name.starts_with("alpa.") // ALPA's attention MLPs: a training-time module
        || name == "mask_token"
        || name.ends_with("relative_position_index")
        || name.ends_with("attn.k_bias")
        || name.ends_with("num_batches_tracked") // BatchNorm's training counter
}

pub fn normalise<E>(entries: Vec<(String, E)>) -> BTreeMap<String, E> {
    let mmpretrain = entries.iter().any(|(k, _)| k.starts_with("backbone."));
    entries
        .into_iter()
        .map(|(k, e)| {
            let mut k = k.as_str();
            for p in ["module.", "model.", "encoder."] {
                if let Some(rest) = k.strip_prefix(p) {
                    k = rest;
                }
            }
            let k = if mmpretrain {
                from_mmpretrain(k)
            } else {
                k.to_string()
            };
            (k, e)
        })
        .collect()
}

fn from_mmpretrain(k: &str) -> String {
    if let Some(rest) = k.strip_prefix("head.fc.") {
        return format!("head.{rest}");
    }
    let Some(k) = k.strip_prefix("backbone.") else {
        return k.to_string();
    };
    let k = match k.strip_prefix("layers.") {
        Some(rest) => format!("blocks.{rest}"),
        None => k.to_string(),
    };
    let k = k
        .replace("patch_embed.projection.", "patch_embed.proj.")
        .replace(".ln1.", ".norm1.")
        .replace(".ln2.", ".norm2.")
        .replace(".ffn.layers.0.0.", ".mlp.fc1.")
        .replace(".ffn.layers.1.", ".mlp.fc2.");
    // Top-level norms: ln1 is the final norm before token pooling, ln2 the norm after avg pooling.
    if let Some(rest) = k.strip_prefix("ln1.") {
        return format!("norm.{rest}");
    }
    if let Some(rest) = k.strip_prefix("ln2.") {
        return format!("fc_norm.{rest}");
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_wrappers_and_maps_mmpretrain() {
        let m = normalise(vec![("module.blocks.0.norm1.weight".to_string(), ())]);
        assert!(m.contains_key("blocks.0.norm1.weight"));
        let m = normalise(vec![
            ("backbone.layers.3.ln2.bias".to_string(), ()),
            ("backbone.layers.3.ffn.layers.0.0.weight".to_string(), ()),
            ("backbone.ln2.weight".to_string(), ()),
            ("backbone.patch_embed.projection.bias".to_string(), ()),
            ("head.fc.weight".to_string(), ()),
        ]);
        let keys: Vec<&str> = m.keys().map(|s| s.as_str()).collect();
        assert_eq!(
            keys,
            [
                "blocks.3.mlp.fc1.weight",
                "blocks.3.norm2.bias",
                "fc_norm.weight",
                "head.weight",
                "patch_embed.proj.bias"
            ]
        );
    }
}
