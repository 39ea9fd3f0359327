//! GEN, the generalised entropy (Liu et al., CVPR 2023; OpenOOD v1.5 gen_postprocessor.py):
//! with p = softmax(z) and its M largest probabilities, score = −Σ p_i^γ·(1 − p_i)^γ over them.
//! γ = 0.1 and M = 100 by default (all classes when C ≤ M), as OpenOOD.

use crate::error::{Error, Result};
use crate::ood::check_rows;

pub fn gen(z: &[f32], c: usize, gamma: f64, m: usize) -> Result<Vec<f32>> {
    check_rows(z, c, "logits")?;
    if !(gamma.is_finite() && gamma > 0.0) || m == 0 {
        return Err(Error::Usage(format!(
            "gen: gamma = {gamma} and M = {m}: gamma must be > 0 and M >= 1 (OpenOOD: 0.1, 100)"
        )));
    }
    let m = m.min(c);
    Ok(z.chunks_exact(c)
        .map(|row| {
            let top = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - top).exp()).collect();
            let sum: f64 = e.iter().sum();
            let mut p: Vec<f64> = e.iter().map(|v| v / sum).collect();
            // The M largest: a selection, not a sort.
            p.select_nth_unstable_by(c - m, |a, b| a.total_cmp(b));
            -p[c - m..]
                .iter()
                .map(|q| q.powf(gamma) * (1.0 - q).powf(gamma))
                .sum::<f64>() as f32
        })
        .collect())
}
