//! safetensors through memmap2: the header is parsed and validated by the `safetensors` crate, the
//! data stays in the page cache and tensors point into it. Writing goes to a temporary name in the
//! same directory, then a rename, so an interrupted write never leaves a file under the final name.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::{Bytes, Entry, RawTensor, WDType};
use crate::error::{Error, Result};

fn wdtype(d: Dtype) -> Option<WDType> {
    Some(match d {
        Dtype::F32 => WDType::F32,
        Dtype::F16 => WDType::F16,
        Dtype::BF16 => WDType::BF16,
        Dtype::F64 => WDType::F64,
        Dtype::I64 => WDType::I64,
        Dtype::I32 => WDType::I32,
        Dtype::I16 => WDType::I16,
        Dtype::I8 => WDType::I8,
        Dtype::U8 => WDType::U8,
        Dtype::BOOL => WDType::Bool,
        _ => return None,
    })
}

fn st_dtype(d: WDType) -> Dtype {
    match d {
        WDType::F32 => Dtype::F32,
        WDType::F16 => Dtype::F16,
        WDType::BF16 => Dtype::BF16,
        WDType::F64 => Dtype::F64,
        WDType::I64 => Dtype::I64,
        WDType::I32 => Dtype::I32,
        WDType::I16 => Dtype::I16,
        WDType::I8 => Dtype::I8,
        WDType::U8 => Dtype::U8,
        WDType::Bool => Dtype::BOOL,
    }
}

/// A mapped file and its tensors (byte ranges into the map).
pub type Mapped = (Arc<Mmap>, Vec<(String, Entry)>);

/// Maps `path` and lists its tensors.
pub fn open(path: &Path) -> Result<Mapped> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; like every mmap user we rely on the file not being truncated by
    // another process while we run.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let map = Arc::new(map);
    let base = map.as_ptr() as usize;
    let st = SafeTensors::deserialize(&map).map_err(|e| {
        Error::format(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = wdtype(view.dtype()).ok_or_else(|| {
            Error::format(
                path,
                format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let data = view.data();
        out.push((
            name,
            Entry {
                dtype,
                shape: view.shape().to_vec(),
                bytes: Bytes::Mapped {
                    offset: data.as_ptr() as usize - base,
                    len: data.len(),
                },
            },
        ));
    }
    Ok((map.clone(), out))
}

/// Lists the tensors of safetensors bytes in memory, copying each one out.
pub fn parse_bytes(name: &str, bytes: &[u8]) -> Result<Vec<(String, Entry)>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(name, format!("not a valid safetensors file: {e}")))?;
    st.tensors()
        .into_iter()
        .map(|(k, view)| {
            let dtype = wdtype(view.dtype()).ok_or_else(|| {
                Error::format(
                    name,
                    format!("tensor `{k}` has unsupported dtype {:?}", view.dtype()),
                )
            })?;
            let entry = Entry {
                dtype,
                shape: view.shape().to_vec(),
                bytes: Bytes::Owned(Arc::new(view.data().to_vec())),
            };
            Ok((k, entry))
        })
        .collect()
}

/// Writes tensors (with optional string metadata) to `path` atomically.
pub fn write(
    path: &Path,
    tensors: &[RawTensor],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let v =
                safetensors::tensor::TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.data)
                    .map_err(|e| Error::Data(format!("tensor `{}`: {e}", t.name)))?;
            Ok((t.name.clone(), v))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::Data(format!("serialising {}: {e}", path.display())))?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// The string under `key` in a safetensors file's `__metadata__`, reading only the header.
pub fn read_metadata(path: &Path, key: &str) -> Result<Option<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| Error::format(path, "not a valid safetensors file (truncated?)"))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(Error::format(path, "safetensors header larger than 100 MB"));
    }
    // The header must fit in the file before a buffer of its announced size is made.
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if n > file_len.saturating_sub(8) {
        return Err(Error::format(
            path,
            format!("truncated: a {n}-byte safetensors header in a {file_len}-byte file"),
        ));
    }
    let n = n as usize;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header)
        .map_err(|_| Error::format(path, "not a valid safetensors file (truncated?)"))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::format(path, format!("bad safetensors header: {e}")))?;
    Ok(json
        .get("__metadata__")
        .and_then(|m| m.get(key))
        .and_then(|p| p.as_str())
        .map(str::to_string))
}
