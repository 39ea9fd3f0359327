//! Launcher of kernels/attention.cu: fused multi-head self-attention with an optional additive
//! bias [H, N, N] (BEiT's relative-position bias), read from the fused qkv activation [B·N, 3·D]
//! and written as [B·N, D], heads concatenated; same layout and math as
//! src/backend/cpu/attention.rs. bf16 or f16 storage, f32 softmax and accumulation; the head dim
//! must be one the kernel was instantiated for (64 or 80).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, cuda_err, CudaDevice};
use super::{ptr_or_null, Storage};
use crate::error::{Error, Result};

/// Query rows per block (kernels/attention.cu ATT_BQ).
const BQ: usize = 32;

/// The head dims the kernel is compiled for.
pub const HEAD_DIMS: [usize; 2] = [64, 80];

/// B images of N tokens with H heads of `dh`; `scale` is usually dh^-1/2.
pub struct Dims {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub dh: usize,
}

pub fn forward<T: Storage>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    dims: &Dims,
    scale: f32,
) -> Result<()> {
    let Dims { b, n, h, dh } = *dims;
    if T::NAME == "f32" {
        return Err(Error::Cuda(
            "attention: the fused kernel takes bf16 or f16 (cast qkv first)".into(),
        ));
    }
    if !HEAD_DIMS.contains(&dh) {
        return Err(Error::Cuda(format!(
            "attention: head dim {dh} has no kernel (have {HEAD_DIMS:?})"
        )));
    }
    let d = h * dh;
    check_len("attention qkv", qkv, b * n * 3 * d)?;
    check_len("attention out", out, b * n * d)?;
    if let Some(bias) = bias {
        check_len("attention bias", bias, h * n * n)?;
    }
    let (ni, hi) = (as_i32("N", n)?, as_i32("H", h)?);
    if b == 0 || n == 0 || h == 0 {
        return Ok(());
    }
    if b > 65535 || h > 65535 {
        return Err(Error::Cuda(format!(
            "attention: grid dims B = {b}, H = {h} exceed 65535"
        )));
    }
    let name = format!("attention_fwd_{}_d{dh}", T::NAME);
    let f = dev.function("attention", &name)?;
    let s = dev.stream();
    let pb = ptr_or_null(s, bias);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BQ) as u32, h as u32, b as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: qkv, out and bias were checked against (B, N, H, Dh); Dh selects the kernel.
    unsafe {
        s.launch_builder(&f)
            .arg(qkv)
            .arg(&pb)
            .arg(out)
            .arg(&ni)
            .arg(&hi)
            .arg(&scale)
            .launch(cfg)
    }
    .map_err(cuda_err(name))?;
    Ok(())
}
