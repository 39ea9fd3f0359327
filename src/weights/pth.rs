//! PyTorch zip checkpoints (`torch.save` since 1.6): `<dir>/data.pkl` describes the object with
//! tensors as views into raw little-endian storages `<dir>/data/<key>`. The pickle is read by the
//! restricted reader in `pickle.rs` (nothing is executed); the state dict is the top-level dict or
//! the one under "model", "module" or "state_dict" (official BEiT / MOOD / DeepSpeed files).

use std::io::{Read, Seek, SeekFrom};
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
    read_from(path, file)
}

/// [`read`] of a checkpoint from any seekable reader; `path` only names it in errors.
pub fn read_from<R: Read + Seek>(path: &Path, mut file: R) -> Result<Vec<RawTensor>> {
    // Every size an entry declares is checked against this before anything is allocated.
    let archive_len = file
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(path, e))?;
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
    let read_entry = |zip: &mut zip::ZipArchive<R>, name: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .map_err(|e| Error::format(path, format!("missing `{name}` in the archive: {e}")))?;
        // torch.save stores entries uncompressed, so an entry holds at most the archive's bytes; a
        // compressed one is allowed what deflate can reach on float data and no more.
        let limit = match f.compression() {
            zip::CompressionMethod::Stored => archive_len,
            _ => archive_len.saturating_mul(4),
        };
        if f.size() > limit {
            return Err(Error::format(
                path,
                format!(
                    "`{name}` declares {} bytes, more than the {archive_len}-byte archive can hold",
                    f.size()
                ),
            ));
        }
        let size = f.size();
        let mut buf = Vec::with_capacity(size as usize);
        // Reads one byte past the declared size, so an entry that inflates beyond it is caught
        // without inflating all of it.
        f.by_ref()
            .take(size.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|e| Error::format(path, format!("reading `{name}` (truncated file?): {e}")))?;
        if buf.len() as u64 != size {
            return Err(Error::format(
                path,
                format!(
                    "`{name}` holds {} bytes, not its declared {size}",
                    buf.len()
                ),
            ));
        }
        Ok(buf)
    };
    let data = read_entry(&mut zip, &pkl)?;
    let root = pickle::load(&data)
        .map_err(|e| Error::format(path, format!("data.pkl at byte {}: {}", e.offset, e.msg)))?;
    let dict = state_dict(root)
        .ok_or_else(|| Error::format(path, "no dict of tensors found in the checkpoint"))?;
    let mut storages: std::collections::HashMap<String, Vec<u8>> = std::collections::HashMap::new();
    let mut out = Vec::new();
    // Views may share a storage (tied weights), but many views of one storage must not multiply
    // a small archive into a large allocation: all of them together get a few archive lengths.
    let mut gathered = 0u64;
    let gather_limit = archive_len.saturating_mul(4);
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
        let data = gather(storage, &t, dtype.size())
            .map_err(|why| Error::format(path, format!("tensor `{key}` {why}")))?;
        gathered = gathered.saturating_add(data.len() as u64);
        if gathered > gather_limit {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{key}`: the views add up to more than {gather_limit} bytes, four times the archive"
                ),
            ));
        }
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

/// Contiguous row-major bytes of a strided view; why not if the view leaves the storage or names
/// more elements than the storage holds (a stride-0 view of one value could otherwise ask for
/// terabytes). All arithmetic on the file's numbers is checked.
fn gather(storage: &[u8], t: &TensorRef, elt: usize) -> Result<Vec<u8>, String> {
    if t.size.len() != t.stride.len() {
        return Err(format!(
            "has {} sizes but {} strides",
            t.size.len(),
            t.stride.len()
        ));
    }
    let have = storage.len() / elt;
    let numel = t.size.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
    let numel = match numel {
        Some(0) => return Ok(Vec::new()),
        Some(n) if n <= have => n,
        _ => {
            return Err(format!(
                "of size {:?} has more elements than its storage's {have}",
                t.size
            ))
        }
    };
    let last = t
        .size
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (s, st)| {
            a.checked_add((s - 1).checked_mul(*st)?)
        });
    if last.is_none_or(|l| l >= have) {
        return Err("reaches past the end of its storage".into());
    }
    // Every index below is at most `last`, so nothing from here on can overflow.
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
        return Ok(storage[t.offset * elt..(t.offset + numel) * elt].to_vec());
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
    Ok(out)
}
