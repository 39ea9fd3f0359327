//! PyTorch zip checkpoints (`torch.save` since 1.6): `<dir>/data.pkl` describes the object with
//! tensors as views into raw little-endian storages `<dir>/data/<key>`. The pickle is read by the
//! restricted reader in `pickle.rs` (nothing is executed); the state dict is the top-level dict or
//! the one under "model", "module" or "state_dict" (official BEiT / MOOD / DeepSpeed files).

use std::io::Read;
use std::path::Path;

use super::pickle::{self, TensorRef, Value};
use super::{RawTensor, WDType};
use crate::error::{Error, Result};

fn dtype_of(storage_type: &str) -> Option<WDType> {
    Some(match storage_type {
        "FloatStorage" => WDType::F32,
        "HalfStorage" => WDType::F16,
        "BFloat16Storage" => WDType::BF16,
        "DoubleStorage" => WDType::F64,
        "LongStorage" => WDType::I64,
        "IntStorage" => WDType::I32,
        "ShortStorage" => WDType::I16,
        "CharStorage" => WDType::I8,
        "ByteStorage" => WDType::U8,
        "BoolStorage" => WDType::Bool,
        _ => return None,
    })
}

/// Reads every tensor of the state dict in a PyTorch zip checkpoint.
pub fn read(path: &Path) -> Result<Vec<RawTensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        Error::format(
            path,
            format!("not a readable PyTorch zip checkpoint (truncated?): {e}"),
        )
    })?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    if names
        .iter()
        .any(|n| n.ends_with("/constants.pkl") || n.contains("/code/"))
    {
        return Err(Error::format(
            path,
            "a TorchScript archive, not a state dict: save `model.state_dict()` with torch.save",
        ));
    }
    let Some(pkl) = names
        .iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .cloned()
    else {
        return Err(Error::format(
            path,
            "no data.pkl inside: not a torch.save checkpoint",
        ));
    };
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let read_entry = |zip: &mut zip::ZipArchive<std::fs::File>, name: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .map_err(|e| Error::format(path, format!("missing `{name}` in the archive: {e}")))?;
        let mut buf = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| Error::format(path, format!("reading `{name}` (truncated file?): {e}")))?;
        Ok(buf)
    };
    let data = read_entry(&mut zip, &pkl)?;
    let root = pickle::load(&data)
        .map_err(|e| Error::format(path, format!("data.pkl at byte {}: {}", e.offset, e.msg)))?;
    let dict = state_dict(root)
        .ok_or_else(|| Error::format(path, "no dict of tensors found in the checkpoint"))?;
    let mut storages: std::collections::HashMap<String, Vec<u8>> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for (key, t) in dict {
        let dtype = dtype_of(&t.storage_type).ok_or_else(|| {
            Error::format(
                path,
                format!("tensor `{key}` has unsupported storage {}", t.storage_type),
            )
        })?;
        if !storages.contains_key(&t.storage_key) {
            let bytes = read_entry(&mut zip, &format!("{prefix}data/{}", t.storage_key))?;
            storages.insert(t.storage_key.clone(), bytes);
        }
        let storage = &storages[&t.storage_key];
        let data = gather(storage, &t, dtype.size()).ok_or_else(|| {
            Error::format(
                path,
                format!("tensor `{key}` reaches past the end of its storage"),
            )
        })?;
        out.push(RawTensor {
            name: key,
            dtype,
            shape: t.size.clone(),
            data,
        });
    }
    Ok(out)
}

/// The state dict: the top-level dict, or its "model"/"module"/"state_dict" entry when that holds
/// tensors. Entries that are not tensors (epochs, args, optimizer state) are skipped.
fn state_dict(root: Value) -> Option<Vec<(String, TensorRef)>> {
    let Value::Dict(top) = root else { return None };
    let tensors = |d: &[(Value, Value)]| -> Vec<(String, TensorRef)> {
        d.iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
                _ => None,
            })
            .collect()
    };
    for wrapper in ["model", "module", "state_dict"] {
        let inner = top.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Dict(d)) if k == wrapper => Some(d),
            _ => None,
        });
        if let Some(d) = inner {
            let t = tensors(d);
            if !t.is_empty() {
                return Some(t);
            }
        }
    }
    let t = tensors(&top);
    (!t.is_empty()).then_some(t)
}

/// Contiguous row-major bytes of a strided view; None if the view leaves the storage.
fn gather(storage: &[u8], t: &TensorRef, elt: usize) -> Option<Vec<u8>> {
    if t.size.len() != t.stride.len() {
        return None;
    }
    let numel: usize = t.size.iter().product();
    if numel == 0 {
        return Some(Vec::new());
    }
    let last = t.offset
        + t.size
            .iter()
            .zip(&t.stride)
            .map(|(s, st)| (s - 1) * st)
            .sum::<usize>();
    if (last + 1) * elt > storage.len() {
        return None;
    }
    let contiguous = {
        let mut expect = 1;
        let mut ok = true;
        for (s, st) in t.size.iter().zip(&t.stride).rev() {
            if *s > 1 && *st != expect {
                ok = false;
            }
            expect *= s;
        }
        ok
    };
    if contiguous {
        return Some(storage[t.offset * elt..(t.offset + numel) * elt].to_vec());
    }
    let mut out = Vec::with_capacity(numel * elt);
    let mut idx = vec![0usize; t.size.len()];
    for _ in 0..numel {
        let e = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&storage[e * elt..(e + 1) * elt]);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Some(out)
}
