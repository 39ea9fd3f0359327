//! Fit, score and evaluate plans: `mood eval`'s whole run over stores already open (`Plan`,
//! `evaluate`; the demo runs the same), and the checks `mood fit`, `mood score` and `mood eval`
//! make before they compute (method settings, empty stores, provenance, the report folder).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::score_device::ScoreDevice;
use crate::error::{Error, Result};
use crate::metrics;
use crate::ood::detector::{method, Detector, Fitted, Head, Need, METHODS};
use crate::ood::methods::arg;
use crate::report::{average, MethodResult, OodResult, Report, Skip};
use crate::store::{read_head, FeatureStore};

/// The linear head `--head` names, if any (for stores without head.safetensors).
pub fn load_head(path: Option<&Path>) -> Result<Option<Head>> {
    path.map(read_head).transpose()
}

/// Refuses a `--method-arg` that is not [METHOD.]KEY=VALUE or whose key no method (or not the
/// method named) has.
pub fn check_method_args(given: &[String]) -> Result<()> {
    for g in given {
        let (k, _) = g
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("--method-arg `{g}` is not [METHOD.]KEY=VALUE")))?;
        let known = match k.split_once('.') {
            Some((m, key)) => method(m)?.args.iter().any(|a| a.0 == key),
            None => METHODS.iter().any(|m| m.args.iter().any(|a| a.0 == k)),
        };
        if !known {
            return Err(Error::Usage(format!(
                "--method-arg `{g}`: no method has the setting `{k}`"
            )));
        }
    }
    Ok(())
}

/// Says each store's reader notes once, and compares every test store (named as on the command
/// line) with the train store: a mismatch is refused unless `allow`, which returns the lines the
/// report records.
pub fn check_provenance<'a>(
    train: &FeatureStore,
    train_name: &str,
    tests: impl Iterator<Item = (String, &'a FeatureStore)>,
    allow: bool,
) -> Result<Vec<String>> {
    let prov = |s: &FeatureStore| {
        let mut p = s.manifest.provenance();
        p.dim = s.dim();
        p
    };
    let mut allowed = Vec::new();
    super::provenance::say_notes(train);
    for (name, store) in tests {
        super::provenance::say_notes(store);
        allowed.extend(super::provenance::compare(
            &prov(train),
            train_name,
            &prov(store),
            &name,
            allow,
        )?);
    }
    Ok(allowed)
}

/// What `mood eval -o` writes, and so what it replaces.
const REPORT_FILES: &[&str] = &["report.json", "report.csv", "report.md", "plots"];

/// Makes `dir` ready for a new report: nothing there, or an earlier `mood eval` report (whose
/// files are removed, so no plot of it stays beside the new one), or `--overwrite`.
pub fn prepare_output(dir: &Path, overwrite: bool) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let others: Vec<&String> = names
        .iter()
        .filter(|n| !REPORT_FILES.contains(&n.as_str()))
        .collect();
    let earlier_report = std::fs::read_to_string(dir.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("methods").is_some() && v.get("fpr_rule").is_some());
    if !(overwrite || earlier_report && others.is_empty()) {
        let example = others.first().map_or("report files", |n| n.as_str());
        return Err(Error::Usage(format!(
            "-o {} is not empty and is not an earlier `mood eval` report (it holds {example}): \
             choose a new folder, or add --overwrite to replace mood's report files there",
            dir.display()
        )));
    }
    for f in REPORT_FILES {
        let p = dir.join(f);
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else if p.exists() {
            std::fs::remove_file(&p)
        } else {
            Ok(())
        };
        r.map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// The `--method-arg` values that apply to `name`, as key=value.
fn args_for(name: &str, given: &[String]) -> Vec<String> {
    let has = |key: &str| method(name).is_ok_and(|m| m.args.iter().any(|a| a.0 == key));
    given
        .iter()
        .filter_map(|g| {
            let (k, v) = g.split_once('=')?;
            match k.split_once('.') {
                Some((m, key)) if m == name => Some(format!("{key}={v}")),
                Some(_) => None,
                None if has(k) => Some(g.clone()),
                None => None,
            }
        })
        .collect()
}

/// Refuses a store with no rows, naming it: the first statistic to fail on it would otherwise
/// speak of `0 labels` or `k in 1..=0`.
pub fn refuse_empty(store: &FeatureStore, flag: &str, dir: &Path) -> Result<()> {
    if store.rows() == 0 {
        let sep = if flag.ends_with('=') { "" } else { " " };
        return Err(Error::Usage(format!(
            "{flag}{sep}{}: the store is empty (0 rows); extract it again from a dataset with images",
            dir.display()
        )));
    }
    Ok(())
}

/// Refuses a non-finite score, naming the method, the store and the row.
fn refuse_non_finite(name: &str, scores: &[f32], which: &str) -> Result<()> {
    match scores.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::Data(format!(
            "{name}: the score of row {i} of {which} is {}: the method's arithmetic overflows on that row's features; check the store, or leave `{name}` out with --methods",
            scores[i]
        ))),
        None => Ok(()),
    }
}

