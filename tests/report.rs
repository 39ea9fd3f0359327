//! `mood eval` and `mood score` read only stores that belong together, write their report where
//! no earlier output mixes in, and the report carries what a paper needs: report.md's tables,
//! report.json's provenance, SVG figures whose histogram survives an outlier.

mod common;

use std::path::Path;

use common::{assert_refused, edit_manifest, extract_arch, extract_tiny, fixture, run_mood};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// train, id and near stores of the tiny BEiT, and `other`: the near set through the same model
/// with its f16 weights (another SHA-256).
fn stores(dir: &Path) {
    for (name, data) in [
        ("train", "digits:0-4@train"),
        ("id", "digits:0-4@test"),
        ("near", "digits:5-9@test"),
    ] {
        let (code, _, err) = extract_tiny(data, &dir.join(name), &[]);
        assert_eq!(code, 0, "{err}");
    }
    let f16 = s(&fixture("timm/tiny_beit_f16.safetensors"));
    let (code, _, err) = extract_arch(
        "test_tiny_beit",
        &f16,
        "digits:5-9@test",
        &dir.join("other"),
        &[],
        &[],
    );
    assert_eq!(code, 0, "{err}");
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn eval_and_score_refuse_stores_of_another_model_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    stores(d);
    let p = |n: &str| s(&d.join(n));
    let (train, id) = (p("train"), p("id"));
    let eval = |ood: &str, extra: &[&str]| {
        let o = format!("near={ood}");
        let mut args = vec![
            "eval",
            "--train",
            &train,
            "--id",
            &id,
            "--ood",
            &o,
            "--methods",
            "mahalanobis,msp",
        ];
        args.extend_from_slice(extra);
        let a: Vec<String> = args.iter().map(|x| x.to_string()).collect();
        let r: Vec<&str> = a.iter().map(String::as_str).collect();
        run_mood(&r)
    };
    assert_refused(
        &eval(&p("other"), &[]),
        &[
            "does not match --train",
            "weights SHA-256",
            "--allow-mismatch",
        ],
    );
    // Another preprocessing on the same weights.
    let pre = d.join("pre");
    let (code, _, err) = extract_tiny("digits:5-9@test", &pre, &[]);
    assert_eq!(code, 0, "{err}");
    edit_manifest(&pre, |m| m["preprocess"] = "moodv2: 224 bilinear".into());
    assert_refused(&eval(&s(&pre), &[]), &["preprocessing"]);
    // Allowed: evaluated, and the report says so.
    let out = p("allowed");
    let (code, _, err) = eval(&p("other"), &["--allow-mismatch", "-o", &out]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning:") && err.contains("weights SHA-256"),
        "{err}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("allowed/report.json")).unwrap())
            .unwrap();
    let allowed = json["provenance"]["mismatches_allowed"].as_array().unwrap();
    assert_eq!(allowed.len(), 1, "{allowed:?}");
    assert!(allowed[0].as_str().unwrap().contains("weights SHA-256"));
    let md = std::fs::read_to_string(d.join("allowed/report.md")).unwrap();
    assert!(md.contains("Mismatch allowed"), "{md}");

    // score: the detector remembers its train store.
    let det = p("det.safetensors");
    let (code, _, err) = run_mood(&[
        "fit",
        "--method",
        "mahalanobis",
        "--train",
        &p("train"),
        "-o",
        &det,
    ]);
    assert_eq!(code, 0, "{err}");
    let scores = p("scores.npy");
    let score = |store: &str, extra: &[&str]| {
        let mut args = vec![
            "score",
            "--detector",
            &det,
            "--features",
            store,
            "-o",
            &scores,
        ];
        args.extend_from_slice(extra);
        run_mood(&args)
    };
    let (code, _, err) = score(&p("near"), &[]);
    assert_eq!(code, 0, "{err}");
    let near_scores = std::fs::read(&scores).unwrap();
    assert_refused(
        &score(&p("other"), &[]),
        &["does not match --detector", "weights SHA-256"],
    );
    let (code, _, err) = score(&p("other"), &["--allow-mismatch"]);
    assert_eq!(code, 0, "{err}");
    // The stamped detector still scores as the library's own: the near scores equal a fit in
    // the library.
    let train = mood::store::FeatureStore::open(&d.join("train")).unwrap();
    let near = mood::store::FeatureStore::open(&d.join("near")).unwrap();
    let lib =
        mood::ood::detector::Detector::fit("mahalanobis", Default::default(), &train.inputs(None))
            .unwrap()
            .score(&near.inputs(None))
            .unwrap();
    let tmpnpy = d.join("lib.npy");
    mood::npy::write_f32(&tmpnpy, &[lib.len()], &lib).unwrap();
    assert_eq!(std::fs::read(&tmpnpy).unwrap(), near_scores);
}

#[test]
fn eval_output_replaces_only_an_earlier_report() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    stores(d);
    let p = |n: &str| s(&d.join(n));
    let ood = format!("near={}", p("near"));
    let (train, id) = (p("train"), p("id"));
    let eval = |methods: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--train",
            &train,
            "--id",
            &id,
            "--ood",
            &ood,
            "--methods",
            methods,
            "-o",
            out,
        ];
        args.extend_from_slice(extra);
        run_mood(&args)
    };
    let out = p("report");
    let (code, _, err) = eval("mahalanobis,knn", &out, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(d.join("report/plots/knn.png").exists());
    // The same folder again with other methods: the earlier report goes, plots and all.
    let (code, _, err) = eval("msp", &out, &[]);
    assert_eq!(code, 0, "{err}");
    let plots: Vec<String> = std::fs::read_dir(d.join("report/plots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut plots = plots;
    plots.sort();
    assert_eq!(plots, vec!["msp.png", "msp.svg"]);
    // A folder with something else in it: refused; --overwrite writes and keeps that file.
    let other = d.join("notes");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    assert_refused(
        &eval("msp", &s(&other), &[]),
        &["not empty", "notes.txt", "--overwrite"],
    );
    assert!(!other.join("report.json").exists());
    let (code, _, err) = eval("msp", &s(&other), &["--overwrite"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(other.join("notes.txt")).unwrap(), b"mine");
    // Never into a store it reads.
    assert_refused(
        &eval("msp", &format!("{}/report", p("id")), &[]),
        &["inside the --id store"],
    );
}

#[test]
fn report_md_json_and_svg_carry_the_tables_and_the_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    stores(d);
    let p = |n: &str| s(&d.join(n));
    let ood = format!("near={}", p("near"));
    let out = p("report");
    let (code, _, err) = run_mood(&[
        "eval",
        "--train",
        &p("train"),
        "--id",
        &p("id"),
        "--ood",
        &ood,
        "--methods",
        "mahalanobis,knn",
        "--method-arg",
        "knn.k=7",
        "--fpr",
        "knn",
        "-o",
        &out,
    ]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("report/report.json")).unwrap())
            .unwrap();
    let prov = &json["provenance"];
    assert_eq!(prov["mood_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(prov["command"], "mood eval");
    let scored_on = prov["scored_on"].as_str().unwrap();
    assert!(
        scored_on.starts_with("cpu (") && scored_on.ends_with(", 2 threads)"),
        "{scored_on}"
    );
    let stores = prov["stores"].as_array().unwrap();
    assert_eq!(stores.len(), 3);
    let weights_sha = sha256(&fixture("timm/tiny_beit.safetensors"));
    for (st, name) in stores.iter().zip(["train", "id", "near"]) {
        let m = mood::store::read_manifest(&d.join(name)).unwrap().unwrap();
        let rows = mood::store::FeatureStore::open(&d.join(name))
            .unwrap()
            .rows();
        assert_eq!(st["count"].as_u64().unwrap() as usize, rows, "{name}");
        assert_eq!(st["weights_sha256"], weights_sha.as_str(), "{name}");
        assert_eq!(st["model"], "test_tiny_beit");
        assert_eq!(st["preprocess"], m.preprocess.as_str());
        // What extracted the rows: the kind and precision, and the processor with its threads.
        assert_eq!(st["device"], "cpu", "{name}");
        assert_eq!(st["precision"], "f32", "{name}");
        assert!(
            st["device_name"].as_str().unwrap().ends_with(", 2 threads"),
            "{st}"
        );
    }
    assert_eq!(json["fpr_rule"], "knnood");
    let knn = json["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["method"] == "knn")
        .unwrap();
    assert_eq!(knn["args"]["k"], "7");

    let md = std::fs::read_to_string(d.join("report/report.md")).unwrap();
    for section in [
        "## AUROC",
        "## AUPR-In",
        "## AUPR-Out",
        "## FPR@95",
        "## Stores",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    assert!(
        md.contains("rule `knnood`") && md.contains("sort_asc(ID)"),
        "{md}"
    );
    assert!(md.contains("k=7"), "{md}");
    assert!(md.contains(&format!("Scored on {scored_on}.")), "{md}");
    let device_name = stores[0]["device_name"].as_str().unwrap();
    assert!(
        md.contains("extracted on |") && md.contains(&format!("| cpu f32 ({device_name}) |")),
        "{md}"
    );
    // Each table row carries report.json's numbers.
    for m in json["methods"].as_array().unwrap() {
        let r = &m["results"][0]["metrics"];
        for key in ["auroc", "aupr_in", "aupr_out", "fpr95"] {
            let v = format!("{:.2}", 100.0 * r[key].as_f64().unwrap());
            let row = format!("| {} | {v} |", m["method"].as_str().unwrap());
            assert!(md.contains(&row), "{row} not in report.md:\n{md}");
        }
    }
    for method in ["mahalanobis", "knn"] {
        let svg = std::fs::read_to_string(d.join(format!("report/plots/{method}.svg"))).unwrap();
        assert!(svg.starts_with("<svg"), "{method}.svg");
        let auroc = json["methods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["method"] == method)
            .unwrap()["results"][0]["metrics"]["auroc"]
            .as_f64()
            .unwrap();
        let legend = format!("near (AUROC {:.2}%)", 100.0 * auroc);
        assert!(svg.contains(&legend), "{legend} not in {method}.svg");
        assert!(
            svg.contains("chance"),
            "no chance line label in {method}.svg"
        );
        assert!(d.join(format!("report/plots/{method}.png")).exists());
    }
}

#[test]
fn an_outlier_does_not_squeeze_the_id_histogram() {
    use mood::report::plot::{bin_counts, histogram_axis, Axis};
    let mut rng = mood::model::init::Rng::new(7);
    let id: Vec<f32> = (0..1000).map(|_| rng.normal() as f32).collect();
    let mut ood: Vec<f32> = (0..500).map(|_| 3.0 + rng.normal() as f32).collect();
    ood[17] = 1e5;
    let bins = 50;
    // The full range would put every ID score in one or two bins.
    let full = Axis {
        lo: -5.0,
        hi: 1e5,
        outside: 0,
        clipped: false,
    };
    let naive = bin_counts(&id, &full, bins);
    assert!(*naive.iter().max().unwrap() >= 990, "{naive:?}");
    let axis = histogram_axis(&[&id, &ood]);
    assert!(axis.clipped);
    assert!(axis.outside >= 1 && axis.outside <= 30, "{axis:?}");
    let counts = bin_counts(&id, &axis, bins);
    let nonempty = counts.iter().filter(|&&c| c > 0).count();
    let max = *counts.iter().max().unwrap();
    assert!(nonempty >= 15, "ID spread over {nonempty} bins: {counts:?}");
    assert!(max <= 150, "tallest ID bin {max} of 1000: {counts:?}");
    // The bulk of every set is on the axis: at most 1% of each beyond each end.
    let kept = |v: &[f32]| bin_counts(v, &axis, bins).iter().sum::<usize>();
    assert!(kept(&id) >= 980 && kept(&ood) >= 490);
    // The figure says that it clipped.
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("m.png");
    mood::report::plot::method_figure(&png, "m", &id, &[("far", &ood)]).unwrap();
    let svg = std::fs::read_to_string(tmp.path().join("m.svg")).unwrap();
    assert!(svg.contains("clipped"), "no clipping note in the SVG");
}
