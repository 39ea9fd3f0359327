//! The backward of the convolutional ops (conv.rs), and batch normalisation in training mode, on
//! NHWC activations [B, H, W, C], for training ResNets (MODE's supervised-contrastive recipe):
//!   conv2d_backward:     y = conv(x, w) + bias given dy [B, Ho, Wo, Co]:
//!                        dw [Co, kh, kw, Ci] = dyᵀ · im2col(x),  dbias = Σ_rows dy,
//!                        dx = col2im(dy · w): each im2col entry's gradient added back to the pixel
//!                        it was copied from (windows overlap when stride < k; padding drops out).
//!   batch_norm_train:    torch.nn.BatchNorm2d in training mode: per channel over the B·H·W rows,
//!                        mean, biased variance var, x̂ = (x − mean)·rstd, rstd = 1/√(var + eps),
//!                        y = γ·x̂ + β; the running statistics move by `momentum` towards the
//!                        batch's mean and its unbiased variance (var·n/(n − 1)).
//!   batch_norm_backward: g = dy·γ;  dx = rstd·(g − mean(g) − x̂·mean(g·x̂));
//!                        dγ = Σ dy·x̂,  dβ = Σ dy   (sums over the B·H·W rows)
//!   relu_backward:       dx = dy where y > 0, else 0 (y the ReLU's output)
//!   max_pool_backward:   each output's gradient goes to the first maximum of its window in
//!                        row-major window order (PyTorch's tie rule); padded taps never win.
//!   mean_hw_backward:    dx[b, y, x, c] = dy[b, c] / (H·W)
//! Channel statistics are summed in f64, so their value does not depend on the thread count.

use rayon::prelude::*;

use super::conv::{im2col, Conv};
use super::matmul;

/// Gradients (dx, dw, dbias) of y = conv2d(x, w) + bias (no epilogue activation: a ReLU or a
/// residual has its own backward) for x [B, H, W, Ci], w [Co, kh, kw, Ci], dy [B, Ho, Wo, Co].
pub fn conv2d_backward(
    x: &[f32],
    (b, h, w): (usize, usize, usize),
    wt: &[f32],
    cv: &Conv,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (ho, wo) = (cv.out_size(h), cv.out_size(w));
    let (rows, plen) = (b * ho * wo, cv.patch_len());
    assert_eq!(x.len(), b * h * w * cv.cin, "conv2d_backward input");
    assert_eq!(wt.len(), cv.cout * plen, "conv2d_backward weight");
    assert_eq!(dy.len(), rows * cv.cout, "conv2d_backward dy");
    if cv.k == 1 && cv.stride == 1 && cv.pad == 0 {
        // The im2col of a pointwise convolution is x itself.
        return matmul::linear_backward(x, wt, dy, rows, cv.cin, cv.cout);
    }
    let mut cols = vec![0.0f32; rows * plen];
    im2col(x, (h, w), cv, 0..b, &mut cols);
    let (dcols, dw, db) = matmul::linear_backward(&cols, wt, dy, rows, plen, cv.cout);
    (col2im(&dcols, (b, h, w), cv), dw, db)
}

/// The adjoint of im2col: dcols [B·Ho·Wo, kh·kw·Ci] → dx [B, H, W, Ci], overlapping taps added in
/// row order (one image per task, so the order does not depend on the thread count).
fn col2im(dcols: &[f32], (b, h, w): (usize, usize, usize), cv: &Conv) -> Vec<f32> {
    let (ho, wo) = (cv.out_size(h), cv.out_size(w));
    let (cin, k, plen) = (cv.cin, cv.k, cv.patch_len());
    let mut dx = vec![0.0f32; b * h * w * cin];
    dx.par_chunks_mut(h * w * cin)
        .enumerate()
        .for_each(|(bi, img)| {
            for oy in 0..ho {
                for ox in 0..wo {
                    let row = &dcols[((bi * ho + oy) * wo + ox) * plen..][..plen];
                    for i in 0..k {
                        let iy = (oy * cv.stride + i) as isize - cv.pad as isize;
                        if iy < 0 || iy as usize >= h {
                            continue;
                        }
                        for j in 0..k {
                            let ix = (ox * cv.stride + j) as isize - cv.pad as isize;
                            if ix < 0 || ix as usize >= w {
                                continue;
                            }
                            let dst = &mut img[(iy as usize * w + ix as usize) * cin..][..cin];
                            let src = &row[(i * k + j) * cin..][..cin];
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                        }
                    }
                }
            }
        });
    dx
}

