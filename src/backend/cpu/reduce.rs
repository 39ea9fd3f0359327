//! Token reductions: mean over tokens (BEiT's avg pooling skips the class token), or one token.

/// x [B, N, D] → [B, D]: mean over tokens `skip..N`.
pub fn mean_tokens(x: &[f32], b: usize, n: usize, d: usize, skip: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; b * d];
    let count = (n - skip) as f32;
    for img in 0..b {
        let acc = &mut out[img * d..(img + 1) * d];
        for t in skip..n {
            let row = &x[(img * n + t) * d..(img * n + t + 1) * d];
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        for a in acc.iter_mut() {
            *a /= count;
        }
    }
    out
}

/// x [B, N, D] → [B, D]: token `t` of every image.
pub fn take_token(x: &[f32], b: usize, n: usize, d: usize, t: usize) -> Vec<f32> {
    (0..b)
        .flat_map(|img| x[(img * n + t) * d..(img * n + t + 1) * d].iter().copied())
        .collect()
}

/// Gradient of `mean_tokens`: each of the tokens `skip..N` receives dy / (N − skip); skipped
/// tokens receive zero. dy [B, D] → dx [B, N, D].
pub fn mean_tokens_backward(dy: &[f32], b: usize, n: usize, d: usize, skip: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; b * n * d];
    let inv = 1.0 / (n - skip) as f32;
    for img in 0..b {
        for t in skip..n {
            let row = &mut dx[(img * n + t) * d..(img * n + t + 1) * d];
            for (o, g) in row.iter_mut().zip(&dy[img * d..(img + 1) * d]) {
                *o = g * inv;
            }
        }
    }
    dx
}

/// Rows per chunk of the parallel reductions over token rows (bias, LayerNorm and layer-scale
/// gradients). Fixed rather than derived from the thread count, and the chunks' partial sums are
/// added in chunk order, so a gradient comes out bit for bit the same on any number of threads.
pub const REDUCE_ROWS: usize = 64;

/// The sum of equal-length partial vectors, added in their order.
pub fn sum_in_order(parts: Vec<Vec<f32>>, n: usize) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let mut acc = parts.next().unwrap_or_else(|| vec![0.0; n]);
    for p in parts {
        super::vecmath::add_assign(&mut acc, &p);
    }
    acc
}

/// x [M, N] → [N]: the sum of every column (a bias gradient), chunks of REDUCE_ROWS rows in
/// parallel.
pub fn column_sums(x: &[f32], n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let parts = x
        .par_chunks(n.max(1) * REDUCE_ROWS)
        .map(|chunk| {
            let mut acc = vec![0.0f32; n];
            for row in chunk.chunks_exact(n) {
                super::vecmath::add_assign(&mut acc, row);
            }
            acc
        })
        .collect();
    sum_in_order(parts, n)
}
