//! Deep nearest-neighbour OOD score (Sun et al. 2022; SPEC D4): features L2-normalised
//! (x/(‖x‖ + 1e-10)), score = −(squared L2 distance to the k-th nearest train feature), k = 50 by
//! default. Exact search as a blocked GEMM: for unit vectors ‖q − t‖² = 2 − 2 q·t, so the k-th
//! nearest is the k-th largest dot product of a query row, found by selection, not a sort. Queries
//! are processed in blocks so memory stays at block × train floats.

use rayon::prelude::*;

use crate::backend::cpu::matmul::linear_nobias;
use crate::error::{Error, Result};
use crate::ood::stats::Stats;

pub struct Knn {
    pub dim: usize,
    pub k: usize,
    train: Vec<f32>,
    n: usize,
}

fn normalise(x: &[f32], d: usize, what: &str) -> Result<Vec<f32>> {
    crate::ood::check_rows(x, d, what)?;
    Ok(crate::ood::gaussian::l2_normalised(x, d))
}

impl Knn {
    pub fn fit(features: &[f32], d: usize, k: usize) -> Result<Knn> {
        let train = normalise(features, d, "train features")?;
        let n = train.len() / d;
        if n == 0 {
            return Err(Error::Data(
                "no train features (0 rows) to search for neighbours".into(),
            ));
        }
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

    /// The L2-normalised train rows [n, D] and n.
    pub fn bank(&self) -> (&[f32], usize) {
        (&self.train, self.n)
    }

    /// The k-th largest dot product of each normalised query row with the normalised train rows.
    fn kth_dots(&self, features: &[f32]) -> Result<Vec<f32>> {
        let q = normalise(features, self.dim, "features")?;
        // Query rows per GEMM: enough for an efficient GEMM, with the [block, n] dot products
        // kept near 64 MB.
        let block = ((16 << 20) / self.n.max(1)).clamp(64, 1024);
        let mut kth = Vec::new();
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
            kth.par_extend(dots[..b * self.n].par_chunks_mut(self.n).map(|r| {
                // k-th largest dot = position n − k in ascending order.
                let (_, v, _) = r.select_nth_unstable_by(self.n - self.k, |a, b| a.total_cmp(b));
                *v
            }));
        }
        Ok(kth)
    }

    /// −‖q − t_(k)‖² = −(‖q‖² + 1 − 2 q·t_(k)) (‖q‖ is 1 up to the 1e-10 guard and rounding):
    /// `score_many` at the fitted k.
    pub fn score(&self, features: &[f32]) -> Result<Vec<f32>> {
        Ok(self
            .score_many(features, &[self.k])?
            .pop()
            .expect("one k, one score vector"))
    }

    /// `score` for each of `ks` (each in 1..=the fitted k) from one pass of GEMMs: one selection
    /// at the fitted k per row, then a sort of those k dot products, gives every smaller k-th.
    /// Row j of the result holds the scores for ks[j].
    pub fn score_many(&self, features: &[f32], ks: &[usize]) -> Result<Vec<Vec<f32>>> {
        if let Some(&k) = ks.iter().find(|&&k| k == 0 || k > self.k) {
            return Err(Error::Usage(format!(
                "k = {k}: this pass was fitted for k in 1..={}",
                self.k
            )));
        }
        let q = normalise(features, self.dim, "features")?;
        let block = ((16 << 20) / self.n.max(1)).clamp(64, 1024);
        let mut per_row: Vec<Vec<f32>> = Vec::new();
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
            per_row.par_extend(
                dots[..b * self.n]
                    .par_chunks_mut(self.n)
                    .zip(chunk.par_chunks(self.dim))
                    .map(|(r, qr)| {
                        r.select_nth_unstable_by(self.n - self.k, |a, b| a.total_cmp(b));
                        let top = &mut r[self.n - self.k..];
                        top.sort_unstable_by(|a, b| b.total_cmp(a));
                        let qq: f32 = qr.iter().map(|v| v * v).sum();
                        ks.iter()
                            .map(|&k| -(qq + 1.0 - 2.0 * top[k - 1]).max(0.0))
                            .collect::<Vec<f32>>()
                    }),
            );
        }
        Ok((0..ks.len())
            .map(|j| per_row.iter().map(|r| r[j]).collect())
            .collect())
    }

    /// The cosine similarity to the k-th most similar train row (k = 1: MOOD v1's `cos`).
    pub fn cosine(&self, features: &[f32]) -> Result<Vec<f32>> {
        self.kth_dots(features)
    }

    pub fn save(&self, s: &mut Stats) {
        s.put("train", &[self.n, self.dim], &self.train);
    }

    /// The bank of a detector file fitted on `dim`-wide features (the header's width: a bank of
    /// another width would split query rows wrongly).
    pub fn load(s: &Stats, k: usize, dim: usize) -> Result<Knn> {
        let (n, train) = s.matrix("train", dim)?;
        if k == 0 || k > n {
            return Err(Error::Usage(format!(
                "k = {k} must be in 1..={n} (the train rows)"
            )));
        }
        Ok(Knn { dim, k, train, n })
    }
}
