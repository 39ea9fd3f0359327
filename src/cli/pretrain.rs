//! `mood pretrain`: masked image modelling on unlabelled in-distribution images (BEiT's block-wise
//! masking, a learnable mask token, normalised-pixel regression; see `train::mim` for how this
//! differs from BEiT's dVAE-token targets). The run is pipeline::pretrain.

use std::path::PathBuf;

use super::train_common::{bar_callback, step_bar, CheckpointArgs, ScheduleArgs};
use crate::error::Result;
use crate::model::VitConfig;
use crate::pipeline::pretrain::{prepare, Options};

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
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = VitConfig::preset(&args.arch)?;
    let s = args.schedule.schedule()?;
    let on = args.schedule.train_on()?;
    let opts = Options {
        cfg,
        weights: args.weights.as_deref(),
        data: &args.data,
        preset: &args.preset,
        mask_ratio: args.mask_ratio,
        output: &args.checkpoint.output,
        overwrite: args.checkpoint.overwrite,
        resume: args.checkpoint.resume,
    };
    let mut run = prepare(&opts, s, on)?;
    let per_epoch = run.steps_per_epoch();
    eprintln!(
        "masked image modelling: {} on {} images ({}), {} epochs of {} steps, mask ratio {}",
        run.cfg.name,
        run.data.len(),
        args.data,
        run.schedule.epochs,
        per_epoch,
        args.mask_ratio
    );
    let total = run.schedule.epochs as u64 * per_epoch;
    let pb = step_bar(total, run.steps_done(), "pretrain");
    let hist = run.train(&mut bar_callback(&pb))?;
    pb.finish_and_clear();
    if let (Some(first), Some(last)) = (hist.first(), hist.last()) {
        eprintln!(
            "reconstruction loss {first:.4} (first epoch) -> {last:.4} (last); wrote {}",
            args.checkpoint.output.display()
        );
    }
    Ok(())
}
