//! NCI, neural-collapse inspired detection (Liu & Qin, 2025; OpenOOD v1.5 nci_postprocessor.py):
//! with ŷ = argmax(Wx + b) and μ the train mean,
//! score = W_ŷ·(x − μ) / ‖x − μ‖ + α·‖x‖₁, α = 1e-4 by default (OpenOOD).

use crate::backend::cpu::matmul::linear_nobias;
use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::dice::column_mean;
use crate::ood::stats::Stats;
use crate::ood::subspace::logits;

pub struct Nci {
    pub mean: Vec<f32>,
}

impl Nci {
    pub fn fit(train: &[f32], d: usize) -> Result<Nci> {
        if check_rows(train, d, "train features")? == 0 {
            return Err(Error::Data("NCI needs train features (0 rows)".into()));
        }
        Ok(Nci {
            mean: column_mean(train, d).iter().map(|&v| v as f32).collect(),
        })
    }

    pub fn score(&self, x: &[f32], w: &[f32], b: &[f32], alpha: f64) -> Result<Vec<f32>> {
        let d = self.mean.len();
        let n = check_rows(x, d, "features")?;
        let c = b.len();
        let z = logits(x, w, b, d);
        // W·(x − μ) as its own GEMM: from z it would be z − b − W·μ, a difference of larger terms.
        let centred: Vec<f32> = x
            .chunks_exact(d)
            .flat_map(|r| r.iter().zip(&self.mean).map(|(v, m)| v - m))
            .collect();
        let mut proj = vec![0.0f32; n * c];
        linear_nobias(&centred, w, n, d, c, &mut proj);
        Ok(z.chunks_exact(c)
            .zip(proj.chunks_exact(c))
            .zip(centred.chunks_exact(d).zip(x.chunks_exact(d)))
            .map(|((zr, pr), (cr, xr))| {
                let p = (0..c).fold(0, |best, k| if zr[k] > zr[best] { k } else { best });
                let dist: f64 = cr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                let l1: f64 = xr.iter().map(|&v| (v as f64).abs()).sum();
                (pr[p] as f64 / dist + alpha * l1) as f32
            })
            .collect())
    }

    pub fn save(&self, s: &mut Stats) {
        s.put("nci.mean", &[self.mean.len()], &self.mean);
    }

    pub fn load(s: &Stats, d: usize) -> Result<Nci> {
        let (_, mean) = s.get("nci.mean", 1)?;
        if mean.len() != d {
            return Err(Error::Data(format!(
                "nci.mean has {} values, the features are {d} wide",
                mean.len()
            )));
        }
        Ok(Nci { mean })
    }
}
