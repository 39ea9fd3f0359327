//! Gaussian (Mahalanobis-type) scores, all built on one scoring kernel: with P = pinvh(Σ) = WᵀW,
//! z = Wx and m_c = Wμ_c, the squared distance (x − μ_c)ᵀP(x − μ_c) = ‖z‖² − 2 z·m_c + ‖m_c‖², so N
//! rows against C means cost an N×D×R and an N×R×C GEMM (R = rank of Σ) and no loop over samples
//! or classes. Statistics are accumulated in f64; the scoring GEMMs run in f32.
//!
//! - `mahalanobis`: per-class means, one tied covariance of the class-centred features (SPEC D3,
//!   OpenOOD MDS): −min_c d_c.
//! - `mood-v1`: L2-normalised features, one Gaussian over all of them (SPEC D1, SSD's single
//!   cluster): −d.
//! - `mahalanobis-cc` / `mahalanobis-avgcc`: L2-normalised, a covariance per class: −min_c d_c /
//!   −mean_c d_c (SPEC D1, the intended behaviour of MOOD v1's broken flags).
//! - `gauss`: L2-normalised, one Gaussian with the Ledoit–Wolf-shrunk covariance (sklearn's
//!   `ledoit_wolf`): −d.

use rayon::prelude::*;

use crate::backend::cpu::matmul::linear_nobias;
use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::linalg::{matmul_nt, scatter, whitening};
use crate::ood::stats::Stats;

/// Means seen through a whitening W: everything needed to score squared Mahalanobis distances.
pub struct Whitened {
    pub dim: usize,
    pub rank: usize,
    /// W [R, D]
    whiten: Vec<f32>,
    /// Wμ_c [C, R]
    means: Vec<f32>,
    /// ‖Wμ_c‖² [C]
    means_sq: Vec<f32>,
}

impl Whitened {
    /// From a covariance Σ [D, D] and class means [C, D] (both f64).
    pub fn new(sigma: &[f64], means: &[f64], d: usize) -> Result<Whitened> {
        let w = whitening(sigma, d)?;
        let rank = w.len() / d;
        let wm: Vec<f32> = if rank == 0 {
            Vec::new()
        } else {
            matmul_nt(means, &w, d).iter().map(|&v| v as f32).collect()
        };
        let classes = means.len() / d;
        let means_sq = if rank == 0 {
            vec![0.0; classes]
        } else {
            wm.chunks_exact(rank)
                .map(|m| m.iter().map(|v| v * v).sum())
                .collect()
        };
        Ok(Whitened {
            dim: d,
            rank,
            whiten: w.iter().map(|&v| v as f32).collect(),
            means: wm,
            means_sq,
        })
    }

    pub fn classes(&self) -> usize {
        self.means_sq.len()
    }

    /// W [R, D], the whitened means Wμ_c [C, R] and their squared norms [C] (the GPU scorer's
    /// uploads).
    pub fn parts(&self) -> (&[f32], &[f32], &[f32]) {
        (&self.whiten, &self.means, &self.means_sq)
    }

    /// Squared distances [n, C] of the rows of x [n, D] to every mean. The GEMM expansion
    /// ‖z‖² − 2z·m + ‖m‖² loses digits to cancellation when a distance is small next to the norms,
    /// so each row's nearest few means (by the expansion) are recomputed directly as ‖z − m‖² in
    /// f64: the minimum, which the scores use, is then exact to f32 rounding.
    pub fn distances(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.dim;
        let (r, c) = (self.rank, self.classes());
        if r == 0 {
            return vec![0.0; n * c];
        }
        let mut z = vec![0.0f32; n * r];
        linear_nobias(x, &self.whiten, n, self.dim, r, &mut z);
        let mut cross = vec![0.0f32; n * c];
        linear_nobias(&z, &self.means, n, r, c, &mut cross);
        cross
            .par_chunks_mut(c)
            .zip(z.par_chunks(r))
            .for_each(|(row, zr)| {
                let zz: f32 = zr.iter().map(|v| v * v).sum();
                row.iter_mut()
                    .zip(&self.means_sq)
                    .for_each(|(x, m)| *x = (zz - 2.0 * *x + m).max(0.0));
                // Which means may be the nearest: the expansion's rounding error grows with the
                // norms it cancels (|2z·m| <= 2‖z‖‖m‖, a dot product of r terms), so every mean
                // within twice that bound of the smallest expansion is recomputed, and at least
                // REFINE of them. With a near-null direction kept by pinvh, ‖z‖ can reach 1e6 and
                // every expansion is noise: then all are recomputed.
                const REFINE: usize = 4;
                let ms_max = self.means_sq.iter().fold(0.0f32, |a, &b| a.max(b));
                let bound =
                    (r as f32 + 4.0) * f32::EPSILON * (zz + ms_max + 2.0 * (zz * ms_max).sqrt());
                let lowest = row.iter().fold(f32::INFINITY, |a, &b| a.min(b));
                let mut cand: Vec<usize> = (0..c).collect();
                if c > REFINE {
                    cand.select_nth_unstable_by(REFINE - 1, |&a, &b| row[a].total_cmp(&row[b]));
                    let close = cand[REFINE..]
                        .iter()
                        .filter(|&&k| row[k] <= lowest + 2.0 * bound)
                        .count();
                    // The close ones among the rest go to the front, after the REFINE nearest.
                    cand[REFINE..].sort_by_key(|&k| row[k] > lowest + 2.0 * bound);
                    cand.truncate(REFINE + close);
                }
                for k in cand {
                    let m = &self.means[k * r..(k + 1) * r];
                    row[k] = zr
                        .iter()
                        .zip(m)
                        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                        .sum::<f64>() as f32;
                }
            });
        cross
    }

