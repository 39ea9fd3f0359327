//! `mood extract` / `mood merge` through the binary: the store matches the library's forward,
//! a run killed after some chunks and rerun gives byte-identical files, shards merge back into the
//! unsharded store, and bad input fails on one line with nothing half-written.

mod common;

use std::path::Path;

use common::{
    extract_tiny, extract_tiny_env, files, fixture, run_mood, run_mood_env, tiny_weights,
};

/// The binary on two threads: exit code and stderr.
fn mood(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let (code, _, err) = run_mood_env(args, env);
    (code, err)
}

/// The digits test split through the tiny BEiT, 8 images a batch, 32 a chunk, then `extra`.
fn extract(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut args = vec!["--batch", "8", "--chunk", "32"];
    args.extend_from_slice(extra);
    let (code, _, err) = extract_tiny_env("digits:0-4@test", out, &args, env);
    (code, err)
}

#[test]
fn extracted_store_matches_the_forward_and_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("store");
    let (code, err) = extract(&out, &["--local"], &[]);
    assert_eq!(code, 0, "{err}");
    let s = mood::store::FeatureStore::open(&out).unwrap();
    let src = mood::extract::source::Digits::parse("digits:0-4@test", 32).unwrap();
    use mood::extract::Source;
    assert_eq!(s.rows(), src.len());
    assert_eq!(s.manifest.count, src.len());
    assert_eq!(s.manifest.model, "test_tiny_beit");
    assert_eq!(s.manifest.weights_sha256.len(), 64);
    assert_eq!(s.manifest.local_tokens, 16);
    let labels = s.labels.as_ref().unwrap();
    assert!((0..src.len()).all(|i| Some(labels[i]) == src.label(i)));
    // The library forward on the same images.
    let cfg = mood::model::VitConfig::preset("test_tiny_beit").unwrap();
    let store = mood::weights::WeightStore::open(Path::new(&tiny_weights())).unwrap();
    let model = mood::model::VisionTransformer::load(&cfg, &store).unwrap();
    let rows = [0usize, 37, src.len() - 1];
    let mut buf = vec![0.0f32; rows.len() * src.sample_len()];
    src.load(&rows, &mut buf);
    let x = mood::Tensor::from_vec(&[rows.len(), 3, 32, 32], buf).unwrap();
    let (o, local) = model.forward_local(&x).unwrap();
    let d = cfg.embed_dim;
    for (k, &r) in rows.iter().enumerate() {
        let ours = &s.features.as_slice()[r * d..(r + 1) * d];
        let want = &o.features.as_slice()[k * d..(k + 1) * d];
        assert!(
            ours.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5),
            "row {r}"
        );
        let l = 16 * d;
        assert!(s.local.as_ref().unwrap().as_slice()[r * l..(r + 1) * l]
            .iter()
            .zip(&local.as_slice()[k * l..(k + 1) * l])
            .all(|(a, b)| (a - b).abs() < 1e-5));
    }
    assert!(
        s.head.as_ref().unwrap().fc_norm.is_some(),
        "head.safetensors carries fc_norm"
    );
    assert!(
        !out.join(".partial").exists(),
        "chunks removed after assembly"
    );
}

#[test]
fn a_killed_extraction_resumes_to_identical_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (code, err) = extract(&a, &[], &[]);
    assert_eq!(code, 0, "{err}");
    // Abort (as a kill) after 3 of the 10 chunks.
    let (code, _) = extract(&b, &[], &[("MOOD_FAULT_AFTER_CHUNKS", "3")]);
    assert_ne!(code, 0, "the fault hook aborts");
    assert!(!b.join("features.npy").exists(), "nothing final yet");
    let m = mood::store::read_manifest(&b)
        .unwrap()
        .expect("the run's identity is on disk");
    assert!(!m.complete, "no completion record yet");
    let chunks = std::fs::read_dir(b.join(".partial")).unwrap().count();
    assert_eq!(chunks, 3, "three chunks survived");
    // A half-written temporary from the kill is ignored.
    std::fs::write(
        b.join(".partial/.chunk-000003.safetensors.999.tmp"),
        b"junk",
    )
    .unwrap();
    let (code, err) = extract(&b, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed: 3 chunks"), "{err}");
    assert_eq!(
        files(&a),
        files(&b),
        "resumed output differs from an uninterrupted run"
    );
}

#[test]
fn shards_merge_back_into_the_unsharded_store() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    assert_eq!(extract(&whole, &[], &[]).0, 0);
    let mut shards = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("shard{i}"));
        let (code, err) = extract(&dir, &["--shard", &format!("{i}/3")], &[]);
        assert_eq!(code, 0, "{err}");
        shards.push(dir.to_string_lossy().into_owned());
    }
    let merged = tmp.path().join("merged");
    let m = merged.to_string_lossy().into_owned();
    let mut args = vec!["merge"];
    args.extend(shards.iter().map(String::as_str));
    args.extend(["-o", &m]);
    let (code, err) = mood(&args, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        files(&whole),
        files(&merged),
        "merged shards differ from the unsharded store"
    );
    // The same shard twice is refused.
    let dup = tmp.path().join("dup").to_string_lossy().into_owned();
    let (code, err) = mood(&["merge", &shards[0], &shards[0], "-o", &dup], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("given twice"), "{err}");
}

