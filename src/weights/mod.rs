//! Weights: named tensors from a safetensors file (memory-mapped, zero-copy for aligned f32), a
//! PyTorch .pth (restricted reader, no code execution) or a numpy .npz (Google's BiT checkpoints),
//! looked up by the checkpoint's own names.
//!
//! Names are normalised once on open (`keymap`): wrapper prefixes such as `module.` are stripped and
//! mmpretrain names are mapped onto timm's, so model code only ever asks for timm names.

pub mod keymap;
pub mod npz;
pub mod pickle;
pub mod pth;
pub mod safetensors;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Element types found in checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl WDType {
    pub fn size(self) -> usize {
        match self {
            WDType::F64 | WDType::I64 => 8,
            WDType::F32 | WDType::I32 => 4,
            WDType::F16 | WDType::BF16 | WDType::I16 => 2,
            WDType::I8 | WDType::U8 | WDType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, WDType::F32 | WDType::F16 | WDType::BF16 | WDType::F64)
    }
}

/// Where a tensor's little-endian, contiguous bytes are.
#[derive(Clone)]
pub enum Bytes {
    /// `len` bytes at `offset` of the store's mapped file.
    Mapped {
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<u8>>),
    /// An in-memory f32 tensor (random init, training state), handed out without a copy.
    Tensor(Tensor),
}

#[derive(Clone)]
pub struct Entry {
    pub dtype: WDType,
    pub shape: Vec<usize>,
    pub bytes: Bytes,
}

