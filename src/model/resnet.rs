//! ResNets as timm builds them (`timm.models.resnet.ResNet`), for inference, with timm's key
//! names: the backbones of MODE (ResNet-18/34 on CIFAR, ResNet-50 on ImageNet) beside the ViTs.
//!
//!   stem:   x = ReLU(BN(conv1(img)))  (7×7/2, pad 3; then 3×3/2 max-pool, pad 1)
//!           CIFAR variant (`*_cifar`, MODE's): 3×3/1, pad 1, no max-pool
//!   layer1..4 (stride 1, 2, 2, 2 at their first block):
//!     BasicBlock:  y = ReLU(BN2(conv2 3×3(ReLU(BN1(conv1 3×3/s(x))))) + shortcut(x))
//!     Bottleneck:  y = ReLU(BN3(conv3 1×1(ReLU(BN2(conv2 3×3/s(ReLU(BN1(conv1 1×1(x)))))))) + shortcut(x))
//!                  (the stride on the 3×3, as timm and torchvision ≥ 0.13), 4× expansion
//!     shortcut:    x, or BN(conv 1×1/s(x)) (`downsample.0`, `downsample.1`) where the shape changes
//!   feature = mean over H×W (global average pooling); logits = fc(feature)
//!
//! Inference only: each BatchNorm is folded into the convolution before it at load,
//! w' = w·γ/√(var + ε), b' = β − mean·γ/√(var + ε), ε = 1e-5. Activations are NHWC (see
//! backend/cpu/conv.rs).

use crate::backend::cpu::conv::{self, Conv};
use crate::backend::cpu::matmul;
use crate::error::{Error, Result};
use crate::model::conv_exec::{image_dims, ConvExec, ConvInfer, ConvParams, Head, Map, PoolPad};
use crate::model::Output;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// BatchNorm2d's default ε in timm's ResNets.
const BN_EPS: f32 = 1e-5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResNetConfig {
    pub name: String,
    pub block: BlockKind,
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Planes per stage (the block's width; its output is planes × expansion).
    pub channels: [usize; 4],
    /// Output channels of the stem convolution.
    pub stem_width: usize,
    /// MODE's CIFAR stem: 3×3 stride-1 convolution and no max-pool.
    pub cifar_stem: bool,
    pub img_size: usize,
    pub in_chans: usize,
    /// Classes of the default head; a checkpoint's own `fc` takes precedence.
    pub num_classes: usize,
}

impl ResNetConfig {
    /// Width of the pooled feature.
    pub fn feature_dim(&self) -> usize {
        self.channels[3] * self.block.expansion()
    }

    pub fn preset(name: &str) -> Option<ResNetConfig> {
        let full = [64, 128, 256, 512];
        let (block, layers, channels, cifar, img, classes) = match name {
            "resnet18" => (BlockKind::Basic, [2, 2, 2, 2], full, false, 224, 1000),
            "resnet34" => (BlockKind::Basic, [3, 4, 6, 3], full, false, 224, 1000),
            "resnet50" => (BlockKind::Bottleneck, [3, 4, 6, 3], full, false, 224, 1000),
            "resnet18_cifar" => (BlockKind::Basic, [2, 2, 2, 2], full, true, 32, 10),
            "resnet34_cifar" => (BlockKind::Basic, [3, 4, 6, 3], full, true, 32, 100),
            // tools/make_resnet_fixtures.py's tiny models.
            "test_tiny_resnet_basic" => (
                BlockKind::Basic,
                [2, 1, 1, 1],
                [8, 16, 24, 32],
                false,
                64,
                10,
            ),
            "test_tiny_resnet_bottleneck" => (
                BlockKind::Bottleneck,
                [1, 2, 1, 1],
                [8, 16, 24, 32],
                false,
                64,
                10,
            ),
            "test_tiny_resnet_basic_cifar" => (
                BlockKind::Basic,
                [1, 1, 2, 1],
                [8, 16, 24, 32],
                true,
                32,
                10,
            ),
            _ => return None,
        };
        Some(ResNetConfig {
            name: name.to_string(),
            block,
            layers,
            channels,
            stem_width: 64,
            cifar_stem: cifar,
            img_size: img,
            in_chans: 3,
            num_classes: classes,
        })
    }

    pub fn preset_names() -> &'static [&'static str] {
        &[
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet18_cifar",
            "resnet34_cifar",
            "test_tiny_resnet_basic",
            "test_tiny_resnet_bottleneck",
            "test_tiny_resnet_basic_cifar",
        ]
    }
}

