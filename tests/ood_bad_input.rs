//! The bad inputs of issue 16 that used to finish with exit 0 and useless scores: each is now a
//! one-line refusal or a correct result.

mod common;

use common::{assert_refused, run_mood as mood};
use std::path::Path;

use mood::ood::detector::{Detector, Inputs, Matrix};

const D: usize = 6;
const C: usize = 3;

/// `n` rows around class centres times `scale`, labels `y` (default i % C), with a head.
fn store(dir: &Path, n: usize, seed: u64, scale: f32, y: Option<Vec<usize>>) {
    let s = common::Synthetic {
        dim: D,
        classes: C,
        scale,
        labels: Some(y.unwrap_or_default()),
        ..Default::default()
    };
    common::synthetic_store(dir, n, seed, s);
}

fn path(dir: &Path, s: &str) -> String {
    dir.join(s).to_string_lossy().into_owned()
}

#[test]
fn msp_and_energy_refuse_a_temperature_that_is_not_positive() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| path(tmp.path(), s);
    store(&tmp.path().join("train"), 30, 1, 1.0, None);
    for (m, t) in [
        ("msp", "0"),
        ("msp", "NaN"),
        ("energy", "-1"),
        ("energy", "inf"),
    ] {
        let r = mood(&[
            "fit",
            "--method",
            m,
            "--method-arg",
            &format!("t={t}"),
            "--train",
            &p("train"),
            "-o",
            &p("d.safetensors"),
        ]);
        assert_refused(&r, &["temperature", "> 0"]);
    }
    let r = mood(&[
        "eval",
        "--train",
        &p("train"),
        "--id",
        &p("train"),
        "--ood",
        &format!("o={}", p("train")),
        "--methods",
        "energy",
        "--method-arg",
        "energy.t=0",
    ]);
    assert_refused(&r, &["temperature"]);
    assert!(mood::ood::logits::msp(&[1.0, 2.0], 2, 0.0).is_err());
    assert!(mood::ood::logits::energy(&[1.0, 2.0], 2, f32::NAN).is_err());
}

#[test]
fn empty_stores_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| path(tmp.path(), s);
    store(&tmp.path().join("train"), 30, 1, 1.0, None);
    store(&tmp.path().join("empty"), 0, 2, 1.0, None);
    for m in ["kl-matching", "knn", "mahalanobis", "vim"] {
        let r = mood(&[
            "fit",
            "--method",
            m,
            "--train",
            &p("empty"),
            "-o",
            &p("d.safetensors"),
        ]);
        assert_refused(&r, &["--train", &p("empty"), "empty (0 rows)"]);
    }
    let eval = |train: &str, id: &str, ood: &str| {
        mood(&[
            "eval",
            "--train",
            &p(train),
            "--id",
            &p(id),
            "--ood",
            &format!("far={}", p(ood)),
        ])
    };
    assert_refused(
        &eval("empty", "train", "train"),
        &["--train", &p("empty"), "empty"],
    );
    assert_refused(
        &eval("train", "empty", "train"),
        &["--id", &p("empty"), "empty"],
    );
    assert_refused(
        &eval("train", "train", "empty"),
        &[&format!("--ood far={}", p("empty")), "empty"],
    );
    // The library refuses too, before any statistic speaks of `1..=0`.
    let none = Inputs {
        features: Some(Matrix { data: &[], cols: D }),
        logits: Some(Matrix { data: &[], cols: C }),
        labels: Some(&[]),
        ..Default::default()
    };
    for m in ["kl-matching", "knn", "msp"] {
        let e = Detector::fit(m, Default::default(), &none)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("0 rows"), "{m}: {e}");
    }
    let e = mood::ood::logits::KlMatching::fit(&[], C)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("0 rows"), "{e}");
}

#[test]
fn mahalanobis_cc_refuses_a_class_of_one_row() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| path(tmp.path(), s);
    // Class 2 has one row only (the last).
    let mut y: Vec<usize> = (0..29).map(|i| i % 2).collect();
    y.push(2);
    store(&tmp.path().join("train"), 30, 1, 1.0, Some(y));
    for m in ["mahalanobis-cc", "mahalanobis-avgcc"] {
        let r = mood(&[
            "fit",
            "--method",
            m,
            "--train",
            &p("train"),
            "-o",
            &p("d.safetensors"),
        ]);
        assert_refused(&r, &["class 2 has 1 train row", "mahalanobis"]);
    }
    // The tied covariance has rows enough.
    let r = mood(&[
        "fit",
        "--method",
        "mahalanobis",
        "--train",
        &p("train"),
        "-o",
        &p("d.safetensors"),
    ]);
    assert_eq!(r.0, 0, "{}", r.2);
}

#[test]
fn knn_scores_features_near_1e20_as_their_unit_vectors() {
    let mut rng = mood::rng::Rng::new(3);
    let (n, m, d) = (200, 40, 16);
    let train: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let test: Vec<f32> = (0..m * d).map(|_| rng.normal() as f32).collect();
    let big = |x: &[f32], s: f32| x.iter().map(|v| v * s).collect::<Vec<f32>>();
    let want = mood::ood::knn::Knn::fit(&train, d, 5)
        .unwrap()
        .score(&test)
        .unwrap();
    // knn normalises rows, so a row and 1e20 times it are the same point; the squared norm of the
    // scaled row is ~1e41, past f32's range, and once made every score -1.
    for (ts, qs) in [(1.0, 1e20), (1e20, 1.0), (1e20, 3e20), (1.0, 1e30)] {
        let got = mood::ood::knn::Knn::fit(&big(&train, ts), d, 5)
            .unwrap()
            .score(&big(&test, qs))
            .unwrap();
        common::assert_max_abs(&got, &want, 1e-5, &format!("train x{ts}, test x{qs}"));
    }
}

#[test]
fn eval_names_the_store_whose_scores_are_not_finite() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| path(tmp.path(), s);
    store(&tmp.path().join("train"), 60, 1, 1.0, None);
    store(&tmp.path().join("huge"), 20, 2, 1e20, None);
    store(&tmp.path().join("ood"), 20, 3, 1.0, None);
    // The tied Mahalanobis does not normalise: (1e20)² overflows its f32 distances.
    let r = mood(&[
        "eval",
        "--train",
        &p("train"),
        "--id",
        &p("huge"),
        "--ood",
        &format!("o={}", p("ood")),
        "--methods",
        "mahalanobis",
    ]);
    assert_refused(&r, &["mahalanobis", "--id store", &p("huge"), "row 0"]);
    let r = mood(&[
        "eval",
        "--train",
        &p("train"),
        "--id",
        &p("ood"),
        "--ood",
        &format!("far={}", p("huge")),
        "--methods",
        "mahalanobis",
    ]);
    assert_refused(&r, &[&format!("--ood store far={}", p("huge"))]);
    // Under `--methods all` such a method is listed as skipped, with the same reason.
    let (code, out, err) = mood(&[
        "eval",
        "--train",
        &p("train"),
        "--id",
        &p("huge"),
        "--ood",
        &format!("o={}", p("ood")),
    ]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("skipped mahalanobis:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains(&format!("--id store {}", p("huge"))),
        "{line}"
    );
}
