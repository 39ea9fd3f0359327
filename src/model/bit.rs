//! BiT (Big Transfer): Google's ResNet-v2 with group normalisation and weight standardisation, as
//! timm builds it for `resnetv2_{50,101}x1_bit` (`timm.models.resnetv2.ResNetV2`, stem_type
//! 'fixed', StdConv2d with ε = 1e-8), for inference, with timm's key names. BiT-S-R101x1 is the
//! backbone MOS fine-tunes.
//!
//!   stem:   x = maxpool 3×3/2 (zero-pad 1 (x)),  x = wsconv 7×7/2 pad 3 (img)  (no norm: pre-activation;
//!           the padding is zeros, not −∞, so a window of negatives at the border gives 0)
//!   stages.0..3 (stride 1, 2, 2, 2 at block 0), PreActBottleneck:
//!     p = ReLU(GN1(x))
//!     shortcut = wsconv 1×1/s(p) (`downsample.conv`, block 0 of every stage), else x
//!     y = wsconv3 1×1(ReLU(GN3(wsconv2 3×3/s(ReLU(GN2(wsconv1 1×1(p))))))) + shortcut
//!     width: out = channels[i], mid = make_divisible(out / 4, 8)
//!   norm:   ReLU(GN(x)); feature = mean over H×W; logits = head.fc (a 1×1 conv) of the feature
//!
//! wsconv: a convolution whose kernel is standardised per output channel (w − mean)/√(var + ε);
//! done once at load (backend/cpu/groupnorm.rs). GN: GroupNorm, 32 groups, ε = 1e-5.
//! Checkpoints in Google's .npz and in big_transfer's PyTorch names (MOS's fine-tuned files) are
//! renamed to timm's on open (weights/npz.rs).

use crate::backend::cpu::conv::{self, Conv};
use crate::backend::cpu::groupnorm;
use crate::error::{Error, Result};
use crate::model::conv_exec::{
    image_dims, ConvExec, ConvInfer, ConvParams, GroupNormParams, Head, Map, PoolPad,
};
use crate::model::Output;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// StdConv2d's ε in timm's BiT models.
pub const WS_EPS: f32 = 1e-8;
/// GroupNorm's ε.
const GN_EPS: f32 = 1e-5;

#[derive(Clone, Debug, PartialEq)]
pub struct BitConfig {
    pub name: String,
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Output channels per stage (timm's `channels` × width factor).
    pub channels: [usize; 4],
    pub stem_width: usize,
    /// Groups of every GroupNorm.
    pub groups: usize,
    pub img_size: usize,
    pub in_chans: usize,
    /// Classes of the default head; a checkpoint's own `head.fc` takes precedence.
    pub num_classes: usize,
}

/// timm's `make_divisible(v, 8)`: the nearest multiple of 8, at least 8, and not below 90% of v.
fn make_divisible(v: f64) -> usize {
    let d = 8.0;
    let mut n = (((v + d / 2.0) / d).floor() * d).max(d);
    if n < 0.9 * v {
        n += d;
    }
    n as usize
}

impl BitConfig {
    /// Width of the pooled feature.
    pub fn feature_dim(&self) -> usize {
        self.channels[3]
    }

    /// Bottleneck width of a block whose output has `out` channels.
    pub fn mid(&self, out: usize) -> usize {
        make_divisible(out as f64 * 0.25)
    }

    pub fn preset(name: &str) -> Option<BitConfig> {
        let full = [256, 512, 1024, 2048];
        let (layers, channels, stem, groups, img, classes) = match name {
            "resnetv2_50x1_bit" => ([3, 4, 6, 3], full, 64, 32, 224, 1000),
            "resnetv2_101x1_bit" => ([3, 4, 23, 3], full, 64, 32, 224, 1000),
            // MOS's setting: BiT-S-R101x1 at its test resolution (480×480) with the group-softmax
            // head of ImageNet's 8 groups (1000 + 8 logits).
            "resnetv2_101x1_bit_mos" => ([3, 4, 23, 3], full, 64, 32, 480, 1008),
            // tools/make_bit_fixtures.py's tiny model (4 groups, so that few channels suffice).
            "test_tiny_bit" => ([1, 2, 1, 1], [16, 32, 32, 64], 8, 4, 48, 10),
            _ => return None,
        };
        Some(BitConfig {
            name: name.to_string(),
            layers,
            channels,
            stem_width: stem,
            groups,
            img_size: img,
            in_chans: 3,
            num_classes: classes,
        })
    }

