//! `mood finetune` / `mood pretrain` onto an existing checkpoint: continued only with --resume and
//! the settings the checkpoint recorded (data, schedule, optimiser, seed), replaced only with
//! --overwrite; and the run says what it does (a replaced head, drop-last, progress in a log).

mod common;

use std::path::Path;

use common::{assert_refused, run_mood, tiny_weights};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `mood finetune` of the tiny BEiT on digits 0-2 for 2 epochs of batch 32, with the options in
/// `over` replacing (or adding to) those, then `extra`.
fn finetune(out: &Path, over: &[(&str, &str)], extra: &[&str]) -> (i32, String, String) {
    let mut opts = vec![
        ("--arch", "test_tiny_beit"),
        ("--data", "digits:0-2"),
        ("--epochs", "2"),
        ("--batch", "32"),
        ("--lr", "1e-3"),
        ("--seed", "0"),
    ];
    for (k, v) in over {
        match opts.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v,
            None => opts.push((k, v)),
        }
    }
    let o = s(out);
    let mut args = vec!["finetune"];
    for (k, v) in &opts {
        args.extend([*k, *v]);
    }
    args.extend(["-o", &o]);
    args.extend_from_slice(extra);
    run_mood(&args)
}

#[test]
fn finetune_resume_checks_the_recorded_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck.safetensors");
    let (code, _, err) = finetune(&ck, &[], &[]);
    assert_eq!(code, 0, "{err}");
    let first = std::fs::read(&ck).unwrap();
    // The same output again, without --resume: refused, the checkpoint untouched.
    assert_refused(
        &finetune(&ck, &[], &[]),
        &["already exists", "after epoch 2", "--resume", "--overwrite"],
    );
    for (flag, value, want) in [
        ("--epochs", "3", "--epochs (the checkpoint: 2, this run: 3)"),
        (
            "--lr",
            "0.002",
            "--lr (the checkpoint: 0.001, this run: 0.002)",
        ),
        (
            "--batch",
            "16",
            "--batch (the checkpoint: 32, this run: 16)",
        ),
        ("--seed", "1", "--seed (the checkpoint: 0, this run: 1)"),
        ("--warmup-epochs", "0", "--warmup-epochs"),
        ("--weight-decay", "0.1", "--weight-decay"),
        ("--layer-decay", "0.9", "--layer-decay"),
        ("--label-smoothing", "0.2", "--label-smoothing"),
        ("--data", "digits:0-1", "--data"),
    ] {
        assert_refused(
            &finetune(&ck, &[(flag, value)], &["--resume"]),
            &["cannot resume", want, "--overwrite"],
        );
    }
    assert_eq!(
        std::fs::read(&ck).unwrap(),
        first,
        "refusals leave the checkpoint"
    );
    // The same settings: nothing left to do, and the file is the same.
    let (code, _, err) = finetune(&ck, &[], &["--resume"]);
    assert_eq!(code, 0, "{err}");
    // --overwrite starts over with the new settings.
    let (code, _, err) = finetune(&ck, &[("--seed", "1")], &["--overwrite"]);
    assert_eq!(code, 0, "{err}");
    let p = mood::train::checkpoint::read_progress(&ck)
        .unwrap()
        .unwrap();
    assert_eq!(p.settings["schedule"]["seed"], 1);
    assert_ne!(std::fs::read(&ck).unwrap(), first);
    // --resume and --overwrite together make no sense.
    let (code, _, err) = finetune(&ck, &[], &["--resume", "--overwrite"]);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn finetune_says_what_it_does() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck.safetensors");
    let w = tiny_weights();
    // One epoch works with the default warmup; the fixture's head (not 3 classes) is replaced,
    // and drop-last is said when the images do not fill the last batch.
    let (code, _, err) = finetune(
        &ck,
        &[
            ("--epochs", "1"),
            ("--weights", &w),
            ("--batch", "64"),
            ("--num-classes", "3"),
        ],
        &["--progress-every", "0.01"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("replaced by a new, randomly initialised one of 3"),
        "{err}"
    );
    let n = mood::train::loops::Dataset::len(&{
        let cfg = mood::model::VitConfig::preset("test_tiny_beit").unwrap();
        let (d, _) = mood::pipeline::data::training_data("digits:0-2", "mood", &cfg, true).unwrap();
        d
    });
    if n % 64 != 0 {
        assert!(
            err.contains(&format!("the last {} of each epoch", n % 64)),
            "{err}"
        );
    }
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("finetune: "))
        .collect();
    assert!(!lines.is_empty(), "progress lines in a log: {err}");
    assert!(lines.iter().all(|l| l.contains("steps/s")), "{lines:?}");
}

#[test]
fn pretrain_resume_checks_the_mask_ratio_and_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = s(&tmp.path().join("mim.safetensors"));
    let run = |data: &str, ratio: &str, extra: &[&str]| {
        let mut args = vec![
            "pretrain",
            "--arch",
            "test_tiny_beit",
            "--data",
            data,
            "--epochs",
            "1",
            "--batch",
            "64",
            "--mask-ratio",
            ratio,
            "-o",
            &ck,
        ];
        args.extend_from_slice(extra);
        run_mood(&args)
    };
    let (code, _, err) = run("digits:0-2", "0.4", &[]);
    assert_eq!(code, 0, "{err}");
    assert_refused(&run("digits:0-2", "0.5", &["--resume"]), &["--mask-ratio"]);
    assert_refused(&run("digits:3-5", "0.4", &["--resume"]), &["--data"]);
    assert_refused(&run("digits:0-2", "0.4", &[]), &["already exists"]);
    let (code, _, err) = run("digits:0-2", "0.4", &["--resume"]);
    assert_eq!(code, 0, "{err}");
}
