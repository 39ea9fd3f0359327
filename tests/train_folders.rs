//! `mood finetune` / `mood pretrain` on image folders (not only the bundled digits): the head takes
//! the folder's classes, `--val` gives the closing accuracy, a flat folder pretrains but cannot be
//! fine-tuned.

mod common;

use common::{photo_crops, run_mood as mood};

#[test]
fn finetune_and_pretrain_read_image_folders() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("photos");
    photo_crops(&data, 12);
    let ck = dir.path().join("ft.safetensors");
    let d = data.to_str().unwrap();
    let common = [
        "--arch",
        "beit_tiny_patch8_32",
        "--preset",
        "cifar",
        "--epochs",
        "2",
        "--warmup-epochs",
        "0",
        "--batch",
        "8",
    ];
    let (code, out, err) = mood(
        &[
            &[
                "finetune",
                "--data",
                d,
                "--val",
                d,
                "-o",
                ck.to_str().unwrap(),
            ][..],
            &common[..],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("held-out accuracy") && out.contains("on 24 images"),
        "{out}"
    );
    // The head has one output per class sub-folder.
    let st = mood::weights::WeightStore::open(&ck).unwrap();
    assert_eq!(st.shape_of("head.weight").unwrap()[0], 2);

    let pt = dir.path().join("pt.safetensors");
    let flat = data.join("china");
    let f = flat.to_str().unwrap();
    let (code, out, err) = mood(
        &[
            &["pretrain", "--data", f, "-o", pt.to_str().unwrap()][..],
            &common[..],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("on 12 images") || out.contains("on 12 images"),
        "{out}{err}"
    );

    let (code, _, err) = mood(
        &[
            &[
                "finetune",
                "--data",
                f,
                "-o",
                dir.path().join("x.safetensors").to_str().unwrap(),
            ][..],
            &common[..],
        ]
        .concat(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("no label") && err.contains("class sub-folders") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!dir.path().join("x.safetensors").exists());
}

/// A held-out set with labels beyond the trained head is refused before any training step, not
/// scored as 0% after the last epoch.
#[test]
fn val_labels_beyond_the_head_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ft.safetensors");
    let (code, _, err) = mood(&[
        "finetune",
        "--arch",
        "beit_tiny_patch8_32",
        "--data",
        "digits:0,1",
        "--num-classes",
        "2",
        "--val",
        "digits",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "-o",
        ck.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--val digits: label") && err.contains("2 classes"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!ck.exists(), "nothing trained, nothing written");
}
