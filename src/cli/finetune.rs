//! `mood finetune`: supervised fine-tuning as MOOD does it (AdamW, layer-wise lr decay, warmup +
//! cosine, drop-path, label smoothing), multi-class or one-class, from a checkpoint or from scratch.

use std::path::PathBuf;

use super::train_common::{bar_callback, step_bar, ScheduleArgs};
use crate::error::{Error, Result};
use crate::model::VitConfig;
use crate::pipeline::data::training_data;
use crate::pipeline::train::{initial_params, note_dropped, steps_done, take_output};
use crate::train::loops::finetune_on;
use crate::train::loops::FinetuneLoss;
use crate::train::step::prepare_for_finetune;

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
    /// Output checkpoint (safetensors; rewritten atomically after every epoch).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing --output checkpoint (without it, an existing one needs --resume).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Continue from `--output` if it exists (same settings), instead of starting over.
    #[arg(long)]
    pub resume: bool,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = VitConfig::preset(&args.arch)?;
    let s = args.schedule.schedule()?;
    let on = args.schedule.train_on()?;
    // Before the data is read: a checkpoint in the way is said in seconds.
    let (_lock, resume) = take_output(&args.output, args.resume, args.overwrite)?;
    if !(0.0..1.0).contains(&args.label_smoothing) {
        return Err(Error::Usage(format!(
            "--label-smoothing must be in [0, 1), got {}",
            args.label_smoothing
        )));
    }
    let (data, data_classes) = training_data(&args.data, &args.preset, &cfg, true)?;
    let groups: Option<Vec<usize>> = match &args.mos_groups {
        None => None,
        Some(spec) => Some(
            spec.split(',')
                .map(|g| g.trim().parse::<usize>().ok().filter(|&n| n > 0))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--mos-groups `{spec}`: expected positive sizes like 2,3"
                    ))
                })?,
        ),
    };
    let classes = match &groups {
        Some(g) => g.iter().sum(),
        None => args.num_classes.or(data_classes).unwrap_or(cfg.num_classes),
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
    let heldout =
        crate::pipeline::data::heldout_data(&args.data, args.val.as_deref(), &args.preset, &cfg)?;
    if let Some(&bad) = heldout
        .as_ref()
        .and_then(|h| h.labels.iter().find(|&&l| l >= classes))
    {
        return Err(Error::Usage(format!(
            "--val {}: label {bad} does not fit the {classes} classes being trained",
            args.val.as_deref().unwrap_or(&args.data)
        )));
    }
    let outputs = groups
        .as_ref()
        .map_or(classes, |g| g.iter().map(|s| s + 1).sum());
    if let Some(w) = args.alpa {
        if !w.is_finite() || w <= 0.0 || groups.is_some() || args.alpa_dim == 0 {
            return Err(Error::Usage(format!(
                "--alpa {w}: needs a positive weight, --alpa-dim > 0, and no --mos-groups"
            )));
        }
    }
    let mut params = initial_params(&cfg, args.weights.as_deref(), s.seed)?;
    let old_head = params.get("head.weight").map(|w| w.shape().to_vec());
    prepare_for_finetune(&mut params, &cfg, outputs, s.seed);
    if resume.is_none() && !crate::progress::quiet() {
        match (old_head, &args.weights) {
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
    if args.alpa.is_some() {
        crate::train::step::add_alpa_params(&mut params, &cfg, args.alpa_dim, s.seed);
    }
    let loss = match (&groups, args.alpa) {
        (Some(g), _) => FinetuneLoss::GroupSoftmax { groups: g.clone() },
        (None, Some(weight)) => FinetuneLoss::CrossEntropyAlpa {
            smoothing: args.label_smoothing,
            alpa: crate::train::step::AlpaConfig {
                weight,
                proj: args.alpa_dim,
                shift: args.alpa_shift,
            },
        },
        (None, None) => FinetuneLoss::from(args.label_smoothing),
    };
    if let Some(r) = &resume {
        let mut settings = crate::train::loops::finetune_settings(&s, &data, &loss);
        crate::train::loops::record_precision(&mut settings, &on);
        crate::train::loops::check_resume("finetune", &cfg, &settings, r)?;
    }
    note_dropped(data.len(), s.batch);
    let per_epoch = (data.len() / s.batch.max(1)) as u64;
    let done = steps_done(&resume, per_epoch);
    eprintln!(
        "fine-tuning {} on {} images ({}), {} epochs of {} steps",
        cfg.name,
        data.len(),
        args.data,
        s.epochs,
        per_epoch
    );
    let pb = step_bar(s.epochs as u64 * per_epoch, done, "finetune");
    let hist = finetune_on(
        &on,
        &cfg,
        &mut params,
        &data,
        &s,
        loss,
        Some(&args.output),
        resume,
        &mut bar_callback(&pb),
    )?;
    pb.finish_and_clear();
    if let Some(last) = hist.last() {
        eprintln!(
            "last epoch mean loss {last:.4}; wrote {}",
            args.output.display()
        );
    }
    match heldout {
        Some(h) => {
            let acc =
                crate::train::loops::accuracy_with(&cfg, &params, &h, 256, groups.as_deref())?;
            println!(
                "held-out accuracy: {:.2}% on {} images",
                100.0 * acc,
                h.len()
            );
        }
        None => eprintln!("no --val given: held-out accuracy not measured"),
    }
    Ok(())
}
