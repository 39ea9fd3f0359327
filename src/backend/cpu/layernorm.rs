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
        .for_each(|(o, xs)| {
            // SAFETY: layernorm_rows stores an f32 into every value of its output.
            let o = unsafe { vecmath::as_uninit(o) };
            vecmath::layernorm_rows(xs, gamma, beta, eps, o)
        });
}

/// `forward` into a new buffer.
pub fn forward_new(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let d = gamma.len();
    assert!(beta.len() == d && x.len() % d == 0);
    // SAFETY: the row chunks cover all of x.len() and layernorm_rows writes every output value.
    unsafe {
        vecmath::vec_written_by(x.len(), |out| {
            out.par_chunks_mut(d * 16)
                .zip(x.par_chunks(d * 16))
                .for_each(|(o, xs)| vecmath::layernorm_rows(xs, gamma, beta, eps, o))
        })
    }
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
    assert!(x.len() == dy.len() && x.len() % d.max(1) == 0);
    // Per-chunk partial dγ/dβ, added in chunk order afterwards (see reduce::REDUCE_ROWS).
    let chunk = d.max(1) * super::reduce::REDUCE_ROWS;
    let mut partial: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    // SAFETY: the row chunks cover all of x.len(), and layernorm_backward_rows writes every dx.
    let dx = unsafe {
        vecmath::vec_written_by(x.len(), |dx| {
            partial = dx
                .par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
                .map(|(dxs, (xs, dys))| {
                    let mut dg = vec![0.0f32; d];
                    let mut db = vec![0.0f32; d];
                    vecmath::layernorm_backward_rows(xs, dys, gamma, eps, dxs, &mut dg, &mut db);
                    (dg, db)
                })
                .collect();
        })
    };
    let (dg, db): (Vec<_>, Vec<_>) = partial.into_iter().unzip();
    let dgamma = super::reduce::sum_in_order(dg, d);
    let dbeta = super::reduce::sum_in_order(db, d);
    (dx, dgamma, dbeta)
}
