//! 2-D convolution and pooling on NHWC activations [B, H, W, C] (channels innermost, so a
//! kernel tap reads C contiguous values and the GEMM output is already NHWC):
//!   conv2d:   y[b, oy, ox, o] = act(Σ_{i,j,c} x[b, oy·s − p + i, ox·s − p + j, c] · w[o, i, j, c]
//!                                  + bias[o] + residual[b, oy, ox, o])
//!             zero padding; w [Cout, kh, kw, Cin] (PyTorch's [Cout, Cin, kh, kw] permuted once at
//!             load, `weight_to_hwc`); Ho = (H + 2p − kh)/s + 1.
//!             As im2col rows [B·Ho·Wo, kh·kw·Cin] times wᵀ with the `gemm` crate; a 1×1 stride-1
//!             convolution is the GEMM alone. Images go through in groups whose im2col buffer
//!             stays under COLS_BYTES.
//!   max_pool: y = max over a k×k window, stride s, padding p (padded taps never win: −∞).
//!   mean_hw:  y[b, c] = mean over H·W (global average pooling).
//! `conv2d_reference` is the plain 7-loop definition the tests check `conv2d` against.

use rayon::prelude::*;

use super::matmul;

/// A convolution's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv {
    /// Output height/width for an input of `h` (0 if the kernel does not fit).
    pub fn out_size(&self, h: usize) -> usize {
        (h + 2 * self.pad)
            .checked_sub(self.k)
            .map_or(0, |r| r / self.stride + 1)
    }

    /// Values of one im2col row: kh·kw·Cin.
    pub fn patch_len(&self) -> usize {
        self.k * self.k * self.cin
    }
}

/// What runs on the GEMM's output before it is stored.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// [Cout]
    pub bias: Option<&'a [f32]>,
    /// [B·Ho·Wo, Cout], added before the activation (a residual block's shortcut).
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

/// Where a max-pool window leaves the image: its taps are skipped (timm's MaxPool2d pads with
/// −∞) or read as zeros (BiT's stem zero-pads before an unpadded max-pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolPad {
    NegInf,
    Zero,
}

/// Bound on the im2col buffer of one group of images.
const COLS_BYTES: usize = 64 << 20;

/// PyTorch's conv weight [Cout, Cin, kh, kw] as [Cout, kh, kw, Cin].
pub fn weight_to_hwc(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    for o in 0..cout {
        for c in 0..cin {
            for i in 0..k {
                for j in 0..k {
                    out[((o * k + i) * k + j) * cin + c] = w[((o * cin + c) * k + i) * k + j];
                }
            }
        }
    }
    out
}

/// NCHW [B, C, H, W] → NHWC.
pub fn nchw_to_nhwc(x: &[f32], b: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(x.len(), b * c * h * w, "nchw_to_nhwc input");
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(h * w * c)
        .zip(x.par_chunks(c * h * w))
        .for_each(|(o, img)| {
            for ch in 0..c {
                for p in 0..h * w {
                    o[p * c + ch] = img[ch * h * w + p];
                }
            }
        });
    out
}

/// im2col rows of images [b0, b1) of x [B, H, W, Cin] into `cols` [(b1−b0)·Ho·Wo, kh·kw·Cin].
pub(super) fn im2col(
    x: &[f32],
    (h, w): (usize, usize),
    cv: &Conv,
    images: std::ops::Range<usize>,
    cols: &mut [f32],
) {
    let (ho, wo) = (cv.out_size(h), cv.out_size(w));
    let (cin, k, plen) = (cv.cin, cv.k, cv.patch_len());
    cols.par_chunks_mut(plen).enumerate().for_each(|(r, row)| {
        let b = images.start + r / (ho * wo);
        let (oy, ox) = ((r / wo) % ho, r % wo);
        for i in 0..k {
            let iy = (oy * cv.stride + i) as isize - cv.pad as isize;
            for j in 0..k {
                let ix = (ox * cv.stride + j) as isize - cv.pad as isize;
                let dst = &mut row[(i * k + j) * cin..(i * k + j + 1) * cin];
                if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                    dst.fill(0.0);
                } else {
                    let src = ((b * h + iy as usize) * w + ix as usize) * cin;
                    dst.copy_from_slice(&x[src..src + cin]);
                }
            }
        }
    });
}