/// Every tensor of `cfg`'s checkpoint with its shape (timm's names; BatchNorm as weight, bias,
/// running_mean, running_var), in the order `ResNet::load` reads them.
pub fn parameter_shapes(cfg: &ResNetConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut conv_bn = |conv: String, bn: String, cin: usize, cout: usize, k: usize| {
        out.push((format!("{conv}.weight"), vec![cout, cin, k, k]));
        for what in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{bn}.{what}"), vec![cout]));
        }
    };
    let stem_k = if cfg.cifar_stem { 3 } else { 7 };
    conv_bn(
        "conv1".into(),
        "bn1".into(),
        cfg.in_chans,
        cfg.stem_width,
        stem_k,
    );
    let exp = cfg.block.expansion();
    let mut inplanes = cfg.stem_width;
    for (stage, (&n, &planes)) in cfg.layers.iter().zip(&cfg.channels).enumerate() {
        for i in 0..n {
            let pre = format!("layer{}.{i}", stage + 1);
            let stride = if i == 0 && stage > 0 { 2 } else { 1 };
            let out_ch = planes * exp;
            let convs: Vec<(usize, usize, usize)> = match cfg.block {
                BlockKind::Basic => vec![(inplanes, planes, 3), (planes, planes, 3)],
                BlockKind::Bottleneck => {
                    vec![
                        (inplanes, planes, 1),
                        (planes, planes, 3),
                        (planes, out_ch, 1),
                    ]
                }
            };
            for (j, (cin, cout, k)) in convs.into_iter().enumerate() {
                conv_bn(
                    format!("{pre}.conv{}", j + 1),
                    format!("{pre}.bn{}", j + 1),
                    cin,
                    cout,
                    k,
                );
            }
            if stride != 1 || inplanes != out_ch {
                conv_bn(
                    format!("{pre}.downsample.0"),
                    format!("{pre}.downsample.1"),
                    inplanes,
                    out_ch,
                    1,
                );
            }
            inplanes = out_ch;
        }
    }
    out.push(("fc.weight".into(), vec![cfg.num_classes, cfg.feature_dim()]));
    out.push(("fc.bias".into(), vec![cfg.num_classes]));
    out
}

/// A checkpoint of random weights for `cfg` (He-normal convolutions, BatchNorm at identity):
/// what `mood bench --arch resnet*` times.
pub fn random_store(cfg: &ResNetConfig, seed: u64) -> WeightStore {
    let mut rng = crate::rng::Rng::new(seed);
    let tensors = parameter_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape.iter().skip(1).product();
            let std = (2.0 / fan_in.max(1) as f64).sqrt();
            let values: Vec<f32> = if name.ends_with("running_var")
                || (shape.len() == 1 && name.ends_with(".weight"))
            {
                vec![1.0; n]
            } else if shape.len() == 1 {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            let t = Tensor::from_vec(&shape, values).expect("shape and values agree");
            (name, t)
        })
        .collect();
    WeightStore::from_tensors(&cfg.name, tensors)
}

/// Multiply-adds ×2 of one image's forward at the config's input size (convolutions and fc).
pub fn flops_per_image(model: &ResNet) -> f64 {
    let mut h = model.cfg.img_size;
    let mut total = 0.0;
    let mut conv = |cv: &Conv, h: usize| {
        let o = cv.out_size(h);
        total += 2.0 * (o * o * cv.cout * cv.patch_len()) as f64;
        o
    };
    h = conv(&model.stem.cv, h);
    if !model.cfg.cifar_stem {
        h = (h + 2 - 3) / 2 + 1;
    }
    for blk in &model.blocks {
        if let Some(ds) = &blk.downsample {
            conv(&ds.cv, h);
        }
        let mut hh = h;
        for c in &blk.convs {
            hh = conv(&c.cv, hh);
        }
        h = hh;
    }
    total + 2.0 * (model.cfg.feature_dim() * model.cfg.num_classes) as f64
}

