//! The run of `mood forward`: a checkpoint over a float32 NCHW .npy of normalised images, its
//! features (and logits) written as .npy.

use std::path::Path;

use crate::backend::{Device, Precision};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// What `mood forward` is asked for.
pub struct Request<'a> {
    pub arch: &'a str,
    pub weights: &'a Path,
    pub input: &'a Path,
    /// Output .npy of the pre-logits features [B, D].
    pub features: &'a Path,
    /// Output .npy of the logits [B, C], if wanted.
    pub logits: Option<&'a Path>,
    pub batch: usize,
    pub device: Device,
    pub precision: Precision,
}

/// What a forward run wrote: `images` rows of `dim` features and of `classes` logits (0 when
/// none were asked for).
pub struct Summary {
    pub images: usize,
    pub dim: usize,
    pub classes: usize,
}

/// Loads the model, checks the input's shape against it and runs it batch by batch on the device
/// asked for, writing the features (and logits).
pub fn run(req: &Request) -> Result<Summary> {
    if req.batch == 0 {
        return Err(Error::Usage("--batch must be at least 1".into()));
    }
    let model = super::load_model(req.arch, req.weights)?;
    if req.logits.is_some() && model.num_classes().is_none() {
        return Err(Error::Usage(format!(
            "--logits: {} has no `head.weight`, so there are no logits",
            req.weights.display()
        )));
    }
    let (shape, data) = crate::npy::read_f32(req.input)?;
    let (chans, size) = (model.in_chans(), model.img_size());
    let per_image = chans * size * size;
    // read_f32 checked that the shape's product is the data's length; the dims are still the
    // file's, so they are compared one by one rather than multiplied.
    match shape[..] {
        [_, c, h, w] if c == chans && h == size && w == size => {}
        _ => {
            return Err(Error::format(
                req.input,
                format!(
                    "expected images of shape [B, {chans}, {size}, {size}] for {}, found {shape:?}",
                    model.name(),
                ),
            ))
        }
    }
    // The largest batch actually run: fewer images than --batch need less device memory.
    let largest = req.batch.min(shape[0]).max(1);
    let mut runner = super::device::runner(&model, req.device, req.precision, largest)?;
    let total = shape[0];
    let pb = crate::progress::Progress::new(total as u64, "img", "progress");
    let mut feats = Vec::new();
    let mut logits = Vec::new();
    let (mut d, mut c) = (0, 0);
    for start in (0..total).step_by(req.batch) {
        let end = (start + req.batch).min(total);
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
    crate::npy::write_f32(req.features, &[total, d], &feats)?;
    if let Some(path) = req.logits {
        crate::npy::write_f32(path, &[total, c], &logits)?;
    }
    Ok(Summary {
        images: total,
        dim: d,
        classes: c,
    })
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
