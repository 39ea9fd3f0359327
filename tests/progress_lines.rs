//! Progress a batch scheduler's log can use: with stderr not a terminal (a pipe here, as a log
//! file is), pretrain, bench (a model, OOD scoring, image decoding) and eval print plain lines
//! with the count and a rate, and no carriage returns. Extract and finetune have theirs in
//! tests/store_identity.rs and tests/train_resume.rs.

mod common;

use std::path::Path;

use common::{extract_tiny, fixture, run_mood};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs mood with progress lines every 10 ms and returns the lines of stderr that start with
/// `what: `, each checked to carry a positive rate in `unit`/s.
fn progress_lines(args: &[&str], what: &str, unit: &str) -> Vec<String> {
    let mut all = vec!["--progress-every", "0.01"];
    all.extend_from_slice(args);
    let (code, _, err) = run_mood(&all);
    assert_eq!(code, 0, "{err}");
    let prefix = format!("{what}: ");
    let lines: Vec<String> = err
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    assert!(!lines.is_empty(), "no `{prefix}` progress lines: {err}");
    let per_s = format!(" {unit}/s");
    for l in &lines {
        assert!(!l.contains('\r'), "{l}");
        let rate: f64 = l
            .split(", ")
            .find(|p| p.ends_with(&per_s))
            .and_then(|p| p.split(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no rate in {unit}/s: {l}"));
        assert!(rate >= 0.0 && rate.is_finite(), "{l}");
        assert!(l.contains("ETA"), "{l}");
    }
    lines
}

#[test]
fn pretrain_logs_progress_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = s(&tmp.path().join("mim.safetensors"));
    progress_lines(
        &[
            "pretrain",
            "--arch",
            "test_tiny_beit",
            "--data",
            "digits:0-4",
            "--epochs",
            "2",
            "--batch",
            "16",
            "-o",
            &ck,
        ],
        "pretrain",
        "steps",
    );
}

#[test]
fn bench_logs_progress_lines_for_a_model_ood_scoring_and_decoding() {
    progress_lines(
        &[
            "bench",
            "--arch",
            "test_tiny_beit",
            "--batch",
            "32",
            "--iters",
            "60",
        ],
        "bench",
        "iter",
    );
    progress_lines(
        &[
            "bench",
            "--ood",
            "mahalanobis",
            "--rows",
            "20000",
            "--dim",
            "64",
            "--classes",
            "10",
            "--train-rows",
            "2000",
            "--iters",
            "30",
        ],
        "bench",
        "iter",
    );
    // An image folder of the preprocessing fixtures, copied enough times to take a while.
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..30 {
        for f in ["flower.png", "china_cmyk.jpg", "china_odd.jpg"] {
            std::fs::copy(
                fixture(&format!("preprocess/{f}")),
                tmp.path().join(format!("{i}_{f}")),
            )
            .unwrap();
        }
    }
    progress_lines(
        &["bench", "--data", &s(tmp.path()), "--iters", "3"],
        "bench",
        "images",
    );
}

#[test]
fn eval_logs_progress_lines() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, data) in [
        ("train", "digits:0-4@train"),
        ("id", "digits:0-4@test"),
        ("near", "digits:5-9@test"),
    ] {
        let (code, _, err) = extract_tiny(data, &tmp.path().join(name), &[]);
        assert_eq!(code, 0, "{err}");
    }
    let p = |n: &str| s(&tmp.path().join(n));
    let near = format!("near={}", p("near"));
    progress_lines(
        &[
            "eval",
            "--train",
            &p("train"),
            "--id",
            &p("id"),
            "--ood",
            &near,
        ],
        "eval",
        "methods",
    );
}
