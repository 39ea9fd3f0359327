//! LayerNorm over the last dimension: y = (x − mean) / sqrt(var + eps) · γ + β, var biased (÷D),
//! as torch.nn.LayerNorm. Two passes per row (mean, then centred sum of squares), never
//! E[x²] − E[x]², which cancels when |mean| ≫ std. f32 accumulation; rows in parallel.

use rayon::prelude::*;

use super::vecmath;

/// x, out: [M, D]; gamma, beta: [D].
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    let d = gamma.len();
    assert!(beta.len() == d && x.len() == out.len() && x.len() % d == 0);
    out.par_chunks_mut(d * 16)
        .zip(x.par_chunks(d * 16))
        .for_each(|(o, xs)| vecmath::layernorm_rows(xs, gamma, beta, eps, o));
}

/// Plain reference with f64 statistics, for tests.
pub fn reference(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let d = gamma.len();
    let mut out = vec![0.0f32; x.len()];
    for (xr, orow) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for i in 0..d {
            orow[i] = ((xr[i] as f64 - mean) * inv * gamma[i] as f64 + beta[i] as f64) as f32;
        }
    }
    out
}
