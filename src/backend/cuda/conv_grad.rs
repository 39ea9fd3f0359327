//! Launchers of kernels/conv_grad.cu: the backward of the convolutional ops and BatchNorm in
//! training mode on NHWC f32 maps, as the CPU ops of src/backend/cpu/conv_grad.rs (same names,
//! same math, same tie rules), plus the SGD-with-momentum step of MODE's ResNet training
//! (`sgd_update` in src/train/mode.rs). Every sum runs in a fixed order, no float atomics: a repeat
//! gives the same bits. Every buffer is checked against the shape before a launch.
//!
//! `conv2d_backward` is im2col (conv.cu) + two cuBLAS GEMMs (dw = dyᵀ·cols, dcols = dy·w) + a
//! gathering col2im; a 1×1 stride-1 convolution is a plain linear layer (`matmul::
//! linear_backward`). A batch whose im2col rows would pass `conv::MAX_COLS_BYTES` runs over chunks
//! of whole images, dw accumulated over the chunks by the GEMM (beta = 1).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::conv::{geometry_ok, im2col_view, MAX_COLS_BYTES};
use super::device::{as_i32, check_len, nonempty, CudaDevice};
use super::matmul::{data_type, gemm_rm, linear_backward, RowMajor};
use super::{ptr_mut_or_null, ptr_or_null};
use crate::backend::cpu::conv::Conv;
use crate::error::{Error, Result};

/// What `batch_norm_backward` needs from `batch_norm_train` (as the CPU's `BatchNormSaved`).
pub struct BatchNormSaved {
    /// x̂ [rows, C]
    pub xhat: CudaSlice<f32>,
    /// 1/√(var + eps) [C]
    pub rstd: CudaSlice<f32>,
}

/// Rows of x [rows, C], refusing a C that does not divide the length or an empty map.
fn rows_of(what: &str, len: usize, c: usize) -> Result<usize> {
    if c == 0 || len % c != 0 {
        return Err(Error::Cuda(format!(
            "{what}: {len} values are not whole rows of C = {c} channels"
        )));
    }
    nonempty(what, len)?;
    Ok(len / c)
}

/// Rows per chunk of the channel sums: at least 256, at most 1024 chunks. Depends on the row
/// count only, so a shape always sums in the same order.
fn chunk_rows(rows: usize) -> usize {
    256.max(rows.div_ceil(1024))
}

