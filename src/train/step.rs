//! One supervised fine-tuning step: forward on the tape, cross-entropy with label smoothing,
//! backward, gradient clipping, AdamW. Parameters live in a name → tensor map (the checkpoint's
//! names); the model is rebuilt over them each step without copying (derived tensors such as the
//! dense relative-position bias are recomputed from the updated tables).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::model::exec::Exec;
use crate::model::{VisionTransformer, VitConfig};
use crate::tensor::Tensor;
use crate::train::loss::cross_entropy;
use crate::train::optim::{clip_grad_norm, AdamW};
use crate::train::tape::Tape;
use crate::weights::WeightStore;

pub struct StepConfig {
    pub label_smoothing: f32,
    /// Global gradient-norm clip (none if 0).
    pub clip_grad: f32,
}

pub struct StepStats {
    pub loss: f32,
    pub grad_norm: f32,
}

pub fn finetune_step(
    cfg: &VitConfig,
    params: &mut BTreeMap<String, Tensor>,
    opt: &mut AdamW,
    images: &Tensor,
    labels: &[usize],
    lr: f32,
    sc: &StepConfig,
) -> Result<StepStats> {
    if !lr.is_finite() {
        return Err(Error::Usage(format!("learning rate {lr} is not finite")));
    }
    let store = WeightStore::from_tensors(
        "<training state>",
        params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    );
    let model = VisionTransformer::load(cfg, &store)?;
    let classes = model.num_classes().ok_or_else(|| {
        Error::Usage("fine-tuning needs a classification head (`head.weight`)".into())
    })?;
    if let Some(&bad) = labels.iter().find(|&&l| l >= classes) {
        return Err(Error::Data(format!(
            "label {bad} out of range for {classes} classes"
        )));
    }
    let mut tape = Tape::new();
    let (_, logits) = model.forward_with(&mut tape, images)?;
    let logits = logits.expect("head checked above");
    let (loss, dlogits) = cross_entropy(
        tape.value(&logits).as_slice(),
        labels,
        classes,
        sc.label_smoothing,
    );
    if !loss.is_finite() {
        return Err(Error::Data(format!(
            "loss became {loss}: lower the learning rate"
        )));
    }
    drop(model);
    drop(store);
    let mut grads = tape.backward(logits, dlogits)?;
    let grad_norm = if sc.clip_grad > 0.0 {
        clip_grad_norm(&mut grads.params, sc.clip_grad)
    } else {
        clip_grad_norm(&mut grads.params, f32::INFINITY)
    };
    opt.update(params, &grads.params, lr);
    Ok(StepStats { loss, grad_norm })
}
