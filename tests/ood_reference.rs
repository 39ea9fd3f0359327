//! Metrics and Mahalanobis against scikit-learn / scipy / numpy references
//! (tools/make_ood_fixtures.py): metrics to 1e-9, scores to 1e-5 (of the largest |score| for
//! Mahalanobis, whose f32 scoring GEMM rounds relative to it).

mod common;

use common::fixture;
use mood::metrics;
use mood::ood::detector::{parse_args, Detector, Inputs};
use mood::ood::gaussian::GaussianScore;

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

/// Fits each case's method (name, args, fixture case) on `train` through the detector, as `mood
/// fit` / `mood eval` run it, and compares its scores of `test` with the reference
/// `{fixture}_{case}` to 1e-5 relative (of |score| > 1, else absolute; for the method `scaled`,
/// of the largest |score|); then saves and loads the detector and asks for the same scores.
/// Returns the fitted detectors.
fn detectors_match(
    cases: &[(&str, &[&str], &str)],
    fixture: &str,
    scaled: &str,
    train: &Inputs,
    test: &Inputs,
) -> Vec<Detector> {
    let tmp = tempfile::tempdir().unwrap();
    let mut fitted = Vec::new();
    for (name, args, case) in cases {
        let m = mood::ood::methods::method(name).unwrap();
        let given: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let det = Detector::fit(name, parse_args(m, &given).unwrap(), train)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let got = det.score(test).unwrap();
        let want = f64s(&format!("{fixture}_{case}"));
        assert_eq!(got.len(), want.len(), "{case}");
        let floor = if *name == scaled {
            largest_magnitude(&want)
        } else {
            1.0
        };
        let mut worst = 0.0f64;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = (*g as f64 - w).abs() / w.abs().max(floor);
            worst = worst.max(err);
            assert!(err <= 1e-5, "{case}[{i}]: ours {g}, numpy {w}");
        }
        eprintln!("{case}: max error {worst:.2e}");
        let path = tmp.path().join(format!("{case}.safetensors"));
        det.save(&path).unwrap();
        let again = Detector::load(&path).unwrap().score(test).unwrap();
        assert_eq!(again, got, "{case}: scores after save and load");
        fitted.push(det);
    }
    fitted
}

/// The largest |v|, at least 1.
fn largest_magnitude(v: &[f64]) -> f64 {
    v.iter().fold(1.0f64, |a, b| a.max(b.abs()))
}

/// For each metrics fixture case (random, ties, constant), the values `compute(id, ood)` against
/// the reference `metrics_{case}_{which}`, each named in `names`, to 1e-9.
fn metrics_match(which: &str, names: &[&str], compute: impl Fn(&[f32], &[f32]) -> Vec<f64>) {
    for case in ["random", "ties", "constant"] {
        let (_, id) = f32s(&format!("metrics_{case}_id"));
        let (_, ood) = f32s(&format!("metrics_{case}_ood"));
        let want = f64s(&format!("metrics_{case}_{which}"));
        let got = compute(&id, &ood);
        for (name, (g, w)) in names.iter().zip(got.iter().zip(&want)) {
            assert!(
                (g - w).abs() < 1e-9,
                "{case} {name}: ours {g}, reference {w}"
            );
        }
    }
}

#[test]
fn metrics_match_sklearn_including_ties_and_constant_scores() {
    let names = ["auroc", "aupr_in", "aupr_out", "fpr95", "detection_error"];
    metrics_match("expected", &names, |id, ood| {
        let m = metrics::evaluate(id, ood).unwrap();
        vec![m.auroc, m.aupr_in, m.aupr_out, m.fpr95, m.detection_error]
    });
}

