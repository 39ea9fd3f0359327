//! `mood mode-train`: MODE's supervised-contrastive training of a ResNet encoder on the CPU or a
//! CUDA device (SupCon on the pooled features, optionally ALPA on the last stage's map); see
//! train/mode.rs.

use std::path::PathBuf;

use crate::backend::{Device, Precision};
use crate::error::{Error, Result};
use crate::model::resnet::ResNetConfig;
use crate::train::mode::{self, ModeSettings};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// ResNet preset, e.g. resnet18_cifar (MODE's CIFAR backbone).
    #[arg(long)]
    pub arch: String,
    /// Training images: digits[:CLASSES][@train|@test] (the train part by default), an image
    /// folder with class sub-folders, or cifar10:DIR / cifar100:DIR [@train|@test]; all but the
    /// digits are resized to the ResNet's input and normalised with MODE's CIFAR statistics.
    #[arg(long)]
    pub data: String,
    /// MODE's recipe: supcon (SupCon alone), mode-t (SupCon + ALPA), mode-f (ALPA alone, from
    /// --weights); the options below override its values.
    #[arg(long, default_value = "supcon")]
    pub recipe: String,
    /// Start from this checkpoint (a mode-train output or a timm ResNet); fresh weights otherwise.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Add ALPA with this weight (0 turns off the recipe's ALPA).
    #[arg(long, value_name = "WEIGHT")]
    pub alpa: Option<f32>,
    /// Weight of SupCon (0: ALPA alone).
    #[arg(long, value_name = "WEIGHT")]
    pub supcon: Option<f32>,
    /// Projection width d of ALPA's query/key/value MLPs (MODE: 80).
    #[arg(long)]
    pub alpa_dim: Option<usize>,
    /// Training epochs (the recipe's: 500).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per step (each gives two views).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Base learning rate of SGD's cosine schedule.
    #[arg(long)]
    pub lr: Option<f32>,
    /// Seed of the initial weights, the views' augmentation and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output checkpoint (safetensors; rewritten atomically after every epoch).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing --output checkpoint.
    #[arg(long)]
    pub overwrite: bool,
    /// Continue the --output checkpoint from the epoch it reached (its recorded settings must be
    /// these; the device may differ, and the record then says where each part ran).
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Leave out MODE's colour jitter and grayscale of the views (crop and flip only).
    #[arg(long)]
    pub no_color_aug: bool,
    /// Where to train: cpu, cuda (the encoder and its SGD state on the device, the losses on the
    /// host), or auto (cuda if a device is usable, else cpu with a note).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = ResNetConfig::preset(&args.arch).ok_or_else(|| {
        Error::Usage(format!(
            "--arch {}: not a ResNet preset ({})",
            args.arch,
            ResNetConfig::preset_names().join(", ")
        ))
    })?;
    let mut s = ModeSettings::preset(&args.recipe)?;
    s.epochs = args.epochs.unwrap_or(s.epochs);
    s.batch = args.batch.unwrap_or(s.batch);
    s.lr = args.lr.unwrap_or(s.lr);
    s.supcon_weight = args.supcon.unwrap_or(s.supcon_weight);
    s.alpa_dim = args.alpa_dim.unwrap_or(s.alpa_dim);
    s.seed = args.seed;
    if let Some(w) = args.alpa {
        s.alpa_weight = (w != 0.0).then_some(w);
    }
    if args.no_color_aug {
        s.color = crate::data::color_jitter::ColorAug::OFF;
    }
    s.check()?;
    if s.recipe == "mode-f" && args.weights.is_none() {
        return Err(Error::Usage(
            "--recipe mode-f fine-tunes a trained encoder: give --weights".into(),
        ));
    }
    let (_lock, resume) =
        crate::pipeline::train::take_output(&args.output, args.resume, args.overwrite)?;
    let (data, mean, std) = crate::pipeline::data::mode_training_data(&args.data, &cfg)?;
    (s.pixel_mean, s.pixel_std) = (mean, std);
    let (mut params, resume) = match (resume, &args.weights) {
        (Some(r), _) => {
            let (p, r) = mode::resume_from(r, &cfg, &mode::settings_record(&s, &data))?;
            (p, Some(r))
        }
        (None, Some(p)) => (mode::load_start(p)?, None),
        (None, None) => (mode::initial_params(&cfg, &s), None),
    };
    if let Some(r) = resume.as_ref().filter(|r| r.epochs_done >= s.epochs) {
        println!(
            "{}: already trained for {} epochs",
            args.output.display(),
            r.epochs_done
        );
        return Ok(());
    }
    mode::add_heads(&mut params, cfg.feature_dim(), &s);
    let quiet = crate::progress::quiet();
    let on = crate::pipeline::device::train_on(args.device, Precision::F32, "MODE's training")?;
    let mut each = |e: usize, l: mode::StepLoss| {
        if !quiet {
            eprintln!(
                "epoch {e}: loss {:.4} (supcon {:.4}, alpa {:.4})",
                l.total, l.supcon, l.alpa
            );
        }
        true
    };
    let run = mode::Run {
        on: &on,
        checkpoint: Some(args.output.as_path()),
        resume,
    };
    mode::train_from(&cfg, &mut params, &data, &s, run, &mut each)?;
    println!("wrote {}", args.output.display());
    Ok(())
}
