//! The ResNets of resnet.rs in training mode, on the CPU: the forward with every BatchNorm on its
//! batch statistics (torch's `model.train()`), keeping what the backward needs, and the backward
//! composed of backend/cpu/conv_grad.rs's ops. For MODE's supervised-contrastive training.
//!
//! Each convolution and its BatchNorm form a unit, z = BN(conv(x)) (no bias: timm's convolutions
//! have none), followed by a ReLU except where a residual is added first:
//!   stem:   x = ReLU(unit(img)) (then the 3×3/2 max-pool unless the CIFAR stem)
//!   block:  h = ReLU(unit₁(x)) (… ReLU(unit₂(h)) for a bottleneck), y = ReLU(unitₙ(h) + s),
//!           s = x or unit_ds(x)
//!   map:    the last block's y [B, h, w, F];  features = mean over h·w.
//! The backward takes ∂L/∂map (ALPA's local tokens) and/or ∂L/∂features (SupCon's pooled
//! features) and returns ∂L/∂ every convolution weight (torch's [Cout, Cin, kh, kw]) and every
//! BatchNorm γ, β under timm's names, and ∂L/∂images (NCHW). The forward also returns each
//! BatchNorm's running statistics after torch's update (momentum 0.1). Inference stays in
//! resnet.rs (BatchNorm folded into the convolutions).

use std::collections::{BTreeMap, HashMap};

use crate::backend::cpu::conv::{self, Conv, Epilogue};
use crate::backend::cpu::conv_grad::{self, BatchNormSaved};
use crate::error::{Error, Result};
use crate::model::conv_exec::{image_dims, window_out, Nhwc};
use crate::model::resnet::{BlockKind, ResNetConfig};
use crate::tensor::Tensor;

/// BatchNorm2d's defaults in timm's ResNets.
pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

/// A convolution and the BatchNorm after it, under their checkpoint names.
#[derive(Clone, Debug)]
pub struct ConvBn {
    pub conv: String,
    pub bn: String,
    pub cv: Conv,
}

pub struct TrainBlock {
    pub units: Vec<ConvBn>,
    pub downsample: Option<ConvBn>,
}

/// The geometry of a ResNet for training (the same as `ResNet::load` builds).
pub struct ResNetTrain {
    pub cfg: ResNetConfig,
    pub stem: ConvBn,
    pub blocks: Vec<TrainBlock>,
}

fn unit(conv: String, bn: String, cin: usize, cout: usize, k: usize, stride: usize) -> ConvBn {
    ConvBn {
        conv,
        bn,
        cv: Conv {
            cin,
            cout,
            k,
            stride,
            pad: k / 2,
        },
    }
}

/// What one unit's backward needs: its input, its weight in the CPU layout and BatchNorm's saved
/// normalised values.
struct UnitTape {
    x: Vec<f32>,
    dims: Nhwc,
    w_hwc: Vec<f32>,
    bn: BatchNormSaved,
}

struct BlockTape {
    units: Vec<UnitTape>,
    /// The ReLU outputs of every unit but the last.
    hidden: Vec<Vec<f32>>,
    downsample: Option<UnitTape>,
    /// The block's output (after its final ReLU).
    out: Vec<f32>,
}

/// A training forward's results and what its backward reads.
pub struct TrainForward {
    /// The last stage's map, NHWC [B, h, w, F].
    pub map: Vec<f32>,
    pub map_dims: Nhwc,
    /// Globally pooled features [B, F].
    pub features: Vec<f32>,
    /// Every BatchNorm's (`running_mean`, `running_var`) after this batch, by checkpoint name.
    pub running: Vec<(String, Vec<f32>)>,
    stem: UnitTape,
    /// The stem's ReLU output (the max-pool's input).
    stem_out: Vec<f32>,
    stem_dims: Nhwc,
    blocks: Vec<BlockTape>,
}

/// The gradients of a backward pass.
pub struct TrainGrads {
    /// By checkpoint name, in the checkpoint's layout.
    pub params: HashMap<String, Vec<f32>>,
    /// ∂L/∂images [B, C, H, W].
    pub images: Vec<f32>,
}

