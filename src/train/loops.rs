//! The fine-tuning and masked-image-modelling loops over an in-memory labelled image set:
//! seeded shuffling per epoch (drop-last batches, as BEiT's loaders), BEiT's per-step cosine
//! schedule, a checkpoint after every epoch, and resume from one. Every random draw is derived from
//! (seed, epoch, step), so a run resumed from a checkpoint ends with the same weights as one that
//! was never interrupted.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::init::Rng;
use crate::model::{VisionTransformer, VitConfig};
use crate::tensor::Tensor;
use crate::train::checkpoint::{self, Progress};
#[cfg(feature = "cuda")]
use crate::train::device::OnCuda;
use crate::train::device::{OnCpu, TrainDevice, TrainOn};
use crate::train::mim::block_mask;
use crate::train::optim::{warmup_cosine, AdamW};
use crate::train::step::alpa_finetune_step_on;
use crate::train::step::{finetune_step_on, mim_step_on, StepConfig};
use crate::weights::WeightStore;

/// Normalised images [n, C, H, W] with labels, all in memory.
pub struct Dataset {
    pub images: Vec<f32>,
    pub chw: [usize; 3],
    pub labels: Vec<usize>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn batch(&self, idx: &[usize]) -> Result<(Tensor, Vec<usize>)> {
        let per: usize = self.chw.iter().product();
        let mut v = Vec::with_capacity(idx.len() * per);
        for &i in idx {
            v.extend_from_slice(&self.images[i * per..(i + 1) * per]);
        }
        let [c, h, w] = self.chw;
        Ok((
            Tensor::from_vec(&[idx.len(), c, h, w], v)?,
            idx.iter().map(|&i| self.labels[i]).collect(),
        ))
    }

    /// What identifies the images for a resume: their number and the SHA-256 of the labels and
    /// the preprocessed pixels (so another --data, --preset or class selection is noticed).
    pub fn fingerprint(&self) -> serde_json::Value {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for &l in &self.labels {
            h.update((l as u64).to_le_bytes());
        }
        h.update(bytemuck::cast_slice::<f32, u8>(&self.images));
        serde_json::json!({"images": self.len(), "sha256": format!("{:x}", h.finalize())})
    }

    /// The subset at `idx`.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let per: usize = self.chw.iter().product();
        Dataset {
            images: idx
                .iter()
                .flat_map(|&i| self.images[i * per..(i + 1) * per].iter().copied())
                .collect(),
            chw: self.chw,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_epochs: usize,
    pub weight_decay: f32,
    pub layer_decay: f32,
    pub drop_path: f32,
    pub clip_grad: f32,
    pub seed: u64,
}

/// Called after every step with (epoch, step in epoch, steps per epoch, loss); returning false stops
/// the run at once, as a kill would (the last checkpoint is the one of the last finished epoch).
pub type OnStep<'a> = dyn FnMut(usize, usize, usize, f32) -> bool + 'a;

fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ (0x5eed_0000 + epoch as u64));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn check_batch(data: &Dataset, batch: usize) -> Result<usize> {
    if batch == 0 || batch > data.len() {
        return Err(Error::Usage(format!(
            "--batch {batch} does not fit a data set of {} images (use 1..={})",
            data.len(),
            data.len()
        )));
    }
    Ok(data.len() / batch)
}

struct Run<'a> {
    cfg: &'a VitConfig,
    stage: &'static str,
    s: &'a Schedule,
    settings: serde_json::Value,
    checkpoint: Option<&'a Path>,
}

