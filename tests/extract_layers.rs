//! `mood extract --layers` (issue 16, item 2): per-block pooled features from the one forward,
//! recorded in the manifest and the run's identity, so that a resume, a merge or an eval that
//! would combine stores of different layers is refused; and `mood eval` runs the multi-layer
//! methods on them.

mod common;

use std::path::Path;

use common::{assert_refused, extract_tiny, run_mood};

/// The digits test split (classes 0-4) through the tiny BEiT (2 blocks), 8 a batch, 32 a chunk.
fn extract(data: &str, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["--batch", "8", "--chunk", "32"];
    args.extend_from_slice(extra);
    extract_tiny(data, out, &args)
}

/// The last block's layers.npy entry is the pooled vector the features come from: fc_norm of
/// it is features.npy (BEiT: feature = fc_norm(mean of the last block's patch tokens)).
#[test]
fn layers_come_from_the_same_forward_and_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    let (code, _, err) = extract("digits:0-4@test", &out, &["--layers", "1,2"]);
    assert_eq!(code, 0, "{err}");
    let s = mood::store::FeatureStore::open(&out).unwrap();
    assert_eq!(s.manifest.layers, [1, 2]);
    assert_eq!(s.manifest.identity.as_ref().unwrap().layers, [1, 2]);
    assert!(s.manifest.files.iter().any(|f| f == "layers.npy"));
    let layers = s.layers.as_ref().unwrap();
    let (n, d) = (s.rows(), s.dim());
    assert_eq!(layers.shape(), [n, 2, d]);
    let norm = s.head.as_ref().unwrap().fc_norm.clone().unwrap();
    let mut worst = 0.0f32;
    for i in 0..n {
        let last = &layers.as_slice()[(i * 2 + 1) * d..(i * 2 + 2) * d];
        let mean = last.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = last.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let got = &s.features.as_slice()[i * d..(i + 1) * d];
        for (j, (&v, &g)) in last.iter().zip(got).enumerate() {
            let want = ((v as f64 - mean) / (var + norm.eps as f64).sqrt()) as f32 * norm.weight[j]
                + norm.bias[j];
            worst = worst.max((want - g).abs());
        }
    }
    assert!(worst < 1e-4, "fc_norm(layer 2) vs features: {worst}");
    // The first block differs from the last.
    assert!(layers.as_slice()[..d] != layers.as_slice()[d..2 * d]);

    // A store without --layers has no layers.npy and no `layers` in its manifest.
    let plain = tmp.path().join("plain");
    let (code, _, err) = extract("digits:0-4@test", &plain, &[]);
    assert_eq!(code, 0, "{err}");
    let m = std::fs::read_to_string(plain.join("manifest.json")).unwrap();
    assert!(!m.contains("layers"), "{m}");
    // Features do not depend on --layers.
    let p = mood::store::FeatureStore::open(&plain).unwrap();
    assert_eq!(p.features.as_slice(), s.features.as_slice());

    // Rerunning into the store with other layers is refused, naming --layers.
    assert_refused(
        &extract("digits:0-4@test", &out, &["--layers", "2"]),
        &["--layers"],
    );
}

#[test]
fn bad_layers_are_refused_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    for (layers, want) in [
        ("0", "from 1"),
        ("2,1", "increasing"),
        ("1,1", "increasing"),
        ("x", "block numbers"),
        ("3", "1..=2"),
    ] {
        assert_refused(
            &extract("digits:0-4@test", &out, &["--layers", layers]),
            &[want],
        );
    }
    // A ResNet has stages, not blocks with patch tokens: refused, saying why.
    let resnet = common::fixture("resnet/tiny_resnet_basic_cifar.safetensors");
    assert_refused(
        &common::extract_arch(
            "test_tiny_resnet_basic_cifar",
            resnet.to_str().unwrap(),
            "digits:0-4@test",
            &out,
            &["--layers", "1"],
            &[],
        ),
        &["--layers", "ResNet", "per-stage hook"],
    );
}

