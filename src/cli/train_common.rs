//! What `mood pretrain` and `mood finetune` share on the command line: the schedule options, the
//! output checkpoint and the progress display (their setup is pipeline::train, their data
//! pipeline::data).

use std::path::PathBuf;

use crate::backend::{Device, Precision};
use crate::error::{Error, Result};
use crate::train::device::TrainOn;
use crate::train::loops::Schedule;

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

/// The checkpoint a training run writes, and what to do when it already exists.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckpointArgs {
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

impl ScheduleArgs {
    /// Where to train, from --device and --precision (`auto` notes a fallback to the CPU).
    pub fn train_on(&self) -> Result<TrainOn> {
        crate::pipeline::device::train_on(self.device, self.precision, "training")
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
