//! Launchers of kernels/elementwise.cu over token matrices [M, D]: the linear epilogues (bias,
//! bias + exact GELU), GELU's backward, the layer-scaled residual x += γ ⊙ y (x stays f32), the
//! token assembly [cls; patches] + pos, and the f32 → bf16/f16 casts. Same math as src/backend/cpu/{elementwise,vecmath}.rs.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
use super::{ptr_or_null, Storage};
use crate::error::{Error, Result};

fn not_f16<T: Storage>(op: &str) -> Result<()> {
    if T::NAME == "f16" {
        return Err(Error::Cuda(format!("{op}: f32 or bf16 only")));
    }
    Ok(())
}

/// Shared by bias_add and bias_gelu: y [M, D] (in place) with bias [D] (optional for GELU).
fn bias_epilogue<T: Storage>(
    dev: &CudaDevice,
    kernel: &str,
    y: &mut CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    (m, d): (usize, usize),
) -> Result<()> {
    not_f16::<T>(kernel)?;
    check_len(kernel, y, m * d)?;
    if let Some(b) = bias {
        check_len(&format!("{kernel} bias"), b, d)?;
    }
    let n = (m * d) as i64;
    let di = as_i32("D", d.max(1))?;
    if n == 0 {
        return Ok(());
    }
    let name = format!("{kernel}_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    let s = dev.stream();
    let pb = ptr_or_null(s, bias);
    // SAFETY: y holds M·D elements and bias D (or is null where the kernel allows it).
    unsafe { launch!(dev, f, name, dev.grid_stride(n as usize), [y, &pb, &n, &di]) }?;
    Ok(())
}

/// y [M, D] += b [D].
pub fn bias_add<T: Storage>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    bias: &CudaSlice<f32>,
    md: (usize, usize),
) -> Result<()> {
    bias_epilogue(dev, "bias_add", y, Some(bias), md)
}

/// y [M, D] = GELU(y + b), exact erf GELU; no bias when `bias` is None.
pub fn bias_gelu<T: Storage>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    md: (usize, usize),
) -> Result<()> {
    bias_epilogue(dev, "bias_gelu", y, bias, md)
}

/// dx = dy · GELU'(x), x the pre-activation; all [n].
pub fn gelu_backward<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    dx: &mut CudaSlice<T>,
) -> Result<()> {
    not_f16::<T>("gelu_bwd")?;
    let n = x.len();
    check_len("gelu_bwd dy", dy, n)?;
    check_len("gelu_bwd dx", dx, n)?;
    if n == 0 {
        return Ok(());
    }
    let ni = n as i64;
    let name = format!("gelu_bwd_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    // SAFETY: all three buffers hold n elements.
    unsafe { launch!(dev, f, name, dev.grid_stride(n), [x, dy, dx, &ni]) }?;
    Ok(())
}

/// x [M, D] (f32, the residual stream) += γ ⊙ y [M, D]; γ [D] or None for 1.
pub fn residual<T: Storage>(
    dev: &CudaDevice,
    x: &mut CudaSlice<f32>,
    y: &CudaSlice<T>,
    gamma: Option<&CudaSlice<f32>>,
    (m, d): (usize, usize),
) -> Result<()> {
    not_f16::<T>("residual_scale")?;
    check_len("residual x", x, m * d)?;
    check_len("residual y", y, m * d)?;
    if let Some(g) = gamma {
        check_len("layer scale", g, d)?;
    }
    let n = (m * d) as i64;
    let di = as_i32("D", d.max(1))?;
    if n == 0 {
        return Ok(());
    }
    let name = format!("residual_scale_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    let s = dev.stream();
    let pg = ptr_or_null(s, gamma);
    // SAFETY: x and y hold M·D elements, γ D or null.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(n as usize),
            [x, y, &pg, &n, &di]
        )
    }?;
    Ok(())
}

/// out = T(in), round to nearest even; T is bf16 or f16.
pub fn cast<T: Storage>(
    dev: &CudaDevice,
    input: &CudaSlice<f32>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    if T::NAME == "f32" {
        return Err(Error::Cuda("cast: target must be bf16 or f16".into()));
    }
    let n = input.len();
    check_len("cast output", out, n)?;
    if n == 0 {
        return Ok(());
    }
    let ni = n as i64;
    let name = format!("cast_f32_{}", T::NAME);
    let f = dev.function("elementwise", &name)?;
    // SAFETY: both buffers hold n elements.
    unsafe { launch!(dev, f, name, dev.grid_stride(n), [input, out, &ni]) }?;
    Ok(())
}

/// x [B·N, D] = per image [cls; patches_b] (+ pos [N, D]), N = G + 1; patches [B·G, D], cls [D].
pub fn assemble_tokens(
    dev: &CudaDevice,
    patches: &CudaSlice<f32>,
    cls: &CudaSlice<f32>,
    pos: Option<&CudaSlice<f32>>,
    x: &mut CudaSlice<f32>,
    (b, g, d): (usize, usize, usize),
) -> Result<()> {
    let n = g + 1;
    check_len("assemble_tokens patches", patches, b * g * d)?;
    check_len("assemble_tokens cls", cls, d)?;
    if let Some(p) = pos {
        check_len("assemble_tokens pos", p, n * d)?;
    }
    check_len("assemble_tokens x", x, b * n * d)?;
    let (bi, ni, di) = (as_i32("B", b)?, as_i32("N", n)?, as_i32("D", d)?);
    if b * d == 0 {
        return Ok(());
    }
    let f = dev.function("elementwise", "assemble_tokens_f32")?;
    let s = dev.stream();
    let pp = ptr_or_null(s, pos);
    // SAFETY: shapes checked above; pos may be null.
    unsafe {
        launch!(
            dev,
            f,
            "assemble_tokens_f32",
            dev.grid_stride(b * n * d),
            [patches, cls, &pp, x, &bi, &ni, &di]
        )
    }?;
    Ok(())
}

/// out [R, D] = row src[r] of x [M, D], or `token` [D] where src[r] < 0: row gathering and
/// masked image modelling's mask token in one kernel (`cpu::elementwise::{gather_rows, mask_rows}`).
pub fn select_rows(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    src: &[i32],
    token: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    (m, d): (usize, usize),
) -> Result<()> {
    let r = src.len();
    check_len("select_rows x", x, m * d)?;
    check_len("select_rows out", out, r * d)?;
    if let Some(&bad) = src.iter().find(|&&s| s >= 0 && s as usize >= m) {
        return Err(Error::Data(format!(
            "select_rows: row {bad} out of range for {m} rows"
        )));
    }
    match token {
        Some(t) => check_len("select_rows token", t, d)?,
        None if src.iter().any(|&s| s < 0) => {
            return Err(Error::Data(
                "select_rows: a row asks for the token, but none was given".into(),
            ))
        }
        None => {}
    }
    if r * d == 0 {
        return Ok(());
    }
    let (ri, di) = (as_i32("R", r)?, as_i32("D", d)?);
    let srcd = dev.upload(src)?;
    let f = dev.function("elementwise", "select_rows_f32")?;
    let s = dev.stream();
    let pt = ptr_or_null(s, token);
    // SAFETY: x holds M·D values and every src entry is < M or negative (then token, D values,
    // is read); out holds R·D.
    unsafe {
        launch!(
            dev,
            f,
            "select_rows_f32",
            dev.grid_stride(r * d),
            [x, &srcd, &pt, out, &ri, &di]
        )
    }?;
    Ok(())
}
