//! `mood forward`: features (and logits) of a float32 NCHW .npy of normalised images (the run is
//! pipeline::forward).

use std::path::PathBuf;

use crate::backend::{Device, Precision};
use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model preset (timm name), e.g. beit_base_patch16_224.
    #[arg(long)]
    pub arch: String,
    /// Checkpoint: .safetensors (memory-mapped) or PyTorch .pth.
    #[arg(long)]
    pub weights: PathBuf,
    /// Input images: float32 .npy of shape [B, 3, H, W], already normalised.
    #[arg(long)]
    pub input: PathBuf,
    /// Output .npy for the pre-logits features [B, D].
    #[arg(long)]
    pub features: PathBuf,
    /// Output .npy for the logits [B, C] (needs a head in the checkpoint).
    #[arg(long)]
    pub logits: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Where to run: cpu, cuda, or auto (cuda if a device is usable, else cpu with a note).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// CUDA only: f32 (features as the CPU's, to f32 rounding) or bf16 (faster, ~1e-2 off).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

pub fn run(args: Args) -> Result<()> {
    let sum = crate::pipeline::forward::run(&crate::pipeline::forward::Request {
        arch: &args.arch,
        weights: &args.weights,
        input: &args.input,
        features: &args.features,
        logits: args.logits.as_deref(),
        batch: args.batch,
        device: args.device,
        precision: args.precision,
    })?;
    let (total, d, c) = (sum.images, sum.dim, sum.classes);
    eprintln!(
        "{total} images -> {} [{total}, {d}]{}; peak RSS {}",
        args.features.display(),
        args.logits
            .as_ref()
            .map(|p| format!(", {} [{total}, {c}]", p.display()))
            .unwrap_or_default(),
        crate::pipeline::forward::peak_rss()
    );
    Ok(())
}
