//! MODE's training of a ResNet encoder, on the CPU or a CUDA device (SPEC E; mode_device.rs): two augmented views of every image go
//! through the network in one batch (BatchNorm in training mode), and
//!   L = w_SupCon·SupCon(head(pooled features)) + w_ALPA·ALPA(last stage's map as tokens [h·w, C]),
//! optimised by SGD (momentum 0.9, weight decay 1e-4 on every parameter, as torch.optim.SGD) with
//! SupContrast's per-epoch cosine (η_min = lr·10⁻³, epochs counted from 1; a 10-epoch linear
//! warmup from 0.01 when the batch exceeds 256). Views: RandomResizedCrop (scale 0.2–1, ratio
//! 3/4–4/3, bilinear), a horizontal flip with p ½, then MODE's colour augmentation on the [0, 1]
//! pixels (RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p 0.8), RandomGrayscale(p 0.2);
//! data/color_jitter.rs; the views are un-normalised with the data's mean/std, jittered and
//! normalised again). Every draw derives from (seed, epoch, step), so two runs with the same
//! settings end with the same weights. A checkpoint (parameters, BatchNorm statistics, the head,
//! ALPA's MLPs, the momentum buffers under `optim.momentum.*`, the epoch reached and the settings)
//! is written atomically after every epoch; `mood extract --arch <resnet>` reads it as it is, and
//! `resume_from` continues it (`mood mode-train --resume`): a run resumed from epoch k ends with
//! the same bytes as one that never stopped.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::data::color_jitter::ColorAug;
use crate::error::{Error, Result};
use crate::model::conv_exec::Nhwc;
use crate::model::resnet::ResNetConfig;
use crate::model::resnet_train::{init_params, ResNetTrain};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::train::alpa::{Alpa, WEIGHT_NAMES};
use crate::train::checkpoint::Progress;
use crate::train::device::TrainOn;
use crate::train::loops::Dataset;
use crate::train::mode_device::ModeStep;
pub use crate::train::mode_resume::{resume_from, Resume};
use crate::train::supcon::{SupCon, HEAD_NAMES};
use crate::weights::{safetensors, RawTensor, WDType};

/// One of MODE's recipes, or a run's own settings.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ModeSettings {
    pub recipe: String,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    /// Weight of SupCon (0: ALPA alone, MODE-F).
    pub supcon_weight: f32,
    pub supcon: SupCon,
    /// Output width of the projection head (MODE: 128).
    pub head_dim: usize,
    /// Weight of ALPA (None: no ALPA).
    pub alpa_weight: Option<f32>,
    /// d, the query/key/value width of ALPA's MLPs (MODE: 80).
    pub alpa_dim: usize,
    pub seed: u64,
    /// Colour jitter and grayscale of each view (MODE's: `ColorAug::MODE`).
    pub color: ColorAug,
    /// Per-channel mean and std the images are normalised with (the colour augmentation works
    /// on the [0, 1] pixels); the digits': ½.
    pub pixel_mean: [f32; 3],
    pub pixel_std: [f32; 3],
}

impl ModeSettings {
    /// MODE's recipes: `mode-t` (SupCon + ALPA from scratch, lr 0.5, batch 128), `mode-f` (ALPA
    /// alone from a trained encoder, lr 0.1, batch 128) and `supcon` (the SupCon baseline, lr 0.5,
    /// batch 512); 500 epochs each.
    pub fn preset(name: &str) -> Result<ModeSettings> {
        let (supcon_weight, alpa, lr, batch) = match name {
            "mode-t" => (1.0, Some(1.0), 0.5, 128),
            "mode-f" => (0.0, Some(1.0), 0.1, 128),
            "supcon" => (1.0, None, 0.5, 512),
            other => {
                return Err(Error::Usage(format!(
                    "--recipe {other}: not one of MODE's recipes (mode-t, mode-f, supcon)"
                )))
            }
        };
        Ok(ModeSettings {
            recipe: name.to_string(),
            epochs: 500,
            batch,
            lr,
            momentum: 0.9,
            weight_decay: 1e-4,
            supcon_weight,
            supcon: SupCon::default(),
            head_dim: 128,
            alpa_weight: alpa,
            alpa_dim: 80,
            seed: 0,
            color: ColorAug::MODE,
            pixel_mean: crate::data::preprocess::HALF,
            pixel_std: crate::data::preprocess::HALF,
        })
    }

