//! NNGuide (Park et al., ICCV 2023; OpenOOD v1.5 nnguide_postprocessor.py): a bank of train rows,
//! each its unit feature times its energy LSE(z); score = (mean of the K largest dot products of
//! the query's unit feature with the bank) × LSE(z of the query). Unit here is OpenOOD's
//! x/‖x‖ + 1e-10. K = 100 and α = 0.01 (the bank is that fraction of the train rows) by default.
//! OpenOOD fills the bank with the first batches of a shuffled loader; mood takes ⌈α·n⌉ rows
//! evenly spread over the store (rows ⌊i·n/m⌋), so a store sorted by class gives every class.

use rayon::prelude::*;

use crate::backend::cpu::matmul::linear_nobias;
use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::stats::Stats;
use crate::ood::subspace::lse;

pub struct NnGuide {
    pub dim: usize,
    pub k: usize,
    /// [m, D] guided bank rows.
    bank: Vec<f32>,
}

fn unit_rows(x: &[f32], d: usize) -> Vec<f32> {
    x.par_chunks(d)
        .flat_map_iter(|r| {
            let norm = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            r.iter().map(move |&v| (v as f64 / norm + 1e-10) as f32)
        })
        .collect()
}

impl NnGuide {
    pub fn fit(
        train: &[f32],
        d: usize,
        z: &[f32],
        c: usize,
        k: usize,
        alpha: f64,
    ) -> Result<NnGuide> {
        let n = check_rows(train, d, "train features")?;
        check_rows(z, c, "train logits")?;
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(Error::Usage(format!(
                "alpha = {alpha}: the bank fraction must be in (0, 1] (OpenOOD: 0.01)"
            )));
        }
        let m = ((alpha * n as f64).ceil() as usize).clamp(1, n.max(1));
        if k == 0 || k > m || n == 0 {
            return Err(Error::Usage(format!(
                "nnguide: K = {k} neighbours, but the bank holds {m} of the {n} train rows (alpha = {alpha}); lower K or raise alpha"
            )));
        }
        let rows: Vec<usize> = (0..m).map(|i| i * n / m).collect();
        let picked: Vec<f32> = rows
            .iter()
            .flat_map(|&i| train[i * d..(i + 1) * d].iter().copied())
            .collect();
        let mut bank = unit_rows(&picked, d);
        bank.chunks_exact_mut(d).zip(&rows).for_each(|(r, &i)| {
            let e = lse(&z[i * c..(i + 1) * c]);
            r.iter_mut().for_each(|v| *v = (*v as f64 * e) as f32);
        });
        Ok(NnGuide { dim: d, k, bank })
    }

    pub fn score(&self, x: &[f32], z: &[f32], c: usize) -> Result<Vec<f32>> {
        let d = self.dim;
        let n = check_rows(x, d, "features")?;
        if check_rows(z, c, "logits")? != n {
            return Err(Error::Data(format!(
                "{n} feature rows but {} logit rows",
                z.len() / c
            )));
        }
        let q = unit_rows(x, d);
        let m = self.bank.len() / d;
        let block = ((16 << 20) / m.max(1)).clamp(64, 1024);
        let mut conf = Vec::with_capacity(n);
        let mut dots = vec![0.0f32; block * m];
        for chunk in q.chunks(block * d) {
            let b = chunk.len() / d;
            linear_nobias(chunk, &self.bank, b, d, m, &mut dots[..b * m]);
            conf.par_extend(dots[..b * m].par_chunks_mut(m).map(|r| {
                r.select_nth_unstable_by(m - self.k, |a, b| a.total_cmp(b));
                r[m - self.k..].iter().map(|&v| v as f64).sum::<f64>() / self.k as f64
            }));
        }
        Ok(conf
            .par_iter()
            .zip(z.par_chunks_exact(c))
            .map(|(s, zr)| (s * lse(zr)) as f32)
            .collect())
    }

    pub fn save(&self, s: &mut Stats) {
        s.put(
            "nnguide.bank",
            &[self.bank.len() / self.dim, self.dim],
            &self.bank,
        );
    }

    pub fn load(s: &Stats, k: usize, d: usize) -> Result<NnGuide> {
        let (m, bank) = s.matrix("nnguide.bank", d)?;
        if k == 0 || k > m {
            return Err(Error::Usage(format!(
                "nnguide: K = {k} but the bank holds {m} rows"
            )));
        }
        Ok(NnGuide { dim: d, k, bank })
    }
}