    pub fn preset_names() -> &'static [&'static str] {
        &[
            "resnetv2_50x1_bit",
            "resnetv2_101x1_bit",
            "resnetv2_101x1_bit_mos",
            "test_tiny_bit",
        ]
    }

    /// (input channels, output channels, stride) of every block, stage by stage.
    fn blocks(&self) -> Vec<(String, usize, usize, usize)> {
        let mut out = Vec::new();
        let mut cin = self.stem_width;
        for (s, (&n, &c)) in self.layers.iter().zip(&self.channels).enumerate() {
            for i in 0..n {
                let stride = if i == 0 && s > 0 { 2 } else { 1 };
                out.push((format!("stages.{s}.blocks.{i}"), cin, c, stride));
                cin = c;
            }
        }
        out
    }
}

/// Every tensor of `cfg`'s timm state dict with its shape, in the order `Bit::load` reads them.
pub fn parameter_shapes(cfg: &BitConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = vec![(
        "stem.conv.weight".to_string(),
        vec![cfg.stem_width, cfg.in_chans, 7, 7],
    )];
    for (pre, cin, cout, _) in cfg.blocks() {
        let mid = cfg.mid(cout);
        if pre.ends_with(".blocks.0") {
            out.push((
                format!("{pre}.downsample.conv.weight"),
                vec![cout, cin, 1, 1],
            ));
        }
        for (j, (ci, co, k)) in [(cin, mid, 1), (mid, mid, 3), (mid, cout, 1)]
            .into_iter()
            .enumerate()
        {
            out.push((format!("{pre}.norm{}.weight", j + 1), vec![ci]));
            out.push((format!("{pre}.norm{}.bias", j + 1), vec![ci]));
            out.push((format!("{pre}.conv{}.weight", j + 1), vec![co, ci, k, k]));
        }
    }
    let f = cfg.feature_dim();
    out.push(("norm.weight".into(), vec![f]));
    out.push(("norm.bias".into(), vec![f]));
    out.push(("head.fc.weight".into(), vec![cfg.num_classes, f, 1, 1]));
    out.push(("head.fc.bias".into(), vec![cfg.num_classes]));
    out
}

/// A checkpoint of random weights for `cfg` (normal kernels, GroupNorm at identity, a small
/// head): what `mood bench --arch resnetv2_*` times.
pub fn random_store(cfg: &BitConfig, seed: u64) -> WeightStore {
    let mut rng = crate::rng::Rng::new(seed);
    let tensors = parameter_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() == 1 && name.ends_with(".weight") {
                vec![1.0; n]
            } else if shape.len() == 1 {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (rng.normal() * 0.01) as f32).collect()
            };
            let t = Tensor::from_vec(&shape, values).expect("shape and values agree");
            (name, t)
        })
        .collect();
    WeightStore::from_tensors(&cfg.name, tensors)
}

/// A weight-standardised convolution: kernel [Cout, kh, kw, Cin], no bias, under its checkpoint
/// name.
pub struct StdConv {
    pub name: String,
    pub cv: Conv,
    pub w: Vec<f32>,
}

impl StdConv {
    fn load(store: &WeightStore, name: &str, cv: Conv) -> Result<StdConv> {
        let key = format!("{name}.weight");
        let w = store.get(&key, &[cv.cout, cv.cin, cv.k, cv.k])?;
        let mut w = w.as_slice().to_vec();
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(
                store.path(),
                format!("`{key}` has {} at index {i}", w[i]),
            ));
        }
        groupnorm::standardize(&mut w, cv.cout, WS_EPS);
        let w = conv::weight_to_hwc(&w, cv.cout, cv.cin, cv.k);
        Ok(StdConv {
            name: name.to_string(),
            cv,
            w,
        })
    }

    /// What the executors take.
    pub fn params(&self) -> ConvParams<'_> {
        ConvParams {
            name: &self.name,
            cv: &self.cv,
            w: &self.w,
            b: None,
        }
    }
}

/// GroupNorm's scale and shift, followed by ReLU wherever the model uses it.
pub struct GroupNorm {
    pub name: String,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub groups: usize,
}