/// One settings variant's scores.
struct Scored {
    settings: BTreeMap<String, String>,
    fit_seconds: f64,
    score_seconds: f64,
    id: Vec<f32>,
    ood: Vec<Vec<f32>>,
}

/// What `evaluate` runs and how it reports.
pub struct Plan<'a> {
    /// Where the detectors score (`ScoreDevice::cpu()` for the CPU only).
    pub device: &'a ScoreDevice,
    pub names: &'a [&'static str],
    /// `--method-arg` values ([METHOD.]KEY=VALUE).
    pub method_args: &'a [String],
    /// Replaces the stores' own heads.
    pub head: Option<&'a Head>,
    pub rules: metrics::Rules,
    /// List methods whose inputs the stores lack as skipped instead of failing.
    pub skip_missing: bool,
    /// Write one PNG per method under `plots/` here.
    pub plots: Option<&'a Path>,
}

/// Fits every method of the plan on `train` and scores `id` against each OOD store.
pub fn evaluate(
    plan: &Plan,
    train: &FeatureStore,
    id: &FeatureStore,
    oods: &[(String, PathBuf)],
    ood_stores: &[FeatureStore],
) -> Result<Report> {
    let (names, method_args, head, skip_missing, plots) = (
        plan.names,
        plan.method_args,
        plan.head,
        plan.skip_missing,
        plan.plots,
    );
    let mut report = Report {
        train: train.dir.display().to_string(),
        id: id.dir.display().to_string(),
        ood: oods
            .iter()
            .map(|(n, d)| (n.clone(), d.display().to_string()))
            .collect(),
        fpr_rule: format!("{:?}", plan.rules.fpr).to_lowercase(),
        aupr: if plan.rules.aupr_trapezoid {
            "trapezoid"
        } else {
            "step"
        }
        .into(),
        methods: Vec::new(),
        skipped: Vec::new(),
        tuned: Vec::new(),
        provenance: crate::report::Provenance::of(train, id, oods, ood_stores),
    };
    let bar = crate::progress::Progress::new(names.len() as u64, "methods", "eval");
    'methods: for &name in names {
        bar.set_message(name);
        let m = method(name)?;
        // Labels are needed to fit only, ODIN scores to score only.
        let score_needs = Need::select(m.needs, Need::to_score);
        let mut missing = train
            .inputs(head)
            .missing(&Need::select(m.needs, Need::to_fit));
        for s in std::iter::once(id).chain(ood_stores) {
            missing.extend(s.inputs(head).missing(&score_needs));
        }
        if !missing.is_empty() && skip_missing {
            report
                .skipped
                .push(Skip::new(name, &format!("needs {}", missing[0].what())));
            bar.inc(1);
            continue;
        }
        let variants = super::sweep::variants(m, &args_for(name, method_args))?;
        // kNN's k alone swept: one fit at the largest k, one GEMM pass for every k.
        let one_pass = name == "knn" && super::sweep::only_swept(&variants, "k");
        let ks: Vec<usize> = match one_pass {
            true => variants
                .iter()
                .map(|v| arg(v, "k"))
                .collect::<Result<_>>()?,
            false => Vec::new(),
        };
        let fits: Vec<BTreeMap<String, String>> = match one_pass {
            true => {
                let max = (0..ks.len()).max_by_key(|&j| ks[j]).unwrap_or(0);
                vec![variants[max].clone()]
            }
            false => variants.clone(),
        };
        let mut scored: Vec<Scored> = Vec::new();
        for settings in fits {
            let t = Instant::now();
            let det = match Detector::fit(name, settings.clone(), &train.inputs(head)) {
                Ok(d) => d,
                // `all` means every method these stores can run: one that cannot (MOS without
                // group-softmax logits, say) is listed with the reason, not fatal.
                Err(e) if skip_missing => {
                    report.skipped.push(Skip::new(name, &e.to_string()));
                    bar.inc(1);
                    continue 'methods;
                }
                // The method named once, whether or not its own message starts with it.
                Err(e) => {
                    let e = e.to_string();
                    let said = e.strip_prefix(name).and_then(|r| r.strip_prefix(": "));
                    return Err(Error::Data(format!("{name}: {}", said.unwrap_or(&e))));
                }
            };
            let fit_seconds = t.elapsed().as_secs_f64();
            let t = Instant::now();
            if let (true, Fitted::Knn(knn)) = (one_pass, det.fitted()) {
                let id_all = knn.score_many(det.check_features(&id.inputs(head))?, &ks)?;
                let ood_all: Vec<Vec<Vec<f32>>> = ood_stores
                    .iter()
                    .map(|s| knn.score_many(det.check_features(&s.inputs(head))?, &ks))
                    .collect::<Result<_>>()?;
                let score_seconds = t.elapsed().as_secs_f64();
                for (j, (v, id_scores)) in variants.iter().zip(id_all).enumerate() {
                    scored.push(Scored {
                        settings: v.clone(),
                        fit_seconds,
                        score_seconds,
                        id: id_scores,
                        ood: ood_all.iter().map(|o| o[j].clone()).collect(),
                    });
                }
                continue;
            }
            // The scorer (and its device copy of the statistics) lives for this fit only.
            let scorer = plan.device.prepare(&det)?;
            let id_scores = scorer.score(&id.inputs(head))?;
            let ood: Vec<Vec<f32>> = ood_stores
                .iter()
                .map(|s| scorer.score(&s.inputs(head)))
                .collect::<Result<_>>()?;
            scored.push(Scored {
                settings,
                fit_seconds,
                score_seconds: t.elapsed().as_secs_f64(),
                id: id_scores,
                ood,
            });
        }
        for s in scored {
            let label = super::sweep::label(name, &s.settings, &variants);
            let (id_scores, ood_scores) = (&s.id, &s.ood);
            let finite = refuse_non_finite(
                &label,
                id_scores,
                &format!("the --id store {}", id.dir.display()),
            )
            .and_then(|_| {
                oods.iter().zip(ood_scores).try_for_each(|((n, d), s)| {
                    refuse_non_finite(&label, s, &format!("the --ood store {n}={}", d.display()))
                })
            });
            match finite {
                // As for a fit that fails under `all`: listed with the reason, not fatal.
                Err(e) if skip_missing => {
                    report.skipped.push(Skip::new(&label, &e.to_string()));
                    continue;
                }
                r => r?,
            }
            let results: Vec<OodResult> = oods
                .iter()
                .zip(ood_scores)
                .map(|((n, _), s)| {
                    Ok(OodResult {
                        ood: n.clone(),
                        metrics: metrics::evaluate_with(id_scores, s, plan.rules)
                            .map_err(|e| Error::Data(format!("{label} on {n}: {e}")))?,
                    })
                })
                .collect::<Result<_>>()?;
            if let Some(dir) = plots {
                let pdir = dir.join("plots");
                std::fs::create_dir_all(&pdir).map_err(|e| Error::io(&pdir, e))?;
                let sets: Vec<(&str, &[f32])> = oods
                    .iter()
                    .zip(ood_scores)
                    .map(|((n, _), s)| (n.as_str(), &s[..]))
                    .collect();
                crate::report::plot::method_figure(
                    &pdir.join(format!("{}.png", label.replace(' ', "_"))),
                    &label,
                    id_scores,
                    &sets,
                )?;
            }
            report.methods.push(MethodResult {
                method: label,
                args: s.settings,
                fit_seconds: s.fit_seconds,
                score_seconds: s.score_seconds,
                average: average(&results),
                results,
            });
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(report)
}