/// [Cout, kh, kw, Cin] (the CPU layout) back to torch's [Cout, Cin, kh, kw].
fn hwc_to_oihw(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    for o in 0..cout {
        for c in 0..cin {
            for i in 0..k {
                for j in 0..k {
                    out[((o * cin + c) * k + i) * k + j] = w[((o * k + i) * k + j) * cin + c];
                }
            }
        }
    }
    out
}

/// NHWC [B, H, W, C] → NCHW.
fn nhwc_to_nchw(x: &[f32], d: Nhwc) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for b in 0..d.b {
        for y in 0..d.h {
            for xx in 0..d.w {
                let src = ((b * d.h + y) * d.w + xx) * d.c;
                for c in 0..d.c {
                    out[((b * d.c + c) * d.h + y) * d.w + xx] = x[src + c];
                }
            }
        }
    }
    out
}

fn param<'p>(
    params: &'p BTreeMap<String, Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<&'p [f32]> {
    let t = params
        .get(name)
        .ok_or_else(|| Error::Usage(format!("training a ResNet needs `{name}`")))?;
    if t.shape() != shape {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: shape.to_vec(),
            got: t.shape().to_vec(),
            file: None,
        });
    }
    Ok(t.as_slice())
}

impl ResNetTrain {
    pub fn new(cfg: &ResNetConfig) -> ResNetTrain {
        let stem = if cfg.cifar_stem {
            unit(
                "conv1".into(),
                "bn1".into(),
                cfg.in_chans,
                cfg.stem_width,
                3,
                1,
            )
        } else {
            unit(
                "conv1".into(),
                "bn1".into(),
                cfg.in_chans,
                cfg.stem_width,
                7,
                2,
            )
        };
        let exp = match cfg.block {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        };
        let mut inplanes = cfg.stem_width;
        let mut blocks = Vec::new();
        for (stage, (&n, &planes)) in cfg.layers.iter().zip(&cfg.channels).enumerate() {
            for i in 0..n {
                let pre = format!("layer{}.{i}", stage + 1);
                let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                let out = planes * exp;
                let u = |j: usize, cin, cout, k, s| {
                    unit(
                        format!("{pre}.conv{j}"),
                        format!("{pre}.bn{j}"),
                        cin,
                        cout,
                        k,
                        s,
                    )
                };
                let units = match cfg.block {
                    BlockKind::Basic => vec![
                        u(1, inplanes, planes, 3, stride),
                        u(2, planes, planes, 3, 1),
                    ],
                    BlockKind::Bottleneck => vec![
                        u(1, inplanes, planes, 1, 1),
                        u(2, planes, planes, 3, stride),
                        u(3, planes, out, 1, 1),
                    ],
                };
                let downsample = (stride != 1 || inplanes != out).then(|| {
                    unit(
                        format!("{pre}.downsample.0"),
                        format!("{pre}.downsample.1"),
                        inplanes,
                        out,
                        1,
                        stride,
                    )
                });
                blocks.push(TrainBlock { units, downsample });
                inplanes = out;
            }
        }
        ResNetTrain {
            cfg: cfg.clone(),
            stem,
            blocks,
        }
    }

    /// Every unit in forward order (the stem first).
    pub fn units(&self) -> impl Iterator<Item = &ConvBn> {
        std::iter::once(&self.stem).chain(
            self.blocks
                .iter()
                .flat_map(|b| b.downsample.iter().chain(&b.units)),
        )
    }

