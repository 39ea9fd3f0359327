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

/// out[M, D] = x + γ ⊙ y into a fresh buffer, for the tape, where x is still shared with the
/// records (one pass instead of copying x and then adding).
pub fn residual_scaled_new(x: &[f32], y: &[f32], gamma: Option<&[f32]>, d: usize) -> Vec<f32> {
    assert!(x.len() == y.len() && x.len() % d.max(1) == 0);
    // SAFETY: the row chunks cover all x.len() values and each is written once.
    unsafe {
        super::vecmath::vec_written_by(x.len(), |out| {
            out.par_chunks_mut(d * 16)
                .zip(x.par_chunks(d * 16).zip(y.par_chunks(d * 16)))
                .for_each(|(os, (xs, ys))| {
                    for ((orow, xr), yr) in os
                        .chunks_exact_mut(d)
                        .zip(xs.chunks_exact(d))
                        .zip(ys.chunks_exact(d))
                    {
                        match gamma {
                            Some(g) => {
                                for (((o, a), b), s) in orow.iter_mut().zip(xr).zip(yr).zip(g) {
                                    o.write(a + s * b);
                                }
                            }
                            None => {
                                for ((o, a), b) in orow.iter_mut().zip(xr).zip(yr) {
                                    o.write(a + b);
                                }
                            }
                        }
                    }
                })
        })
    }
}

/// acc += x, elementwise, over the threads (gradient accumulation at a branch of the graph).
pub fn add_assign_parallel(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len());
    const CHUNK: usize = 1 << 15;
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(a, b)| super::vecmath::add_assign(a, b));
}

/// Gradients of x' = x + γ ⊙ y given dx' [M, D]: dx = dx' (identity, not returned),
/// dy = γ ⊙ dx', dγ = Σ_rows dx' ⊙ y. Without γ, dy = dx'. Rows in parallel chunks, each with
/// its own dγ partial (see reduce::REDUCE_ROWS).
pub fn residual_scaled_backward(
    y: &[f32],
    gamma: Option<&[f32]>,
    dout: &[f32],
    d: usize,
) -> (Vec<f32>, Option<Vec<f32>>) {
    match gamma {
        None => (dout.to_vec(), None),
        Some(g) => {
            let chunk = d.max(1) * super::reduce::REDUCE_ROWS;
            let mut parts = Vec::new();
            // SAFETY: the row chunks cover all of dout's values and each is written once.
            let dy = unsafe {
                super::vecmath::vec_written_by(dout.len(), |dy| {
                    parts = dy
                        .par_chunks_mut(chunk)
                        .zip(dout.par_chunks(chunk).zip(y.par_chunks(chunk)))
                        .map(|(dys, (dos, ys))| {
                            let mut dg = vec![0.0f32; d];
                            for ((dyr, dor), yr) in dys
                                .chunks_exact_mut(d)
                                .zip(dos.chunks_exact(d))
                                .zip(ys.chunks_exact(d))
                            {
                                for i in 0..d {
                                    dyr[i].write(g[i] * dor[i]);
                                    dg[i] += dor[i] * yr[i];
                                }
                            }
                            dg
                        })
                        .collect();
                })
            };
            (dy, Some(super::reduce::sum_in_order(parts, d)))
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
