//! Deep nearest-neighbour OOD score (Sun et al. 2022; SPEC D4): features L2-normalised
//! (x/(‖x‖ + 1e-10)), score = −(squared L2 distance to the k-th nearest train feature), k = 50 by
//! default. Exact search as a blocked GEMM: for unit vectors ‖q − t‖² = 2 − 2 q·t, so the k-th
//! nearest is the k-th largest dot product of a query row, found by selection, not a sort. Queries
//! are processed in blocks so memory stays at block × train floats.

use rayon::prelude::*;

use crate::backend::cpu::matmul::linear_nobias;
use crate::error::{Error, Result};

pub struct Knn {
    pub dim: usize,
    pub k: usize,
    train: Vec<f32>,
    n: usize,
}

fn normalise(x: &[f32], d: usize, what: &str) -> Result<Vec<f32>> {
    crate::ood::check_rows(x, d, what)?;
    let mut out = x.to_vec();
    out.par_chunks_mut(d).for_each(|r| {
        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        r.iter_mut().for_each(|v| *v /= norm + 1e-10);
    });
    Ok(out)
}

impl Knn {
    pub fn fit(features: &[f32], d: usize, k: usize) -> Result<Knn> {
        let train = normalise(features, d, "train features")?;
        let n = train.len() / d;
        if k == 0 || k > n {
            return Err(Error::Usage(format!(
                "k = {k} must be in 1..={n} (the train rows)"
            )));
        }
        Ok(Knn {
            dim: d,
            k,
            train,
            n,
        })
    }

    pub fn score(&self, features: &[f32]) -> Result<Vec<f32>> {
        let q = normalise(features, self.dim, "features")?;
        let rows = q.len() / self.dim;
        let block = 64;
        let mut out = Vec::with_capacity(rows);
        let mut dots = vec![0.0f32; block * self.n];
        for chunk in q.chunks(block * self.dim) {
            let b = chunk.len() / self.dim;
            linear_nobias(
                chunk,
                &self.train,
                b,
                self.dim,
                self.n,
                &mut dots[..b * self.n],
            );
            let kth: Vec<f32> = dots[..b * self.n]
                .par_chunks_mut(self.n)
                .map(|r| {
                    // k-th largest dot = position n − k in ascending order.
                    let (_, v, _) =
                        r.select_nth_unstable_by(self.n - self.k, |a, b| a.total_cmp(b));
                    *v
                })
                .collect();
            let norms: Vec<f32> = chunk
                .chunks(self.dim)
                .map(|r| r.iter().map(|v| v * v).sum())
                .collect();
            // ‖q‖² + 1 − 2 q·t (‖q‖ is 1 up to the 1e-10 guard and rounding).
            out.extend(
                kth.iter()
                    .zip(&norms)
                    .map(|(dot, qq)| -(qq + 1.0 - 2.0 * dot).max(0.0)),
            );
        }
        Ok(out)
    }
}