    /// z = BN(conv(x)) in training mode; the running statistics after the batch go to `running`.
    fn unit_forward(
        &self,
        u: &ConvBn,
        params: &BTreeMap<String, Tensor>,
        x: Vec<f32>,
        dims: Nhwc,
        running: &mut Vec<(String, Vec<f32>)>,
    ) -> Result<(Vec<f32>, Nhwc, UnitTape)> {
        let cv = &u.cv;
        let w = param(
            params,
            &format!("{}.weight", u.conv),
            &[cv.cout, cv.cin, cv.k, cv.k],
        )?;
        let c = [cv.cout];
        let gamma = param(params, &format!("{}.weight", u.bn), &c)?;
        let beta = param(params, &format!("{}.bias", u.bn), &c)?;
        let mut rm = param(params, &format!("{}.running_mean", u.bn), &c)?.to_vec();
        let mut rv = param(params, &format!("{}.running_var", u.bn), &c)?.to_vec();
        let out = window_out(dims, cv.cout, (cv.k, cv.stride, cv.pad));
        if dims.c != cv.cin || out.is_empty() {
            return Err(Error::Data(format!(
                "{}: a {cv:?} convolution cannot take a map {dims:?}",
                u.conv
            )));
        }
        let w_hwc = conv::weight_to_hwc(w, cv.cout, cv.cin, cv.k);
        let z = conv::conv2d(
            &x,
            (dims.b, dims.h, dims.w),
            &w_hwc,
            cv,
            &Epilogue::default(),
        );
        let (y, bn) = conv_grad::batch_norm_train(
            &z,
            cv.cout,
            (gamma, beta),
            (&mut rm, &mut rv),
            BN_MOMENTUM,
            BN_EPS,
        );
        running.push((format!("{}.running_mean", u.bn), rm));
        running.push((format!("{}.running_var", u.bn), rv));
        Ok((y, out, UnitTape { x, dims, w_hwc, bn }))
    }

    /// The training forward of images [B, C, S, S] (NCHW, normalised).
    pub fn forward(
        &self,
        params: &BTreeMap<String, Tensor>,
        images: &Tensor,
    ) -> Result<TrainForward> {
        let d = image_dims(images, self.cfg.in_chans, &self.cfg.name)?;
        let x0 = conv::nchw_to_nhwc(images.as_slice(), d.b, d.c, d.h, d.w);
        let d0 = Nhwc {
            b: d.b,
            h: d.h,
            w: d.w,
            c: d.c,
        };
        let mut running = Vec::new();
        let (mut z, stem_dims, stem) =
            self.unit_forward(&self.stem, params, x0, d0, &mut running)?;
        relu(&mut z);
        let stem_out = z;
        let (mut x, mut dims) = if self.cfg.cifar_stem {
            (stem_out.clone(), stem_dims)
        } else {
            let sd = stem_dims;
            let p = conv::max_pool(&stem_out, (sd.b, sd.h, sd.w, sd.c), 3, 2, 1);
            (p, window_out(sd, sd.c, (3, 2, 1)))
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let (short, downsample) = match &blk.downsample {
                Some(u) => {
                    let (s, _, t) = self.unit_forward(u, params, x.clone(), dims, &mut running)?;
                    (s, Some(t))
                }
                None => (x.clone(), None),
            };
            let (mut h, mut hd) = (x, dims);
            let mut units = Vec::with_capacity(blk.units.len());
            let mut hidden = Vec::new();
            let last = blk.units.len() - 1;
            for (j, u) in blk.units.iter().enumerate() {
                let (mut z, zd, t) = self.unit_forward(u, params, h, hd, &mut running)?;
                units.push(t);
                if j == last {
                    if short.len() != z.len() {
                        return Err(Error::Data(format!(
                            "{}: the shortcut does not match the block's output {zd:?}",
                            u.conv
                        )));
                    }
                    z.iter_mut().zip(&short).for_each(|(a, s)| *a += s);
                    relu(&mut z);
                } else {
                    relu(&mut z);
                    hidden.push(z.clone());
                }
                (h, hd) = (z, zd);
            }
            blocks.push(BlockTape {
                units,
                hidden,
                downsample,
                out: h.clone(),
            });
            (x, dims) = (h, hd);
        }
        let features = conv::mean_hw(&x, (dims.b, dims.h, dims.w, dims.c));
        Ok(TrainForward {
            map: x,
            map_dims: dims,
            features,
            running,
            stem,
            stem_out,
            stem_dims,
            blocks,
        })
    }

    /// Back through one unit from ∂L/∂z: stores ∂L/∂weight, ∂L/∂γ, ∂L/∂β; returns ∂L/∂x.
    fn unit_backward(
        &self,
        u: &ConvBn,
        t: &UnitTape,
        params: &BTreeMap<String, Tensor>,
        dz: &[f32],
        grads: &mut HashMap<String, Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let cv = &u.cv;
        let gamma = param(params, &format!("{}.weight", u.bn), &[cv.cout])?;
        let (dconv, dgamma, dbeta) = conv_grad::batch_norm_backward(dz, cv.cout, gamma, &t.bn);
        let (dx, dw, _) =
            conv_grad::conv2d_backward(&t.x, (t.dims.b, t.dims.h, t.dims.w), &t.w_hwc, cv, &dconv);
        grads.insert(
            format!("{}.weight", u.conv),
            hwc_to_oihw(&dw, cv.cout, cv.cin, cv.k),
        );
        grads.insert(format!("{}.weight", u.bn), dgamma);
        grads.insert(format!("{}.bias", u.bn), dbeta);
        Ok(dx)
    }

