//! Launcher of kernels/tensor_core.cu, the layout check of kernels/tensor_core.cuh: C = A·B for
//! A [16, 32], from B given n-major (`bt` [16, 32]) and k-major (`b` [32, 16]), both into
//! [16, 16] f32. No model op uses it; its parity case proves the mma/ldmatrix/cp.async fragment
//! layouts on whatever runs the kernels (GPU or the CPU stand-in).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::device::{check_len, CudaDevice};
use crate::error::Result;

/// (C from `bt`, C from `b`), each [16, 16] row-major.
pub fn mma_bf16(
    dev: &CudaDevice,
    a: &CudaSlice<bf16>,
    bt: &CudaSlice<bf16>,
    b: &CudaSlice<bf16>,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    check_len("tensor_core a", a, 16 * 32)?;
    check_len("tensor_core bt", bt, 16 * 32)?;
    check_len("tensor_core b", b, 32 * 16)?;
    let (mut c1, mut c2) = (dev.zeros::<f32>(256)?, dev.zeros::<f32>(256)?);
    let name = "tensor_core_mma_bf16";
    let f = dev.function("tensor_core", name)?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the extents were checked above; the kernel writes 256 floats to each output.
    unsafe { launch!(dev, f, name, cfg, [a, bt, b, &mut c1, &mut c2]) }?;
    Ok((c1, c2))
}