    /// One line naming the first setting that cannot train.
    pub fn check(&self) -> Result<()> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::Usage(format!(
                    "{name} must be a finite, non-negative number, got {v}"
                )))
            }
        };
        finite("--lr", self.lr)?;
        finite("--momentum", self.momentum)?;
        finite("--weight-decay", self.weight_decay)?;
        finite("--supcon", self.supcon_weight)?;
        finite("--alpa", self.alpa_weight.unwrap_or(0.0))?;
        let c = &self.color;
        if ![c.jitter_p, c.grayscale_p]
            .iter()
            .all(|p| (0.0..=1.0).contains(p))
            || ![c.brightness, c.contrast, c.saturation]
                .iter()
                .all(|v| *v >= 0.0)
            || !(0.0..=0.5).contains(&c.hue)
            || self.pixel_std.iter().any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(Error::Usage(format!(
                "colour augmentation {c:?} or pixel std {:?} out of range",
                self.pixel_std
            )));
        }
        if self.epochs == 0 || self.batch < 2 || self.head_dim == 0 || self.alpa_dim == 0 {
            return Err(Error::Usage(format!(
                "--epochs ({}), --batch ({}, at least 2), --head-dim ({}) and --alpa-dim ({}) must be positive",
                self.epochs, self.batch, self.head_dim, self.alpa_dim
            )));
        }
        if self.supcon_weight == 0.0 && self.alpa_weight.is_none_or(|w| w == 0.0) {
            return Err(Error::Usage(
                "nothing to train: both --supcon and --alpa are 0 or absent".into(),
            ));
        }
        Ok(())
    }
}

/// SupContrast's learning rate at `step` of `epoch` (0-based here, 1-based in its formula).
pub fn learning_rate(s: &ModeSettings, epoch: usize, step: usize, per_epoch: usize) -> f32 {
    let eta_min = s.lr as f64 * 1e-3;
    let cosine = |e: f64| {
        eta_min
            + (s.lr as f64 - eta_min) * (1.0 + (std::f64::consts::PI * e / s.epochs as f64).cos())
                / 2.0
    };
    let e = epoch + 1;
    const WARM_EPOCHS: usize = 10;
    if s.batch > 256 && e <= WARM_EPOCHS {
        let p = (step + (e - 1) * per_epoch) as f64 / (WARM_EPOCHS * per_epoch) as f64;
        let to = cosine(WARM_EPOCHS as f64);
        return (0.01 + p * (to - 0.01)) as f32;
    }
    cosine(e as f64) as f32
}

/// The bundled digits of a `digits[:CLASSES][@train|@test]` spec (the train part by default) at
/// `size`×`size`, with the number of classes their labels span.
pub fn digits_data(spec: &str, size: usize) -> Result<Dataset> {
    use crate::data::spec::{DataSpec, DigitsPart};
    let DataSpec::Digits { classes, part } = DataSpec::parse(spec)? else {
        return Err(Error::Usage(format!(
            "--data {spec}: not a digits spec (digits[:CLASSES][@train|@test]); \
             pipeline::data::mode_training_data reads the others"
        )));
    };
    if size % 8 != 0 {
        return Err(Error::Usage(format!(
            "the digits render at multiples of 8 pixels; this ResNet takes {size}x{size}"
        )));
    }
    let d = crate::data::digits::load()?;
    let test = part == Some(DigitsPart::Test);
    let (images, labels) = crate::data::digits::split(&d, &classes, test, size);
    Ok(Dataset {
        images,
        chw: [3, size, size],
        labels,
    })
}

/// Adds what a MODE run trains beside the encoder where `params` lacks it: the projection head
/// and ALPA's MLPs, as nn.Linear initialises them (uniform ±1/√fan_in).
pub fn add_heads(params: &mut BTreeMap<String, Tensor>, f: usize, s: &ModeSettings) {
    let mut rng = Rng::new(s.seed ^ 0x5c0_4ead);
    let mut linear = |name: &str, shape: &[usize], fan_in: usize| {
        let n: usize = shape.iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let v = (0..n)
            .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
            .collect();
        params
            .entry(name.to_string())
            .or_insert_with(|| Tensor::from_vec(shape, v).expect("sizes agree"));
    };
    let p = s.head_dim;
    let shapes: [&[usize]; 4] = [&[f, f], &[f], &[p, f], &[p]];
    for (name, shape) in HEAD_NAMES.iter().zip(shapes) {
        linear(name, shape, f);
    }
    if s.alpa_weight.is_some() {
        for name in WEIGHT_NAMES {
            let rows = if name.ends_with(".2") { s.alpa_dim } else { f };
            linear(&format!("alpa.{name}.weight"), &[rows, f], f);
        }
    }
}

