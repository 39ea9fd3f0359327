//! One supervised fine-tuning step: forward on the tape, cross-entropy with label smoothing or
//! MOS's group softmax (on the tape's executor: a CUDA step copies back only the loss), backward, gradient clipping, AdamW. Parameters live in a name → tensor map (the checkpoint's
//! names); the model is rebuilt over them each step without copying (derived tensors such as the
//! dense relative-position bias are recomputed from the updated tables).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::model::exec::Exec;
use crate::model::train_exec::TrainExec;
use crate::model::{VisionTransformer, VitConfig};
use crate::tensor::Tensor;
use crate::train::device::{OnCpu, TrainDevice};
use crate::train::optim::AdamW;
use crate::train::tape::{Tape, Var};
use crate::weights::WeightStore;

pub struct StepConfig {
    pub label_smoothing: f32,
    /// MOS group-softmax fine-tuning: group sizes (classes assigned in order); the head then has
    /// Σ(size + 1) outputs and the loss is `group_softmax` (label smoothing does not apply).
    pub groups: Option<Vec<usize>>,
    /// Global gradient-norm clip (none if 0).
    pub clip_grad: f32,
    /// Stochastic depth: drop-path rate of the last block (linspace from 0).
    pub drop_path: f32,
    /// Seed of this step's drop-path draws.
    pub seed: u64,
}

impl Default for StepConfig {
    fn default() -> StepConfig {
        StepConfig {
            label_smoothing: 0.0,
            groups: None,
            clip_grad: 0.0,
            drop_path: 0.0,
            seed: 0,
        }
    }
}

pub struct StepStats {
    pub loss: f32,
    pub grad_norm: f32,
}

fn check_lr(lr: f32) -> Result<()> {
    if !lr.is_finite() {
        return Err(Error::Usage(format!("learning rate {lr} is not finite")));
    }
    Ok(())
}

/// The model over the current parameters (no copies), and the store that names them.
fn build(
    cfg: &VitConfig,
    params: &BTreeMap<String, Tensor>,
    lr: f32,
) -> Result<(WeightStore, VisionTransformer)> {
    check_lr(lr)?;
    let _t = crate::profile::scope("model_build");
    let store = WeightStore::from_params("<training state>", params);
    let model = VisionTransformer::load(cfg, &store)?;
    Ok((store, model))
}

/// The classes of the model's head, which classification fine-tuning needs.
fn head_classes(model: &VisionTransformer) -> Result<usize> {
    model.num_classes().ok_or_else(|| {
        Error::Usage("fine-tuning needs a classification head (`head.weight`)".into())
    })
}

fn check_labels(labels: &[usize], classes: usize) -> Result<()> {
    if let Some(&bad) = labels.iter().find(|&&l| l >= classes) {
        return Err(Error::Data(format!(
            "label {bad} out of range for {classes} classes"
        )));
    }
    Ok(())
}

/// The end of every step once its forward has given the loss and the backward's seeds: a loss
/// that is no longer finite stops the run with what to do about it; otherwise the device's
/// backward, gradient clipping and AdamW update.
#[allow(clippy::too_many_arguments)]
fn update<D: TrainDevice>(
    dev: &mut D,
    tape: Tape<D::E>,
    loss: f32,
    seeds: Seeds<D::E>,
    params: &mut BTreeMap<String, Tensor>,
    opt: &mut AdamW,
    lr: f32,
    sc: &StepConfig,
) -> Result<StepStats> {
    if !loss.is_finite() {
        return Err(Error::Data(format!(
            "loss became {loss}: lower the learning rate"
        )));
    }
    let grad_norm = dev.update(tape, seeds, params, opt, lr, sc.clip_grad)?;
    Ok(StepStats { loss, grad_norm })
}

/// One fine-tuning step on the CPU.
pub fn finetune_step(
    cfg: &VitConfig,
    params: &mut BTreeMap<String, Tensor>,
    opt: &mut AdamW,
    images: &Tensor,
    labels: &[usize],
    lr: f32,
    sc: &StepConfig,
) -> Result<StepStats> {
    finetune_step_on(&mut OnCpu, cfg, params, opt, images, labels, lr, sc)
}

