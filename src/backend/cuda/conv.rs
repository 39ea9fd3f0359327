//! Launchers of kernels/conv.cu: 2-D convolution and pooling on NHWC activations, as the CPU ops
//! of src/backend/cpu/conv.rs (same geometry type `Conv`, same weight layout [Cout, kh, kw, Cin]).
//! A convolution takes an f32 map and returns one: im2col (`conv_im2col`, which writes the rows
//! as the GEMM operand type T; a 1×1 stride-1 convolution's input already is the im2col matrix,
//! cast to T where T is bf16) + one cuBLAS GEMM into an f32 accumulator (`matmul::gemm_rm`:
//! sgemm semantics at f32, bf16 operands with f32 accumulation at bf16) + `conv_epilogue`
//! (bias, residual, ReLU in f32). Every buffer is checked against the shape before a launch.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use super::device::{as_i32, check_len, f32_or_bf16, nonempty, CudaDevice};
use super::matmul::{data_type, gemm_rm, RowMajor};
use super::{ptr_mut_or_null, ptr_or_null, Storage};
use crate::backend::cpu::conv::{Conv, PoolPad};
use crate::error::{Error, Result};

/// images [B, C, H, W] (f32) → y [B, H, W, C] in T.
pub fn nchw_to_nhwc<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<T>,
    (b, c, h, w): (usize, usize, usize, usize),
) -> Result<()> {
    f32_or_bf16::<T>("nchw_to_nhwc")?;
    let n = b * c * h * w;
    check_len("nchw_to_nhwc input", x, n)?;
    check_len("nchw_to_nhwc output", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let [bi, ci, hwi] = [as_i32("B", b)?, as_i32("C", c)?, as_i32("H·W", h * w)?];
    let name = format!("nchw_to_nhwc_{}", T::NAME);
    let f = dev.function("conv", &name)?;
    // SAFETY: x and y hold B·C·H·W values, checked above.
    unsafe { launch!(dev, f, name, dev.grid_stride(n), [x, y, &bi, &ci, &hwi]) }
}

pub(crate) fn geometry_ok(what: &str, cv: &Conv, (h, w): (usize, usize)) -> Result<(usize, usize)> {
    if cv.k == 0 || cv.stride == 0 {
        return Err(Error::Cuda(format!(
            "{what}: kernel {} stride {}",
            cv.k, cv.stride
        )));
    }
    let (ho, wo) = (cv.out_size(h), cv.out_size(w));
    if ho == 0 || wo == 0 {
        return Err(Error::Cuda(format!(
            "{what}: a {0}×{0} kernel (padding {1}) does not fit a {h}×{w} input",
            cv.k, cv.pad
        )));
    }
    Ok((ho, wo))
}

/// x [B, H, W, Cin] (f32) → cols [B·Ho·Wo, kh·kw·Cin] in T (zero padding), in the weight's
/// column order.
pub fn im2col<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    cols: &mut CudaSlice<T>,
    (b, h, w): (usize, usize, usize),
    cv: &Conv,
) -> Result<()> {
    im2col_view(dev, &x.as_view(), &mut cols.as_view_mut(), (b, h, w), cv)
}

/// `im2col` on views: a batch-chunked convolution writes one chunk of images at a time.
pub(crate) fn im2col_view<T: Storage>(
    dev: &CudaDevice,
    x: &CudaView<f32>,
    cols: &mut CudaViewMut<T>,
    (b, h, w): (usize, usize, usize),
    cv: &Conv,
) -> Result<()> {
    f32_or_bf16::<T>("conv im2col")?;
    let (ho, wo) = geometry_ok("conv im2col", cv, (h, w))?;
    let n = b * ho * wo * cv.patch_len();
    for (what, len, want) in [
        ("input", x.len(), b * h * w * cv.cin),
        ("cols", cols.len(), n),
    ] {
        if len != want {
            return Err(Error::Cuda(format!(
                "conv im2col {what}: device buffer holds {len} elements, the shape needs {want}"
            )));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let args = [
        as_i32("B", b)?,
        as_i32("H", h)?,
        as_i32("W", w)?,
        as_i32("Cin", cv.cin)?,
        as_i32("k", cv.k)?,
        as_i32("stride", cv.stride)?,
        as_i32("pad", cv.pad)?,
        as_i32("Ho", ho)?,
        as_i32("Wo", wo)?,
    ];
    let [bi, hi, wi, ci, ki, si, pi, hoi, woi] = args;
    let name = format!("conv_im2col_{}", T::NAME);
    let f = dev.function("conv", &name)?;
    // SAFETY: x holds B·H·W·Cin values and cols B·Ho·Wo·k·k·Cin, checked above.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(n),
            [x, cols, &bi, &hi, &wi, &ci, &ki, &si, &pi, &hoi, &woi]
        )
    }
}

