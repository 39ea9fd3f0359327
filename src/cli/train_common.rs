//! What `mood pretrain` and `mood finetune` share: the schedule options, the data spec and the
//! progress display.

use std::path::Path;

use super::bench::{Device, Precision};
use crate::error::{Error, Result};
use crate::model::VitConfig;
use crate::train::device::TrainOn;
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
    /// Epochs of linear warmup before the cosine decay; default: 5, or half of --epochs when
    /// that is less (so a short run still decays).
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// AdamW's decoupled weight decay.
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
    /// Seed of the initialisation, the shuffling, the masks and drop-path.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to train: cpu, cuda (device 0), or auto (the GPU where there is one, else the CPU
    /// with a note).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// On CUDA: f32, or bf16 autocast (bf16 GEMMs and attention with f32 accumulation, f32
    /// master weights, optimiser state and gradients). The CPU trains in f32.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

impl ScheduleArgs {
    /// Where to train, from --device and --precision (`auto` notes a fallback to the CPU).
    pub fn train_on(&self) -> Result<TrainOn> {
        let cuda = super::runner::on_cuda(self.device, "training", || open_cuda(self.precision))?;
        Ok(cuda.unwrap_or(TrainOn::Cpu))
    }

    pub fn schedule(&self) -> Result<Schedule> {
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
        let warmup_epochs = self.warmup_epochs.unwrap_or((self.epochs / 2).min(5));
        if self.epochs == 0 || warmup_epochs > self.epochs {
            return Err(Error::Usage(format!(
                "--epochs must be at least 1 and at least --warmup-epochs ({warmup_epochs})"
            )));
        }
        Ok(Schedule {
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_epochs,
            weight_decay: self.weight_decay,
            layer_decay: self.layer_decay,
            drop_path: self.drop_path,
            clip_grad: self.clip_grad,
            seed: self.seed,
        })
    }
}

#[cfg(feature = "cuda")]
pub fn open_cuda(precision: Precision) -> Result<TrainOn> {
    let dev = std::sync::Arc::new(crate::backend::cuda::CudaDevice::new(0)?);
    eprintln!("cuda: {}", dev.describe());
    Ok(TrainOn::Cuda { dev, precision })
}

#[cfg(not(feature = "cuda"))]
pub fn open_cuda(_: Precision) -> Result<TrainOn> {
    Err(Error::Cuda(
        "this binary was built without the `cuda` feature".into(),
    ))
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

/// Takes the output checkpoint `out` for this run: one writer at a time (a lock file beside it),
/// temporaries of killed runs removed, and an existing checkpoint either resumed (`resume`),
/// replaced (`overwrite`) or left alone with a one-line refusal. Returns the lock (held while
/// training) and the checkpoint to resume from.
pub fn take_output(
    out: &Path,
    resume: bool,
    overwrite: bool,
) -> Result<(
    crate::fsutil::Lock,
    Option<crate::train::checkpoint::Loaded>,
)> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Usage(format!("-o {}: not a file name", out.display())))?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let lock = crate::fsutil::Lock::acquire(&dir.join(format!(".{name}.lock")), out)?;
    let stale = crate::fsutil::remove_stale_temps(&dir, Some(&name));
    if stale > 0 && !crate::progress::quiet() {
        eprintln!(
            "note: removed {stale} temporary file(s) of {} left by an interrupted run",
            out.display()
        );
    }
    if !out.exists() {
        if resume && !crate::progress::quiet() {
            eprintln!(
                "note: --resume: no checkpoint at {} yet, so starting from the beginning",
                out.display()
            );
        }
        return Ok((lock, None));
    }
    if resume {
        return Ok((lock, Some(crate::train::checkpoint::load(out)?)));
    }
    if overwrite {
        return Ok((lock, None));
    }
    let what = match crate::train::checkpoint::read_progress(out) {
        Ok(Some(p)) => format!(
            "a {} checkpoint of {} after epoch {}",
            p.stage,
            p.arch,
            p.epoch + 1
        ),
        _ => "a file".to_string(),
    };
    Err(Error::Usage(format!(
        "-o {} already exists ({what}): add --resume to continue it, or --overwrite to start over and replace it",
        out.display()
    )))
}

/// Says how many images drop-last leaves out of each epoch (BEiT's loaders do the same).
pub fn note_dropped(images: usize, batch: usize) {
    let dropped = images % batch.max(1);
    if dropped > 0 && batch <= images && !crate::progress::quiet() {
        eprintln!(
            "note: {images} images in batches of {batch}: the last {dropped} of each epoch's shuffled \
             order are left out (drop-last, as BEiT's loaders; other images each epoch)"
        );
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
