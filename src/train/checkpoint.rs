//! Training checkpoints as one safetensors file: the parameters under the checkpoint's own names
//! (so `mood forward --weights` and timm read it directly), the AdamW moments under `optim.m.*` /
//! `optim.v.*`, and a JSON header with the progress and settings. Written atomically (temporary
//! name, then rename): an interrupted save leaves the previous checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::train::optim::AdamW;
use crate::weights::{safetensors, RawTensor, WDType, WeightStore};

/// Progress saved with a checkpoint.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub arch: String,
    /// "pretrain" or "finetune"
    pub stage: String,
    pub epoch: usize,
    pub step: usize,
    pub optimizer_step: u32,
    /// The command's settings, for the record and to detect a resume with other settings.
    pub settings: serde_json::Value,
}

fn raw(name: String, t: &Tensor) -> RawTensor {
    RawTensor {
        name,
        dtype: WDType::F32,
        shape: t.shape().to_vec(),
        data: bytemuck::cast_slice(t.as_slice()).to_vec(),
    }
}

pub fn save(
    path: &Path,
    params: &BTreeMap<String, Tensor>,
    opt: &AdamW,
    progress: &Progress,
) -> Result<()> {
    let mut tensors: Vec<RawTensor> = params.iter().map(|(k, t)| raw(k.clone(), t)).collect();
    let (m, v) = opt.moments();
    for (prefix, map) in [("optim.m.", m), ("optim.v.", v)] {
        for (k, vals) in map {
            let shape = params
                .get(k)
                .map(|t| t.shape().to_vec())
                .unwrap_or_else(|| vec![vals.len()]);
            tensors.push(RawTensor {
                name: format!("{prefix}{k}"),
                dtype: WDType::F32,
                shape,
                data: bytemuck::cast_slice(vals).to_vec(),
            });
        }
    }
    let meta = HashMap::from([(
        "mood_progress".to_string(),
        serde_json::to_string(progress).map_err(|e| Error::Data(e.to_string()))?,
    )]);
    safetensors::write(path, &tensors, Some(meta))
}

/// Parameters, optimizer moments and progress of a checkpoint written by `save`.
pub struct Loaded {
    pub params: BTreeMap<String, Tensor>,
    pub m: HashMap<String, Vec<f32>>,
    pub v: HashMap<String, Vec<f32>>,
    pub progress: Option<Progress>,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let store = WeightStore::open(path)?;
    let mut out = Loaded {
        params: BTreeMap::new(),
        m: HashMap::new(),
        v: HashMap::new(),
        progress: None,
    };
    for name in store.names() {
        let shape = store.shape_of(name).expect("listed").to_vec();
        let t = store.get(name, &shape)?;
        if let Some(k) = name.strip_prefix("optim.m.") {
            out.m.insert(k.to_string(), t.as_slice().to_vec());
        } else if let Some(k) = name.strip_prefix("optim.v.") {
            out.v.insert(k.to_string(), t.as_slice().to_vec());
        } else {
            // An owned copy: training updates it in place, the file stays as it is.
            out.params.insert(
                name.clone(),
                Tensor::from_vec(&shape, t.as_slice().to_vec())?,
            );
        }
    }
    out.progress = read_progress(path)?;
    Ok(out)
}

/// The `mood_progress` header of a safetensors file, if it has one.
pub fn read_progress(path: &Path) -> Result<Option<Progress>> {
    match safetensors::read_metadata(path, "mood_progress")? {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::format(path, format!("bad mood_progress: {e}"))),
    }
}

/// A settings record's fields under dotted names, `{"schedule": {"lr": 1}}` as
/// `{"schedule.lr": 1}`, descending only into the top-level objects named in `descend` (the
/// others, and arrays, are compared whole).
pub fn flatten_settings(
    v: &serde_json::Value,
    descend: &[&str],
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    if let serde_json::Value::Object(top) = v {
        for (k, x) in top {
            match x {
                serde_json::Value::Object(m) if descend.contains(&k.as_str()) => {
                    for (kk, y) in m {
                        out.insert(format!("{k}.{kk}"), y.clone());
                    }
                }
                _ => {
                    out.insert(k.clone(), x.clone());
                }
            }
        }
    }
    out
}

/// The settings of a checkpoint (`old`) that this run (`new`, both flattened) changes, one
/// "--flag (the checkpoint: x, this run: y)" each, named by `flags`; a setting the checkpoint did
/// not record (an older checkpoint) is not compared, nor those in `skip`.
pub fn settings_differences(
    old: serde_json::Map<String, serde_json::Value>,
    mut new: serde_json::Map<String, serde_json::Value>,
    flags: &[(&str, &str)],
    skip: &[&str],
) -> Vec<String> {
    new.retain(|k, _| old.contains_key(k));
    crate::store::differences(
        &serde_json::Value::Object(old),
        &serde_json::Value::Object(new),
        flags,
        ("the checkpoint", "this run"),
        skip,
    )
}
