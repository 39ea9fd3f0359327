//! RMDS, the relative Mahalanobis distance (Ren et al., 2021; OpenOOD v1.5
//! rmds_postprocessor.py): the class-conditional, tied-covariance distances MD_c (as
//! `mahalanobis`) minus the distance MD_0 to one background Gaussian over all train rows;
//! score = max_c −(MD_c(x) − MD_0(x)) = MD_0(x) − min_c MD_c(x). Both precisions are scipy-style
//! pseudo-inverses of the biased covariances. Both Gaussians are fitted and scored on rows
//! centred on the train mean (distances do not change under a shift): the f32 whitening GEMM then
//! rounds relative to the spread of the features, not to their offset from the origin, which
//! matters here because the score is a difference of two distances.

use rayon::prelude::*;

use crate::error::Result;
use crate::ood::gaussian::{class_means, tied_covariance, GaussianScore, Reduce, Whitened};
use crate::ood::stats::Stats;

pub struct Rmds {
    centre: Vec<f32>,
    class: GaussianScore,
    background: GaussianScore,
}

fn plain(part: Whitened) -> GaussianScore {
    GaussianScore {
        normalise: false,
        reduce: Reduce::Min,
        parts: vec![part],
    }
}

fn centred(x: &[f32], centre: &[f32]) -> Vec<f32> {
    let mut out = x.to_vec();
    out.par_chunks_exact_mut(centre.len())
        .for_each(|r| r.iter_mut().zip(centre).for_each(|(v, c)| *v -= c));
    out
}

impl Rmds {
    pub fn fit(x: &[f32], labels: &[usize], d: usize) -> Result<Rmds> {
        crate::ood::check_rows(x, d, "train features")?;
        let all = vec![0; x.len() / d];
        let (centre, _) = class_means(x, &all, d)?;
        let centre: Vec<f32> = centre.iter().map(|&v| v as f32).collect();
        let x = centred(x, &centre);
        let class = GaussianScore::tied(&x, labels, d)?;
        let (mean, _) = class_means(&x, &all, d)?;
        let sigma = tied_covariance(&x, &all, &mean, d);
        Ok(Rmds {
            centre,
            class,
            background: plain(Whitened::new(&sigma, &mean, d)?),
        })
    }

    pub fn score(&self, x: &[f32]) -> Result<Vec<f32>> {
        crate::ood::check_rows(x, self.centre.len(), "features")?;
        let x = centred(x, &self.centre);
        let class = self.class.score(&x)?;
        let background = self.background.score(&x)?;
        Ok(class.iter().zip(&background).map(|(c, b)| c - b).collect())
    }

    pub fn save(&self, s: &mut Stats) {
        s.put("rmds.centre", &[self.centre.len()], &self.centre);
        self.class.parts[0].save("rmds.class", s);
        self.background.parts[0].save("rmds.background", s);
    }

    pub fn load(s: &Stats, d: usize) -> Result<Rmds> {
        let class = Whitened::load("rmds.class", s)?;
        let background = Whitened::load("rmds.background", s)?;
        let (_, centre) = s.get("rmds.centre", 1)?;
        if class.dim != d || background.dim != d || centre.len() != d {
            return Err(crate::error::Error::Data(format!(
                "rmds statistics are not {d} wide"
            )));
        }
        Ok(Rmds {
            centre,
            class: plain(class),
            background: plain(background),
        })
    }
}
