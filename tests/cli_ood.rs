//! `mood fit`, `mood score` and `mood eval` through the binary on small stores written with the
//! store writer: outputs exist and agree with the library, and bad input fails on one line.

use std::path::Path;
use std::process::Command;

use mood::ood::detector::Head;
use mood::store::{write, Contents, Manifest};
use mood::Tensor;

fn mood(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mood"))
        .args(args)
        .output()
        .expect("run mood");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(r: (i32, String, String), must_contain: &[&str]) {
    let (code, _, stderr) = r;
    assert_ne!(code, 0, "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    for m in must_contain {
        assert!(stderr.contains(m), "`{m}` not in: {stderr}");
    }
}

const D: usize = 6;
const C: usize = 3;

/// Rows around class centres (ID) or around `shift` (OOD), with a head that reads the classes.
fn store(dir: &Path, n: usize, seed: u64, shift: Option<f32>, labels: bool) {
    let mut rng = mood::model::init::Rng::new(seed);
    let y: Vec<usize> = (0..n).map(|i| i % C).collect();
    let f: Vec<f32> = (0..n * D)
        .map(|k| {
            let centre = match shift {
                Some(s) => s,
                None if k % D == y[k / D] => 4.0,
                None => 0.0,
            };
            centre + rng.normal() as f32
        })
        .collect();
    let head = Head {
        weight: (0..C * D)
            .map(|k| if k % D == k / D { 1.0 } else { 0.0 })
            .collect(),
        bias: vec![0.0; C],
        fc_norm: None,
    };
    let features = Tensor::from_vec(&[n, D], f).unwrap();
    write(
        dir,
        Contents {
            features: &features,
            logits: None,
            labels: labels.then_some(&y[..]),
            local: None,
            head: Some(&head),
            odin: None,
            manifest: Manifest {
                model: "synthetic".into(),
                ..Default::default()
            },
        },
    )
    .unwrap();
}

#[test]
fn fit_score_eval_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    store(&tmp.path().join("train"), 300, 1, None, true);
    store(&tmp.path().join("id"), 90, 2, None, true);
    store(&tmp.path().join("far"), 60, 3, Some(-3.0), false);
    store(&tmp.path().join("near"), 60, 4, Some(1.5), false);

    let (code, _, err) = mood(&[
        "fit",
        "--method",
        "knn",
        "--method-arg",
        "k=5",
        "--train",
        &p("train"),
        "-o",
        &p("knn.safetensors"),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = mood(&[
        "score",
        "--detector",
        &p("knn.safetensors"),
        "--features",
        &p("far"),
        "-o",
        &p("far.npy"),
    ]);
    assert_eq!(code, 0, "{err}");
    let (shape, scores) = mood::npy::read_f32(Path::new(&p("far.npy"))).unwrap();
    assert_eq!(shape, vec![60]);
    let train = mood::store::FeatureStore::open(&tmp.path().join("train")).unwrap();
    let far = mood::store::FeatureStore::open(&tmp.path().join("far")).unwrap();
    let det = mood::ood::detector::Detector::fit(
        "knn",
        [("k".to_string(), "5".to_string())].into(),
        &train.inputs(None),
    )
    .unwrap();
    assert_eq!(
        scores,
        det.score(&far.inputs(None)).unwrap(),
        "CLI and library agree"
    );

    let (code, out, err) = mood(&[
        "eval",
        "--train",
        &p("train"),
        "--id",
        &p("id"),
        "--ood",
        &format!("far={}", p("far")),
        "--ood",
        &format!("near={}", p("near")),
        "--methods",
        "all",
        "--method-arg",
        "knn.k=5",
        "--method-arg",
        "csd.k=3",
        "--fpr",
        "mos",
        "--aupr",
        "trapezoid",
        "-o",
        &p("report"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| method | far | near | average |"), "{out}");
    assert!(
        out.contains("| mahalanobis |") && out.contains("| vim |"),
        "{out}"
    );
    assert!(out.contains("skipped csd"), "no local features: {out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("report/report.json")).unwrap()).unwrap();
    let methods = report["methods"].as_array().unwrap();
    let maha = methods
        .iter()
        .find(|m| m["method"] == "mahalanobis")
        .unwrap();
    let far_auroc = maha["results"][0]["metrics"]["auroc"].as_f64().unwrap();
    assert!(far_auroc > 0.99, "far OOD is easy: {far_auroc}");
    assert_eq!(report["fpr_rule"], "mos");
    assert_eq!(report["aupr"], "trapezoid");
    let knn = methods.iter().find(|m| m["method"] == "knn").unwrap();
    assert_eq!(knn["args"]["k"], "5");
    let csv = std::fs::read_to_string(p("report/report.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + methods.len() * 3,
        "a row per method and set + average"
    );
    let png = std::fs::read(p("report/plots/mahalanobis.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn bad_input_fails_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    store(&tmp.path().join("train"), 60, 1, None, true);
    store(&tmp.path().join("nolabels"), 30, 2, None, false);
    assert_one_line_error(
        mood(&[
            "fit",
            "--method",
            "mahalanobiss",
            "--train",
            &p("train"),
            "-o",
            &p("d"),
        ]),
        &["unknown method", "mood-v1", "knn"],
    );
    assert_one_line_error(
        mood(&[
            "fit",
            "--method",
            "knn",
            "--method-arg",
            "q=3",
            "--train",
            &p("train"),
            "-o",
            &p("d"),
        ]),
        &["no setting `q`"],
    );
    assert_one_line_error(
        mood(&[
            "fit",
            "--method",
            "mahalanobis",
            "--train",
            &p("nolabels"),
            "-o",
            &p("d"),
        ]),
        &["labels"],
    );
    assert_one_line_error(
        mood(&[
            "fit",
            "--method",
            "knn",
            "--train",
            &p("missing"),
            "-o",
            &p("d"),
        ]),
        &["missing", "mood extract"],
    );
    assert!(
        !tmp.path().join("d").exists(),
        "no detector file after a failed fit"
    );
    // A detector fitted on 6-wide features scoring 5-wide ones.
    let (code, _, err) = mood(&[
        "fit",
        "--method",
        "mahalanobis",
        "--train",
        &p("train"),
        "-o",
        &p("m.safetensors"),
    ]);
    assert_eq!(code, 0, "{err}");
    let narrow = tmp.path().join("narrow");
    std::fs::create_dir_all(&narrow).unwrap();
    mood::npy::write_f32(&narrow.join("features.npy"), &[4, 5], &[0.5; 20]).unwrap();
    assert_one_line_error(
        mood(&[
            "score",
            "--detector",
            &p("m.safetensors"),
            "--features",
            &p("narrow"),
            "-o",
            &p("s.npy"),
        ]),
        &["5 wide", "6-wide"],
    );
    let nan = tmp.path().join("nan");
    std::fs::create_dir_all(&nan).unwrap();
    let mut v = vec![0.5f32; 4 * D];
    v[2 * D + 1] = f32::NAN;
    mood::npy::write_f32(&nan.join("features.npy"), &[4, D], &v).unwrap();
    assert_one_line_error(
        mood(&[
            "score",
            "--detector",
            &p("m.safetensors"),
            "--features",
            &p("nan"),
            "-o",
            &p("s.npy"),
        ]),
        &["row 2"],
    );
    assert!(
        !tmp.path().join("s.npy").exists(),
        "no scores file after a failure"
    );
    mood::npy::write_f32(&nan.join("labels.npy"), &[4], &[0.0, 1.0, 7.0, 2.0]).unwrap();
    assert_one_line_error(
        mood(&[
            "fit",
            "--method",
            "mahalanobis",
            "--train",
            &p("nan"),
            "-o",
            &p("d"),
        ]),
        &["row 2"],
    );
    assert_one_line_error(
        mood(&[
            "eval",
            "--train",
            &p("train"),
            "--id",
            &p("train"),
            "--ood",
            "nodir",
        ]),
        &["NAME=DIR"],
    );
    assert_one_line_error(
        mood(&[
            "eval",
            "--train",
            &p("train"),
            "--id",
            &p("train"),
            "--ood",
            &format!("x={}", p("train")),
            "--method-arg",
            "zz=1",
        ]),
        &["zz"],
    );
}
