//! Every registered OOD method through the `Detector` API: scores against numpy / scikit-learn /
//! torch transcriptions of SPEC (tools/make_ood_fixtures.py), save → load round trips, and the
//! one-line refusals of bad input.

mod common;

use std::collections::BTreeMap;

use common::fixture;
use mood::ood::csd::FcNorm;
use mood::ood::detector::{parse_args, Detector, Head, Inputs, Matrix, METHODS};

fn f32s(name: &str) -> (Vec<usize>, Vec<f32>) {
    mood::npy::read_f32(&fixture(&format!("ood/{name}.npy"))).unwrap()
}

fn f64s(name: &str) -> Vec<f64> {
    let bytes = std::fs::read(fixture(&format!("ood/{name}.npy"))).unwrap();
    npyz::NpyFile::new(&bytes[..])
        .unwrap()
        .into_vec::<f64>()
        .unwrap()
}

fn args(method: &str, given: &[&str]) -> BTreeMap<String, String> {
    let m = mood::ood::detector::method(method).unwrap();
    let given: Vec<String> = given.iter().map(|s| s.to_string()).collect();
    parse_args(m, &given).unwrap()
}

fn features(data: &[f32], cols: usize) -> Inputs<'_> {
    Inputs {
        features: Some(Matrix { data, cols }),
        ..Default::default()
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f64, |a, b| a.max(b.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= rel * scale,
            "{what}[{i}]: ours {g}, reference {w} (scale {scale})"
        );
    }
}

#[test]
fn mood_v1_feature_scores_match_numpy_and_sklearn() {
    for (prefix, methods) in [
        (
            "methods",
            &[
                "mood-v1",
                "mahalanobis-cc",
                "mahalanobis-avgcc",
                "euclidean",
                "minkowski",
                "chebyshev",
                "cos",
                "projection",
                "gauss",
                "kmeans",
            ][..],
        ),
        ("singular", &["mahalanobis-cc", "mahalanobis-avgcc"][..]),
    ] {
        let (ts, train) = f32s(&format!("{prefix}_train"));
        let (_, labels) = f32s(&format!("{prefix}_labels"));
        let (_, test) = f32s(&format!("{prefix}_test"));
        let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
        let d = ts[1];
        for &m in methods {
            let a = if m == "kmeans" {
                args(m, &["k=3"])
            } else {
                args(m, &[])
            };
            let fit_in = Inputs {
                labels: Some(&labels),
                ..features(&train, d)
            };
            let det = Detector::fit(m, a, &fit_in).unwrap();
            let got = det.score(&features(&test, d)).unwrap();
            assert_close(
                &format!("{prefix} {m}"),
                &got,
                &f64s(&format!("{prefix}_expected_{m}")),
                1e-5,
            );
        }
    }
}

#[test]
fn csd_matches_torch_pooling_and_sklearn_neighbours() {
    let (ts, train) = f32s("csd_train");
    let (_, test) = f32s("csd_test");
    let (_, w) = f32s("csd_fcnorm_w");
    let (_, b) = f32s("csd_fcnorm_b");
    let (t, d) = (ts[1], ts[2]);
    let head = Head {
        weight: vec![0.0; d],
        bias: vec![0.0],
        fc_norm: Some(FcNorm {
            weight: w,
            bias: b,
            eps: 1e-6,
        }),
    };
    let local = |data| Inputs {
        local: Some(Matrix { data, cols: t * d }),
        local_tokens: t,
        head: Some(&head),
        ..Default::default()
    };
    let det = Detector::fit("csd", args("csd", &[]), &local(&train)).unwrap();
    let got = det.score(&local(&test)).unwrap();
    assert_close("csd", &got, &f64s("csd_expected"), 1e-5);
}

#[test]
fn mos_matches_scipy_group_softmax() {
    let (zs, z) = f32s("mos_z");
    let inputs = Inputs {
        logits: Some(Matrix {
            data: &z,
            cols: zs[1],
        }),
        ..Default::default()
    };
    let det = Detector::fit("mos", args("mos", &["groups=3,2,4"]), &inputs).unwrap();
    assert_close(
        "mos",
        &det.score(&inputs).unwrap(),
        &f64s("mos_expected"),
        1e-6,
    );
    let e = Detector::fit("mos", args("mos", &[]), &inputs)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("1008") && e.contains("groups"), "{e}");
}

/// A small store with everything every method can read: 3 classes, a head, patch tokens.
struct Synthetic {
    features: Vec<f32>,
    logits: Vec<f32>,
    labels: Vec<usize>,
    local: Vec<f32>,
    odin: Vec<f32>,
    head: Head,
}

const D: usize = 8;
const C: usize = 3;
const T: usize = 4;

fn synthetic(n: usize, seed: u64) -> Synthetic {
    let mut rng = mood::model::init::Rng::new(seed);
    let labels: Vec<usize> = (0..n).map(|i| i % C).collect();
    let features: Vec<f32> = (0..n * D)
        .map(|k| rng.normal() as f32 + if k % D == labels[k / D] { 3.0 } else { 0.0 })
        .collect();
    let local: Vec<f32> = (0..n * T * D).map(|_| rng.normal() as f32).collect();
    let head = Head {
        weight: (0..C * D).map(|_| rng.normal() as f32).collect(),
        bias: (0..C).map(|_| rng.normal() as f32).collect(),
        fc_norm: None,
    };
    let logits = mood::ood::subspace::logits(&features, &head.weight, &head.bias, D);
    let odin = (0..n).map(|_| rng.normal() as f32).collect();
    Synthetic {
        features,
        logits,
        labels,
        local,
        odin,
        head,
    }
}

