//! Launchers of kernels/layernorm.cu: LayerNorm over the last dim of x [M, D] with γ, β [D] (f32),
//! forward (optionally saving mean and rstd [M] for the backward) and backward (dx, dγ, dβ).
//! Same math as src/backend/cpu/layernorm.rs.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
use super::{ptr_mut_or_null, Storage};
use crate::error::{Error, Result};

/// Warps per block of the backward (each warp owns one row at a time and a [2, D] smem slice).
const BWD_WARPS: usize = 4;

/// y = LN(x)·γ + β; `stats` = (mean, rstd) [M] to save for the backward.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    y: &mut CudaSlice<T>,
    stats: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
    (m, d): (usize, usize),
    eps: f32,
) -> Result<()> {
    if T::NAME == "f16" {
        return Err(Error::Cuda("layernorm: f32 or bf16 only".into()));
    }
    check_len("layernorm x", x, m * d)?;
    check_len("layernorm y", y, m * d)?;
    check_len("layernorm weight", gamma, d)?;
    check_len("layernorm bias", beta, d)?;
    let (mean, rstd) = match stats {
        Some((mu, rs)) => {
            check_len("layernorm mean", mu, m)?;
            check_len("layernorm rstd", rs, m)?;
            (Some(mu), Some(rs))
        }
        None => (None, None),
    };
    let (mi, di) = (as_i32("M", m)?, as_i32("D", d)?);
    if m == 0 {
        return Ok(());
    }
    let name = format!("layernorm_fwd_{}", T::NAME);
    let f = dev.function("layernorm", &name)?;
    let s = dev.stream();
    let (pm, pr) = (ptr_mut_or_null(s, mean), ptr_mut_or_null(s, rstd));
    // SAFETY: every buffer was checked against (M, D) above; null stats are allowed by the kernel.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.warp_per_row(m),
            [x, gamma, beta, y, &pm, &pr, &mi, &di, &eps]
        )
    }?;
    Ok(())
}

/// y = LN(x)·γ + β from the f32 residual stream x, stored as T (`layernorm_fwd_f32_bf16` for
/// bf16: the cast and the LayerNorm in one pass; `layernorm_fwd_f32` for f32). `stats` as in
/// `forward`; the backward then takes x as f32.
#[allow(clippy::too_many_arguments)]
pub fn forward_from_f32<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    y: &mut CudaSlice<T>,
    stats: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
    (m, d): (usize, usize),
    eps: f32,
) -> Result<()> {
    let name = match T::NAME {
        "f32" => "layernorm_fwd_f32",
        "bf16" => "layernorm_fwd_f32_bf16",
        _ => return Err(Error::Cuda("layernorm: f32 or bf16 output only".into())),
    };
    check_len("layernorm x", x, m * d)?;
    check_len("layernorm y", y, m * d)?;
    check_len("layernorm weight", gamma, d)?;
    check_len("layernorm bias", beta, d)?;
    let s = dev.stream();
    let (pm, pr) = stats_ptrs(s, stats, m)?;
    let (mi, di) = (as_i32("M", m)?, as_i32("D", d)?);
    if m == 0 {
        return Ok(());
    }
    let f = dev.function("layernorm", name)?;
    // SAFETY: every buffer was checked against (M, D) above; null stats are allowed by the kernel.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.warp_per_row(m),
            [x, gamma, beta, y, &pm, &pr, &mi, &di, &eps]
        )
    }?;
    Ok(())
}

