//! A store cannot lie: each way `mood extract`, `mood merge` and the store readers once finished
//! with exit 0 and a wrong store (issue 18) is now a one-line refusal or a correct store.

mod common;

use std::path::Path;

use common::{
    assert_refused, dead_pid, edit_manifest, extract_arch, extract_tiny_env, files, fixture,
    hostname, run_mood, run_mood_env,
};

/// The digits test split through the tiny BEiT, then `extra`; 8 images a batch and 32 a chunk
/// unless `extra` says otherwise.
fn extract(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut args = Vec::new();
    for (flag, default) in [("--batch", "8"), ("--chunk", "32")] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    args.extend_from_slice(extra);
    extract_tiny_env("digits:0-4@test", out, &args, env)
}

/// A run killed (as by `kill -9`) after `chunks` chunks.
fn killed(out: &Path, extra: &[&str], chunks: &str) {
    let (code, _, err) = extract(out, extra, &[("MOOD_FAULT_AFTER_CHUNKS", chunks)]);
    assert_ne!(code, 0, "the fault hook aborts: {err}");
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn resume_with_other_settings_is_refused_naming_what_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    killed(&out, &[], "1");
    let chunks = || std::fs::read_dir(out.join(".partial")).unwrap().count();
    assert_eq!(chunks(), 1);
    // Other weights (the same model in f16), another chunking, another batch, other outputs.
    let f16 = s(&fixture("timm/tiny_beit_f16.safetensors"));
    let other_weights = extract_arch(
        "test_tiny_beit",
        &f16,
        "digits:0-4@test",
        &out,
        &["--batch", "8", "--chunk", "32"],
        &[],
    );
    assert_refused(
        &other_weights,
        &[
            "--weights (SHA-256)",
            "unfinished extraction",
            "--overwrite",
        ],
    );
    assert_refused(
        &extract(&out, &["--chunk", "16"], &[]),
        &["--chunk (the store: 32, this run: 16)"],
    );
    assert_refused(
        &extract(&out, &["--batch", "4"], &[]),
        &["--batch (the store: 8, this run: 4)"],
    );
    assert_refused(&extract(&out, &["--local"], &[]), &["--local"]);
    assert_refused(&extract(&out, &["--dtype", "f16"], &[]), &["--dtype"]);
    // Another architecture (with its own weights).
    let shared = s(&fixture("timm/tiny_beit_shared_relpos.safetensors"));
    let r = extract_arch(
        "test_tiny_beit_shared_relpos",
        &shared,
        "digits:0-4@test",
        &out,
        &["--batch", "8", "--chunk", "32"],
        &[],
    );
    assert_refused(&r, &["--arch (the store: test_tiny_beit"]);
    // Another source (a different class selection of the digits).
    let (code, _, err) = extract_tiny_env(
        "digits:0-3@test",
        &out,
        &["--batch", "8", "--chunk", "32"],
        &[],
    );
    assert_refused(&(code, String::new(), err), &["--data"]);
    // None of this touched the killed run's chunk, and the same settings finish it into the
    // store an uninterrupted run writes.
    assert_eq!(chunks(), 1);
    let (code, _, err) = extract(&out, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed: 1 chunks"), "{err}");
    let whole = tmp.path().join("whole");
    assert_eq!(extract(&whole, &[], &[]).0, 0);
    assert_eq!(files(&out), files(&whole));
}

#[test]
fn resume_with_another_preprocessing_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = tmp.path().join("images");
    std::fs::create_dir_all(&data).unwrap();
    for (i, f) in ["china.jpg", "flower.jpg", "china.jpg"].iter().enumerate() {
        std::fs::copy(root.join("data").join(f), data.join(format!("{i}.jpg"))).unwrap();
    }
    let out = tmp.path().join("s");
    let d = s(&data);
    let run = |preset: &str, env: &[(&str, &str)]| {
        extract_tiny_env(
            &d,
            &out,
            &["--batch", "1", "--chunk", "1", "--preset", preset],
            env,
        )
    };
    assert_ne!(run("mood", &[("MOOD_FAULT_AFTER_CHUNKS", "1")]).0, 0);
    assert_refused(
        &run("moodv2", &[]),
        &["--preset (the store: mood", "moodv2"],
    );
    // A folder that changed since the killed run is another source.
    std::fs::copy(root.join("data/flower.jpg"), data.join("3.jpg")).unwrap();
    assert_refused(
        &run("mood", &[]),
        &["--data (number of images) (the store: 3, this run: 4)"],
    );
    std::fs::remove_file(data.join("3.jpg")).unwrap();
    let (code, _, err) = run("mood", &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_finished_store_is_reported_complete_and_overwrite_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    assert_eq!(extract(&out, &[], &[]).0, 0);
    let before = files(&out);
    let (code, _, err) = extract(&out, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already complete"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(files(&out), before, "a complete store is left as it is");
    // Another run's settings on a finished store: refused, then replaced with --overwrite.
    assert_refused(
        &extract(&out, &["--chunk", "64"], &[]),
        &["a finished store of another run", "--chunk"],
    );
    let (code, _, err) = extract(&out, &["--chunk", "64", "--overwrite"], &[]);
    assert_eq!(code, 0, "{err}");
    let fresh = tmp.path().join("fresh");
    assert_eq!(extract(&fresh, &["--chunk", "64"], &[]).0, 0);
    assert_eq!(files(&out), files(&fresh));
}

#[test]
fn a_stale_local_npy_is_never_read() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let (code, _, err) = extract(&out, &["--local"], &[]);
    assert_eq!(code, 0, "{err}");
    // Without --local into the same --out: another run's store, refused, not mixed.
    assert_refused(
        &extract(&out, &[], &[]),
        &["--local (the store: true, this run: false)"],
    );
    // --overwrite removes the old local.npy with the rest of the old store.
    let (code, _, err) = extract(&out, &["--overwrite"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.join("local.npy").exists());
    // A local.npy copied in by hand is not listed by the manifest, so not read.
    let with_local = tmp.path().join("with_local");
    assert_eq!(extract(&with_local, &["--local"], &[]).0, 0);
    std::fs::copy(with_local.join("local.npy"), out.join("local.npy")).unwrap();
    let store = mood::store::FeatureStore::open(&out).unwrap();
    assert!(store.local.is_none(), "an unlisted local.npy was read");
    let (train, t) = (tmp.path().join("train"), s(&tmp.path().join("train")));
    let (code, _, err) = extract_tiny_env("digits:0-4@train", &train, &["--local"], &[]);
    assert_eq!(code, 0, "{err}");
    let ood = format!("x={}", s(&with_local));
    let (code, _, err) = run_mood(&[
        "eval",
        "--train",
        &t,
        "--id",
        &s(&out),
        "--ood",
        &ood,
        "--methods",
        "csd",
    ]);
    assert_refused(&(code, String::new(), err), &["local"]);
}

#[test]
fn one_writer_per_store_and_dead_runs_are_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    std::fs::create_dir_all(&out).unwrap();
    // A live writer (this test process) holds the lock: refused, nothing written.
    std::fs::write(
        out.join(".lock"),
        format!("{} {}", std::process::id(), hostname()),
    )
    .unwrap();
    assert_refused(
        &extract(&out, &[], &[]),
        &[
            "being written by another mood",
            &std::process::id().to_string(),
        ],
    );
    assert!(!out.join("manifest.json").exists());
    // A writer on another machine of a shared file system cannot be checked: refused too.
    std::fs::write(out.join(".lock"), "1 some-other-node").unwrap();
    assert_refused(&extract(&out, &[], &[]), &["some-other-node"]);
    // The lock and the temporaries of a dead run are taken over and removed, with notes.
    let dead = dead_pid();
    std::fs::write(out.join(".lock"), format!("{dead} {}", hostname())).unwrap();
    let temp = out.join(format!(".features.npy.{dead}.tmp"));
    std::fs::write(&temp, vec![0u8; 4096]).unwrap();
    std::fs::create_dir_all(out.join(".partial")).unwrap();
    let chunk_temp = out.join(format!(".partial/.chunk-000000.safetensors.{dead}.tmp"));
    std::fs::write(&chunk_temp, b"junk").unwrap();
    let (code, _, err) = extract(&out, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("taking over the lock"), "{err}");
    assert!(err.contains("removed 2 temporary file(s)"), "{err}");
    assert!(!temp.exists() && !out.join(".lock").exists());
    assert!(mood::store::FeatureStore::open(&out).is_ok());
}

#[test]
fn half_built_stores_are_refused_by_every_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    assert_eq!(extract(&out, &[], &[]).0, 0);
    let o = s(&out);
    let det = s(&tmp.path().join("d.safetensors"));
    let fit = |train: &str| {
        run_mood(&[
            "fit",
            "--method",
            "mahalanobis",
            "--train",
            train,
            "-o",
            &det,
        ])
    };
    assert_eq!(fit(&o).0, 0);
    // An assembly that stopped after some arrays (the disk filled): no completion record.
    edit_manifest(&out, |m| m["complete"] = false.into());
    assert_refused(&fit(&o), &["unfinished store", "completion record"]);
    let scores = s(&tmp.path().join("x.npy"));
    assert_refused(
        &run_mood(&["score", "--detector", &det, "--features", &o, "-o", &scores]),
        &["unfinished store"],
    );
    let r = run_mood(&[
        "eval",
        "--train",
        &o,
        "--id",
        &o,
        "--ood",
        &format!("x={o}"),
    ]);
    assert_refused(&r, &["unfinished store"]);
    // An older extraction's chunks without any manifest.
    let old = tmp.path().join("old");
    std::fs::create_dir_all(old.join(".partial")).unwrap();
    std::fs::copy(out.join("features.npy"), old.join("features.npy")).unwrap();
    assert_refused(&fit(&s(&old)), &["unfinished extraction"]);
    // A listed file that is gone.
    edit_manifest(&out, |m| m["complete"] = true.into());
    std::fs::remove_file(out.join("labels.npy")).unwrap();
    assert_refused(
        &fit(&o),
        &["labels.npy", "listed in manifest.json but missing"],
    );
}