#[test]
fn fpr_rules_and_trapezoid_aupr_match_their_repositories() {
    use metrics::{aupr_trapezoid, fpr95, FprRule};
    let names = [
        "moodv1",
        "mos",
        "openood",
        "knn",
        "aupr_in_trapz",
        "aupr_out_trapz",
    ];
    metrics_match("variants", &names, |id, ood| {
        let neg = |v: &[f32]| v.iter().map(|x| -x).collect::<Vec<_>>();
        vec![
            fpr95(id, ood, FprRule::MoodV1),
            fpr95(id, ood, FprRule::Mos),
            fpr95(id, ood, FprRule::OpenOod),
            fpr95(id, ood, FprRule::KnnOod),
            aupr_trapezoid(id, ood),
            aupr_trapezoid(&neg(ood), &neg(id)),
        ]
    });
}

#[test]
fn metrics_refuse_empty_sets_and_nan_scores() {
    assert!(metrics::evaluate(&[], &[1.0]).is_err());
    let e = metrics::evaluate(&[1.0, f32::NAN], &[0.0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 1"), "{e}");
}

#[test]
fn mahalanobis_matches_scipy_pinvh_reference() {
    for case in ["full", "singular", "c1000"] {
        let (tshape, train) = f32s(&format!("maha_{case}_train"));
        let (_, labels) = f32s(&format!("maha_{case}_labels"));
        let (_, test) = f32s(&format!("maha_{case}_test"));
        let want = f64s(&format!("maha_{case}_expected"));
        let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
        let m = GaussianScore::tied(&train, &labels, tshape[1]).unwrap();
        let got = m.score(&test).unwrap();
        let scale = want.iter().fold(0.0f64, |a, b| a.max(b.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * scale,
                "{case}[{i}]: ours {g}, scipy {w}"
            );
        }
    }
}

#[test]
fn mahalanobis_refuses_bad_input() {
    let e = GaussianScore::tied(&[1.0, 2.0, f32::NAN, 4.0], &[0, 1], 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("row 1"), "{e}");
    let m = GaussianScore::tied(&[1.0, 2.0, 3.0, 5.0, 0.0, 1.0], &[0, 1, 0], 2).unwrap();
    assert!(
        m.score(&[1.0, 2.0, 3.0]).is_err(),
        "3 values are not rows of 2"
    );
    let e = GaussianScore::tied(&[1.0, 2.0, 3.0, 4.0], &[0, 2], 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("class 1"), "{e}");
}

#[test]
fn logit_scores_match_scipy_transcriptions() {
    use mood::ood::logits;
    let (zs, z) = f32s("logits_z");
    let (fs, f) = f32s("logits_f");
    let want = f64s("logits_expected");
    let (n, c, d) = (zs[0], zs[1], fs[1]);
    let got = [
        logits::msp(&z, c, 1.0).unwrap(),
        logits::msp(&z, c, 1000.0).unwrap(),
        logits::maxlogit(&z, c).unwrap(),
        logits::energy(&z, c, 1.0).unwrap(),
        logits::energy(&z, c, 2.0).unwrap(),
        logits::entropy(&z, c).unwrap(),
        logits::gradnorm(&z, c, &f, d).unwrap(),
    ];
    for (k, scores) in got.iter().enumerate() {
        for i in 0..n {
            let w = want[k * n + i];
            assert!(
                (scores[i] as f64 - w).abs() <= 1e-5 * w.abs().max(1e-3),
                "score {k} row {i}: ours {}, reference {w}",
                scores[i]
            );
        }
    }
    let e = logits::msp(&[1.0, f32::INFINITY, 0.0, 0.0], 2, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 0"), "{e}");
}

#[test]
fn knn_matches_sklearn_nearest_neighbors() {
    use mood::ood::knn::Knn;
    let (ts, train) = f32s("knn_train");
    let (_, test) = f32s("knn_test");
    let want = f64s("knn_expected");
    let n = test.len() / ts[1];
    for (row, k) in [1usize, 5, 50].iter().enumerate() {
        let got = Knn::fit(&train, ts[1], *k).unwrap().score(&test).unwrap();
        for i in 0..n {
            let w = want[row * n + i];
            // 2 − 2q·t in f32 carries ~2.4e-7 absolute rounding (as in faiss): near neighbours are
            // compared to 5e-7 absolute, far ones to 1e-5 relative.
            assert!(
                (got[i] as f64 - w).abs() <= 1e-5 * w.abs().max(0.05),
                "k={k} row {i}: ours {}, sklearn {w}",
                got[i]
            );
        }
    }
    assert!(
        Knn::fit(&train, ts[1], 501).is_err(),
        "k larger than the train set"
    );
}

#[test]
fn react_vim_residual_match_numpy_transcriptions() {
    use mood::ood::subspace::{React, Vim};
    let (ts, train) = f32s("head_train");
    let (_, test) = f32s("head_test");
    let (_, w) = f32s("head_w");
    let (_, b) = f32s("head_b");
    let want = f64s("head_expected");
    let d = ts[1];
    let n = test.len() / d;
    let vim = Vim::fit(&train, &w, &b, d, 12).unwrap();
    let got = [
        React::fit(&train, d, 0.99)
            .unwrap()
            .score(&test, &w, &b, d)
            .unwrap(),
        React::fit(&train, d, 0.90)
            .unwrap()
            .score(&test, &w, &b, d)
            .unwrap(),
        vim.score(&test, &w, &b).unwrap(),
        vim.residual(&test).unwrap().iter().map(|r| -r).collect(),
    ];
    for (k, scores) in got.iter().enumerate() {
        for i in 0..n {
            let wv = want[k * n + i];
            assert!(
                (scores[i] as f64 - wv).abs() <= 1e-5 * wv.abs().max(1.0),
                "score {k} row {i}: ours {}, numpy {wv}",
                scores[i]
            );
        }
    }
}

#[test]
fn kl_matching_matches_numpy_loop_including_an_empty_class() {
    use mood::ood::logits::KlMatching;
    let (ts, train) = f32s("kl_train");
    let (_, test) = f32s("kl_test");
    let want = f64s("kl_expected");
    let got = KlMatching::fit(&train, ts[1])
        .unwrap()
        .score(&test)
        .unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 1e-5 * w.abs().max(1e-2),
            "row {i}: ours {g}, numpy {w}"
        );
    }
}

/// OpenOOD v1.5's post-hoc methods (docs/methods.md) against numpy transcriptions of their
/// formulas on one shared set (tools/make_posthoc_fixtures.py), each to 1e-5 (relative for
/// |score| > 1; for rmds relative to its largest |score|), through the detector as `mood fit` / `mood eval` run them, and again after a
/// save and load.
#[test]
fn posthoc_methods_match_numpy_transcriptions() {
    use mood::ood::detector::{Head, Matrix};
    let (ts, train) = f32s("posthoc_train");
    let (_, labels) = f32s("posthoc_labels");
    let (_, test) = f32s("posthoc_test");
    let (_, w) = f32s("posthoc_w");
    let (_, b) = f32s("posthoc_b");
    let d = ts[1];
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let head = Head {
        weight: w,
        bias: b,
        fc_norm: None,
    };
    fn inputs<'a>(
        x: &'a [f32],
        d: usize,
        labels: Option<&'a [usize]>,
        head: &'a Head,
    ) -> Inputs<'a> {
        Inputs {
            features: Some(Matrix { data: x, cols: d }),
            labels,
            head: Some(head),
            ..Default::default()
        }
    }
    let train_in = inputs(&train, d, Some(&labels), &head);
    let test_in = inputs(&test, d, None, &head);
    let cases: &[(&str, &[&str], &str)] = &[
        ("ash-p", &[], "ash-p"),
        ("ash-b", &[], "ash-b"),
        ("ash-s", &[], "ash-s"),
        ("ash-s", &["percentile=65"], "ash-s_65"),
        ("scale", &[], "scale"),
        ("dice", &[], "dice"),
        ("dice", &["p=70"], "dice_70"),
        ("gen", &[], "gen"),
        ("gen", &["gamma=0.5", "m=3"], "gen_m3"),
        ("fdbd", &[], "fdbd"),
        ("fdbd", &["distance_as_normalizer=false"], "fdbd_norm"),
        ("nci", &[], "nci"),
        ("nci", &["alpha=0.1"], "nci_01"),
        ("nnguide", &["k=10", "alpha=1"], "nnguide_all"),
        ("nnguide", &["k=5", "alpha=0.5"], "nnguide_half"),
        ("openmax", &[], "openmax"),
        ("openmax", &["distance=eucos"], "openmax_eucos"),
        ("openmax", &["tailsize=5", "alpha=1"], "openmax_t5_a1"),
        ("openmax", &["tailsize=100", "alpha=10"], "openmax_t100_a10"),
        ("rmds", &[], "rmds"),
        ("she", &[], "she"),
        ("relation", &[], "relation"),
        ("relation", &["pow=2"], "relation_2"),
        ("temp-scaling", &[], "temp-scaling"),
        ("t2fnorm", &[], "t2fnorm"),
        ("t2fnorm", &["tau=5"], "t2fnorm_5"),
    ];
    // rmds is a difference of two squared distances (each ~D here) scored by an f32 GEMM: as for
    // `mahalanobis` above, its rounding is relative to the largest score. openmax's score,
    // −P(unknown), is in [−1, 0]: absolute error.
    detectors_match(cases, "posthoc_expected", "rmds", &train_in, &test_in);
    let z = mood::ood::subspace::logits(&train, &head.weight, &head.bias, d);
    openmax_weibulls_match_the_numpy_fit(&z, head.bias.len(), &labels);
    let t = mood::ood::temperature::fit_temperature(&z, head.bias.len(), &labels, 0.2).unwrap();
    let want = f64s("posthoc_temperature")[0];
    assert!(
        (t as f64 - want).abs() <= 1e-5 * want,
        "T: ours {t}, scipy {want}"
    );
}

