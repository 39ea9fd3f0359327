//! Activation shaping before the head, scored by the energy LSE(W·s(x) + b) of the shaped
//! feature s(x): ASH (Djurisic et al., ICLR 2023) and SCALE (Xu et al., ICLR 2024), as in
//! OpenOOD v1.5's ash_postprocessor.py / ash_net.py and scale_postprocessor.py / scale_net.py.
//!
//! Per row, the k = D − round(D·p/100) largest entries are kept (round half to even, as numpy):
//! - ASH-P zeroes the others;
//! - ASH-B zeroes the others and sets the kept ones to Σx / k;
//! - ASH-S zeroes the others and multiplies the kept ones by exp(Σx / Σkept);
//! - SCALE multiplies the whole row, nothing zeroed, by exp(Σx / Σkept).
//!
//! OpenOOD shapes the pooled penultimate feature (its ASHNet flattens it to [B, D, 1, 1]); mood
//! shapes the store's pooled feature, the same place. The ASH paper shapes a ResNet's pre-pool
//! map, which a feature store does not hold.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ood::check_rows;
use crate::ood::subspace::{logits, lse};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shaping {
    Prune,
    Binarise,
    Sharpen,
    Scale,
}

impl Shaping {
    pub fn of(method: &str) -> Option<Shaping> {
        Some(match method {
            "ash-p" => Shaping::Prune,
            "ash-b" => Shaping::Binarise,
            "ash-s" => Shaping::Sharpen,
            "scale" => Shaping::Scale,
            _ => return None,
        })
    }
}

/// How many entries of a D-wide row the percentile keeps.
pub fn kept(d: usize, percentile: f64) -> Result<usize> {
    if !(0.0..=100.0).contains(&percentile) {
        return Err(Error::Usage(format!(
            "percentile = {percentile}: it must be in [0, 100] (OpenOOD's scale: 90 prunes 90% of the entries)"
        )));
    }
    let k = d - ((d as f64 * percentile / 100.0).round_ties_even() as usize).min(d);
    if k == 0 {
        return Err(Error::Usage(format!(
            "percentile = {percentile} keeps none of the {d} feature entries; choose a lower one"
        )));
    }
    Ok(k)
}

/// The shaped rows of `x` [n, D].
pub fn shape(x: &[f32], d: usize, percentile: f64, how: Shaping) -> Result<Vec<f32>> {
    check_rows(x, d, "features")?;
    let k = kept(d, percentile)?;
    let mut out = x.to_vec();
    out.par_chunks_mut(d).for_each_init(
        || vec![0.0f32; d],
        |scratch, row| shape_row(row, scratch, k, how),
    );
    Ok(out)
}

fn shape_row(row: &mut [f32], scratch: &mut [f32], k: usize, how: Shaping) {
    let d = row.len();
    scratch.copy_from_slice(row);
    let (_, t, _) = scratch.select_nth_unstable_by(d - k, |a, b| a.total_cmp(b));
    let t = *t;
    // Entries equal to the threshold are kept in index order until k are kept (ties are
    // measure-zero for real features; this only makes the choice deterministic).
    let mut ties = k - row.iter().filter(|&&v| v > t).count();
    let mut keep = |v: f32| {
        v > t
            || (v == t && ties > 0 && {
                ties -= 1;
                true
            })
    };
    let total: f64 = row.iter().map(|&v| v as f64).sum();
    let mask: Vec<bool> = row.iter().map(|&v| keep(v)).collect();
    let kept_sum: f64 = row
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m)
        .map(|(&v, _)| v as f64)
        .sum();
    let gain = (total / kept_sum).exp();
    for (v, &m) in row.iter_mut().zip(&mask) {
        *v = match (how, m) {
            (Shaping::Scale, _) => (*v as f64 * gain) as f32,
            (_, false) => 0.0,
            (Shaping::Prune, true) => *v,
            (Shaping::Binarise, true) => (total / k as f64) as f32,
            (Shaping::Sharpen, true) => (*v as f64 * gain) as f32,
        };
    }
}

/// LSE(W·s(x) + b) per row.
pub fn score(
    x: &[f32],
    d: usize,
    percentile: f64,
    how: Shaping,
    w: &[f32],
    b: &[f32],
) -> Result<Vec<f32>> {
    let shaped = shape(x, d, percentile, how)?;
    Ok(logits(&shaped, w, b, d)
        .par_chunks_exact(b.len())
        .map(|r| lse(r) as f32)
        .collect())
}
