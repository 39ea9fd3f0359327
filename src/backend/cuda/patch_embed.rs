//! Launchers of kernels/patch_embed.cu: Conv2d(C→D, kernel P, stride P) as im2col + cuBLAS GEMM,
//! as `backend::patch_embed` (src/backend/cpu/patch_embed.rs): images [B, C, H, W] (f32) →
//! cols [B·G, C·P·P] → tokens [B·G, D] through the conv weight [D, C·P·P] (its [D, C, P, P]
//! storage read flat) and bias [D].

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
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
    if T::NAME == "f16" {
        return Err(Error::Cuda("im2col: f32 or bf16 only".into()));
    }
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
