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

/// Gradients of LayerNorm given dy [M, D]: with x̂ = (x − μ)·r, r = 1/√(σ² + eps), g = dy ⊙ γ,
///   dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂)),  dγ = Σ_rows dy ⊙ x̂,  dβ = Σ_rows dy.
/// The statistics are recomputed from x (cheaper than storing them, and exact).
pub fn backward(x: &[f32], gamma: &[f32], eps: f32, dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let mut dx = vec![0.0f32; x.len()];
    // Per-chunk partial dγ/dβ, reduced afterwards, so rows run in parallel without sharing.
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(d * 16)
        .zip(x.par_chunks(d * 16).zip(dy.par_chunks(d * 16)))
        .map(|(dxs, (xs, dys))| {
            let mut dg = vec![0.0f32; d];
            let mut db = vec![0.0f32; d];
            let mut xhat = vec![0.0f32; d];
            for ((dxr, xr), dyr) in dxs
                .chunks_exact_mut(d)
                .zip(xs.chunks_exact(d))
                .zip(dys.chunks_exact(d))
            {
                let m = vecmath::sum(xr) / d as f32;
                let (s1, s2) = vecmath::sum_dev(xr, m);
                let mean = m + s1 / d as f32;
                let var = ((s2 - s1 * s1 / d as f32) / d as f32).max(0.0);
                let r = 1.0 / (var + eps).sqrt();
                let (mut mg, mut mgx) = (0.0f32, 0.0f32);
                for i in 0..d {
                    xhat[i] = (xr[i] - mean) * r;
                    let g = dyr[i] * gamma[i];
                    mg += g;
                    mgx += g * xhat[i];
                    dg[i] += dyr[i] * xhat[i];
                    db[i] += dyr[i];
                }
                mg /= d as f32;
                mgx /= d as f32;
                for i in 0..d {
                    dxr[i] = r * (dyr[i] * gamma[i] - mg - xhat[i] * mgx);
                }
            }
            (dg, db)
        })
        .collect();
    let mut dgamma = vec![0.0f32; d];
    let mut dbeta = vec![0.0f32; d];
    for (dg, db) in partial {
        for i in 0..d {
            dgamma[i] += dg[i];
            dbeta[i] += db[i];
        }
    }
    (dx, dgamma, dbeta)
}
