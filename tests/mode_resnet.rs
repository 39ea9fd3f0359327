//! MODE's training of a ResNet end to end (`mood mode-train`, src/train/mode.rs): a reduced
//! ResNet-18-CIFAR-like net (`test_tiny_resnet_basic_cifar`: MODE's CIFAR stem, BasicBlocks
//! [1, 1, 2, 1], widths 8-32) trained on digits 0-4 for 3 epochs with SupCon, and with SupCon +
//! ALPA; its last maps through `mood extract --local` and `mood eval --methods csd` against digits
//! 5-9. The contrastive losses must fall, the SupCon encoder must separate the unseen digits
//! better under CSD than the untrained one (the ALPA one better than chance), and two SupCon runs
//! with the same settings must write the same bytes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::run_mood;
use mood::model::resnet::ResNetConfig;
use mood::train::checkpoint::Progress;
use mood::train::mode::{self, ModeSettings};

const ARCH: &str = "test_tiny_resnet_basic_cifar";

/// `mood mode-train` on digits `data`; the (total, supcon, alpa) loss of every epoch.
fn train(out: &Path, data: &str, epochs: &str, extra: &[&str]) -> Vec<[f32; 3]> {
    let o = out.to_str().unwrap();
    let mut args = vec![
        "mode-train",
        "--arch",
        ARCH,
        "--data",
        data,
        "--epochs",
        epochs,
        "--batch",
        "32",
        "--lr",
        "0.5",
        "-o",
        o,
    ];
    args.extend(extra);
    let (rc, _, err) = run_mood(&args);
    assert_eq!(rc, 0, "{err}");
    err.lines()
        .filter(|l| l.starts_with("epoch "))
        .map(|l| {
            let nums: Vec<f32> = l
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|t| t.parse().ok())
                .collect();
            // "epoch E: loss T (supcon S, alpa A)"
            [nums[1], nums[2], nums[3]]
        })
        .collect()
}

/// CSD's AUROC (%) of the encoder in `weights`: ID digits 0-4, OOD digits 5-9.
fn csd_auroc(dir: &Path, weights: &Path) -> f32 {
    let w = weights.to_str().unwrap();
    let store = |name: &str| dir.join(name).to_string_lossy().into_owned();
    for (name, data) in [
        ("train", "digits:0-4@train"),
        ("id", "digits:0-4@test"),
        ("ood", "digits:5-9@test"),
    ] {
        let (rc, _, err) = run_mood(&[
            "extract",
            "--arch",
            ARCH,
            "--weights",
            w,
            "--data",
            data,
            "--local",
            "--out",
            &store(name),
        ]);
        assert_eq!(rc, 0, "{err}");
    }
    let (rc, out, err) = run_mood(&[
        "eval",
        "--train",
        &store("train"),
        "--id",
        &store("id"),
        "--ood",
        &format!("far={}", store("ood")),
        "--methods",
        "csd",
    ]);
    assert_eq!(rc, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("| csd |"))
        .unwrap_or_else(|| panic!("no csd row in {out}"));
    row.split('|')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn mode_training_lowers_its_losses_and_helps_csd() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ResNetConfig::preset(ARCH).unwrap();
    let untrained = tmp.path().join("untrained.safetensors");
    let s = ModeSettings::preset("supcon").unwrap();
    mode::save(
        &untrained,
        &mode::initial_params(&cfg, &s),
        &BTreeMap::new(),
        &Progress::default(),
    )
    .unwrap();

    let supcon = tmp.path().join("supcon.safetensors");
    let h = train(&supcon, "digits:0-4", "3", &[]);
    let alpa = tmp.path().join("alpa.safetensors");
    let ha = train(&alpa, "digits:0-4", "3", &["--alpa", "1"]);
    println!("supcon run, epoch (total, supcon, alpa): {h:?}");
    println!("supcon + alpa run: {ha:?}");
    assert_eq!((h.len(), ha.len()), (3, 3), "one line per epoch");
    assert!(h[2][0] < h[0][0], "SupCon falls: {h:?}");
    assert_eq!(h[2][2], 0.0, "no ALPA term without --alpa");
    assert!(ha[2][0] < ha[0][0], "SupCon + ALPA falls: {ha:?}");
    assert!(ha[2][2] < ha[0][2], "ALPA's term falls: {ha:?}");

    let mk = |n: &str| {
        let d = tmp.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let a0 = csd_auroc(&mk("u"), &untrained);
    let a1 = csd_auroc(&mk("s"), &supcon);
    let a2 = csd_auroc(&mk("a"), &alpa);
    println!("CSD AUROC % (digits 0-4 vs 5-9): untrained {a0}, SupCon {a1}, SupCon + ALPA {a2}");
    // The SupCon run is bit-reproducible (see below), so this margin is not luck of the draw;
    // ALPA's attention sums in a thread-dependent order, so its run is only asked to beat chance.
    assert!(
        a1 > a0,
        "SupCon training helps CSD: untrained {a0}, trained {a1}"
    );
    assert!(
        a2 > 60.0,
        "the SupCon + ALPA encoder separates unseen digits: {a2}"
    );
}

#[test]
fn two_runs_with_the_same_settings_write_the_same_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.st"), tmp.path().join("b.st"));
    // With ALPA: its cross terms are summed in a fixed order, so the run repeats bit for bit.
    train(&a, "digits:0-1", "1", &["--seed", "3", "--alpa", "1"]);
    train(&b, "digits:0-1", "1", &["--seed", "3", "--alpa", "1"]);
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(x == y, "the same settings give the same bytes");
    let c = tmp.path().join("c.st");
    train(&c, "digits:0-1", "1", &["--seed", "4", "--alpa", "1"]);
    assert!(
        std::fs::read(&c).unwrap() != x,
        "another seed, other weights"
    );
}

#[test]
fn bad_settings_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("x.st");
    let o = o.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--arch", "beit_tiny", "--data", "digits"],
            "not a ResNet preset",
        ),
        (
            vec!["--arch", ARCH, "--data", "digits", "--recipe", "zz"],
            "--recipe zz",
        ),
        (
            vec!["--arch", ARCH, "--data", "digits", "--recipe", "mode-f"],
            "--weights",
        ),
        (vec!["--arch", ARCH, "--data", "/nonexistent"], "--data"),
        (vec!["--arch", ARCH, "--data", "."], "digits"),
        (vec!["--arch", ARCH, "--data", "digits", "--lr=-1"], "--lr"),
        (
            vec!["--arch", ARCH, "--data", "digits:0-1", "--batch", "100000"],
            "--batch",
        ),
    ] {
        let mut full = vec!["mode-train"];
        full.extend(args);
        full.extend(["-o", o]);
        let (rc, _, err) = run_mood(&full);
        assert_ne!(rc, 0, "{full:?}");
        assert!(err.contains(want), "{full:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{full:?}: one line: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
