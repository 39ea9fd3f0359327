//! Relation (Kim et al., NeurIPS 2023, "Neural Relation Graph"; OpenOOD v1.5
//! relation_postprocessor.py): with unit features u = x/√(‖x‖² + 1e-10) and p = softmax(z), the
//! relation of a query to train row j is r_j = max(0, u·u_j)·(p·p_j); score = Σ_j r_j^pow over
//! the relations above 0.03 (OpenOOD's edge cut-off; r ≥ 0, so its sign factor is 1). pow = 1 by
//! default. Both products are GEMMs against the whole train set, in blocks of query rows.

use rayon::prelude::*;

use crate::backend::cpu::matmul::linear_nobias;
use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::stats::Stats;

const CUT: f32 = 0.03;

pub struct Relation {
    pub dim: usize,
    pub classes: usize,
    /// [n, D] unit train features and [n, C] their softmax.
    feats: Vec<f32>,
    probs: Vec<f32>,
}

fn unit_rows(x: &[f32], d: usize) -> Vec<f32> {
    x.par_chunks(d)
        .flat_map_iter(|r| {
            let norm = (r.iter().map(|&v| v as f64 * v as f64).sum::<f64>() + 1e-10).sqrt();
            r.iter().map(move |&v| (v as f64 / norm) as f32)
        })
        .collect()
}

fn softmax_rows(z: &[f32], c: usize) -> Vec<f32> {
    z.par_chunks(c)
        .flat_map_iter(|r| {
            let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(move |v| (v / s) as f32)
        })
        .collect()
}

impl Relation {
    pub fn fit(x: &[f32], d: usize, z: &[f32], c: usize) -> Result<Relation> {
        let n = check_rows(x, d, "train features")?;
        if check_rows(z, c, "train logits")? != n || n == 0 {
            return Err(Error::Data(format!(
                "Relation: {n} train feature rows and {} logit rows",
                z.len() / c
            )));
        }
        Ok(Relation {
            dim: d,
            classes: c,
            feats: unit_rows(x, d),
            probs: softmax_rows(z, c),
        })
    }

    pub fn score(&self, x: &[f32], z: &[f32], pow: f64) -> Result<Vec<f32>> {
        let (d, c) = (self.dim, self.classes);
        let m = check_rows(x, d, "features")?;
        if check_rows(z, c, "logits")? != m {
            return Err(Error::Data(format!(
                "{m} feature rows but {} logit rows of {c} classes",
                z.len() / c
            )));
        }
        let (u, p) = (unit_rows(x, d), softmax_rows(z, c));
        let n = self.feats.len() / d;
        let block = ((8 << 20) / n.max(1)).clamp(16, 1024);
        let mut out = Vec::with_capacity(m);
        let (mut dots, mut sims) = (vec![0.0f32; block * n], vec![0.0f32; block * n]);
        for (ub, pb) in u.chunks(block * d).zip(p.chunks(block * c)) {
            let b = ub.len() / d;
            linear_nobias(ub, &self.feats, b, d, n, &mut dots[..b * n]);
            linear_nobias(pb, &self.probs, b, c, n, &mut sims[..b * n]);
            out.par_extend(
                dots[..b * n]
                    .par_chunks(n)
                    .zip(sims[..b * n].par_chunks(n))
                    .map(|(dr, sr)| {
                        dr.iter()
                            .zip(sr)
                            .map(|(&a, &s)| a.max(0.0) * s)
                            .filter(|&r| r > CUT)
                            .map(|r| (r as f64).powf(pow))
                            .sum::<f64>() as f32
                    }),
            );
        }
        Ok(out)
    }

    pub fn save(&self, s: &mut Stats) {
        let n = self.feats.len() / self.dim;
        s.put("relation.features", &[n, self.dim], &self.feats);
        s.put("relation.probs", &[n, self.classes], &self.probs);
    }

    pub fn load(s: &Stats, d: usize) -> Result<Relation> {
        let (n, feats) = s.matrix("relation.features", d)?;
        let (shape, probs) = s.get("relation.probs", 2)?;
        if shape[0] != n || shape[1] == 0 {
            return Err(Error::Data(format!(
                "relation.probs has shape {shape:?}, the bank {n} rows"
            )));
        }
        Ok(Relation {
            dim: d,
            classes: shape[1],
            feats,
            probs,
        })
    }
}
