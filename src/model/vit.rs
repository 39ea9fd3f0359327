//! BEiT and ViT inference, written once over the backend op set (timm's `Beit` and
//! `VisionTransformer` forward, with dropout and drop-path off):
//!
//!   x = [cls; patch_embed(img)] (+ pos_embed)
//!   per block:  x += γ1 ⊙ proj(attn(qkv(LN1(x)) + qkv_bias, rel_pos_bias))
//!               x += γ2 ⊙ fc2(GELU(fc1(LN2(x))))
//!   BEiT: feature = fc_norm(mean of patch tokens)   ViT: feature = norm(x)[class token]
//!   logits = head(feature)
//!
//! Weights are looked up by timm's names; every shape is checked and an error names the tensor.

use crate::backend::{self, Activation, Pool};
use crate::error::{Error, Result};
use crate::model::config::{QkvBias, RelPos, VitConfig};
use crate::model::relpos;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    fn load(store: &WeightStore, prefix: &str, d: usize) -> Result<Norm> {
        Ok(Norm {
            w: store.get(&format!("{prefix}.weight"), &[d])?,
            b: store.get(&format!("{prefix}.bias"), &[d])?,
        })
    }

    fn identity(d: usize) -> Norm {
        Norm {
            w: Tensor::from_vec(&[d], vec![1.0; d]).expect("shape matches"),
            b: Tensor::zeros(&[d]),
        }
    }
}

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn load(store: &WeightStore, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear {
            w: store.get(&format!("{prefix}.weight"), &[out, inp])?,
            b: Some(store.get(&format!("{prefix}.bias"), &[out])?),
        })
    }

    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        backend::linear(x, &self.w, self.b.as_ref(), act)
    }
}

struct Block {
    norm1: Norm,
    qkv: Linear,
    /// Dense relative-position bias [H, N, N] of this block (or the shared one), if any.
    rel_bias: Option<Tensor>,
    proj: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    gamma1: Option<Tensor>,
    gamma2: Option<Tensor>,
}

/// A BEiT or ViT classifier ready for inference.
pub struct VisionTransformer {
    pub cfg: VitConfig,
    patch_w: Tensor,
    patch_b: Tensor,
    cls: Tensor,
    pos: Option<Tensor>,
    blocks: Vec<Block>,
    /// Final norm before taking the class token (ViT).
    norm: Option<Norm>,
    /// Norm after mean pooling (BEiT).
    fc_norm: Option<Norm>,
    head: Option<Linear>,
}

/// What a forward returns: the pre-logits feature that OOD scores use, and the logits if the
/// checkpoint has a head.
pub struct Output {
    /// [B, D]
    pub features: Tensor,
    /// [B, C]
    pub logits: Option<Tensor>,
}

fn dense_bias(table: &Tensor, cfg: &VitConfig) -> Tensor {
    let (wh, ww) = cfg.grid();
    let index = relpos::relative_position_index(wh, ww);
    let n = cfg.tokens();
    let bias = relpos::gather_bias(table.as_slice(), cfg.num_heads, &index);
    Tensor::from_vec(&[cfg.num_heads, n, n], bias).expect("gather_bias returns H·N·N values")
}

fn check_stored_index(store: &WeightStore, key: &str, cfg: &VitConfig) -> Result<()> {
    if let Some(stored) = store.get_i64(key) {
        let (wh, ww) = cfg.grid();
        let ours = relpos::relative_position_index(wh, ww);
        if stored.len() != ours.len() || stored.iter().zip(&ours).any(|(a, b)| *a != *b as i64) {
            return Err(Error::format(
                store.path(),
                format!(
                    "`{key}` differs from the index of a {wh}x{ww} grid: the checkpoint was made for another image or patch size"
                ),
            ));
        }
    }
    Ok(())
}

impl VisionTransformer {
    pub fn load(cfg: &VitConfig, store: &WeightStore) -> Result<VisionTransformer> {
        let d = cfg.embed_dim;
        let (p, c) = (cfg.patch_size, cfg.in_chans);
        let n = cfg.tokens();
        let heads = cfg.num_heads;
        let table_rows = {
            let (wh, ww) = cfg.grid();
            relpos::num_relative_distance(wh, ww)
        };
        let pretrain_ckpt = store.contains("mask_token") || store.contains("lm_head.weight");

        let shared_key = "rel_pos_bias.relative_position_bias_table";
        let shared_bias = match cfg.rel_pos {
            RelPos::Shared => Some(dense_bias(
                &store.get(shared_key, &[table_rows, heads])?,
                cfg,
            )),
            _ => None,
        };

        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let pre = format!("blocks.{i}");
            let qkv_w = store.get(&format!("{pre}.attn.qkv.weight"), &[3 * d, d])?;
            let qkv_b = match cfg.qkv_bias {
                QkvBias::None => None,
                QkvBias::Full => Some(store.get(&format!("{pre}.attn.qkv.bias"), &[3 * d])?),
                QkvBias::QV => {
                    let q = store.get(&format!("{pre}.attn.q_bias"), &[d])?;
                    let v = store.get(&format!("{pre}.attn.v_bias"), &[d])?;
                    let mut b = vec![0.0f32; 3 * d];
                    b[..d].copy_from_slice(q.as_slice());
                    b[2 * d..].copy_from_slice(v.as_slice());
                    Some(Tensor::from_vec(&[3 * d], b)?)
                }
            };
            let rel_bias = match cfg.rel_pos {
                RelPos::None => None,
                RelPos::Shared => shared_bias.clone(),
                RelPos::PerBlock => {
                    let key = format!("{pre}.attn.relative_position_bias_table");
                    // A self-supervised checkpoint keeps one shared table: copy it into every block.
                    let key = if !store.contains(&key) && store.contains(shared_key) {
                        shared_key.to_string()
                    } else {
                        key
                    };
                    check_stored_index(store, &format!("{pre}.attn.relative_position_index"), cfg)?;
                    Some(dense_bias(&store.get(&key, &[table_rows, heads])?, cfg))
                }
            };
            let (g1, g2) = if !cfg.layer_scale {
                (None, None)
            } else if cfg.beit_names {
                (
                    Some(format!("{pre}.gamma_1")),
                    Some(format!("{pre}.gamma_2")),
                )
            } else {
                (
                    Some(format!("{pre}.ls1.gamma")),
                    Some(format!("{pre}.ls2.gamma")),
                )
            };
            blocks.push(Block {
                norm1: Norm::load(store, &format!("{pre}.norm1"), d)?,
                qkv: Linear { w: qkv_w, b: qkv_b },
                rel_bias,
                proj: Linear::load(store, &format!("{pre}.attn.proj"), d, d)?,
                norm2: Norm::load(store, &format!("{pre}.norm2"), d)?,
                fc1: Linear::load(store, &format!("{pre}.mlp.fc1"), cfg.mlp_hidden, d)?,
                fc2: Linear::load(store, &format!("{pre}.mlp.fc2"), d, cfg.mlp_hidden)?,
                gamma1: g1.map(|k| store.get(&k, &[d])).transpose()?,
                gamma2: g2.map(|k| store.get(&k, &[d])).transpose()?,
            });
        }