#[test]
fn a_manifest_that_disagrees_with_the_arrays_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    assert_eq!(extract(&out, &[], &[]).0, 0);
    let good = mood::store::read_manifest(&out).unwrap().unwrap();
    let o = s(&out);
    let det = s(&tmp.path().join("d.safetensors"));
    let fit = || run_mood(&["fit", "--method", "mahalanobis", "--train", &o, "-o", &det]);
    let cases: [(&str, serde_json::Value, &str); 3] = [
        ("count", (good.count + 1).into(), "count"),
        ("dim", (good.dim * 2).into(), "dim"),
        ("classes", serde_json::json!(["0", "1"]), "classes"),
    ];
    for (key, value, want) in cases {
        let original = std::fs::read(out.join("manifest.json")).unwrap();
        edit_manifest(&out, |m| m[key] = value.clone());
        assert_refused(&fit(), &[want]);
        std::fs::write(out.join("manifest.json"), original).unwrap();
    }
    assert_eq!(fit().0, 0, "the restored manifest is accepted");
}

#[test]
fn merge_takes_exactly_the_shards_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let shard = |i: usize, n: usize, extra: &[&str]| {
        let dir = tmp.path().join(format!("shard{i}of{n}{}", extra.join("")));
        let spec = format!("{i}/{n}");
        let mut args = vec!["--shard", spec.as_str()];
        args.extend_from_slice(extra);
        let (code, _, err) = extract(&dir, &args, &[]);
        assert_eq!(code, 0, "{err}");
        s(&dir)
    };
    let (a, b) = (shard(0, 2, &[]), shard(1, 2, &[]));
    let out = s(&tmp.path().join("merged"));
    // One shard of two: refused, and no store that looks complete.
    assert_refused(
        &run_mood(&["merge", &a, "-o", &out]),
        &["shard 1/2 missing"],
    );
    assert!(!Path::new(&out).join("manifest.json").exists());
    // Shards of two different runs (another chunking).
    let other = shard(1, 2, &["--chunk", "16"]);
    assert_refused(
        &run_mood(&["merge", &a, &other, "-o", &out]),
        &["not shards of one run", "--chunk"],
    );
    // Shards of a split into three beside one of two.
    let third = shard(2, 3, &[]);
    assert_refused(
        &run_mood(&["merge", &a, &b, &third, "-o", &out]),
        &["share N"],
    );
    // Into one of its inputs.
    assert_refused(
        &run_mood(&["merge", &a, &b, "-o", &format!("{a}/merged")]),
        &["inside the shard store"],
    );
    let (code, _, err) = run_mood(&["merge", &b, &a, "-o", &out]);
    assert_eq!(code, 0, "{err}");
    let m = mood::store::read_manifest(Path::new(&out))
        .unwrap()
        .unwrap();
    assert!(m.complete);
    assert_eq!(m.identity.unwrap().shard, (0, 1));
    // A second merge onto the finished store needs --overwrite.
    assert_refused(&run_mood(&["merge", &a, &b, "-o", &out]), &["--overwrite"]);
    let (code, _, err) = run_mood(&["merge", &a, &b, "-o", &out, "--overwrite"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn stores_record_the_processor_and_combine_across_cpus() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for (dir, shard) in [(&a, "0/2"), (&b, "1/2")] {
        let (code, _, err) = extract(dir, &["--shard", shard], &[]);
        assert_eq!(code, 0, "{err}");
    }
    let id = |dir: &Path| {
        mood::store::read_manifest(dir)
            .unwrap()
            .unwrap()
            .identity
            .unwrap()
    };
    // The kind, and the processor as /proc/cpuinfo names it, with the threads (run_mood: 2).
    let first = id(&a);
    assert_eq!(first.device, "cpu");
    assert!(first.device_name.ends_with(", 2 threads"), "{first:?}");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(model) = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
    {
        let model = model.1.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(first.device_name.starts_with(&model), "{first:?}");
    }
    // Shard 1 extracted on another node's CPU: the shards still merge.
    edit_manifest(&b, |m| {
        m["identity"]["device_name"] = "Another CPU @ 2.0GHz, 64 threads".into()
    });
    let out = s(&tmp.path().join("merged"));
    let (code, _, err) = run_mood(&["merge", &s(&a), &s(&b), "-o", &out]);
    assert_eq!(code, 0, "{err}");
    // A shard made on a GPU is another run: the CUDA kernels sum in another order.
    edit_manifest(&b, |m| m["identity"]["device"] = "cuda".into());
    assert_refused(
        &run_mood(&["merge", &s(&a), &s(&b), "-o", &s(&tmp.path().join("m2"))]),
        &[
            "not shards of one run",
            "--device (first store: cpu, this one: cuda)",
        ],
    );
    // An unfinished run resumes on another CPU; the resumed store equals an uninterrupted one.
    let whole = tmp.path().join("whole");
    let (code, _, err) = extract(&whole, &[], &[]);
    assert_eq!(code, 0, "{err}");
    let resumed = tmp.path().join("resumed");
    killed(&resumed, &[], "1");
    edit_manifest(&resumed, |m| {
        m["identity"]["device_name"] = "Another CPU @ 2.0GHz, 64 threads".into()
    });
    let (code, _, err) = extract(&resumed, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed"), "{err}");
    let arrays = |d: &Path| {
        files(d)
            .into_iter()
            .filter(|(n, _)| n.ends_with(".npy"))
            .collect::<Vec<_>>()
    };
    assert_eq!(arrays(&resumed), arrays(&whole));
}

#[test]
fn fit_never_writes_into_its_input_store() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    assert_eq!(extract(&out, &[], &[]).0, 0);
    let before = std::fs::read(out.join("features.npy")).unwrap();
    let o = s(&out);
    let target = format!("{o}/features.npy");
    assert_refused(
        &run_mood(&["fit", "--method", "knn", "--train", &o, "-o", &target]),
        &["inside", "write it elsewhere"],
    );
    assert_eq!(std::fs::read(out.join("features.npy")).unwrap(), before);
    // The same through another spelling of the path.
    let dotted = format!("{o}/../s/det.safetensors");
    assert_refused(
        &run_mood(&["fit", "--method", "knn", "--train", &o, "-o", &dotted]),
        &["inside"],
    );
}

#[test]
fn extract_logs_progress_lines_when_stderr_is_not_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let o = s(&out);
    let w = common::tiny_weights();
    // stderr is a pipe here, as in a batch scheduler's log file.
    let (code, _, err) = run_mood_env(
        &[
            "--progress-every",
            "0.05",
            "extract",
            "--arch",
            "test_tiny_beit",
            "--weights",
            &w,
            "--data",
            "digits@test",
            "--out",
            &o,
            "--batch",
            "1",
            "--odin",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("extract: ")).collect();
    assert!(lines.len() >= 2, "periodic lines expected: {err}");
    for l in &lines {
        assert!(l.contains("images/s") && l.contains("ETA"), "{l}");
        assert!(!l.contains('\r'), "{l}");
    }
    // The rate is a number.
    let rate: f64 = lines[lines.len() - 1]
        .split(", ")
        .find(|p| p.ends_with("images/s"))
        .and_then(|p| p.split(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("a rate");
    assert!(rate > 0.0, "{lines:?}");
    // --quiet: nothing but the result line.
    let q = tmp.path().join("q");
    let qs = s(&q);
    let (code, _, err) = run_mood_env(
        &[
            "--quiet",
            "--progress-every",
            "0.01",
            "extract",
            "--arch",
            "test_tiny_beit",
            "--weights",
            &w,
            "--data",
            "digits:0@test",
            "--out",
            &qs,
            "--batch",
            "1",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("extract: "), "{err}");
}
