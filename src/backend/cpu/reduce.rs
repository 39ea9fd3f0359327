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

/// x [M, N] → [N]: the sum of every column (a bias gradient), rows split over the threads in a
/// few large chunks whose partial sums are added at the end.
pub fn column_sums(x: &[f32], n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let rows = x.len() / n.max(1);
    let chunk_rows = rows.div_ceil(2 * rayon::current_num_threads()).max(64);
    x.par_chunks(n * chunk_rows)
        .map(|chunk| {
            let mut acc = vec![0.0f32; n];
            for row in chunk.chunks_exact(n) {
                super::vecmath::add_assign(&mut acc, row);
            }
            acc
        })
        .reduce_with(|mut a, b| {
            super::vecmath::add_assign(&mut a, &b);
            a
        })
        .unwrap_or_else(|| vec![0.0; n])
}
