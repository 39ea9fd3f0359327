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

pub fn random_store(cfg: &VitConfig, seed: u64) -> WeightStore {
    let mut rng = Rng::new(seed);
    let mut t: Vec<(String, Tensor)> = Vec::new();
    let d = cfg.embed_dim;
    let normal = |name: String, shape: &[usize], rng: &mut Rng, t: &mut Vec<(String, Tensor)>| {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| rng.trunc_normal(0.02)).collect();
        t.push((name, Tensor::from_vec(shape, v).expect("n matches shape")));
    };
    let fill = |name: String, shape: &[usize], val: f32, t: &mut Vec<(String, Tensor)>| {
        let n: usize = shape.iter().product();
        t.push((
            name,
            Tensor::from_vec(shape, vec![val; n]).expect("n matches shape"),
        ));
    };
    let (p, c) = (cfg.patch_size, cfg.in_chans);
    normal(
        "patch_embed.proj.weight".into(),
        &[d, c, p, p],
        &mut rng,
        &mut t,
    );
    fill("patch_embed.proj.bias".into(), &[d], 0.0, &mut t);
    normal("cls_token".into(), &[1, 1, d], &mut rng, &mut t);
    if cfg.abs_pos_emb {
        normal("pos_embed".into(), &[1, cfg.tokens(), d], &mut rng, &mut t);
    }
    let (wh, ww) = cfg.grid();
    let rows = relpos::num_relative_distance(wh, ww);
    if cfg.rel_pos == RelPos::Shared {
        normal(
            "rel_pos_bias.relative_position_bias_table".into(),
            &[rows, cfg.num_heads],
            &mut rng,
            &mut t,
        );
    }
    for i in 0..cfg.depth {
        let pre = format!("blocks.{i}");
        for nrm in ["norm1", "norm2"] {
            fill(format!("{pre}.{nrm}.weight"), &[d], 1.0, &mut t);
            fill(format!("{pre}.{nrm}.bias"), &[d], 0.0, &mut t);
        }
        normal(
            format!("{pre}.attn.qkv.weight"),
            &[3 * d, d],
            &mut rng,
            &mut t,
        );
        match cfg.qkv_bias {
            QkvBias::QV => {
                fill(format!("{pre}.attn.q_bias"), &[d], 0.0, &mut t);
                fill(format!("{pre}.attn.v_bias"), &[d], 0.0, &mut t);
            }
            QkvBias::Full => fill(format!("{pre}.attn.qkv.bias"), &[3 * d], 0.0, &mut t),
            QkvBias::None => {}
        }
        if cfg.rel_pos == RelPos::PerBlock {
            normal(
                format!("{pre}.attn.relative_position_bias_table"),
                &[rows, cfg.num_heads],
                &mut rng,
                &mut t,
            );
        }
        normal(format!("{pre}.attn.proj.weight"), &[d, d], &mut rng, &mut t);
        fill(format!("{pre}.attn.proj.bias"), &[d], 0.0, &mut t);
        normal(
            format!("{pre}.mlp.fc1.weight"),
            &[cfg.mlp_hidden, d],
            &mut rng,
            &mut t,
        );
        fill(
            format!("{pre}.mlp.fc1.bias"),
            &[cfg.mlp_hidden],
            0.0,
            &mut t,
        );
        normal(
            format!("{pre}.mlp.fc2.weight"),
            &[d, cfg.mlp_hidden],
            &mut rng,
            &mut t,
        );
        fill(format!("{pre}.mlp.fc2.bias"), &[d], 0.0, &mut t);
        if cfg.layer_scale {
            let (g1, g2) = if cfg.beit_names {
                (format!("{pre}.gamma_1"), format!("{pre}.gamma_2"))
            } else {
                (format!("{pre}.ls1.gamma"), format!("{pre}.ls2.gamma"))
            };
            fill(g1, &[d], 0.1, &mut t);
            fill(g2, &[d], 0.1, &mut t);
        }
    }
    let final_norm = match cfg.pool {
        crate::backend::Pool::MeanPatches => "fc_norm",
        crate::backend::Pool::ClassToken => "norm",
    };
    fill(format!("{final_norm}.weight"), &[d], 1.0, &mut t);
    fill(format!("{final_norm}.bias"), &[d], 0.0, &mut t);
    normal(
        "head.weight".into(),
        &[cfg.num_classes, d],
        &mut rng,
        &mut t,
    );
    fill("head.bias".into(), &[cfg.num_classes], 0.0, &mut t);
    WeightStore::from_tensors(&format!("<random {}>", cfg.name), t)
}
