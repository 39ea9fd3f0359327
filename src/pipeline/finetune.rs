//! The run of `mood finetune`: supervised fine-tuning as MOOD does it (AdamW, layer-wise lr decay,
//! warmup + cosine, drop-path, label smoothing), multi-class or one-class, MOS's group softmax or
//! MODE's ALPA, from a checkpoint or from scratch. `prepare` checks everything and reads the data
//! before the first step (a wrong option fails in seconds, not after the last epoch); `train`
//! runs the epochs; `heldout_accuracy` closes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::data::training_data;
use super::train::{initial_params, note_dropped, steps_done, take_output};
use crate::error::{Error, Result};
use crate::model::VitConfig;
use crate::tensor::Tensor;
use crate::train::device::TrainOn;
use crate::train::loops::{finetune_on, Dataset, FinetuneLoss, OnStep, Schedule};
use crate::train::step::prepare_for_finetune;

/// What `mood finetune` is asked for (its schedule and device apart).
pub struct Options<'a> {
    pub cfg: VitConfig,
    /// Start from this checkpoint; random init when absent.
    pub weights: Option<&'a Path>,
    /// The training data spec (data::spec), as given.
    pub data: &'a str,
    /// The held-out data spec, if given.
    pub val: Option<&'a str>,
    pub preset: &'a str,
    pub num_classes: Option<usize>,
    pub label_smoothing: f32,
    /// MOS group sizes as given (`2,3`).
    pub mos_groups: Option<&'a str>,
    /// ALPA's loss weight, if asked for.
    pub alpa: Option<f32>,
    pub alpa_dim: usize,
    pub alpa_shift: usize,
    pub output: &'a Path,
    pub overwrite: bool,
    pub resume: bool,
}

/// `--mos-groups SIZES`: positive group sizes separated by commas.
pub fn parse_mos_groups(spec: &str) -> Result<Vec<usize>> {
    spec.split(',')
        .map(|g| g.trim().parse::<usize>().ok().filter(|&n| n > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            Error::Usage(format!(
                "--mos-groups `{spec}`: expected positive sizes like 2,3"
            ))
        })
}

/// The objective: MOS's group softmax with groups, cross-entropy plus ALPA with a weight,
/// smoothed cross-entropy otherwise.
fn loss_config(opts: &Options, groups: &Option<Vec<usize>>) -> FinetuneLoss {
    match (groups, opts.alpa) {
        (Some(g), _) => FinetuneLoss::GroupSoftmax { groups: g.clone() },
        (None, Some(weight)) => FinetuneLoss::CrossEntropyAlpa {
            smoothing: opts.label_smoothing,
            alpa: crate::train::step::AlpaConfig {
                weight,
                proj: opts.alpa_dim,
                shift: opts.alpa_shift,
            },
        },
        (None, None) => FinetuneLoss::from(opts.label_smoothing),
    }
}

/// A fine-tuning run ready to train: the output checkpoint taken, the data read and checked, the
/// parameters initialised (head sized to the classes) and the loss chosen.
pub struct Finetune {
    pub cfg: VitConfig,
    pub on: TrainOn,
    pub schedule: Schedule,
    pub data: Dataset,
    pub heldout: Option<Dataset>,
    pub groups: Option<Vec<usize>>,
    pub params: BTreeMap<String, Tensor>,
    pub loss: FinetuneLoss,
    resume: Option<crate::train::checkpoint::Loaded>,
    output: PathBuf,
    /// Held until the run ends: one writer of the output checkpoint.
    _lock: crate::fsutil::Lock,
}

