//! Binary logistic regression with an L2 penalty on the weights (not on the intercept): the
//! model of scikit-learn's `LogisticRegression(C=C)`,
//!
//!   minimise over (w, b):  ½‖w‖² + C Σ_i [log(1 + e^{m_i}) − t_i m_i],  m_i = w·x_i + b,
//!
//! t_i ∈ {0, 1}. Solved by Newton's method with a backtracking line search, in f64: the problems
//! here (`mahalanobis-ensemble`'s per-layer weights) have a handful of features, so the
//! (p+1)×(p+1) Hessian costs nothing and the optimum is reached to rounding, where sklearn's
//! lbfgs stops at its `tol`.
//!
//! `fit_cv` chooses C as `LogisticRegressionCV(scoring="accuracy")` does with its defaults (what
//! OpenOOD's mds_ensemble `alpha_selector` calls): C on the grid 10^(−4 + 8k/9), k = 0..9; five
//! stratified folds in row order (sklearn's `StratifiedKFold(5)`, no shuffling); the first C of
//! highest summed fold accuracy (a row is predicted 1 when m > 0); then a refit on every row.

use crate::error::{Error, Result};

/// Folds of the C search (sklearn's default `cv=5`).
pub const FOLDS: usize = 5;

/// The C grid of `LogisticRegressionCV(Cs=10)`: `np.logspace(-4, 4, 10)`.
pub fn c_grid() -> Vec<f64> {
    (0..10)
        .map(|k| 10f64.powf(-4.0 + 8.0 * k as f64 / 9.0))
        .collect()
}

#[derive(Clone, Debug, PartialEq)]
pub struct Logistic {
    pub coef: Vec<f64>,
    pub intercept: f64,
    /// The penalty the fit used (the chosen one, for `fit_cv`).
    pub c: f64,
}

impl Logistic {
    /// m = w·x + b of one row.
    pub fn margin(&self, row: &[f64]) -> f64 {
        row.iter().zip(&self.coef).map(|(x, w)| x * w).sum::<f64>() + self.intercept
    }
}

/// log(1 + e^m) without overflow.
fn softplus(m: f64) -> f64 {
    m.max(0.0) + (-m.abs()).exp().ln_1p()
}

fn sigmoid(m: f64) -> f64 {
    if m >= 0.0 {
        1.0 / (1.0 + (-m).exp())
    } else {
        let e = m.exp();
        e / (1.0 + e)
    }
}

/// The objective at θ = (w, b) on rows `x` [n, p].
fn objective(theta: &[f64], x: &[f64], p: usize, t: &[bool], c: f64) -> f64 {
    let pen: f64 = theta[..p].iter().map(|w| w * w).sum::<f64>() * 0.5;
    let loss: f64 = x
        .chunks_exact(p)
        .zip(t)
        .map(|(r, &ti)| {
            let m = margin(theta, r);
            softplus(m) - if ti { m } else { 0.0 }
        })
        .sum();
    pen + c * loss
}

fn margin(theta: &[f64], row: &[f64]) -> f64 {
    let p = row.len();
    row.iter().zip(&theta[..p]).map(|(x, w)| x * w).sum::<f64>() + theta[p]
}

/// Solves a x = b (a [k, k], row-major) by Gaussian elimination with partial pivoting; None when
/// a is singular.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let k = b.len();
    for col in 0..k {
        let piv =
            (col..k).max_by(|&i, &j| a[i * k + col].abs().total_cmp(&a[j * k + col].abs()))?;
        if a[piv * k + col].abs() < f64::MIN_POSITIVE {
            return None;
        }
        if piv != col {
            for j in 0..k {
                a.swap(piv * k + j, col * k + j);
            }
            b.swap(piv, col);
        }
        for i in col + 1..k {
            let f = a[i * k + col] / a[col * k + col];
            for j in col..k {
                a[i * k + j] -= f * a[col * k + j];
            }
            b[i] -= f * b[col];
        }
    }
    let mut x = vec![0.0; k];
    for i in (0..k).rev() {
        let s: f64 = (i + 1..k).map(|j| a[i * k + j] * x[j]).sum();
        x[i] = (b[i] - s) / a[i * k + i];
    }
    Some(x)
}

