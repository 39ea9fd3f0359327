//! Element-wise ops over token matrices: layer-scale residual, broadcast add, token assembly.

use rayon::prelude::*;

/// x[M, D] += γ ⊙ y[M, D] (γ: [D], or 1 when absent): the residual with BEiT's layer scale.
pub fn residual_scaled(x: &mut [f32], y: &[f32], gamma: Option<&[f32]>, d: usize) {
    assert_eq!(x.len(), y.len());
    x.par_chunks_mut(d * 16)
        .zip(y.par_chunks(d * 16))
        .for_each(|(xs, ys)| match gamma {
            Some(g) => {
                for (xr, yr) in xs.chunks_exact_mut(d).zip(ys.chunks_exact(d)) {
                    for ((a, b), s) in xr.iter_mut().zip(yr).zip(g) {
                        *a += s * b;
                    }
                }
            }
            None => {
                for (a, b) in xs.iter_mut().zip(ys) {
                    *a += b;
                }
            }
        });
}

/// tokens [B, 1+G, D] = [cls; patches[b]] (+ pos [1+G, D] if given).
pub fn assemble_tokens(
    patches: &[f32],
    cls: &[f32],
    pos: Option<&[f32]>,
    b: usize,
    g: usize,
    d: usize,
) -> Vec<f32> {
    let n = g + 1;
    let mut out = vec![0.0f32; b * n * d];
    out.par_chunks_mut(n * d)
        .enumerate()
        .for_each(|(img, dst)| {
            dst[..d].copy_from_slice(cls);
            dst[d..].copy_from_slice(&patches[img * g * d..(img + 1) * g * d]);
            if let Some(pos) = pos {
                for (a, p) in dst.iter_mut().zip(pos) {
                    *a += p;
                }
            }
        });
    out
}

/// Gradients of x' = x + γ ⊙ y given dx' [M, D]: dx = dx' (identity, not returned),
/// dy = γ ⊙ dx', dγ = Σ_rows dx' ⊙ y. Without γ, dy = dx'.
pub fn residual_scaled_backward(
    y: &[f32],
    gamma: Option<&[f32]>,
    dout: &[f32],
    d: usize,
) -> (Vec<f32>, Option<Vec<f32>>) {
    match gamma {
        None => (dout.to_vec(), None),
        Some(g) => {
            let mut dy = vec![0.0f32; dout.len()];
            let mut dg = vec![0.0f32; d];
            for ((dyr, dor), yr) in dy
                .chunks_exact_mut(d)
                .zip(dout.chunks_exact(d))
                .zip(y.chunks_exact(d))
            {
                for i in 0..d {
                    dyr[i] = g[i] * dor[i];
                    dg[i] += dor[i] * yr[i];
                }
            }
            (dy, Some(dg))
        }
    }
}

/// Rows i of x [M, D] with mask[i] set are replaced by `token` [D] (BEiT's learnable mask token).
pub fn mask_rows(x: &mut [f32], mask: &[bool], token: &[f32]) {
    let d = token.len();
    for (row, &m) in x.chunks_exact_mut(d).zip(mask) {
        if m {
            row.copy_from_slice(token);
        }
    }
}

/// Gradients of `mask_rows` given dy: dx = dy with masked rows zeroed; dtoken = Σ masked rows of dy.
pub fn mask_rows_backward(dy: &[f32], mask: &[bool], d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut dx = dy.to_vec();
    let mut dt = vec![0.0f32; d];
    for (row, &m) in dx.chunks_exact_mut(d).zip(mask) {
        if m {
            dt.iter_mut().zip(row.iter()).for_each(|(a, g)| *a += g);
            row.fill(0.0);
        }
    }
    (dx, dt)
}

/// out [R, D] = x[rows[r], :].
pub fn gather_rows(x: &[f32], rows: &[usize], d: usize) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| x[r * d..(r + 1) * d].iter().copied())
        .collect()
}

/// The adjoint of `gather_rows`: dx [M, D] with dy's rows added at `rows`.
pub fn gather_rows_backward(dy: &[f32], rows: &[usize], m: usize, d: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; m * d];
    for (g, &r) in dy.chunks_exact(d).zip(rows) {
        dx[r * d..(r + 1) * d]
            .iter_mut()
            .zip(g)
            .for_each(|(a, b)| *a += b);
    }
    dx
}
