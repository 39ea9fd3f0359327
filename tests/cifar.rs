//! CIFAR-10/100 readers against torchvision (fixtures from tools/make_cifar_fixtures.py: tiny fake
//! sets in both official layouts, and torchvision.datasets.CIFAR10/100's tensors for some images):
//! the two layouts read alike, the images through the presets equal torchvision's, Python 3
//! re-pickled batches read as the originals, `mood extract` / `mood finetune` take `cifar10:DIR`,
//! and broken files fail on one line naming the file.

mod common;

use std::path::{Path, PathBuf};

use common::run_mood as mood;
use common::{extract_tiny, fixture};
use mood::data::cifar::{self, Cifar, Kind, Layout, Split};
use mood::extract::Source;

/// Normalised max |diff| allowed, as 8-bit levels × std / 255 (the smallest std is the worst case):
/// - `cifar` (no resize at 32): ToTensor and Normalize in the same f32 operations as torch; 1e-6.
///   Reached: 0 (bit-exact).
/// - `mood` (bicubic 32 → 64, crop 56): the folder parity bound from PIL's pixels, 0.01 levels
///   (tests/preprocess_parity.rs), since CIFAR's pixels need no decoding. Reached: 0 (bit-exact).
fn bound(preset: &str, std: f32) -> f32 {
    match preset {
        "cifar" => 1e-6,
        _ => 0.01 / (std * 255.0),
    }
}

