//! Distance to the nearest centroid of the L2-normalised train features (SPEC D1, MOOD v1):
//! `euclidean` (L2), `minkowski` (L1, as MOOD v1's code computes despite the name) and `chebyshev`
//! (L∞) to the mean, and `kmeans`: L2 to the nearest of k centroids, k-means++ seeded then Lloyd
//! iterations (k = 1 is the mean, so it equals `euclidean`). Score = −distance.

use rayon::prelude::*;

use crate::backend::cpu::matmul::linear_nobias;
use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::gaussian::l2_normalised;
use crate::ood::stats::Stats;
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distance {
    L2,
    L1,
    LInf,
}

pub struct Centroids {
    pub dim: usize,
    pub distance: Distance,
    /// [k, D]
    centroids: Vec<f32>,
}

/// Squared L2 distances [n, k] between rows of x and of c, as ‖x‖² − 2x·c + ‖c‖² (one GEMM).
fn sq_distances(x: &[f32], c: &[f32], d: usize) -> Vec<f32> {
    let (n, k) = (x.len() / d, c.len() / d);
    let mut out = vec![0.0f32; n * k];
    linear_nobias(x, c, n, d, k, &mut out);
    let cc: Vec<f32> = c
        .chunks_exact(d)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect();
    out.par_chunks_mut(k)
        .zip(x.par_chunks(d))
        .for_each(|(row, xr)| {
            let xx: f32 = xr.iter().map(|v| v * v).sum();
            row.iter_mut()
                .zip(&cc)
                .for_each(|(v, c2)| *v = (xx - 2.0 * *v + c2).max(0.0));
        });
    out
}

fn nearest(row: &[f32]) -> (usize, f32) {
    row.iter().enumerate().fold(
        (0, f32::INFINITY),
        |b, (i, &v)| if v < b.1 { (i, v) } else { b },
    )
}

/// k-means++ seeding (D² sampling) then Lloyd iterations until the assignment stops changing.
fn kmeans(x: &[f32], d: usize, k: usize, seed: u64, max_iter: usize) -> Vec<f32> {
    let n = x.len() / d;
    let mut rng = Rng::new(seed);
    let mut centroids = Vec::with_capacity(k * d);
    let first = (rng.uniform() * n as f64) as usize % n;
    centroids.extend_from_slice(&x[first * d..(first + 1) * d]);
    let mut closest: Vec<f32> = sq_distances(x, &centroids, d);
    while centroids.len() < k * d {
        let total: f64 = closest.iter().map(|&v| v as f64).sum();
        let pick = if total > 0.0 {
            let mut target = rng.uniform() * total;
            closest
                .iter()
                .position(|&v| {
                    target -= v as f64;
                    target <= 0.0
                })
                .unwrap_or(n - 1)
        } else {
            (rng.uniform() * n as f64) as usize % n
        };
        let c = &x[pick * d..(pick + 1) * d];
        let dist = sq_distances(x, c, d);
        closest
            .iter_mut()
            .zip(dist)
            .for_each(|(a, b)| *a = a.min(b));
        centroids.extend_from_slice(c);
    }
    let mut assign = vec![usize::MAX; n];
    for _ in 0..max_iter {
        let dist = sq_distances(x, &centroids, d);
        let next: Vec<usize> = dist.chunks_exact(k).map(|r| nearest(r).0).collect();
        if next == assign {
            break;
        }
        assign = next;
        let mut sums = vec![0.0f64; k * d];
        let mut counts = vec![0usize; k];
        for (row, &a) in x.chunks_exact(d).zip(&assign) {
            counts[a] += 1;
            sums[a * d..(a + 1) * d]
                .iter_mut()
                .zip(row)
                .for_each(|(s, v)| *s += *v as f64);
        }
        for c in 0..k {
            // An emptied cluster keeps its centroid.
            if counts[c] > 0 {
                for j in 0..d {
                    centroids[c * d + j] = (sums[c * d + j] / counts[c] as f64) as f32;
                }
            }
        }
    }
    centroids
}

impl Centroids {
    /// The mean of the normalised rows (k = 1) or k-means centroids (L2 only).
    pub fn fit(x: &[f32], d: usize, distance: Distance, k: usize, seed: u64) -> Result<Centroids> {
        let n = check_rows(x, d, "train features")?;
        if k == 0 || k > n {
            return Err(Error::Usage(format!(
                "k = {k} clusters must be in 1..={n} (the train rows)"
            )));
        }
        if k > 1 && distance != Distance::L2 {
            return Err(Error::Usage("k-means clusters use the L2 distance".into()));
        }
        let xn = l2_normalised(x, d);
        let centroids = if k == 1 {
            let mut mean = vec![0.0f64; d];
            for row in xn.chunks_exact(d) {
                mean.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64);
            }
            mean.iter().map(|m| (m / n as f64) as f32).collect()
        } else {
            kmeans(&xn, d, k, seed, 300)
        };
        Ok(Centroids {
            dim: d,
            distance,
            centroids,
        })
    }

    pub fn score(&self, x: &[f32]) -> Result<Vec<f32>> {
        let d = self.dim;
        check_rows(x, d, "features")?;
        let xn = l2_normalised(x, d);
        let k = self.centroids.len() / d;
        Ok(match self.distance {
            Distance::L2 => sq_distances(&xn, &self.centroids, d)
                .chunks_exact(k)
                .map(|r| -nearest(r).1.sqrt())
                .collect(),
            Distance::L1 | Distance::LInf => xn
                .par_chunks(d)
                .map(|row| {
                    let best = self
                        .centroids
                        .chunks_exact(d)
                        .map(|c| {
                            let diffs = row.iter().zip(c).map(|(a, b)| (a - b).abs());
                            if self.distance == Distance::L1 {
                                diffs.sum::<f32>()
                            } else {
                                diffs.fold(0.0f32, f32::max)
                            }
                        })
                        .fold(f32::INFINITY, f32::min);
                    -best
                })
                .collect(),
        })
    }

    pub fn save(&self, s: &mut Stats) {
        s.put(
            "centroids",
            &[self.centroids.len() / self.dim, self.dim],
            &self.centroids,
        );
    }

    /// The centroids of a detector file fitted on `dim`-wide features (the header's width).
    pub fn load(s: &Stats, distance: Distance, dim: usize) -> Result<Centroids> {
        let (_, centroids) = s.matrix("centroids", dim)?;
        Ok(Centroids {
            dim,
            distance,
            centroids,
        })
    }
}