/// `finetune_step` on a training device.
#[allow(clippy::too_many_arguments)]
pub fn finetune_step_on<D: TrainDevice>(
    dev: &mut D,
    cfg: &VitConfig,
    params: &mut BTreeMap<String, Tensor>,
    opt: &mut AdamW,
    images: &Tensor,
    labels: &[usize],
    lr: f32,
    sc: &StepConfig,
) -> Result<StepStats> {
    let (store, model) = build(cfg, params, lr)?;
    let classes = head_classes(&model)?;
    let width = sc
        .groups
        .as_ref()
        .map_or(classes, |g| g.iter().map(|s| s + 1).sum());
    if width != classes {
        return Err(Error::Usage(format!(
            "MOS groups need a head of {width} outputs (each group plus its 'others'); the head has {classes}"
        )));
    }
    // With MOS groups the labels index the real classes, not the head's outputs.
    let labelled = sc.groups.as_ref().map_or(classes, |g| g.iter().sum());
    check_labels(labels, labelled)?;
    let mut tape = dev.tape(sc.drop_path, cfg.depth, sc.seed)?;
    let (_, logits) = model.forward_with(&mut tape, images)?;
    let logits = logits.expect("head checked above");
    let (loss, dlogits) = match &sc.groups {
        // On the device: only the loss comes back.
        None => tape.cross_entropy(&logits, labels, sc.label_smoothing)?,
        Some(groups) => tape.group_softmax(&logits, groups, labels)?,
    };
    drop((model, store));
    let seeds = vec![(logits, dlogits)];
    update(dev, tape, loss, seeds, params, opt, lr, sc)
}

/// The parameters that masked image modelling adds to the encoder: `mask_token` [D], the final
/// `norm` and the pixel-regression head `mim_head` [C·P·P, D].
pub fn add_mim_params(params: &mut BTreeMap<String, Tensor>, cfg: &VitConfig, seed: u64) {
    let d = cfg.embed_dim;
    let k = cfg.in_chans * cfg.patch_size * cfg.patch_size;
    let mut rng = crate::model::init::Rng::new(seed);
    let mut normal = |n: usize| (0..n).map(|_| rng.trunc_normal(0.02)).collect::<Vec<f32>>();
    let mut put = |name: &str, shape: &[usize], v: Vec<f32>| {
        params
            .entry(name.to_string())
            .or_insert_with(|| Tensor::from_vec(shape, v).expect("sizes match"));
    };
    put("mask_token", &[d], normal(d));
    put("norm.weight", &[d], vec![1.0; d]);
    put("norm.bias", &[d], vec![0.0; d]);
    put("mim_head.weight", &[k, d], normal(k * d));
    put("mim_head.bias", &[k], vec![0.0; k]);
}

/// Adds what classification fine-tuning needs and a checkpoint may lack: `fc_norm` (weight 1,
/// bias 0) for mean-pooled models, and a `head` for `classes` classes (truncated normal 0.02 scaled
/// by BEiT's init_scale 0.001, bias 0). A head of another size is replaced. Pretraining-only
/// tensors (`mask_token`, `mim_head.*`, `lm_head.*`) are dropped.
pub fn prepare_for_finetune(
    params: &mut BTreeMap<String, Tensor>,
    cfg: &VitConfig,
    classes: usize,
    seed: u64,
) {
    let d = cfg.embed_dim;
    params.retain(|k, _| {
        !(k == "mask_token" || k.starts_with("mim_head.") || k.starts_with("lm_head."))
    });
    if cfg.pool == crate::backend::Pool::MeanPatches && !params.contains_key("fc_norm.weight") {
        params.insert(
            "fc_norm.weight".into(),
            Tensor::from_vec(&[d], vec![1.0; d]).expect("d"),
        );
        params.insert("fc_norm.bias".into(), Tensor::zeros(&[d]));
        params.retain(|k, _| !k.starts_with("norm."));
    }
    if params
        .get("head.weight")
        .map(|w| w.shape() != [classes, d])
        .unwrap_or(true)
    {
        let mut rng = crate::model::init::Rng::new(seed);
        let w = (0..classes * d)
            .map(|_| rng.trunc_normal(0.02) * 1e-3)
            .collect();
        params.insert(
            "head.weight".into(),
            Tensor::from_vec(&[classes, d], w).expect("sizes"),
        );
        params.insert("head.bias".into(), Tensor::zeros(&[classes]));
    }
}