impl Run<'_> {
    /// Sets up the optimizer, restoring it and the start epoch from `resume` when given.
    fn start(
        &self,
        params: &mut BTreeMap<String, Tensor>,
        resume: Option<checkpoint::Loaded>,
    ) -> Result<(AdamW, usize)> {
        let mut opt = AdamW::new(self.s.weight_decay, self.s.layer_decay, self.cfg.depth);
        let mut first = 0;
        if let Some(r) = resume {
            check_resume(self.stage, self.cfg, &self.settings, &r)?;
            let p = r.progress.expect("checked by check_resume");
            *params = r.params;
            opt.restore(p.optimizer_step, r.m, r.v);
            first = p.epoch + 1;
        }
        Ok((opt, first))
    }

    fn save(
        &self,
        params: &BTreeMap<String, Tensor>,
        opt: &AdamW,
        epoch: usize,
        step: usize,
    ) -> Result<()> {
        if let Some(path) = self.checkpoint {
            let progress = Progress {
                arch: self.cfg.name.clone(),
                stage: self.stage.into(),
                epoch,
                step,
                optimizer_step: opt.step,
                settings: self.settings.clone(),
            };
            checkpoint::save(path, params, opt, &progress)?;
        }
        Ok(())
    }
}

/// Refuses to resume `r` unless it is a checkpoint of this stage and architecture trained with
/// these `settings` (data, schedule, optimiser, seed, loss): one line naming what differs.
pub fn check_resume(
    stage: &str,
    cfg: &VitConfig,
    settings: &serde_json::Value,
    r: &checkpoint::Loaded,
) -> Result<()> {
    let p = r
        .progress
        .as_ref()
        .ok_or_else(|| Error::Usage("the checkpoint to resume has no training progress".into()))?;
    if p.stage != stage || p.arch != cfg.name {
        return Err(Error::Usage(format!(
            "cannot resume: the checkpoint is {} of {}, this run is {} of {}",
            p.stage, p.arch, stage, cfg.name
        )));
    }
    let diffs = settings_differences(&p.settings, settings);
    if !diffs.is_empty() {
        return Err(Error::Usage(format!(
            "cannot resume: the checkpoint was trained with other settings, so the run would mix \
             two schedules: {}; rerun with the checkpoint's settings to continue it, or with \
             --overwrite to start over",
            diffs.join("; ")
        )));
    }
    Ok(())
}

/// What a fine-tuning checkpoint records as its settings (and a resume must match).
pub fn finetune_settings(s: &Schedule, data: &Dataset, loss: &FinetuneLoss) -> serde_json::Value {
    let data_id = data.fingerprint();
    match loss {
        FinetuneLoss::CrossEntropy { smoothing } => {
            serde_json::json!({"schedule": s, "data": data_id, "label_smoothing": smoothing})
        }
        FinetuneLoss::GroupSoftmax { groups } => {
            serde_json::json!({"schedule": s, "data": data_id, "mos_groups": groups})
        }
        FinetuneLoss::CrossEntropyAlpa { smoothing, alpa } => {
            serde_json::json!({"schedule": s, "data": data_id, "label_smoothing": smoothing, "alpa": alpa})
        }
    }
}

