//! MODE's cross-scale decision (SPEC E, Part 1 `csd`) on a ViT. From the last block's patch tokens
//! on their h×w grid, each image gives 6 vectors: the 4 quadrant means (adaptive average pooling to
//! 2×2, row-major), the global mean, and the centre mean over rows and columns
//! [⌊h/4⌋, h − ⌊h/4⌋) (MODE's [1:3] on a 4×4 map; symmetric on grids like 14×14). Each passes
//! through the model's fc_norm when given and is L2-normalised. All 6·n train vectors form one
//! pool; a test image's score is −min over its 6 scales of the squared distance to the k-th
//! nearest pooled vector (k = 10).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ood::knn::Knn;
use crate::ood::stats::Stats;

pub const SCALES: usize = 6;

pub use crate::features::FcNorm;

pub struct Csd {
    pub tokens: usize,
    pub dim: usize,
    norm: Option<FcNorm>,
    knn: Knn,
}

/// Start and end of output cell `i` of `cells` in adaptive average pooling over `len` inputs.
fn adaptive(i: usize, cells: usize, len: usize) -> (usize, usize) {
    (i * len / cells, ((i + 1) * len).div_ceil(cells))
}

/// The 6 scale vectors [n·6, D] of local features [n, T, D] (T a square grid).
pub fn scale_vectors(
    local: &[f32],
    tokens: usize,
    d: usize,
    norm: Option<&FcNorm>,
) -> Result<Vec<f32>> {
    let h = (tokens as f64).sqrt().round() as usize;
    if h * h != tokens || h < 2 {
        return Err(Error::Data(format!(
            "csd: {tokens} patch tokens do not form a square grid of at least 2x2"
        )));
    }
    if let Some(nm) = norm {
        if nm.weight.len() != d || nm.bias.len() != d {
            return Err(Error::Data(format!(
                "csd: fc_norm has {} weights for {d}-wide features",
                nm.weight.len()
            )));
        }
    }
    crate::ood::check_rows(local, tokens * d, "local features")?;
    let c0 = h / 4;
    let mut regions: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(SCALES);
    for i in 0..2 {
        for j in 0..2 {
            let (r0, r1) = adaptive(i, 2, h);
            let (q0, q1) = adaptive(j, 2, h);
            regions.push((r0, r1, q0, q1));
        }
    }
    regions.push((0, h, 0, h));
    regions.push((c0, h - c0, c0, h - c0));
    let mut out = vec![0.0f32; local.len() / (tokens * d) * SCALES * d];
    out.par_chunks_mut(SCALES * d)
        .zip(local.par_chunks(tokens * d))
        .for_each(|(dst, img)| {
            for (s, &(r0, r1, q0, q1)) in regions.iter().enumerate() {
                let v = &mut dst[s * d..(s + 1) * d];
                let mut acc = vec![0.0f64; d];
                for r in r0..r1 {
                    for q in q0..q1 {
                        let t = &img[(r * h + q) * d..(r * h + q + 1) * d];
                        acc.iter_mut().zip(t).for_each(|(a, x)| *a += *x as f64);
                    }
                }
                let cnt = ((r1 - r0) * (q1 - q0)) as f64;
                let mean: Vec<f64> = acc.iter().map(|a| a / cnt).collect();
                match norm {
                    Some(nm) => {
                        let mu = mean.iter().sum::<f64>() / d as f64;
                        let var = mean.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / d as f64;
                        let inv = 1.0 / (var + nm.eps as f64).sqrt();
                        for k in 0..d {
                            v[k] = ((mean[k] - mu) * inv * nm.weight[k] as f64 + nm.bias[k] as f64)
                                as f32;
                        }
                    }
                    None => v.iter_mut().zip(&mean).for_each(|(o, m)| *o = *m as f32),
                }
            }
        });
    Ok(out)
}

impl Csd {
    pub fn fit(
        local: &[f32],
        tokens: usize,
        d: usize,
        norm: Option<FcNorm>,
        k: usize,
    ) -> Result<Csd> {
        let pool = scale_vectors(local, tokens, d, norm.as_ref())?;
        Ok(Csd {
            tokens,
            dim: d,
            knn: Knn::fit(&pool, d, k)?,
            norm,
        })
    }

    pub fn score(&self, local: &[f32]) -> Result<Vec<f32>> {
        let v = scale_vectors(local, self.tokens, self.dim, self.norm.as_ref())?;
        Ok(self
            .knn
            .score(&v)?
            .chunks_exact(SCALES)
            .map(|s| s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)))
            .collect())
    }

    pub fn save(&self, s: &mut Stats) {
        self.knn.save(s);
        s.put("tokens", &[1], &[self.tokens as f32]);
        if let Some(nm) = &self.norm {
            s.put("fc_norm.weight", &[self.dim], &nm.weight);
            s.put("fc_norm.bias", &[self.dim], &nm.bias);
            s.put("fc_norm.eps", &[1], &[nm.eps]);
        }
    }

    /// The detector of a file fitted on `dim`-wide token features (the header's width).
    pub fn load(s: &Stats, k: usize, dim: usize) -> Result<Csd> {
        let knn = Knn::load(s, k, dim)?;
        let t = s.scalar("tokens")?;
        // A token count is a small whole number; anything else would wrap `tokens × dim`.
        if !((1.0..=1e6).contains(&t) && t.fract() == 0.0) {
            return Err(Error::Data(format!(
                "detector tensor `tokens` is {t}, not a token count"
            )));
        }
        let tokens = t as usize;
        let norm = if s.contains("fc_norm.weight") {
            let norm = FcNorm {
                weight: s.get("fc_norm.weight", 1)?.1,
                bias: s.get("fc_norm.bias", 1)?.1,
                eps: s.scalar("fc_norm.eps")?,
            };
            if norm.weight.len() != dim || norm.bias.len() != dim {
                return Err(Error::Data(format!(
                    "detector fc_norm has {} weights and {} biases, expected {dim}",
                    norm.weight.len(),
                    norm.bias.len()
                )));
            }
            Some(norm)
        } else {
            None
        };
        Ok(Csd {
            tokens,
            dim: knn.dim,
            norm,
            knn,
        })
    }
}