/// The Weibull of each class (scale, shape, shift) of the default OpenMax case against the numpy
/// re-expression of libMR's FitHigh (tools/make_posthoc_fixtures.py). On numpy's own float64
/// tails the fit alone is compared, to 1e-9 relative: both solve the same likelihood equation to
/// machine precision. Through the detector (f32 logits here, float64 there, and the parameters
/// kept as f32 in the detector file) to 1e-5: a tail's values move by ~1e-7 relative, and the
/// maximum likelihood fit of 6 to 20 values amplifies that about tenfold.
fn openmax_weibulls_match_the_numpy_fit(z: &[f32], c: usize, labels: &[usize]) {
    use mood::ood::openmax::{OpenMax, OpenMaxDistance, Weibull};
    let want = f64s("posthoc_openmax_weibull");
    let tails = f64s("posthoc_openmax_tails");
    let mut worst = 0.0f64;
    for (k, tail) in tails.chunks_exact(20).enumerate() {
        let tail: Vec<f64> = tail.iter().copied().filter(|v| !v.is_nan()).collect();
        let w = Weibull::fit_high(&tail).unwrap();
        for (g, r) in [w.scale, w.shape, w.small]
            .iter()
            .zip(&want[3 * k..3 * k + 3])
        {
            let err = (g - r).abs() / r.abs();
            worst = worst.max(err);
            assert!(
                err <= 1e-9,
                "class {k}, tail of {}: ours {g}, numpy {r}",
                tail.len()
            );
        }
    }
    eprintln!("openmax weibull fit on numpy's tails: max relative error {worst:.2e}");
    let fit = OpenMax::fit(z, c, labels, 20, OpenMaxDistance::Euclidean).unwrap();
    worst = 0.0;
    for (k, w) in fit.weibulls().iter().enumerate() {
        for (j, (g, r)) in [w.scale, w.shape, w.small]
            .iter()
            .zip(&want[3 * k..3 * k + 3])
            .enumerate()
        {
            let err = (g - r).abs() / r.abs();
            worst = worst.max(err);
            assert!(err <= 1e-5, "class {k} parameter {j}: ours {g}, numpy {r}");
        }
    }
    eprintln!("openmax weibull parameters through the detector: max relative error {worst:.2e}");
}