/// Adds the training precision to `settings` where it is not f32 (a bf16 run is another recipe,
/// so resuming it at f32 is refused, and the reverse); f32 runs keep their settings as before.
pub fn record_precision(settings: &mut serde_json::Value, on: &TrainOn) {
    #[cfg(feature = "cuda")]
    if let (TrainOn::Cuda { precision, .. }, Some(map)) = (on, settings.as_object_mut()) {
        if *precision != crate::backend::Precision::F32 {
            map.insert(
                "precision".into(),
                format!("{precision:?}").to_lowercase().into(),
            );
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (settings, on);
}

/// What a masked-image-modelling checkpoint records as its settings.
pub fn pretrain_settings(s: &Schedule, data: &Dataset, mask_ratio: f32) -> serde_json::Value {
    serde_json::json!({"schedule": s, "data": data.fingerprint(), "mask_ratio": mask_ratio})
}

/// Each recorded setting as the option that sets it, for messages.
const SETTING_FLAGS: &[(&str, &str)] = &[
    ("data.images", "--data (number of images)"),
    ("data.sha256", "--data (images and labels)"),
    ("schedule.epochs", "--epochs"),
    ("schedule.batch", "--batch"),
    ("schedule.lr", "--lr"),
    ("schedule.min_lr", "--min-lr"),
    ("schedule.warmup_epochs", "--warmup-epochs"),
    ("schedule.weight_decay", "--weight-decay"),
    ("schedule.layer_decay", "--layer-decay"),
    ("schedule.drop_path", "--drop-path"),
    ("schedule.clip_grad", "--clip-grad"),
    ("schedule.seed", "--seed"),
    ("label_smoothing", "--label-smoothing"),
    ("mos_groups", "--mos-groups"),
    ("alpa", "--alpa"),
    ("mask_ratio", "--mask-ratio"),
    ("precision", "--precision"),
];

/// The settings of a checkpoint (`old`) that this run (`new`) changes, one "--flag (the
/// checkpoint: x, this run: y)" each. Settings an older checkpoint did not record are not
/// compared.
fn settings_differences(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let descend = ["schedule", "data"];
    let (mut a, mut b) = (
        checkpoint::flatten_settings(old, &descend),
        checkpoint::flatten_settings(new, &descend),
    );
    // An f32 run records no precision (`record_precision`): absent means f32, so a bf16
    // checkpoint resumed at f32, or the reverse, is named with both precisions.
    if a.contains_key("precision") || b.contains_key("precision") {
        for m in [&mut a, &mut b] {
            m.entry("precision").or_insert_with(|| "f32".into());
        }
    }
    checkpoint::settings_differences(a, b, SETTING_FLAGS, &[])
}

/// One training step of a loop on device D: (device, params, optimizer, global step, image
/// indices, lr) → loss.
type StepFn<'a, D> = dyn FnMut(&mut D, &mut BTreeMap<String, Tensor>, &mut AdamW, usize, &[usize], f32) -> Result<f32>
    + 'a;

impl Run<'_> {
    /// The epoch loop both stages share: seeded order, drop-last batches, BEiT's schedule, a
    /// checkpoint after each epoch. Returns the mean loss of every epoch run.
    /// The parameters and optimiser state live on `dev` from the first step; they come back to
    /// the host before each checkpoint and at the end.
    fn epochs<D: TrainDevice>(
        &self,
        params: &mut BTreeMap<String, Tensor>,
        data: &Dataset,
        resume: Option<checkpoint::Loaded>,
        on_step: &mut OnStep,
        dev: &mut D,
        step_fn: &mut StepFn<D>,
    ) -> Result<Vec<f32>> {
        let s = self.s;
        let per_epoch = check_batch(data, s.batch)?;
        dev.check_batch_fits(self.cfg, params, s.batch)?;
        let (mut opt, first) = self.start(params, resume)?;
        dev.start(params, &opt)?;
        let total = s.epochs * per_epoch;
        let mut history = Vec::new();
        for epoch in first..s.epochs {
            let order = epoch_order(data.len(), s.seed, epoch);
            let mut sum = 0.0;
            for it in 0..per_epoch {
                let step = epoch * per_epoch + it;
                let lr = warmup_cosine(step, s.lr, s.min_lr, s.warmup_epochs * per_epoch, total);
                let loss = step_fn(
                    dev,
                    params,
                    &mut opt,
                    step,
                    &order[it * s.batch..(it + 1) * s.batch],
                    lr,
                )?;
                sum += loss;
                if !on_step(epoch, it, per_epoch, loss) {
                    dev.sync(params, &mut opt)?;
                    return Ok(history);
                }
            }
            history.push(sum / per_epoch as f32);
            dev.sync(params, &mut opt)?;
            self.save(params, &opt, epoch, (epoch + 1) * per_epoch)?;
        }
        Ok(history)
    }

    fn step_config(&self, step: usize, loss: &FinetuneLoss) -> StepConfig {
        let (label_smoothing, groups) = match loss {
            FinetuneLoss::CrossEntropy { smoothing }
            | FinetuneLoss::CrossEntropyAlpa { smoothing, .. } => (*smoothing, None),
            FinetuneLoss::GroupSoftmax { groups } => (0.0, Some(groups.clone())),
        };
        StepConfig {
            label_smoothing,
            groups,
            clip_grad: self.s.clip_grad,
            drop_path: self.s.drop_path,
            seed: self.s.seed.wrapping_add(step as u64),
        }
    }
}

/// The fine-tuning objective: cross-entropy with label smoothing (MOOD), or MOS's group softmax
/// over groups of consecutive classes. A bare number means cross-entropy with that smoothing.
#[derive(Clone, Debug, serde::Serialize)]
pub enum FinetuneLoss {
    CrossEntropy {
        smoothing: f32,
    },
    GroupSoftmax {
        groups: Vec<usize>,
    },
    /// Cross-entropy plus MODE's ALPA over two views of each image.
    CrossEntropyAlpa {
        smoothing: f32,
        alpa: crate::train::step::AlpaConfig,
    },
}

impl From<f32> for FinetuneLoss {
    fn from(smoothing: f32) -> FinetuneLoss {
        FinetuneLoss::CrossEntropy { smoothing }
    }
}

/// Supervised fine-tuning. Returns the mean loss per epoch run.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    cfg: &VitConfig,
    params: &mut BTreeMap<String, Tensor>,
    data: &Dataset,
    s: &Schedule,
    loss: impl Into<FinetuneLoss>,
    checkpoint: Option<&Path>,
    resume: Option<checkpoint::Loaded>,
    on_step: &mut OnStep,
) -> Result<Vec<f32>> {
    finetune_on(
        &TrainOn::Cpu,
        cfg,
        params,
        data,
        s,
        loss,
        checkpoint,
        resume,
        on_step,
    )
}

