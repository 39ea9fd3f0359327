//! `mood pretrain`: masked image modelling on unlabelled in-distribution images (BEiT's block-wise
//! masking, a learnable mask token, normalised-pixel regression; see `train::mim` for how this
//! differs from BEiT's dVAE-token targets).

use std::path::PathBuf;

use super::train_common::{bar_callback, step_bar, ScheduleArgs};
use crate::error::Result;
use crate::model::VitConfig;
use crate::pipeline::data::training_data;
use crate::pipeline::train::{initial_params, note_dropped, steps_done, take_output};
use crate::train::loops::pretrain_on;
use crate::train::step::add_mim_params;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model preset (timm name), e.g. beit_tiny_patch8_32 for the digits.
    #[arg(long)]
    pub arch: String,
    /// Continue pretraining this checkpoint; random init when absent.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Images: `digits` or `digits:CLASSES`, an image folder, or `cifar10:DIR@train` (labels are
    /// not used: a flat folder works).
    #[arg(long)]
    pub data: String,
    /// Preprocessing of image folders and CIFAR (as `mood extract --preset`).
    #[arg(long, default_value = "mood")]
    pub preset: String,
    /// Fraction of patches masked per image (BEiT: 75 of 196 ≈ 0.4).
    #[arg(long, default_value_t = 0.4)]
    pub mask_ratio: f32,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Output checkpoint (safetensors; rewritten atomically after every epoch).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing --output checkpoint (without it, an existing one needs --resume).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Continue from `--output` if it exists.
    #[arg(long)]
    pub resume: bool,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = VitConfig::preset(&args.arch)?;
    let s = args.schedule.schedule()?;
    let on = args.schedule.train_on()?;
    // Before the data is read: a checkpoint in the way is said in seconds.
    let (_lock, resume) = take_output(&args.output, args.resume, args.overwrite)?;
    let (data, _) = training_data(&args.data, &args.preset, &cfg, false)?;
    let mut params = initial_params(&cfg, args.weights.as_deref(), s.seed)?;
    params.retain(|k, _| !k.starts_with("head.") && !k.starts_with("fc_norm."));
    add_mim_params(&mut params, &cfg, s.seed);
    if let Some(r) = &resume {
        let mut settings = crate::train::loops::pretrain_settings(&s, &data, args.mask_ratio);
        crate::train::loops::record_precision(&mut settings, &on);
        crate::train::loops::check_resume("pretrain", &cfg, &settings, r)?;
    }
    note_dropped(data.len(), s.batch);
    let per_epoch = (data.len() / s.batch.max(1)) as u64;
    let done = steps_done(&resume, per_epoch);
    eprintln!(
        "masked image modelling: {} on {} images ({}), {} epochs of {} steps, mask ratio {}",
        cfg.name,
        data.len(),
        args.data,
        s.epochs,
        per_epoch,
        args.mask_ratio
    );
    let pb = step_bar(s.epochs as u64 * per_epoch, done, "pretrain");
    let hist = pretrain_on(
        &on,
        &cfg,
        &mut params,
        &data,
        &s,
        args.mask_ratio,
        Some(&args.output),
        resume,
        &mut bar_callback(&pb),
    )?;
    pb.finish_and_clear();
    if let (Some(first), Some(last)) = (hist.first(), hist.last()) {
        eprintln!(
            "reconstruction loss {first:.4} (first epoch) -> {last:.4} (last); wrote {}",
            args.output.display()
        );
    }
    Ok(())
}
