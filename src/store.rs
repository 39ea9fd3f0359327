//! A feature store: one directory per data split, as `mood extract` writes it and `mood fit /
//! score / eval` read it. numpy reads every file directly.
//!
//! ```text
//! features.npy     [n, D] float32 or float16, memory-mapped on read (f16 is converted)
//! logits.npy       [n, C] optional
//! labels.npy       [n] integer, optional (class index per row)
//! local.npy        [n, T, D] optional patch-token features (for `csd`)
//! layers.npy       [n, L, D] optional: the mean patch token of each block listed in the
//!                  manifest's `layers` (`mood extract --layers`; for `mahalanobis-ensemble`, `gram`)
//! head.safetensors optional: head.weight [C, D], head.bias [C], fc_norm.weight/.bias [D]
//! manifest.json    model, weights hash, preprocessing, count, sources, skipped files, the
//!                  identity of the run, the files that belong to the store, completion record
//! ```
//!
//! Every file is written under a temporary name and renamed. The manifest is written first with
//! `complete: false` and rewritten last with `complete: true` and the list of the store's files,
//! so a store whose writer died is recognisable as such and refused by every reader, and a file
//! left in the directory by another run (a stale local.npy) is never read. A directory without a
//! manifest (features saved by hand with numpy) is read with a note.

mod identity;

use std::path::{Path, PathBuf};

pub use identity::{differences, Identity, Provenance};

use crate::error::{Error, Result};
use crate::features::{FcNorm, Head, Inputs, Matrix};
use crate::tensor::Tensor;
use crate::weights::{safetensors, RawTensor, WDType, WeightStore};

/// A file the extraction could not use, and why.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct Manifest {
    pub format: u32,
    /// Architecture preset (e.g. beit_base_patch16_224).
    pub model: String,
    /// The weights file and the SHA-256 of its bytes.
    pub weights: String,
    pub weights_sha256: String,
    /// Preprocessing preset and its resolved settings.
    pub preprocess: String,
    pub count: usize,
    pub dim: usize,
    /// Class names in label order, when the source has them.
    pub classes: Vec<String>,
    /// The data specifications the rows came from.
    pub sources: Vec<String>,
    pub skipped: Vec<Skipped>,
    /// Patch tokens per row of local.npy (0 without local features).
    pub local_tokens: usize,
    /// Element type of features.npy and local.npy: "f32" or "f16" (logits are always f32).
    pub dtype: String,
    /// The block numbers (1-based) of layers.npy's L entries, in order; empty without it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<usize>,
    /// (temperature, epsilon) of odin.npy, when the extraction computed ODIN scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub odin: Option<(f32, f32)>,
    /// What decided the rows (`mood extract`, `mood merge`); absent in stores written otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// The completion record (format 2 on): false while the store is being written.
    pub complete: bool,
    /// The store's files (format 2 on): no other file of the directory is read.
    pub files: Vec<String>,
}

/// The manifest layout this version writes: 2 adds `identity`, `complete` and `files`.
pub const FORMAT: u32 = 2;

impl Manifest {
    /// What `mood score` / `mood eval` compare between stores.
    pub fn provenance(&self) -> Provenance {
        Provenance {
            model: self.model.clone(),
            weights_sha256: self.weights_sha256.clone(),
            preprocess: self.preprocess.clone(),
            dim: self.dim,
        }
    }
}

/// The manifest of the store at `dir`, if it has one.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let p = dir.join("manifest.json");
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::format(&p, format!("bad manifest: {e}")))
}

/// Writes `m` as the manifest of `dir` (atomically), with the current format.
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let mut m = m.clone();
    m.format = FORMAT;
    let json = serde_json::to_string_pretty(&m).map_err(|e| Error::Data(e.to_string()))?;
    crate::fsutil::write_atomic(&dir.join("manifest.json"), json.as_bytes())
}

/// The names of the files a store may hold: what `--overwrite` removes and what the manifest
/// may list.
pub const STORE_FILES: &[&str] = &[
    "features.npy",
    "logits.npy",
    "labels.npy",
    "local.npy",
    "index.npy",
    "odin.npy",
    "layers.npy",
    "head.safetensors",
];

/// The store files present in `dir`, in `STORE_FILES` order: the `files` of its manifest.
pub fn present_files(dir: &Path) -> Vec<String> {
    STORE_FILES
        .iter()
        .filter(|f| dir.join(f).exists())
        .map(|f| f.to_string())
        .collect()
}