/// Runs `$body` with `$d` bound to the training device that `$on` names (the CPU, or CUDA at
/// f32 or bf16), so each loop is written once and compiled per device.
macro_rules! on_device {
    ($on:expr, $cfg:expr, |$d:ident| $body:expr) => {
        match $on {
            TrainOn::Cpu => {
                let $d = &mut OnCpu;
                $body
            }
            #[cfg(feature = "cuda")]
            TrainOn::Cuda { dev, precision } => {
                let dh = $cfg.embed_dim / $cfg.num_heads.max(1);
                match precision {
                    crate::backend::Precision::F32 => {
                        let $d = &mut OnCuda::<f32>::new(dev.clone(), &$cfg.name, dh);
                        $body
                    }
                    crate::backend::Precision::Bf16 => {
                        let $d = &mut OnCuda::<half::bf16>::new(dev.clone(), &$cfg.name, dh);
                        $body
                    }
                }
            }
        }
    };
}

/// `finetune` on the device `on`.
#[allow(clippy::too_many_arguments)]
pub fn finetune_on(
    on: &TrainOn,
    cfg: &VitConfig,
    params: &mut BTreeMap<String, Tensor>,
    data: &Dataset,
    s: &Schedule,
    loss: impl Into<FinetuneLoss>,
    checkpoint: Option<&Path>,
    resume: Option<checkpoint::Loaded>,
    on_step: &mut OnStep,
) -> Result<Vec<f32>> {
    let loss = loss.into();
    let mut settings = finetune_settings(s, data, &loss);
    record_precision(&mut settings, on);
    let run = Run {
        cfg,
        stage: "finetune",
        s,
        settings,
        checkpoint,
    };
    on_device!(on, cfg, |d| run.epochs(
        params,
        data,
        resume,
        on_step,
        d,
        &mut |d, params, opt, step, idx, lr| {
            let (x, y) = data.batch(idx)?;
            let sc = run.step_config(step, &loss);
            Ok(match &loss {
                FinetuneLoss::CrossEntropyAlpa { alpa, .. } => {
                    alpa_finetune_step_on(d, cfg, params, opt, &x, &y, lr, &sc, alpa)?.loss
                }
                _ => finetune_step_on(d, cfg, params, opt, &x, &y, lr, &sc)?.loss,
            })
        },
    ))
}