        let (norm, fc_norm) = match cfg.pool {
            Pool::ClassToken => (Some(Norm::load(store, "norm", d)?), None),
            Pool::MeanPatches => {
                // Self-supervised checkpoints have no fc_norm; MOOD starts it at weight 1, bias 0.
                let fc = if pretrain_ckpt && !store.contains("fc_norm.weight") {
                    Norm::identity(d)
                } else {
                    Norm::load(store, "fc_norm", d)?
                };
                (None, Some(fc))
            }
        };
        let head = match store.shape_of("head.weight") {
            Some(&[classes, dd]) if dd == d => Some(Linear::load(store, "head", classes, d)?),
            Some(s) => {
                return Err(Error::Shape {
                    name: "head.weight".into(),
                    expected: vec![cfg.num_classes, d],
                    got: s.to_vec(),
                    file: Some(store.path().to_path_buf()),
                })
            }
            None => None,
        };
        let cls = store.get("cls_token", &[1, 1, d])?.reshape(&[d])?;
        let pos = if cfg.abs_pos_emb {
            Some(store.get("pos_embed", &[1, n, d])?.reshape(&[n, d])?)
        } else {
            None
        };
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            patch_w: store.get("patch_embed.proj.weight", &[d, c, p, p])?,
            patch_b: store.get("patch_embed.proj.bias", &[d])?,
            cls,
            pos,
            blocks,
            norm,
            fc_norm,
            head,
        })
    }

    pub fn num_classes(&self) -> Option<usize> {
        self.head.as_ref().map(|h| h.w.shape()[0])
    }

    /// images [B, C, H, W], normalised → features [B, D] and logits [B, C].
    pub fn forward(&self, images: &Tensor) -> Result<Output> {
        let cfg = &self.cfg;
        let s = cfg.img_size;
        match images.shape() {
            [_, c, h, w] if *c == cfg.in_chans && *h == s && *w == s => {}
            other => {
                return Err(Error::Data(format!(
                    "{} expects images [B, {}, {s}, {s}], got {other:?}",
                    cfg.name, cfg.in_chans
                )))
            }
        }
        let b = images.shape()[0];
        let n = cfg.tokens();
        let patches = backend::patch_embed(images, &self.patch_w, &self.patch_b)?;
        let mut x = backend::assemble_tokens(&patches, &self.cls, self.pos.as_ref(), b)?;
        for blk in &self.blocks {
            let h = backend::layernorm(&x, &blk.norm1.w, &blk.norm1.b, cfg.eps)?;
            let qkv = blk.qkv.forward(&h, Activation::None)?;
            let a = backend::attention(&qkv, blk.rel_bias.as_ref(), b, n, cfg.num_heads)?;
            let a = blk.proj.forward(&a, Activation::None)?;
            backend::residual(&mut x, &a, blk.gamma1.as_ref())?;
            let h = backend::layernorm(&x, &blk.norm2.w, &blk.norm2.b, cfg.eps)?;
            let h = blk.fc1.forward(&h, Activation::Gelu)?;
            let h = blk.fc2.forward(&h, Activation::None)?;
            backend::residual(&mut x, &h, blk.gamma2.as_ref())?;
        }
        let features = match cfg.pool {
            Pool::MeanPatches => {
                let pooled = backend::pool(&x, b, Pool::MeanPatches)?;
                let nrm = self.fc_norm.as_ref().expect("BEiT has fc_norm");
                backend::layernorm(&pooled, &nrm.w, &nrm.b, cfg.eps)?
            }
            Pool::ClassToken => {
                let cls = backend::pool(&x, b, Pool::ClassToken)?;
                let nrm = self.norm.as_ref().expect("ViT has norm");
                // LayerNorm is per token, so normalising the class token alone equals norm(x)[:, 0].
                backend::layernorm(&cls, &nrm.w, &nrm.b, cfg.eps)?
            }
        };
        let logits = match &self.head {
            Some(h) => Some(h.forward(&features, Activation::None)?),
            None => None,
        };
        Ok(Output { features, logits })
    }
}
