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

use std::sync::Arc;

use crate::backend::{Activation, Pool};
use crate::error::{Error, Result};
use crate::model::config::{QkvBias, RelPos, VitConfig};
use crate::model::exec::{Exec, Infer};
use crate::model::layers::{Linear, LinearBias, Norm, Param, RelBias, SharedRelBias};
use crate::model::relpos;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

pub struct Block {
    pub norm1: Norm,
    pub qkv: Linear,
    /// This block's relative-position bias (or the shared one), if any.
    pub rel_bias: Option<SharedRelBias>,
    pub proj: Linear,
    pub norm2: Norm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub gamma1: Option<Param>,
    pub gamma2: Option<Param>,
}

/// A BEiT or ViT classifier ready for inference.
pub struct VisionTransformer {
    pub cfg: VitConfig,
    pub patch_w: Param,
    pub patch_b: Param,
    /// [D] (stored as [1, 1, D])
    pub cls: Param,
    /// [N, D] (stored as [1, N, D])
    pub pos: Option<Param>,
    pub blocks: Vec<Block>,
    /// Final norm before taking the class token (ViT).
    pub norm: Option<Norm>,
    /// Norm after mean pooling (BEiT).
    pub fc_norm: Option<Norm>,
    pub head: Option<Linear>,
}

/// Features, logits (if there is a head) and the last block's patch tokens, on an executor.
type Local<V> = (V, Option<V>, V);

/// What a forward returns: the pre-logits feature that OOD scores use, and the logits if the
/// checkpoint has a head.
pub struct Output {
    /// [B, D]
    pub features: Tensor,
    /// [B, C]
    pub logits: Option<Tensor>,
}

