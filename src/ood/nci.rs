//! NCI, neural-collapse inspired detection (Liu & Qin, 2025; OpenOOD v1.5 nci_postprocessor.py):
//! with ŷ = argmax(Wx + b) and μ the train mean,
//! score = W_ŷ·(x − μ) / ‖x − μ‖ + α·‖x‖₁, α = 1e-4 by default (OpenOOD).

use rayon::prelude::*;

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
        if w.len() != c * d {
            return Err(Error::Data(format!(
                "nci: head weight of {} values for {c} classes x {d} features",
                w.len()
            )));
        }
        let z = logits(x, w, b, d);
        debug_assert_eq!(z.len(), n * c);
        // Only the predicted class's projection w_p·(x − μ) is used: one dot product per row, in
        // f64 on the centred row (not z − b − W·μ, a difference of larger terms), after the
        // logits' GEMM, instead of a second [n, C] GEMM of all the centred rows.
        Ok(z.par_chunks_exact(c)
            .zip(x.par_chunks_exact(d))
            .map(|(zr, xr)| {
                let p = (0..c).fold(0, |best, k| if zr[k] > zr[best] { k } else { best });
                let wp = &w[p * d..(p + 1) * d];
                let (mut proj, mut sq, mut l1) = (0.0f64, 0.0f64, 0.0f64);
                for ((&v, &m), &wv) in xr.iter().zip(&self.mean).zip(wp) {
                    let cv = (v - m) as f64;
                    proj += cv * wv as f64;
                    sq += cv * cv;
                    l1 += (v as f64).abs();
                }
                (proj / sq.sqrt() + alpha * l1) as f32
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