/// A fresh encoder for `cfg` with MODE's heads.
pub fn initial_params(cfg: &ResNetConfig, s: &ModeSettings) -> BTreeMap<String, Tensor> {
    let mut params = init_params(cfg, s.seed);
    add_heads(&mut params, cfg.feature_dim(), s);
    params
}

/// Bilinear RandomResizedCrop (scale 0.2–1, ratio 3/4–4/3; torchvision's ten tries, then the
/// whole image) and a horizontal flip with p ½, of one image [C, S, S] into `out`.
fn augment(img: &[f32], c: usize, s: usize, rng: &mut Rng, out: &mut [f32]) {
    let area = (s * s) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    let (mut ch, mut cw, mut top, mut left) = (s, s, 0, 0);
    for _ in 0..10 {
        let target = area * (0.2 + 0.8 * rng.uniform());
        let ratio = (lo + (hi - lo) * rng.uniform()).exp();
        let w = (target * ratio).sqrt().round() as usize;
        let h = (target / ratio).sqrt().round() as usize;
        if w > 0 && h > 0 && w <= s && h <= s {
            top = (rng.next_u64() % (s - h + 1) as u64) as usize;
            left = (rng.next_u64() % (s - w + 1) as u64) as usize;
            (ch, cw) = (h, w);
            break;
        }
    }
    let flip = rng.uniform() < 0.5;
    // align_corners=False: output pixel o samples the crop at (o + ½)·in/out − ½, clamped.
    let taps = |n_in: usize, o: usize| {
        let src = ((o as f64 + 0.5) * n_in as f64 / s as f64 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        (i0, i1, (src - i0 as f64) as f32)
    };
    for k in 0..c {
        let plane = &img[k * s * s..][..s * s];
        for oy in 0..s {
            let (y0, y1, fy) = taps(ch, oy);
            for ox in 0..s {
                let (x0, x1, fx) = taps(cw, ox);
                let at = |y: usize, x: usize| plane[(top + y) * s + left + x];
                let v = (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x1))
                    + fy * ((1.0 - fx) * at(y1, x0) + fx * at(y1, x1));
                let dx = if flip { s - 1 - ox } else { ox };
                out[(k * s + oy) * s + dx] = v;
            }
        }
    }
}

/// MODE's colour augmentation of one normalised view [C, S, S] in place: back to [0, 1] pixels
/// with the data's mean/std, `ColorAug`, normalised again (untouched when nothing was drawn).
fn color_view(view: &mut [f32], c: usize, s: &ModeSettings, rng: &mut Rng) {
    let plane = view.len() / c;
    let stats = |k: usize| (s.pixel_mean[k.min(2)], s.pixel_std[k.min(2)]);
    let mut px = view.to_vec();
    for (k, p) in px.chunks_exact_mut(plane).enumerate() {
        let (m, sd) = stats(k);
        p.iter_mut().for_each(|v| *v = *v * sd + m);
    }
    if s.color.apply(&mut px, c, rng) {
        for (k, (dst, p)) in view
            .chunks_exact_mut(plane)
            .zip(px.chunks_exact(plane))
            .enumerate()
        {
            let (m, sd) = stats(k);
            for (d, v) in dst.iter_mut().zip(p) {
                *d = (v - m) / sd;
            }
        }
    }
}

