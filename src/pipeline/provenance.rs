//! What `mood fit`, `mood score` and `mood eval` check before they compute: the stores they read
//! together come from one model, weights and preprocessing (or `--allow-mismatch` says to go on,
//! and the report records it), and what the reader noticed about a store is said once.

use std::path::Path;

use crate::error::{Error, Result};
use crate::store::{FeatureStore, Provenance};
use crate::weights::safetensors;

/// The metadata key of a detector file that holds the train store's provenance.
const KEY: &str = "mood_provenance";

/// Prints the reader's notes about `store` (none with `--quiet`).
pub fn say_notes(store: &FeatureStore) {
    if crate::progress::quiet() {
        return;
    }
    for n in &store.notes {
        eprintln!("note: {n}");
    }
}

/// Refuses (or, with `allow`, returns as a note) a mismatch between the provenance of `a` and
/// `b`, each named by its option and directory.
pub fn compare(
    a: &Provenance,
    a_name: &str,
    b: &Provenance,
    b_name: &str,
    allow: bool,
) -> Result<Option<String>> {
    // A store saved by hand records nothing to compare (its reader said so in a note).
    if !a.is_known() || !b.is_known() {
        return Ok(None);
    }
    let Some(what) = a.mismatch(b, a_name, b_name) else {
        return Ok(None);
    };
    let line = format!("{b_name} does not match {a_name}: {what}");
    if allow {
        if !crate::progress::quiet() {
            eprintln!("warning: {line} (--allow-mismatch)");
        }
        return Ok(Some(line));
    }
    Err(Error::Data(format!(
        "{line}: scores of features from another model, weights or preprocessing are not comparable; \
         extract both with the same model, or add --allow-mismatch to go on anyway"
    )))
}

/// Adds `prov` to the detector file at `path` (a `__metadata__` entry of its safetensors
/// header), streaming the tensors, so that `mood score` can compare it with the stores it scores.
pub fn stamp_detector(path: &Path, prov: &Provenance) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len) as usize;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let mut json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::format(path, format!("bad safetensors header: {e}")))?;
    let value = serde_json::to_string(prov).map_err(|e| Error::Data(e.to_string()))?;
    let meta = json
        .as_object_mut()
        .ok_or_else(|| Error::format(path, "safetensors header is not an object"))?
        .entry("__metadata__")
        .or_insert_with(|| serde_json::json!({}));
    if let Some(m) = meta.as_object_mut() {
        m.insert(KEY.into(), value.into());
    }
    let mut text = serde_json::to_vec(&json).map_err(|e| Error::Data(e.to_string()))?;
    // Tensor data starts right after the header; 8-byte alignment keeps f32 views aligned.
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    f.seek(SeekFrom::Start(8 + n as u64))
        .map_err(|e| Error::io(path, e))?;
    crate::fsutil::with_atomic_file(path, |w| {
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(&text)?;
        std::io::copy(&mut f, w)?;
        Ok(())
    })
}

/// The provenance `stamp_detector` recorded, if any (detectors of an older mood have none).
pub fn detector_provenance(path: &Path) -> Result<Option<Provenance>> {
    match safetensors::read_metadata(path, KEY)? {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::format(path, format!("bad {KEY}: {e}"))),
    }
}