fn apply(out: &mut [f32], cout: usize, ep: &Epilogue, row0: usize) {
    if ep.bias.is_none() && ep.residual.is_none() && !ep.relu {
        return;
    }
    out.par_chunks_mut(cout * 64)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let first = row0 + ci * 64;
            for (r, row) in chunk.chunks_exact_mut(cout).enumerate() {
                if let Some(b) = ep.bias {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
                if let Some(res) = ep.residual {
                    let s = &res[(first + r) * cout..(first + r + 1) * cout];
                    row.iter_mut().zip(s).for_each(|(v, s)| *v += s);
                }
                if ep.relu {
                    row.iter_mut().for_each(|v| *v = v.max(0.0));
                }
            }
        });
}

/// y [B, Ho, Wo, Cout] = conv(x [B, H, W, Cin]) with w [Cout, kh, kw, Cin], then the epilogue.
pub fn conv2d(
    x: &[f32],
    (b, h, w): (usize, usize, usize),
    wt: &[f32],
    cv: &Conv,
    ep: &Epilogue,
) -> Vec<f32> {
    assert_eq!(x.len(), b * h * w * cv.cin, "conv2d input");
    assert_eq!(wt.len(), cv.cout * cv.patch_len(), "conv2d weight");
    let (ho, wo) = (cv.out_size(h), cv.out_size(w));
    let rows = b * ho * wo;
    let mut out = if cv.k == 1 && cv.stride == 1 && cv.pad == 0 {
        matmul::linear_new(x, wt, rows, cv.cin, cv.cout)
    } else {
        let per_image = ho * wo * cv.patch_len();
        let group = (COLS_BYTES / 4 / per_image.max(1)).clamp(1, b.max(1));
        let mut out = vec![0.0f32; rows * cv.cout];
        let mut cols = vec![0.0f32; group.min(b) * per_image];
        for b0 in (0..b).step_by(group) {
            let b1 = (b0 + group).min(b);
            let n = (b1 - b0) * ho * wo;
            let cols = &mut cols[..n * cv.patch_len()];
            im2col(x, (h, w), cv, b0..b1, cols);
            let dst = &mut out[b0 * ho * wo * cv.cout..b1 * ho * wo * cv.cout];
            matmul::linear_nobias(cols, wt, n, cv.patch_len(), cv.cout, dst);
        }
        out
    };
    apply(&mut out, cv.cout, ep, 0);
    out
}

/// The definition, for tests: f64 sums, no im2col.
pub fn conv2d_reference(
    x: &[f32],
    (b, h, w): (usize, usize, usize),
    wt: &[f32],
    cv: &Conv,
    ep: &Epilogue,
) -> Vec<f32> {
    let (ho, wo) = (cv.out_size(h), cv.out_size(w));
    let mut out = vec![0.0f32; b * ho * wo * cv.cout];
    for bi in 0..b {
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..cv.cout {
                    let mut s = 0.0f64;
                    for i in 0..cv.k {
                        for j in 0..cv.k {
                            let iy = (oy * cv.stride + i) as isize - cv.pad as isize;
                            let ix = (ox * cv.stride + j) as isize - cv.pad as isize;
                            if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                continue;
                            }
                            for c in 0..cv.cin {
                                let xv = x[((bi * h + iy as usize) * w + ix as usize) * cv.cin + c];
                                let wv = wt[((o * cv.k + i) * cv.k + j) * cv.cin + c];
                                s += xv as f64 * wv as f64;
                            }
                        }
                    }
                    let r = ((bi * ho + oy) * wo + ox) * cv.cout + o;
                    s += ep.bias.map_or(0.0, |b| b[o] as f64);
                    s += ep.residual.map_or(0.0, |res| res[r] as f64);
                    out[r] = if ep.relu { s.max(0.0) as f32 } else { s as f32 };
                }
            }
        }
    }
    out
}

