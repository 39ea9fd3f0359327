//! `mood export` against timm (fixtures from tools/check_export_timm.py): the checkpoint of a
//! `mood finetune` run, exported again now, holds exactly timm's state_dict names and shapes, the
//! very tensors timm loaded with strict=True, and gives timm's logits; and export's refusals.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{assert_refused, fixture, run_mood};
use mood::weights::WeightStore;
use sha2::Digest;

const CHECKPOINT: &str = "export/tiny_beit_finetune.safetensors";

fn export(out: &Path, extra: &[&str]) -> (i32, String, String) {
    let ckpt = fixture(CHECKPOINT);
    let mut args = vec![
        "export",
        ckpt.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_mood(&args)
}

fn metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

#[test]
fn export_of_a_finetune_checkpoint_is_what_timm_loads_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("weights.safetensors");
    let r = export(&out, &[]);
    assert_eq!(r.0, 0, "{}", r.2);

    // Names and shapes: timm's state_dict() for the architecture, as the script saved it.
    let timm: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("export/timm_state_dict.json")).unwrap(),
    )
    .unwrap();
    let want: BTreeMap<String, Vec<usize>> =
        serde_json::from_value(timm["tensors"].clone()).unwrap();
    let store = WeightStore::open(&out).unwrap();
    let got: BTreeMap<String, Vec<usize>> = store
        .names()
        .map(|n| (n.clone(), store.shape_of(n).unwrap().to_vec()))
        .collect();
    assert_eq!(
        got, want,
        "exported names/shapes differ from timm's state_dict"
    );

    // The same tensors, bit for bit, as the file timm loaded with strict=True.
    let loaded = WeightStore::open(&fixture("export/tiny_beit_export.safetensors")).unwrap();
    for name in want.keys() {
        let (a, b) = (store.raw_tensor(name), loaded.raw_tensor(name));
        assert_eq!(
            a.map(|t| (t.dtype, t.data)),
            b.map(|t| (t.dtype, t.data)),
            "{name}"
        );
    }

    // Provenance: the architecture and the checkpoint's SHA-256 (computed here, not by mood).
    let meta = metadata(&out);
    assert_eq!(meta["format"], "pt");
    let source: serde_json::Value =
        serde_json::from_str(meta["mood_export"].as_str().unwrap()).unwrap();
    let sha = format!(
        "{:x}",
        sha2::Sha256::digest(std::fs::read(fixture(CHECKPOINT)).unwrap())
    );
    assert_eq!(source["checkpoint_sha256"], sha.as_str());
    assert_eq!(source["arch"], timm["arch"]);
    assert_eq!(source["num_classes"], 10);
    assert_eq!(source["stage"], "finetune");

    // mood's logits of the export against timm's on the same inputs.
    let logits = dir.path().join("logits.npy");
    let feats = dir.path().join("features.npy");
    let input = fixture("export/input.npy");
    let r = run_mood(&[
        "forward",
        "--arch",
        "test_tiny_beit",
        "--weights",
        out.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--features",
        feats.to_str().unwrap(),
        "--logits",
        logits.to_str().unwrap(),
    ]);
    assert_eq!(r.0, 0, "{}", r.2);
    let (shape, ours) = mood::npy::read_f32(&logits).unwrap();
    let (want_shape, theirs) = mood::npy::read_f32(&fixture("export/timm_logits.npy")).unwrap();
    assert_eq!(shape, want_shape);
    let worst = common::assert_max_abs(&ours, &theirs, 1e-4, "logits vs timm");
    eprintln!("largest |mood - timm| logit difference: {worst:e}");

    // Nothing but the export (and the forward's outputs) is left in the folder.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["features.npy", "logits.npy", "weights.safetensors"]);
}

#[test]
fn export_refuses_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    std::fs::write(&out, b"earlier").unwrap();
    assert_refused(&export(&out, &[]), &["exists", "--overwrite"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"earlier");
    assert_eq!(export(&out, &["--overwrite"]).0, 0);

    let ckpt = fixture(CHECKPOINT);
    assert_refused(
        &export(&ckpt, &["--overwrite"]),
        &["is the checkpoint being exported"],
    );
    assert_refused(
        &export(
            &dir.path().join("v.safetensors"),
            &["--arch", "test_tiny_vit"],
        ),
        &["test_tiny_beit", "--arch"],
    );

    // A timm file records no architecture; given the wrong one, the missing tensor is named.
    let timm_vit = fixture("timm/tiny_vit.safetensors");
    let to = dir.path().join("x.safetensors");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "export",
            timm_vit.to_str().unwrap(),
            "-o",
            to.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        run_mood(&a)
    };
    assert_refused(&run(&[]), &["records no architecture", "--arch"]);
    assert_refused(
        &run(&["--arch", "test_tiny_beit"]),
        &["blocks.0.attn.q_bias", "missing"],
    );
    assert_eq!(run(&["--arch", "test_tiny_vit"]).0, 0);

    // A pretraining checkpoint is no classifier yet.
    let mim = dir.path().join("mim.safetensors");
    let r = run_mood(&[
        "pretrain",
        "--arch",
        "test_tiny_beit",
        "--data",
        "digits:0",
        "--epochs",
        "1",
        "-o",
        mim.to_str().unwrap(),
    ]);
    assert_eq!(r.0, 0, "{}", r.2);
    let r = run_mood(&[
        "export",
        mim.to_str().unwrap(),
        "-o",
        dir.path().join("y.safetensors").to_str().unwrap(),
    ]);
    assert_refused(
        &r,
        &["`mood pretrain` checkpoint", "mood finetune --weights"],
    );
    assert!(!Path::new(&format!("{}.tmp", to.display())).exists());
}
