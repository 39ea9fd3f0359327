//! The fitted statistics of a detector as named f32 tensors, saved as one safetensors file with a
//! JSON header (`mood_detector`: method, settings, feature width) so `mood score` can rebuild the
//! detector without the train set.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::{Error, Result};
use crate::weights::{safetensors, RawTensor, WDType, WeightStore};

#[derive(Default)]
pub struct Stats {
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// What a detector file says about itself.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Header {
    pub method: String,
    /// Every setting, defaults included, as the user would write it after `--method-arg`.
    pub args: BTreeMap<String, String>,
    /// Feature width the detector was fitted on (0 when it only reads logits).
    pub dim: usize,
    pub mood_version: String,
}

impl Stats {
    pub fn put(&mut self, name: &str, shape: &[usize], data: &[f32]) {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        self.tensors
            .insert(name.to_string(), (shape.to_vec(), data.to_vec()));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, which must have `rank` dimensions.
    pub fn get(&self, name: &str, rank: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let (shape, data) = self.tensors.get(name).ok_or_else(|| {
            Error::Data(format!(
                "detector file has no tensor `{name}`: was it written by another method or version?"
            ))
        })?;
        if shape.len() != rank {
            return Err(Error::Data(format!(
                "detector tensor `{name}` has shape {shape:?}, expected {rank} dimensions"
            )));
        }
        Ok((shape.clone(), data.clone()))
    }

    /// The one value of tensor `name` (a setting such as `react.clip`): a file may hold any
    /// shape under that name, so emptiness and extra values are refused here, not indexed into.
    pub fn scalar(&self, name: &str) -> Result<f32> {
        let (shape, data) = self.get(name, 1)?;
        match data[..] {
            [v] => Ok(v),
            _ => Err(Error::Data(format!(
                "detector tensor `{name}` has shape {shape:?}, expected one value"
            ))),
        }
    }

    /// The matrix `name`: [rows, cols] with at least one row and exactly `cols` columns (the
    /// width the detector's header promises), as (rows, data).
    pub fn matrix(&self, name: &str, cols: usize) -> Result<(usize, Vec<f32>)> {
        let (shape, data) = self.get(name, 2)?;
        if shape[0] == 0 || shape[1] != cols || cols == 0 {
            return Err(Error::Data(format!(
                "detector tensor `{name}` has shape {shape:?}, expected [rows >= 1, {cols}]"
            )));
        }
        Ok((shape[0], data))
    }

    pub fn save(&self, path: &Path, header: &Header) -> Result<()> {
        // Every file holds at least this tensor: a safetensors file without tensors is too short
        // for the weights reader to recognise, and it marks the layout version.
        let version = (vec![1], vec![1.0f32]);
        let tensors: Vec<RawTensor> = self
            .tensors
            .iter()
            .chain(std::iter::once((&"detector_format".to_string(), &version)))
            .map(|(name, (shape, data))| RawTensor {
                name: name.clone(),
                dtype: WDType::F32,
                shape: shape.clone(),
                data: bytemuck::cast_slice(data).to_vec(),
            })
            .collect();
        let meta = HashMap::from([(
            "mood_detector".to_string(),
            serde_json::to_string(header).map_err(|e| Error::Data(e.to_string()))?,
        )]);
        safetensors::write(path, &tensors, Some(meta))
    }

    pub fn load(path: &Path) -> Result<(Stats, Header)> {
        let header = safetensors::read_metadata(path, "mood_detector")?.ok_or_else(|| {
            Error::format(
                path,
                "not a detector file (no `mood_detector` header); make one with `mood fit`",
            )
        })?;
        let header: Header = serde_json::from_str(&header)
            .map_err(|e| Error::format(path, format!("bad mood_detector header: {e}")))?;
        let store = WeightStore::open(path)?;
        let mut stats = Stats::default();
        for name in store.names() {
            let shape = store.shape_of(name).unwrap_or(&[]).to_vec();
            let t = store.get(name, &shape)?;
            stats
                .tensors
                .insert(name.clone(), (shape, t.as_slice().to_vec()));
        }
        Ok((stats, header))
    }
}
