//! Weights-only files from training checkpoints: exactly the tensors a timm classifier of the
//! checkpoint's architecture has in its `state_dict()`, under timm's names, so that
//! `load_state_dict(strict=True)` takes them. Training state (AdamW moments, ALPA's projections,
//! the masked-image-modelling head) is left out; anything else the classifier lacks is refused,
//! because timm's strict load would refuse it too.

use std::collections::BTreeMap;

use crate::backend::Pool;
use crate::error::{Error, Result};
use crate::model::init::parameter_specs;
use crate::model::VitConfig;
use crate::weights::{keymap, RawTensor, WeightStore};

/// What `select` kept and left out.
pub struct Selected {
    /// The classifier's tensors, in timm's names (a BTreeMap: the file lists them sorted).
    pub tensors: BTreeMap<String, RawTensor>,
    /// Outputs of the head, None when the checkpoint has none (timm: `num_classes=0`).
    pub num_classes: Option<usize>,
    /// Training-only tensors left out (optimizer moments, ALPA, MIM head, ...).
    pub dropped: Vec<String>,
}

/// Tensors that only training reads; a classifier never has them.
fn training_only(name: &str) -> bool {
    keymap::is_ignored(name) || name.starts_with("mim_head.")
}

/// The classifier tensors of `cfg` in `store`: every one the architecture needs, with the
/// shape it needs; the head's size is the checkpoint's own.
pub fn select(store: &WeightStore, cfg: &VitConfig) -> Result<Selected> {
    let file = store.path().to_path_buf();
    let head = store.shape_of("head.weight").map(<[usize]>::to_vec);
    let num_classes = match head.as_deref() {
        None => None,
        Some([c, d]) if *d == cfg.embed_dim => Some(*c),
        Some(s) => {
            return Err(Error::Shape {
                name: "head.weight".into(),
                expected: vec![0, cfg.embed_dim],
                got: s.to_vec(),
                file: Some(file),
            })
        }
    };
    let mut wanted = Vec::new();
    for (name, mut shape, _) in parameter_specs(cfg) {
        if name.starts_with("head.") {
            let Some(c) = num_classes else { continue };
            shape[0] = c;
        }
        let Some(got) = store.shape_of(&name) else {
            return Err(Error::MissingTensor {
                name,
                file: Some(file),
                hint: format!(
                    "{} needs it; is this a checkpoint of another --arch?",
                    cfg.name
                ),
            });
        };
        if got != shape.as_slice() {
            return Err(Error::Shape {
                name,
                expected: shape,
                got: got.to_vec(),
                file: Some(file),
            });
        }
        wanted.push(name);
    }
    // Every other tensor of the file is training state, or something a strict load would refuse.
    let mut dropped = Vec::new();
    for name in store.names() {
        if wanted.contains(name) {
            continue;
        }
        if !training_only(name) {
            let pretrained = name.starts_with("norm.") && cfg.pool == Pool::MeanPatches;
            let hint = if pretrained {
                " (a `mood pretrain` checkpoint? fine-tune it first: mood finetune --weights CKPT)"
            } else {
                ""
            };
            return Err(Error::format(
                &file,
                format!(
                    "tensor `{name}` is not part of a {} classifier, so timm's strict \
                     load_state_dict would refuse the export{hint}",
                    cfg.name
                ),
            ));
        }
        dropped.push(name.clone());
    }
    let mut tensors = BTreeMap::new();
    for name in wanted {
        let raw = store.raw_tensor(&name).expect("listed above");
        if !raw.dtype.is_float() {
            return Err(Error::format(
                &file,
                format!("tensor `{name}` is {:?}, not a float tensor", raw.dtype),
            ));
        }
        tensors.insert(name, raw);
    }
    Ok(Selected {
        tensors,
        num_classes,
        dropped,
    })
}