    pub fn save(&self, prefix: &str, s: &mut Stats) {
        s.put(
            &format!("{prefix}.whiten"),
            &[self.rank, self.dim],
            &self.whiten,
        );
        s.put(
            &format!("{prefix}.means"),
            &[self.classes(), self.rank],
            &self.means,
        );
        s.put(
            &format!("{prefix}.means_sq"),
            &[self.classes()],
            &self.means_sq,
        );
    }

    pub fn load(prefix: &str, s: &Stats) -> Result<Whitened> {
        let (ws, whiten) = s.get(&format!("{prefix}.whiten"), 2)?;
        let (ms, means) = s.get(&format!("{prefix}.means"), 2)?;
        let (_, means_sq) = s.get(&format!("{prefix}.means_sq"), 1)?;
        if ms[1] != ws[0] || means_sq.len() != ms[0] || ms[0] == 0 || ws[0] == 0 {
            return Err(Error::Data(format!(
                "{prefix}: whitening {ws:?}, means {ms:?} and {} squared norms disagree",
                means_sq.len()
            )));
        }
        Ok(Whitened {
            dim: ws[1],
            rank: ws[0],
            whiten,
            means,
            means_sq,
        })
    }
}

/// Rows x/(‖x‖ + 1e-10), MOOD v1's pre-step (SPEC D1).
pub fn l2_normalised(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    out.par_chunks_mut(d).for_each(|r| {
        // In f64: an f32 sum of squares overflows to inf once entries pass ~1.8e19, which would
        // normalise every such row to zeros.
        let norm = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        r.iter_mut()
            .for_each(|v| *v = (*v as f64 / (norm + 1e-10)) as f32);
    });
    out
}

/// Per-class means [C, D] (f64) and counts; every class in 0..C needs a row.
pub fn class_means(x: &[f32], labels: &[usize], d: usize) -> Result<(Vec<f64>, Vec<usize>)> {
    let n = x.len() / d.max(1);
    if n == 0 || d == 0 || labels.len() != n {
        return Err(Error::Data(format!(
            "{n} train feature rows but {} labels",
            labels.len()
        )));
    }
    // Every class needs a row, so a label of n or more is an error, not a class count: the
    // statistics below are then bounded by the features themselves (classes × d ≤ n × d). The
    // error names the first class without rows, found without allocating per class.
    let max = labels.iter().copied().max().unwrap_or(0);
    if max >= n {
        let mut seen = labels.to_vec();
        seen.sort_unstable();
        seen.dedup();
        let c = seen
            .iter()
            .enumerate()
            .find(|(i, &y)| *i != y)
            .map_or(seen.len(), |(i, _)| i);
        return Err(Error::Data(format!(
            "class {c} has no train features: labels reach {max} with {n} train rows (labels must cover 0..={max})"
        )));
    }
    let classes = max + 1;
    let mut means = vec![0.0f64; classes * d];
    let mut counts = vec![0usize; classes];
    for (row, &y) in x.chunks_exact(d).zip(labels) {
        counts[y] += 1;
        for (m, v) in means[y * d..(y + 1) * d].iter_mut().zip(row) {
            *m += *v as f64;
        }
    }
    if let Some(c) = counts.iter().position(|&k| k == 0) {
        return Err(Error::Data(format!(
            "class {c} has no train features (labels must cover 0..{classes})"
        )));
    }
    for (c, &k) in counts.iter().enumerate() {
        means[c * d..(c + 1) * d]
            .iter_mut()
            .for_each(|m| *m /= k as f64);
    }
    Ok((means, counts))
}

