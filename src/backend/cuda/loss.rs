//! Launchers of kernels/loss.cu: cross-entropy with label smoothing and its gradient, as
//! src/train/loss.rs `cross_entropy`, and the mean squared error of masked image modelling, as
//! src/train/mim.rs `mse` (f64 inside, deterministic sums).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
use crate::error::{Error, Result};

fn not_empty(b: usize, classes: usize) -> Result<()> {
    if b == 0 || classes == 0 {
        return Err(Error::Cuda(format!(
            "cross_entropy: an empty batch ({b} rows, {classes} classes)"
        )));
    }
    Ok(())
}

/// Cross-entropy of logits [B, C] against device labels [B] (i32) with label smoothing ε, as
/// torch's `CrossEntropyLoss(label_smoothing=ε)`: q = (1 − ε)·onehot(y) + ε/C,
/// loss = mean_b −Σ_c q_c log softmax(z_b)_c, dlogits = (softmax(z) − q) / B.
/// Returns (loss [1] on the device, dlogits [B, C]); no host synchronisation. A label outside
/// 0..C makes the loss and its row's gradients NaN (the host-label `cross_entropy` refuses it).
pub fn cross_entropy_device(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    labels: &CudaSlice<i32>,
    classes: usize,
    smoothing: f32,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let b = labels.len();
    check_len("cross_entropy logits", logits, b * classes)?;
    not_empty(b, classes)?;
    let (bi, ci) = (as_i32("B", b)?, as_i32("C", classes)?);
    // The CPU's ε/C, rounded once in f32.
    let off = smoothing / classes as f32;
    let mut dz = dev.empty::<f32>(b * classes)?;
    let mut loss = dev.empty::<f32>(1)?;
    let mut rows = dev.empty::<f64>(b)?;
    let f = dev.function("loss", "cross_entropy_rows")?;
    // SAFETY: logits and dz hold B·C values, labels and rows B.
    unsafe {
        launch!(
            dev,
            f,
            "cross_entropy_rows",
            dev.warp_per_row(b),
            [logits, labels, &bi, &ci, &smoothing, &off, &mut dz, &mut rows]
        )
    }?;
    let f = dev.function("loss", "cross_entropy_sum")?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: rows holds B values, loss 1.
    unsafe { launch!(dev, f, "cross_entropy_sum", cfg, [&rows, &bi, &mut loss]) }?;
    Ok((loss, dz))
}

/// `cross_entropy_device` with host labels (each checked < C, then uploaded) and the loss
/// downloaded (4 bytes, one sync): returns (loss, dlogits [B, C]), matching
/// `train::loss::cross_entropy` to about 1e-7 relative (both in f64; only the order of the f64
/// sums differs).
pub fn cross_entropy(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    labels: &[usize],
    classes: usize,
    smoothing: f32,
) -> Result<(f32, CudaSlice<f32>)> {
    if let Some(&bad) = labels.iter().find(|&&y| y >= classes) {
        return Err(Error::Data(format!(
            "cross_entropy: label {bad} out of range for {classes} classes"
        )));
    }
    check_len("cross_entropy logits", logits, labels.len() * classes)?;
    not_empty(labels.len(), classes)?;
    let host: Vec<i32> = labels.iter().map(|&y| y as i32).collect();
    let labels = dev.upload(&host)?;
    let (loss, dz) = cross_entropy_device(dev, logits, &labels, classes, smoothing)?;
    Ok((dev.download(&loss)?[0], dz))
}

/// Mean squared error of `pred` against `target`, both [R, K] (n = R·K): loss = Σ (p − t)² / n
/// and dpred = 2 (p − t) / n, as `train::mim::mse` (f64 sums; only their order differs).
/// Returns (loss [1] on the device, dpred [R, K]); no host synchronisation.
pub fn mse_device(
    dev: &CudaDevice,
    pred: &CudaSlice<f32>,
    target: &CudaSlice<f32>,
    (r, k): (usize, usize),
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    check_len("mse pred", pred, r * k)?;
    check_len("mse target", target, r * k)?;
    if r * k == 0 {
        return Err(Error::Cuda(format!("mse: no values ({r} rows of {k})")));
    }
    let (ri, ki) = (as_i32("R", r)?, as_i32("K", k)?);
    let n = (r * k) as f64;
    let mut dp = dev.empty::<f32>(r * k)?;
    let mut loss = dev.empty::<f32>(1)?;
    let mut rows = dev.empty::<f64>(r)?;
    let f = dev.function("loss", "mse_rows")?;
    // SAFETY: pred, target and dp hold R·K values, rows R.
    unsafe {
        launch!(
            dev,
            f,
            "mse_rows",
            dev.warp_per_row(r),
            [pred, target, &ri, &ki, &n, &mut dp, &mut rows]
        )
    }?;
    let f = dev.function("loss", "mse_sum")?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: rows holds R values, loss 1.
    unsafe { launch!(dev, f, "mse_sum", cfg, [&rows, &ri, &n, &mut loss]) }?;
    Ok((loss, dp))
}

/// `mse_device` with the loss downloaded (4 bytes, one sync): (loss, dpred [R, K]).
pub fn mse(
    dev: &CudaDevice,
    pred: &CudaSlice<f32>,
    target: &CudaSlice<f32>,
    dims: (usize, usize),
) -> Result<(f32, CudaSlice<f32>)> {
    let (loss, dp) = mse_device(dev, pred, target, dims)?;
    Ok((dev.download(&loss)?[0], dp))
}
