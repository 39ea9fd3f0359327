//! Scores computed from logits z [N, C] (and, for GradNorm, the features f [N, D]), higher = more
//! in-distribution (SPEC D2/D3/D4), each row-wise with max-subtraction for stability:
//!
//! - msp:      max_c softmax(z/T)_c
//! - maxlogit: max_c z_c
//! - energy:   T·logsumexp(z/T)            (the negated free energy)
//! - entropy:  Σ_c p_c log p_c, p = softmax(z)   (the negated entropy)
//! - gradnorm: ‖f‖₁ · Σ_c |C·p_c − 1|      (closed form of ‖∂L/∂W‖₁ for the linear head with
//!   all-ones targets, MOODv2 / GradNorm; p = softmax(z))

use crate::error::{Error, Result};

fn rows(z: &[f32], c: usize) -> Result<std::slice::ChunksExact<'_, f32>> {
    if c == 0 || z.len() % c != 0 {
        return Err(Error::Data(format!(
            "{} logits do not form rows of {c} classes",
            z.len()
        )));
    }
    if let Some(i) = z.iter().position(|v| !v.is_finite()) {
        return Err(Error::Data(format!(
            "logits row {} has a non-finite value",
            i / c
        )));
    }
    Ok(z.chunks_exact(c))
}

fn log_softmax(row: &[f32], t: f64) -> (Vec<f64>, f64) {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64 / t;
    let lse = m + row
        .iter()
        .map(|&v| (v as f64 / t - m).exp())
        .sum::<f64>()
        .ln();
    (row.iter().map(|&v| v as f64 / t - lse).collect(), lse)
}

/// Refuses a temperature that is not a finite number > 0: t = 0 divides by zero and a negative t
/// ranks the least confident rows first.
pub fn check_temperature(t: f32) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "temperature t = {t}: it must be a finite number > 0 (t = 1 is the plain softmax); set --method-arg t=..."
    )))
}

pub fn msp(z: &[f32], c: usize, t: f32) -> Result<Vec<f32>> {
    check_temperature(t)?;
    Ok(rows(z, c)?
        .map(|r| {
            log_softmax(r, t as f64)
                .0
                .into_iter()
                .fold(f64::NEG_INFINITY, f64::max)
                .exp() as f32
        })
        .collect())
}

pub fn maxlogit(z: &[f32], c: usize) -> Result<Vec<f32>> {
    Ok(rows(z, c)?
        .map(|r| r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)))
        .collect())
}

pub fn energy(z: &[f32], c: usize, t: f32) -> Result<Vec<f32>> {
    check_temperature(t)?;
    Ok(rows(z, c)?
        .map(|r| (t as f64 * log_softmax(r, t as f64).1) as f32)
        .collect())
}

pub fn entropy(z: &[f32], c: usize) -> Result<Vec<f32>> {
    Ok(rows(z, c)?
        .map(|r| {
            log_softmax(r, 1.0)
                .0
                .iter()
                .map(|lp| lp.exp() * lp)
                .sum::<f64>() as f32
        })
        .collect())
}

pub fn gradnorm(z: &[f32], c: usize, features: &[f32], d: usize) -> Result<Vec<f32>> {
    let zr = rows(z, c)?;
    if d == 0 || features.len() != (z.len() / c) * d {
        return Err(Error::Data(format!(
            "{} feature values do not match {} logit rows of width {d}",
            features.len(),
            z.len() / c
        )));
    }
    Ok(zr
        .zip(features.chunks_exact(d))
        .map(|(r, f)| {
            let l1: f64 = f.iter().map(|v| v.abs() as f64).sum();
            let s: f64 = log_softmax(r, 1.0)
                .0
                .iter()
                .map(|lp| (c as f64 * lp.exp() - 1.0).abs())
                .sum();
            (l1 * s) as f32
        })
        .collect())
}

/// KL-matching (MOODv2 / SPEC D3): templates q_c = mean softmax of the train rows predicted as c
/// (argmax); score = −min_c KL(p‖q_c), KL(p‖q) = Σ_{p_i > 0} p_i log(p_i / q_i). A class no train
/// row is predicted as has a zero template, an infinite KL, and so never wins the min. Computed as
/// Σ p log p − P·(log Q)ᵀ, one GEMM, with log 0 replaced by −1e30 (p_i·(−1e30) is effectively −∞
/// for any p_i that is not exactly 0, and exactly 0 when p_i is).
pub struct KlMatching {
    c: usize,
    /// log q [C, C]
    log_q: Vec<f32>,
}