/// The two views of a batch [B, C, S, S], view-major: [2B, C, S, S]; `s` gives the colour
/// augmentation and the images' normalisation.
pub fn two_views(images: &Tensor, seed: u64, s: &ModeSettings) -> Result<Tensor> {
    let [b, c, h, w] = images.shape() else {
        return Err(Error::Data("expected images [B, C, H, W]".into()));
    };
    if h != w {
        return Err(Error::Data(format!(
            "MODE's views need square images, got {h}x{w}"
        )));
    }
    let (settings, (b, c, s)) = (s, (*b, *c, *h));
    let per = c * s * s;
    let mut out = vec![0.0f32; 2 * b * per];
    for (v, chunk) in out.chunks_exact_mut(b * per).enumerate() {
        for (i, dst) in chunk.chunks_exact_mut(per).enumerate() {
            let mut rng = Rng::new(seed ^ ((v as u64) << 32 | i as u64).wrapping_mul(0x9E37));
            augment(&images.as_slice()[i * per..][..per], c, s, &mut rng, dst);
            color_view(dst, c, settings, &mut rng);
        }
    }
    Tensor::from_vec(&[2 * b, c, s, s], out)
}

/// Loss terms of one step (ALPA's is 0 without ALPA).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepLoss {
    pub total: f32,
    pub supcon: f32,
    pub alpa: f32,
}

fn get<'p>(params: &'p BTreeMap<String, Tensor>, name: &str) -> Result<&'p [f32]> {
    params
        .get(name)
        .map(|t| t.as_slice())
        .ok_or_else(|| Error::Usage(format!("MODE's training needs `{name}` (add_heads)")))
}

/// What the heads make of a forward's pooled features [2B, F] and last map [dims] on the host:
/// the loss terms, the heads' gradients (SupCon's projection, ALPA's MLPs, by name) and the
/// gradients to send back into the encoder, each already scaled by its term's weight.
pub struct HeadLosses {
    pub loss: StepLoss,
    pub grads: Vec<(String, Vec<f32>)>,
    pub d_map: Option<Vec<f32>>,
    pub d_features: Option<Vec<f32>>,
}

/// SupCon on the features and ALPA on the map (as `s` asks) with the heads in `params`.
pub fn head_losses(
    params: &BTreeMap<String, Tensor>,
    features: &[f32],
    map: &[f32],
    d: Nhwc,
    labels: &[usize],
    s: &ModeSettings,
) -> Result<HeadLosses> {
    let f = d.c;
    let mut loss = StepLoss::default();
    let mut extra: Vec<(String, Vec<f32>)> = Vec::new();
    let d_features = if s.supcon_weight > 0.0 {
        let head: Vec<&[f32]> = HEAD_NAMES
            .iter()
            .map(|n| get(params, n))
            .collect::<Result<_>>()?;
        let head = [head[0], head[1], head[2], head[3]];
        let out = s
            .supcon
            .forward_backward(head, features, labels, (f, s.head_dim));
        loss.supcon = out.loss;
        let w = s.supcon_weight;
        for (name, g) in HEAD_NAMES.iter().zip(out.d_head) {
            extra.push((name.to_string(), g.into_iter().map(|v| v * w).collect()));
        }
        Some(
            out.d_features
                .into_iter()
                .map(|v| v * w)
                .collect::<Vec<f32>>(),
        )
    } else {
        None
    };
    let d_map = match s.alpa_weight {
        Some(w) if w > 0.0 => {
            let names = WEIGHT_NAMES.map(|n| format!("alpa.{n}.weight"));
            let ws: Vec<&[f32]> = names
                .iter()
                .map(|n| get(params, n))
                .collect::<Result<_>>()?;
            let alpa = Alpa {
                weights: [ws[0], ws[1], ws[2], ws[3], ws[4], ws[5]],
                dim: f,
                proj: s.alpa_dim,
                scale: 10.0,
            };
            let out = alpa.forward_backward(map, labels, d.h * d.w);
            loss.alpa = out.loss;
            for (name, g) in names.into_iter().zip(out.d_weights) {
                extra.push((name, g.into_iter().map(|v| v * w).collect()));
            }
            Some(
                out.d_features
                    .into_iter()
                    .map(|v| v * w)
                    .collect::<Vec<f32>>(),
            )
        }
        _ => None,
    };
    loss.total = s.supcon_weight * loss.supcon + s.alpa_weight.unwrap_or(0.0) * loss.alpa;
    Ok(HeadLosses {
        loss,
        grads: extra,
        d_map,
        d_features,
    })
}

