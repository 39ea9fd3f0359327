//! Settings sweeps for `mood eval`: `--method-arg knn.k=1,10,50` scores every value (a report
//! row each), and `--tune-on NAME` keeps, per method, the value with the best AUROC on the OOD
//! set NAME (OpenOOD's selection on a validation OOD set), which then leaves the table.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::ood::detector::{parse_args, Method};
use crate::report::{average, Report, Tuned};

/// At most this many settings combinations per method (a typo like `k=1,...` repeated must not
/// fit thousands of detectors).
const MAX_VARIANTS: usize = 64;

/// Settings whose single value is itself a comma-separated list.
fn list_valued(method: &str, key: &str) -> bool {
    matches!(
        (method, key),
        ("mos", "groups") | ("mahalanobis-ensemble", "weights") | ("gram", "powers")
    )
}

/// Every combination of the listed values of `given` (key=value strings for method `m`).
pub fn variants(m: &Method, given: &[String]) -> Result<Vec<BTreeMap<String, String>>> {
    let mut fixed = Vec::new();
    let mut lists: Vec<(&str, Vec<&str>)> = Vec::new();
    for g in given {
        match g.split_once('=') {
            Some((k, v)) if v.contains(',') && !list_valued(m.name, k) => {
                let values: Vec<&str> = v.split(',').map(str::trim).collect();
                if values.iter().any(|s| s.is_empty()) {
                    return Err(Error::Usage(format!(
                        "--method-arg {}.{g}: a list with an empty value",
                        m.name
                    )));
                }
                lists.push((k, values));
            }
            _ => fixed.push(g.clone()),
        }
    }
    let mut combos = vec![fixed];
    for (k, values) in &lists {
        combos = combos
            .iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push(format!("{k}={v}"));
                    c
                })
            })
            .collect();
        if combos.len() > MAX_VARIANTS {
            return Err(Error::Usage(format!(
                "--method-arg lists of `{}` make more than {MAX_VARIANTS} combinations; sweep fewer values",
                m.name
            )));
        }
    }
    combos.iter().map(|c| parse_args(m, c)).collect()
}

/// The settings that differ between variants.
fn swept(variants: &[BTreeMap<String, String>]) -> Vec<&str> {
    let first = &variants[0];
    first
        .keys()
        .filter(|k| variants.iter().any(|v| v.get(*k) != first.get(*k)))
        .map(String::as_str)
        .collect()
}

/// Whether `key` is the only setting that differs (and some variant differs).
pub fn only_swept(variants: &[BTreeMap<String, String>], key: &str) -> bool {
    swept(variants) == [key]
}

/// A report row's name: the method, then each swept setting's value ("knn k=10").
pub fn label(
    name: &str,
    settings: &BTreeMap<String, String>,
    variants: &[BTreeMap<String, String>],
) -> String {
    let mut s = name.to_string();
    for k in swept(variants) {
        s.push_str(&format!(" {k}={}", settings[k]));
    }
    s
}

/// Keeps, per method, the row with the best AUROC on the OOD set `on`, then drops `on` from every
/// row and average. Records each method that had a choice in `report.tuned` and returns the line
/// to print for each.
pub fn tune(report: &mut Report, on: &str) -> Vec<String> {
    let base = |label: &str| label.split(' ').next().unwrap_or("").to_string();
    let auroc_on = |r: &crate::report::MethodResult| {
        r.results
            .iter()
            .find(|o| o.ood == on)
            .map_or(f64::NEG_INFINITY, |o| o.metrics.auroc)
    };
    let mut said = Vec::new();
    let mut kept = Vec::new();
    let rows = std::mem::take(&mut report.methods);
    let mut i = 0;
    while i < rows.len() {
        let name = base(&rows[i].method);
        let j = i + rows[i..]
            .iter()
            .take_while(|r| base(&r.method) == name)
            .count();
        // First best wins a tie: the order of the values as given.
        let best = (i..j).fold(i, |b, k| {
            if auroc_on(&rows[k]) > auroc_on(&rows[b]) {
                k
            } else {
                b
            }
        });
        if j - i > 1 {
            let t = Tuned {
                method: name.clone(),
                on: on.to_string(),
                chosen: rows[best].method.clone(),
                args: rows[best].args.clone(),
                auroc: auroc_on(&rows[best]),
                values: j - i,
            };
            said.push(t.line());
            report.tuned.push(t);
        }
        kept.push(best);
        i = j;
    }
    let mut rows: Vec<Option<crate::report::MethodResult>> = rows.into_iter().map(Some).collect();
    for k in kept {
        let mut r = rows[k].take().expect("each row kept once");
        r.results.retain(|o| o.ood != on);
        r.average = average(&r.results);
        report.methods.push(r);
    }
    report.ood.retain(|(n, _)| n != on);
    said
}
