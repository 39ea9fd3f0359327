//! Hostile files (issue 19, defects D1-D10): each small file in tests/fixtures/hostile/ (made by
//! tools/make_hostile_fixtures.py) once crashed, hung or fooled mood. Each goes to the public reader
//! and to the release binary, which must refuse it with one line naming what is wrong, a non-zero
//! exit and no panic, within 1 GB of address space and 10 seconds.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{fixture, run_mood_limited};
use mood::ood::detector::{method, parse_args, Detector};
use mood::store::FeatureStore;

const MAX_BYTES: u64 = 1 << 30;
const DEADLINE: Duration = Duration::from_secs(10);

fn hostile(rel: &str) -> PathBuf {
    fixture(&format!("hostile/{rel}"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs the binary under the limits and checks the refusal: exit 1 (not a signal), one line on
/// stderr containing every `must`, no panic, in time, and no `output` left behind.
fn refuses(args: &[&str], must: &[&str], output: &Path) {
    let run = run_mood_limited(args, MAX_BYTES, DEADLINE);
    let err = &run.stderr;
    assert!(
        !run.timed_out,
        "still running after {DEADLINE:?}: {args:?}\n{err}"
    );
    assert_eq!(
        run.code,
        Some(1),
        "expected exit 1 (an error, not a crash): {args:?}\n{err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        !err.contains("memory allocation"),
        "allocation failure: {err}"
    );
    // Notes (e.g. that a store has an older manifest format) are not the error.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    for m in must {
        assert!(err.contains(m), "`{m}` not in: {err}");
    }
    assert!(run.elapsed < DEADLINE, "took {:?}", run.elapsed);
    assert!(!output.exists(), "{} was written", output.display());
}

/// The library's error, which must contain every `must`.
fn lib_refuses<T>(r: mood::Result<T>, must: &[&str]) {
    let Err(e) = r else {
        panic!("the reader accepted a hostile file")
    };
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line error: {msg}");
    for m in must {
        assert!(msg.contains(m), "`{m}` not in: {msg}");
    }
}

fn forward_refuses(input: &Path, must: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f.npy");
    let w = common::tiny_weights();
    let args = [
        "forward",
        "--arch",
        "test_tiny_beit",
        "--weights",
        &w,
        "--input",
        s(input),
        "--features",
        s(&out),
    ];
    refuses(&args, must, &out);
}

fn fit_refuses(method: &str, train: &Path, must: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("det.safetensors");
    let args = [
        "fit",
        "--method",
        method,
        "--train",
        s(train),
        "-o",
        s(&out),
    ];
    refuses(&args, must, &out);
}

fn score_refuses(det: &Path, must: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scores.npy");
    let store = hostile("store3x4");
    let args = [
        "score",
        "--detector",
        s(det),
        "--features",
        s(&store),
        "-o",
        s(&out),
    ];
    refuses(&args, must, &out);
}

fn convert_refuses(pth: &Path, must: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    refuses(&["convert", s(pth), "-o", s(&out)], must, &out);
}

#[test]
fn d1_npy_header_length_is_bounded_by_the_file() {
    let p = hostile("d1_npy_header_4gib.npy");
    let must = ["d1_npy_header_4gib.npy", "header of 4294967280 bytes"];
    forward_refuses(&p, &must);
    lib_refuses(mood::npy::read_f32(&p), &must);
    lib_refuses(mood::npy::map_float(&p), &must);
    lib_refuses(mood::npy::read_indices(&p), &must);
}

#[test]
fn d2_nested_npy_header_is_refused_at_once() {
    let p = hostile("d2_npy_nested_header.npy");
    let must = ["d2_npy_nested_header.npy", "unsupported 'descr'"];
    forward_refuses(&p, &must);
    lib_refuses(mood::npy::read_f32(&p), &must);
    lib_refuses(mood::npy::map_float(&p), &must);
}

#[test]
fn d3_labels_beyond_the_rows_are_not_a_class_count() {
    let dir = hostile("d3_label_2pow40");
    fit_refuses(
        "mahalanobis",
        &dir,
        &[
            "class 2 has no train features",
            "labels reach 1099511627776",
            "4 train rows",
        ],
    );
    let store = FeatureStore::open(&dir).expect("the store itself opens");
    for name in ["mahalanobis", "mahalanobis-cc"] {
        let args = parse_args(method(name).unwrap(), &[]).unwrap();
        lib_refuses(
            Detector::fit(name, args, &store.inputs(None)),
            &["labels reach 1099511627776"],
        );
    }
}

#[test]
fn d4_detector_width_must_match_its_header() {
    let p = hostile("d4_knn_width.safetensors");
    let must = ["d4_knn_width.safetensors", "`train`", "[6, 2]", "4]"];
    score_refuses(&p, &must);
    lib_refuses(Detector::load(&p), &must);
}

#[test]
fn d5_pickle_copies_are_bounded() {
    let p = hostile("d5_pickle_doubling.pth");
    let must = ["d5_pickle_doubling.pth", "data.pkl", "more than 256 MB"];
    convert_refuses(&p, &must);
    lib_refuses(mood::weights::pth::read(&p), &must);
    lib_refuses(mood::weights::WeightStore::open(&p), &must);
}

#[test]
fn d6_zip_entry_size_is_bounded_by_the_archive() {
    let p = hostile("d6_zip_entry_4gib.pth");
    let must = ["d6_zip_entry_4gib.pth", "declares 4294967280 bytes"];
    convert_refuses(&p, &must);
    lib_refuses(mood::weights::pth::read(&p), &must);
}

#[test]
fn d7_views_larger_than_their_storage_are_refused() {
    let p = hostile("d7_stride0_view.pth");
    let must = [
        "d7_stride0_view.pth",
        "tensor `w`",
        "more elements than its storage",
    ];
    convert_refuses(&p, &must);
    lib_refuses(mood::weights::pth::read(&p), &must);
}

#[test]
fn d8_wrapped_shape_products_are_refused() {
    let dir = hostile("d8_wrapped_shape");
    let must = ["features.npy", "[4611686018427387905, 4]", "too large"];
    fit_refuses("euclidean", &dir, &must);
    lib_refuses(FeatureStore::open(&dir), &must);
    lib_refuses(mood::npy::map_float(&dir.join("features.npy")), &must);
}

#[test]
fn d9_forward_checks_the_shape_against_the_data() {
    let p = hostile("d9_wrapped_images.npy");
    let must = ["d9_wrapped_images.npy", "[4611686018427387905, 3, 32, 32]"];
    forward_refuses(&p, &must);
    lib_refuses(mood::npy::read_f32(&p), &must);
}

#[test]
fn d10_empty_detector_settings_are_refused() {
    for (file, tensor) in [
        ("d10_react_empty_clip.safetensors", "`react.clip`"),
        ("d10_vim_empty_alpha.safetensors", "`vim.alpha`"),
        ("d10_csd_empty_tokens.safetensors", "`tokens`"),
    ] {
        let p = hostile(file);
        let must = [file, tensor, "expected one value"];
        score_refuses(&p, &must);
        lib_refuses(Detector::load(&p), &must);
    }
}

#[test]
fn the_target_store_itself_is_fine() {
    // The detector tests above fail on the detector, not on the store they score.
    let store = FeatureStore::open(&hostile("store3x4")).unwrap();
    assert_eq!((store.rows(), store.dim()), (3, 4));
}