/// Masked image modelling with BEiT's block-wise masks over `mask_ratio` of the patches.
#[allow(clippy::too_many_arguments)]
pub fn pretrain(
    cfg: &VitConfig,
    params: &mut BTreeMap<String, Tensor>,
    data: &Dataset,
    s: &Schedule,
    mask_ratio: f32,
    checkpoint: Option<&Path>,
    resume: Option<checkpoint::Loaded>,
    on_step: &mut OnStep,
) -> Result<Vec<f32>> {
    pretrain_on(
        &TrainOn::Cpu,
        cfg,
        params,
        data,
        s,
        mask_ratio,
        checkpoint,
        resume,
        on_step,
    )
}

/// `pretrain` on the device `on`.
#[allow(clippy::too_many_arguments)]
pub fn pretrain_on(
    on: &TrainOn,
    cfg: &VitConfig,
    params: &mut BTreeMap<String, Tensor>,
    data: &Dataset,
    s: &Schedule,
    mask_ratio: f32,
    checkpoint: Option<&Path>,
    resume: Option<checkpoint::Loaded>,
    on_step: &mut OnStep,
) -> Result<Vec<f32>> {
    if !(0.0..1.0).contains(&mask_ratio) || !mask_ratio.is_finite() {
        return Err(Error::Usage(format!(
            "--mask-ratio {mask_ratio} must be in [0, 1)"
        )));
    }
    let (gh, gw) = cfg.grid();
    let num_mask = ((gh * gw) as f32 * mask_ratio).round().max(1.0) as usize;
    let min_patches = 4.min(num_mask);
    let mut settings = pretrain_settings(s, data, mask_ratio);
    record_precision(&mut settings, on);
    let run = Run {
        cfg,
        stage: "pretrain",
        s,
        settings,
        checkpoint,
    };
    on_device!(on, cfg, |d| run.epochs(
        params,
        data,
        resume,
        on_step,
        d,
        &mut |d, params, opt, step, idx, lr| {
            let (x, _) = data.batch(idx)?;
            let mut rng = Rng::new(s.seed ^ (0x3a5c_0000_0000 + step as u64));
            let mask: Vec<bool> = (0..idx.len())
                .flat_map(|_| block_mask(gh, gw, num_mask, min_patches, &mut rng))
                .collect();
            let sc = run.step_config(step, &FinetuneLoss::from(0.0));
            Ok(mim_step_on(d, cfg, params, opt, &x, &mask, lr, &sc)?.loss)
        },
    ))
}

/// Top-1 accuracy of the classifier in `params` on `data`.
pub fn accuracy(
    cfg: &VitConfig,
    params: &BTreeMap<String, Tensor>,
    data: &Dataset,
    batch: usize,
) -> Result<f32> {
    accuracy_with(cfg, params, data, batch, None)
}

/// Accuracy with argmax predictions, or MOS's group-softmax prediction when `groups` is given.
pub fn accuracy_with(
    cfg: &VitConfig,
    params: &BTreeMap<String, Tensor>,
    data: &Dataset,
    batch: usize,
    groups: Option<&[usize]>,
) -> Result<f32> {
    let store = WeightStore::from_params("<params>", params);
    let model = VisionTransformer::load(cfg, &store)?;
    let mut correct = 0;
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let (x, y) = data.batch(chunk)?;
        let logits = model
            .forward(&x)?
            .logits
            .ok_or_else(|| Error::Usage("the model has no head".into()))?;
        let c = logits.shape()[1];
        for (row, &label) in logits.as_slice().chunks(c).zip(&y) {
            let pred = match groups {
                Some(g) => crate::train::loss::group_predict(row, g),
                None => (0..c)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap_or(0),
            };
            correct += usize::from(pred == label);
        }
    }
    Ok(correct as f32 / data.len().max(1) as f32)
}