pub struct FeatureStore {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub features: Tensor,
    pub logits: Option<Tensor>,
    pub labels: Option<Vec<usize>>,
    pub local: Option<Tensor>,
    pub head: Option<Head>,
    /// [n] ODIN scores (`extract --odin`).
    pub odin: Option<Tensor>,
    /// [n, L, D] per-block features (`extract --layers`), the blocks in `manifest.layers`.
    pub layers: Option<Tensor>,
    /// What the reader noticed and the command should say (a store without manifest, ...).
    pub notes: Vec<String>,
}

/// The linear head (and fc_norm) from a safetensors file with timm's names.
pub fn read_head(path: &Path) -> Result<Head> {
    let store = WeightStore::open(path)?;
    let (c, d) = match store.shape_of("head.weight") {
        Some(&[c, d]) => (c, d),
        Some(s) => {
            return Err(Error::Shape {
                name: "head.weight".into(),
                expected: vec![0, 0],
                got: s.to_vec(),
                file: Some(path.to_path_buf()),
            })
        }
        None => {
            return Err(Error::MissingTensor {
                name: "head.weight".into(),
                file: Some(path.to_path_buf()),
                hint: "a head file holds head.weight [C, D] and head.bias [C]".into(),
            })
        }
    };
    let weight = store.get("head.weight", &[c, d])?.into_vec();
    let bias = store.get("head.bias", &[c])?.into_vec();
    let fc_norm = if store.contains("fc_norm.weight") {
        let eps = safetensors::read_metadata(path, "fc_norm_eps")?
            .and_then(|s| s.parse().ok())
            .unwrap_or(1e-6);
        Some(FcNorm {
            weight: store.get("fc_norm.weight", &[d])?.into_vec(),
            bias: store.get("fc_norm.bias", &[d])?.into_vec(),
            eps,
        })
    } else {
        None
    };
    Ok(Head {
        weight,
        bias,
        fc_norm,
    })
}

pub fn write_head(path: &Path, head: &Head) -> Result<()> {
    let c = head.bias.len();
    let d = head.weight.len() / c.max(1);
    let raw = |name: &str, shape: Vec<usize>, v: &[f32]| RawTensor {
        name: name.into(),
        dtype: WDType::F32,
        shape,
        data: bytemuck::cast_slice(v).to_vec(),
    };
    let mut t = vec![
        raw("head.weight", vec![c, d], &head.weight),
        raw("head.bias", vec![c], &head.bias),
    ];
    let mut meta = std::collections::HashMap::new();
    if let Some(n) = &head.fc_norm {
        t.push(raw("fc_norm.weight", vec![d], &n.weight));
        t.push(raw("fc_norm.bias", vec![d], &n.bias));
        meta.insert("fc_norm_eps".to_string(), n.eps.to_string());
    }
    safetensors::write(path, &t, Some(meta))
}

/// The manifest's count, width, tokens and ODIN record against the arrays (a manifest of
/// format 2 or one that records a count; a hand-made store has nothing to check).
fn check_manifest(
    dir: &Path,
    m: &Manifest,
    features: &Tensor,
    local: Option<&Tensor>,
    has_odin: bool,
    layers: Option<&Tensor>,
) -> Result<()> {
    if m.format < 2 && m.count == 0 {
        return Ok(());
    }
    let bad = |what: String| {
        Err(Error::format(
            dir.join("manifest.json"),
            format!("{what}: the manifest does not describe these files; extract the store again"),
        ))
    };
    let (n, d) = (features.shape()[0], features.shape()[1]);
    if m.count != n {
        return bad(format!("count {} but features.npy has {n} rows", m.count));
    }
    if m.dim != d {
        return bad(format!("dim {} but features.npy is {d} wide", m.dim));
    }
    if m.format >= 2 {
        let tokens = local.map_or(0, |l| l.shape()[1]);
        if m.local_tokens != tokens {
            return bad(format!(
                "local_tokens {} but local.npy has {tokens} tokens per row",
                m.local_tokens
            ));
        }
        let blocks = layers.map_or(0, |l| l.shape()[1]);
        if m.layers.len() != blocks {
            return bad(format!(
                "layers {:?} but layers.npy has {blocks} blocks per row",
                m.layers
            ));
        }
        if let Some(l) = layers.filter(|l| l.shape()[2] != d) {
            return bad(format!(
                "layers.npy is {} wide but features.npy {d}",
                l.shape()[2]
            ));
        }
        if m.odin.is_some() != has_odin {
            return bad(format!(
                "odin {} but odin.npy is {}",
                if m.odin.is_some() {
                    "recorded"
                } else {
                    "not recorded"
                },
                if has_odin { "listed" } else { "not listed" }
            ));
        }
    }
    Ok(())
}