impl GroupNorm {
    fn load(store: &WeightStore, name: &str, c: usize, groups: usize) -> Result<GroupNorm> {
        let get = |what: &str| -> Result<Vec<f32>> {
            Ok(store
                .get(&format!("{name}.{what}"), &[c])?
                .as_slice()
                .to_vec())
        };
        Ok(GroupNorm {
            name: name.to_string(),
            gamma: get("weight")?,
            beta: get("bias")?,
            groups,
        })
    }

    /// What the executors take (GN's ε, 1e-5).
    pub fn params(&self) -> GroupNormParams<'_> {
        GroupNormParams {
            name: &self.name,
            gamma: &self.gamma,
            beta: &self.beta,
            groups: self.groups,
            eps: GN_EPS,
        }
    }
}

pub struct BitBlock {
    pub norms: [GroupNorm; 3],
    pub convs: [StdConv; 3],
    pub downsample: Option<StdConv>,
}

pub struct Bit {
    pub cfg: BitConfig,
    pub stem: StdConv,
    pub blocks: Vec<BitBlock>,
    pub norm: GroupNorm,
    /// head.fc: weight [C, F] (the 1×1 conv's kernel), bias [C]
    pub fc: Option<(Tensor, Tensor)>,
}

fn conv(cin: usize, cout: usize, k: usize, stride: usize) -> Conv {
    Conv {
        cin,
        cout,
        k,
        stride,
        pad: k / 2,
    }
}

impl Bit {
    pub fn load(cfg: &BitConfig, store: &WeightStore) -> Result<Bit> {
        let g = cfg.groups;
        let stem = StdConv::load(store, "stem.conv", conv(cfg.in_chans, cfg.stem_width, 7, 2))?;
        let mut blocks = Vec::new();
        for (pre, cin, cout, stride) in cfg.blocks() {
            let mid = cfg.mid(cout);
            let n = |j: usize, c: usize| GroupNorm::load(store, &format!("{pre}.norm{j}"), c, g);
            let c = |j: usize, cv: Conv| StdConv::load(store, &format!("{pre}.conv{j}"), cv);
            let downsample = if pre.ends_with(".blocks.0") {
                Some(StdConv::load(
                    store,
                    &format!("{pre}.downsample.conv"),
                    conv(cin, cout, 1, stride),
                )?)
            } else {
                None
            };
            blocks.push(BitBlock {
                norms: [n(1, cin)?, n(2, mid)?, n(3, mid)?],
                convs: [
                    c(1, conv(cin, mid, 1, 1))?,
                    c(2, conv(mid, mid, 3, stride))?,
                    c(3, conv(mid, cout, 1, 1))?,
                ],
                downsample,
            });
        }
        let f = cfg.feature_dim();
        let norm = GroupNorm::load(store, "norm", f, g)?;
        let fc = match store.shape_of("head.fc.weight") {
            Some(&[classes, ff, 1, 1]) | Some(&[classes, ff]) if ff == f => {
                let shape = store.shape_of("head.fc.weight").expect("present").to_vec();
                let w = store.get("head.fc.weight", &shape)?;
                let w = Tensor::from_vec(&[classes, f], w.as_slice().to_vec())?;
                Some((w, store.get("head.fc.bias", &[classes])?))
            }
            Some(s) => {
                return Err(Error::Shape {
                    name: "head.fc.weight".into(),
                    expected: vec![cfg.num_classes, f, 1, 1],
                    got: s.to_vec(),
                    file: Some(store.path().to_path_buf()),
                })
            }
            None => None,
        };
        Ok(Bit {
            cfg: cfg.clone(),
            stem,
            blocks,
            norm,
            fc,
        })
    }

    /// Height and width after the stem (7×7/2 convolution, then the padded 3×3/2 max-pool).
    fn stem_size(&self, h: usize) -> usize {
        let h = self.stem.cv.out_size(h);
        (h + 2).saturating_sub(3) / 2 + 1
    }

    /// Height and width of the last stage's map for `size`×`size` images.
    pub fn final_grid(&self, size: usize) -> (usize, usize) {
        let mut h = self.stem_size(size);
        for blk in &self.blocks {
            h = blk.convs[1].cv.out_size(h);
        }
        (h, h)
    }