/// part1 (and part2 for what = 2) [P, C] f64: the channel sums of `batch_norm_sum_part` over
/// chunks of `chunk_rows(rows)` rows. a (and b) hold rows·C values, `mean` C where what = 1.
#[allow(clippy::too_many_arguments)]
fn channel_sum_parts(
    dev: &CudaDevice,
    a: &CudaSlice<f32>,
    b: Option<&CudaSlice<f32>>,
    mean: Option<&CudaSlice<f64>>,
    what: i32,
    (rows, c): (usize, usize),
    part1: &mut CudaSlice<f64>,
    part2: Option<&mut CudaSlice<f64>>,
) -> Result<()> {
    let r = chunk_rows(rows);
    let p = rows.div_ceil(r);
    let s = dev.stream();
    let (pb, pm, p2) = (
        ptr_or_null(s, b),
        ptr_or_null(s, mean),
        ptr_mut_or_null(s, part2),
    );
    let [ri, ci, chunk] = [as_i32("rows", rows)?, as_i32("C", c)?, as_i32("R", r)?];
    let cfg = LaunchConfig {
        grid_dim: (c.div_ceil(32) as u32, p as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = "batch_norm_sum_part";
    let f = dev.function("conv_grad", name)?;
    // SAFETY: a (and b where read, what = 2) hold rows·C values, mean C (what = 1), part1 and
    // part2 (what = 2) ceil(rows/R)·C: the callers allocate them so; null pointers are not read.
    unsafe {
        launch!(
            dev,
            f,
            name,
            cfg,
            [a, &pb, &pm, &what, &ri, &ci, &chunk, part1, &p2]
        )
    }
}

/// torch.nn.BatchNorm2d's training forward on x [rows, C] (rows = B·H·W), as
/// `cpu::conv_grad::batch_norm_train`: per-channel mean and biased variance (sums in f64, two
/// passes), y = γ·x̂ + β; the running statistics move by `momentum` towards the batch mean and
/// the unbiased variance. Returns y and what the backward needs.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    c: usize,
    (gamma, beta): (&CudaSlice<f32>, &CudaSlice<f32>),
    (running_mean, running_var): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
    momentum: f32,
    eps: f32,
) -> Result<(CudaSlice<f32>, BatchNormSaved)> {
    let rows = rows_of("batch_norm_train input", x.len(), c)?;
    check_len("batch_norm_train gamma", gamma, c)?;
    check_len("batch_norm_train beta", beta, c)?;
    check_len("batch_norm_train running mean", running_mean, c)?;
    check_len("batch_norm_train running var", running_var, c)?;
    let p = rows.div_ceil(chunk_rows(rows));
    let mut part = dev.empty::<f64>(p * c)?;
    let mut mean = dev.empty::<f64>(c)?;
    channel_sum_parts(dev, x, None, None, 0, (rows, c), &mut part, None)?;
    let [pi, ci, ri] = [as_i32("chunks", p)?, as_i32("C", c)?, as_i32("rows", rows)?];
    let f = dev.function("conv_grad", "batch_norm_mean_finish")?;
    // SAFETY: part holds P·C values, mean C.
    unsafe {
        launch!(
            dev,
            f,
            "batch_norm_mean_finish",
            dev.grid_stride(c),
            [&part, &pi, &ci, &ri, &mut mean]
        )
    }?;
    channel_sum_parts(dev, x, None, Some(&mean), 1, (rows, c), &mut part, None)?;
    let mut rstd = dev.empty::<f32>(c)?;
    let mut mean32 = dev.empty::<f32>(c)?;
    let f = dev.function("conv_grad", "batch_norm_var_finish")?;
    // SAFETY: part holds P·C values; mean, rstd, mean32 and the running statistics C each.
    unsafe {
        launch!(
            dev,
            f,
            "batch_norm_var_finish",
            dev.grid_stride(c),
            [
                &part,
                &pi,
                &ci,
                &ri,
                &mean,
                &momentum,
                &eps,
                &mut rstd,
                &mut mean32,
                running_mean,
                running_var
            ]
        )
    }?;
    let n = x.len();
    let mut xhat = dev.empty::<f32>(n)?;
    let mut y = dev.empty::<f32>(n)?;
    let ni = n as i64;
    let f = dev.function("conv_grad", "batch_norm_fwd_apply")?;
    // SAFETY: x, xhat and y hold rows·C values; mean32, rstd, gamma and beta C.
    unsafe {
        launch!(
            dev,
            f,
            "batch_norm_fwd_apply",
            dev.grid_stride(n),
            [x, &mean32, &rstd, gamma, beta, &mut xhat, &mut y, &ni, &ci]
        )
    }?;
    Ok((y, BatchNormSaved { xhat, rstd }))
}

/// Gradients (dx, dγ, dβ) of `batch_norm_train` given dy [rows, C], as
/// `cpu::conv_grad::batch_norm_backward`: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·γ,
/// dγ = Σ dy·x̂, dβ = Σ dy (channel sums in f64).
pub fn batch_norm_backward(
    dev: &CudaDevice,
    dy: &CudaSlice<f32>,
    c: usize,
    gamma: &CudaSlice<f32>,
    saved: &BatchNormSaved,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    let rows = rows_of("batch_norm_backward dy", dy.len(), c)?;
    check_len("batch_norm_backward gamma", gamma, c)?;
    check_len("batch_norm_backward saved x̂", &saved.xhat, rows * c)?;
    check_len("batch_norm_backward saved rstd", &saved.rstd, c)?;
    let p = rows.div_ceil(chunk_rows(rows));
    let mut part_dy = dev.empty::<f64>(p * c)?;
    let mut part_dyx = dev.empty::<f64>(p * c)?;
    channel_sum_parts(
        dev,
        dy,
        Some(&saved.xhat),
        None,
        2,
        (rows, c),
        &mut part_dy,
        Some(&mut part_dyx),
    )?;
    let [pi, ci, ri] = [as_i32("chunks", p)?, as_i32("C", c)?, as_i32("rows", rows)?];
    let mut dgamma = dev.empty::<f32>(c)?;
    let mut dbeta = dev.empty::<f32>(c)?;
    let mut mean_g = dev.empty::<f32>(c)?;
    let mut mean_gx = dev.empty::<f32>(c)?;
    let f = dev.function("conv_grad", "batch_norm_bwd_finish")?;
    // SAFETY: the parts hold P·C values; gamma and the four outputs C each.
    unsafe {
        launch!(
            dev,
            f,
            "batch_norm_bwd_finish",
            dev.grid_stride(c),
            [
                &part_dy,
                &part_dyx,
                &pi,
                &ci,
                &ri,
                gamma,
                &mut dgamma,
                &mut dbeta,
                &mut mean_g,
                &mut mean_gx
            ]
        )
    }?;
    let n = dy.len();
    let mut dx = dev.empty::<f32>(n)?;
    let ni = n as i64;
    let f = dev.function("conv_grad", "batch_norm_bwd_apply")?;
    // SAFETY: dy, x̂ and dx hold rows·C values; gamma, rstd, mean_g and mean_gx C.
    unsafe {
        launch!(
            dev,
            f,
            "batch_norm_bwd_apply",
            dev.grid_stride(n),
            [
                dy,
                &saved.xhat,
                gamma,
                &saved.rstd,
                &mean_g,
                &mean_gx,
                &mut dx,
                &ni,
                &ci
            ]
        )
    }?;
    Ok((dx, dgamma, dbeta))
}

/// x = max(x, 0) in place (a NaN becomes 0, as `f32::max` on the CPU).
pub fn relu(dev: &CudaDevice, x: &mut CudaSlice<f32>) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let ni = n as i64;
    let f = dev.function("conv_grad", "relu_f32")?;
    // SAFETY: x holds n values.
    unsafe { launch!(dev, f, "relu_f32", dev.grid_stride(n), [x, &ni]) }
}