impl FeatureStore {
    pub fn open(dir: &Path) -> Result<FeatureStore> {
        if !dir.is_dir() {
            return Err(Error::Usage(format!(
                "{}: no such feature store directory (make one with `mood extract`)",
                dir.display()
            )));
        }
        let mut notes = Vec::new();
        // The files to read: those the manifest lists, or (no manifest, or one from before
        // format 2) those present.
        let (manifest, listed) = match read_manifest(dir)? {
            Some(m) if m.format >= 2 => {
                if !m.complete {
                    return Err(Error::Usage(format!(
                        "{}: an unfinished store (its manifest has no completion record): the \
                         `mood extract` or `mood merge` writing it stopped or is still running; \
                         run that command again to finish it",
                        dir.display()
                    )));
                }
                if let Some(f) = m.files.iter().find(|f| !dir.join(f).exists()) {
                    return Err(Error::format(
                        dir.join(f),
                        "listed in manifest.json but missing: the store is damaged; extract it again",
                    ));
                }
                let listed = m.files.clone();
                (m, Some(listed))
            }
            Some(m) => {
                notes.push(format!(
                    "{}: a manifest of format {} (an older mood) lists no files: every store file present is read",
                    dir.display(),
                    m.format
                ));
                (m, None)
            }
            None => {
                if dir.join(".partial").exists() {
                    return Err(Error::Usage(format!(
                        "{}: an unfinished extraction (chunks in .partial, no manifest): run the \
                         same `mood extract` again to finish it",
                        dir.display()
                    )));
                }
                notes.push(format!(
                    "{}: no manifest.json, so a store saved by hand: read as it is, with no provenance checks",
                    dir.display()
                ));
                (Manifest::default(), None)
            }
        };
        let optional = |name: &str| -> Option<PathBuf> {
            let p = dir.join(name);
            match &listed {
                Some(l) => l.iter().any(|f| f == name).then_some(p),
                None => p.exists().then_some(p),
            }
        };
        let fpath = dir.join("features.npy");
        if optional("features.npy").is_none() {
            return Err(Error::Usage(format!(
                "{}: no features.npy, so this is not a feature store",
                dir.display()
            )));
        }
        let features = crate::npy::map_float(&fpath)?;
        if features.shape().len() != 2 {
            return Err(Error::format(
                &fpath,
                format!("expected [rows, dim], found shape {:?}", features.shape()),
            ));
        }
        let n = features.shape()[0];
        let rows_match = |p: &Path, rows: usize| -> Result<()> {
            if rows != n {
                return Err(Error::format(
                    p,
                    format!("{rows} rows, but features.npy has {n}"),
                ));
            }
            Ok(())
        };
        let logits = match optional("logits.npy") {
            Some(p) => {
                let t = crate::npy::map_float(&p)?;
                if t.shape().len() != 2 {
                    return Err(Error::format(
                        &p,
                        format!("expected [rows, classes], found {:?}", t.shape()),
                    ));
                }
                rows_match(&p, t.shape()[0])?;
                Some(t)
            }
            None => None,
        };
        let labels = match optional("labels.npy") {
            Some(p) => {
                let raw = crate::npy::read_indices(&p)?;
                rows_match(&p, raw.len())?;
                if let Some(i) = raw.iter().position(|&l| l < 0) {
                    return Err(Error::format(&p, format!("row {i} has label {}", raw[i])));
                }
                let known = manifest.classes.len() as i64;
                if let Some(i) = raw.iter().position(|&l| known > 0 && l >= known) {
                    return Err(Error::format(
                        &p,
                        format!(
                            "row {i} has label {}, but the manifest lists {known} classes",
                            raw[i]
                        ),
                    ));
                }
                Some(raw.into_iter().map(|l| l as usize).collect())
            }
            None => None,
        };
        let local = match optional("local.npy") {
            Some(p) => {
                let t = crate::npy::map_float(&p)?;
                if t.shape().len() != 3 {
                    return Err(Error::format(
                        &p,
                        format!("expected [rows, tokens, dim], found {:?}", t.shape()),
                    ));
                }
                rows_match(&p, t.shape()[0])?;
                Some(t)
            }
            None => None,
        };
        let odin = match optional("odin.npy") {
            Some(p) => {
                let t = crate::npy::map_float(&p)?;
                if t.shape().len() != 1 {
                    return Err(Error::format(
                        &p,
                        format!("expected [rows], found {:?}", t.shape()),
                    ));
                }
                rows_match(&p, t.shape()[0])?;
                Some(t)
            }
            None => None,
        };
        let layers = match optional("layers.npy") {
            Some(p) => {
                let t = crate::npy::map_float(&p)?;
                if t.shape().len() != 3 {
                    return Err(Error::format(
                        &p,
                        format!("expected [rows, blocks, dim], found {:?}", t.shape()),
                    ));
                }
                rows_match(&p, t.shape()[0])?;
                Some(t)
            }
            None => None,
        };
        let head = optional("head.safetensors")
            .map(|p| read_head(&p))
            .transpose()?;
        check_manifest(
            dir,
            &manifest,
            &features,
            local.as_ref(),
            odin.is_some(),
            layers.as_ref(),
        )?;
        Ok(FeatureStore {
            dir: dir.to_path_buf(),
            manifest,
            features,
            logits,
            labels,
            local,
            head,
            odin,
            layers,
            notes,
        })
    }