/// Max pooling of x [B, H, W, C]: window k, stride s, padding p → [B, Ho, Wo, C].
pub fn max_pool(
    x: &[f32],
    (b, h, w, c): (usize, usize, usize, usize),
    k: usize,
    s: usize,
    p: usize,
) -> Vec<f32> {
    let size = |n: usize| (n + 2 * p).saturating_sub(k) / s + 1;
    let (ho, wo) = (size(h), size(w));
    let mut out = vec![f32::NEG_INFINITY; b * ho * wo * c];
    out.par_chunks_mut(c).enumerate().for_each(|(r, dst)| {
        let bi = r / (ho * wo);
        let (oy, ox) = ((r / wo) % ho, r % wo);
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
                let src = ((bi * h + iy as usize) * w + ix as usize) * c;
                dst.iter_mut()
                    .zip(&x[src..src + c])
                    .for_each(|(d, v)| *d = d.max(*v));
            }
        }
    });
    out
}

/// Global average pooling: x [B, H, W, C] → [B, C].
pub fn mean_hw(x: &[f32], (b, h, w, c): (usize, usize, usize, usize)) -> Vec<f32> {
    let hw = h * w;
    let mut out = vec![0.0f32; b * c];
    out.par_chunks_mut(c).enumerate().for_each(|(bi, dst)| {
        let mut acc = vec![0.0f64; c];
        for px in x[bi * hw * c..(bi + 1) * hw * c].chunks_exact(c) {
            acc.iter_mut().zip(px).for_each(|(a, v)| *a += *v as f64);
        }
        dst.iter_mut()
            .zip(&acc)
            .for_each(|(d, a)| *d = (a / hw.max(1) as f64) as f32);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    #[test]
    fn conv2d_matches_its_definition_for_every_geometry_resnets_use() {
        // (cin, cout, k, stride, pad, h): stems, 3×3 same, strided 3×3, 1×1 strided, tails.
        for (cin, cout, k, s, p, h) in [
            (3, 8, 7, 2, 3, 19),
            (3, 5, 3, 1, 1, 9),
            (6, 7, 3, 2, 1, 10),
            (6, 4, 1, 2, 0, 9),
            (5, 6, 1, 1, 0, 7),
        ] {
            let cv = Conv {
                cin,
                cout,
                k,
                stride: s,
                pad: p,
            };
            let b = 2;
            let x = rand(b * h * h * cin, 1);
            let wt = rand(cout * cv.patch_len(), 2);
            let bias = rand(cout, 3);
            let ho = cv.out_size(h);
            let res = rand(b * ho * ho * cout, 4);
            let ep = Epilogue {
                bias: Some(&bias),
                residual: Some(&res),
                relu: true,
            };
            let got = conv2d(&x, (b, h, h), &wt, &cv, &ep);
            let want = conv2d_reference(&x, (b, h, h), &wt, &cv, &ep);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-4, "{cv:?}: {err}");
            assert!(want.iter().any(|&v| v > 0.0) && want.contains(&0.0));
        }
    }

    #[test]
    fn max_pool_ignores_padding_and_mean_averages() {
        // One channel, 3×3 image of negatives: a padded −∞ tap must never win, zero padding would.
        let x: Vec<f32> = (1..=9).map(|v| -(v as f32)).collect();
        let y = max_pool(&x, (1, 3, 3, 1), 3, 2, 1);
        assert_eq!(y, vec![-1.0, -2.0, -4.0, -5.0]);
        assert_eq!(mean_hw(&x, (1, 3, 3, 1)), vec![-5.0]);
    }

    #[test]
    fn weights_permute_to_taps_then_channels() {
        // [Cout=1, Cin=2, 2, 2] → [1, 2, 2, 2] as w[o, i, j, c].
        let w: Vec<f32> = (0..8).map(|v| v as f32).collect(); // [1, 2, 2, 2]
        let p = weight_to_hwc(&w, 1, 2, 2);
        assert_eq!(p, vec![0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]);
    }
}