fn rel_bias(table: Param, cfg: &VitConfig) -> SharedRelBias {
    let (wh, ww) = cfg.grid();
    let index = relpos::relative_position_index(wh, ww);
    let n = cfg.tokens();
    let bias = relpos::gather_bias(table.value.as_slice(), cfg.num_heads, &index);
    let dense =
        Tensor::from_vec(&[cfg.num_heads, n, n], bias).expect("gather_bias returns H·N·N values");
    Arc::new(RelBias {
        table,
        dense,
        index,
    })
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
            RelPos::Shared => Some(rel_bias(
                Param::load(store, shared_key, &[table_rows, heads])?,
                cfg,
            )),
            _ => None,
        };

        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let pre = format!("blocks.{i}");
            let qkv_w = Param::load(store, &format!("{pre}.attn.qkv.weight"), &[3 * d, d])?;
            let qkv_b = match cfg.qkv_bias {
                QkvBias::None => LinearBias::None,
                QkvBias::Full => LinearBias::Full(Param::load(
                    store,
                    &format!("{pre}.attn.qkv.bias"),
                    &[3 * d],
                )?),
                QkvBias::QV => {
                    let q = Param::load(store, &format!("{pre}.attn.q_bias"), &[d])?;
                    let v = Param::load(store, &format!("{pre}.attn.v_bias"), &[d])?;
                    let mut b = vec![0.0f32; 3 * d];
                    b[..d].copy_from_slice(q.value.as_slice());
                    b[2 * d..].copy_from_slice(v.value.as_slice());
                    LinearBias::QV {
                        q,
                        v,
                        joined: Tensor::from_vec(&[3 * d], b)?,
                    }
                }
            };
            let rel_bias = match cfg.rel_pos {
                RelPos::None => None,
                RelPos::Shared => shared_bias.clone(),
                RelPos::PerBlock => {
                    let key = format!("{pre}.attn.relative_position_bias_table");
                    check_stored_index(store, &format!("{pre}.attn.relative_position_index"), cfg)?;
                    // A self-supervised checkpoint keeps one shared table: each block gets its own
                    // copy under its own name (as MOOD does), so fine-tuning trains them apart.
                    let source = if !store.contains(&key) && store.contains(shared_key) {
                        shared_key
                    } else {
                        key.as_str()
                    };
                    let value = store.get(source, &[table_rows, heads])?;
                    Some(rel_bias(Param { name: key, value }, cfg))
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
                qkv: Linear {
                    w: qkv_w,
                    bias: qkv_b,
                },
                rel_bias,
                proj: Linear::load(store, &format!("{pre}.attn.proj"), d, d)?,
                norm2: Norm::load(store, &format!("{pre}.norm2"), d)?,
                fc1: Linear::load(store, &format!("{pre}.mlp.fc1"), cfg.mlp_hidden, d)?,
                fc2: Linear::load(store, &format!("{pre}.mlp.fc2"), d, cfg.mlp_hidden)?,
                gamma1: g1.map(|k| Param::load(store, &k, &[d])).transpose()?,
                gamma2: g2.map(|k| Param::load(store, &k, &[d])).transpose()?,
            });
        }

        let (norm, fc_norm) = match cfg.pool {
            Pool::ClassToken => (Some(Norm::load(store, "norm", d)?), None),
            Pool::MeanPatches => {
                // Self-supervised checkpoints have no fc_norm; MOOD starts it at weight 1, bias 0.
                let fc = if pretrain_ckpt && !store.contains("fc_norm.weight") {
                    Norm::identity("fc_norm", d)
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
        let cls = Param {
            name: "cls_token".into(),
            value: store.get("cls_token", &[1, 1, d])?.reshape(&[d])?,
        };
        let pos = if cfg.abs_pos_emb {
            Some(Param {
                name: "pos_embed".into(),
                value: store.get("pos_embed", &[1, n, d])?.reshape(&[n, d])?,
            })
        } else {
            None
        };
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            patch_w: Param::load(store, "patch_embed.proj.weight", &[d, c, p, p])?,
            patch_b: Param::load(store, "patch_embed.proj.bias", &[d])?,
            cls,
            pos,
            blocks,
            norm,
            fc_norm,
            head,
        })
    }

    pub fn num_classes(&self) -> Option<usize> {
        self.head.as_ref().map(|h| h.w.value.shape()[0])
    }

    /// images [B, C, H, W], normalised → features [B, D] and logits [B, C], on the CPU.
    pub fn forward(&self, images: &Tensor) -> Result<Output> {
        self.forward_on(&mut Infer, images)
    }

    /// `forward` on any executor (the CPU, a CUDA device), the outputs copied to the host.
    pub fn forward_on<E: Exec>(&self, e: &mut E, images: &Tensor) -> Result<Output> {
        let (features, logits) = self.forward_with(e, images)?;
        Ok(Output {
            features: e.to_host(&features)?,
            logits: logits.map(|l| e.to_host(&l)).transpose()?,
        })
    }

    /// The transformer blocks on a token sequence [B·N, D]. `taps` (block numbers 1..=depth, in
    /// the order wanted) is the per-block hook of `mood extract --layers`: after each tapped
    /// block, the mean of its output's patch tokens (the class token left out, no norm) [B, D]
    /// is pushed to `tapped`, in `taps` order, from this one pass.
    fn blocks_with<E: Exec>(
        &self,
        e: &mut E,
        mut x: E::V,
        b: usize,
        taps: &[usize],
        tapped: &mut Vec<(usize, E::V)>,
    ) -> Result<E::V> {
        let (cfg, n) = (&self.cfg, self.cfg.tokens());
        let every: Vec<usize> = match taps.is_empty() {
            true => Vec::new(),
            false => (0..b * n).collect(),
        };
        // Each residual that a LayerNorm follows runs with it as one op (`residual_layernorm`):
        // the first with the block's norm2, the second with the next block's norm1. The last
        // block's residual stands alone: the final norm comes after pooling (ViT's class token,
        // BEiT's fc_norm), and the taps read the stream itself.
        let Some(first) = self.blocks.first() else {
            return Ok(x);
        };
        let mut h = e.layernorm(&x, &first.norm1, cfg.eps)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let qkv = e.linear(&h, &blk.qkv, Activation::None)?;
            let a = e.attention(qkv, blk.rel_bias.as_deref(), b, n, cfg.num_heads)?;
            let a = e.linear(&a, &blk.proj, Activation::None)?;
            let (x1, h2) =
                e.residual_layernorm(x, a, blk.gamma1.as_ref(), i, &blk.norm2, cfg.eps)?;
            let m = e.linear(&h2, &blk.fc1, Activation::Gelu)?;
            let m = e.linear(&m, &blk.fc2, Activation::None)?;
            x = match self.blocks.get(i + 1) {
                Some(next) => {
                    let (x2, h1) =
                        e.residual_layernorm(x1, m, blk.gamma2.as_ref(), i, &next.norm1, cfg.eps)?;
                    h = h1;
                    x2
                }
                None => e.residual(x1, m, blk.gamma2.as_ref(), i)?,
            };
            if taps.contains(&(i + 1)) {
                // `pool` consumes its input: it pools a copy, and the stream goes on.
                let copy = e.gather_rows(&x, &every)?;
                tapped.push((i + 1, e.pool(copy, b, Pool::MeanPatches)?));
            }
        }
        tapped.sort_by_key(|(block, _)| taps.iter().position(|t| t == block));
        Ok(x)
    }

    /// Masked image modelling forward: patch tokens with `mask` set ([B·G], row-major per image) are
    /// replaced by `mask_token` [D] before the blocks; returns every token [B·N, D] after
    /// `final_norm` (the pretraining model's `norm`).
    pub fn forward_masked<E: Exec>(
        &self,
        e: &mut E,
        images: &Tensor,
        mask: &[bool],
        mask_token: &Param,
        final_norm: &Norm,
    ) -> Result<E::V> {
        let b = images.shape()[0];
        let img = e.input(images)?;
        let patches = e.patch_embed(&img, &self.patch_w, &self.patch_b)?;
        let patches = e.mask_rows(patches, mask, mask_token)?;
        let x = e.assemble_tokens(patches, &self.cls, self.pos.as_ref(), b)?;
        let x = self.blocks_with(e, x, b, &[], &mut Vec::new())?;
        e.layernorm(&x, final_norm, self.cfg.eps)
    }

    /// The forward pass on any executor (inference, or the training tape).
    pub fn forward_with<E: Exec>(
        &self,
        e: &mut E,
        images: &Tensor,
    ) -> Result<(E::V, Option<E::V>)> {
        let x = self.tokens_with(e, images)?;
        self.head_with(e, x, images.shape()[0])
    }

    /// Features, logits and the last block's patch tokens [B, G, D] (the local features MODE's
    /// CSD pools; the class token, where there is one, is left out), on the CPU.
    pub fn forward_local(&self, images: &Tensor) -> Result<(Output, Tensor)> {
        self.forward_local_on(&mut Infer, images)
    }

    /// `forward_local` on any executor, the outputs copied to the host.
    pub fn forward_local_on<E: Exec>(
        &self,
        e: &mut E,
        images: &Tensor,
    ) -> Result<(Output, Tensor)> {
        let (b, g, d) = (images.shape()[0], self.patches(), self.cfg.embed_dim);
        let (features, logits, local) = self.features_and_local_with(e, images)?;
        let out = Output {
            features: e.to_host(&features)?,
            logits: logits.map(|l| e.to_host(&l)).transpose()?,
        };
        let local = e.to_host(&local)?.reshape(&[b, g, d])?;
        Ok((out, local))
    }

    /// Logits (if there is a head) and the last block's patch tokens [B·G, D] on any executor: what
    /// a loss over local features (MODE's ALPA) trains through.
    pub fn forward_local_with<E: Exec>(
        &self,
        e: &mut E,
        images: &Tensor,
    ) -> Result<(Option<E::V>, E::V)> {
        let (_, logits, local) = self.features_and_local_with(e, images)?;
        Ok((logits, local))
    }

    /// One forward giving the features and logits, the last block's patch tokens [B, G, D] when
    /// `local`, and for each of `layers` (block numbers 1..=depth) the mean of that block's output
    /// patch tokens, as [B, L, D] (`mood extract --layers`), the outputs copied to the host.
    pub fn forward_layers_on<E: Exec>(
        &self,
        e: &mut E,
        images: &Tensor,
        layers: &[usize],
        local: bool,
    ) -> Result<(Output, Option<Tensor>, Tensor)> {
        let depth = self.blocks.len();
        if let Some(l) = layers.iter().find(|&&l| l == 0 || l > depth) {
            return Err(Error::Usage(format!(
                "--layers {l}: {} has blocks 1..={depth}",
                self.cfg.name
            )));
        }
        if layers.is_empty() || layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Usage(format!(
                "--layers {layers:?}: block numbers in increasing order, each once"
            )));
        }
        let (b, n, g, d) = (
            images.shape()[0],
            self.cfg.tokens(),
            self.patches(),
            self.cfg.embed_dim,
        );
        let mut tapped = Vec::new();
        let x = self.tokens_tapped(e, images, layers, &mut tapped)?;
        let local = match local {
            true => {
                let rows: Vec<usize> = (0..b)
                    .flat_map(|i| (n - g..n).map(move |t| i * n + t))
                    .collect();
                let l = e.gather_rows(&x, &rows)?;
                Some(e.to_host(&l)?.reshape(&[b, g, d])?)
            }
            false => None,
        };
        let (features, logits) = self.head_with(e, x, b)?;
        let out = Output {
            features: e.to_host(&features)?,
            logits: logits.map(|l| e.to_host(&l)).transpose()?,
        };
        // [L][B, D] → [B, L, D]
        let per: Vec<Tensor> = tapped
            .iter()
            .map(|(_, v)| e.to_host(v))
            .collect::<Result<_>>()?;
        let mut all = vec![0.0f32; b * layers.len() * d];
        for (j, t) in per.iter().enumerate() {
            for (i, row) in t.as_slice().chunks_exact(d).enumerate() {
                let at = (i * layers.len() + j) * d;
                all[at..at + d].copy_from_slice(row);
            }
        }
        Ok((out, local, Tensor::from_vec(&[b, layers.len(), d], all)?))
    }

    fn patches(&self) -> usize {
        self.cfg.grid().0 * self.cfg.grid().1
    }

    /// Features, logits and the last block's patch tokens [B·G, D].
    fn features_and_local_with<E: Exec>(&self, e: &mut E, images: &Tensor) -> Result<Local<E::V>> {
        let x = self.tokens_with(e, images)?;
        let (b, n, g) = (images.shape()[0], self.cfg.tokens(), self.patches());
        let rows: Vec<usize> = (0..b)
            .flat_map(|i| (n - g..n).map(move |t| i * n + t))
            .collect();
        let local = e.gather_rows(&x, &rows)?;
        let (features, logits) = self.head_with(e, x, b)?;
        Ok((features, logits, local))
    }

    /// Patch embedding and the blocks: every token [B·N, D] after the last block.
    fn tokens_with<E: Exec>(&self, e: &mut E, images: &Tensor) -> Result<E::V> {
        self.tokens_tapped(e, images, &[], &mut Vec::new())
    }

    /// `tokens_with`, with the per-block hook of `blocks_with`.
    fn tokens_tapped<E: Exec>(
        &self,
        e: &mut E,
        images: &Tensor,
        taps: &[usize],
        tapped: &mut Vec<(usize, E::V)>,
    ) -> Result<E::V> {
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
        let img = e.input(images)?;
        let patches = e.patch_embed(&img, &self.patch_w, &self.patch_b)?;
        let x = e.assemble_tokens(patches, &self.cls, self.pos.as_ref(), b)?;
        self.blocks_with(e, x, b, taps, tapped)
    }

    /// Pooling, the final norm and the head on the tokens of `b` images.
    fn head_with<E: Exec>(&self, e: &mut E, x: E::V, b: usize) -> Result<(E::V, Option<E::V>)> {
        let cfg = &self.cfg;
        let features = match cfg.pool {
            Pool::MeanPatches => {
                let pooled = e.pool(x, b, Pool::MeanPatches)?;
                let nrm = self.fc_norm.as_ref().expect("BEiT has fc_norm");
                e.layernorm(&pooled, nrm, cfg.eps)?
            }
            Pool::ClassToken => {
                let cls = e.pool(x, b, Pool::ClassToken)?;
                let nrm = self.norm.as_ref().expect("ViT has norm");
                // LayerNorm is per token, so normalising the class token alone equals norm(x)[:, 0].
                e.layernorm(&cls, nrm, cfg.eps)?
            }
        };
        let logits = match &self.head {
            Some(h) => Some(e.linear(&features, h, Activation::None)?),
            None => None,
        };
        Ok((features, logits))
    }

    /// The head and the norm before it, for a feature store's head.safetensors (vim, react,
    /// gradnorm read the head; csd the norm).
    pub fn store_head(&self) -> Option<crate::features::Head> {
        let h = self.head.as_ref()?;
        let nrm = match self.cfg.pool {
            Pool::MeanPatches => self.fc_norm.as_ref(),
            Pool::ClassToken => self.norm.as_ref(),
        };
        Some(crate::features::Head {
            weight: h.w.value.as_slice().to_vec(),
            bias: h.bias.tensor()?.as_slice().to_vec(),
            fc_norm: nrm.map(|n| crate::features::FcNorm {
                weight: n.w.value.as_slice().to_vec(),
                bias: n.b.value.as_slice().to_vec(),
                eps: self.cfg.eps,
            }),
        })
    }
}
