//! `mood eval` sweeps (issue 16 item 3): a listed `--method-arg` value scores every value, kNN's
//! k in one pass, and `--tune-on NAME` keeps the value with the best AUROC on NAME.

mod common;

use common::{assert_refused, fixture, run_mood as mood};
use std::path::Path;

const D: usize = 6;
const C: usize = 3;

fn store(dir: &Path, n: usize, seed: u64, shift: Option<f32>) {
    let s = common::Synthetic {
        dim: D,
        classes: C,
        shift,
        ..Default::default()
    };
    common::synthetic_store(dir, n, seed, s);
}

/// The one-pass k-th neighbours agree with sklearn's NearestNeighbors (the fixture of
/// `knn_matches_sklearn_nearest_neighbors`) for every k, and with one fit per k exactly.
#[test]
fn knn_one_pass_matches_sklearn_for_every_k() {
    use mood::ood::knn::Knn;
    let read = |n: &str| mood::npy::read_f32(&fixture(&format!("ood/{n}.npy"))).unwrap();
    let ((ts, train), (_, test)) = (read("knn_train"), read("knn_test"));
    let bytes = std::fs::read(fixture("ood/knn_expected.npy")).unwrap();
    let want: Vec<f64> = npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap();
    let (d, n) = (ts[1], test.len() / ts[1]);
    let ks = [1usize, 5, 50];
    let all = Knn::fit(&train, d, 50)
        .unwrap()
        .score_many(&test, &ks)
        .unwrap();
    for (j, k) in ks.iter().enumerate() {
        for i in 0..n {
            let w = want[j * n + i];
            assert!(
                (all[j][i] as f64 - w).abs() <= 1e-5 * w.abs().max(0.05),
                "k={k} row {i}: ours {}, sklearn {w}",
                all[j][i]
            );
        }
        let single = Knn::fit(&train, d, *k).unwrap().score(&test).unwrap();
        assert_eq!(all[j], single, "k={k}: one pass and its own fit");
    }
    assert!(Knn::fit(&train, d, 5)
        .unwrap()
        .score_many(&test, &[6])
        .is_err());
}