/// The multi-layer methods (`mahalanobis-ensemble`, `gram`) on per-block features shaped as
/// layers.npy, through the detector, against numpy transcriptions of OpenOOD's mds_ensemble and
/// gram postprocessors (tools/make_multilayer_fixtures.py), and again after a save and load:
/// mahalanobis-ensemble to 1e-5 of its largest |score| (as `mahalanobis`: an f32 scoring GEMM),
/// gram to 1e-5 relative (|score| > 1) or absolute.
#[test]
fn multilayer_methods_match_numpy_transcriptions() {
    use mood::ood::detector::Matrix;
    let (ts, train) = f32s("layers_train");
    let (_, labels) = f32s("layers_labels");
    let (zs, train_z) = f32s("layers_logits");
    let (_, test) = f32s("layers_test");
    let (_, test_z) = f32s("layers_test_logits");
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let (l, d, c) = (ts[1], ts[2], zs[1]);
    let blocks: Vec<usize> = (1..=l).map(|b| 4 * b).collect();
    let inputs = |x: &'static [f32],
                  z: &'static [f32],
                  labels: Option<&'static [usize]>,
                  blocks: &'static [usize]| Inputs {
        // Features are the last block's (present in every store; unused by these methods).
        features: Some(Matrix {
            data: x,
            cols: l * d,
        }),
        logits: Some(Matrix { data: z, cols: c }),
        labels,
        layers: Some(Matrix {
            data: x,
            cols: l * d,
        }),
        layer_blocks: blocks,
        ..Default::default()
    };
    let leak = |v: Vec<f32>| -> &'static [f32] { Box::leak(v.into_boxed_slice()) };
    let (train, test, train_z, test_z) = (leak(train), leak(test), leak(train_z), leak(test_z));
    let labels: &'static [usize] = Box::leak(labels.into_boxed_slice());
    let blocks: &'static [usize] = Box::leak(blocks.into_boxed_slice());
    let train_in = inputs(train, train_z, Some(labels), blocks);
    let test_in = inputs(test, test_z, None, blocks);
    let cases: &[(&str, &[&str], &str)] = &[
        ("mahalanobis-ensemble", &[], "mds_ensemble"),
        (
            "mahalanobis-ensemble",
            &["weights=0.5,-1,2"],
            "mds_ensemble_w",
        ),
        ("gram", &[], "gram"),
        ("gram", &["powers=1,3"], "gram_p13"),
    ];
    let fitted = detectors_match(
        cases,
        "layers_expected",
        "mahalanobis-ensemble",
        &train_in,
        &test_in,
    );
    for det in fitted {
        // Rows of other blocks are refused, naming both lists.
        let other: &'static [usize] = Box::leak(vec![1usize, 2, 3].into_boxed_slice());
        let e = det
            .score(&inputs(test, test_z, None, other))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1, 2, 3]") && e.contains("[4, 8, 12]"), "{e}");
    }
}

