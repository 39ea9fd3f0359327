//! OOD detection metrics. One convention: a score is "higher = more in-distribution" and the ID set
//! is the positive class (SPEC Part 1).
//!
//! - AUROC: Mann–Whitney with ties counted ½ (equals scikit-learn's roc_auc_score).
//! - AUPR-In / AUPR-Out: step-wise average precision (scikit-learn's average_precision_score) with
//!   ID positive and score s / OOD positive and score −s.
//! - FPR@95TPR: t = the ⌊0.95·n_ID⌋-th largest ID score, FPR = #(OOD ≥ t)/n_OOD (MOODv2's rule:
//!   ties count as false positives).
//! - Detection error: min over thresholds δ of ½(P_ID(s < δ) + P_OOD(s ≥ δ)).

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Metrics {
    pub auroc: f64,
    pub aupr_in: f64,
    pub aupr_out: f64,
    pub fpr95: f64,
    pub detection_error: f64,
}

fn check(id: &[f32], ood: &[f32]) -> Result<()> {
    if id.is_empty() || ood.is_empty() {
        return Err(Error::Data(format!(
            "metrics need scores on both sides: {} ID, {} OOD",
            id.len(),
            ood.len()
        )));
    }
    if let Some(i) = id.iter().chain(ood).position(|v| !v.is_finite()) {
        let (side, row) = if i < id.len() {
            ("ID", i)
        } else {
            ("OOD", i - id.len())
        };
        return Err(Error::Data(format!(
            "{side} score at row {row} is not finite"
        )));
    }
    Ok(())
}

pub fn evaluate(id: &[f32], ood: &[f32]) -> Result<Metrics> {
    check(id, ood)?;
    let neg: Vec<f32> = id.iter().map(|v| -v).collect();
    let neg_ood: Vec<f32> = ood.iter().map(|v| -v).collect();
    Ok(Metrics {
        auroc: auroc(id, ood),
        aupr_in: average_precision(id, ood),
        aupr_out: average_precision(&neg_ood, &neg),
        fpr95: fpr_at_tpr(id, ood, 0.95),
        detection_error: detection_error(id, ood),
    })
}

/// P(s_ID > s_OOD) + ½·P(s_ID = s_OOD), by average ranks.
pub fn auroc(id: &[f32], ood: &[f32]) -> f64 {
    let mut all: Vec<(f32, bool)> = id
        .iter()
        .map(|&s| (s, true))
        .chain(ood.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0f64;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j < all.len() && all[j].0 == all[i].0 {
            j += 1;
        }
        let avg_rank = (i + j + 1) as f64 / 2.0; // ranks i+1..=j
        rank_sum += avg_rank * all[i..j].iter().filter(|e| e.1).count() as f64;
        i = j;
    }
    let (p, n) = (id.len() as f64, ood.len() as f64);
    (rank_sum - p * (p + 1.0) / 2.0) / (p * n)
}

/// Average precision with `pos` the positive class: Σ_k (R_k − R_{k−1})·P_k over distinct
/// thresholds in decreasing order, as scikit-learn computes it.
pub fn average_precision(pos: &[f32], neg: &[f32]) -> f64 {
    let mut all: Vec<(f32, bool)> = pos
        .iter()
        .map(|&s| (s, true))
        .chain(neg.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total_pos = pos.len() as f64;
    let (mut tp, mut fp) = (0.0f64, 0.0f64);
    let mut prev_recall = 0.0;
    let mut ap = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j < all.len() && all[j].0 == all[i].0 {
            if all[j].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            j += 1;
        }
        let recall = tp / total_pos;
        ap += (recall - prev_recall) * tp / (tp + fp);
        prev_recall = recall;
        i = j;
    }
    ap
}

/// FPR when the threshold keeps `tpr` of the ID scores (MOODv2's rule, see the module doc).
pub fn fpr_at_tpr(id: &[f32], ood: &[f32], tpr: f64) -> f64 {
    let mut s = id.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let r = ((tpr * id.len() as f64).floor() as usize).clamp(1, id.len());
    let t = s[r - 1];
    ood.iter().filter(|&&v| v >= t).count() as f64 / ood.len() as f64
}

/// min_δ ½(P_ID(s < δ) + P_OOD(s ≥ δ)) over every distinct score (and +∞).
pub fn detection_error(id: &[f32], ood: &[f32]) -> f64 {
    let mut ids = id.to_vec();
    let mut oods = ood.to_vec();
    ids.sort_by(|a, b| a.total_cmp(b));
    oods.sort_by(|a, b| a.total_cmp(b));
    let mut best: f64 = 0.5 * (1.0 + 0.0); // δ = +∞: every ID rejected, no OOD accepted
    for &d in ids.iter().chain(&oods) {
        let id_below = ids.partition_point(|&v| v < d) as f64 / ids.len() as f64;
        let ood_at_or_above =
            (oods.len() - oods.partition_point(|&v| v < d)) as f64 / oods.len() as f64;
        best = best.min(0.5 * (id_below + ood_at_or_above));
    }
    best
}
