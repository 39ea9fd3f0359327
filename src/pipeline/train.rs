//! Training setup shared by `mood pretrain` and `mood finetune` (what is not argument parsing):
//! the output checkpoint taken for one writer (resumed, replaced or refused), the steps a resume
//! skips, the drop-last note and the parameters a run starts from. Their images come from
//! pipeline::data.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::VitConfig;

/// Steps already done by the checkpoint `resume` continues from.
pub fn steps_done(resume: &Option<crate::train::checkpoint::Loaded>, per_epoch: u64) -> u64 {
    resume
        .as_ref()
        .and_then(|r| r.progress.as_ref())
        .map_or(0, |p| (p.epoch as u64 + 1) * per_epoch)
}

/// Takes the output checkpoint `out` for this run: one writer at a time (a lock file beside it),
/// temporaries of killed runs removed, and an existing checkpoint either resumed (`resume`),
/// replaced (`overwrite`) or left alone with a one-line refusal. Returns the lock (held while
/// training) and the checkpoint to resume from.
pub fn take_output(
    out: &Path,
    resume: bool,
    overwrite: bool,
) -> Result<(
    crate::fsutil::Lock,
    Option<crate::train::checkpoint::Loaded>,
)> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Usage(format!("-o {}: not a file name", out.display())))?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let lock = crate::fsutil::Lock::acquire(&dir.join(format!(".{name}.lock")), out)?;
    let stale = crate::fsutil::remove_stale_temps(&dir, Some(&name));
    if stale > 0 && !crate::progress::quiet() {
        eprintln!(
            "note: removed {stale} temporary file(s) of {} left by an interrupted run",
            out.display()
        );
    }
    if !out.exists() {
        if resume && !crate::progress::quiet() {
            eprintln!(
                "note: --resume: no checkpoint at {} yet, so starting from the beginning",
                out.display()
            );
        }
        return Ok((lock, None));
    }
    if resume {
        return Ok((lock, Some(crate::train::checkpoint::load(out)?)));
    }
    if overwrite {
        return Ok((lock, None));
    }
    let what = match crate::train::checkpoint::read_progress(out) {
        Ok(Some(p)) => format!(
            "a {} checkpoint of {} after epoch {}",
            p.stage,
            p.arch,
            p.epoch + 1
        ),
        _ => "a file".to_string(),
    };
    Err(Error::Usage(format!(
        "-o {} already exists ({what}): add --resume to continue it, or --overwrite to start over and replace it",
        out.display()
    )))
}

/// Says how many images drop-last leaves out of each epoch (BEiT's loaders do the same).
pub fn note_dropped(images: usize, batch: usize) {
    let dropped = images % batch.max(1);
    if dropped > 0 && batch <= images && !crate::progress::quiet() {
        eprintln!(
            "note: {images} images in batches of {batch}: the last {dropped} of each epoch's shuffled \
             order are left out (drop-last, as BEiT's loaders; other images each epoch)"
        );
    }
}

/// Parameters to start from: a checkpoint's tensors, or a random initialisation.
pub fn initial_params(
    cfg: &VitConfig,
    weights: Option<&Path>,
    seed: u64,
) -> Result<std::collections::BTreeMap<String, crate::tensor::Tensor>> {
    let store = match weights {
        Some(p) => crate::weights::WeightStore::open(p)?,
        None => crate::model::init::random_store(cfg, seed),
    };
    // Training updates tensors in place; a mapped one is copied on its first write (Tensor's
    // copy-on-write), so the file is never touched.
    store.float_tensors()
}