    pub fn rows(&self) -> usize {
        self.features.shape()[0]
    }

    pub fn dim(&self) -> usize {
        self.features.shape()[1]
    }

    /// The store as detector inputs; `head` (e.g. from `--head`) replaces the store's own.
    pub fn inputs<'a>(&'a self, head: Option<&'a Head>) -> Inputs<'a> {
        Inputs {
            features: Some(Matrix {
                data: self.features.as_slice(),
                cols: self.dim(),
            }),
            logits: self.logits.as_ref().map(|t| Matrix {
                data: t.as_slice(),
                cols: t.shape()[1],
            }),
            labels: self.labels.as_deref(),
            local: self.local.as_ref().map(|t| Matrix {
                data: t.as_slice(),
                cols: t.shape()[1] * t.shape()[2],
            }),
            local_tokens: self.local.as_ref().map_or(0, |t| t.shape()[1]),
            head: head.or(self.head.as_ref()),
            odin: self.odin.as_ref().map(|t| t.as_slice()),
            layers: self.layers.as_ref().map(|t| Matrix {
                data: t.as_slice(),
                cols: t.shape()[1] * t.shape()[2],
            }),
            layer_blocks: &self.manifest.layers,
        }
    }
}

/// What `write` puts in a store directory.
pub struct Contents<'a> {
    pub features: &'a Tensor,
    pub logits: Option<&'a Tensor>,
    pub labels: Option<&'a [usize]>,
    pub local: Option<&'a Tensor>,
    pub head: Option<&'a Head>,
    /// [n] ODIN scores and the (temperature, epsilon) that made them.
    pub odin: Option<(&'a [f32], (f32, f32))>,
    pub manifest: Manifest,
}

/// Writes a whole store (each file atomically; the manifest first without, and last with its
/// completion record).
pub fn write(dir: &Path, c: Contents) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut m = c.manifest;
    m.complete = false;
    write_manifest(dir, &m)?;
    // Files of an earlier store here would otherwise sit beside the new ones.
    for f in STORE_FILES {
        let p = dir.join(f);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    let npy =
        |name: &str, t: &Tensor| crate::npy::write_f32(&dir.join(name), t.shape(), t.as_slice());
    npy("features.npy", c.features)?;
    if let Some(t) = c.logits {
        npy("logits.npy", t)?;
    }
    if let Some(l) = c.labels {
        let v: Vec<i64> = l.iter().map(|&x| x as i64).collect();
        crate::npy::write_i64(&dir.join("labels.npy"), &v)?;
    }
    if let Some(t) = c.local {
        npy("local.npy", t)?;
    }
    if let Some(h) = c.head {
        write_head(&dir.join("head.safetensors"), h)?;
    }
    if let Some((scores, params)) = c.odin {
        crate::npy::write_f32(&dir.join("odin.npy"), &[scores.len()], scores)?;
        m.odin = Some(params);
    }
    m.dtype = "f32".into();
    m.count = c.features.shape()[0];
    m.dim = c.features.shape()[1];
    m.local_tokens = c.local.map_or(0, |t| t.shape()[1]);
    m.files = present_files(dir);
    m.complete = true;
    write_manifest(dir, &m)
}