#[test]
fn shards_merge_only_with_the_same_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (code, _, err) = extract(
        "digits:0-4@test",
        &a,
        &["--shard", "0/2", "--layers", "1,2"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = extract("digits:0-4@test", &b, &["--shard", "1/2", "--layers", "2"]);
    assert_eq!(code, 0, "{err}");
    let out = tmp.path().join("m").to_string_lossy().into_owned();
    let (a_s, b_s) = (a.to_string_lossy(), b.to_string_lossy());
    assert_refused(&run_mood(&["merge", &a_s, &b_s, "-o", &out]), &["--layers"]);
    // Shards of the same layers merge into the unsharded store's layers.npy, byte for byte.
    let c = tmp.path().join("c");
    let (code, _, err) = extract(
        "digits:0-4@test",
        &c,
        &["--shard", "1/2", "--layers", "1,2"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_mood(&["merge", &a_s, &c.to_string_lossy(), "-o", &out]);
    assert_eq!(code, 0, "{err}");
    let whole = tmp.path().join("whole");
    let (code, _, err) = extract("digits:0-4@test", &whole, &["--layers", "1,2"]);
    assert_eq!(code, 0, "{err}");
    let merged = mood::store::FeatureStore::open(Path::new(&out)).unwrap();
    assert_eq!(merged.manifest.layers, [1, 2]);
    assert_eq!(
        std::fs::read(Path::new(&out).join("layers.npy")).unwrap(),
        std::fs::read(whole.join("layers.npy")).unwrap()
    );
}

/// `mood eval` with the multi-layer methods on stores extracted with --layers; a test store of
/// other layers is refused in one line, and without layers the methods are skipped with the
/// reason under `--methods all`.
#[test]
fn eval_runs_the_multilayer_methods() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    for (name, data, layers) in [
        // Every class of the tiny model's 10-class head has train rows (gram's ranges are per
        // predicted class).
        ("train", "digits@train", "1,2"),
        ("id", "digits:0-4@test", "1,2"),
        ("ood", "digits:5-9@test", "1,2"),
        ("ood1", "digits:5-9@test", "1"),
    ] {
        let (code, _, err) = extract(data, &tmp.path().join(name), &["--layers", layers]);
        assert_eq!(code, 0, "{name}: {err}");
    }
    let eval = |ood: &str, methods: &str| {
        run_mood(&[
            "eval",
            "--train",
            &p("train"),
            "--id",
            &p("id"),
            "--ood",
            &format!("near={}", p(ood)),
            "--methods",
            methods,
        ])
    };
    let (code, out, err) = eval("ood", "mahalanobis-ensemble,gram,mahalanobis");
    assert_eq!(code, 0, "{err}");
    for row in ["| mahalanobis-ensemble |", "| gram |", "| mahalanobis |"] {
        assert!(out.contains(row), "{row}: {out}");
    }
    assert_refused(
        &eval("ood1", "mahalanobis-ensemble"),
        &["blocks [1]", "blocks [1, 2]", "--layers"],
    );
    // weights=lr: held-out train rows against the val_ood store; without it, refused naming it;
    // a val_ood store of other blocks is refused naming both lists.
    let lr = |val: Option<&str>| {
        let mut a = vec![
            "eval".to_string(),
            "--train".into(),
            p("train"),
            "--id".into(),
            p("id"),
            "--ood".into(),
            format!("near={}", p("ood")),
            "--methods".into(),
            "mahalanobis-ensemble".into(),
            "--method-arg".into(),
            "weights=lr".into(),
        ];
        if let Some(v) = val {
            a.extend(["--method-arg".into(), format!("val_ood={}", p(v))]);
        }
        run_mood(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (code, out, err) = lr(Some("ood"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| mahalanobis-ensemble"), "{out}");
    assert_refused(&lr(None), &["weights=lr", "val_ood=DIR"]);
    assert_refused(&lr(Some("ood1")), &["val_ood", "[1, 2]", "[1]"]);
    // The fitted weights travel in the detector file: `mood score` needs no validation store.
    let det = p("ens_lr.safetensors");
    let val = format!("val_ood={}", p("ood"));
    let fit: [&str; 11] = [
        "fit",
        "--method",
        "mahalanobis-ensemble",
        "--method-arg",
        "weights=lr",
        "--method-arg",
        &val,
        "--train",
        &p("train"),
        "-o",
        &det,
    ];
    let (code, _, err) = run_mood(&fit);
    assert_eq!(code, 0, "{err}");
    let scores = p("ens_lr.npy");
    let (code, _, err) = run_mood(&[
        "score",
        "--detector",
        &det,
        "--features",
        &p("id"),
        "-o",
        &scores,
    ]);
    assert_eq!(code, 0, "{err}");
    let (shape, s) = mood::npy::read_f32(Path::new(&scores)).unwrap();
    assert!(shape[0] > 0 && s.iter().all(|v| v.is_finite()), "{s:?}");
    // A head class without train rows: gram is refused, its name said once.
    let (code, _, err) = run_mood(&[
        "eval",
        "--train",
        &p("id"),
        "--id",
        &p("id"),
        "--ood",
        &format!("near={}", p("ood")),
        "--methods",
        "gram",
    ]);
    assert_refused(&(code, String::new(), err.clone()), &["has no train rows"]);
    assert!(
        err.contains("gram: class 5 of the 10 logits") && !err.contains("gram: gram"),
        "{err}"
    );
    // Stores without layers: listed as skipped, with what they lack.
    let (code, _, err) = extract("digits:0-4@test", &tmp.path().join("plain"), &[]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_mood(&[
        "eval",
        "--train",
        &p("plain"),
        "--id",
        &p("plain"),
        "--ood",
        &format!("near={}", p("plain")),
        "--methods",
        "all",
    ]);
    assert_eq!(code, 0, "{err}");
    for m in ["mahalanobis-ensemble", "gram"] {
        let line = format!("skipped {m}: needs per-block features (layers.npy");
        assert!(out.contains(&line), "{line}: {out}");
    }
}