#[test]
fn bad_extraction_input_fails_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    for (data, extra, want) in [
        ("digits", &["--shard", "3/2"][..], "--shard"),
        (
            "imagenet-21k",
            &[][..],
            "not a directory or a known data set",
        ),
        ("/nonexistent/images", &[][..], "no such directory"),
        ("digits@val", &[][..], "train` and `test"),
        ("digits", &["--batch", "0"][..], "at least 1"),
    ] {
        let (code, _, err) = extract_tiny(data, &out, extra);
        assert_ne!(code, 0);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "{err}");
    }
    assert!(!out.join("features.npy").exists());
}

#[test]
fn f16_stores_hold_the_f32_features_rounded() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("f32"), tmp.path().join("f16"));
    assert_eq!(extract(&a, &["--local"], &[]).0, 0);
    let (code, err) = extract(&b, &["--local", "--dtype", "f16"], &[]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(b.join("features.npy")).unwrap();
    assert!(String::from_utf8_lossy(&bytes[..128]).contains("'<f2'"));
    let (sa, sb) = (
        mood::store::FeatureStore::open(&a).unwrap(),
        mood::store::FeatureStore::open(&b).unwrap(),
    );
    assert_eq!(sb.manifest.dtype, "f16");
    for (x, y) in [
        (&sa.features, &sb.features),
        (sa.local.as_ref().unwrap(), sb.local.as_ref().unwrap()),
    ] {
        assert_eq!(x.shape(), y.shape());
        for (p, q) in x.as_slice().iter().zip(y.as_slice()) {
            assert!((p - q).abs() <= 1e-3 * p.abs().max(1e-2), "{p} vs {q}");
        }
    }
    assert_eq!(
        std::fs::read(a.join("logits.npy")).unwrap(),
        std::fs::read(b.join("logits.npy")).unwrap(),
        "logits stay f32"
    );
}

