//! The ResNets of resnet.rs in training mode: the forward with every BatchNorm on its batch
//! statistics (torch's `model.train()`), keeping what the backward needs, and the backward, written
//! once over `ConvTrainExec` (conv_train_exec.rs: the CPU ops of backend/cpu/conv_grad.rs, or the
//! kernels of model/cuda_conv_train.rs). For MODE's supervised-contrastive training.
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
//! BatchNorm's running statistics after torch's update (momentum 0.1). `forward` and `backward`
//! run on the CPU over host parameters; `forward_on` and `backward_on` on any executor. Inference stays in
//! resnet.rs (BatchNorm folded into the convolutions).

use std::collections::{BTreeMap, HashMap};

use crate::backend::cpu::conv::Conv;
use crate::backend::cpu::conv_grad::BatchNormSaved;
use crate::error::{Error, Result};
use crate::model::conv_exec::{image_dims, window_out, Nhwc};
use crate::model::conv_train_exec::{ConvTrainExec, CpuConvTrain};
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

/// What one unit's backward needs: its input and BatchNorm's saved normalised values.
struct UnitTape<S, B> {
    x: S,
    dims: Nhwc,
    bn: B,
}

/// A unit's output z, its shape and its tape.
type UnitOut<E> = (
    <E as ConvTrainExec>::S,
    Nhwc,
    UnitTape<<E as ConvTrainExec>::S, <E as ConvTrainExec>::BnSaved>,
);

struct BlockTape<S, B> {
    units: Vec<UnitTape<S, B>>,
    /// The ReLU outputs of every unit but the last.
    hidden: Vec<S>,
    downsample: Option<UnitTape<S, B>>,
    /// The block's output (after its final ReLU).
    out: S,
}

/// What a training forward on an executor with storage S (BatchNorm's saved values B) keeps for
/// its backward.
pub struct Tape<S, B> {
    stem: UnitTape<S, B>,
    /// The stem's ReLU output (the max-pool's input).
    stem_out: S,
    stem_dims: Nhwc,
    blocks: Vec<BlockTape<S, B>>,
}

/// A training forward's results on an executor: the last stage's map NHWC [B, h, w, F], the
/// globally pooled features [B, F] and the tape of its backward.
pub struct Forward<S, B> {
    pub map: S,
    pub map_dims: Nhwc,
    pub features: S,
    pub tape: Tape<S, B>,
}

/// A backward's gradients on an executor: each parameter's by checkpoint name (a convolution's
/// in the executor's weight layout), and ∂L/∂ the NHWC input map.
pub struct Backward<S> {
    pub params: HashMap<String, S>,
    pub input: S,
}

/// A training forward's results on the CPU and what its backward reads.
pub struct TrainForward {
    /// The last stage's map, NHWC [B, h, w, F].
    pub map: Vec<f32>,
    pub map_dims: Nhwc,
    /// Globally pooled features [B, F].
    pub features: Vec<f32>,
    /// Every BatchNorm's (`running_mean`, `running_var`) after this batch, by checkpoint name.
    pub running: Vec<(String, Vec<f32>)>,
    tape: Tape<Vec<f32>, BatchNormSaved>,
}

/// The gradients of a backward pass on the CPU.
pub struct TrainGrads {
    /// By checkpoint name, in the checkpoint's layout.
    pub params: HashMap<String, Vec<f32>>,
    /// ∂L/∂images [B, C, H, W].
    pub images: Vec<f32>,
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

