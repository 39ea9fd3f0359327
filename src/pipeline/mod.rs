//! Between the library and the command line: what the commands do, as calls that take typed
//! values (no clap) and return results (printing only the notes and warnings the library's own
//! steps print). cli/ turns arguments into these calls and prints the outcome; nothing below
//! (model, backend, ood, data, train, store, weights, extract) imports this module.
//!
//! - `device`: the `--device cpu|cuda|auto` rule, the forward's runner, the training device;
//! - `score_device`: where detectors score (GPU scorers or the CPU);
//! - `data`: data specs (data::spec, one parser) opened as extraction sources or training sets;
//! - `extract`: the extraction run, one path for `mood extract` and `mood demo`;
//! - `eval`, `sweep`, `provenance`: fit, score and evaluate plans and their checks; `fit`: the
//!   runs of `mood fit` and `mood score`; `mos_head`: MOS's head on a store;
//! - `train`: the setup of `mood pretrain` / `mood finetune` (output checkpoint, resume);
//! - `pretrain`, `finetune`: their runs (data, parameters, loss, epochs, held-out accuracy);
//! - `forward`: a checkpoint over an .npy of images; `export`: a checkpoint's classifier for timm;
//! - `demo`: the plan of `mood demo` (data, both models, their stores and reports);
//! - `bench_cuda`: the measurements of `mood bench --device cuda` (forward times, op profiles).

#[cfg(feature = "cuda")]
pub mod bench_cuda;
pub mod data;
pub mod demo;
pub mod device;
pub mod eval;
pub mod export;
pub mod extract;
pub mod finetune;
pub mod fit;
pub mod forward;
pub mod mos_head;
pub mod pretrain;
pub mod provenance;
pub mod score_device;
pub mod sweep;
pub mod train;

use crate::error::Result;
use crate::model::backbone::Backbone;
use crate::weights::WeightStore;

/// Loads `--arch` with `--weights`, warning about checkpoint tensors the model did not use.
pub fn load_model(arch: &str, weights: &std::path::Path) -> Result<Backbone> {
    let store = WeightStore::open(weights)?;
    let model = Backbone::load(arch, &store)?;
    let unused = store.unused();
    if !unused.is_empty() {
        eprintln!(
            "warning: {} tensor(s) in {} not used by {arch}: {}{}",
            unused.len(),
            weights.display(),
            unused
                .iter()
                .take(4)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if unused.len() > 4 { ", ..." } else { "" }
        );
    }
    Ok(model)
}