/// dx = dy where the ReLU's output y > 0, else 0 (as `cpu::conv_grad::relu_backward`).
pub fn relu_backward(
    dev: &CudaDevice,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
) -> Result<CudaSlice<f32>> {
    let n = y.len();
    check_len("relu_backward dy", dy, n)?;
    nonempty("relu_backward", n)?;
    let mut dx = dev.empty::<f32>(n)?;
    let ni = n as i64;
    let f = dev.function("conv_grad", "relu_backward_f32")?;
    // SAFETY: y, dy and dx hold n values.
    unsafe {
        launch!(
            dev,
            f,
            "relu_backward_f32",
            dev.grid_stride(n),
            [y, dy, &mut dx, &ni]
        )
    }?;
    Ok(dx)
}

/// Gradient of `conv::max_pool(x, (b, h, w, c), (k, s, p), NegInf)` given dy [B, Ho, Wo, C], as
/// `cpu::conv_grad::max_pool_backward`: each window's gradient goes to its first maximum in
/// row-major window order (a NaN takes over); computed as a gather, each input element summing
/// the windows that chose it in (oy, ox) order, so the CPU's bits and no atomics.
pub fn max_pool_backward(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    (b, h, w, c): (usize, usize, usize, usize),
    (k, s, p): (usize, usize, usize),
    dy: &CudaSlice<f32>,
) -> Result<CudaSlice<f32>> {
    let cv = Conv {
        cin: c,
        cout: c,
        k,
        stride: s,
        pad: p,
    };
    let (ho, wo) = geometry_ok("max_pool_backward", &cv, (h, w))?;
    let n = b * h * w * c;
    check_len("max_pool_backward input", x, n)?;
    check_len("max_pool_backward dy", dy, b * ho * wo * c)?;
    nonempty("max_pool_backward", n)?;
    let mut dx = dev.empty::<f32>(n)?;
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
    ];
    let [bi, hi, wi, ci, ki, si, pi, hoi, woi] = args;
    let f = dev.function("conv_grad", "max_pool_backward_f32")?;
    // SAFETY: x and dx hold B·H·W·C values, dy B·Ho·Wo·C, checked above.
    unsafe {
        launch!(
            dev,
            f,
            "max_pool_backward_f32",
            dev.grid_stride(n),
            [x, dy, &mut dx, &bi, &hi, &wi, &ci, &ki, &si, &pi, &hoi, &woi]
        )
    }?;
    Ok(dx)
}

