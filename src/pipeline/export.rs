//! The run of `mood export`: the classifier of a `mood finetune` checkpoint as a weights-only
//! file that timm's `load_state_dict(strict=True)` takes (train::export chooses the tensors), with
//! where it came from in the safetensors metadata.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::VitConfig;
use crate::train::checkpoint;
use crate::weights::WeightStore;

/// The metadata key of an exported file that records its source.
pub const KEY: &str = "mood_export";

/// What `mood export` is asked for.
pub struct Request<'a> {
    pub checkpoint: &'a Path,
    pub output: &'a Path,
    /// The model preset given, if any (default: the checkpoint's record).
    pub arch: Option<&'a str>,
    pub overwrite: bool,
}

/// What an exported file records about where it came from.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Source {
    pub mood_version: String,
    pub arch: String,
    /// Head outputs; None for a checkpoint without a head (timm: `num_classes=0`).
    pub num_classes: Option<usize>,
    /// The checkpoint's file name (its hash below says which file it was).
    pub checkpoint: String,
    pub checkpoint_sha256: String,
    /// "finetune" or "pretrain", with its progress, when the checkpoint records them.
    pub stage: Option<String>,
    pub optimizer_step: Option<u32>,
}

/// What was written: the architecture, the tensors kept, the head's classes and the training
/// tensors left out.
pub struct Summary {
    pub arch: String,
    pub tensors: usize,
    pub num_classes: Option<usize>,
    pub dropped: usize,
}

/// The `--arch` to export as: the option, the checkpoint's own record, or both when they agree.
fn arch_of(req: &Request, recorded: Option<&str>) -> Result<String> {
    match (req.arch, recorded) {
        (Some(a), Some(r)) if a != r => Err(Error::Usage(format!(
            "--arch {a}: {} is a checkpoint of {r}; leave --arch out or give --arch {r}",
            req.checkpoint.display()
        ))),
        (Some(a), _) => Ok(a.to_string()),
        (None, Some(r)) => Ok(r.to_string()),
        (None, None) => Err(Error::Usage(format!(
            "{} records no architecture (not written by mood finetune): give --arch",
            req.checkpoint.display()
        ))),
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// Checks the output, reads the checkpoint, keeps the classifier's tensors under timm's names and
/// writes them with a `Source` record.
pub fn run(req: &Request) -> Result<Summary> {
    if crate::fsutil::resolve(req.output) == crate::fsutil::resolve(req.checkpoint) {
        return Err(Error::Usage(format!(
            "-o {} is the checkpoint being exported: write the export elsewhere",
            req.output.display()
        )));
    }
    if req.output.exists() && !req.overwrite {
        return Err(Error::Usage(format!(
            "-o {} exists: add --overwrite to replace it",
            req.output.display()
        )));
    }
    let store = WeightStore::open(req.checkpoint)?;
    let progress = if is_safetensors(req.checkpoint) {
        checkpoint::read_progress(req.checkpoint)?
    } else {
        None
    };
    if progress.as_ref().is_some_and(|p| p.stage == "pretrain") {
        // Its encoder ends in MIM's `norm`, not a classifier's `fc_norm` and head.
        return Err(Error::Usage(format!(
            "{} is a `mood pretrain` checkpoint, not a classifier: fine-tune it first \
             (mood finetune --weights {0}) and export that",
            req.checkpoint.display()
        )));
    }
    let arch = arch_of(req, progress.as_ref().map(|p| p.arch.as_str()))?;
    let cfg = VitConfig::preset(&arch)?;
    let selected = crate::train::export::select(&store, &cfg)?;
    let source = Source {
        mood_version: env!("CARGO_PKG_VERSION").into(),
        arch: arch.clone(),
        num_classes: selected.num_classes,
        checkpoint: req
            .checkpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        checkpoint_sha256: crate::fsutil::sha256_file(req.checkpoint)?,
        stage: progress.as_ref().map(|p| p.stage.clone()),
        optimizer_step: progress.as_ref().map(|p| p.optimizer_step),
    };
    let meta = HashMap::from([
        // What safetensors' PyTorch writer puts there; some loaders look for it.
        ("format".to_string(), "pt".to_string()),
        (
            KEY.to_string(),
            serde_json::to_string(&source).map_err(|e| Error::Data(e.to_string()))?,
        ),
    ]);
    let tensors: Vec<_> = selected.tensors.into_values().collect();
    if let Some(dir) = req.output.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let name = req.output.file_name().map(|n| n.to_string_lossy());
        crate::fsutil::remove_stale_temps(dir, name.as_deref());
    }
    crate::weights::safetensors::write(req.output, &tensors, Some(meta))?;
    Ok(Summary {
        arch,
        tensors: tensors.len(),
        num_classes: selected.num_classes,
        dropped: selected.dropped.len(),
    })
}
