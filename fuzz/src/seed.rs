//! The seed corpus of every target, built from the project's test fixtures: the real files the
//! readers are tested on, the hostile ones of tests/fixtures/hostile, and for the formats that
//! have no fixture of their own (detector files, feature stores) small ones made here with mood's
//! own writers. `stable seed` (or `cargo run --bin stable -- seed`) writes them under corpus/.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mood::ood::detector::{method, parse_args, Detector, Head, Inputs, Matrix, METHODS};
use mood::Result;

use crate::{join, STORE_FILES};

/// Named seed files of one target.
type Seeds = Vec<(String, Vec<u8>)>;

/// Seeds larger than this are left out: mutation works best on small inputs.
const MAX_SEED: u64 = 256 << 10;

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_under(&p, out);
        } else if p.metadata().map(|m| m.len() <= MAX_SEED).unwrap_or(false) {
            out.push(p);
        }
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// The first `n` rows of the float .npy `rel` under the fixtures, with its width.
fn head_rows(fixtures: &Path, rel: &str, n: usize) -> Result<(Vec<f32>, usize, usize)> {
    let (shape, data) = mood::npy::read_f32(&fixtures.join(rel))?;
    let width: usize = shape[1..].iter().product();
    let n = n.min(shape[0]);
    Ok((data[..n * width].to_vec(), n, width))
}

fn npy_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let mut out = mood::npy::header_bytes("<f4", shape);
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

fn labels_bytes(labels: &[usize]) -> Vec<u8> {
    let mut out = mood::npy::header_bytes("<i8", &[labels.len()]);
    out.extend(labels.iter().flat_map(|&v| (v as i64).to_le_bytes()));
    out
}

/// Detector files of every method, fitted on a few rows of the OOD fixtures.
fn detectors(fixtures: &Path, tmp: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let (f, n, d) = head_rows(fixtures, "ood/head_train.npy", 24)?;
    let (_, w) = mood::npy::read_f32(&fixtures.join("ood/head_w.npy"))?;
    let (_, b) = mood::npy::read_f32(&fixtures.join("ood/head_b.npy"))?;
    let head = Head {
        weight: w,
        bias: b,
        fc_norm: None,
    };
    let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
    let (local, ln, lw) = head_rows(fixtures, "ood/csd_train.npy", 6)?;
    let tokens = 25;
    let local_inputs = Inputs {
        local: Some(Matrix {
            data: &local,
            cols: lw,
        }),
        local_tokens: tokens,
        ..Default::default()
    };
    let _ = ln;
    let inputs = Inputs {
        features: Some(Matrix { data: &f, cols: d }),
        labels: Some(&labels),
        head: Some(&head),
        odin: Some(&f[..n]),
        ..Default::default()
    };
    let mut out = Vec::new();
    for m in METHODS.iter() {
        let given: Vec<String> = match m.name {
            "knn" | "csd" => vec!["k=2".into()],
            "kmeans" => vec!["k=2".into()],
            "vim" | "residual" => vec!["dim=4".into()],
            "mos" => vec!["groups=4,4".into()],
            _ => Vec::new(),
        };
        let args: BTreeMap<String, String> = parse_args(method(m.name)?, &given)?;
        let which = if m.name == "csd" {
            &local_inputs
        } else {
            &inputs
        };
        let Ok(det) = Detector::fit(m.name, args, which) else {
            continue;
        };
        let p = tmp.join(format!("{}.detector", m.name));
        det.save(&p)?;
        out.push((m.name.to_string(), read(&p)));
    }
    Ok(out)
}

/// Feature stores as [`crate::store`] reads them.
fn stores(fixtures: &Path, tmp: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let (f, n, d) = head_rows(fixtures, "ood/head_train.npy", 16)?;
    let labels: Vec<usize> = (0..n).map(|i| i % 4).collect();
    let (z, _, c) = head_rows(fixtures, "ood/kl_train.npy", n)?;
    let (local, _, lw) = head_rows(fixtures, "ood/csd_train.npy", n)?;
    let (_, w) = mood::npy::read_f32(&fixtures.join("ood/head_w.npy"))?;
    let (_, b) = mood::npy::read_f32(&fixtures.join("ood/head_b.npy"))?;
    let hp = tmp.join("head.safetensors");
    mood::store::write_head(
        &hp,
        &Head {
            weight: w,
            bias: b,
            fc_norm: None,
        },
    )?;
    let manifest = format!(
        r#"{{"format": 1, "count": {n}, "dim": {d}, "classes": ["a", "b", "c", "d"], "local_tokens": 25, "dtype": "f32"}}"#
    );
    let files: Vec<Vec<u8>> = vec![
        npy_bytes(&[n, d], &f),
        labels_bytes(&labels),
        npy_bytes(&[n, c], &z),
        manifest.into_bytes(),
        npy_bytes(&[n, 25, lw / 25], &local),
        npy_bytes(&[n], &f[..n]),
        read(&hp),
    ];
    let all: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    let mut out = vec![
        ("full".to_string(), join(&all)),
        ("features_only".to_string(), join(&all[..1])),
        ("labelled".to_string(), join(&all[..2])),
    ];
    for dir in ["d3_label_2pow40", "d8_wrapped_shape", "store3x4"] {
        let base = fixtures.join("hostile").join(dir);
        let parts: Vec<Vec<u8>> = STORE_FILES.iter().map(|f| read(&base.join(f))).collect();
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        out.push((dir.to_string(), join(&parts)));
    }
    Ok(out)
}

