//! `mood fit`, `mood score` and `mood eval` through the binary on small stores written with the
//! store writer: outputs exist and agree with the library, and bad input fails on one line.

mod common;

use common::run_mood as mood;
use std::path::Path;

/// One line of error (a store saved by hand is read with a note saying so; notes aside).
fn assert_one_line_error(r: (i32, String, String), must_contain: &[&str]) {
    common::assert_refused(&r, must_contain);
}

const D: usize = 6;
const C: usize = 3;

/// Rows around class centres (ID) or around `shift` (OOD), with a head that reads the classes.
fn store(dir: &Path, n: usize, seed: u64, shift: Option<f32>, labels: bool) {
    let s = common::Synthetic {
        dim: D,
        classes: C,
        shift,
        labels: labels.then(Vec::new),
        ..Default::default()
    };
    common::synthetic_store(dir, n, seed, s);
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

/// Whether this build reaches a CUDA device: then `--device cuda` scores instead of failing.
fn gpu_present() -> bool {
    #[cfg(feature = "cuda")]
    return mood::backend::cuda::probe().is_ok();
    #[cfg(not(feature = "cuda"))]
    false
}

/// Max |a − b| / (|b| + 1): scores from the GPU are the f32 expansion (src/ood/cuda_score.rs).
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (y.abs() + 1.0))
        .fold(0.0, f32::max)
}

#[test]
fn device_flag_of_score_and_eval() {
    let gpu = gpu_present();
    if !gpu {
        eprintln!("no CUDA device: checking the CPU fallback and the one-line errors only");
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    store(&tmp.path().join("train"), 300, 1, None, true);
    store(&tmp.path().join("id"), 90, 2, None, true);
    store(&tmp.path().join("far"), 60, 3, Some(-3.0), false);
    let train = p("train");
    for (method, arg) in [("mahalanobis", None), ("knn", Some("k=5")), ("msp", None)] {
        let det = p(&format!("{method}.safetensors"));
        let mut fit = vec!["fit", "--method", method, "--train", &train, "-o", &det];
        if let Some(a) = arg {
            fit.extend(["--method-arg", a]);
        }
        let (code, _, err) = mood(&fit);
        assert_eq!(code, 0, "{err}");
        let score = |device: &str, out: &str| {
            let out = p(out);
            let r = mood(&[
                "score",
                "--detector",
                &det,
                "--features",
                &p("far"),
                "-o",
                &out,
                "--device",
                device,
            ]);
            (r, out)
        };
        let ((code, _, err), cpu_out) = score("cpu", &format!("{method}_cpu.npy"));
        assert_eq!(code, 0, "{err}");
        let cpu = mood::npy::read_f32(Path::new(&cpu_out)).unwrap().1;

        let ((code, _, err), auto_out) = score("auto", &format!("{method}_auto.npy"));
        assert_eq!(code, 0, "{err}");
        let auto = mood::npy::read_f32(Path::new(&auto_out)).unwrap().1;
        if gpu {
            assert!(max_rel(&auto, &cpu) < 1e-4, "{method}: auto vs cpu");
        } else {
            assert_eq!(auto, cpu, "{method}: auto without a GPU is the CPU");
            let notes: Vec<&str> = err.lines().filter(|l| l.starts_with("note:")).collect();
            assert_eq!(notes.len(), 1, "{err}");
            assert!(notes[0].contains("--device auto") && notes[0].contains("CPU"));
        }

        let (r, cuda_out) = score("cuda", &format!("{method}_cuda.npy"));
        if gpu {
            assert_eq!(r.0, 0, "{}", r.2);
            let cuda = mood::npy::read_f32(Path::new(&cuda_out)).unwrap().1;
            assert!(max_rel(&cuda, &cpu) < 1e-4, "{method}: cuda vs cpu");
            let note = r.2.contains("no CUDA scorer for msp");
            assert_eq!(note, method == "msp", "{}", r.2);
        } else {
            assert_one_line_error(r, &["cuda"]);
            assert!(!Path::new(&cuda_out).exists(), "no scores after a failure");
        }
    }

    let eval = |device: &str| {
        mood(&[
            "eval",
            "--train",
            &p("train"),
            "--id",
            &p("id"),
            "--ood",
            &format!("far={}", p("far")),
            "--methods",
            "mahalanobis,knn,mood-v1,msp",
            "--method-arg",
            "knn.k=5",
            "--device",
            device,
        ])
    };
    let (code, cpu_table, err) = eval("cpu");
    assert_eq!(code, 0, "{err}");
    assert!(cpu_table.contains("| knn |"), "{cpu_table}");
    let (code, auto_table, err) = eval("auto");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        auto_table, cpu_table,
        "eval --device auto reports as the CPU"
    );
    if gpu {
        let (code, cuda_table, err) = eval("cuda");
        assert_eq!(code, 0, "{err}");
        assert_eq!(cuda_table, cpu_table);
        let notes: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("no CUDA scorer"))
            .collect();
        assert_eq!(notes.len(), 1, "said once: {err}");
        assert!(
            notes[0].contains("msp") && !notes[0].contains("knn"),
            "{err}"
        );
    } else {
        assert_one_line_error(eval("cuda"), &["cuda"]);
    }
}

#[test]
fn bench_ood_prints_its_figures() {
    let (code, out, err) = mood(&[
        "bench",
        "--ood",
        "mahalanobis",
        "--rows",
        "600",
        "--dim",
        "16",
        "--classes",
        "8",
        "--train-rows",
        "200",
        "--iters",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ood mahalanobis on cpu"), "{out}");
    assert!(
        out.contains("ms per 50k rows") && out.contains("rows/s"),
        "{out}"
    );
    let (code, out, err) = mood(&[
        "bench",
        "--ood",
        "knn",
        "--rows",
        "300",
        "--dim",
        "16",
        "--train-rows",
        "100",
        "--method-arg",
        "k=5",
        "--iters",
        "2",
        "--device",
        "auto",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ood"], "knn");
    assert_eq!(v["k"], "5");
    assert_eq!(v["rows"], 300);
    assert!(v["rows_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["ms_per_50k"].as_f64().unwrap() > 0.0, "{v}");
    if !gpu_present() {
        assert_eq!(v["device"], "cpu");
        assert!(err.contains("note: --device auto"), "{err}");
    }
    assert_one_line_error(
        mood(&["bench", "--ood", "csd", "--rows", "10"]),
        &["--ood csd", "patch-token features"],
    );
    if !gpu_present() {
        assert_one_line_error(
            mood(&[
                "bench", "--ood", "knn", "--rows", "10", "--dim", "4", "--device", "cuda",
            ]),
            &["cuda"],
        );
    }
}