/// Checks the options, takes the output checkpoint, reads the training and held-out data and
/// sets up the parameters and loss (resumed runs: checked against the checkpoint's settings).
pub fn prepare(opts: &Options, s: Schedule, on: TrainOn) -> Result<Finetune> {
    let cfg = opts.cfg.clone();
    // Before the data is read: a checkpoint in the way is said in seconds.
    let (lock, resume) = take_output(opts.output, opts.resume, opts.overwrite)?;
    if !(0.0..1.0).contains(&opts.label_smoothing) {
        return Err(Error::Usage(format!(
            "--label-smoothing must be in [0, 1), got {}",
            opts.label_smoothing
        )));
    }
    let (data, data_classes) = training_data(opts.data, opts.preset, &cfg, true)?;
    let groups: Option<Vec<usize>> = opts.mos_groups.map(parse_mos_groups).transpose()?;
    let classes = match &groups {
        Some(g) => g.iter().sum(),
        None => opts.num_classes.or(data_classes).unwrap_or(cfg.num_classes),
    };
    if let Some(&bad) = data.labels.iter().find(|&&l| l >= classes) {
        return Err(Error::Usage(format!(
            "label {bad} does not fit {classes} classes{}",
            if groups.is_some() {
                " (the sum of --mos-groups)"
            } else {
                " (--num-classes)"
            }
        )));
    }
    // Read (and check) the held-out set before training, so that a wrong --val fails in seconds
    // rather than after the last epoch.
    let heldout = super::data::heldout_data(opts.data, opts.val, opts.preset, &cfg)?;
    if let Some(&bad) = heldout
        .as_ref()
        .and_then(|h| h.labels.iter().find(|&&l| l >= classes))
    {
        return Err(Error::Usage(format!(
            "--val {}: label {bad} does not fit the {classes} classes being trained",
            opts.val.unwrap_or(opts.data)
        )));
    }
    let outputs = groups
        .as_ref()
        .map_or(classes, |g| g.iter().map(|s| s + 1).sum());
    if let Some(w) = opts.alpa {
        if !w.is_finite() || w <= 0.0 || groups.is_some() || opts.alpa_dim == 0 {
            return Err(Error::Usage(format!(
                "--alpa {w}: needs a positive weight, --alpa-dim > 0, and no --mos-groups"
            )));
        }
    }
    let mut params = initial_params(&cfg, opts.weights, s.seed)?;
    let old_head = params.get("head.weight").map(|w| w.shape().to_vec());
    prepare_for_finetune(&mut params, &cfg, outputs, s.seed);
    if resume.is_none() && !crate::progress::quiet() {
        match (old_head, opts.weights) {
            (Some(shape), Some(w)) if shape.first() != Some(&outputs) => eprintln!(
                "note: the head of {} has {} outputs; replaced by a new, randomly initialised one of {outputs} (the classes trained here)",
                w.display(),
                shape.first().copied().unwrap_or(0)
            ),
            (None, Some(w)) => eprintln!(
                "note: {} has no classification head; a new one of {outputs} outputs is trained",
                w.display()
            ),
            _ => {}
        }
    }
    if opts.alpa.is_some() {
        crate::train::step::add_alpa_params(&mut params, &cfg, opts.alpa_dim, s.seed);
    }
    let loss = loss_config(opts, &groups);
    if let Some(r) = &resume {
        let mut settings = crate::train::loops::finetune_settings(&s, &data, &loss);
        crate::train::loops::record_precision(&mut settings, &on);
        crate::train::loops::check_resume("finetune", &cfg, &settings, r)?;
    }
    note_dropped(data.len(), s.batch);
    Ok(Finetune {
        cfg,
        on,
        schedule: s,
        data,
        heldout,
        groups,
        params,
        loss,
        resume,
        output: opts.output.to_path_buf(),
        _lock: lock,
    })
}

impl Finetune {
    /// Optimizer steps per epoch (drop-last).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.data.len() / self.schedule.batch.max(1)) as u64
    }

    /// Steps the checkpoint resumed from has already done.
    pub fn steps_done(&self) -> u64 {
        steps_done(&self.resume, self.steps_per_epoch())
    }

    /// Runs the epochs (writing the output checkpoint after each); returns the mean loss per
    /// epoch.
    pub fn train(&mut self, on_step: &mut OnStep) -> Result<Vec<f32>> {
        finetune_on(
            &self.on,
            &self.cfg,
            &mut self.params,
            &self.data,
            &self.schedule,
            self.loss.clone(),
            Some(&self.output),
            self.resume.take(),
            on_step,
        )
    }

    /// Accuracy of the trained parameters on the held-out set and its size, if there is one.
    pub fn heldout_accuracy(&self) -> Result<Option<(f32, usize)>> {
        let Some(h) = &self.heldout else {
            return Ok(None);
        };
        let acc = crate::train::loops::accuracy_with(
            &self.cfg,
            &self.params,
            h,
            256,
            self.groups.as_deref(),
        )?;
        Ok(Some((acc, h.len())))
    }
}
