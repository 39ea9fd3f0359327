//! Launcher of kernels/softmax.cu: y = softmax(scale·x) along each row of x [M, N] (f32), as
//! src/backend/cpu/vecmath.rs `softmax_rows` with no bias. Out of place (the kernel also works in
//! place, but Rust's borrows cannot pass one buffer as both).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
use crate::error::Result;

pub fn rows(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    (m, n): (usize, usize),
    scale: f32,
) -> Result<()> {
    check_len("softmax x", x, m * n)?;
    check_len("softmax y", y, m * n)?;
    let (mi, ni) = (as_i32("M", m)?, as_i32("N", n)?);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let f = dev.function("softmax", "softmax_rows_f32")?;
    // SAFETY: x and y hold M·N elements.
    unsafe {
        launch!(
            dev,
            f,
            "softmax_rows_f32",
            dev.warp_per_row(m),
            [x, y, &mi, &ni, &scale]
        )
    }?;
    Ok(())
}