    /// Multiply-adds ×2 of one image's forward at the config's input size (convolutions, head).
    pub fn flops_per_image(&self) -> f64 {
        let mut total = 0.0;
        let mut count = |cv: &Conv, h: usize| {
            let o = cv.out_size(h);
            total += 2.0 * (o * o * cv.cout * cv.patch_len()) as f64;
            o
        };
        count(&self.stem.cv, self.cfg.img_size);
        let mut h = self.stem_size(self.cfg.img_size);
        for blk in &self.blocks {
            if let Some(ds) = &blk.downsample {
                count(&ds.cv, h);
            }
            let mut hh = h;
            for c in &blk.convs {
                hh = count(&c.cv, hh);
            }
            h = hh;
        }
        let classes = self.fc.as_ref().map_or(0, |(w, _)| w.shape()[0]);
        total + 2.0 * (self.cfg.feature_dim() * classes) as f64
    }

    /// images [B, C, H, W] (NCHW, normalised) → features [B, F] and logits [B, C].
    pub fn forward(&self, images: &Tensor) -> Result<Output> {
        self.forward_on(&mut ConvInfer, images)
    }

    /// `forward` and the final map (after the last norm and ReLU) as local tokens [B, h·w, F].
    pub fn forward_local(&self, images: &Tensor) -> Result<(Output, Tensor)> {
        self.forward_local_on(&mut ConvInfer, images)
    }

    /// `forward` run by executor `e`.
    pub fn forward_on<E: ConvExec>(&self, e: &mut E, images: &Tensor) -> Result<Output> {
        let map = self.last_stage(e, images)?;
        e.pool_and_classify(&map, self.head())
    }

    /// `forward_local` run by executor `e`.
    pub fn forward_local_on<E: ConvExec>(
        &self,
        e: &mut E,
        images: &Tensor,
    ) -> Result<(Output, Tensor)> {
        let map = self.last_stage(e, images)?;
        let out = e.pool_and_classify(&map, self.head())?;
        Ok((out, e.to_host(&map)?))
    }

    /// The final map, ReLU(GN(last stage)), NHWC [B, h, w, F].
    fn last_stage<E: ConvExec>(&self, e: &mut E, images: &Tensor) -> Result<Map<E::S>> {
        image_dims(images, self.cfg.in_chans, &self.cfg.name)?;
        let x = e.input(images)?;
        let x = e.conv2d(&x, &self.stem.params(), None, false)?;
        let mut x = e.max_pool(&x, (3, 2, 1), PoolPad::Zero)?;
        for blk in &self.blocks {
            let p = e.group_norm(&x, &blk.norms[0].params(), true)?;
            let projected = match &blk.downsample {
                Some(d) => Some(e.conv2d(&p, &d.params(), None, false)?),
                None => None,
            };
            let y = e.conv2d(&p, &blk.convs[0].params(), None, false)?;
            drop(p);
            let y = e.group_norm(&y, &blk.norms[1].params(), true)?;
            let y = e.conv2d(&y, &blk.convs[1].params(), None, false)?;
            let y = e.group_norm(&y, &blk.norms[2].params(), true)?;
            let shortcut = projected.as_ref().unwrap_or(&x);
            x = e.conv2d(&y, &blk.convs[2].params(), Some(shortcut), false)?;
        }
        e.group_norm(&x, &self.norm.params(), true)
    }

    /// head.fc, for the executors' pool_and_classify.
    fn head(&self) -> Option<Head<'_>> {
        self.fc.as_ref().map(|fc| Head {
            name: "head.fc",
            fc,
        })
    }

    /// head.fc for a feature store's head.safetensors (the norm before the pooling is not a
    /// norm of the feature, so there is no fc_norm).
    pub fn store_head(&self) -> Option<crate::features::Head> {
        super::resnet::fc_head(self.fc.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bottleneck_widths_round_as_timm() {
        // timm's make_divisible(out * 0.25): BiT's widths are exact; 16/4 = 4 rounds up to 8.
        let cfg = BitConfig::preset("resnetv2_101x1_bit").unwrap();
        assert_eq!(
            cfg.channels.map(|c| cfg.mid(c)),
            [64, 128, 256, 512],
            "BiT-R101x1"
        );
        assert_eq!(make_divisible(4.0), 8);
        assert_eq!(make_divisible(12.0), 16);
        assert_eq!(make_divisible(24.0), 24);
    }

    #[test]
    fn r101x1_has_bits_parameter_count() {
        // BiT-S-R101x1 with a 1000-class head: 44.54 M parameters (timm's resnetv2_101x1_bit).
        let cfg = BitConfig::preset("resnetv2_101x1_bit").unwrap();
        let n: usize = parameter_shapes(&cfg)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(n, 44_541_480);
    }
}
