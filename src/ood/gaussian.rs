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

use crate::backend::cpu::matmul::{gemm_strided, linear_nobias, MatMut, MatRef};
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
        let c = self.classes();
        if self.rank == 0 {
            return vec![0.0; n * c];
        }
        let (z, mut cross) = self.expansion(x, n, self.dim, 0);
        let ms_max = self.means_sq_max();
        cross
            .par_chunks_mut(c)
            .zip(z.par_chunks(self.rank))
            .for_each(|(row, zr)| self.refine_row(zr, row, ms_max));
        cross
    }

    /// min_c d_c (`Reduce::Min`) or Σ_c d_c (`Reduce::Mean`, the caller divides) of each of the
    /// n rows x[i·stride + offset ..][..D]: `distances` fused with the reduction, reading the rows
    /// in place (a block of per-block rows [n, L·D] needs no copy).
    pub fn reduced(
        &self,
        x: &[f32],
        n: usize,
        stride: usize,
        offset: usize,
        reduce: Reduce,
    ) -> Vec<f32> {
        let c = self.classes();
        if self.rank == 0 {
            return vec![0.0; n];
        }
        let (z, mut cross) = self.expansion(x, n, stride, offset);
        let ms_max = self.means_sq_max();
        cross
            .par_chunks_mut(c)
            .zip(z.par_chunks(self.rank))
            .map(|(row, zr)| match reduce {
                Reduce::Min => self.nearest_row(zr, row, ms_max),
                Reduce::Mean => {
                    self.refine_row(zr, row, ms_max);
                    row.iter().sum::<f32>()
                }
            })
            .collect()
    }

    fn means_sq_max(&self) -> f32 {
        self.means_sq.iter().fold(0.0f32, |a, &b| a.max(b))
    }

    /// z = W·x [n, R] and the cross terms z·m_c [n, C] of the n rows x[i·stride + offset ..][..D]:
    /// the two GEMMs, the first reading x through its row stride.
    fn expansion(&self, x: &[f32], n: usize, stride: usize, offset: usize) -> (Vec<f32>, Vec<f32>) {
        let (d, r, c) = (self.dim, self.rank, self.classes());
        assert!(
            stride >= d
                && offset + d <= stride
                && (n == 0 || (n - 1) * stride + offset + d <= x.len())
        );
        let mut z = vec![0.0f32; n * r];
        // SAFETY: the assertion bounds the strided view of x (n rows of D from `offset`, `stride`
        // apart); W is [R, D] and z a distinct [n, R] buffer.
        unsafe {
            gemm_strided(
                n,
                r,
                d,
                MatMut::row_major(&mut z, r),
                false,
                MatRef {
                    ptr: x.as_ptr().add(offset),
                    rs: stride as isize,
                    cs: 1,
                },
                MatRef::transposed(&self.whiten, d),
                1.0,
                true,
            )
        };
        let mut cross = vec![0.0f32; n * c];
        linear_nobias(&z, &self.means, n, r, c, &mut cross);
        (z, cross)
    }

    /// The expansion's rounding bound for a row with ‖z‖² = zz (see `refine_row`).
    fn bound(&self, zz: f32, ms_max: f32) -> f32 {
        (self.rank as f32 + 4.0) * f32::EPSILON * (zz + ms_max + 2.0 * (zz * ms_max).sqrt())
    }

    /// min_c of one row's squared distances from its cross terms z·m_c: the smallest expansion,
    /// then an exact f64 recomputation of every mean the rounding bound cannot rule out (as
    /// `refine_row`, whose REFINE nearest beyond the bound cannot hold the minimum). Lanes of
    /// eight keep the passes vectorised: at C = 1000 this epilogue otherwise costs a fifth of
    /// the GEMMs.
    fn nearest_row(&self, zr: &[f32], row: &[f32], ms_max: f32) -> f32 {
        let zz = sum_sq(zr);
        let expansion = |x: f32, m: f32| (zz - 2.0 * x + m).max(0.0);
        let mut lanes = [f32::INFINITY; 8];
        let mut chunks = row.chunks_exact(8).zip(self.means_sq.chunks_exact(8));
        for (xc, mc) in &mut chunks {
            for j in 0..8 {
                lanes[j] = lanes[j].min(expansion(xc[j], mc[j]));
            }
        }
        let tail = row.len() / 8 * 8;
        let lowest = row[tail..]
            .iter()
            .zip(&self.means_sq[tail..])
            .fold(f32::INFINITY, |a, (&x, &m)| a.min(expansion(x, m)));
        let lowest = lanes.iter().fold(lowest, |a, &b| a.min(b));
        let cut = lowest + 2.0 * self.bound(zz, ms_max);
        let cut = if cut.is_nan() { f32::INFINITY } else { cut };
        let r = self.rank;
        let mut best = f32::INFINITY;
        for (k, (&x, &m)) in row.iter().zip(&self.means_sq).enumerate() {
            if expansion(x, m) <= cut {
                best = best.min(sq_dist(zr, &self.means[k * r..(k + 1) * r]));
            }
        }
        best
    }

    /// One row of cross terms z·m_c → squared distances, the nearest few recomputed exactly.
    fn refine_row(&self, zr: &[f32], row: &mut [f32], ms_max: f32) {
        let r = self.rank;
        let zz = sum_sq(zr);
        row.iter_mut()
            .zip(&self.means_sq)
            .for_each(|(x, m)| *x = (zz - 2.0 * *x + m).max(0.0));
        // Which means may be the nearest: the expansion's rounding error grows with the norms it
        // cancels (|2z·m| <= 2‖z‖‖m‖, a dot product of r terms), so every mean within twice that
        // bound of the smallest expansion is recomputed, and at least the REFINE nearest. With a
        // near-null direction kept by pinvh, ‖z‖ can reach 1e6 and every expansion is noise:
        // then all are recomputed. The REFINE smallest values are kept in a sorted array (one
        // pass, no allocation): everything at or below the cut is recomputed.
        const REFINE: usize = 4;
        let bound = self.bound(zz, ms_max);
        let mut low = [f32::INFINITY; REFINE];
        for &v in row.iter() {
            if v < low[REFINE - 1] {
                let mut j = REFINE - 1;
                while j > 0 && low[j - 1] > v {
                    low[j] = low[j - 1];
                    j -= 1;
                }
                low[j] = v;
            }
        }
        let cut = low[REFINE - 1].max(low[0] + 2.0 * bound);
        for (k, v) in row.iter_mut().enumerate() {
            if *v <= cut || !v.is_finite() {
                *v = sq_dist(zr, &self.means[k * r..(k + 1) * r]);
            }
        }
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

/// Σ v² in f32 over eight lanes (vectorised; the order differs from a serial sum only in
/// rounding, which the expansion's bound covers).
fn sum_sq(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for ch in &mut chunks {
        for j in 0..8 {
            lanes[j] += ch[j] * ch[j];
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|a| a * a).sum();
    lanes.iter().sum::<f32>() + tail
}

/// ‖a − b‖² accumulated in f64 over four lanes, rounded to f32.
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f64; 4];
    let mut chunks = a.chunks_exact(4).zip(b.chunks_exact(4));
    for (ca, cb) in &mut chunks {
        for j in 0..4 {
            let t = ca[j] as f64 - cb[j] as f64;
            lanes[j] += t * t;
        }
    }
    let tail = a.len() / 4 * 4;
    let rest: f64 = a[tail..]
        .iter()
        .zip(&b[tail..])
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + rest) as f32
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
        Ok(self.score_rows(x, n, d, 0))
    }

    /// Scores of the n rows x[i·stride + offset ..][..D] (rows of one block of [n, L·D] read in
    /// place when stride = L·D).
    pub fn score_rows(&self, x: &[f32], n: usize, stride: usize, offset: usize) -> Vec<f32> {
        let d = self.dim();
        let xn;
        let (x, stride, offset) = if self.normalise {
            xn = if stride == d && offset == 0 {
                l2_normalised(&x[..n * d], d)
            } else {
                let rows: Vec<f32> = x
                    .par_chunks(stride)
                    .take(n)
                    .flat_map_iter(|r| r[offset..offset + d].iter().copied())
                    .collect();
                l2_normalised(&rows, d)
            };
            (&xn[..], d, 0)
        } else {
            (x, stride, offset)
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
        for start in (0..n).step_by(BLOCK) {
            let rows = BLOCK.min(n - start);
            let block = &x[start * stride..];
            for part in &self.parts {
                let red = part.reduced(block, rows, stride, offset, self.reduce);
                best[start..start + rows]
                    .par_iter_mut()
                    .zip(red.par_iter())
                    .for_each(|(b, &v)| match self.reduce {
                        Reduce::Min => *b = b.min(v),
                        Reduce::Mean => *b += v / total as f32,
                    });
            }
        }
        best.into_iter().map(|v| -v).collect()
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

    /// The fused min (`reduced`) against every row's direct f64 distances to every mean, on
    /// rows read through a stride (the middle block of three).
    #[test]
    fn reduced_min_is_the_direct_nearest_distance() {
        let (d, c, n, l) = (5, 11, 37, 3);
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let a: Vec<f64> = (0..d * d).map(|_| next()).collect();
        // Σ = AAᵀ + I/2, means and rows spread around them.
        let sigma: Vec<f64> = (0..d * d)
            .map(|k| {
                let (i, j) = (k / d, k % d);
                (0..d).map(|t| a[i * d + t] * a[j * d + t]).sum::<f64>()
                    + if i == j { 0.5 } else { 0.0 }
            })
            .collect();
        let means: Vec<f64> = (0..c * d).map(|_| 4.0 * next()).collect();
        let x: Vec<f32> = (0..n * l * d).map(|_| (4.0 * next()) as f32).collect();
        let w = Whitened::new(&sigma, &means, d).unwrap();
        let got = w.reduced(&x, n, l * d, d, Reduce::Min);
        let prec = crate::ood::linalg::eigh(&sigma, d).unwrap();
        let (lam, v) = prec;
        for i in 0..n {
            let row = &x[i * l * d + d..i * l * d + 2 * d];
            let want = (0..c)
                .map(|k| {
                    let diff: Vec<f64> = (0..d).map(|t| row[t] as f64 - means[k * d + t]).collect();
                    (0..d)
                        .map(|e| {
                            let p: f64 = (0..d).map(|t| v[t * d + e] * diff[t]).sum();
                            p * p / lam[e]
                        })
                        .sum::<f64>()
                })
                .fold(f64::INFINITY, f64::min);
            assert!(
                (got[i] as f64 - want).abs() < 1e-4 * (1.0 + want),
                "row {i}: {} vs {want}",
                got[i]
            );
        }
    }

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