/// The tied covariance (1/n)·Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ.
pub fn tied_covariance(x: &[f32], labels: &[usize], means: &[f64], d: usize) -> Vec<f64> {
    let n = x.len() / d;
    let mut s = scatter(x, d, |i| Some(&means[labels[i] * d..(labels[i] + 1) * d]));
    s.iter_mut().for_each(|v| *v /= n as f64);
    s
}

/// sklearn.covariance.ledoit_wolf (assume_centered = False): the shrunk covariance
/// (1 − δ)·S + δ·(tr S / D)·I with sklearn's shrinkage estimate δ.
pub fn ledoit_wolf(x: &[f32], d: usize) -> Result<Vec<f64>> {
    let n = x.len() / d;
    if n < 2 {
        return Err(Error::Data(format!(
            "Ledoit-Wolf needs at least 2 train rows, got {n}"
        )));
    }
    let (mean, _) = class_means(x, &vec![0; n], d)?;
    let mut s = scatter(x, d, |_| Some(&mean[..]));
    s.iter_mut().for_each(|v| *v /= n as f64);
    let trace: f64 = (0..d).map(|i| s[i * d + i]).sum();
    let mu = trace / d as f64;
    // Σ_ij (XᵀX)²_ij / n² = ‖S‖²_F, and Σ_ij (X²ᵀX²)_ij = Σ_k ‖x_k‖⁴ for centred rows x_k.
    let delta_sum: f64 = s.iter().map(|v| v * v).sum();
    let beta_sum: f64 = x
        .par_chunks_exact(d)
        .map(|r| {
            let q: f64 = r
                .iter()
                .zip(&mean)
                .map(|(v, m)| (*v as f64 - m).powi(2))
                .sum();
            q * q
        })
        .sum();
    let beta = (beta_sum / n as f64 - delta_sum) / (d as f64 * n as f64);
    let delta = (delta_sum - 2.0 * mu * trace + d as f64 * mu * mu) / d as f64;
    let beta = beta.min(delta);
    let shrinkage = if beta == 0.0 { 0.0 } else { beta / delta };
    for i in 0..d {
        for j in 0..d {
            s[i * d + j] *= 1.0 - shrinkage;
        }
        s[i * d + i] += shrinkage * mu;
    }
    Ok(s)
}

/// How per-class distances become one score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reduce {
    Min,
    Mean,
}

/// −reduce_c d_c(x) over one or more whitened Gaussians (several when each class has its own
/// covariance), optionally on L2-normalised features.
pub struct GaussianScore {
    pub normalise: bool,
    pub reduce: Reduce,
    pub parts: Vec<Whitened>,
}

impl GaussianScore {
    pub fn dim(&self) -> usize {
        self.parts[0].dim
    }

    /// Class-conditional, tied covariance (`mahalanobis`).
    pub fn tied(x: &[f32], labels: &[usize], d: usize) -> Result<GaussianScore> {
        check_rows(x, d, "train features")?;
        let (means, _) = class_means(x, labels, d)?;
        let sigma = tied_covariance(x, labels, &means, d);
        Ok(GaussianScore {
            normalise: false,
            reduce: Reduce::Min,
            parts: vec![Whitened::new(&sigma, &means, d)?],
        })
    }

    /// One Gaussian over all L2-normalised rows (`mood-v1`), or its Ledoit–Wolf version (`gauss`).
    pub fn single(x: &[f32], d: usize, shrunk: bool) -> Result<GaussianScore> {
        let n = check_rows(x, d, "train features")?;
        let xn = l2_normalised(x, d);
        let (mean, _) = class_means(&xn, &vec![0; n], d)?;
        let sigma = if shrunk {
            ledoit_wolf(&xn, d)?
        } else {
            tied_covariance(&xn, &vec![0; n], &mean, d)
        };
        Ok(GaussianScore {
            normalise: true,
            reduce: Reduce::Min,
            parts: vec![Whitened::new(&sigma, &mean, d)?],
        })
    }

