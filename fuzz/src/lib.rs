//! One fuzz target per reader of mood: each takes arbitrary bytes, hands them to the public reader
//! (and, where the reader accepts them, to what runs next on its result) and must return: an error
//! is the expected outcome, a panic, an abort, an allocation beyond the limit or a hang is a bug.
//!
//! Readers that take a path get the bytes written to a scratch directory first; readers of several
//! files (a feature store, a CIFAR folder) get the input split at [`SEP`] into their files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mood::ood::detector::{method, parse_args, Detector, Inputs, Matrix};
use mood::store::FeatureStore;

pub mod seed;

/// A fuzz target: bytes in, nothing out; it must return for every input.
pub type Target = fn(&[u8]);

/// Every target by name, for the stable harness and the seed builder.
pub const TARGETS: [(&str, Target); 8] = [
    ("npy", npy),
    ("safetensors", safetensors),
    ("pickle", pickle),
    ("pth", pth),
    ("detector", detector),
    ("store", store),
    ("cifar", cifar),
    ("image", image),
];

/// Splits an input of several files. Chosen to be unlikely inside the formats themselves.
pub const SEP: &[u8] = b"\n@@mood-fuzz-file@@\n";

/// The input's parts at [`SEP`].
pub fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&rest[..i]);
        rest = &rest[i + SEP.len()..];
    }
    parts.push(rest);
    parts
}

/// Files joined with [`SEP`] (the inverse of [`split`], for seeds).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEP)
}

/// A scratch directory for readers that take paths: `MOOD_FUZZ_SCRATCH` (the stable harness sets
/// it, one per run) or a per-process one under the temporary directory.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::var_os("MOOD_FUZZ_SCRATCH")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("mood-fuzz-{}", std::process::id()))
            });
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

/// `files` (name, bytes; empty bytes = absent) as the only files of the fresh directory `name`.
fn folder(name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = scratch().join(name);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("scratch folder");
    for (f, bytes) in files {
        if !bytes.is_empty() {
            std::fs::write(dir.join(f), bytes).expect("scratch file");
        }
    }
    dir
}

fn file(name: &str, data: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, data).expect("scratch file");
    p
}

/// .npy: the header parser, every in-memory reader, and the memory-mapped one.
pub fn npy(data: &[u8]) {
    let name = Path::new("fuzz.npy");
    let _ = mood::npy::header(name, data);
    let _ = mood::npy::parse_f32(name, data);
    let _ = mood::npy::parse_indices(name, data);
    if let Ok(t) = mood::npy::map_float(&file("fuzz.npy", data)) {
        std::hint::black_box(t.as_slice().iter().sum::<f32>());
    }
}

/// safetensors: in memory and mapped, every tensor converted to f32, and the metadata reader.
pub fn safetensors(data: &[u8]) {
    if let Ok(ws) = mood::weights::WeightStore::from_safetensors_bytes("fuzz", data) {
        let _ = ws.float_tensors();
    }
    let p = file("fuzz.safetensors", data);
    if let Ok(ws) = mood::weights::WeightStore::open(&p) {
        let _ = ws.float_tensors();
        let _ = ws.raw_tensors();
    }
    let _ = mood::weights::safetensors::read_metadata(&p, "mood_detector");
}

/// The restricted pickle reader, with torch's and with numpy's globals.
pub fn pickle(data: &[u8]) {
    use mood::weights::pickle::{load_allowing, Globals};
    let _ = load_allowing(data, Globals::Torch);
    let _ = load_allowing(data, Globals::Numpy);
}

/// PyTorch zip checkpoints, from memory and through the weights store.
pub fn pth(data: &[u8]) {
    let name = Path::new("fuzz.pth");
    let _ = mood::weights::pth::read_from(name, std::io::Cursor::new(data));
    if data.starts_with(b"PK\x03\x04") {
        if let Ok(ws) = mood::weights::WeightStore::open(&file("fuzz.pth", data)) {
            let _ = ws.float_tensors();
        }
    }
}

/// Rows of `cols` values, deterministic and finite.
fn rows(n: usize, cols: usize) -> Vec<f32> {
    (0..n * cols)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
        .collect()
}

