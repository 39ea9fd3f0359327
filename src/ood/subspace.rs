//! Scores that use the linear head W [C, D], b [C] (SPEC D3, MOODv2 / ViM):
//!
//! - ReAct: clip = the q-quantile (numpy's linear interpolation) of all train feature entries,
//!   score = LSE(W·min(x, clip) + b). q = 0.99 (MOODv2) by default, 0.90 as OpenOOD.
//! - ViM: origin u = −W⁺b; Σ = (1/n)Σ(f − u)(f − u)ᵀ; NS = the eigenvectors after the DIM largest
//!   eigenvalues; r(x) = ‖NSᵀ(x − u)‖; α = mean_train(max_c z_c) / mean_train(r);
//!   score = −α·r(x) + LSE(z). DIM: D ≥ 2048 → C; D ≥ 768 → 512; else ⌊D/2⌋.
//! - Residual: −r(x), with DIM = 1000 when D ≥ 2048.
//!
//! z = Wx + b is computed from the features, so a store needs only features and the head.

use rayon::prelude::*;

use crate::backend::cpu::matmul::linear_nobias;
use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::linalg::{eigh, scatter};

/// z = x·Wᵀ + b for rows of x [n, D].
pub fn logits(x: &[f32], w: &[f32], b: &[f32], d: usize) -> Vec<f32> {
    let (n, c) = (x.len() / d, b.len());
    let mut z = vec![0.0f32; n * c];
    linear_nobias(x, w, n, d, c, &mut z);
    z.par_chunks_exact_mut(c)
        .for_each(|r| r.iter_mut().zip(b).for_each(|(v, bb)| *v += bb));
    z
}

pub(crate) fn lse(row: &[f32]) -> f64 {
    let m = crate::ood::logits::row_max(row) as f64;
    m + crate::ood::logits::sum_exp_shifted(row, 1.0, m).ln()
}

fn check_head(w: &[f32], b: &[f32], d: usize) -> Result<()> {
    if b.is_empty() || w.len() != b.len() * d {
        return Err(Error::Data(format!(
            "head: weight has {} values, expected {} classes x {d} features",
            w.len(),
            b.len()
        )));
    }
    Ok(())
}

/// numpy.quantile with linear interpolation over all values.
pub fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    (v[lo] as f64 + (pos - lo as f64) * (v[hi] as f64 - v[lo] as f64)) as f32
}

pub struct React {
    pub clip: f32,
}

impl React {
    pub fn fit(train: &[f32], d: usize, percentile: f64) -> Result<React> {
        check_rows(train, d, "train features")?;
        if train.is_empty() || !(0.0..=1.0).contains(&percentile) {
            return Err(Error::Usage(format!(
                "ReAct needs train features and a percentile in [0, 1], got {percentile}"
            )));
        }
        Ok(React {
            clip: quantile(train, percentile),
        })
    }

    pub fn score(&self, x: &[f32], w: &[f32], b: &[f32], d: usize) -> Result<Vec<f32>> {
        check_rows(x, d, "features")?;
        check_head(w, b, d)?;
        let clipped: Vec<f32> = x.iter().map(|v| v.min(self.clip)).collect();
        Ok(logits(&clipped, w, b, d)
            .chunks_exact(b.len())
            .map(|r| lse(r) as f32)
            .collect())
    }
}

/// The ViM / Residual subspace fitted on train features.
pub struct Vim {
    d: usize,
    origin: Vec<f64>,
    /// NS as rows [D − DIM, D]
    ns: Vec<f32>,
    pub alpha: f64,
}

/// ViM's DIM rule (`residual` uses 1000 instead of C for D ≥ 2048).
pub fn principal_dim(d: usize, classes: usize, residual: bool) -> usize {
    if d >= 2048 {
        if residual {
            1000
        } else {
            classes
        }
    } else if d >= 768 {
        512
    } else {
        d / 2
    }
}