    /// A covariance per class on L2-normalised rows (`mahalanobis-cc` / `-avgcc`).
    pub fn per_class(
        x: &[f32],
        labels: &[usize],
        d: usize,
        reduce: Reduce,
    ) -> Result<GaussianScore> {
        check_rows(x, d, "train features")?;
        let xn = l2_normalised(x, d);
        let (means, counts) = class_means(&xn, labels, d)?;
        // One row gives a zero covariance, whose pseudo-inverse is zero: every distance to that
        // class would be 0 and, under the min, every score 0.
        if let Some(c) = counts.iter().position(|&k| k < 2) {
            return Err(Error::Data(format!(
                "class {c} has {} train row: a covariance per class needs at least 2 rows in every class; use `mahalanobis` (one covariance shared by the classes) or add train rows",
                counts[c]
            )));
        }
        let parts = (0..counts.len())
            .map(|c| {
                let rows: Vec<f32> = xn
                    .chunks_exact(d)
                    .zip(labels)
                    .filter(|(_, &y)| y == c)
                    .flat_map(|(r, _)| r.iter().copied())
                    .collect();
                let mu = &means[c * d..(c + 1) * d];
                let mut s = scatter(&rows, d, |_| Some(mu));
                s.iter_mut().for_each(|v| *v /= counts[c] as f64);
                Whitened::new(&s, mu, d)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GaussianScore {
            normalise: true,
            reduce,
            parts,
        })
    }

    pub fn score(&self, x: &[f32]) -> Result<Vec<f32>> {
        let d = self.dim();
        let n = check_rows(x, d, "features")?;
        let xn;
        let x = if self.normalise {
            xn = l2_normalised(x, d);
            &xn[..]
        } else {
            x
        };
        let total: usize = self.parts.iter().map(|p| p.classes()).sum();
        let mut best = vec![
            match self.reduce {
                Reduce::Min => f32::INFINITY,
                Reduce::Mean => 0.0,
            };
            n
        ];
        // Blocks of rows keep the [rows, C] distance matrix small (C can be 1000).
        const BLOCK: usize = 4096;
        for (start, chunk) in (0..n).step_by(BLOCK).zip(x.chunks(BLOCK * d)) {
            for part in &self.parts {
                let dist = part.distances(chunk);
                let c = part.classes();
                for (b, row) in best[start..].iter_mut().zip(dist.chunks_exact(c)) {
                    match self.reduce {
                        Reduce::Min => *b = row.iter().fold(*b, |a, &v| a.min(v)),
                        Reduce::Mean => *b += row.iter().sum::<f32>() / total as f32,
                    }
                }
            }
        }
        Ok(best.into_iter().map(|v| -v).collect())
    }

    pub fn save(&self, s: &mut Stats) {
        for (i, p) in self.parts.iter().enumerate() {
            p.save(&format!("part{i}"), s);
        }
    }

    /// The statistics of a detector file fitted on `dim`-wide features (the header's width).
    pub fn load(s: &Stats, normalise: bool, reduce: Reduce, dim: usize) -> Result<GaussianScore> {
        let mut parts = Vec::new();
        while s.contains(&format!("part{}.whiten", parts.len())) {
            parts.push(Whitened::load(&format!("part{}", parts.len()), s)?);
        }
        if parts.is_empty() || parts.iter().any(|p| p.dim != dim) {
            return Err(Error::Data(format!(
                "detector file has no Gaussian statistics of its {dim}-wide features"
            )));
        }
        Ok(GaussianScore {
            normalise,
            reduce,
            parts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A covariance with one near-null direction that pinvh keeps (1e-13 is above its cutoff):
    /// whitened rows and means then share a component near 1.6e6, the GEMM expansion of the
    /// squared distances is all cancellation, and the scores must still be the direct distances.
    #[test]
    fn distances_survive_a_near_null_direction() {
        let d = 3;
        let sigma = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1e-13];
        // Five classes, all with 0.5 along the near-null axis.
        let means: Vec<f64> = (0..5)
            .flat_map(|c| [c as f64, (c * c) as f64 / 4.0, 0.5])
            .collect();
        let w = Whitened::new(&sigma, &means, d).unwrap();
        assert_eq!(w.rank, 3);
        let x: Vec<f32> = vec![0.3, 0.2, 0.5, 2.9, 2.1, 0.5, 4.2, 3.8, 0.5];
        let got = w.distances(&x);
        for (i, row) in x.chunks(d).enumerate() {
            for c in 0..5 {
                let m = &means[c * d..(c + 1) * d];
                // Along the null axis both sit at 0.5 exactly: the distance is the first two axes'.
                let want = (row[0] as f64 - m[0]).powi(2) + (row[1] as f64 - m[1]).powi(2);
                let nearest = (0..5)
                    .map(|k| {
                        let m = &means[k * d..(k + 1) * d];
                        (row[0] as f64 - m[0]).powi(2) + (row[1] as f64 - m[1]).powi(2)
                    })
                    .fold(f64::INFINITY, f64::min);
                if want == nearest {
                    let g = got[i * 5 + c] as f64;
                    assert!(
                        (g - want).abs() < 1e-2 * (1.0 + want),
                        "row {i} class {c}: {g} vs {want}"
                    );
                }
            }
            let min = got[i * 5..(i + 1) * 5]
                .iter()
                .fold(f32::INFINITY, |a, &b| a.min(b));
            assert!(
                min > 0.0 || row[0] == 0.0,
                "row {i}: a nearest distance of {min}"
            );
        }
    }
}