#[derive(serde::Deserialize)]
struct Case {
    dataset: String,
    split: String,
    preset: String,
    img_size: usize,
    indices: Vec<usize>,
    expected: String,
    labels: Vec<usize>,
    classes: Vec<String>,
    count: usize,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture("cifar/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn kind(name: &str) -> Kind {
    match name {
        "cifar10" => Kind::Cifar10,
        "cifar100" => Kind::Cifar100,
        _ => panic!("{name}"),
    }
}

fn split(name: &str) -> Split {
    match name {
        "train" => Split::Train,
        _ => Split::Test,
    }
}

fn folder(k: Kind, layout: Layout) -> PathBuf {
    let (parent, sub) = match (k, layout) {
        (Kind::Cifar10, Layout::Pickle) => ("cifar10", "cifar-10-batches-py"),
        (Kind::Cifar10, Layout::Binary) => ("cifar10", "cifar-10-batches-bin"),
        (Kind::Cifar100, Layout::Pickle) => ("cifar100", "cifar-100-python"),
        (Kind::Cifar100, Layout::Binary) => ("cifar100", "cifar-100-binary"),
    };
    fixture(&format!("cifar/{parent}/{sub}"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn both_layouts_read_alike_and_as_torchvision_lists_them() {
    for c in cases().iter().filter(|c| c.preset == "cifar") {
        let (k, s) = (kind(&c.dataset), split(&c.split));
        let py = Cifar::open(&folder(k, Layout::Pickle), k, s).unwrap();
        let bin = Cifar::open(&folder(k, Layout::Binary), k, s).unwrap();
        assert_eq!((py.layout, bin.layout), (Layout::Pickle, Layout::Binary));
        assert_eq!(py.len(), c.count, "{}/{}", c.dataset, c.split);
        assert_eq!(py.labels, c.labels, "{}/{}", c.dataset, c.split);
        assert_eq!(py.classes, c.classes);
        assert_eq!(bin.labels, py.labels);
        assert_eq!(bin.classes, py.classes);
        assert!(
            bin.pixels == py.pixels,
            "{}/{}: pixels differ",
            c.dataset,
            c.split
        );
        // Item names point at the batch file and the record in it.
        let last = py.len() - 1;
        let name = py.item_name(last);
        assert!(
            name.ends_with(&format!("[{}]", last - py.files.last().unwrap().1)),
            "{name}"
        );
    }
    // The parent folder holds both layouts: the python one is taken.
    let c = Cifar::open(&fixture("cifar/cifar10"), Kind::Cifar10, Split::Test).unwrap();
    assert_eq!(c.layout, Layout::Pickle);
    assert!(c.root.ends_with("cifar-10-batches-py"));
    // A parent with only the binary layout.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(
        &folder(Kind::Cifar100, Layout::Binary),
        &tmp.path().join("cifar-100-binary"),
    );
    let c = Cifar::open(tmp.path(), Kind::Cifar100, Split::Train).unwrap();
    assert_eq!((c.layout, c.len()), (Layout::Binary, 5));
}

#[test]
fn images_match_torchvision() {
    for c in cases() {
        let spec = cifar::Spec {
            kind: kind(&c.dataset),
            dir: fixture(&format!("cifar/{}", c.dataset)),
            split: split(&c.split),
        };
        let (shape, expected) = mood::npy::read_f32(&fixture(&c.expected)).unwrap();
        for layout in [Layout::Pickle, Layout::Binary] {
            let spec = cifar::Spec {
                dir: folder(spec.kind, layout),
                ..spec.clone()
            };
            let src = mood::extract::source::Cifar::open(&spec, &c.preset, c.img_size).unwrap();
            let n = src.sample_len();
            assert_eq!(shape, vec![c.indices.len(), 3, c.img_size, c.img_size]);
            let mut ours = vec![0f32; c.indices.len() * n];
            let results = src.load(&c.indices, &mut ours);
            assert!(results.iter().all(|r| r.is_ok()));
            let pre = mood::data::Preprocess::preset(&c.preset, c.img_size).unwrap();
            let std = pre.std.iter().fold(f32::INFINITY, |a, &b| a.min(b));
            let what = format!(
                "{}@{} {}{} {layout:?}",
                c.dataset, c.split, c.preset, c.img_size
            );
            let d = common::assert_max_abs(&ours, &expected, bound(&c.preset, std), &what);
            println!(
                "{what:<36} max |diff| {d:.3e} ({:.3} levels)",
                d * std * 255.0
            );
            for &i in &c.indices {
                assert_eq!(src.label(i), Some(c.labels[i]));
            }
        }
    }
}

#[test]
fn python3_repickled_batches_read_as_the_originals() {
    let orig = folder(Kind::Cifar10, Layout::Pickle);
    let want = Cifar::open(&orig, Kind::Cifar10, Split::Test).unwrap();
    // Protocol 2 (bytes through _codecs.encode), 4 (text keys, int64 label array), 5
    // (_frombuffer over a bytearray).
    for p in ["p2", "p4", "p5"] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&orig, tmp.path());
        std::fs::copy(
            fixture(&format!("cifar/variants/test_batch.{p}")),
            tmp.path().join("test_batch"),
        )
        .unwrap();
        let got = Cifar::open(tmp.path(), Kind::Cifar10, Split::Test)
            .unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(got.labels, want.labels, "{p}");
        assert!(got.pixels == want.pixels, "{p}: pixels differ");
    }
}

#[test]
fn broken_files_fail_on_one_line_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let check = |k: Kind, dir: &Path, file: &str, words: &[&str]| {
        let err = Cifar::open(dir, k, Split::Train).unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains(file), "{err}");
        for w in words {
            assert!(err.contains(w), "{err}");
        }
    };
    // Binary: a cut record.
    let bin = tmp.path().join("bin");
    copy_dir(&folder(Kind::Cifar10, Layout::Binary), &bin);
    let f = bin.join("data_batch_2.bin");
    let data = std::fs::read(&f).unwrap();
    std::fs::write(&f, &data[..data.len() - 100]).unwrap();
    check(
        Kind::Cifar10,
        &bin,
        "data_batch_2.bin",
        &["truncated record"],
    );
    // A batch file missing.
    std::fs::write(&f, &data).unwrap();
    std::fs::remove_file(bin.join("data_batch_4.bin")).unwrap();
    check(Kind::Cifar10, &bin, "data_batch_4.bin", &["missing"]);
    // Pickle: cut in the middle of the array's data.
    let py = tmp.path().join("py");
    copy_dir(&folder(Kind::Cifar100, Layout::Pickle), &py);
    let f = py.join("train");
    let data = std::fs::read(&f).unwrap();
    std::fs::write(&f, &data[..data.len() / 2]).unwrap();
    check(Kind::Cifar100, &py, "train", &["truncated"]);
    // Pickle: an array of the wrong size per image.
    std::fs::copy(py.join("meta"), &f).unwrap();
    check(Kind::Cifar100, &py, "train", &["no 'data'"]);
    // The wrong data set.
    let err = Cifar::open(&fixture("cifar/cifar100"), Kind::Cifar10, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("use cifar100:DIR"), "{err}");
}

