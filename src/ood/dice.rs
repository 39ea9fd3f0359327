//! DICE (Sun & Li, ECCV 2022; OpenOOD v1.5 dice_postprocessor.py): the head's weights are
//! sparsified by their contribution to the mean train feature. contrib[c, j] = μ_j·W[c, j] over
//! the train mean μ; the weights whose contribution is above the p-th percentile of all C·D
//! contributions (numpy's linear interpolation) are kept, the rest zeroed; score =
//! LSE(W_masked·x + b). p = 90 by default, as OpenOOD.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::stats::Stats;
use crate::ood::subspace::{logits, lse};

pub struct Dice {
    /// W with the unkept weights zeroed [C, D].
    pub masked: Vec<f32>,
}

/// The p-th percentile (0..=100) of `v` with linear interpolation, as numpy.percentile.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let pos = p / 100.0 * (s.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(s.len() - 1);
    s[lo] + (pos - lo as f64) * (s[hi] - s[lo])
}

/// The mean of the rows of `x` [n, D] in f64.
pub fn column_mean(x: &[f32], d: usize) -> Vec<f64> {
    let n = x.len() / d;
    let mut mean = vec![0.0f64; d];
    for row in x.chunks_exact(d) {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
    mean
}

impl Dice {
    pub fn fit(train: &[f32], d: usize, w: &[f32], p: f64) -> Result<Dice> {
        if check_rows(train, d, "train features")? == 0 {
            return Err(Error::Data("DICE needs train features (0 rows)".into()));
        }
        if !(0.0..=100.0).contains(&p) {
            return Err(Error::Usage(format!(
                "p = {p}: DICE's sparsity percentile must be in [0, 100] (OpenOOD: 90)"
            )));
        }
        let mean = column_mean(train, d);
        let contrib: Vec<f64> = w
            .iter()
            .enumerate()
            .map(|(i, &v)| mean[i % d] * v as f64)
            .collect();
        let t = percentile(&contrib, p);
        let masked = w
            .iter()
            .zip(&contrib)
            .map(|(&v, &c)| if c > t { v } else { 0.0 })
            .collect();
        Ok(Dice { masked })
    }

    pub fn score(&self, x: &[f32], d: usize, b: &[f32]) -> Result<Vec<f32>> {
        check_rows(x, d, "features")?;
        Ok(logits(x, &self.masked, b, d)
            .par_chunks_exact(b.len())
            .map(|r| lse(r) as f32)
            .collect())
    }

    pub fn save(&self, s: &mut Stats, d: usize) {
        s.put("dice.weight", &[self.masked.len() / d, d], &self.masked);
    }

    pub fn load(s: &Stats, d: usize) -> Result<Dice> {
        Ok(Dice {
            masked: s.matrix("dice.weight", d)?.1,
        })
    }
}