/// One masked-image-modelling step (see `train::mim`) on a training device (`OnCpu` for the
/// CPU): the loss is the reconstruction loss of the masked patches.
#[allow(clippy::too_many_arguments)]
pub fn mim_step_on<D: TrainDevice>(
    dev: &mut D,
    cfg: &VitConfig,
    params: &mut BTreeMap<String, Tensor>,
    opt: &mut AdamW,
    images: &Tensor,
    mask: &[bool],
    lr: f32,
    sc: &StepConfig,
) -> Result<StepStats> {
    use crate::model::layers::{Linear, LinearBias, Norm, Param};
    use crate::train::mim::{masked_token_rows, patch_targets};
    let (store, model) = build(cfg, params, lr)?;
    let d = cfg.embed_dim;
    let k = cfg.in_chans * cfg.patch_size * cfg.patch_size;
    let token = Param::load(&store, "mask_token", &[d])?;
    let norm = Norm::load(&store, "norm", d)?;
    let head = Linear {
        w: Param::load(&store, "mim_head.weight", &[k, d])?,
        bias: LinearBias::Full(Param::load(&store, "mim_head.bias", &[k])?),
    };
    let b = images.shape()[0];
    let (gh, gw) = cfg.grid();
    let g = gh * gw;
    let rows = masked_token_rows(mask, b, g);
    if rows.is_empty() {
        return Err(Error::Usage("the mask hides no patch".into()));
    }
    let mut tape = dev.tape(sc.drop_path, cfg.depth, sc.seed)?;
    let tokens = model.forward_masked(&mut tape, images, mask, &token, &norm)?;
    let sel = tape.gather_rows(&tokens, &rows)?;
    let pred = tape.linear(&sel, &head, crate::backend::Activation::None)?;
    let all = patch_targets(
        images.as_slice(),
        b,
        cfg.in_chans,
        cfg.img_size,
        cfg.patch_size,
    );
    let target: Vec<f32> = (0..b * g)
        .filter(|&i| mask[i])
        .flat_map(|i| all[i * k..(i + 1) * k].iter().copied())
        .collect();
    let (loss, dpred) = tape.mse(&pred, &target)?;
    drop((model, store, token, norm, head));
    update(dev, tape, loss, vec![(pred, dpred)], params, opt, lr, sc)
}

/// ALPA as an extra fine-tuning loss (SPEC E, MODE-T with cross-entropy in place of SupCon):
/// L = CE + weight·L_ALPA over two views of each image (the image and a copy shifted by up to
/// `shift` pixels), the attention MLPs `alpa.{query,key,value}.{0,2}.weight` trained alongside.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AlpaConfig {
    pub weight: f32,
    /// d, the projection width of the query/key/value MLPs (MODE: 80).
    pub proj: usize,
    pub shift: usize,
}

/// The ALPA MLP weights, initialised as nn.Linear does (uniform ±1/√fan_in), if absent.
pub fn add_alpa_params(
    params: &mut BTreeMap<String, Tensor>,
    cfg: &VitConfig,
    proj: usize,
    seed: u64,
) {
    let d = cfg.embed_dim;
    let mut rng = crate::model::init::Rng::new(seed ^ 0xA1FA);
    for name in crate::train::alpa::WEIGHT_NAMES {
        let rows = if name.ends_with(".2") { proj } else { d };
        let bound = 1.0 / (d as f64).sqrt();
        let w = (0..rows * d)
            .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
            .collect();
        params
            .entry(format!("alpa.{name}.weight"))
            .or_insert_with(|| Tensor::from_vec(&[rows, d], w).expect("sizes"));
    }
}

/// Each image shifted by a random offset in [−s, s]² (seeded), uncovered pixels set to the
/// image's minimum (the background of the rendered digits).
fn shifted_views(images: &Tensor, s: usize, seed: u64) -> Vec<f32> {
    let [b, c, h, w] = images.shape() else {
        return images.as_slice().to_vec();
    };
    let (b, c, h, w) = (*b, *c, *h, *w);
    let mut rng = crate::model::init::Rng::new(seed ^ 0x5A1F7);
    let per = c * h * w;
    let mut out = vec![0.0f32; b * per];
    for i in 0..b {
        let src = &images.as_slice()[i * per..(i + 1) * per];
        let fill = src.iter().fold(f32::INFINITY, |a, &v| a.min(v));
        let span = 2 * s + 1;
        let dy = (rng.next_u64() % span as u64) as isize - s as isize;
        let dx = (rng.next_u64() % span as u64) as isize - s as isize;
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let (sy, sx) = (y as isize - dy, x as isize - dx);
                    out[i * per + ch * h * w + y * w + x] =
                        if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                            src[ch * h * w + sy as usize * w + sx as usize]
                        } else {
                            fill
                        };
                }
            }
        }
    }
    out
}