fn softmax_rows(z: &[f32], c: usize) -> Vec<f32> {
    z.chunks_exact(c)
        .flat_map(|r| {
            log_softmax(r, 1.0)
                .0
                .into_iter()
                .map(|lp| lp.exp() as f32)
                .collect::<Vec<_>>()
        })
        .collect()
}

impl KlMatching {
    pub fn fit(train_logits: &[f32], c: usize) -> Result<KlMatching> {
        if crate::ood::check_rows(train_logits, c, "train logits")? == 0 {
            // No rows: every template would be empty and every score about -1e30.
            return Err(Error::Data(
                "no train logits (0 rows): KL-matching's class templates are means over train rows"
                    .into(),
            ));
        }
        let p = softmax_rows(train_logits, c);
        let mut q = vec![0.0f64; c * c];
        let mut count = vec![0usize; c];
        for (zr, pr) in train_logits.chunks_exact(c).zip(p.chunks_exact(c)) {
            let y = (0..c).max_by(|&a, &b| zr[a].total_cmp(&zr[b])).unwrap_or(0);
            count[y] += 1;
            q[y * c..(y + 1) * c]
                .iter_mut()
                .zip(pr)
                .for_each(|(a, v)| *a += *v as f64);
        }
        let log_q = q
            .chunks_exact(c)
            .zip(&count)
            .flat_map(|(row, &k)| {
                row.iter()
                    .map(move |v| {
                        if k > 0 && *v > 0.0 {
                            (v / k as f64).ln() as f32
                        } else {
                            -1e30
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(KlMatching { c, log_q })
    }

    pub fn score(&self, z: &[f32]) -> Result<Vec<f32>> {
        crate::ood::check_rows(z, self.c, "logits")?;
        let c = self.c;
        let p = softmax_rows(z, c);
        let n = p.len() / c;
        let mut cross = vec![0.0f32; n * c];
        crate::backend::cpu::matmul::linear_nobias(&p, &self.log_q, n, c, c, &mut cross);
        Ok(p.chunks_exact(c)
            .zip(cross.chunks_exact(c))
            .map(|(pr, cr)| {
                let plogp: f64 = pr
                    .iter()
                    .filter(|&&v| v > 0.0)
                    .map(|&v| v as f64 * (v as f64).ln())
                    .sum();
                let best = cr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64; // max Σ p log q
                -(plogp - best) as f32
            })
            .collect())
    }
}

/// MOS (SPEC F): logits [N, Σ_g (size_g + 1)] in contiguous group slices, each with its "others"
/// category first; score = −min_g softmax(z[slice_g])[0].
pub fn mos(z: &[f32], groups: &[usize]) -> Result<Vec<f32>> {
    let width: usize = groups.iter().map(|g| g + 1).sum();
    Ok(rows(z, width)?
        .map(|r| {
            let mut start = 0;
            let mut worst = f64::INFINITY;
            for g in groups {
                let slice = &r[start..start + g + 1];
                worst = worst.min(log_softmax(slice, 1.0).0[0].exp());
                start += g + 1;
            }
            -worst as f32
        })
        .collect())
}

/// MOS's ImageNet taxonomy (group_config/taxonomy_level0.npy): 8 groups, 1008 logits.
pub const MOS_IMAGENET_GROUPS: [usize; 8] = [398, 521, 9, 7, 52, 8, 3, 2];

impl KlMatching {
    pub fn save(&self, s: &mut crate::ood::stats::Stats) {
        s.put("kl.log_templates", &[self.c, self.c], &self.log_q);
    }

    pub fn load(s: &crate::ood::stats::Stats) -> Result<KlMatching> {
        let (shape, log_q) = s.get("kl.log_templates", 2)?;
        if shape[0] == 0 || shape[0] != shape[1] {
            return Err(crate::error::Error::Data(format!(
                "detector tensor `kl.log_templates` has shape {shape:?}, expected [C, C]"
            )));
        }
        Ok(KlMatching { c: shape[0], log_q })
    }
}
