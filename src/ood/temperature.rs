//! Temperature scaling (Guo et al., ICML 2017; OpenOOD v1.5 temp_scaling_postprocessor.py):
//! score = max softmax(z/T), T fitted to minimise the mean cross-entropy of held-out labelled ID
//! rows. OpenOOD fits T on its ID validation split with a few LBFGS steps from 1.5; mood holds out
//! a fraction of the train store (row i when ⌊(i+1)·f⌋ > ⌊i·f⌋: ⌊n·f⌋ rows, evenly spread) and
//! finds the exact minimiser in T ∈ [0.01, 100]. The mean NLL is convex in β = 1/T, so its
//! derivative mean(E_p[z] − z_y) is increasing in β and T is found by bisection on it.
//!
//! T2FNorm (Regmi et al., 2023; t2fnorm_postprocessor.py) is scored here too: max softmax of the
//! head on x/τ, τ = 0.1 (the τ of OpenOOD's T2FNorm training).

use crate::error::{Error, Result};
use crate::ood::check_rows;

/// The held-out rows of `n` for a fraction `f`.
pub fn held_out(n: usize, f: f64) -> Vec<usize> {
    (0..n)
        .filter(|&i| ((i + 1) as f64 * f).floor() > (i as f64 * f).floor())
        .collect()
}

/// d/dβ of the mean NLL of logits·β: mean over rows of (E_softmax(βz)[z] − z_y).
fn slope(z: &[f32], c: usize, rows: &[usize], labels: &[usize], beta: f64) -> f64 {
    let sum: f64 = rows
        .iter()
        .map(|&i| {
            let r = &z[i * c..(i + 1) * c];
            let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let (mut s, mut sz) = (0.0f64, 0.0f64);
            for &v in r {
                let e = (beta * (v as f64 - m)).exp();
                s += e;
                sz += e * v as f64;
            }
            sz / s - r[labels[i]] as f64
        })
        .sum();
    sum / rows.len() as f64
}

pub fn fit_temperature(z: &[f32], c: usize, labels: &[usize], fraction: f64) -> Result<f32> {
    let n = check_rows(z, c, "train logits")?;
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Error::Usage(format!(
            "holdout = {fraction}: the held-out fraction must be in (0, 1]"
        )));
    }
    if labels.len() != n {
        return Err(Error::Data(format!(
            "{n} train logit rows but {} labels",
            labels.len()
        )));
    }
    if let Some(i) = labels.iter().position(|&y| y >= c) {
        return Err(Error::Data(format!(
            "train row {i} has label {}, but the logits have {c} classes",
            labels[i]
        )));
    }
    let rows = held_out(n, fraction);
    if rows.is_empty() {
        return Err(Error::Data(format!(
            "holdout = {fraction} of {n} train rows holds none out; raise it"
        )));
    }
    let (mut lo, mut hi) = (1e-2f64.ln(), 1e2f64.ln());
    if slope(z, c, &rows, labels, lo.exp()) >= 0.0 {
        return Ok(1e2);
    }
    if slope(z, c, &rows, labels, hi.exp()) <= 0.0 {
        return Ok(1e-2);
    }
    // ln β halves its interval 100 times: far below f64's resolution.
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if slope(z, c, &rows, labels, mid.exp()) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok((1.0 / (0.5 * (lo + hi)).exp()) as f32)
}
