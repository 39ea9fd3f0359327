//! What `mood pretrain` and `mood finetune` share: the schedule options, the data spec and the
//! progress display.

use std::path::Path;

use super::bench::Device;
use crate::error::{Error, Result};
use crate::model::VitConfig;
use crate::train::loops::{Dataset, Schedule};

#[derive(clap::Args, Debug, Clone)]
pub struct ScheduleArgs {
    /// Epochs (passes over the training images).
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Peak learning rate (after warmup), before layer-wise decay.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-6)]
    pub min_lr: f32,
    #[arg(long, default_value_t = 5)]
    pub warmup_epochs: usize,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f32,
    /// Layer-wise learning-rate decay (1 = none).
    #[arg(long, default_value_t = 0.75)]
    pub layer_decay: f32,
    /// Stochastic depth of the last block (linearly less in earlier blocks).
    #[arg(long, default_value_t = 0.1)]
    pub drop_path: f32,
    /// Global gradient-norm clip (0 = none, MOOD's default).
    #[arg(long, default_value_t = 0.0)]
    pub clip_grad: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to train: cpu, or auto (runs on the CPU with a note); cuda is refused, since the
    /// CUDA backend has no backward ops yet.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

impl ScheduleArgs {
    pub fn schedule(&self) -> Result<Schedule> {
        super::runner::cpu_only(
            self.device,
            "training",
            "the CUDA backend has forward ops only",
        )?;
        for (name, v) in [
            ("--lr", self.lr),
            ("--min-lr", self.min_lr),
            ("--weight-decay", self.weight_decay),
            ("--layer-decay", self.layer_decay),
            ("--drop-path", self.drop_path),
            ("--clip-grad", self.clip_grad),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::Usage(format!(
                    "{name} must be a finite, non-negative number, got {v}"
                )));
            }
        }
        if self.drop_path >= 1.0 {
            return Err(Error::Usage(format!(
                "--drop-path must be below 1, got {}",
                self.drop_path
            )));
        }
        if self.epochs == 0 || self.warmup_epochs > self.epochs {
            return Err(Error::Usage(format!(
                "--epochs must be at least 1 and at least --warmup-epochs ({})",
                self.warmup_epochs
            )));
        }
        Ok(Schedule {
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_epochs: self.warmup_epochs,
            weight_decay: self.weight_decay,
            layer_decay: self.layer_decay,
            drop_path: self.drop_path,
            clip_grad: self.clip_grad,
            seed: self.seed,
        })
    }
}

/// Training images from a data spec: `digits[:CLASSES]` (the train part of the bundled digits'
/// fixed split, rendered at the model's input size), or anything `mood extract --data` reads (an
/// image folder with class sub-folders, `cifar10:DIR@train`, ...) through `preset`, loaded into
/// memory once. Also returns the number of classes the data names (None for the digits, whose
/// head keeps the preset's 10).
pub fn training_data(
    spec: &str,
    preset: &str,
    cfg: &VitConfig,
    need_labels: bool,
) -> Result<(Dataset, Option<usize>)> {
    if is_digits(spec) {
        return Ok((digits_part(spec, cfg, false)?, None));
    }
    let (source, _) = super::extract::open_source(spec, preset, cfg.img_size)?;
    let classes = source.classes().len();
    Ok((
        load_all(spec, source.as_ref(), cfg, need_labels)?,
        (classes > 0).then_some(classes),
    ))
}

/// The held-out images to report accuracy on: `--val SPEC` when given, else the digits' test
/// part for a digits spec, else none.
pub fn heldout_data(
    spec: &str,
    val: Option<&str>,
    preset: &str,
    cfg: &VitConfig,
) -> Result<Option<Dataset>> {
    match val {
        Some(v) if is_digits(v) => Ok(Some(digits_part(v, cfg, true)?)),
        Some(v) => {
            let (source, _) = super::extract::open_source(v, preset, cfg.img_size)?;
            Ok(Some(load_all(v, source.as_ref(), cfg, true)?))
        }
        None if is_digits(spec) => Ok(Some(digits_part(spec, cfg, true)?)),
        None => Ok(None),
    }
}

fn is_digits(spec: &str) -> bool {
    spec == "digits" || spec.starts_with("digits:")
}

/// Training keeps its images in memory (random order every epoch); beyond this it asks for a
/// smaller set instead of swapping.
const MAX_IN_MEMORY: usize = 16 << 30;

