//! Launchers of kernels/patch_embed.cu: Conv2d(C→D, kernel P, stride P) as im2col + cuBLAS GEMM,
//! as `backend::patch_embed` (src/backend/cpu/patch_embed.rs): images [B, C, H, W] (f32) →
//! cols [B·G, C·P·P] → tokens [B·G, D] through the conv weight [D, C·P·P] (its [D, C, P, P]
//! storage read flat) and bias [D]. For training and input gradients: `col2im` (the adjoint of
//! im2col) and `backward` (im2col + `matmul::linear_backward` + col2im).

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::device::{as_i32, check_len, f32_or_bf16, nonempty, CudaDevice};
use super::{matmul, Storage};
use crate::backend::Activation;
use crate::error::{Error, Result};

/// Images [B, C, H, W] with square patches of side P.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub p: usize,
}

impl Dims {
    /// G, the patches per image (a partial last row or column of pixels is dropped, as the CPU).
    pub fn patches(&self) -> usize {
        (self.h / self.p) * (self.w / self.p)
    }

    /// C·P·P, one patch's length.
    pub fn patch_len(&self) -> usize {
        self.c * self.p * self.p
    }
}

/// images (f32) → cols [B·G, C·P·P] in T (f32, or bf16 to feed a bf16 GEMM directly).
pub fn im2col<T: Storage>(
    dev: &CudaDevice,
    images: &CudaSlice<f32>,
    cols: &mut CudaSlice<T>,
    dims: Dims,
) -> Result<()> {
    let Dims { b, c, h, w, p } = dims;
    f32_or_bf16::<T>("im2col")?;
    if p == 0 {
        return Err(Error::Cuda("im2col: patch size 0".into()));
    }
    check_len("im2col images", images, b * c * h * w)?;
    let n = b * dims.patches() * dims.patch_len();
    check_len("im2col cols", cols, n)?;
    if n == 0 {
        return Ok(());
    }
    let [bi, ci, hi, wi, pi] = [
        as_i32("B", b)?,
        as_i32("C", c)?,
        as_i32("H", h)?,
        as_i32("W", w)?,
        as_i32("P", p)?,
    ];
    let name = format!("im2col_{}", T::NAME);
    let f = dev.function("patch_embed", &name)?;
    // SAFETY: images hold B·C·H·W values and cols B·G·C·P·P, checked above.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(n),
            [images, cols, &bi, &ci, &hi, &wi, &pi]
        )
    }?;
    Ok(())
}

/// tokens [B·G, D] = im2col(images) · weightᵀ + bias; weight [D, C·P·P] in T, bias [D] f32.
pub fn forward<T: Storage>(
    dev: &CudaDevice,
    images: &CudaSlice<f32>,
    weight: &CudaSlice<T>,
    bias: &CudaSlice<f32>,
    dims: Dims,
    d: usize,
) -> Result<CudaSlice<T>>
where
    CudaBlas: Gemm<T>,
{
    let rows = dims.b * dims.patches();
    let k = dims.patch_len();
    let mut cols = dev.zeros::<T>(rows * k)?;
    im2col(dev, images, &mut cols, dims)?;
    let mut out = dev.zeros::<T>(rows * d)?;
    matmul::linear(
        dev,
        &cols,
        weight,
        Some(bias),
        Activation::None,
        &mut out,
        (rows, k, d),
    )?;
    Ok(out)
}

/// The adjoint of `im2col`: dcols [B·G, C·P·P] (f32) → dimages [B, C, H, W] (f32), each pixel of
/// a whole patch from its one column entry, pixels past the last whole patch 0; as
/// `backend::cpu::patch_embed::col2im`.
pub fn col2im(dev: &CudaDevice, cols: &CudaSlice<f32>, dims: Dims) -> Result<CudaSlice<f32>> {
    let Dims { b, c, h, w, p } = dims;
    if p == 0 {
        return Err(Error::Cuda("col2im: patch size 0".into()));
    }
    check_len("col2im cols", cols, b * dims.patches() * dims.patch_len())?;
    let n = b * c * h * w;
    nonempty(&format!("col2im images [{b}, {c}, {h}, {w}]"), n)?;
    let mut images = dev.empty::<f32>(n)?;
    let [bi, ci, hi, wi, pi] = [
        as_i32("B", b)?,
        as_i32("C", c)?,
        as_i32("H", h)?,
        as_i32("W", w)?,
        as_i32("P", p)?,
    ];
    let f = dev.function("patch_embed", "col2im_f32")?;
    // SAFETY: cols hold B·G·C·P·P values and images B·C·H·W, checked above.
    unsafe {
        launch!(
            dev,
            f,
            "col2im_f32",
            dev.grid_stride(n),
            [cols, &mut images, &bi, &ci, &hi, &wi, &pi]
        )
    }?;
    Ok(images)
}

/// (dweight [D, C·P·P], dbias [D], dimages [B, C, H, W] when asked), all f32: what `backward`
/// returns.
pub type PatchEmbedGrads = (CudaSlice<f32>, CudaSlice<f32>, Option<CudaSlice<f32>>);

/// Gradients of `forward` from dy [B·G, D] (f32): (dweight [D, C·P·P], dbias [D], and with
/// `want_input` dimages [B, C, H, W]), all f32:
///   cols = im2col(images),  dweight = dyᵀ·cols,  dbias = Σ_rows dy,  dimages = col2im(dy·weight).
/// The GEMMs as `matmul::linear_backward` (bf16 operands with f32 accumulation for T = bf16).
pub fn backward<T: Storage>(
    dev: &CudaDevice,
    images: &CudaSlice<f32>,
    weight: &CudaSlice<T>,
    dy: &CudaSlice<f32>,
    dims: Dims,
    d: usize,
    want_input: bool,
) -> Result<PatchEmbedGrads> {
    if dims.p == 0 {
        return Err(Error::Cuda("patch embed backward: patch size 0".into()));
    }
    let rows = dims.b * dims.patches();
    let k = dims.patch_len();
    nonempty(
        &format!("patch embed backward ({rows} patches of {k} values, D = {d})"),
        rows * k * d,
    )?;
    check_len("patch embed backward dy", dy, rows * d)?;
    let mut cols = dev.empty::<T>(rows * k)?;
    im2col(dev, images, &mut cols, dims)?;
    let mut dw = dev.empty::<f32>(d * k)?;
    let mut db = dev.empty::<f32>(d)?;
    let mut dcols = want_input.then(|| dev.empty::<f32>(rows * k)).transpose()?;
    matmul::linear_backward_into(
        dev,
        &cols,
        weight,
        dy,
        dcols.as_mut(),
        &mut dw,
        Some(&mut db),
        false,
        (rows, k, d),
    )?;
    let dimages = dcols.map(|dc| col2im(dev, &dc, dims)).transpose()?;
    Ok((dw, db, dimages))
}
