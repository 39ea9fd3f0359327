//! The result of `mood eval`: per method and OOD set, the metrics; printed as a Markdown table and
//! written as report.json and report.csv (and plots, `plot`).

pub mod plot;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::FeatureStore;

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

/// One `--tune-on` choice: of the `values` settings variants of `method`, the row `chosen`
/// (its settings `args`) had the best AUROC on the OOD set `on`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Tuned {
    pub method: String,
    pub on: String,
    pub chosen: String,
    pub args: std::collections::BTreeMap<String, String>,
    pub auroc: f64,
    pub values: usize,
}

impl Tuned {
    /// The line `mood eval` prints for it.
    pub fn line(&self) -> String {
        format!(
            "tuned on {}: {} (AUROC {:.2} on {}, best of {} values)",
            self.on,
            self.chosen,
            100.0 * self.auroc,
            self.on,
            self.values
        )
    }
}

impl Skip {
    /// A method left out, and why. The method's name is said once: a reason that already starts
    /// with it (an error such as "nnguide: K = 100 ...") loses that prefix, so the line reads
    /// "skipped nnguide: K = 100 ...", not "skipped nnguide: nnguide: K = 100 ...".
    pub fn new(method: &str, reason: &str) -> Skip {
        let reason = reason
            .strip_prefix(method)
            .and_then(|r| r.strip_prefix(": "))
            .unwrap_or(reason);
        Skip {
            method: method.into(),
            reason: reason.into(),
        }
    }
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
    /// What `--tune-on NAME` chose, one entry per method that had listed values (empty
    /// without it).
    pub tuned: Vec<Tuned>,
    /// Where the numbers come from: the mood version and each store's model and preprocessing.
    pub provenance: Provenance,
}

/// One store a report read.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StoreInfo {
    /// train, id or ood.
    pub role: String,
    pub name: String,
    pub dir: String,
    pub count: usize,
    pub dim: usize,
    pub model: String,
    pub weights: String,
    pub weights_sha256: String,
    pub preprocess: String,
    pub dtype: String,
    /// What extracted the rows: the device's kind (cpu, cuda), its precision, and the processor
    /// (model name and threads) or GPU; empty for a store whose manifest records no identity.
    pub device: String,
    pub precision: String,
    pub device_name: String,
    pub sources: Vec<String>,
}

impl StoreInfo {
    /// "cpu f32 (Intel ..., 16 threads)" for report.md.
    fn extracted_on(&self) -> String {
        if self.device.is_empty() {
            return "(not recorded)".into();
        }
        let mut s = format!("{} {}", self.device, self.precision);
        if !self.device_name.is_empty() {
            s.push_str(&format!(" ({})", self.device_name));
        }
        s.trim().to_string()
    }