/// CIFAR seeds: the layout byte, then the meta file and the test batch.
fn cifars(fixtures: &Path) -> Vec<(String, Vec<u8>)> {
    let sets = [
        (
            0u8,
            "cifar10/cifar-10-batches-py",
            "batches.meta",
            "test_batch",
        ),
        (
            1,
            "cifar10/cifar-10-batches-bin",
            "batches.meta.txt",
            "test_batch.bin",
        ),
        (2, "cifar100/cifar-100-python", "meta", "test"),
        (
            3,
            "cifar100/cifar-100-binary",
            "fine_label_names.txt",
            "test.bin",
        ),
    ];
    sets.iter()
        .filter_map(|(pick, dir, meta, batch)| {
            let base = fixtures.join("cifar").join(dir);
            let (m, b) = (read(&base.join(meta)), read(&base.join(batch)));
            if m.is_empty() || b.is_empty() {
                return None;
            }
            let mut data = vec![*pick];
            data.extend(join(&[&m, &b]));
            Some((dir.replace('/', "_"), data))
        })
        .collect()
}

/// data.pkl of every .pth fixture (the pickle target's torch seeds).
fn pickles_of(pths: &[PathBuf]) -> Vec<(String, Vec<u8>)> {
    pths.iter()
        .filter_map(|p| {
            let mut z = zip::ZipArchive::new(std::fs::File::open(p).ok()?).ok()?;
            let name = z
                .file_names()
                .find(|n| n.ends_with("data.pkl"))?
                .to_string();
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut z.by_name(&name).ok()?, &mut buf).ok()?;
            Some((format!("{}.pkl", stem(p)), buf))
        })
        .collect()
}

fn stem(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// Writes corpus/<target>/<seed> for every target under `out`, from the fixtures at `fixtures`;
/// returns the number of seeds per target.
pub fn write_corpus(fixtures: &Path, out: &Path) -> Result<Vec<(&'static str, usize)>> {
    let mut all = Vec::new();
    files_under(fixtures, &mut all);
    let with = |ext: &[&str]| -> Vec<PathBuf> {
        all.iter()
            .filter(|p| ext.iter().any(|e| stem(p).ends_with(e)))
            .cloned()
            .collect()
    };
    // Named by their path under the fixtures, so that two features.npy do not collide.
    let as_seeds = |ps: Vec<PathBuf>| -> Vec<(String, Vec<u8>)> {
        ps.iter()
            .map(|p| {
                let rel = p.strip_prefix(fixtures).unwrap_or(p);
                (rel.to_string_lossy().replace('/', "_"), read(p))
            })
            .collect()
    };
    let tmp = out.join(".seed-tmp");
    std::fs::create_dir_all(&tmp).map_err(|e| mood::Error::io(&tmp, e))?;
    let pths = with(&[".pth", ".pt"]);
    let mut pickles = pickles_of(&pths);
    pickles.extend(as_seeds(
        all.iter()
            .filter(|p| p.to_string_lossy().contains("batches-py") || stem(p) == "meta")
            .cloned()
            .collect(),
    ));
    let mut detector = detectors(fixtures, &tmp)?;
    detector.extend(as_seeds(
        with(&[".safetensors"])
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("hostile"))
            .collect(),
    ));
    let sets: Vec<(&str, Seeds)> = vec![
        ("npy", as_seeds(with(&[".npy"]))),
        ("safetensors", as_seeds(with(&[".safetensors"]))),
        ("pickle", pickles),
        ("pth", as_seeds(pths)),
        ("detector", detector),
        ("store", stores(fixtures, &tmp)?),
        ("cifar", cifars(fixtures)),
        ("image", as_seeds(with(&[".jpg", ".jpeg", ".png", ".JPEG"]))),
    ];
    std::fs::remove_dir_all(&tmp).ok();
    let mut counts = Vec::new();
    for (target, seeds) in sets {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).map_err(|e| mood::Error::io(&dir, e))?;
        for (name, bytes) in &seeds {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| mood::Error::io(&p, e))?;
        }
        let name = crate::TARGETS
            .iter()
            .find(|(n, _)| *n == target)
            .expect("a target")
            .0;
        counts.push((name, seeds.len()));
    }
    Ok(counts)
}
