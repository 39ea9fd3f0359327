//! The run of `mood pretrain`: masked image modelling on unlabelled in-distribution images
//! (BEiT's block-wise masking, a learnable mask token, normalised-pixel regression; see
//! `train::mim` for how this differs from BEiT's dVAE-token targets).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::data::training_data;
use super::train::{initial_params, note_dropped, steps_done, take_output};
use crate::error::Result;
use crate::model::VitConfig;
use crate::tensor::Tensor;
use crate::train::device::TrainOn;
use crate::train::loops::{pretrain_on, Dataset, OnStep, Schedule};
use crate::train::step::add_mim_params;

/// What `mood pretrain` is asked for (its schedule and device apart).
pub struct Options<'a> {
    pub cfg: VitConfig,
    /// Continue pretraining this checkpoint; random init when absent.
    pub weights: Option<&'a Path>,
    /// The data spec (data::spec), as given; labels are not used.
    pub data: &'a str,
    pub preset: &'a str,
    /// Fraction of patches masked per image.
    pub mask_ratio: f32,
    pub output: &'a Path,
    pub overwrite: bool,
    pub resume: bool,
}

/// A pretraining run ready to train: the output checkpoint taken, the images read, the encoder
/// (without a head) and its MIM parameters initialised.
pub struct Pretrain {
    pub cfg: VitConfig,
    pub on: TrainOn,
    pub schedule: Schedule,
    pub data: Dataset,
    pub mask_ratio: f32,
    pub params: BTreeMap<String, Tensor>,
    resume: Option<crate::train::checkpoint::Loaded>,
    output: PathBuf,
    /// Held until the run ends: one writer of the output checkpoint.
    _lock: crate::fsutil::Lock,
}

/// Takes the output checkpoint, reads the images and sets up the parameters (resumed runs:
/// checked against the checkpoint's settings).
pub fn prepare(opts: &Options, s: Schedule, on: TrainOn) -> Result<Pretrain> {
    let cfg = opts.cfg.clone();
    // Before the data is read: a checkpoint in the way is said in seconds.
    let (lock, resume) = take_output(opts.output, opts.resume, opts.overwrite)?;
    let (data, _) = training_data(opts.data, opts.preset, &cfg, false)?;
    let mut params = initial_params(&cfg, opts.weights, s.seed)?;
    params.retain(|k, _| !k.starts_with("head.") && !k.starts_with("fc_norm."));
    add_mim_params(&mut params, &cfg, s.seed);
    if let Some(r) = &resume {
        let mut settings = crate::train::loops::pretrain_settings(&s, &data, opts.mask_ratio);
        crate::train::loops::record_precision(&mut settings, &on);
        crate::train::loops::check_resume("pretrain", &cfg, &settings, r)?;
    }
    note_dropped(data.len(), s.batch);
    Ok(Pretrain {
        cfg,
        on,
        schedule: s,
        data,
        mask_ratio: opts.mask_ratio,
        params,
        resume,
        output: opts.output.to_path_buf(),
        _lock: lock,
    })
}

impl Pretrain {
    /// Optimizer steps per epoch (drop-last).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.data.len() / self.schedule.batch.max(1)) as u64
    }

    /// Steps the checkpoint resumed from has already done.
    pub fn steps_done(&self) -> u64 {
        steps_done(&self.resume, self.steps_per_epoch())
    }

    /// Runs the epochs (writing the output checkpoint after each); returns the mean
    /// reconstruction loss per epoch.
    pub fn train(&mut self, on_step: &mut OnStep) -> Result<Vec<f32>> {
        pretrain_on(
            &self.on,
            &self.cfg,
            &mut self.params,
            &self.data,
            &self.schedule,
            self.mask_ratio,
            Some(&self.output),
            self.resume.take(),
            on_step,
        )
    }
}