/// Every readable image of `source` with its label, decoded and preprocessed in parallel;
/// unreadable files are skipped with a warning, as `mood extract` does. Without `need_labels`,
/// unlabelled images (a flat folder) get label 0.
fn load_all(
    spec: &str,
    source: &dyn crate::extract::Source,
    cfg: &VitConfig,
    need_labels: bool,
) -> Result<Dataset> {
    let (n, sample) = (source.len(), source.sample_len());
    if n == 0 {
        return Err(Error::Usage(format!("--data {spec}: no images")));
    }
    if sample != cfg.in_chans * cfg.img_size * cfg.img_size {
        return Err(Error::Usage(format!(
            "--data {spec} gives {sample}-value images, {} takes {}x{}x{}",
            cfg.name, cfg.in_chans, cfg.img_size, cfg.img_size
        )));
    }
    if n.saturating_mul(sample * 4) > MAX_IN_MEMORY {
        return Err(Error::Usage(format!(
            "--data {spec}: {n} images of {sample} floats need {:.1} GiB in memory, over the {} GiB \
             training holds; train on a subset (a smaller folder)",
            (n * sample * 4) as f64 / (1u64 << 30) as f64,
            MAX_IN_MEMORY >> 30
        )));
    }
    let pb = crate::progress::Progress::new(n as u64, "images", "loading");
    let (mut images, mut labels) = (Vec::with_capacity(n * sample), Vec::with_capacity(n));
    let rows: Vec<usize> = (0..n).collect();
    for batch in rows.chunks(64) {
        let mut buf = vec![0f32; batch.len() * sample];
        let results = source.load(batch, &mut buf);
        for ((&r, res), img) in batch.iter().zip(results).zip(buf.chunks_exact(sample)) {
            if let Err(e) = res {
                pb.suspend(|| eprintln!("warning: skipping {}: {e}", source.item_name(r)));
                continue;
            }
            let label = source
                .label(r)
                .or((!need_labels).then_some(0))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--data {spec}: {} has no label; fine-tuning needs class sub-folders",
                        source.item_name(r)
                    ))
                })?;
            images.extend_from_slice(img);
            labels.push(label);
        }
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    Ok(Dataset {
        images,
        chw: [cfg.in_chans, cfg.img_size, cfg.img_size],
        labels,
    })
}

fn digits_part(spec: &str, cfg: &VitConfig, test: bool) -> Result<Dataset> {
    let (name, classes) = spec.split_once(':').unwrap_or((spec, ""));
    if name != "digits" {
        return Err(Error::Usage(format!(
            "--data `{spec}`: only the bundled `digits[:CLASSES]` can be trained on in this version"
        )));
    }
    if cfg.img_size % 8 != 0 || cfg.in_chans != 3 {
        return Err(Error::Usage(format!(
            "{} takes {}x{} inputs; the digits render at multiples of 8 with 3 channels",
            cfg.name, cfg.img_size, cfg.img_size
        )));
    }
    let classes = crate::data::digits::parse_classes(classes)?;
    let d = crate::data::digits::load()?;
    let (images, labels) = crate::data::digits::split(&d, &classes, test, cfg.img_size);
    Ok(Dataset {
        images,
        chw: [3, cfg.img_size, cfg.img_size],
        labels,
    })
}

/// Progress over all steps showing the running loss (`what`: "finetune" or "pretrain").
pub fn step_bar(total: u64, done: u64, what: &str) -> crate::progress::Progress {
    let pb = crate::progress::Progress::new(total, "steps", what);
    pb.set_position(done);
    pb
}

/// The `on_step` of the training loops for a command: advances `pb` and shows the epoch's loss.
pub fn bar_callback(
    pb: &crate::progress::Progress,
) -> impl FnMut(usize, usize, usize, f32) -> bool + '_ {
    move |e, _, _, loss| {
        pb.set_message(format!("epoch {e} loss {loss:.4}"));
        pb.inc(1);
        true
    }
}

/// Steps already done by the checkpoint `resume` continues from.
pub fn steps_done(resume: &Option<crate::train::checkpoint::Loaded>, per_epoch: u64) -> u64 {
    resume
        .as_ref()
        .and_then(|r| r.progress.as_ref())
        .map_or(0, |p| (p.epoch as u64 + 1) * per_epoch)
}

/// Loads a checkpoint to resume from when `resume` is set and `out` exists.
pub fn resume_from(out: &Path, resume: bool) -> Result<Option<crate::train::checkpoint::Loaded>> {
    if resume && out.exists() {
        Ok(Some(crate::train::checkpoint::load(out)?))
    } else {
        Ok(None)
    }
}

/// Parameters to start from: a checkpoint's tensors, or a random initialisation.
pub fn initial_params(
    cfg: &VitConfig,
    weights: Option<&Path>,
    seed: u64,
) -> Result<std::collections::BTreeMap<String, crate::tensor::Tensor>> {
    let store = match weights {
        Some(p) => crate::weights::WeightStore::open(p)?,
        None => crate::model::init::random_store(cfg, seed),
    };
    // Training updates tensors in place; a mapped one is copied on its first write (Tensor's
    // copy-on-write), so the file is never touched.
    store.float_tensors()
}