    /// z = BN(conv(x)) in training mode on `ex` (which moves the running statistics).
    fn unit_forward<E: ConvTrainExec>(
        &self,
        ex: &mut E,
        u: &ConvBn,
        x: E::S,
        dims: Nhwc,
    ) -> Result<UnitOut<E>> {
        let cv = &u.cv;
        let out = window_out(dims, cv.cout, (cv.k, cv.stride, cv.pad));
        if dims.c != cv.cin || out.is_empty() {
            return Err(Error::Data(format!(
                "{}: a {cv:?} convolution cannot take a map {dims:?}",
                u.conv
            )));
        }
        let z = ex.conv2d(&x, dims, &format!("{}.weight", u.conv), cv)?;
        let (y, bn) = ex.batch_norm_train(&z, &u.bn, cv.cout, BN_MOMENTUM, BN_EPS)?;
        Ok((y, out, UnitTape { x, dims, bn }))
    }

    /// The training forward of images [B, C, S, S] (NCHW, normalised) on `ex`.
    pub fn forward_on<E: ConvTrainExec>(
        &self,
        ex: &mut E,
        images: &Tensor,
    ) -> Result<Forward<E::S, E::BnSaved>> {
        let d0 = image_dims(images, self.cfg.in_chans, &self.cfg.name)?;
        let x0 = ex.input(images)?;
        let (mut z, stem_dims, stem) = self.unit_forward(ex, &self.stem, x0, d0)?;
        ex.relu(&mut z)?;
        let stem_out = z;
        let (mut x, mut dims) = if self.cfg.cifar_stem {
            (ex.copy(&stem_out)?, stem_dims)
        } else {
            let p = ex.max_pool(&stem_out, stem_dims, (3, 2, 1))?;
            (p, window_out(stem_dims, stem_dims.c, (3, 2, 1)))
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let (short, downsample) = match &blk.downsample {
                Some(u) => {
                    let xc = ex.copy(&x)?;
                    let (s, _, t) = self.unit_forward(ex, u, xc, dims)?;
                    (s, Some(t))
                }
                None => (ex.copy(&x)?, None),
            };
            let (mut h, mut hd) = (x, dims);
            let mut units = Vec::with_capacity(blk.units.len());
            let mut hidden = Vec::new();
            let last = blk.units.len() - 1;
            for (j, u) in blk.units.iter().enumerate() {
                let (mut z, zd, t) = self.unit_forward(ex, u, h, hd)?;
                units.push(t);
                if j == last {
                    if E::len(&short) != E::len(&z) {
                        return Err(Error::Data(format!(
                            "{}: the shortcut does not match the block's output {zd:?}",
                            u.conv
                        )));
                    }
                    ex.add(&mut z, &short)?;
                    ex.relu(&mut z)?;
                } else {
                    ex.relu(&mut z)?;
                    hidden.push(ex.copy(&z)?);
                }
                (h, hd) = (z, zd);
            }
            blocks.push(BlockTape {
                units,
                hidden,
                downsample,
                out: ex.copy(&h)?,
            });
            (x, dims) = (h, hd);
        }
        let features = ex.mean_hw(&x, dims)?;
        Ok(Forward {
            map: x,
            map_dims: dims,
            features,
            tape: Tape {
                stem,
                stem_out,
                stem_dims,
                blocks,
            },
        })
    }

    /// Back through one unit from ∂L/∂z: stores ∂L/∂weight, ∂L/∂γ, ∂L/∂β; returns ∂L/∂x.
    fn unit_backward<E: ConvTrainExec>(
        &self,
        ex: &mut E,
        u: &ConvBn,
        t: &UnitTape<E::S, E::BnSaved>,
        dz: &E::S,
        grads: &mut HashMap<String, E::S>,
    ) -> Result<E::S> {
        let cv = &u.cv;
        let (dconv, dgamma, dbeta) = ex.batch_norm_backward(dz, &u.bn, cv.cout, &t.bn)?;
        let weight = format!("{}.weight", u.conv);
        let (dx, dw) = ex.conv2d_backward(&t.x, t.dims, &weight, cv, &dconv)?;
        grads.insert(weight, dw);
        grads.insert(format!("{}.weight", u.bn), dgamma);
        grads.insert(format!("{}.bias", u.bn), dbeta);
        Ok(dx)
    }