    /// The backward of `fw` from ∂L/∂map [B, h, w, F] and/or ∂L/∂features [B, F].
    pub fn backward(
        &self,
        params: &BTreeMap<String, Tensor>,
        fw: &TrainForward,
        d_map: Option<&[f32]>,
        d_features: Option<&[f32]>,
    ) -> Result<TrainGrads> {
        let md = fw.map_dims;
        let mut g = match d_map {
            Some(d) if d.len() == fw.map.len() => d.to_vec(),
            Some(d) => {
                return Err(Error::Data(format!(
                    "the map's gradient has {} values, the map {}",
                    d.len(),
                    fw.map.len()
                )))
            }
            None => vec![0.0f32; fw.map.len()],
        };
        if let Some(df) = d_features {
            if df.len() != md.b * md.c {
                return Err(Error::Data(format!(
                    "the features' gradient has {} values, the features {}",
                    df.len(),
                    md.b * md.c
                )));
            }
            let dp = conv_grad::mean_hw_backward(df, (md.b, md.h, md.w, md.c));
            g.iter_mut().zip(&dp).for_each(|(a, b)| *a += b);
        }
        let mut grads = HashMap::new();
        for (blk, bt) in self.blocks.iter().zip(&fw.blocks).rev() {
            // Through the final ReLU: the sum's gradient feeds both the branch and the shortcut.
            let g_sum = conv_grad::relu_backward(&bt.out, &g);
            let mut gm = g_sum.clone();
            for (j, (u, t)) in blk.units.iter().zip(&bt.units).enumerate().rev() {
                if j < bt.hidden.len() {
                    gm = conv_grad::relu_backward(&bt.hidden[j], &gm);
                }
                gm = self.unit_backward(u, t, params, &gm, &mut grads)?;
            }
            let gs = match (&blk.downsample, &bt.downsample) {
                (Some(u), Some(t)) => self.unit_backward(u, t, params, &g_sum, &mut grads)?,
                _ => g_sum,
            };
            gm.iter_mut().zip(&gs).for_each(|(a, b)| *a += b);
            g = gm;
        }
        let sd = fw.stem_dims;
        if !self.cfg.cifar_stem {
            g = conv_grad::max_pool_backward(&fw.stem_out, (sd.b, sd.h, sd.w, sd.c), (3, 2, 1), &g);
        }
        let g = conv_grad::relu_backward(&fw.stem_out, &g);
        let dx = self.unit_backward(&self.stem, &fw.stem, params, &g, &mut grads)?;
        Ok(TrainGrads {
            params: grads,
            images: nhwc_to_nchw(&dx, fw.stem.dims),
        })
    }
}

fn relu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
}

/// A fresh ResNet as torch initialises timm's: convolutions Kaiming-normal over fan-out
/// (std √(2 / (Cout·k²))), BatchNorm γ = 1, β = 0, running mean 0 and variance 1; no fc (MODE's
/// encoder ends at the pooled features).
pub fn init_params(cfg: &ResNetConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut out = BTreeMap::new();
    for u in ResNetTrain::new(cfg).units() {
        let cv = u.cv;
        let std = (2.0 / (cv.cout * cv.k * cv.k) as f64).sqrt();
        let n = cv.cout * cv.cin * cv.k * cv.k;
        let w = (0..n).map(|_| (rng.normal() * std) as f32).collect();
        let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(s, v).expect("sizes agree");
        out.insert(
            format!("{}.weight", u.conv),
            t(w, &[cv.cout, cv.cin, cv.k, cv.k]),
        );
        for (what, v) in [
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ] {
            out.insert(format!("{}.{what}", u.bn), t(vec![v; cv.cout], &[cv.cout]));
        }
    }
    out
}
