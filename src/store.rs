//! A feature store: one directory per data split, as `mood extract` writes it and `mood fit /
//! score / eval` read it. numpy reads every file directly.
//!
//! ```text
//! features.npy     [n, D] float32 or float16, memory-mapped on read (f16 is converted)
//! logits.npy       [n, C] optional
//! labels.npy       [n] integer, optional (class index per row)
//! local.npy        [n, T, D] optional patch-token features (for `csd`)
//! head.safetensors optional: head.weight [C, D], head.bias [C], fc_norm.weight/.bias [D]
//! manifest.json    model, weights hash, preprocessing, count, sources, skipped files
//! ```
//!
//! Every file is written under a temporary name and renamed, the manifest last, so a directory
//! with a manifest is complete. A directory without one (features saved by hand with numpy) is
//! read as well.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ood::csd::FcNorm;
use crate::ood::detector::{Head, Inputs, Matrix};
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
    /// (temperature, epsilon) of odin.npy, when the extraction computed ODIN scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub odin: Option<(f32, f32)>,
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
}

fn optional(dir: &Path, name: &str) -> Option<PathBuf> {
    let p = dir.join(name);
    p.exists().then_some(p)
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

impl FeatureStore {
    pub fn open(dir: &Path) -> Result<FeatureStore> {
        if !dir.is_dir() {
            return Err(Error::Usage(format!(
                "{}: no such feature store directory (make one with `mood extract`)",
                dir.display()
            )));
        }
        let manifest = match optional(dir, "manifest.json") {
            Some(p) => {
                let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                serde_json::from_str(&text)
                    .map_err(|e| Error::format(&p, format!("bad manifest: {e}")))?
            }
            None => Manifest::default(),
        };
        let fpath = dir.join("features.npy");
        if !fpath.exists() {
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
        let logits = match optional(dir, "logits.npy") {
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
        let labels = match optional(dir, "labels.npy") {
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
        let local = match optional(dir, "local.npy") {
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
        let odin = match optional(dir, "odin.npy") {
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
        let head = optional(dir, "head.safetensors")
            .map(|p| read_head(&p))
            .transpose()?;
        Ok(FeatureStore {
            dir: dir.to_path_buf(),
            manifest,
            features,
            logits,
            labels,
            local,
            head,
            odin,
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

/// Writes a whole store (each file atomically, the manifest last).
pub fn write(dir: &Path, c: Contents) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
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
    let mut m = c.manifest;
    if let Some((scores, params)) = c.odin {
        crate::npy::write_f32(&dir.join("odin.npy"), &[scores.len()], scores)?;
        m.odin = Some(params);
    }
    m.format = 1;
    m.dtype = "f32".into();
    m.count = c.features.shape()[0];
    m.dim = c.features.shape()[1];
    m.local_tokens = c.local.map_or(0, |t| t.shape()[1]);
    let json = serde_json::to_string_pretty(&m).map_err(|e| Error::Data(e.to_string()))?;
    crate::fsutil::write_atomic(&dir.join("manifest.json"), json.as_bytes())
}