/// A raw tensor read from a file, before any dtype conversion (what `convert` writes back out).
pub struct RawTensor {
    pub name: String,
    pub dtype: WDType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Named tensors of one checkpoint file, with the names normalised to timm's.
pub struct WeightStore {
    path: PathBuf,
    map: Option<Arc<Mmap>>,
    entries: BTreeMap<String, Entry>,
    used: Mutex<BTreeSet<String>>,
}

impl WeightStore {
    /// Opens a .safetensors (mapped) or a PyTorch zip .pth/.pt/.bin checkpoint, chosen by content.
    pub fn open(path: &Path) -> Result<WeightStore> {
        let mut head = [0u8; 9];
        let n = {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            f.read(&mut head).map_err(|e| Error::io(path, e))?
        };
        if n < 4 {
            return Err(Error::format(path, "file too short to be a weights file"));
        }
        // safetensors: a little-endian u64 header length, then the JSON header. Its first byte
        // can be 0x80 like a pickle's, so the JSON brace decides.
        let safetensors_like = n == 9 && head[8] == b'{';
        if !safetensors_like && head[0] == 0x80 && head[1] <= 5 {
            return Err(Error::format(
                path,
                "a legacy (pre-1.6, non-zip) PyTorch file: re-save it with a current torch, e.g. torch.save(torch.load(f), g)",
            ));
        }
        let (map, raw) = if &head[..4] == b"PK\x03\x04" {
            let tensors = if npz::is_npz(path) {
                npz::read(path)?
            } else {
                pth::read(path)?
            };
            let entries = tensors
                .into_iter()
                .map(|t| {
                    (
                        t.name,
                        Entry {
                            dtype: t.dtype,
                            shape: t.shape,
                            bytes: Bytes::Owned(Arc::new(t.data)),
                        },
                    )
                })
                .collect::<Vec<_>>();
            (None, entries)
        } else {
            let (map, entries) = safetensors::open(path)?;
            (Some(map), entries)
        };
        let entries = npz::from_big_transfer(keymap::normalise(raw));
        Ok(WeightStore {
            path: path.to_path_buf(),
            map,
            entries,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// Parses safetensors bytes held in memory (e.g. the demo's embedded model); tensors are copied.
    pub fn from_safetensors_bytes(name: &str, bytes: &[u8]) -> Result<WeightStore> {
        let entries = safetensors::parse_bytes(name, bytes)?;
        Ok(WeightStore {
            path: PathBuf::from(name),
            map: None,
            entries: keymap::normalise(entries),
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// Builds a store over in-memory f32 tensors (random init, training state); no copies.
    pub fn from_tensors(name: &str, tensors: Vec<(String, Tensor)>) -> WeightStore {
        let entries = tensors
            .into_iter()
            .map(|(k, t)| {
                (
                    k,
                    Entry {
                        dtype: WDType::F32,
                        shape: t.shape().to_vec(),
                        bytes: Bytes::Tensor(t),
                    },
                )
            })
            .collect();
        WeightStore {
            path: PathBuf::from(name),
            map: None,
            entries,
            used: Mutex::new(BTreeSet::new()),
        }
    }

    /// A store over a name → tensor map (training state); no copies.
    pub fn from_params(name: &str, params: &BTreeMap<String, Tensor>) -> WeightStore {
        WeightStore::from_tensors(
            name,
            params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        )
    }

    /// Every float tensor by name, as f32 (views where the file allows); integer buffers such as a
    /// stored relative_position_index are skipped.
    pub fn float_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.entries
            .iter()
            .filter(|(_, e)| e.dtype.is_float())
            .map(|(k, e)| Ok((k.clone(), self.get(k, &e.shape)?)))
            .collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    fn bytes<'a>(&'a self, e: &'a Entry) -> &'a [u8] {
        match &e.bytes {
            Bytes::Mapped { offset, len } => {
                let map = self.map.as_ref().expect("mapped entry without a map");
                &map[*offset..*offset + *len]
            }
            Bytes::Owned(v) => v.as_slice(),
            Bytes::Tensor(t) => bytemuck::cast_slice(t.as_slice()),
        }
    }

    /// The tensor `name` as f32 with exactly `shape`; zero-copy when stored as aligned f32.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: Some(self.path.clone()),
            hint: String::new(),
        })?;
        if e.shape != shape {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: e.shape.clone(),
                file: Some(self.path.clone()),
            });
        }
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        if let Bytes::Tensor(t) = &e.bytes {
            return Ok(t.clone());
        }
        if let (WDType::F32, Bytes::Mapped { offset, .. }, Some(map)) =
            (e.dtype, &e.bytes, &self.map)
        {
            if offset % 4 == 0 {
                return Ok(Tensor::mapped(shape, map.clone(), *offset));
            }
        }
        let data = to_f32(self.bytes(e), e.dtype).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("tensor `{name}` has dtype {:?}, not a float type", e.dtype),
            )
        })?;
        Tensor::from_vec(shape, data)
    }

    /// The shape of `name`, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Integer tensor `name` as i64 values (e.g. a stored relative_position_index).
    pub fn get_i64(&self, name: &str) -> Option<Vec<i64>> {
        let e = self.entries.get(name)?;
        let b = self.bytes(e);
        Some(match e.dtype {
            WDType::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            WDType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            _ => return None,
        })
    }

    /// Names present in the file that no `get` asked for, minus those ignored on purpose.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        self.entries
            .keys()
            .filter(|k| !used.contains(*k) && !keymap::is_ignored(k))
            .cloned()
            .collect()
    }

    /// One tensor as raw bytes (a copy), for writing back out (`mood export`).
    pub fn raw_tensor(&self, name: &str) -> Option<RawTensor> {
        self.entries.get(name).map(|e| RawTensor {
            name: name.to_string(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: self.bytes(e).to_vec(),
        })
    }

    /// Every tensor as raw bytes, for writing back out (`mood convert`).
    pub fn raw_tensors(&self) -> Vec<RawTensor> {
        self.entries
            .iter()
            .map(|(k, e)| RawTensor {
                name: k.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
                data: self.bytes(e).to_vec(),
            })
            .collect()
    }
}

/// Little-endian bytes of a float dtype → f32 values; None for integer dtypes.
pub fn to_f32(bytes: &[u8], dtype: WDType) -> Option<Vec<f32>> {
    Some(match dtype {
        WDType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        WDType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        WDType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        WDType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        _ => return None,
    })
}