#[test]
fn eval_scores_each_listed_value_and_tunes_on_a_named_set() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    store(&tmp.path().join("train"), 150, 1, None);
    store(&tmp.path().join("id"), 60, 2, None);
    store(&tmp.path().join("val"), 40, 3, Some(1.0));
    store(&tmp.path().join("far"), 40, 4, Some(-3.0));
    let eval = |extra: &[&str]| {
        let (t, i) = (p("train"), p("id"));
        let (v, f, o) = (
            format!("val={}", p("val")),
            format!("far={}", p("far")),
            p("report"),
        );
        let mut a = vec![
            "eval",
            "--train",
            &t,
            "--id",
            &i,
            "--ood",
            &v,
            "--ood",
            &f,
            "--methods",
            "knn,msp,react",
            "-o",
            &o,
            "--overwrite",
        ];
        a.extend_from_slice(extra);
        mood(&a)
    };
    let (code, out, err) = eval(&[
        "--method-arg",
        "knn.k=1,5,40",
        "--method-arg",
        "react.percentile=0.5,0.9",
    ]);
    assert_eq!(code, 0, "{err}");
    for row in ["| knn k=1 |", "| knn k=5 |", "| knn k=40 |", "| msp |"] {
        assert!(out.contains(row), "{row} missing: {out}");
    }
    assert!(out.contains("| react percentile=0.5 |"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("report/report.json")).unwrap()).unwrap();
    let rows = report["methods"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 6, "3 knn + msp + 2 react");
    let ks: Vec<&str> = rows[..3]
        .iter()
        .map(|r| r["args"]["k"].as_str().unwrap())
        .collect();
    assert_eq!(ks, ["1", "5", "40"]);
    // The one pass reports one fit (at k = 40) for every k.
    assert_eq!(rows[0]["fit_seconds"], rows[2]["fit_seconds"]);
    let auroc =
        |r: &serde_json::Value, set: usize| r["results"][set]["metrics"]["auroc"].as_f64().unwrap();
    let best = (0..3).fold(0, |b, j| {
        if auroc(&rows[j], 0) > auroc(&rows[b], 0) {
            j
        } else {
            b
        }
    });
    let want_k = ks[best];

    let (code, out, err) = eval(&["--method-arg", "knn.k=1,5,40", "--tune-on", "val"]);
    assert_eq!(code, 0, "{err}");
    let tuned = format!("tuned on val: knn k={want_k} (");
    assert!(out.contains(&tuned), "{tuned} missing: {out}");
    assert!(
        out.contains("| method | far | average |"),
        "val leaves the table: {out}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("report/report.json")).unwrap()).unwrap();
    let rows = report["methods"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "knn (one k), msp, react");
    assert_eq!(rows[0]["args"]["k"], want_k);
    assert_eq!(rows[0]["results"].as_array().unwrap().len(), 1);
    // report.json says what was chosen, for which method, on which set (item 3 of issue 16).
    let tuned = report["tuned"].as_array().unwrap();
    assert_eq!(tuned.len(), 1, "only knn had listed values: {tuned:?}");
    assert_eq!(tuned[0]["method"], "knn");
    assert_eq!(tuned[0]["on"], "val");
    assert_eq!(tuned[0]["chosen"], format!("knn k={want_k}"));
    assert_eq!(tuned[0]["args"]["k"], want_k);
    assert_eq!(tuned[0]["values"], 3);
    assert_eq!(
        tuned[0]["auroc"].as_f64().unwrap(),
        auroc(&report_row(&tmp, want_k), 0),
        "the AUROC on val of the chosen value"
    );
    let md = std::fs::read_to_string(p("report/report.md")).unwrap();
    assert!(md.contains(&tuned_line(&out)), "{md}");
    // Its far AUROC is the untuned row's.
    assert_eq!(
        rows[0]["results"][0]["metrics"]["auroc"].as_f64().unwrap(),
        auroc(&report_row(&tmp, want_k), 1)
    );

    assert_refused(
        &eval(&["--tune-on", "nope"]),
        &["--tune-on nope", "no --ood set"],
    );
    assert_refused(&eval(&["--method-arg", "knn.k=1,,5"]), &["empty value"]);
}

/// The `tuned on ...` line of eval's stdout.
fn tuned_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("tuned on "))
        .expect("a tuned line")
        .to_string()
}

/// A method skipped under `--methods all` is named once on its line: nnguide's own error starts
/// with "nnguide: ", which the skip line must not repeat.
#[test]
fn eval_names_a_skipped_method_once() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    store(&tmp.path().join("train"), 150, 1, None);
    store(&tmp.path().join("id"), 30, 2, None);
    store(&tmp.path().join("far"), 30, 4, Some(-3.0));
    let (code, out, err) = mood(&[
        "eval",
        "--train",
        &p("train"),
        "--id",
        &p("id"),
        "--ood",
        &format!("far={}", p("far")),
        "--methods",
        "all",
        "-o",
        &p("report"),
    ]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("skipped nnguide:"))
        .unwrap_or_else(|| panic!("no skip line for nnguide: {out}"));
    assert!(line.starts_with("skipped nnguide: K = 100"), "{line}");
    assert!(!out.contains("nnguide: nnguide"), "{out}");
    let md = std::fs::read_to_string(p("report/report.md")).unwrap();
    assert!(md.contains("- nnguide skipped: K = 100"), "{md}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("report/report.json")).unwrap()).unwrap();
    let skip = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["method"] == "nnguide")
        .unwrap();
    assert!(
        skip["reason"].as_str().unwrap().starts_with("K = 100"),
        "{skip}"
    );
}

/// The knn row with `k` of an untuned run into a fresh folder.
fn report_row(tmp: &tempfile::TempDir, k: &str) -> serde_json::Value {
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    let (code, _, err) = mood(&[
        "eval",
        "--train",
        &p("train"),
        "--id",
        &p("id"),
        "--ood",
        &format!("val={}", p("val")),
        "--ood",
        &format!("far={}", p("far")),
        "--methods",
        "knn",
        "--method-arg",
        &format!("knn.k={k}"),
        "-o",
        &p("single"),
        "--overwrite",
    ]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("single/report.json")).unwrap()).unwrap();
    report["methods"][0].clone()
}