/// The loss of views [2B, C, S, S] (labels repeated) and the gradient of every trained
/// parameter; the BatchNorm running statistics in `params` move to the batch's.
pub fn loss_and_grads(
    net: &ResNetTrain,
    params: &mut BTreeMap<String, Tensor>,
    views: &Tensor,
    labels: &[usize],
    s: &ModeSettings,
) -> Result<(StepLoss, HashMap<String, Vec<f32>>)> {
    let fw = net.forward(params, views)?;
    let h = head_losses(params, &fw.features, &fw.map, fw.map_dims, labels, s)?;
    let grads = net.backward(params, &fw, h.d_map.as_deref(), h.d_features.as_deref())?;
    for (name, v) in fw.running {
        if let Some(t) = params.get_mut(&name) {
            t.as_mut_slice().copy_from_slice(&v);
        }
    }
    let mut all = grads.params;
    all.extend(h.grads);
    Ok((h.loss, all))
}

/// torch.optim.SGD: d = g + λ·p, buf = μ·buf + d, p −= lr·buf.
pub fn sgd_update(
    params: &mut BTreeMap<String, Tensor>,
    momentum: &mut BTreeMap<String, Vec<f32>>,
    grads: &HashMap<String, Vec<f32>>,
    lr: f32,
    s: &ModeSettings,
) {
    for (name, g) in grads {
        let Some(p) = params.get_mut(name) else {
            continue;
        };
        let buf = momentum
            .entry(name.clone())
            .or_insert_with(|| vec![0.0; g.len()]);
        for ((p, b), g) in p.as_mut_slice().iter_mut().zip(buf.iter_mut()).zip(g) {
            let d = g + s.weight_decay * *p;
            *b = s.momentum * *b + d;
            *p -= lr * *b;
        }
    }
}

/// Mean loss terms of each epoch run.
pub type History = Vec<StepLoss>;

/// What a MODE checkpoint records as its settings.
pub fn settings_record(s: &ModeSettings, data: &Dataset) -> serde_json::Value {
    serde_json::json!({
        "mode": s,
        "data": data.fingerprint(),
        "augment": "random-resized-crop(0.2-1, 3/4-4/3, bilinear) + hflip(0.5) + mode.color",
    })
}

/// Writes the parameters, the momentum buffers and the progress to `path` atomically.
pub fn save(
    path: &Path,
    params: &BTreeMap<String, Tensor>,
    momentum: &BTreeMap<String, Vec<f32>>,
    progress: &Progress,
) -> Result<()> {
    let raw = |name: String, shape: &[usize], v: &[f32]| RawTensor {
        name,
        dtype: WDType::F32,
        shape: shape.to_vec(),
        data: bytemuck::cast_slice(v).to_vec(),
    };
    let mut tensors: Vec<RawTensor> = params
        .iter()
        .map(|(k, t)| raw(k.clone(), t.shape(), t.as_slice()))
        .collect();
    for (k, v) in momentum {
        let shape = params.get(k).map_or(vec![v.len()], |t| t.shape().to_vec());
        tensors.push(raw(format!("optim.momentum.{k}"), &shape, v));
    }
    let meta = HashMap::from([(
        "mood_progress".to_string(),
        serde_json::to_string(progress).map_err(|e| Error::Data(e.to_string()))?,
    )]);
    safetensors::write(path, &tensors, Some(meta))
}

/// Trains `params` (an encoder of `cfg` with `add_heads`) on `data` with `s`, saving to
/// `checkpoint` after every epoch; `on_epoch(epoch, mean losses)` after each. Returns the mean
/// loss terms of every epoch.
pub fn train(
    cfg: &ResNetConfig,
    params: &mut BTreeMap<String, Tensor>,
    data: &Dataset,
    s: &ModeSettings,
    checkpoint: Option<&Path>,
    on_epoch: &mut dyn FnMut(usize, StepLoss),
) -> Result<History> {
    let mut each = |e: usize, l: StepLoss| {
        on_epoch(e, l);
        true
    };
    let run = Run {
        on: &TrainOn::Cpu,
        checkpoint,
        resume: None,
    };
    train_from(cfg, params, data, s, run, &mut each)
}

/// Where `train_from` trains, where it saves and what it continues.
pub struct Run<'a> {
    /// The CPU or a CUDA device (train/mode_device.rs); the checkpoint records it.
    pub on: &'a TrainOn,
    /// Written after every epoch.
    pub checkpoint: Option<&'a Path>,
    /// The epochs done and momentum buffers of a checkpoint to continue.
    pub resume: Option<Resume>,
}

