//! SHE, simplified Hopfield energy (Zhang et al., ICLR 2023; OpenOOD v1.5 she_postprocessor.py,
//! its default `inner_product` metric): the pattern of class c is the mean feature of the train
//! rows labelled c and predicted c (argmax of the logits); score = x·pattern_ŷ, ŷ the prediction.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::stats::Stats;

pub struct She {
    pub dim: usize,
    /// [C, D]
    patterns: Vec<f32>,
}

fn argmax(r: &[f32]) -> usize {
    (0..r.len()).fold(0, |best, k| if r[k] > r[best] { k } else { best })
}

impl She {
    pub fn fit(x: &[f32], d: usize, labels: &[usize], z: &[f32], c: usize) -> Result<She> {
        let n = check_rows(x, d, "train features")?;
        check_rows(z, c, "train logits")?;
        if labels.len() != n || z.len() / c != n {
            return Err(Error::Data(format!(
                "SHE: {n} train rows, {} labels and {} logit rows",
                labels.len(),
                z.len() / c
            )));
        }
        if let Some(i) = labels.iter().position(|&y| y >= c) {
            return Err(Error::Data(format!(
                "SHE: train row {i} has label {}, but the logits have {c} classes",
                labels[i]
            )));
        }
        let mut sum = vec![0.0f64; c * d];
        let mut count = vec![0usize; c];
        for ((row, zr), &y) in x.chunks_exact(d).zip(z.chunks_exact(c)).zip(labels) {
            if argmax(zr) == y {
                count[y] += 1;
                sum[y * d..(y + 1) * d]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(s, &v)| *s += v as f64);
            }
        }
        if let Some(k) = count.iter().position(|&k| k == 0) {
            return Err(Error::Data(format!(
                "SHE: no train row of class {k} is predicted as class {k}, so it has no stored pattern; check the head and labels"
            )));
        }
        let patterns = sum
            .chunks_exact(d)
            .zip(&count)
            .flat_map(|(s, &k)| s.iter().map(move |v| (v / k as f64) as f32))
            .collect();
        Ok(She { dim: d, patterns })
    }

    pub fn score(&self, x: &[f32], z: &[f32], c: usize) -> Result<Vec<f32>> {
        let d = self.dim;
        let n = check_rows(x, d, "features")?;
        if c * d != self.patterns.len() || z.len() != n * c {
            return Err(Error::Data(format!(
                "SHE: {} logit values for {n} rows; the detector has {} classes",
                z.len(),
                self.patterns.len() / d
            )));
        }
        // Only the predicted class's pattern is used: one dot product per row (in f64), not an
        // [n, C] GEMM against every pattern.
        Ok(x.par_chunks_exact(d)
            .zip(z.par_chunks_exact(c))
            .map(|(xr, zr)| {
                let p = argmax(zr);
                xr.iter()
                    .zip(&self.patterns[p * d..(p + 1) * d])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>() as f32
            })
            .collect())
    }

    pub fn save(&self, s: &mut Stats) {
        s.put(
            "she.patterns",
            &[self.patterns.len() / self.dim, self.dim],
            &self.patterns,
        );
    }

    pub fn load(s: &Stats, d: usize) -> Result<She> {
        Ok(She {
            dim: d,
            patterns: s.matrix("she.patterns", d)?.1,
        })
    }
}