#[test]
fn image_folders_extract_with_unreadable_files_skipped_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = tmp.path().join("images");
    for class in ["a_photos", "b_flowers"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
    }
    std::fs::copy(
        root.join("data/china.jpg"),
        data.join("a_photos/1_china.jpg"),
    )
    .unwrap();
    std::fs::copy(
        root.join("data/flower.jpg"),
        data.join("b_flowers/1_flower.jpg"),
    )
    .unwrap();
    std::fs::copy(
        fixture("preprocess/flower_grey.jpg"),
        data.join("b_flowers/2_grey.JPG"),
    )
    .unwrap();
    let jpeg = std::fs::read(root.join("data/china.jpg")).unwrap();
    std::fs::write(
        data.join("a_photos/2_truncated.jpg"),
        &jpeg[..jpeg.len() / 3],
    )
    .unwrap();
    std::fs::write(data.join("a_photos/3_empty.jpg"), b"").unwrap();
    std::fs::write(data.join("b_flowers/3_text.jpg"), b"this is not an image").unwrap();
    let out = tmp.path().join("store");
    let d = data.to_string_lossy().into_owned();
    let (code, _, err) = extract_tiny(&d, &out, &["--batch", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let s = mood::store::FeatureStore::open(&out).unwrap();
    assert_eq!(s.manifest.classes, vec!["a_photos", "b_flowers"]);
    let skipped: Vec<&str> = s.manifest.skipped.iter().map(|k| k.path.as_str()).collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    for name in ["2_truncated.jpg", "3_empty.jpg", "3_text.jpg"] {
        assert!(
            skipped.iter().any(|p| p.ends_with(name)),
            "{name} not listed: {skipped:?}"
        );
        assert!(err.contains(name), "no warning for {name}: {err}");
    }
    assert_eq!(s.rows(), 3, "china, flower and the greyscale flower");
    assert_eq!(s.labels.as_deref(), Some(&[0usize, 1, 1][..]));
    // The readable images keep their own features when a batch skips some: the same three
    // files alone give the same rows.
    let clean = tmp.path().join("clean");
    for (class, name) in [
        ("a_photos", "1_china.jpg"),
        ("b_flowers", "1_flower.jpg"),
        ("b_flowers", "2_grey.JPG"),
    ] {
        std::fs::create_dir_all(clean.join(class)).unwrap();
        std::fs::copy(data.join(class).join(name), clean.join(class).join(name)).unwrap();
    }
    let clean_out = tmp.path().join("clean_store");
    let (code, _, err) = extract_tiny(clean.to_str().unwrap(), &clean_out, &["--batch", "2"]);
    assert_eq!(code, 0, "{err}");
    let c = mood::store::FeatureStore::open(&clean_out).unwrap();
    common::assert_max_abs(
        s.features.as_slice(),
        c.features.as_slice(),
        1e-5,
        "features with and without skipped files",
    );
    // An output path under a regular file cannot be created: one line, nothing written.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let (code, _, err) = extract_tiny(&d, &blocker.join("store"), &[]);
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// Whether this machine can run the CUDA forward (then `--device cuda` succeeds and `auto` takes
/// the GPU, so the CPU-only assertions below do not apply).
fn cuda_usable() -> bool {
    #[cfg(feature = "cuda")]
    {
        mood::backend::cuda::probe().is_ok()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[test]
fn device_cuda_fails_on_one_line_without_a_gpu_and_auto_equals_cpu() {
    if cuda_usable() {
        eprintln!("SKIPPED: a CUDA device is usable here, so --device cuda/auto run on it");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (cpu, auto, cuda) = (
        tmp.path().join("cpu"),
        tmp.path().join("auto"),
        tmp.path().join("cuda"),
    );
    let (code, err) = extract(&cuda, &["--device", "cuda"], &[]);
    assert_ne!(code, 0, "--device cuda succeeded without a GPU: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: cuda: "), "{err}");
    assert!(!cuda.join("features.npy").exists());
    let (code, err) = extract(&cuda, &["--device", "cuda", "--local"], &[]);
    assert_ne!(code, 0);
    assert!(
        err.starts_with("error: cuda: ") && err.lines().count() == 1,
        "{err}"
    );

    let (code, err) = extract(&cpu, &["--device", "cpu"], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = extract(&auto, &["--device", "auto", "--precision", "bf16"], &[]);
    assert_eq!(code, 0, "{err}");
    let notes: Vec<&str> = err.lines().filter(|l| l.starts_with("note:")).collect();
    assert_eq!(notes.len(), 1, "one fallback note expected: {err}");
    assert!(notes[0].contains("running on the CPU"), "{err}");
    assert!(
        files(&cpu) == files(&auto),
        "--device auto (CPU fallback) wrote a different store than --device cpu"
    );
}

/// `--odin` scores every image through the model (ood::odin, itself checked against PyTorch in
/// tests/train_grads.rs) into odin.npy, survives a kill and resume, and `mood eval` reads it as
/// the `odin` method.
#[test]
fn odin_scores_are_extracted_and_evaluated() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("odin");
    let (code, _) = extract(
        &out,
        &["--odin", "100,0.002"],
        &[("MOOD_FAULT_AFTER_CHUNKS", "2")],
    );
    assert_ne!(code, 0, "the fault hook aborts");
    let (code, err) = extract(&out, &["--odin", "100,0.002"], &[]);
    assert_eq!(code, 0, "{err}");
    let s = mood::store::FeatureStore::open(&out).unwrap();
    assert_eq!(s.manifest.odin, Some((100.0, 0.002)));
    let odin = s.odin.as_ref().expect("odin.npy").as_slice();
    assert_eq!(odin.len(), s.rows());

    use mood::extract::Source;
    let src = mood::extract::source::Digits::parse("digits:0-4@test", 32).unwrap();
    let cfg = mood::model::VitConfig::preset("test_tiny_beit").unwrap();
    let store = mood::weights::WeightStore::open(Path::new(&tiny_weights())).unwrap();
    let model = mood::model::VisionTransformer::load(&cfg, &store).unwrap();
    let rows = [0usize, 41, src.len() - 1];
    let mut buf = vec![0.0f32; rows.len() * src.sample_len()];
    src.load(&rows, &mut buf);
    let x = mood::Tensor::from_vec(&[rows.len(), 3, 32, 32], buf).unwrap();
    // Alone, not in its batch of 8: the scores are per image, so only rounding may differ.
    let want = mood::extract::odin::scores(&model, &x, 100.0, 0.002).unwrap();
    for (k, &r) in rows.iter().enumerate() {
        assert!(
            (odin[r] - want[k]).abs() < 1e-5,
            "row {r}: {} vs {}",
            odin[r],
            want[k]
        );
    }

    let ood = tmp.path().join("ood");
    let o = ood.to_string_lossy().into_owned();
    let (code, _, err) = extract_tiny("digits:5-9@test", &ood, &["--odin"]);
    assert_eq!(code, 0, "{err}");
    // ODIN fits nothing, so the train store needs no odin.npy (no backward over the train set).
    let train = tmp.path().join("train");
    let t = train.to_string_lossy().into_owned();
    let (code, _, err) = extract_tiny("digits:0-4@train", &train, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!train.join("odin.npy").exists());
    let o_id = out.to_string_lossy().into_owned();
    let report = tmp.path().join("report");
    let near = format!("near={o}");
    let r = report.to_string_lossy().into_owned();
    let (code, stdout, err) = run_mood(&[
        "eval",
        "--train",
        &t,
        "--id",
        &o_id,
        "--ood",
        &near,
        "--methods",
        "odin,msp",
        "-o",
        &r,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.lines().any(|l| l.starts_with("| odin |")),
        "{stdout}"
    );
}