/// The backward's starting gradients: each output with its gradient on the executor.
pub type Seeds<E> = Vec<(Var, <E as TrainExec>::Grad)>;

/// The forward of an ALPA step on `tape`: cross-entropy over both views' logits plus
/// weight·ALPA over their patch tokens (`train::alpa::alpa_on`, on the tape's executor). Returns
/// the loss and the backward's seeds (dlogits, dlocal); ALPA's MLP weight gradients are seeded
/// on the tape by name.
pub fn alpa_forward<E: TrainExec>(
    tape: &mut Tape<E>,
    cfg: &VitConfig,
    params: &BTreeMap<String, Tensor>,
    images: &Tensor,
    labels: &[usize],
    sc: &StepConfig,
    alpa: &AlpaConfig,
) -> Result<(f32, Seeds<E>)> {
    use crate::model::layers::Param;
    use crate::train::alpa::{alpa_on, WEIGHT_NAMES};
    let mut views = images.as_slice().to_vec();
    views.extend(shifted_views(images, alpa.shift, sc.seed));
    let mut shape = images.shape().to_vec();
    shape[0] *= 2;
    let views = Tensor::from_vec(&shape, views)?;
    let labels2: Vec<usize> = labels.iter().chain(labels).copied().collect();
    let store = WeightStore::from_params("<training state>", params);
    let model = VisionTransformer::load(cfg, &store)?;
    check_labels(labels, head_classes(&model)?)?;
    let d = cfg.embed_dim;
    let weights = WEIGHT_NAMES
        .iter()
        .map(|n| {
            let name = format!("alpa.{n}.weight");
            if !params.contains_key(&name) {
                return Err(Error::Usage(format!(
                    "ALPA needs `{name}` (add_alpa_params)"
                )));
            }
            let rows = if n.ends_with(".2") { alpa.proj } else { d };
            Param::load(&store, &name, &[rows, d])
        })
        .collect::<Result<Vec<_>>>()?;
    let weights: [Param; 6] = weights
        .try_into()
        .map_err(|_| Error::Data("six weights".into()))?;
    let (logits, local) = model.forward_local_with(tape, &views)?;
    let logits = logits.expect("head checked above");
    let (ce, dlogits) = tape.cross_entropy(&logits, &labels2, sc.label_smoothing)?;
    let features = tape.buf(&local);
    let out = alpa_on(
        tape.exec(),
        &features,
        &weights,
        &labels2,
        10.0,
        alpa.weight,
    )?;
    for (w, g) in weights.iter().zip(out.d_weights) {
        tape.seed_param(&w.name, g);
    }
    Ok((
        ce + alpa.weight * out.loss,
        vec![(logits, dlogits), (local, out.d_features)],
    ))
}

/// Loss (CE + weight·ALPA) and gradients of every parameter, ALPA's MLPs included, for one batch
/// on the CPU: the whole of an ALPA step but the update.
pub fn alpa_loss_and_grads(
    cfg: &VitConfig,
    params: &BTreeMap<String, Tensor>,
    images: &Tensor,
    labels: &[usize],
    sc: &StepConfig,
    alpa: &AlpaConfig,
) -> Result<(f32, crate::train::tape::Grads)> {
    let mut tape = Tape::with_drop_path(sc.drop_path, cfg.depth, sc.seed);
    let (loss, seeds) = alpa_forward(&mut tape, cfg, params, images, labels, sc, alpa)?;
    let (grads, _) = tape.backward_from(seeds)?;
    Ok((loss, grads))
}

/// One fine-tuning step with cross-entropy plus ALPA on two views per image, on a training device
/// (`OnCpu` for the CPU): the backbone, ALPA's MLPs and its attention terms run on the device's
/// executor (only the M×M terms and the losses come to the host).
#[allow(clippy::too_many_arguments)]
pub fn alpa_finetune_step_on<D: TrainDevice>(
    dev: &mut D,
    cfg: &VitConfig,
    params: &mut BTreeMap<String, Tensor>,
    opt: &mut AdamW,
    images: &Tensor,
    labels: &[usize],
    lr: f32,
    sc: &StepConfig,
    alpa: &AlpaConfig,
) -> Result<StepStats> {
    check_lr(lr)?;
    let mut tape = dev.tape(sc.drop_path, cfg.depth, sc.seed)?;
    let (loss, seeds) = alpa_forward(&mut tape, cfg, params, images, labels, sc, alpa)?;
    update(dev, tape, loss, seeds, params, opt, lr, sc)
}
