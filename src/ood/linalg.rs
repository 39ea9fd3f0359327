//! Symmetric eigendecomposition (cyclic Jacobi, f64) and the pseudo-inverse built on it.
//! Jacobi is chosen for its accuracy and simplicity; it costs O(D³) per sweep and converges in a
//! handful of sweeps (a few seconds at D = 768 on one core), which is paid once per fit.

/// Eigenvalues and eigenvectors (columns of the returned row-major D×D matrix) of symmetric `a`.
pub fn eigh(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0f64; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    for _sweep in 0..60 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j].powi(2))
            .sum();
        let scale: f64 = (0..d).map(|i| a[i * d + i].powi(2)).sum::<f64>() + off;
        if off <= 1e-30 * scale.max(1e-300) {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let (app, aqq) = (a[p * d + p], a[q * d + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

/// W with WᵀW = pinv(Σ) for symmetric positive semi-definite Σ: rows λ_i^{-1/2}·v_iᵀ for the
/// eigenvalues above scipy's pinvh cutoff (D·ε·max|λ|); the rest are dropped.
pub fn whitening(sigma: &[f64], d: usize) -> Vec<f64> {
    let (lam, v) = eigh(sigma, d);
    let max = lam.iter().fold(0.0f64, |m, l| m.max(l.abs()));
    let cutoff = d as f64 * f64::EPSILON * max;
    let mut w = Vec::new();
    for (i, &l) in lam.iter().enumerate() {
        if l > cutoff {
            let s = 1.0 / l.sqrt();
            w.extend((0..d).map(|k| s * v[k * d + i]));
        }
    }
    w
}
