//! fDBD, the feature distance to decision boundaries (Liu & Qin, ICML 2024; OpenOOD v1.5
//! fdbd_postprocessor.py): with z = Wx + b and ŷ = argmax z,
//! score = Σ_{c≠ŷ} |z_c − z_ŷ| / ‖W_c − W_ŷ‖ divided by ‖x − μ‖ (μ the train mean; OpenOOD's
//! default, `distance_as_normalizer=true`) or by ‖x‖ (`false`). The C×C boundary norms come from
//! one Gram matrix of the head.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::dice::column_mean;
use crate::ood::linalg::matmul_nt;
use crate::ood::stats::Stats;
use crate::ood::subspace::logits;

pub struct Fdbd {
    /// The train mean [D], or zeros when dividing by ‖x‖.
    pub centre: Vec<f32>,
    /// 1/‖W_c − W_p‖ [C, C] (row p = predicted class), 1 on the diagonal.
    inv_gap: Vec<f32>,
}

impl Fdbd {
    pub fn fit(train: &[f32], d: usize, w: &[f32], by_distance: bool) -> Result<Fdbd> {
        if check_rows(train, d, "train features")? == 0 {
            return Err(Error::Data("fDBD needs train features (0 rows)".into()));
        }
        let c = w.len() / d;
        let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let gram = matmul_nt(&w64, &w64, d);
        let mut inv_gap = vec![1.0f32; c * c];
        for p in 0..c {
            for q in (0..c).filter(|&q| q != p) {
                let g2 = gram[p * c + p] + gram[q * c + q] - 2.0 * gram[p * c + q];
                if g2 <= 0.0 {
                    return Err(Error::Data(format!(
                        "fDBD: head rows {p} and {q} are equal, so their decision boundary is undefined"
                    )));
                }
                inv_gap[p * c + q] = (1.0 / g2.sqrt()) as f32;
            }
        }
        let centre = if by_distance {
            column_mean(train, d).iter().map(|&v| v as f32).collect()
        } else {
            vec![0.0; d]
        };
        Ok(Fdbd { centre, inv_gap })
    }

    pub fn score(&self, x: &[f32], w: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        let d = self.centre.len();
        check_rows(x, d, "features")?;
        let c = b.len();
        let z = logits(x, w, b, d);
        Ok(z.par_chunks_exact(c)
            .zip(x.par_chunks_exact(d))
            .map(|(zr, xr)| {
                let p = (0..c).fold(0, |best, k| if zr[k] > zr[best] { k } else { best });
                let gaps = &self.inv_gap[p * c..(p + 1) * c];
                // Four lanes: a serial f64 sum over C would cost more than the GEMM.
                let top = zr[p] as f64;
                let mut lanes = [0.0f64; 4];
                let mut chunks = zr.chunks_exact(4).zip(gaps.chunks_exact(4));
                for (zc, gc) in &mut chunks {
                    for j in 0..4 {
                        lanes[j] += (zc[j] as f64 - top).abs() * gc[j] as f64;
                    }
                }
                let tail = c / 4 * 4;
                let sum: f64 = (lanes[0] + lanes[1])
                    + (lanes[2] + lanes[3])
                    + zr[tail..]
                        .iter()
                        .zip(&gaps[tail..])
                        .map(|(&v, &g)| (v as f64 - top).abs() * g as f64)
                        .sum::<f64>();
                let dist: f64 = xr
                    .iter()
                    .zip(&self.centre)
                    .map(|(&v, &m)| (v as f64 - m as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                (sum / dist) as f32
            })
            .collect())
    }

    pub fn save(&self, s: &mut Stats) {
        let c = (self.inv_gap.len() as f64).sqrt() as usize;
        s.put("fdbd.centre", &[self.centre.len()], &self.centre);
        s.put("fdbd.inv_gap", &[c, c], &self.inv_gap);
    }

    pub fn load(s: &Stats, d: usize) -> Result<Fdbd> {
        let (_, centre) = s.get("fdbd.centre", 1)?;
        let (shape, inv_gap) = s.get("fdbd.inv_gap", 2)?;
        if centre.len() != d || shape[0] != shape[1] {
            return Err(Error::Data(format!(
                "fdbd statistics: centre of {} values, gaps {shape:?}, features {d} wide",
                centre.len()
            )));
        }
        Ok(Fdbd { centre, inv_gap })
    }
}
