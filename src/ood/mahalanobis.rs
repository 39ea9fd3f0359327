//! Class-conditional Mahalanobis distance with a tied covariance (SPEC D3, OpenOOD's MDS; MOOD's
//! score): μ_c = mean of the train features of class c; Σ = (1/n)·Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ
//! in f64; P = pinvh(Σ); score(x) = −min_c (x − μ_c)ᵀ P (x − μ_c).
//!
//! Scoring is one GEMM: with P = WᵀW, z = Wx and m_c = Wμ_c, the distance is ‖z‖² − 2 z·m_c + ‖m_c‖²,
//! so N test rows against C classes cost an N×D×R and an N×R×C product (R = rank of Σ), no loop
//! over samples or classes.

use crate::backend::cpu::matmul::linear_nobias;
use crate::error::{Error, Result};
use crate::ood::check_rows;

pub struct Mahalanobis {
    pub dim: usize,
    /// W [R, D] (f32 for the scoring GEMM).
    whiten: Vec<f32>,
    /// Wμ_c [C, R]
    means_w: Vec<f32>,
    /// ‖Wμ_c‖² [C]
    means_sq: Vec<f32>,
    rank: usize,
    classes: usize,
}

impl Mahalanobis {
    /// Fits on features [n, d] with labels in 0..classes (every class needs a sample).
    pub fn fit(features: &[f32], labels: &[usize], d: usize) -> Result<Mahalanobis> {
        let n = check_rows(features, d, "train features")?;
        if n == 0 || labels.len() != n {
            return Err(Error::Data(format!(
                "{n} train feature rows but {} labels",
                labels.len()
            )));
        }
        let classes = labels.iter().max().map_or(0, |m| m + 1);
        let mut means = vec![0.0f64; classes * d];
        let mut counts = vec![0usize; classes];
        for (row, &y) in features.chunks_exact(d).zip(labels) {
            counts[y] += 1;
            for (m, v) in means[y * d..(y + 1) * d].iter_mut().zip(row) {
                *m += *v as f64;
            }
        }
        if let Some(c) = counts.iter().position(|&k| k == 0) {
            return Err(Error::Data(format!(
                "class {c} has no train features (labels must be 0..{classes})"
            )));
        }
        for (c, &k) in counts.iter().enumerate() {
            means[c * d..(c + 1) * d]
                .iter_mut()
                .for_each(|m| *m /= k as f64);
        }
        let mut sigma = vec![0.0f64; d * d];
        let mut centred = vec![0.0f64; d];
        for (row, &y) in features.chunks_exact(d).zip(labels) {
            for k in 0..d {
                centred[k] = row[k] as f64 - means[y * d + k];
            }
            for i in 0..d {
                let ci = centred[i];
                for j in i..d {
                    sigma[i * d + j] += ci * centred[j];
                }
            }
        }
        for i in 0..d {
            for j in i..d {
                let v = sigma[i * d + j] / n as f64;
                sigma[i * d + j] = v;
                sigma[j * d + i] = v;
            }
        }
        let w = crate::ood::linalg::whitening(&sigma, d);
        let rank = w.len() / d;
        let mut means_w = vec![0.0f32; classes * rank];
        for c in 0..classes {
            for r in 0..rank {
                means_w[c * rank + r] =
                    (0..d).map(|k| w[r * d + k] * means[c * d + k]).sum::<f64>() as f32;
            }
        }
        let means_sq = means_w
            .chunks_exact(rank.max(1))
            .map(|m| m.iter().map(|v| v * v).sum())
            .collect();
        Ok(Mahalanobis {
            dim: d,
            whiten: w.iter().map(|&v| v as f32).collect(),
            means_w,
            means_sq,
            rank,
            classes,
        })
    }

    /// −min_c (x − μ_c)ᵀP(x − μ_c) for each row of features [n, d].
    pub fn score(&self, features: &[f32]) -> Result<Vec<f32>> {
        let n = check_rows(features, self.dim, "features")?;
        let (r, c) = (self.rank, self.classes);
        if r == 0 {
            return Ok(vec![0.0; n]);
        }
        let mut z = vec![0.0f32; n * r];
        linear_nobias(features, &self.whiten, n, self.dim, r, &mut z);
        let mut cross = vec![0.0f32; n * c];
        linear_nobias(&z, &self.means_w, n, r, c, &mut cross);
        Ok(z.chunks_exact(r)
            .zip(cross.chunks_exact(c))
            .map(|(zr, cr)| {
                let zz: f32 = zr.iter().map(|v| v * v).sum();
                let best = cr
                    .iter()
                    .zip(&self.means_sq)
                    .map(|(x, m)| zz - 2.0 * x + m)
                    .fold(f32::INFINITY, f32::min);
                -best.max(0.0)
            })
            .collect())
    }
}