/// y [M, N] = act((acc + bias) + residual) stored as T; acc [M, N] f32, bias [N] f32.
#[allow(clippy::too_many_arguments)]
pub fn epilogue<T: Storage>(
    dev: &CudaDevice,
    acc: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    residual: Option<&CudaSlice<T>>,
    relu: bool,
    y: &mut CudaSlice<T>,
    (m, n): (usize, usize),
) -> Result<()> {
    f32_or_bf16::<T>("conv epilogue")?;
    check_len("conv epilogue accumulator", acc, m * n)?;
    check_len("conv epilogue output", y, m * n)?;
    if let Some(b) = bias {
        check_len("conv epilogue bias", b, n)?;
    }
    if let Some(r) = residual {
        check_len("conv epilogue residual", r, m * n)?;
    }
    if m * n == 0 {
        return Ok(());
    }
    let s = dev.stream();
    let (pb, pr) = (ptr_or_null(s, bias), ptr_or_null(s, residual));
    let [mi, ni, ri] = [as_i32("M", m)?, as_i32("N", n)?, i32::from(relu)];
    let name = format!("conv_epilogue_{}", T::NAME);
    let f = dev.function("conv", &name)?;
    // SAFETY: acc and y hold M·N values, bias N and the residual M·N where given (null else).
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(m * n),
            [acc, &pb, &pr, y, &mi, &ni, &ri]
        )
    }
}

/// The most bytes of im2col rows one convolution holds at once: a batch whose rows would need
/// more runs im2col and the GEMM over chunks of whole images (an image's output rows depend only
/// on its own rows), instead of one giant buffer. A GEMM's bits depend on its row count, so a
/// chunked batch agrees with the one-GEMM result to f32 rounding, not bit for bit; batches under
/// the limit run the one GEMM as before.
pub const MAX_COLS_BYTES: usize = 1 << 30;

/// y [B, Ho, Wo, Cout] = act(conv(x [B, H, W, Cin], w [Cout, kh, kw, Cin]) + bias + residual),
/// as `backend::cpu::conv::conv2d`: x, bias [Cout], the residual and y f32; the weight in T, the
/// GEMM operand type (the rows of x are rounded to T on the way in).
#[allow(clippy::too_many_arguments)]
pub fn conv2d<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    bhw: (usize, usize, usize),
    wt: &CudaSlice<T>,
    cv: &Conv,
    bias: Option<&CudaSlice<f32>>,
    residual: Option<&CudaSlice<f32>>,
    relu: bool,
) -> Result<CudaSlice<f32>> {
    conv2d_chunked(dev, x, bhw, wt, cv, bias, residual, relu, MAX_COLS_BYTES)
}