    fn of(role: &str, name: &str, s: &FeatureStore) -> StoreInfo {
        let m = &s.manifest;
        let id = m.identity.as_ref();
        StoreInfo {
            role: role.into(),
            name: name.into(),
            dir: s.dir.display().to_string(),
            count: s.rows(),
            dim: s.dim(),
            model: m.model.clone(),
            weights: m.weights.clone(),
            weights_sha256: m.weights_sha256.clone(),
            preprocess: m.preprocess.clone(),
            dtype: if m.dtype.is_empty() {
                "f32".into()
            } else {
                m.dtype.clone()
            },
            device: id.map(|i| i.device.clone()).unwrap_or_default(),
            precision: id.map(|i| i.precision.clone()).unwrap_or_default(),
            device_name: id.map(|i| i.device_name.clone()).unwrap_or_default(),
            sources: m.sources.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Provenance {
    pub command: String,
    pub mood_version: String,
    pub stores: Vec<StoreInfo>,
    /// Store mismatches that `--allow-mismatch` let through, one line each.
    pub mismatches_allowed: Vec<String>,
    /// Where the scores were computed (the device, the processor or GPU); empty when unknown.
    pub scored_on: String,
}

impl Provenance {
    pub fn of(
        train: &FeatureStore,
        id: &FeatureStore,
        oods: &[(String, PathBuf)],
        ood_stores: &[FeatureStore],
    ) -> Provenance {
        let mut stores = vec![
            StoreInfo::of("train", "train", train),
            StoreInfo::of("id", "id", id),
        ];
        for ((n, _), s) in oods.iter().zip(ood_stores) {
            stores.push(StoreInfo::of("ood", n, s));
        }
        Provenance {
            command: "mood eval".into(),
            mood_version: env!("CARGO_PKG_VERSION").into(),
            stores,
            mismatches_allowed: Vec::new(),
            scored_on: String::new(),
        }
    }
}

/// What each `--fpr` rule means, for the report's readers.
fn fpr_rule_text(rule: &str) -> &'static str {
    match rule {
        "moodv2" => {
            "threshold t = the ⌊0.95·n_ID⌋-th largest ID score; FPR = #(OOD ≥ t) / n_OOD (MOODv2)"
        }
        "moodv1" => {
            "t = the linear 5th percentile of the ID scores; FPR = #(OOD > t) / n_OOD (MOOD v1)"
        }
        "mos" => {
            "the threshold whose ID recall is nearest 0.95 (MOS, Hendrycks' fpr_and_fdr_at_recall)"
        }
        "openood" => {
            "OOD positive: the fraction of ID rejected when 95% of OOD is caught (OpenOOD v1.5)"
        }
        "knnood" => "t = sort_asc(ID)[round(0.05·n_ID)]; FPR = #(OOD > t) / n_OOD (knn-ood, MODE)",
        _ => "see SPEC G",
    }
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

    /// report.md: the provenance, one table per metric (methods × OOD sets and the average, in
    /// percent), the FPR rule and each method's settings, to paste into a paper's notes.
    pub fn report_md(&self) -> String {
        let mut s = String::new();
        let p = &self.provenance;
        let _ = writeln!(s, "# OOD evaluation\n");
        let _ = writeln!(
            s,
            "mood {}; FPR@95: rule `{}` ({}); AUPR: {}.\n",
            p.mood_version,
            self.fpr_rule,
            fpr_rule_text(&self.fpr_rule),
            if self.aupr == "trapezoid" {
                "trapezoidal area under the precision-recall curve"
            } else {
                "average precision (step)"
            }
        );
        if !p.scored_on.is_empty() {
            let _ = writeln!(s, "Scored on {}.\n", p.scored_on);
        }
        let _ = writeln!(s, "## Stores\n");
        let _ = writeln!(
            s,
            "| role | name | rows | dim | model | weights SHA-256 | preprocessing | dtype | extracted on |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---|---|---|---|---|");
        for st in &p.stores {
            let sha = if st.weights_sha256.is_empty() {
                "(not recorded)".to_string()
            } else {
                format!(
                    "`{}`",
                    &st.weights_sha256[..st.weights_sha256.len().min(16)]
                )
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {sha} | {} | {} | {} |",
                st.role,
                st.name,
                st.count,
                st.dim,
                if st.model.is_empty() {
                    "(not recorded)"
                } else {
                    &st.model
                },
                if st.preprocess.is_empty() {
                    "(not recorded)"
                } else {
                    &st.preprocess
                },
                st.dtype,
                st.extracted_on()
            );
        }
        for m in &p.mismatches_allowed {
            let _ = writeln!(s, "\n**Mismatch allowed (--allow-mismatch):** {m}");
        }
        let names: Vec<&str> = self.ood.iter().map(|(n, _)| n.as_str()).collect();
        type Column = (&'static str, fn(&Metrics) -> f64);
        let tables: [Column; 4] = [
            ("AUROC % (higher is better)", |m| m.auroc),
            ("AUPR-In % (ID positive; higher is better)", |m| m.aupr_in),
            ("AUPR-Out % (OOD positive; higher is better)", |m| {
                m.aupr_out
            }),
            ("FPR@95 % (FPR at 95% TPR; lower is better)", |m| m.fpr95),
        ];
        for (title, get) in tables {
            let _ = writeln!(s, "\n## {title}\n");
            let _ = write!(s, "| method |");
            for n in &names {
                let _ = write!(s, " {n} |");
            }
            let _ = writeln!(s, " average |");
            let _ = writeln!(s, "|---|{}", "---:|".repeat(names.len() + 1));
            for m in &self.methods {
                let _ = write!(s, "| {} |", m.method);
                for r in &m.results {
                    let _ = write!(s, " {:.2} |", 100.0 * get(&r.metrics));
                }
                let _ = writeln!(s, " {:.2} |", 100.0 * get(&m.average));
            }
        }
        let _ = writeln!(s, "\n## Method settings\n");
        for m in &self.methods {
            let args: Vec<String> = m.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                s,
                "- {}: {}",
                m.method,
                if args.is_empty() {
                    "(none)".to_string()
                } else {
                    args.join(", ")
                }
            );
        }
        for sk in &self.skipped {
            let _ = writeln!(s, "- {} skipped: {}", sk.method, sk.reason);
        }
        for t in &self.tuned {
            let _ = writeln!(s, "- {}", t.line());
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

    /// report.md, report.json and report.csv in `dir` (each written atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Data(e.to_string()))?;
        crate::fsutil::write_atomic(&dir.join("report.md"), self.report_md().as_bytes())?;
        crate::fsutil::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        crate::fsutil::write_atomic(&dir.join("report.csv"), self.csv().as_bytes())
    }
}