    /// The backward on `ex` of a forward whose map is [map_dims] from ∂L/∂map and/or
    /// ∂L/∂features [B, F] (both on `ex`; neither: a zero gradient).
    pub fn backward_on<E: ConvTrainExec>(
        &self,
        ex: &mut E,
        tape: &Tape<E::S, E::BnSaved>,
        map_dims: Nhwc,
        d_map: Option<E::S>,
        d_features: Option<&E::S>,
    ) -> Result<Backward<E::S>> {
        let md = map_dims;
        let mut g = match d_map {
            Some(d) if E::len(&d) == md.len() => d,
            Some(d) => {
                return Err(Error::Data(format!(
                    "the map's gradient has {} values, the map {}",
                    E::len(&d),
                    md.len()
                )))
            }
            None => ex.upload(&vec![0.0f32; md.len()])?,
        };
        if let Some(df) = d_features {
            if E::len(df) != md.b * md.c {
                return Err(Error::Data(format!(
                    "the features' gradient has {} values, the features {}",
                    E::len(df),
                    md.b * md.c
                )));
            }
            let dp = ex.mean_hw_backward(df, md)?;
            ex.add(&mut g, &dp)?;
        }
        let mut grads = HashMap::new();
        for (blk, bt) in self.blocks.iter().zip(&tape.blocks).rev() {
            // Through the final ReLU: the sum's gradient feeds both the branch and the shortcut.
            let g_sum = ex.relu_backward(&bt.out, &g)?;
            let mut gm = ex.copy(&g_sum)?;
            for (j, (u, t)) in blk.units.iter().zip(&bt.units).enumerate().rev() {
                if j < bt.hidden.len() {
                    gm = ex.relu_backward(&bt.hidden[j], &gm)?;
                }
                gm = self.unit_backward(ex, u, t, &gm, &mut grads)?;
            }
            let gs = match (&blk.downsample, &bt.downsample) {
                (Some(u), Some(t)) => self.unit_backward(ex, u, t, &g_sum, &mut grads)?,
                _ => g_sum,
            };
            ex.add(&mut gm, &gs)?;
            g = gm;
        }
        if !self.cfg.cifar_stem {
            g = ex.max_pool_backward(&tape.stem_out, tape.stem_dims, (3, 2, 1), &g)?;
        }
        let g = ex.relu_backward(&tape.stem_out, &g)?;
        let input = self.unit_backward(ex, &self.stem, &tape.stem, &g, &mut grads)?;
        Ok(Backward {
            params: grads,
            input,
        })
    }

    /// The training forward of images [B, C, S, S] (NCHW, normalised) on the CPU.
    pub fn forward(
        &self,
        params: &BTreeMap<String, Tensor>,
        images: &Tensor,
    ) -> Result<TrainForward> {
        let mut ex = CpuConvTrain::new(params);
        let fw = self.forward_on(&mut ex, images)?;
        Ok(TrainForward {
            map: fw.map,
            map_dims: fw.map_dims,
            features: fw.features,
            running: ex.running,
            tape: fw.tape,
        })
    }

    /// The backward of `fw` on the CPU from ∂L/∂map [B, h, w, F] and/or ∂L/∂features [B, F].
    pub fn backward(
        &self,
        params: &BTreeMap<String, Tensor>,
        fw: &TrainForward,
        d_map: Option<&[f32]>,
        d_features: Option<&[f32]>,
    ) -> Result<TrainGrads> {
        let mut ex = CpuConvTrain::new(params);
        let d_features = d_features.map(|d| d.to_vec());
        let bw = self.backward_on(
            &mut ex,
            &fw.tape,
            fw.map_dims,
            d_map.map(|d| d.to_vec()),
            d_features.as_ref(),
        )?;
        Ok(TrainGrads {
            params: bw.params,
            images: nhwc_to_nchw(&bw.input, fw.tape.stem.dims),
        })
    }
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
