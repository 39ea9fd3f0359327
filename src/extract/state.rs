//! What an extraction finds in its `--out` and so does: start afresh, resume the chunks of the
//! same run, report a finished store, or refuse, in one line naming what differs, to mix its
//! rows with those of another run.

use std::path::Path;

use crate::error::{Error, Result};
use crate::store::{read_manifest, Identity, Manifest, STORE_FILES};

pub enum Start {
    /// Nothing of a store here (or `--overwrite` removed it): extract every chunk.
    Fresh,
    /// The chunks in .partial are of a run with this identity: extract the missing ones.
    Resume,
    /// A finished store of this identity is already here.
    Complete(Box<Manifest>),
}

/// Removes a store's own files (never anything else of the directory).
pub fn clear(out: &Path) -> Result<()> {
    for f in STORE_FILES.iter().chain(&["manifest.json"]) {
        let p = out.join(f);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    let partial = out.join(".partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    Ok(())
}

/// Decides what a run of identity `id` does in `out`; with `overwrite`, whatever is there that
/// does not match is removed first.
pub fn begin(out: &Path, id: &Identity, overwrite: bool) -> Result<Start> {
    let manifest = match read_manifest(out) {
        Ok(m) => m,
        Err(_) if overwrite => None,
        Err(e) => return Err(e),
    };
    let how = "add --overwrite to replace it, or choose another --out";
    let refuse = |what: String| -> Result<Start> {
        if overwrite {
            clear(out)?;
            return Ok(Start::Fresh);
        }
        Err(Error::Usage(format!("{}: {what}; {how}", out.display())))
    };
    match manifest {
        Some(m) => match &m.identity {
            Some(old) => {
                let diffs = old.differences(id, ("the store", "this run"), &[]);
                if diffs.is_empty() {
                    return Ok(if m.complete {
                        Start::Complete(Box::new(m))
                    } else {
                        Start::Resume
                    });
                }
                let state = if m.complete {
                    "a finished store"
                } else {
                    "an unfinished extraction"
                };
                refuse(format!(
                    "{state} of another run, whose rows would not match this run's: {}",
                    diffs.join("; ")
                ))
            }
            None => refuse(
                "a store whose manifest does not record how its rows were made (an older mood, or \
                 not `mood extract`)"
                    .into(),
            ),
        },
        None => {
            let chunks = std::fs::read_dir(out.join(".partial"))
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("chunk-"))
                })
                .unwrap_or(false);
            if chunks {
                refuse(
                    "an unfinished extraction of an older mood, which did not record its settings"
                        .into(),
                )
            } else if let Some(f) = STORE_FILES.iter().find(|f| out.join(f).exists()) {
                refuse(format!("{f} without a manifest (a store saved by hand?)"))
            } else {
                Ok(Start::Fresh)
            }
        }
    }
}
