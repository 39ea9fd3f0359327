//! Patch embedding = Conv2d(C→D, kernel P, stride P) written as im2col + GEMM.
//! images [B, C, H, W] → cols [B·G, C·P·P] with G = (H/P)·(W/P) patches in row-major grid order
//! (h outer, w inner, as PyTorch's flatten(2)); column c·P·P + i·P + j matches the conv weight
//! [D, C, P, P] flattened to [D, C·P·P], so the weight is used in place.

use rayon::prelude::*;

pub fn im2col(images: &[f32], b: usize, c: usize, hgt: usize, wid: usize, p: usize) -> Vec<f32> {
    let (gh, gw) = (hgt / p, wid / p);
    let k = c * p * p;
    let mut cols = vec![0.0f32; b * gh * gw * k];
    cols.par_chunks_mut(k).enumerate().for_each(|(row, dst)| {
        let (img, cell) = (row / (gh * gw), row % (gh * gw));
        let (gy, gx) = (cell / gw, cell % gw);
        for ch in 0..c {
            for i in 0..p {
                let src = ((img * c + ch) * hgt + gy * p + i) * wid + gx * p;
                let d0 = (ch * p + i) * p;
                dst[d0..d0 + p].copy_from_slice(&images[src..src + p]);
            }
        }
    });
    cols
}

/// The adjoint of `im2col`: scatters column gradients [B·G, C·P·P] back to image gradients
/// [B, C, H, W] (patches do not overlap, so every pixel receives exactly one value, or none when
/// H or W is not a multiple of P). Needed for input gradients (ODIN's perturbation).
pub fn col2im(cols: &[f32], b: usize, c: usize, hgt: usize, wid: usize, p: usize) -> Vec<f32> {
    let (gh, gw) = (hgt / p, wid / p);
    let k = c * p * p;
    assert_eq!(cols.len(), b * gh * gw * k);
    let mut img = vec![0.0f32; b * c * hgt * wid];
    img.par_chunks_mut(c * hgt * wid)
        .enumerate()
        .for_each(|(im, dst)| {
            for cell in 0..gh * gw {
                let (gy, gx) = (cell / gw, cell % gw);
                let src = &cols[(im * gh * gw + cell) * k..(im * gh * gw + cell + 1) * k];
                for ch in 0..c {
                    for i in 0..p {
                        let o = (ch * hgt + gy * p + i) * wid + gx * p;
                        let s0 = (ch * p + i) * p;
                        dst[o..o + p].copy_from_slice(&src[s0..s0 + p]);
                    }
                }
            }
        });
    img
}