impl Synthetic {
    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            features: Some(Matrix {
                data: &self.features,
                cols: D,
            }),
            logits: Some(Matrix {
                data: &self.logits,
                cols: C,
            }),
            labels: Some(&self.labels),
            local: Some(Matrix {
                data: &self.local,
                cols: T * D,
            }),
            local_tokens: T,
            head: Some(&self.head),
            odin: Some(&self.odin),
            // The patch tokens stand in for per-block features: T blocks of D.
            layers: Some(Matrix {
                data: &self.local,
                cols: T * D,
            }),
            layer_blocks: &BLOCKS[..T],
        }
    }
}

/// Block numbers of the stand-in per-block features.
const BLOCKS: [usize; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

#[test]
fn every_method_saves_and_loads_to_the_same_scores() {
    let (train, test) = (synthetic(90, 1), synthetic(20, 2));
    let dir = tempfile::tempdir().unwrap();
    for m in METHODS {
        let given: &[&str] = match m.name {
            "knn" | "csd" => &["k=5"],
            "mos" => &["groups=1,0"],
            "vim" | "residual" => &["dim=4"],
            // The default bank (1% of the rows) is smaller than 100 neighbours on 90 rows.
            "nnguide" => &["k=5", "alpha=0.5"],
            _ => &[],
        };
        // SHE and OpenMax need every class predicted right (OpenMax: twice): labels are the
        // predictions here.
        let predicted: Vec<usize> = train
            .logits
            .chunks_exact(C)
            .map(|r| (0..C).fold(0, |b, k| if r[k] > r[b] { k } else { b }))
            .collect();
        let fit_on = match m.name {
            "she" | "openmax" => Inputs {
                labels: Some(&predicted),
                ..train.inputs()
            },
            _ => train.inputs(),
        };
        let det = Detector::fit(m.name, args(m.name, given), &fit_on)
            .unwrap_or_else(|e| panic!("{}: {e}", m.name));
        let a = det.score(&test.inputs()).unwrap();
        assert_eq!(a.len(), 20, "{}", m.name);
        assert!(a.iter().all(|v| v.is_finite()), "{}: {a:?}", m.name);
        let path = dir.path().join(format!("{}.safetensors", m.name));
        det.save(&path).unwrap();
        let b = Detector::load(&path)
            .unwrap()
            .score(&test.inputs())
            .unwrap();
        assert_eq!(a, b, "{}: scores change after save/load", m.name);
    }
}

#[test]
fn logit_methods_fitted_on_a_head_score_features_alone() {
    let (train, test) = (synthetic(60, 3), synthetic(10, 4));
    fn with_head(s: &Synthetic) -> Inputs<'_> {
        Inputs {
            logits: None,
            ..s.inputs()
        }
    }
    for m in ["msp", "energy", "kl-matching", "gradnorm"] {
        let det = Detector::fit(m, args(m, &[]), &with_head(&train)).unwrap();
        let from_head = det
            .score(&Inputs {
                head: None,
                ..with_head(&test)
            })
            .unwrap();
        // The logits the train head gives on the test features.
        let z =
            mood::ood::subspace::logits(&test.features, &train.head.weight, &train.head.bias, D);
        let from_logits = det
            .score(&Inputs {
                logits: Some(Matrix { data: &z, cols: C }),
                ..test.inputs()
            })
            .unwrap();
        for (a, b) in from_head.iter().zip(&from_logits) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{m}: {a} vs {b}");
        }
    }
}

#[test]
fn bad_input_is_refused_with_one_line_errors() {
    let train = synthetic(30, 5);
    let err = |r: mood::Result<Detector>| r.err().expect("must fail").to_string();
    let e = mood::ood::detector::method("mahalanobis-xx")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("knn") && e.contains("mood-v1"),
        "lists the methods: {e}"
    );
    let m = mood::ood::detector::method("knn").unwrap();
    let e = parse_args(m, &["kk=3".into()]).unwrap_err().to_string();
    assert!(e.contains("kk") && e.contains("k"), "{e}");
    let e = err(Detector::fit(
        "mahalanobis",
        args("mahalanobis", &[]),
        &Inputs {
            labels: None,
            ..train.inputs()
        },
    ));
    assert!(e.contains("labels"), "{e}");
    let det = Detector::fit("mahalanobis", args("mahalanobis", &[]), &train.inputs()).unwrap();
    let narrow = vec![0.0f32; 4 * (D - 1)];
    let e = det
        .score(&features(&narrow, D - 1))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{}", D - 1)) && e.contains(&format!("{D}")),
        "{e}"
    );
    let mut nan = train.features.clone();
    nan[3 * D + 2] = f32::NAN;
    let e = det.score(&features(&nan, D)).unwrap_err().to_string();
    assert!(e.contains("row 3"), "{e}");
    let e = err(Detector::fit("knn", args("knn", &[]), &features(&[], D)));
    assert!(e.contains("0"), "{e}");
    let gap: Vec<usize> = train
        .labels
        .iter()
        .map(|&l| if l == 1 { 2 } else { l })
        .collect();
    let e = err(Detector::fit(
        "mahalanobis",
        args("mahalanobis", &[]),
        &Inputs {
            labels: Some(&gap),
            ..train.inputs()
        },
    ));
    assert!(e.contains("class 1"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}