/// A convolution with its BatchNorm folded in: weight [Cout, kh, kw, Cin], bias [Cout], under
/// the convolution's checkpoint name (a device executor uploads it once by that name).
pub struct FoldedConv {
    pub name: String,
    pub cv: Conv,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

impl FoldedConv {
    /// `conv` (a `*.weight` key's prefix) followed by the BatchNorm `bn`, from the store.
    fn load(store: &WeightStore, conv: &str, bn: &str, cv: Conv) -> Result<FoldedConv> {
        let w = store.get(&format!("{conv}.weight"), &[cv.cout, cv.cin, cv.k, cv.k])?;
        let get = |what: &str| store.get(&format!("{bn}.{what}"), &[cv.cout]);
        let (gamma, beta) = (get("weight")?, get("bias")?);
        let (mean, var) = (get("running_mean")?, get("running_var")?);
        let mut w = conv::weight_to_hwc(w.as_slice(), cv.cout, cv.cin, cv.k);
        let mut b = vec![0.0f32; cv.cout];
        let per_out = cv.patch_len();
        for o in 0..cv.cout {
            let v = var.as_slice()[o];
            if v.is_nan() || v < 0.0 {
                return Err(Error::format(
                    store.path(),
                    format!("`{bn}.running_var` has {v} at channel {o}: a variance must be >= 0"),
                ));
            }
            let scale = gamma.as_slice()[o] / (v + BN_EPS).sqrt();
            w[o * per_out..(o + 1) * per_out]
                .iter_mut()
                .for_each(|x| *x *= scale);
            b[o] = beta.as_slice()[o] - mean.as_slice()[o] * scale;
        }
        Ok(FoldedConv {
            name: conv.to_string(),
            cv,
            w,
            b,
        })
    }

    /// What the executors take.
    pub fn params(&self) -> ConvParams<'_> {
        ConvParams {
            name: &self.name,
            cv: &self.cv,
            w: &self.w,
            b: Some(&self.b),
        }
    }
}

pub struct ResBlock {
    /// conv1/bn1, conv2/bn2 (and conv3/bn3 for a bottleneck).
    pub convs: Vec<FoldedConv>,
    pub downsample: Option<FoldedConv>,
}

pub struct ResNet {
    pub cfg: ResNetConfig,
    pub stem: FoldedConv,
    pub blocks: Vec<ResBlock>,
    /// fc: weight [C, F], bias [C]
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

impl ResNet {
    pub fn load(cfg: &ResNetConfig, store: &WeightStore) -> Result<ResNet> {
        let stem_cv = if cfg.cifar_stem {
            conv(cfg.in_chans, cfg.stem_width, 3, 1)
        } else {
            conv(cfg.in_chans, cfg.stem_width, 7, 2)
        };
        let stem = FoldedConv::load(store, "conv1", "bn1", stem_cv)?;
        let exp = cfg.block.expansion();
        let mut inplanes = cfg.stem_width;
        let mut blocks = Vec::new();
        for (stage, (&n, &planes)) in cfg.layers.iter().zip(&cfg.channels).enumerate() {
            for i in 0..n {
                let pre = format!("layer{}.{i}", stage + 1);
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                let out = planes * exp;
                let c = |j: usize, cv: Conv| {
                    FoldedConv::load(
                        store,
                        &format!("{pre}.conv{j}"),
                        &format!("{pre}.bn{j}"),
                        cv,
                    )
                };
                let convs = match cfg.block {
                    BlockKind::Basic => vec![
                        c(1, conv(inplanes, planes, 3, stride))?,
                        c(2, conv(planes, planes, 3, 1))?,
                    ],
                    BlockKind::Bottleneck => vec![
                        c(1, conv(inplanes, planes, 1, 1))?,
                        c(2, conv(planes, planes, 3, stride))?,
                        c(3, conv(planes, out, 1, 1))?,
                    ],
                };
                let downsample = if stride != 1 || inplanes != out {
                    Some(FoldedConv::load(
                        store,
                        &format!("{pre}.downsample.0"),
                        &format!("{pre}.downsample.1"),
                        conv(inplanes, out, 1, stride),
                    )?)
                } else {
                    None
                };
                blocks.push(ResBlock { convs, downsample });
                inplanes = out;
            }
        }
        let f = cfg.feature_dim();
        let fc = match store.shape_of("fc.weight") {
            Some(&[classes, ff]) if ff == f => Some((
                store.get("fc.weight", &[classes, f])?,
                store.get("fc.bias", &[classes])?,
            )),
            Some(s) => {
                return Err(Error::Shape {
                    name: "fc.weight".into(),
                    expected: vec![cfg.num_classes, f],
                    got: s.to_vec(),
                    file: Some(store.path().to_path_buf()),
                })
            }
            None => None,
        };
        Ok(ResNet {
            cfg: cfg.clone(),
            stem,
            blocks,
            fc,
        })
    }

