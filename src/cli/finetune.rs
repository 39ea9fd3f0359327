//! `mood finetune`: supervised fine-tuning as MOOD does it (AdamW, layer-wise lr decay, warmup +
//! cosine, drop-path, label smoothing), multi-class or one-class, from a checkpoint or from
//! scratch (the run is pipeline::finetune).

use std::path::PathBuf;

use super::train_common::{bar_callback, step_bar, CheckpointArgs, ScheduleArgs};
use crate::error::Result;
use crate::model::VitConfig;
use crate::pipeline::finetune::{prepare, Options};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model preset (timm name), e.g. beit_tiny_patch8_32 for the digits.
    #[arg(long)]
    pub arch: String,
    /// Start from this checkpoint (e.g. `mood pretrain` output); random init when absent.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Training data: `digits` or `digits:CLASSES` (e.g. digits:0-4; one class, e.g. digits:3, is
    /// MOOD's one-class fine-tuning, where label smoothing keeps the task from being trivial), an
    /// image folder with class sub-folders, or `cifar10:DIR@train` / `cifar100:DIR@train`.
    #[arg(long)]
    pub data: String,
    /// Held-out images for the closing accuracy (same forms as --data); default: the digits'
    /// test part for a digits spec, none otherwise.
    #[arg(long)]
    pub val: Option<String>,
    /// Preprocessing of image folders and CIFAR (as `mood extract --preset`).
    #[arg(long, default_value = "mood")]
    pub preset: String,
    /// Head size; default: the data's classes (the preset's 10 for the digits).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Label smoothing of the cross-entropy (MOOD: 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f32,
    /// MOS group-softmax fine-tuning: group sizes, classes assigned in order (e.g. `2,3` puts
    /// classes 0-1 in one group and 2-4 in another). The head gets one "others" output per group;
    /// score the result with `mood eval --methods mos --method-arg mos.groups=2,3`.
    #[arg(long, value_name = "SIZES")]
    pub mos_groups: Option<String>,
    /// Add MODE's ALPA loss with this weight (L = CE + w·L_ALPA over the image and a shifted view).
    #[arg(long, value_name = "WEIGHT")]
    pub alpa: Option<f32>,
    /// Projection width d of ALPA's query/key/value MLPs (MODE: 80).
    #[arg(long, default_value_t = 80)]
    pub alpa_dim: usize,
    /// Largest shift in pixels of ALPA's second view.
    #[arg(long, default_value_t = 2)]
    pub alpa_shift: usize,
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
        val: args.val.as_deref(),
        preset: &args.preset,
        num_classes: args.num_classes,
        label_smoothing: args.label_smoothing,
        mos_groups: args.mos_groups.as_deref(),
        alpa: args.alpa,
        alpa_dim: args.alpa_dim,
        alpa_shift: args.alpa_shift,
        output: &args.checkpoint.output,
        overwrite: args.checkpoint.overwrite,
        resume: args.checkpoint.resume,
    };
    let mut run = prepare(&opts, s, on)?;
    let per_epoch = run.steps_per_epoch();
    eprintln!(
        "fine-tuning {} on {} images ({}), {} epochs of {} steps",
        run.cfg.name,
        run.data.len(),
        args.data,
        run.schedule.epochs,
        per_epoch
    );
    let total = run.schedule.epochs as u64 * per_epoch;
    let pb = step_bar(total, run.steps_done(), "finetune");
    let hist = run.train(&mut bar_callback(&pb))?;
    pb.finish_and_clear();
    if let Some(last) = hist.last() {
        eprintln!(
            "last epoch mean loss {last:.4}; wrote {}",
            args.checkpoint.output.display()
        );
    }
    match run.heldout_accuracy()? {
        Some((acc, n)) => println!("held-out accuracy: {:.2}% on {n} images", 100.0 * acc),
        None => eprintln!("no --val given: held-out accuracy not measured"),
    }
    Ok(())
}
