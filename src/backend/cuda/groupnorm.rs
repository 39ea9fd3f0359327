//! Launcher of kernels/groupnorm.cu: GroupNorm (+ ReLU) on NHWC activations [B, H·W, C], as
//! `backend::cpu::groupnorm::group_norm` (BiT's ResNet-v2). γ and β are f32; x and y f32 or bf16.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, f32_or_bf16, CudaDevice};
use super::Storage;
use crate::error::{Error, Result};

/// y = GN(x) (then ReLU when `relu`) over `groups` groups of channels, per image.
#[allow(clippy::too_many_arguments)]
pub fn group_norm<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    (gamma, beta): (&CudaSlice<f32>, &CudaSlice<f32>),
    y: &mut CudaSlice<T>,
    (b, hw, c): (usize, usize, usize),
    groups: usize,
    eps: f32,
    relu: bool,
) -> Result<()> {
    f32_or_bf16::<T>("group_norm")?;
    if groups == 0 || c % groups != 0 {
        return Err(Error::Cuda(format!(
            "group_norm: {groups} groups do not divide {c} channels"
        )));
    }
    check_len("group_norm input", x, b * hw * c)?;
    check_len("group_norm output", y, b * hw * c)?;
    check_len("group_norm gamma", gamma, c)?;
    check_len("group_norm beta", beta, c)?;
    if b * hw * c == 0 {
        return Ok(());
    }
    let [hwi, ci, gi, ri] = [
        as_i32("H·W", hw)?,
        as_i32("C", c)?,
        as_i32("groups", groups)?,
        i32::from(relu),
    ];
    let blocks_y = u32::try_from(b)
        .ok()
        .filter(|&v| v <= 65_535)
        .ok_or_else(|| Error::Cuda(format!("group_norm: batch {b} exceeds the grid's 65535")))?;
    let cfg = LaunchConfig {
        grid_dim: (gi as u32, blocks_y, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = format!("group_norm_{}", T::NAME);
    let f = dev.function("groupnorm", &name)?;
    // SAFETY: x and y hold B·H·W·C values, gamma and beta C, checked above.
    unsafe {
        launch!(
            dev,
            f,
            name,
            cfg,
            [x, gamma, beta, y, &hwi, &ci, &gi, &eps, &ri]
        )
    }
}