/// The end of one pre-norm branch and the start of the next in one pass: x += ls ⊙ y (x the f32
/// residual [M, D], y the branch output, `layer_scale` BEiT's γ or None for 1), then
/// h = LN(x)·γ + β with `ln` = (γ, β), stored as T. `stats` as in `forward`.
#[allow(clippy::too_many_arguments)]
pub fn residual_forward<T: Storage>(
    dev: &CudaDevice,
    x: &mut CudaSlice<f32>,
    y: &CudaSlice<T>,
    layer_scale: Option<&CudaSlice<f32>>,
    ln: (&CudaSlice<f32>, &CudaSlice<f32>),
    h: &mut CudaSlice<T>,
    stats: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
    (m, d): (usize, usize),
    eps: f32,
) -> Result<()> {
    if T::NAME == "f16" {
        return Err(Error::Cuda("residual layernorm: f32 or bf16 only".into()));
    }
    let (gamma, beta) = ln;
    check_len("residual layernorm x", x, m * d)?;
    check_len("residual layernorm y", y, m * d)?;
    check_len("residual layernorm h", h, m * d)?;
    check_len("layernorm weight", gamma, d)?;
    check_len("layernorm bias", beta, d)?;
    if let Some(ls) = layer_scale {
        check_len("layer scale", ls, d)?;
    }
    let s = dev.stream();
    let (pm, pr) = stats_ptrs(s, stats, m)?;
    let pl = super::ptr_or_null(s, layer_scale);
    let (mi, di) = (as_i32("M", m)?, as_i32("D", d)?);
    if m == 0 {
        return Ok(());
    }
    let name = format!("residual_layernorm_{}", T::NAME);
    let f = dev.function("layernorm", &name)?;
    // SAFETY: every buffer was checked against (M, D) above; null stats and layer scale are
    // allowed by the kernel.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.warp_per_row(m),
            [x, y, &pl, gamma, beta, h, &pm, &pr, &mi, &di, &eps]
        )
    }?;
    Ok(())
}

/// The device addresses of optional (mean, rstd) [M] outputs, 0 for none.
fn stats_ptrs(
    s: &cudarc::driver::CudaStream,
    stats: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
    m: usize,
) -> Result<(u64, u64)> {
    Ok(match stats {
        Some((mu, rs)) => {
            check_len("layernorm mean", mu, m)?;
            check_len("layernorm rstd", rs, m)?;
            (ptr_mut_or_null(s, Some(mu)), ptr_mut_or_null(s, Some(rs)))
        }
        None => (0, 0),
    })
}

/// Gradients given dy [M, D] and the forward's saved mean, rstd [M]: writes dx [M, D], returns
/// (dγ, dβ) [D], summed in a fixed order (deterministic).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    gamma: &CudaSlice<f32>,
    mean: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    dy: &CudaSlice<T>,
    dx: &mut CudaSlice<T>,
    (m, d): (usize, usize),
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    if T::NAME == "f16" {
        return Err(Error::Cuda("layernorm backward: f32 or bf16 only".into()));
    }
    for (what, buf) in [("x", x), ("dy", dy)] {
        check_len(&format!("layernorm backward {what}"), buf, m * d)?;
    }
    check_len("layernorm backward dx", dx, m * d)?;
    check_len("layernorm backward weight", gamma, d)?;
    check_len("layernorm backward mean", mean, m)?;
    check_len("layernorm backward rstd", rstd, m)?;
    let smem = BWD_WARPS * 2 * d * 4;
    if smem > 48 * 1024 {
        return Err(Error::Cuda(format!(
            "layernorm backward: D = {d} needs {smem} B of shared memory (48 KiB max)"
        )));
    }
    let (mi, di) = (as_i32("M", m)?, as_i32("D", d)?);
    // Enough blocks to fill the GPU twice over, but no block without a row.
    let parts = (2 * dev.sm_count() as usize)
        .min(m.div_ceil(BWD_WARPS))
        .max(1);
    let pi = parts as i32;
    let mut dg_part = dev.zeros::<f32>(parts * d)?;
    let mut db_part = dev.zeros::<f32>(parts * d)?;
    let mut dgamma = dev.zeros::<f32>(d)?;
    let mut dbeta = dev.zeros::<f32>(d)?;
    let name = format!("layernorm_bwd_{}", T::NAME);
    let f = dev.function("layernorm", &name)?;
    let cfg = LaunchConfig {
        grid_dim: (parts as u32, 1, 1),
        block_dim: (32 * BWD_WARPS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: shapes checked above; the partial buffers are [P, D] with P = the grid size.
    unsafe {
        launch!(
            dev,
            f,
            name,
            cfg,
            [
                x,
                gamma,
                mean,
                rstd,
                dy,
                dx,
                &mut dg_part,
                &mut db_part,
                &mi,
                &di
            ]
        )
    }?;
    let f = dev.function("layernorm", "layernorm_bwd_reduce")?;
    let cfg = LaunchConfig {
        grid_dim: (d.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the partials are [P, D], the outputs [D].
    unsafe {
        launch!(
            dev,
            f,
            "layernorm_bwd_reduce",
            cfg,
            [&dg_part, &db_part, &mut dgamma, &mut dbeta, &pi, &di]
        )
    }?;
    Ok((dgamma, dbeta))
}
