//! The result of `mood eval`: per method and OOD set, the metrics; printed as a Markdown table and
//! written as report.json and report.csv (and plots, `plot`).

pub mod plot;

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

#[derive(Clone, Debug, serde::Serialize)]
pub struct OodResult {
    pub ood: String,
    pub metrics: Metrics,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MethodResult {
    pub method: String,
    pub args: std::collections::BTreeMap<String, String>,
    pub fit_seconds: f64,
    pub score_seconds: f64,
    pub results: Vec<OodResult>,
    pub average: Metrics,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Skip {
    pub method: String,
    pub reason: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub train: String,
    pub id: String,
    pub ood: Vec<(String, String)>,
    /// FPR@95 rule and AUPR estimator used (SPEC G).
    pub fpr_rule: String,
    pub aupr: String,
    pub methods: Vec<MethodResult>,
    pub skipped: Vec<Skip>,
}

/// The mean of each metric over the OOD sets (MOOD's averaging, SPEC G).
pub fn average(results: &[OodResult]) -> Metrics {
    let n = results.len().max(1) as f64;
    let sum = |f: fn(&Metrics) -> f64| results.iter().map(|r| f(&r.metrics)).sum::<f64>() / n;
    Metrics {
        auroc: sum(|m| m.auroc),
        aupr_in: sum(|m| m.aupr_in),
        aupr_out: sum(|m| m.aupr_out),
        fpr95: sum(|m| m.fpr95),
        detection_error: sum(|m| m.detection_error),
    }
}

impl Report {
    /// Rows: methods; columns: each OOD set then the average, as "AUROC / FPR95" in percent.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let names: Vec<&str> = self.ood.iter().map(|(n, _)| n.as_str()).collect();
        let _ = write!(s, "| method |");
        for n in &names {
            let _ = write!(s, " {n} |");
        }
        let _ = writeln!(s, " average |");
        let _ = write!(s, "|---|");
        for _ in 0..=names.len() {
            let _ = write!(s, "---|");
        }
        let _ = writeln!(s);
        for m in &self.methods {
            let _ = write!(s, "| {} |", m.method);
            for r in &m.results {
                let _ = write!(
                    s,
                    " {:.2} / {:.2} |",
                    100.0 * r.metrics.auroc,
                    100.0 * r.metrics.fpr95
                );
            }
            let _ = writeln!(
                s,
                " **{:.2}** / {:.2} |",
                100.0 * m.average.auroc,
                100.0 * m.average.fpr95
            );
        }
        let _ = writeln!(
            s,
            "\nAUROC % (higher is better) / FPR at 95% TPR % (lower is better); ID = {}.",
            self.id
        );
        for sk in &self.skipped {
            let _ = writeln!(s, "skipped {}: {}", sk.method, sk.reason);
        }
        s
    }

    pub fn csv(&self) -> String {
        let mut s = String::from("method,ood,auroc,aupr_in,aupr_out,fpr95,detection_error\n");
        for m in &self.methods {
            let rows = m
                .results
                .iter()
                .map(|r| (r.ood.as_str(), &r.metrics))
                .chain(std::iter::once(("average", &m.average)));
            for (ood, x) in rows {
                let _ = writeln!(
                    s,
                    "{},{},{:.6},{:.6},{:.6},{:.6},{:.6}",
                    m.method, ood, x.auroc, x.aupr_in, x.aupr_out, x.fpr95, x.detection_error
                );
            }
        }
        s
    }

    /// report.json and report.csv in `dir` (each written atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Data(e.to_string()))?;
        crate::fsutil::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        crate::fsutil::write_atomic(&dir.join("report.csv"), self.csv().as_bytes())
    }
}