/// `train` on `run.on`, continuing from `run.resume` when given; `on_epoch` returning false
/// stops after that epoch's checkpoint (an interrupted run).
pub fn train_from(
    cfg: &ResNetConfig,
    params: &mut BTreeMap<String, Tensor>,
    data: &Dataset,
    s: &ModeSettings,
    run: Run,
    on_epoch: &mut dyn FnMut(usize, StepLoss) -> bool,
) -> Result<History> {
    s.check()?;
    if s.batch > data.len() {
        return Err(Error::Usage(format!(
            "--batch {} does not fit a data set of {} images (use 2..={})",
            s.batch,
            data.len(),
            data.len()
        )));
    }
    if data.chw != [cfg.in_chans, cfg.img_size, cfg.img_size] {
        return Err(Error::Usage(format!(
            "the images are {:?}, {} takes [{}, {}, {}]",
            data.chw, cfg.name, cfg.in_chans, cfg.img_size, cfg.img_size
        )));
    }
    let net = ResNetTrain::new(cfg);
    let per_epoch = data.len() / s.batch;
    let mut settings = settings_record(s, data);
    let now = run.on.describe();
    // A resume may change the device (the same f32 arithmetic up to rounding); the record says
    // which epochs ran where.
    settings["device"] = match &run.resume {
        Some(r) if r.device != now => {
            format!("{} to epoch {}, then {now}", r.device, r.epochs_done)
        }
        Some(r) => r.device.clone(),
        None => now,
    }
    .into();
    let (mut momentum, first) = run
        .resume
        .map_or((BTreeMap::new(), 0), |r| (r.momentum, r.epochs_done));
    let mut device = ModeStep::new(run.on, &net, params, &momentum)?;
    let mut history = Vec::new();
    for epoch in first..s.epochs {
        let mut order: Vec<usize> = (0..data.len()).collect();
        let mut rng = Rng::new(s.seed ^ (0x6d0d_0000 + epoch as u64));
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut sum = StepLoss::default();
        for it in 0..per_epoch {
            let step = epoch * per_epoch + it;
            let (x, y) = data.batch(&order[it * s.batch..(it + 1) * s.batch])?;
            let views = two_views(&x, s.seed ^ (0xa0_0000_0000 + step as u64), s)?;
            let labels: Vec<usize> = y.iter().chain(&y).copied().collect();
            let lr = learning_rate(s, epoch, it, per_epoch);
            let loss = device.step(&net, params, &mut momentum, &views, &labels, s, lr)?;
            if !loss.total.is_finite() {
                return Err(Error::Data(format!(
                    "the loss is {} at epoch {epoch} step {it}: lower --lr",
                    loss.total
                )));
            }
            sum.total += loss.total / per_epoch as f32;
            sum.supcon += loss.supcon / per_epoch as f32;
            sum.alpa += loss.alpa / per_epoch as f32;
        }
        history.push(sum);
        let go_on = on_epoch(epoch, sum);
        if let Some(path) = run.checkpoint {
            let progress = Progress {
                arch: cfg.name.clone(),
                stage: "mode".into(),
                epoch,
                step: (epoch + 1) * per_epoch,
                optimizer_step: ((epoch + 1) * per_epoch) as u32,
                settings: settings.clone(),
            };
            device.sync(params, &mut momentum)?;
            save(path, params, &momentum, &progress)?;
        }
        if !go_on {
            break;
        }
    }
    device.sync(params, &mut momentum)?;
    Ok(history)
}

/// The tensors of a checkpoint to start from (a `mood mode-train` output or a timm ResNet's
/// state dict): everything but optimiser state, `num_batches_tracked` and the classifier `fc`.
pub fn load_start(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let store = crate::weights::WeightStore::open(path)?;
    let mut out = BTreeMap::new();
    for name in store.names() {
        if name.starts_with("optim.")
            || name.ends_with("num_batches_tracked")
            || name.starts_with("fc.")
        {
            continue;
        }
        let shape = store.shape_of(name).expect("listed").to_vec();
        let t = store.get(name, &shape)?;
        out.insert(
            name.clone(),
            Tensor::from_vec(&shape, t.as_slice().to_vec())?,
        );
    }
    Ok(out)
}
