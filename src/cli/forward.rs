//! `mood forward`: features (and logits) of a float32 NCHW .npy of normalised images.

use std::path::PathBuf;

use crate::backend::{Device, Precision};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

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
    if args.batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    let model = super::load_model(&args.arch, &args.weights)?;
    if args.logits.is_some() && model.num_classes().is_none() {
        return Err(Error::Usage(format!(
            "--logits: {} has no `head.weight`, so there are no logits",
            args.weights.display()
        )));
    }
    let (shape, data) = crate::npy::read_f32(&args.input)?;
    let (chans, size) = (model.in_chans(), model.img_size());
    let per_image = chans * size * size;
    // read_f32 checked that the shape's product is the data's length; the dims are still the
    // file's, so they are compared one by one rather than multiplied.
    match shape[..] {
        [_, c, h, w] if c == chans && h == size && w == size => {}
        _ => {
            return Err(Error::format(
                &args.input,
                format!(
                    "expected images of shape [B, {chans}, {size}, {size}] for {}, found {shape:?}",
                    model.name(),
                ),
            ))
        }
    }
    // The largest batch actually run: fewer images than --batch need less device memory.
    let largest = args.batch.min(shape[0]).max(1);
    let mut runner = crate::pipeline::device::runner(&model, args.device, args.precision, largest)?;
    let total = shape[0];
    let pb = super::progress(total as u64, "img");
    let mut feats = Vec::new();
    let mut logits = Vec::new();
    let (mut d, mut c) = (0, 0);
    for start in (0..total).step_by(args.batch) {
        let end = (start + args.batch).min(total);
        let x = Tensor::from_vec(
            &[end - start, chans, size, size],
            data[start * per_image..end * per_image].to_vec(),
        )?;
        let out = runner.forward(&x)?;
        d = out.features.shape()[1];
        feats.extend_from_slice(out.features.as_slice());
        if let Some(l) = out.logits {
            c = l.shape()[1];
            logits.extend_from_slice(l.as_slice());
        }
        pb.inc((end - start) as u64);
    }
    pb.finish_and_clear();
    crate::npy::write_f32(&args.features, &[total, d], &feats)?;
    if let Some(path) = &args.logits {
        crate::npy::write_f32(path, &[total, c], &logits)?;
    }
    eprintln!(
        "{total} images -> {} [{total}, {d}]{}; peak RSS {}",
        args.features.display(),
        args.logits
            .as_ref()
            .map(|p| format!(", {} [{total}, {c}]", p.display()))
            .unwrap_or_default(),
        peak_rss()
    );
    Ok(())
}

/// Peak resident set size of this process (VmHWM), for memory reports.
pub fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