#[test]
fn wrong_array_size_is_named() {
    // A protocol 2 pickle of {b'data': uint8 array [1, 3], b'labels': [0]} written by hand: the
    // reader must refuse the shape, not index out of bounds.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&folder(Kind::Cifar10, Layout::Pickle), tmp.path());
    let mut p = Vec::new();
    p.extend_from_slice(b"\x80\x02}(U\x04data");
    p.extend_from_slice(
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R",
    );
    p.extend_from_slice(b"(K\x01K\x01K\x03\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R");
    p.extend_from_slice(b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x03abctb");
    p.extend_from_slice(b"U\x06labels]K\x00au.");
    std::fs::write(tmp.path().join("test_batch"), &p).unwrap();
    let err = Cifar::open(tmp.path(), Kind::Cifar10, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("test_batch") && err.contains("[1, 3]") && err.contains("expected uint8"),
        "{err}"
    );
}

#[test]
fn extract_reads_cifar_specs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    let data = format!("cifar10:{}@test", fixture("cifar/cifar10").display());
    let (code, _, err) = extract_tiny(&data, &out, &["--preset", "cifar"]);
    assert_eq!(code, 0, "{err}");
    let s = mood::store::FeatureStore::open(&out).unwrap();
    let c = &cases()[0];
    assert_eq!((c.dataset.as_str(), c.split.as_str()), ("cifar10", "test"));
    assert_eq!(s.rows(), c.count);
    assert_eq!(s.manifest.count, c.count);
    assert_eq!(s.manifest.classes, c.classes);
    assert_eq!(s.labels.as_deref(), Some(&c.labels[..]));

    // A truncated batch: non-zero exit, one line naming the file, no panic, no store.
    let bad = tmp.path().join("bad");
    copy_dir(&folder(Kind::Cifar10, Layout::Binary), &bad);
    let f = bad.join("test_batch.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1]).unwrap();
    let data = format!("cifar10:{}@test", bad.display());
    let out2 = tmp.path().join("store2");
    let (code, _, err) = extract_tiny(&data, &out2, &["--preset", "cifar"]);
    assert_ne!(code, 0);
    assert!(
        err.trim().lines().count() == 1
            && err.contains("test_batch.bin")
            && err.contains("truncated")
            && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out2.join("manifest.json").exists());

    let (code, _, err) = extract_tiny("cifar10:/nowhere@val", &out2, &[]);
    assert_ne!(code, 0);
    assert!(err.contains("@train and @test"), "{err}");
}

#[test]
fn finetune_reads_cifar_specs() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ft.safetensors");
    let root = fixture("cifar/cifar10");
    let (train, val) = (
        format!("cifar10:{}", root.display()),
        format!("cifar10:{}@test", root.display()),
    );
    let (code, out, err) = mood(&[
        "finetune",
        "--arch",
        "beit_tiny_patch8_32",
        "--preset",
        "cifar",
        "--data",
        &train,
        "--val",
        &val,
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--batch",
        "4",
        "-o",
        ck.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("on 2 images"), "{out}");
    let st = mood::weights::WeightStore::open(&ck).unwrap();
    assert_eq!(st.shape_of("head.weight").unwrap()[0], 10);
}
