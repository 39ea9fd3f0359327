//! Continuing a MODE checkpoint (`mood mode-train --resume`): the file `train::mode::save` wrote
//! holds the parameters, SGD's momentum buffers under `optim.momentum.*` and the progress (the
//! epoch reached, the settings record). A resume takes all three back, but only for the same
//! architecture and settings record (recipe, every hyper-parameter, seed, colour augmentation,
//! the data's fingerprint and normalisation): any other would splice two runs together, so a
//! difference is refused in one line naming each setting that differs.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::model::resnet::ResNetConfig;
use crate::tensor::Tensor;
use crate::train::checkpoint::{self, Loaded};

/// Where a resumed run picks up.
pub struct Resume {
    /// SGD's momentum buffer of every trained parameter.
    pub momentum: BTreeMap<String, Vec<f32>>,
    /// Epochs the checkpoint has finished (the next to run, counted from 0).
    pub epochs_done: usize,
    /// Where those epochs ran, as the checkpoint records it ("cpu" before it recorded one).
    pub device: String,
}

/// The settings record's fields as the command line names them.
const FLAGS: &[(&str, &str)] = &[
    ("mode.recipe", "--recipe"),
    ("data.images", "--data (number of images)"),
    ("data.sha256", "--data (images and labels)"),
    ("mode.pixel_mean", "--data (its normalisation)"),
    ("mode.pixel_std", "--data (its normalisation)"),
    ("mode.epochs", "--epochs"),
    ("mode.batch", "--batch"),
    ("mode.lr", "--lr"),
    ("mode.seed", "--seed"),
    ("mode.supcon_weight", "--supcon"),
    ("mode.alpa_weight", "--alpa"),
    ("mode.alpa_dim", "--alpa-dim"),
    ("mode.color", "--no-color-aug"),
];

/// "flag (the checkpoint: x, this run: y)" for every recorded setting this run changes; a
/// setting the checkpoint did not record is not compared, nor the device (a run may continue
/// on another one, and the record then says where each part ran).
fn settings_differences(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let descend = ["mode", "data"];
    checkpoint::settings_differences(
        checkpoint::flatten_settings(old, &descend),
        checkpoint::flatten_settings(new, &descend),
        FLAGS,
        &["device"],
    )
}

/// The parameters and `Resume` of `loaded` (a `mood mode-train` output) for a run of `cfg`
/// whose settings record is `settings`; refused unless the checkpoint is MODE's, of `cfg`, with
/// the same record.
pub fn resume_from(
    loaded: Loaded,
    cfg: &ResNetConfig,
    settings: &serde_json::Value,
) -> Result<(BTreeMap<String, Tensor>, Resume)> {
    let p = loaded.progress.ok_or_else(|| {
        Error::Usage("cannot resume: the checkpoint has no training progress".into())
    })?;
    if p.stage != "mode" || p.arch != cfg.name {
        return Err(Error::Usage(format!(
            "cannot resume: the checkpoint is {} of {}, this run is mode of {}",
            p.stage, p.arch, cfg.name
        )));
    }
    let diffs = settings_differences(&p.settings, settings);
    if !diffs.is_empty() {
        return Err(Error::Usage(format!(
            "cannot resume: the checkpoint was trained with other settings: {}; rerun with the \
             checkpoint's settings to continue it, or with --overwrite to start over",
            diffs.join("; ")
        )));
    }
    let (mut params, mut momentum) = (BTreeMap::new(), BTreeMap::new());
    for (name, t) in loaded.params {
        match name.strip_prefix("optim.momentum.") {
            Some(k) => {
                momentum.insert(k.to_string(), t.as_slice().to_vec());
            }
            None => {
                params.insert(name, t);
            }
        }
    }
    Ok((
        params,
        Resume {
            momentum,
            epochs_done: p.epoch + 1,
            device: p.settings["device"].as_str().unwrap_or("cpu").to_string(),
        },
    ))
}