/// What batch normalisation's backward needs from its training forward.
pub struct BatchNormSaved {
    /// x̂ [rows, C]
    pub xhat: Vec<f32>,
    /// 1/√(var + eps) [C]
    pub rstd: Vec<f32>,
}

/// Per-channel (Σ, Σ of squared deviations from the mean) over the rows of x [rows, C], in f64.
fn channel_moments(x: &[f32], c: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = x.len() / c.max(1);
    let mut mean = vec![0.0f64; c];
    for r in x.chunks_exact(c) {
        mean.iter_mut().zip(r).for_each(|(m, v)| *m += *v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= rows.max(1) as f64);
    let mut ss = vec![0.0f64; c];
    for r in x.chunks_exact(c) {
        ss.iter_mut()
            .zip(r)
            .zip(&mean)
            .for_each(|((s, v), m)| *s += (*v as f64 - m).powi(2));
    }
    (mean, ss)
}

/// torch.nn.BatchNorm2d's training forward on x [rows, C] (rows = B·H·W): returns y, and updates
/// `running` = (mean, var) in place with `momentum` (torch's default 0.1).
pub fn batch_norm_train(
    x: &[f32],
    c: usize,
    (gamma, beta): (&[f32], &[f32]),
    running: (&mut [f32], &mut [f32]),
    momentum: f32,
    eps: f32,
) -> (Vec<f32>, BatchNormSaved) {
    assert!(c > 0 && x.len() % c == 0, "batch_norm_train input");
    assert!(
        gamma.len() == c && beta.len() == c,
        "batch_norm_train affine"
    );
    let rows = x.len() / c;
    let (mean, ss) = channel_moments(x, c);
    let rstd: Vec<f32> = ss
        .iter()
        .map(|s| (1.0 / (s / rows as f64 + eps as f64).sqrt()) as f32)
        .collect();
    let (run_mean, run_var) = running;
    let unbiased = (rows as f64 - 1.0).max(1.0);
    for ch in 0..c {
        let m = momentum as f64;
        run_mean[ch] = ((1.0 - m) * run_mean[ch] as f64 + m * mean[ch]) as f32;
        run_var[ch] = ((1.0 - m) * run_var[ch] as f64 + m * ss[ch] / unbiased) as f32;
    }
    let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let mut xhat = vec![0.0f32; x.len()];
    let mut y = vec![0.0f32; x.len()];
    xhat.par_chunks_mut(c * 64)
        .zip(y.par_chunks_mut(c * 64))
        .zip(x.par_chunks(c * 64))
        .for_each(|((xh, yo), xi)| {
            for ((xh, yo), xi) in xh
                .chunks_exact_mut(c)
                .zip(yo.chunks_exact_mut(c))
                .zip(xi.chunks_exact(c))
            {
                for ch in 0..c {
                    xh[ch] = (xi[ch] - mean32[ch]) * rstd[ch];
                    yo[ch] = xh[ch] * gamma[ch] + beta[ch];
                }
            }
        });
    (y, BatchNormSaved { xhat, rstd })
}

/// Gradients (dx, dγ, dβ) of `batch_norm_train` given dy [rows, C].
pub fn batch_norm_backward(
    dy: &[f32],
    c: usize,
    gamma: &[f32],
    saved: &BatchNormSaved,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(dy.len(), saved.xhat.len(), "batch_norm_backward dy");
    let rows = (dy.len() / c.max(1)).max(1) as f64;
    let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (g, xh) in dy.chunks_exact(c).zip(saved.xhat.chunks_exact(c)) {
        for ch in 0..c {
            sum_dy[ch] += g[ch] as f64;
            sum_dy_xhat[ch] += g[ch] as f64 * xh[ch] as f64;
        }
    }
    // With g = dy·γ: mean(g) = γ·Σdy/n and mean(g·x̂) = γ·Σ(dy·x̂)/n.
    let mean_g: Vec<f32> = (0..c)
        .map(|ch| (gamma[ch] as f64 * sum_dy[ch] / rows) as f32)
        .collect();
    let mean_gx: Vec<f32> = (0..c)
        .map(|ch| (gamma[ch] as f64 * sum_dy_xhat[ch] / rows) as f32)
        .collect();
    let mut dx = vec![0.0f32; dy.len()];
    dx.par_chunks_mut(c * 64)
        .zip(dy.par_chunks(c * 64))
        .zip(saved.xhat.par_chunks(c * 64))
        .for_each(|((dx, dy), xh)| {
            for ((dx, dy), xh) in dx
                .chunks_exact_mut(c)
                .zip(dy.chunks_exact(c))
                .zip(xh.chunks_exact(c))
            {
                for ch in 0..c {
                    let g = dy[ch] * gamma[ch];
                    dx[ch] = saved.rstd[ch] * (g - mean_g[ch] - xh[ch] * mean_gx[ch]);
                }
            }
        });
    let to32 = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect();
    (dx, to32(sum_dy_xhat), to32(sum_dy))
}

/// dx = dy where the ReLU's output y > 0, else 0.
pub fn relu_backward(y: &[f32], dy: &[f32]) -> Vec<f32> {
    assert_eq!(y.len(), dy.len(), "relu_backward");
    y.par_iter()
        .zip(dy)
        .map(|(&y, &g)| if y > 0.0 { g } else { 0.0 })
        .collect()
}

/// Gradient of `conv::max_pool(x, (b, h, w, c), k, s, p)` given dy [B, Ho, Wo, C].
pub fn max_pool_backward(
    x: &[f32],
    (b, h, w, c): (usize, usize, usize, usize),
    (k, s, p): (usize, usize, usize),
    dy: &[f32],
) -> Vec<f32> {
    let size = |n: usize| (n + 2 * p).saturating_sub(k) / s + 1;
    let (ho, wo) = (size(h), size(w));
    assert_eq!(x.len(), b * h * w * c, "max_pool_backward input");
    assert_eq!(dy.len(), b * ho * wo * c, "max_pool_backward dy");
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(h * w * c)
        .enumerate()
        .for_each(|(bi, img)| {
            let xi = &x[bi * h * w * c..][..h * w * c];
            for oy in 0..ho {
                for ox in 0..wo {
                    let g = &dy[((bi * ho + oy) * wo + ox) * c..][..c];
                    for (ch, &gc) in g.iter().enumerate() {
                        let mut best: Option<(usize, f32)> = None;
                        for i in 0..k {
                            let iy = (oy * s + i) as isize - p as isize;
                            if iy < 0 || iy as usize >= h {
                                continue;
                            }
                            for j in 0..k {
                                let ix = (ox * s + j) as isize - p as isize;
                                if ix < 0 || ix as usize >= w {
                                    continue;
                                }
                                let at = (iy as usize * w + ix as usize) * c + ch;
                                if best.is_none_or(|(_, v)| xi[at] > v || xi[at].is_nan()) {
                                    best = Some((at, xi[at]));
                                }
                            }
                        }
                        if let Some((at, _)) = best {
                            img[at] += gc;
                        }
                    }
                }
            }
        });
    dx
}

/// Gradient of `conv::mean_hw` (global average pooling) given dy [B, C].
pub fn mean_hw_backward(dy: &[f32], (b, h, w, c): (usize, usize, usize, usize)) -> Vec<f32> {
    assert_eq!(dy.len(), b * c, "mean_hw_backward dy");
    let scale = 1.0 / (h * w).max(1) as f32;
    let mut dx = vec![0.0f32; b * h * w * c];
    dx.par_chunks_mut(h * w * c)
        .zip(dy.par_chunks(c))
        .for_each(|(img, g)| {
            for px in img.chunks_exact_mut(c) {
                px.iter_mut().zip(g).for_each(|(d, g)| *d = g * scale);
            }
        });
    dx
}