/// Logistic regression against sklearn's LogisticRegression at the same C (its exact optimum,
/// newton-cholesky at tol 1e-12; tools/make_logistic_fixtures.py), to 1e-5 relative.
#[test]
fn logistic_regression_matches_sklearn() {
    use mood::ood::logistic;
    let x = f64s("lr_plain_x");
    let t: Vec<bool> = f64s("lr_plain_t").iter().map(|&v| v == 1.0).collect();
    let want = f64s("lr_plain_expected");
    for row in want.chunks(5) {
        let m = logistic::fit(&x, 3, &t, row[0]).unwrap();
        let got = [m.coef[0], m.coef[1], m.coef[2], m.intercept];
        let err = got
            .iter()
            .zip(&row[1..])
            .map(|(g, w)| (g - w).abs() / w.abs().max(1e-3))
            .fold(0.0f64, f64::max);
        eprintln!("logistic C = {}: max rel error {err:.2e}", row[0]);
        assert!(
            err <= 1e-5,
            "C = {}: ours {got:?}, sklearn {:?}",
            row[0],
            &row[1..]
        );
    }
}

/// `mahalanobis-ensemble weights=lr` as OpenOOD's alpha_selector: the held-out train rows'
/// and the OOD validation rows' per-layer scores (numpy), StratifiedKFold's folds, the C that
/// LogisticRegressionCV(scoring="accuracy") chooses and the coefficients at that C (sklearn).
#[test]
fn ensemble_lr_weights_match_logistic_regression_cv() {
    use mood::ood::logistic;
    use mood::ood::multilayer::{LrValidation, MahalanobisEnsemble};
    let (ts, train) = f32s("layers_train");
    let (_, labels) = f32s("layers_labels");
    let (_, valood) = f32s("lr_ens_valood");
    let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let (l, d) = (ts[1], ts[2]);
    let blocks: Vec<usize> = (1..=l).map(|b| 4 * b).collect();
    let want_x = f64s("lr_ens_x");
    let t: Vec<bool> = f64s("lr_ens_t").iter().map(|&v| v == 1.0).collect();
    let folds: Vec<usize> = f64s("lr_ens_folds").iter().map(|&v| v as usize).collect();
    let want = f64s("lr_ens_expected");

    assert_eq!(
        logistic::stratified_folds(&t, 5),
        folds,
        "StratifiedKFold(5)"
    );
    let val = LrValidation {
        ood: &valood,
        blocks: &blocks,
        c: None,
    };
    let (ens, lr) = MahalanobisEnsemble::fit_lr(&train, l * d, &blocks, &labels, &val).unwrap();
    // The per-layer scores the regression saw: ID held-out rows, then the OOD rows.
    let n_id = t.iter().filter(|&&v| v).count();
    let mut held = Vec::new();
    let mut seen = [0usize; 64];
    for (i, &y) in labels.iter().enumerate() {
        seen[y] += 1;
        if seen[y] % 10 == 0 {
            held.extend_from_slice(&train[i * l * d..(i + 1) * l * d]);
        }
    }
    let got_x: Vec<f64> = ens
        .layer_scores(&held)
        .unwrap()
        .into_iter()
        .chain(ens.layer_scores(&valood).unwrap())
        .collect();
    assert_eq!(got_x.len(), want_x.len());
    assert_eq!(held.len() / (l * d), n_id);
    let floor = largest_magnitude(&want_x);
    let x_err = got_x
        .iter()
        .zip(&want_x)
        .map(|(g, w)| (g - w).abs() / floor)
        .fold(0.0f64, f64::max);
    assert!(x_err <= 1e-5, "per-layer scores: {x_err}");
    assert!(
        (lr.c / want[0] - 1.0).abs() < 1e-12,
        "C: ours {}, LogisticRegressionCV {}",
        lr.c,
        want[0]
    );
    // On the fixture's own scores, so that only the regression is compared.
    let exact = logistic::fit(&want_x, l, &t, want[0]).unwrap();
    let got = [exact.coef[0], exact.coef[1], exact.coef[2], exact.intercept];
    let err = got
        .iter()
        .zip(&want[1..])
        .map(|(g, w)| (g - w).abs() / w.abs().max(1e-3))
        .fold(0.0f64, f64::max);
    // And through mood's own scores (f32 GEMMs): the weights within their rounding.
    let w_err = lr
        .coef
        .iter()
        .zip(&want[1..])
        .map(|(g, w)| (g - w).abs() / w.abs())
        .fold(0.0f64, f64::max);
    eprintln!(
        "ensemble lr: scores max err {x_err:.2e}; C = {:.4e}; coefficients max rel error {err:.2e} (on mood's scores {w_err:.2e})",
        lr.c
    );
    assert!(err <= 1e-5, "ours {got:?}, sklearn {:?}", &want[1..]);
    assert!(w_err <= 1e-3, "weights from mood's scores: {w_err}");
    assert_eq!(ens.fitted_weights.as_deref(), Some(&lr.coef[..]));
}