/// Gradient of global average pooling given dy [B, C]: dx [B, H, W, C] = dy/(H·W), as
/// `cpu::conv_grad::mean_hw_backward` (the same f32 scale, so the same bits).
pub fn mean_hw_backward(
    dev: &CudaDevice,
    dy: &CudaSlice<f32>,
    (b, h, w, c): (usize, usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    check_len("mean_hw_backward dy", dy, b * c)?;
    let n = b * h * w * c;
    nonempty("mean_hw_backward", n)?;
    let scale = 1.0 / (h * w) as f32;
    let [bi, hwi, ci] = [as_i32("B", b)?, as_i32("H·W", h * w)?, as_i32("C", c)?];
    let mut dx = dev.empty::<f32>(n)?;
    let f = dev.function("conv_grad", "mean_hw_backward_f32")?;
    // SAFETY: dy holds B·C values and dx B·H·W·C.
    unsafe {
        launch!(
            dev,
            f,
            "mean_hw_backward_f32",
            dev.grid_stride(n),
            [dy, &mut dx, &bi, &hwi, &ci, &scale]
        )
    }?;
    Ok(dx)
}

/// Gradients (dx [B, H, W, Ci], dw [Co, kh, kw, Ci]) of y = conv2d(x, w) (no epilogue: a ReLU,
/// BatchNorm or residual has its own backward) for x [B, H, W, Ci], w [Co, kh, kw, Ci] and dy
/// [B, Ho, Wo, Co], all f32, as `cpu::conv_grad::conv2d_backward`'s first two outputs. The bias
/// gradient is not computed (a ResNet's convolutions have none: BatchNorm follows); where one is
/// needed it is `elementwise::sum_rows_into` over dy [B·Ho·Wo, Co], which gives the CPU's bits.
pub fn conv2d_backward(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    bhw: (usize, usize, usize),
    wt: &CudaSlice<f32>,
    cv: &Conv,
    dy: &CudaSlice<f32>,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    conv2d_backward_chunked(dev, x, bhw, wt, cv, dy, MAX_COLS_BYTES)
}

/// `conv2d_backward` with im2col rows of at most `max_cols_bytes` at once (at least one image's):
/// over each chunk of images, cols = im2col(x), dw += dyᵀ·cols, dcols = dy·w, dx = col2im(dcols).
/// A chunked batch agrees with the one-chunk result to f32 rounding (dw sums in another order),
/// not bit for bit; each is the same on every run.
pub fn conv2d_backward_chunked(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    (b, h, w): (usize, usize, usize),
    wt: &CudaSlice<f32>,
    cv: &Conv,
    dy: &CudaSlice<f32>,
    max_cols_bytes: usize,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let (ho, wo) = geometry_ok("conv2d_backward", cv, (h, w))?;
    let (rows, plen, co) = (b * ho * wo, cv.patch_len(), cv.cout);
    check_len("conv2d_backward input", x, b * h * w * cv.cin)?;
    check_len("conv2d_backward weight", wt, co * plen)?;
    check_len("conv2d_backward dy", dy, rows * co)?;
    nonempty(
        &format!("conv2d_backward [{b}, {h}, {w}, {}] → {co}", cv.cin),
        rows * plen * co,
    )?;
    if cv.k == 1 && cv.stride == 1 && cv.pad == 0 {
        // The im2col of a pointwise convolution is x itself: a linear layer's backward.
        let (dx, dw, _) = linear_backward(dev, x, wt, dy, false, (rows, cv.cin, co))?;
        return Ok((dx, dw));
    }
    let f32_size = std::mem::size_of::<f32>();
    let per_image = ho * wo * plen;
    let chunk = (max_cols_bytes / (per_image * f32_size).max(1)).clamp(1, b);
    let mut cols = dev.empty::<f32>(chunk * per_image)?;
    let mut dcols = dev.empty::<f32>(chunk * per_image)?;
    let mut dx = dev.empty::<f32>(x.len())?;
    let mut dw = dev.empty::<f32>(co * plen)?;
    let s = dev.stream().clone();
    let rm = |ptr, ld, trans| RowMajor {
        ptr,
        ty: data_type::<f32>(),
        ld,
        stride: 0,
        trans,
    };
    let (pw, pdy) = (ptr_or_null(&s, Some(wt)), ptr_or_null(&s, Some(dy)));
    let (pcols, pdcols) = (
        ptr_or_null(&s, Some(&cols)),
        ptr_mut_or_null(&s, Some(&mut dcols)),
    );
    let pdw = ptr_mut_or_null(&s, Some(&mut dw));
    let image = h * w * cv.cin;
    let args = [
        as_i32("H", h)?,
        as_i32("W", w)?,
        as_i32("Cin", cv.cin)?,
        as_i32("k", cv.k)?,
        as_i32("stride", cv.stride)?,
        as_i32("pad", cv.pad)?,
        as_i32("Ho", ho)?,
        as_i32("Wo", wo)?,
    ];
    let [hi, wi, ci, ki, si, pi, hoi, woi] = args;
    let col2im = dev.function("conv_grad", "conv_col2im_f32")?;
    for i0 in (0..b).step_by(chunk) {
        let bc = chunk.min(b - i0);
        let (r0, r) = (i0 * ho * wo, bc * ho * wo);
        im2col_view(
            dev,
            &x.slice(i0 * image..(i0 + bc) * image),
            &mut cols.slice_mut(0..bc * per_image),
            (bc, h, w),
            cv,
        )?;
        let pdy_chunk = pdy + (r0 * co * f32_size) as u64;
        // SAFETY (both GEMMs): dy rows r0..r0 + r of [rows, Co] lie inside dy; cols and dcols
        // hold at least r·plen values, w and dw Co·plen, all checked or allocated above.
        unsafe {
            // dw [Co, plen] (+)= dy_chunkᵀ [Co, r] · cols [r, plen]
            gemm_rm(
                dev,
                "conv2d_backward dw = dyᵀ·cols",
                (co, plen, r),
                1.0,
                rm(pdy_chunk, co, true),
                rm(pcols, plen, false),
                if i0 == 0 { 0.0 } else { 1.0 },
                (pdw, plen, 0),
                1,
            )?;
            // dcols [r, plen] = dy_chunk [r, Co] · w [Co, plen]
            gemm_rm(
                dev,
                "conv2d_backward dcols = dy·w",
                (r, plen, co),
                1.0,
                rm(pdy_chunk, co, false),
                rm(pw, plen, false),
                0.0,
                (pdcols, plen, 0),
                1,
            )?;
        }
        let n = bc * image;
        let bci = as_i32("B", bc)?;
        let dcols_chunk = dcols.slice(0..bc * per_image);
        let mut dx_chunk = dx.slice_mut(i0 * image..(i0 + bc) * image);
        // SAFETY: dcols_chunk holds bc·Ho·Wo·k·k·Cin values and dx_chunk bc·H·W·Cin.
        unsafe {
            launch!(
                dev,
                col2im,
                "conv_col2im_f32",
                dev.grid_stride(n),
                [
                    &dcols_chunk,
                    &mut dx_chunk,
                    &bci,
                    &hi,
                    &wi,
                    &ci,
                    &ki,
                    &si,
                    &pi,
                    &hoi,
                    &woi
                ]
            )
        }?;
    }
    Ok((dx, dw))
}

/// One step of SGD with momentum and L2 weight decay on w in place, with its momentum buffer, as
/// `sgd_update` in src/train/mode.rs (torch.optim.SGD, dampening 0, no Nesterov; a buffer of
/// zeros makes the first step buf = d): d = g + wd·w, buf = μ·buf + d, w −= lr·buf, each
/// operation rounded on its own (the CPU's bits).
pub fn sgd_momentum(
    dev: &CudaDevice,
    w: &mut CudaSlice<f32>,
    g: &CudaSlice<f32>,
    buf: &mut CudaSlice<f32>,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
) -> Result<()> {
    let n = w.len();
    check_len("sgd_momentum gradient", g, n)?;
    check_len("sgd_momentum buffer", buf, n)?;
    if n == 0 {
        return Ok(());
    }
    let ni = n as i64;
    let f = dev.function("conv_grad", "sgd_momentum_f32")?;
    // SAFETY: w, g and buf hold n values.
    unsafe {
        launch!(
            dev,
            f,
            "sgd_momentum_f32",
            dev.grid_stride(n),
            [w, g, buf, &ni, &lr, &momentum, &weight_decay]
        )
    }
}