/// Fits rows `x` [n, p] with targets `t` at penalty `c`.
pub fn fit(x: &[f64], p: usize, t: &[bool], c: f64) -> Result<Logistic> {
    let n = t.len();
    if p == 0 || x.len() != n * p {
        return Err(Error::Data(format!(
            "logistic regression: {} values are not {n} rows of {p} features",
            x.len()
        )));
    }
    if !(c.is_finite() && c > 0.0) {
        return Err(Error::Usage(format!(
            "logistic regression: C = {c}; it must be a finite number > 0"
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Data(format!(
            "logistic regression: row {} has a non-finite feature ({})",
            i / p,
            x[i]
        )));
    }
    if t.iter().all(|&v| v) || t.iter().all(|&v| !v) {
        return Err(Error::Data(
            "logistic regression needs rows of both classes".into(),
        ));
    }
    let k = p + 1;
    let mut theta = vec![0.0f64; k];
    let mut f = objective(&theta, x, p, t, c);
    for _ in 0..200 {
        // Gradient and Hessian of the objective.
        let mut g = vec![0.0f64; k];
        let mut h = vec![0.0f64; k * k];
        for (r, &ti) in x.chunks_exact(p).zip(t) {
            let s = sigmoid(margin(&theta, r));
            let (e, v) = (s - f64::from(u8::from(ti)), s * (1.0 - s));
            for i in 0..k {
                let xi = if i < p { r[i] } else { 1.0 };
                g[i] += e * xi;
                for j in 0..=i {
                    let xj = if j < p { r[j] } else { 1.0 };
                    h[i * k + j] += v * xi * xj;
                }
            }
        }
        for i in 0..k {
            g[i] = c * g[i] + if i < p { theta[i] } else { 0.0 };
            for j in 0..=i {
                h[i * k + j] = c * h[i * k + j] + if i == j && i < p { 1.0 } else { 0.0 };
                h[j * k + i] = h[i * k + j];
            }
        }
        let step = solve(h, g.clone()).ok_or_else(|| {
            Error::Data(
                "logistic regression: the Hessian is singular (every row saturated); the per-layer scores separate the sets with no margin to fit".into(),
            )
        })?;
        // The Newton decrement gᵀH⁻¹g: twice the objective's predicted decrease.
        let decrement: f64 = g.iter().zip(&step).map(|(a, b)| a * b).sum();
        if decrement <= 1e-24 * (1.0 + f.abs()) {
            break;
        }
        let mut s = 1.0;
        loop {
            let next: Vec<f64> = theta.iter().zip(&step).map(|(a, d)| a - s * d).collect();
            let fn_ = objective(&next, x, p, t, c);
            if fn_ <= f - 1e-4 * s * decrement || s < 1e-12 {
                theta = next;
                f = fn_;
                break;
            }
            s *= 0.5;
        }
        if s < 1e-12 {
            break;
        }
    }
    Ok(Logistic {
        coef: theta[..p].to_vec(),
        intercept: theta[p],
        c,
    })
}

/// The test fold (0..`folds`) of each row, as sklearn's `StratifiedKFold(folds)` without
/// shuffling: classes are numbered in order of first appearance; with the rows' class numbers
/// sorted, fold i takes, of each class, as many rows as that class has among the sorted
/// positions i, i + folds, i + 2·folds, …; each class's rows, in order, fill folds 0, 1, … .
pub fn stratified_folds(t: &[bool], folds: usize) -> Vec<usize> {
    let first = t.first().copied().unwrap_or(false);
    // Class 0 is the first to appear.
    let class = |v: bool| usize::from(v != first);
    let counts = [
        t.iter().filter(|&&v| class(v) == 0).count(),
        t.iter().filter(|&&v| class(v) == 1).count(),
    ];
    // allocation[i][k]: positions j ≡ i (mod folds) of the sorted class numbers holding k.
    let mut allocation = vec![[0usize; 2]; folds];
    for j in 0..t.len() {
        allocation[j % folds][usize::from(j >= counts[0])] += 1;
    }
    let mut next = [(0usize, 0usize); 2]; // (fold, rows given to it) per class
    t.iter()
        .map(|&v| {
            let k = class(v);
            let (fold, used) = &mut next[k];
            while *used == allocation[*fold][k] {
                *fold += 1;
                *used = 0;
            }
            *used += 1;
            *fold
        })
        .collect()
}

/// The fit at the C of `c_grid` with the highest summed accuracy over `FOLDS` stratified folds
/// (the first such C), refitted on every row. Each class needs at least `FOLDS` rows.
pub fn fit_cv(x: &[f64], p: usize, t: &[bool]) -> Result<Logistic> {
    let pos = t.iter().filter(|&&v| v).count();
    if pos.min(t.len() - pos) < FOLDS {
        return Err(Error::Data(format!(
            "logistic regression: {pos} rows of one class and {} of the other; choosing C by {FOLDS}-fold cross-validation needs at least {FOLDS} of each",
            t.len() - pos
        )));
    }
    let fold = stratified_folds(t, FOLDS);
    let grid = c_grid();
    let mut total = vec![0.0f64; grid.len()];
    for f in 0..FOLDS {
        let split = |test: bool| -> (Vec<f64>, Vec<bool>) {
            let mut xs = Vec::new();
            let mut ts = Vec::new();
            for (i, r) in x.chunks_exact(p).enumerate() {
                if (fold[i] == f) == test {
                    xs.extend_from_slice(r);
                    ts.push(t[i]);
                }
            }
            (xs, ts)
        };
        let (xtr, ttr) = split(false);
        let (xte, tte) = split(true);
        for (acc, &c) in total.iter_mut().zip(&grid) {
            let m = fit(&xtr, p, &ttr, c)?;
            let right = xte
                .chunks_exact(p)
                .zip(&tte)
                .filter(|(r, &ti)| (m.margin(r) > 0.0) == ti)
                .count();
            *acc += right as f64 / tte.len() as f64;
        }
    }
    let best = (0..grid.len()).fold(0, |b, k| if total[k] > total[b] { k } else { b });
    fit(x, p, t, grid[best])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_optimum_has_a_zero_gradient() {
        let x = [0.0, 1.0, 2.0, 3.0, 1.5, 0.5];
        let t = [false, false, true, true, true, false];
        let m = fit(&x, 1, &t, 2.0).unwrap();
        let (mut gw, mut gb) = (m.coef[0], 0.0);
        for (r, &ti) in x.chunks(1).zip(&t) {
            let e = sigmoid(m.margin(r)) - f64::from(u8::from(ti));
            gw += 2.0 * e * r[0];
            gb += 2.0 * e;
        }
        assert!(gw.abs() < 1e-10 && gb.abs() < 1e-10, "{gw} {gb}");
    }

    #[test]
    fn one_class_and_bad_c_are_refused() {
        assert!(fit(&[1.0, 2.0], 1, &[true, true], 1.0).is_err());
        assert!(fit(&[1.0, 2.0], 1, &[true, false], 0.0).is_err());
        assert!(fit(&[1.0, f64::NAN], 1, &[true, false], 1.0).is_err());
        assert!(fit_cv(&[1.0, 2.0], 1, &[true, false]).is_err());
    }
}
