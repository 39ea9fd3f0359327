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
    let total_pos = pos.len() as f64;
    let mut prev_recall = 0.0;
    let mut ap = 0.0;
    for (tp, fp) in curve(pos, neg) {
        let recall = tp / total_pos;
        ap += (recall - prev_recall) * tp / (tp + fp);
        prev_recall = recall;
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

/// Cumulative (true, false) positives at each distinct score, in decreasing score order: the
/// points of the ROC and precision-recall curves.
pub fn curve(pos: &[f32], neg: &[f32]) -> Vec<(f64, f64)> {
    let mut all: Vec<(f32, bool)> = pos
        .iter()
        .map(|&s| (s, true))
        .chain(neg.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut out = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let t = all[i].0;
        while i < all.len() && all[i].0 == t {
            if all[i].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        out.push((tp, fp));
    }
    out
}

/// Area under the precision-recall curve by the trapezoid rule over scikit-learn's
/// precision_recall_curve points (plus its (recall 0, precision 1) end), as MOODv2 and OpenOOD
/// compute AUPR.
pub fn aupr_trapezoid(pos: &[f32], neg: &[f32]) -> f64 {
    let p = pos.len() as f64;
    let mut pts: Vec<(f64, f64)> = curve(pos, neg)
        .into_iter()
        .map(|(tp, fp)| (tp / p, if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 }))
        .collect();
    pts.insert(0, (0.0, 1.0));
    pts.windows(2)
        .map(|w| (w[1].0 - w[0].0) * 0.5 * (w[1].1 + w[0].1))
        .sum()
}

/// The published FPR@95%TPR rules (SPEC G); `MoodV2` is the library's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum FprRule {
    /// t = the ⌊0.95·n_ID⌋-th largest ID score; FPR = #(OOD ≥ t)/n_OOD.
    MoodV2,
    /// MOOD v1 with its percentile fixed: t = np.percentile(ID, 5) (linear); FPR = #(OOD > t)/n_OOD.
    MoodV1,
    /// MOS / Hendrycks `fpr_and_fdr_at_recall`: the threshold whose recall is nearest 0.95.
    Mos,
    /// OpenOOD v1.5: OOD positive, FPR = the fraction of ID rejected when 95% of OOD is caught.
    OpenOod,
    /// knn-ood / MODE: t = sort_asc(ID)[round(0.05·n_ID)]; FPR = #(OOD > t)/n_OOD.
    KnnOod,
}

impl FprRule {
    pub const NAMES: &'static [&'static str] = &["moodv2", "moodv1", "mos", "openood", "knn"];

    pub fn parse(s: &str) -> Result<FprRule> {
        Ok(match s {
            "moodv2" => FprRule::MoodV2,
            "moodv1" => FprRule::MoodV1,
            "mos" => FprRule::Mos,
            "openood" => FprRule::OpenOod,
            "knn" => FprRule::KnnOod,
            _ => {
                return Err(Error::Usage(format!(
                    "unknown FPR rule `{s}`; known: {}",
                    FprRule::NAMES.join(", ")
                )))
            }
        })
    }
}

/// FPR at 95% TPR under `rule` (ID positive, higher = ID).
pub fn fpr95(id: &[f32], ood: &[f32], rule: FprRule) -> f64 {
    let n_ood = ood.len() as f64;
    let count_above = |t: f32| ood.iter().filter(|&&v| v > t).count() as f64 / n_ood;
    match rule {
        FprRule::MoodV2 => fpr_at_tpr(id, ood, 0.95),
        FprRule::MoodV1 => {
            let mut s = id.to_vec();
            s.sort_by(|a, b| a.total_cmp(b));
            let pos = 0.05 * (s.len() - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(s.len() - 1);
            let t = s[lo] as f64 + (pos - lo as f64) * (s[hi] as f64 - s[lo] as f64);
            ood.iter().filter(|&&v| v as f64 > t).count() as f64 / n_ood
        }
        FprRule::KnnOod => {
            let mut s = id.to_vec();
            s.sort_by(|a, b| a.total_cmp(b));
            // Python's round: half to even.
            let x = 0.05 * s.len() as f64;
            let r = x.round();
            let r = if (x - x.trunc() - 0.5).abs() < 1e-12 && r % 2.0 != 0.0 {
                r - 1.0
            } else {
                r
            };
            count_above(s[(r as usize).min(s.len() - 1)])
        }
        FprRule::Mos => {
            let c = curve(id, ood);
            let total = id.len() as f64;
            // From the first threshold reaching full recall back to the highest threshold, then
            // a (recall 1, 0 false positives) sentinel, as the original code builds it.
            let last = c
                .iter()
                .position(|&(tp, _)| tp >= total)
                .unwrap_or(c.len() - 1);
            let pts: Vec<(f64, f64)> = c[..=last]
                .iter()
                .rev()
                .map(|&(tp, fp)| (tp / total, fp))
                .chain(std::iter::once((1.0, 0.0)))
                .collect();
            let mut best = 0;
            for (i, p) in pts.iter().enumerate() {
                if (p.0 - 0.95).abs() < (pts[best].0 - 0.95).abs() {
                    best = i;
                }
            }
            pts[best].1 / n_ood
        }
        FprRule::OpenOod => {
            // OOD positive with score −s: walk thresholds of −s downwards (s upwards).
            let neg_ood: Vec<f32> = ood.iter().map(|v| -v).collect();
            let neg_id: Vec<f32> = id.iter().map(|v| -v).collect();
            let (p, n) = (ood.len() as f64, id.len() as f64);
            curve(&neg_ood, &neg_id)
                .into_iter()
                .find(|&(tp, _)| tp / p >= 0.95)
                .map_or(1.0, |(_, fp)| fp / n)
        }
    }
}

/// How `evaluate_with` computes the FPR and AUPR columns.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub fpr: FprRule,
    /// Trapezoid AUPR (MOODv2, OpenOOD) instead of step-wise average precision.
    pub aupr_trapezoid: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            fpr: FprRule::MoodV2,
            aupr_trapezoid: false,
        }
    }
}

pub fn evaluate_with(id: &[f32], ood: &[f32], rules: Rules) -> Result<Metrics> {
    let mut m = evaluate(id, ood)?;
    m.fpr95 = fpr95(id, ood, rules.fpr);
    if rules.aupr_trapezoid {
        let neg: Vec<f32> = id.iter().map(|v| -v).collect();
        let neg_ood: Vec<f32> = ood.iter().map(|v| -v).collect();
        m.aupr_in = aupr_trapezoid(id, ood);
        m.aupr_out = aupr_trapezoid(&neg_ood, &neg);
    }
    Ok(m)
}