impl Vim {
    pub fn fit(train: &[f32], w: &[f32], b: &[f32], d: usize, dim: usize) -> Result<Vim> {
        let n = check_rows(train, d, "train features")?;
        check_head(w, b, d)?;
        if n == 0 || dim >= d {
            return Err(Error::Usage(format!(
                "ViM needs train features and DIM < D ({dim} >= {d})"
            )));
        }
        let c = b.len();
        // u = −W⁺b through the eigendecomposition of WᵀW: W⁺ = (WᵀW)⁺Wᵀ.
        let wtw = scatter(w, d, |_| None);
        let (lam, v) = eigh(&wtw, d)?;
        let max = lam.iter().fold(0.0f64, |m, l| m.max(l.abs()));
        let wtb: Vec<f64> = (0..d)
            .map(|j| (0..c).map(|k| w[k * d + j] as f64 * b[k] as f64).sum())
            .collect();
        let mut origin = vec![0.0f64; d];
        for (i, &l) in lam.iter().enumerate() {
            if l > max * 1e-12 {
                let proj: f64 = (0..d).map(|k| v[k * d + i] * wtb[k]).sum::<f64>() / l;
                for k in 0..d {
                    origin[k] -= proj * v[k * d + i];
                }
            }
        }
        // Rounded to f32 here because detector files store f32: a loaded detector scores exactly
        // as the fitted one.
        origin.iter_mut().for_each(|u| *u = *u as f32 as f64);
        let mut sigma = scatter(train, d, |_| Some(&origin[..]));
        sigma.iter_mut().for_each(|v| *v /= n as f64);
        let (lam, v) = eigh(&sigma, d)?;
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| lam[b].total_cmp(&lam[a]));
        let ns: Vec<f32> = order[dim..]
            .iter()
            .flat_map(|&i| (0..d).map(|k| v[k * d + i] as f32).collect::<Vec<_>>())
            .collect();
        let mut vim = Vim {
            d,
            origin,
            ns,
            alpha: 1.0,
        };
        let r = vim.residual(train)?;
        let z = logits(train, w, b, d);
        let mean_max: f64 = z
            .chunks_exact(c)
            .map(|r| r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64)
            .sum::<f64>()
            / n as f64;
        let mean_r: f64 = r.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        vim.alpha = (mean_max / mean_r.max(1e-30)) as f32 as f64; // f32 as stored
        Ok(vim)
    }

    /// ‖NSᵀ(x − u)‖ per row.
    pub fn residual(&self, x: &[f32]) -> Result<Vec<f32>> {
        let n = check_rows(x, self.d, "features")?;
        let k = self.ns.len() / self.d;
        let centred: Vec<f32> = x
            .chunks_exact(self.d)
            .flat_map(|r| {
                r.iter()
                    .zip(&self.origin)
                    .map(|(a, u)| (*a as f64 - u) as f32)
            })
            .collect();
        let mut proj = vec![0.0f32; n * k];
        linear_nobias(&centred, &self.ns, n, self.d, k, &mut proj);
        Ok(proj
            .chunks_exact(k.max(1))
            .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
            .collect())
    }

    pub fn score(&self, x: &[f32], w: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        check_head(w, b, self.d)?;
        let r = self.residual(x)?;
        let z = logits(x, w, b, self.d);
        Ok(z.chunks_exact(b.len())
            .zip(&r)
            .map(|(row, rr)| (lse(row) - self.alpha * *rr as f64) as f32)
            .collect())
    }
}

impl Vim {
    pub fn save(&self, s: &mut crate::ood::stats::Stats) {
        let origin: Vec<f32> = self.origin.iter().map(|&v| v as f32).collect();
        s.put("vim.origin", &[self.d], &origin);
        s.put("vim.ns", &[self.ns.len() / self.d, self.d], &self.ns);
        s.put("vim.alpha", &[1], &[self.alpha as f32]);
    }

    /// The subspace of a detector file fitted on `dim`-wide features (the header's width).
    pub fn load(s: &crate::ood::stats::Stats, dim: usize) -> Result<Vim> {
        let (_, origin) = s.get("vim.origin", 1)?;
        let (_, ns) = s.matrix("vim.ns", dim)?;
        if origin.len() != dim {
            return Err(Error::Data(format!(
                "vim.origin has {} values, the detector's features are {dim} wide",
                origin.len()
            )));
        }
        Ok(Vim {
            d: dim,
            origin: origin.iter().map(|&v| v as f64).collect(),
            ns,
            alpha: s.scalar("vim.alpha")? as f64,
        })
    }
}