/// Detector files: loaded, then scored on a small store of the header's width (and 3-token local
/// features and 4-class logits, so that every method reaches its scorer).
pub fn detector(data: &[u8]) {
    let Ok(det) = Detector::load(&file("fuzz.detector", data)) else {
        return;
    };
    let dim = det.header.dim;
    if dim > 4096 {
        return;
    }
    let (n, tokens, classes) = (3, 3, 4);
    let (f, z, l) = (
        rows(n, dim.max(1)),
        rows(n, classes),
        rows(n, tokens * dim.max(1)),
    );
    let odin = rows(n, 1);
    let inputs = Inputs {
        features: Some(Matrix {
            data: &f,
            cols: dim.max(1),
        }),
        logits: Some(Matrix {
            data: &z,
            cols: classes,
        }),
        labels: None,
        local: Some(Matrix {
            data: &l,
            cols: tokens * dim.max(1),
        }),
        local_tokens: tokens,
        head: None,
        odin: Some(&odin),
    };
    let _ = det.score(&inputs);
}

/// Feature stores: the files of one store, in this order, split at [`SEP`] (a missing or empty
/// part is an absent file). An opened store is fitted and scored with cheap methods.
pub const STORE_FILES: [&str; 7] = [
    "features.npy",
    "labels.npy",
    "logits.npy",
    "manifest.json",
    "local.npy",
    "odin.npy",
    "head.safetensors",
];

pub fn store(data: &[u8]) {
    let parts = split(data);
    let files: Vec<(&str, &[u8])> = STORE_FILES
        .iter()
        .zip(parts.iter().chain(std::iter::repeat(&&[][..])))
        .map(|(n, p)| (*n, *p))
        .collect();
    let Ok(store) = FeatureStore::open(&folder("store", &files)) else {
        return;
    };
    let (n, d) = (store.rows(), store.dim());
    let inputs = store.inputs(None);
    // The fits are quadratic in rows or width at most: keep each execution short, as the store
    // a fuzzer makes is small anyway.
    let mut methods = vec!["euclidean", "knn", "msp", "energy", "csd", "odin"];
    if d <= 64 && n <= 512 {
        methods.extend([
            "mahalanobis",
            "mahalanobis-cc",
            "kl-matching",
            "react",
            "vim",
        ]);
    }
    for name in methods {
        let Ok(m) = method(name) else { continue };
        let given = if name == "knn" || name == "csd" {
            vec!["k=1".to_string()]
        } else {
            Vec::new()
        };
        let Ok(args) = parse_args(m, &given) else {
            continue;
        };
        if let Ok(det) = Detector::fit(name, args, &inputs) {
            let _ = det.score(&inputs);
            let p = scratch().join("fitted.detector");
            if det.save(&p).is_ok() {
                let _ = Detector::load(&p).map(|d| d.score(&inputs));
            }
        }
    }
}

/// CIFAR folders: the first byte picks CIFAR-10 or -100 and the python or binary layout; the rest
/// is [meta file, test batch] split at [`SEP`]. An opened set hands out its images.
pub fn cifar(data: &[u8]) {
    use mood::data::cifar::{Cifar, Kind, Split};
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let parts = split(rest);
    let meta = parts.first().copied().unwrap_or(&[]);
    let batch = parts.get(1).copied().unwrap_or(&[]);
    let (kind, files) = match pick % 4 {
        0 => (
            Kind::Cifar10,
            [("batches.meta", meta), ("test_batch", batch)],
        ),
        1 => (
            Kind::Cifar10,
            [("batches.meta.txt", meta), ("test_batch.bin", batch)],
        ),
        2 => (Kind::Cifar100, [("meta", meta), ("test", batch)]),
        _ => (
            Kind::Cifar100,
            [("fine_label_names.txt", meta), ("test.bin", batch)],
        ),
    };
    let dir = folder("cifar", &files);
    if let Ok(c) = Cifar::open(&dir, kind, Split::Test) {
        for i in 0..c.len().min(4) {
            std::hint::black_box(c.image(i));
            std::hint::black_box(c.item_name(i));
        }
    }
}

/// JPEG and PNG decoding as extraction does it.
pub fn image(data: &[u8]) {
    let _ = mood::data::image_folder::decode_bytes(data, Path::new("fuzz.img"));
}
