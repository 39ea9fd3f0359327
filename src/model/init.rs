//! Random weights under timm's names for a config: benchmarks without a checkpoint, and the
//! starting point of training from scratch. Linear weights and tokens ~ N(0, 0.02²) (timm draws a
//! truncated normal; the tail cut at ±2σ is applied here too), biases 0, norms 1/0, layer scale 0.1,
//! relative-position tables N(0, 0.02²) so that the bias path is exercised.

use crate::model::config::{QkvBias, RelPos, VitConfig};
use crate::model::relpos;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// The generator every random draw of the crate uses; it lives in `crate::rng` so that ood/ and
/// data/ need not import the model.
pub use crate::rng::Rng;

/// How `random_store` fills one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Truncated normal, std 0.02.
    Normal,
    Fill(f32),
}

/// Every parameter a classifier of `cfg` reads, under timm's names, in a fixed order, with its
/// shape and the initialisation `random_store` gives it; the head has `cfg.num_classes` outputs.
pub fn parameter_specs(cfg: &VitConfig) -> Vec<(String, Vec<usize>, Init)> {
    use Init::{Fill, Normal};
    let mut t: Vec<(String, Vec<usize>, Init)> = Vec::new();
    let mut add = |name: String, shape: &[usize], init: Init| t.push((name, shape.to_vec(), init));
    let d = cfg.embed_dim;
    let (p, c) = (cfg.patch_size, cfg.in_chans);
    add("patch_embed.proj.weight".into(), &[d, c, p, p], Normal);
    add("patch_embed.proj.bias".into(), &[d], Fill(0.0));
    add("cls_token".into(), &[1, 1, d], Normal);
    if cfg.abs_pos_emb {
        add("pos_embed".into(), &[1, cfg.tokens(), d], Normal);
    }
    let (wh, ww) = cfg.grid();
    let rows = relpos::num_relative_distance(wh, ww);
    if cfg.rel_pos == RelPos::Shared {
        add(
            "rel_pos_bias.relative_position_bias_table".into(),
            &[rows, cfg.num_heads],
            Normal,
        );
    }
    for i in 0..cfg.depth {
        let pre = format!("blocks.{i}");
        for nrm in ["norm1", "norm2"] {
            add(format!("{pre}.{nrm}.weight"), &[d], Fill(1.0));
            add(format!("{pre}.{nrm}.bias"), &[d], Fill(0.0));
        }
        add(format!("{pre}.attn.qkv.weight"), &[3 * d, d], Normal);
        match cfg.qkv_bias {
            QkvBias::QV => {
                add(format!("{pre}.attn.q_bias"), &[d], Fill(0.0));
                add(format!("{pre}.attn.v_bias"), &[d], Fill(0.0));
            }
            QkvBias::Full => add(format!("{pre}.attn.qkv.bias"), &[3 * d], Fill(0.0)),
            QkvBias::None => {}
        }
        if cfg.rel_pos == RelPos::PerBlock {
            add(
                format!("{pre}.attn.relative_position_bias_table"),
                &[rows, cfg.num_heads],
                Normal,
            );
        }
        add(format!("{pre}.attn.proj.weight"), &[d, d], Normal);
        add(format!("{pre}.attn.proj.bias"), &[d], Fill(0.0));
        add(
            format!("{pre}.mlp.fc1.weight"),
            &[cfg.mlp_hidden, d],
            Normal,
        );
        add(format!("{pre}.mlp.fc1.bias"), &[cfg.mlp_hidden], Fill(0.0));
        add(
            format!("{pre}.mlp.fc2.weight"),
            &[d, cfg.mlp_hidden],
            Normal,
        );
        add(format!("{pre}.mlp.fc2.bias"), &[d], Fill(0.0));
        if cfg.layer_scale {
            let (g1, g2) = if cfg.beit_names {
                (format!("{pre}.gamma_1"), format!("{pre}.gamma_2"))
            } else {
                (format!("{pre}.ls1.gamma"), format!("{pre}.ls2.gamma"))
            };
            add(g1, &[d], Fill(0.1));
            add(g2, &[d], Fill(0.1));
        }
    }
    let final_norm = match cfg.pool {
        crate::backend::Pool::MeanPatches => "fc_norm",
        crate::backend::Pool::ClassToken => "norm",
    };
    add(format!("{final_norm}.weight"), &[d], Fill(1.0));
    add(format!("{final_norm}.bias"), &[d], Fill(0.0));
    add("head.weight".into(), &[cfg.num_classes, d], Normal);
    add("head.bias".into(), &[cfg.num_classes], Fill(0.0));
    t
}

pub fn random_store(cfg: &VitConfig, seed: u64) -> WeightStore {
    let mut rng = Rng::new(seed);
    let t = parameter_specs(cfg)
        .into_iter()
        .map(|(name, shape, init)| {
            let n: usize = shape.iter().product();
            let v = match init {
                Init::Normal => (0..n).map(|_| rng.trunc_normal(0.02)).collect(),
                Init::Fill(x) => vec![x; n],
            };
            let t = Tensor::from_vec(&shape, v).expect("n matches shape");
            (name, t)
        })
        .collect();
    WeightStore::from_tensors(&format!("<random {}>", cfg.name), t)
}
