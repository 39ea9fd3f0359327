//! Scores computed from logits z [N, C] (and, for GradNorm, the features f [N, D]), higher = more
//! in-distribution (SPEC D2/D3/D4), each row-wise with max-subtraction for stability:
//!
//! - msp:      max_c softmax(z/T)_c
//! - maxlogit: max_c z_c
//! - energy:   T·logsumexp(z/T)            (the negated free energy)
//! - entropy:  Σ_c p_c log p_c, p = softmax(z)   (the negated entropy)
//! - gradnorm: ‖f‖₁ · Σ_c |C·p_c − 1|      (closed form of ‖∂L/∂W‖₁ for the linear head with
//!   all-ones targets, MOODv2 / GradNorm; p = softmax(z))

use rayon::prelude::*;

use crate::error::{Error, Result};

fn rows(z: &[f32], c: usize) -> Result<std::slice::ChunksExact<'_, f32>> {
    check_logits(z, c)?;
    Ok(z.chunks_exact(c))
}

/// Refuses logits that are not rows of `c` finite values (the scan runs in parallel).
fn check_logits(z: &[f32], c: usize) -> Result<()> {
    if c == 0 || z.len() % c != 0 {
        return Err(Error::Data(format!(
            "{} logits do not form rows of {c} classes",
            z.len()
        )));
    }
    // By rows: a parallel search per value costs more than the scores.
    if let Some(i) = z
        .par_chunks(c)
        .position_first(|r| r.iter().any(|v| !v.is_finite()))
    {
        return Err(Error::Data(format!(
            "logits row {i} has a non-finite value"
        )));
    }
    Ok(())
}

/// (max_c v_c/t, logsumexp_c v_c/t) of one row, in f64, without a per-row buffer.
fn max_lse(row: &[f32], t: f64) -> (f64, f64) {
    let m = row_max(row) as f64 / t;
    (m, m + sum_exp_shifted(row, t, m).ln())
}

/// The largest value of a row (NaN ignored, as f32::max), over eight lanes so that the compiler
/// vectorises it.
pub(crate) fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for ch in &mut chunks {
        for j in 0..8 {
            lanes[j] = lanes[j].max(ch[j]);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    lanes.iter().fold(tail, |a, &b| a.max(b))
}

/// Σ_k exp(v_k/t − m) over a row whose largest v/t is m, so every exponent is ≤ 0 and the sum
/// is at least 1. libm's exp, one call per value, costs more than the GEMM that made the
/// logits; `exp_nonpositive` is straight-line arithmetic the compiler vectorises. A group of
/// four whose exponents are all below −60 is skipped: together they add less than 4e-26 to a
/// sum of at least 1 (sharp rows, as t2fnorm's logits/τ, are mostly such groups).
pub(crate) fn sum_exp_shifted(row: &[f32], t: f64, m: f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut chunks = row.chunks_exact(4);
    for ch in &mut chunks {
        let x = [0, 1, 2, 3].map(|j| ch[j] as f64 / t - m);
        if x.iter().all(|&v| v < -60.0) {
            continue;
        }
        for j in 0..4 {
            acc[j] += exp_nonpositive(x[j]);
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| exp_nonpositive(v as f64 / t - m))
        .sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// exp(x) for x ≤ 0 to about 2 ulp: x = k·ln2 + r, |r| ≤ ln2/2 (ln2 in two parts, as fdlibm),
/// exp(r) by its Taylor series to r¹² (truncation < 2e-16), times 2^k built in the exponent
/// bits. Exponents below −700 give exp(−700) ≈ 1e-304 (in a sum with a largest term of 1, as
/// good as 0).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5·2^52 rounds to an integer held in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let x = x.max(-700.0);
    let kr = x * std::f64::consts::LOG2_E + ROUND;
    let k = kr - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 479_001_600.0;
    for c in [
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // k in [−1010, 0]: 2^k is a normal number with exponent field k + 1023.
    let ki = kr.to_bits().wrapping_sub(ROUND.to_bits()) as i64;
    p * f64::from_bits(((ki + 1023) as u64) << 52)
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
    check_logits(z, c)?;
    // The largest log-probability is max/t − lse: no row of log-probabilities is built.
    Ok(z.par_chunks_exact(c)
        .map(|r| {
            let (m, lse) = max_lse(r, t as f64);
            (m - lse).exp() as f32
        })
        .collect())
}

pub fn maxlogit(z: &[f32], c: usize) -> Result<Vec<f32>> {
    check_logits(z, c)?;
    Ok(z.par_chunks_exact(c)
        .map(|r| r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)))
        .collect())
}

pub fn energy(z: &[f32], c: usize, t: f32) -> Result<Vec<f32>> {
    check_temperature(t)?;
    check_logits(z, c)?;
    Ok(z.par_chunks_exact(c)
        .map(|r| (t as f64 * max_lse(r, t as f64).1) as f32)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised exp against libm's over the whole range the sums use, and the clamp.
    #[test]
    fn exp_nonpositive_matches_libm() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -700.0 * (i as f64 / 200_000.0).powi(2);
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 1e-14, "max relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e6) <= 1e-300);
    }

    #[test]
    fn msp_is_the_largest_softmax_probability() {
        let z = [1.0f32, 3.0, -2.0, 0.5, 0.5, 0.5];
        let got = msp(&z, 3, 2.0).unwrap();
        for (g, r) in got.iter().zip(z.chunks(3)) {
            let e: Vec<f64> = r.iter().map(|&v| (v as f64 / 2.0).exp()).collect();
            let want = e.iter().cloned().fold(0.0, f64::max) / e.iter().sum::<f64>();
            assert!((*g as f64 - want).abs() < 1e-7, "{g} vs {want}");
        }
    }
}