/// `conv2d` with im2col rows of at most `max_cols_bytes` at once (at least one image's).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_chunked<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    (b, h, w): (usize, usize, usize),
    wt: &CudaSlice<T>,
    cv: &Conv,
    bias: Option<&CudaSlice<f32>>,
    residual: Option<&CudaSlice<f32>>,
    relu: bool,
    max_cols_bytes: usize,
) -> Result<CudaSlice<f32>> {
    f32_or_bf16::<T>("conv2d")?;
    let (ho, wo) = geometry_ok("conv2d", cv, (h, w))?;
    check_len("conv2d input", x, b * h * w * cv.cin)?;
    check_len("conv2d weight", wt, cv.cout * cv.patch_len())?;
    let (rows, k, n) = (b * ho * wo, cv.patch_len(), cv.cout);
    nonempty(
        &format!("conv2d output [{b}, {ho}, {wo}, {}]", cv.cout),
        rows * n * k,
    )?;
    let s = dev.stream();
    let direct = cv.k == 1 && cv.stride == 1 && cv.pad == 0;
    let mut acc = dev.empty::<f32>(rows * n)?;
    let rm = |ptr, trans| RowMajor {
        ptr,
        ty: data_type::<T>(),
        ld: k,
        stride: 0,
        trans,
    };
    let w_ptr = ptr_or_null(s, Some(wt));
    let acc_ptr = ptr_mut_or_null(s, Some(&mut acc));
    // acc[r0.., Cout] = left[r, K] · w[Cout, K]ᵀ for the `r` rows from row r0.
    // SAFETY (of each call): `left` is [r, K] of T, w [Cout, K], and rows r0..r0 + r of acc
    // [rows, Cout] lie inside it (r0 + r ≤ rows), all checked or allocated here.
    let gemm = |left: u64, r0: usize, r: usize| unsafe {
        gemm_rm(
            dev,
            "conv2d",
            (r, n, k),
            1.0,
            rm(left, false),
            rm(w_ptr, true),
            0.0,
            (acc_ptr + (r0 * n * std::mem::size_of::<f32>()) as u64, n, 0),
            1,
        )
    };
    if direct {
        // x itself is the GEMM's left operand [rows, K] (cast to T where T is not f32).
        if T::NAME == "f32" {
            gemm(ptr_or_null(s, Some(x)), 0, rows)?;
        } else {
            let mut cols = dev.empty::<T>(rows * k)?;
            super::elementwise::cast(dev, x, &mut cols)?;
            gemm(ptr_or_null(s, Some(&cols)), 0, rows)?;
        }
    } else {
        let per_image = ho * wo * k;
        let chunk = (max_cols_bytes / (per_image * std::mem::size_of::<T>()).max(1)).clamp(1, b);
        let mut cols = dev.empty::<T>(chunk * per_image)?;
        let image = h * w * cv.cin;
        for i0 in (0..b).step_by(chunk) {
            let bc = chunk.min(b - i0);
            let xin = x.slice(i0 * image..(i0 + bc) * image);
            im2col_view(
                dev,
                &xin,
                &mut cols.slice_mut(0..bc * per_image),
                (bc, h, w),
                cv,
            )?;
            gemm(ptr_or_null(s, Some(&cols)), i0 * ho * wo, bc * ho * wo)?;
        }
    }
    let mut y = dev.empty::<f32>(rows * n)?;
    epilogue(dev, &acc, bias, residual, relu, &mut y, (rows, n))?;
    Ok(y)
}

/// Max pooling of x [B, H, W, C]: window k, stride s, padding p → [B, Ho, Wo, C] in `y`.
#[allow(clippy::too_many_arguments)]
pub fn max_pool<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<T>,
    (b, h, w, c): (usize, usize, usize, usize),
    (k, s, p): (usize, usize, usize),
    pad: PoolPad,
) -> Result<()> {
    f32_or_bf16::<T>("max_pool")?;
    let cv = Conv {
        cin: c,
        cout: c,
        k,
        stride: s,
        pad: p,
    };
    let (ho, wo) = geometry_ok("max_pool", &cv, (h, w))?;
    check_len("max_pool input", x, b * h * w * c)?;
    let n = b * ho * wo * c;
    check_len("max_pool output", y, n)?;
    if n == 0 {
        return Ok(());
    }
    let args = [
        as_i32("B", b)?,
        as_i32("H", h)?,
        as_i32("W", w)?,
        as_i32("C", c)?,
        as_i32("k", k)?,
        as_i32("stride", s)?,
        as_i32("pad", p)?,
        as_i32("Ho", ho)?,
        as_i32("Wo", wo)?,
        i32::from(pad == PoolPad::Zero),
    ];
    let [bi, hi, wi, ci, ki, si, pi, hoi, woi, zi] = args;
    let name = format!("max_pool_{}", T::NAME);
    let f = dev.function("conv", &name)?;
    // SAFETY: x holds B·H·W·C values and y B·Ho·Wo·C, checked above.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(n),
            [x, y, &bi, &hi, &wi, &ci, &ki, &si, &pi, &hoi, &woi, &zi]
        )
    }
}

/// Global average pooling: x [B, H·W, C] (T) → y [B, C] (f32).
pub fn mean_hw<T: Storage>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<f32>,
    (b, hw, c): (usize, usize, usize),
) -> Result<()> {
    f32_or_bf16::<T>("mean_hw")?;
    check_len("mean_hw input", x, b * hw * c)?;
    check_len("mean_hw output", y, b * c)?;
    if hw == 0 {
        return Err(Error::Cuda("mean_hw: an empty map (H·W = 0)".into()));
    }
    if b * c == 0 {
        return Ok(());
    }
    let [bi, hwi, ci] = [as_i32("B", b)?, as_i32("H·W", hw)?, as_i32("C", c)?];
    let name = format!("mean_hw_{}", T::NAME);
    let f = dev.function("conv", &name)?;
    // SAFETY: x holds B·H·W·C values and y B·C, checked above.
    unsafe { launch!(dev, f, name, dev.grid_stride(b * c), [x, y, &bi, &hwi, &ci]) }
}
