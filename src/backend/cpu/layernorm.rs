//! LayerNorm over the last dimension: y = (x − mean) / sqrt(var + eps) · γ + β, var biased (÷D),
//! as torch.nn.LayerNorm. Two passes per row (mean, then centred sum of squares), never
//! E[x²] − E[x]², which cancels when |mean| ≫ std. f32 accumulation; rows in parallel.

use rayon::prelude::*;

/// x, out: [M, D]; gamma, beta: [D].
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let d = gamma.len();
    assert!(beta.len() == d && x.len() == out.len() && x.len() % d == 0);
    out.par_chunks_mut(d * 16)
        .zip(x.par_chunks(d * 16))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                row(xrow, gamma, beta, eps, orow);
            }
        });
}

#[inline]
fn row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    let inv = 1.0 / (var + eps).sqrt();
    for ((o, v), (g, b)) in out.iter_mut().zip(x).zip(gamma.iter().zip(beta)) {
        *o = (v - mean) * inv * g + b;
    }
}