    /// Height and width of the last stage's map for `size`×`size` images.
    pub fn final_grid(&self, size: usize) -> (usize, usize) {
        let mut h = self.stem.cv.out_size(size);
        if !self.cfg.cifar_stem {
            h = (h + 2 - 3) / 2 + 1;
        }
        for blk in &self.blocks {
            for c in &blk.convs {
                h = c.cv.out_size(h);
            }
        }
        (h, h)
    }

    /// images [B, C, S, S] (NCHW, normalised) → features [B, F] and logits [B, C].
    pub fn forward(&self, images: &Tensor) -> Result<Output> {
        self.forward_on(&mut ConvInfer, images)
    }

    /// `forward` and the last stage's map as local tokens [B, h·w, F] (MODE's local features:
    /// one token per position of the final feature map).
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

    /// The last stage's map, NHWC [B, h, w, F].
    fn last_stage<E: ConvExec>(&self, e: &mut E, images: &Tensor) -> Result<Map<E::S>> {
        image_dims(images, self.cfg.in_chans, &self.cfg.name)?;
        let x = e.input(images)?;
        let mut x = e.conv2d(&x, &self.stem.params(), None, true)?;
        if !self.cfg.cifar_stem {
            x = e.max_pool(&x, (3, 2, 1), PoolPad::NegInf)?;
        }
        for blk in &self.blocks {
            let projected = match &blk.downsample {
                Some(ds) => Some(e.conv2d(&x, &ds.params(), None, false)?),
                None => None,
            };
            let last = blk.convs.len() - 1;
            let mut y: Option<Map<E::S>> = None;
            for (j, c) in blk.convs.iter().enumerate() {
                let input = y.as_ref().unwrap_or(&x);
                let res = (j == last).then(|| projected.as_ref().unwrap_or(&x));
                y = Some(e.conv2d(input, &c.params(), res, true)?);
            }
            x = y.expect("a block has convolutions");
        }
        Ok(x)
    }

    /// The fc layer, for the executors' pool_and_classify.
    fn head(&self) -> Option<Head<'_>> {
        self.fc.as_ref().map(|fc| Head { name: "fc", fc })
    }

    /// The fc layer for a feature store's head.safetensors (no norm before it).
    pub fn store_head(&self) -> Option<crate::features::Head> {
        fc_head(self.fc.as_ref())
    }
}

/// The convolutional backbones' end (ResNet, BiT): global average pooling of the final map
/// [B, H·W, F] (NHWC) to the features [B, F], and the fc layer (weight [C, F], bias [C]) to the
/// logits when there is one.
pub(crate) fn pool_and_classify(
    map: &[f32],
    b: usize,
    f: usize,
    fc: Option<&(Tensor, Tensor)>,
) -> Result<Output> {
    let hw = map.len() / (b * f).max(1);
    let features = conv::mean_hw(map, (b, hw, 1, f));
    let logits = match fc {
        Some((wt, bias)) => {
            let c = wt.shape()[0];
            let mut z = matmul::linear_new(&features, wt.as_slice(), b, f, c);
            for row in z.chunks_exact_mut(c) {
                row.iter_mut()
                    .zip(bias.as_slice())
                    .for_each(|(v, b)| *v += b);
            }
            Some(Tensor::from_vec(&[b, c], z)?)
        }
        None => None,
    };
    Ok(Output {
        features: Tensor::from_vec(&[b, f], features)?,
        logits,
    })
}

/// The fc layer as a feature store's head (no norm before it).
pub(crate) fn fc_head(fc: Option<&(Tensor, Tensor)>) -> Option<crate::features::Head> {
    let (w, b) = fc?;
    Some(crate::features::Head {
        weight: w.as_slice().to_vec(),
        bias: b.as_slice().to_vec(),
        fc_norm: None,
    })
}
