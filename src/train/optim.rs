//! AdamW as BEiT / MOOD fine-tune: decoupled weight decay skipped for norms, biases, layer scales,
//! tokens and relative-position tables; layer-wise learning-rate decay; linear warmup then cosine;
//! global gradient-norm clipping. Semantics follow torch.optim.AdamW and timm/BEiT's param groups.

use std::collections::{BTreeMap, HashMap};

use crate::backend::cpu::vecmath;
use crate::tensor::Tensor;

pub use crate::param_groups::{layer_id, layer_scale, uses_weight_decay, Moments};

/// BEiT's per-step `cosine_scheduler`: warmup = linspace(0, base, warmup) (so the last warmup step
/// is already `base`), then min + ½(base − min)(1 + cos(π·i / (total − warmup))).
pub fn warmup_cosine(step: usize, base: f32, min: f32, warmup: usize, total: usize) -> f32 {
    if step < warmup {
        return if warmup == 1 {
            0.0
        } else {
            base * step as f32 / (warmup - 1) as f32
        };
    }
    let span = (total - warmup).max(1) as f32;
    let t = ((step - warmup) as f32 / span).min(1.0);
    min + 0.5 * (base - min) * (1.0 + (std::f32::consts::PI * t).cos())
}

/// The joint L2 norm of every gradient (as torch.nn.utils.clip_grad_norm_ measures it).
pub fn grad_norm(grads: &HashMap<String, Vec<f32>>) -> f32 {
    use rayon::prelude::*;
    // Eight independent f64 accumulators per tensor, so the sum vectorises instead of waiting
    // on one long dependency chain (it runs every step, on every parameter).
    let sum_sq = |g: &[f32]| -> f64 {
        let mut acc = [0f64; 8];
        let chunks = g.chunks_exact(8);
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += (v as f64) * (v as f64);
            }
        }
        acc.iter().sum::<f64>() + tail
    };
    grads
        .par_iter()
        .map(|(_, g)| g.par_chunks(1 << 16).map(sum_sq).sum::<f64>())
        .sum::<f64>()
        .sqrt() as f32
}

/// The factor clip_grad_norm_ scales every gradient by: max_norm / (norm + 1e-6), at most 1
/// (max_norm = ∞ or ≤ 0: no clipping).
pub fn clip_coef(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// Gradient clipping then one AdamW update: the clipping factor is applied inside the update,
/// so the gradients are read once more, never rewritten. Returns the norm before clipping.
pub fn clip_and_update(
    opt: &mut AdamW,
    params: &mut BTreeMap<String, Tensor>,
    grads: &HashMap<String, Vec<f32>>,
    lr: f32,
    max_norm: f32,
) -> f32 {
    let norm = {
        let _t = crate::profile::scope("clip_grad");
        grad_norm(grads)
    };
    opt.update_scaled(params, grads, lr, clip_coef(norm, max_norm));
    norm
}

pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub layer_decay: f32,
    /// Decay the relative-position tables (MOOD) or not (timm).
    pub decay_rel_pos: bool,
    pub depth: usize,
    pub step: u32,
    m: HashMap<String, Vec<f32>>,
    v: HashMap<String, Vec<f32>>,
}

impl AdamW {
    pub fn new(weight_decay: f32, layer_decay: f32, depth: usize) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            layer_decay,
            decay_rel_pos: true,
            depth,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    /// The moment estimates, by parameter name (for checkpoints).
    pub fn moments(&self) -> (&Moments, &Moments) {
        (&self.m, &self.v)
    }

    /// Restores moment estimates and the step count from a checkpoint.
    pub fn restore(
        &mut self,
        step: u32,
        m: HashMap<String, Vec<f32>>,
        v: HashMap<String, Vec<f32>>,
    ) {
        self.step = step;
        self.m = m;
        self.v = v;
    }

    /// One update of every parameter that has a gradient, at base learning rate `lr`, each
    /// gradient multiplied by `grad_scale` first (the clipping factor; 1 for none).
    pub fn update_scaled(
        &mut self,
        params: &mut BTreeMap<String, Tensor>,
        grads: &HashMap<String, Vec<f32>>,
        lr: f32,
        grad_scale: f32,
    ) {
        let _t = crate::profile::scope("adamw");
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        // Moment buffers exist for every parameter with a gradient before the parallel update.
        for (name, g) in grads {
            self.m
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; g.len()]);
            self.v
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; g.len()]);
        }
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let (depth, layer_decay, weight_decay) = (self.depth, self.layer_decay, self.weight_decay);
        let decay_rel_pos = self.decay_rel_pos;
        type Work<'a> = (
            &'a String,
            &'a mut Tensor,
            &'a Vec<f32>,
            &'a mut Vec<f32>,
            &'a mut Vec<f32>,
        );
        let mut work: Vec<Work> = Vec::new();
        let (ms, vs) = (&mut self.m, &mut self.v);
        let mut mref: HashMap<&String, &mut Vec<f32>> = ms.iter_mut().collect();
        let mut vref: HashMap<&String, &mut Vec<f32>> = vs.iter_mut().collect();
        for (name, p) in params.iter_mut() {
            let Some(g) = grads.get(name) else { continue };
            let (Some(m), Some(v)) = (mref.remove(name), vref.remove(name)) else {
                continue;
            };
            work.push((name, p, g, m, v));
        }
        use rayon::prelude::*;
        work.par_iter_mut().for_each(|(name, p, g, m, v)| {
            let lr_p = lr * layer_scale(name, depth, layer_decay);
            let wd = if uses_weight_decay(name, p.shape(), decay_rel_pos) {
                weight_decay
            } else {
                0.0
            };
            let coefs = vecmath::AdamwCoefs {
                beta1: b1,
                beta2: b2,
                eps,
                decay: 1.0 - lr_p * wd,
                step_size: lr_p / bc1,
                sqrt_bc2: bc2.sqrt(),
                grad_scale,
            };
            vecmath::adamw_update(p.as_mut_slice(), g, m, v, coefs);
        });
    }
}

/// The device twin of a CPU optimiser: its hyper-parameters, step count and moments. (Written
/// here, beside the CPU optimiser it reads, so that the backend never imports train.)
#[cfg(feature = "cuda")]
impl crate::backend::cuda::optim::DeviceAdamW {
    pub fn from_cpu(
        dev: &crate::backend::cuda::CudaDevice,
        cpu: &AdamW,
        params: &[(&str, &[usize])],
    ) -> crate::error::Result<Self> {
        let mut opt = Self::new(dev, params, cpu.weight_decay, cpu.layer_decay, cpu.depth)?;
        opt.beta1 = cpu.beta1;
        opt.beta2 = cpu.beta2;
        opt.eps = cpu.eps;
        opt.decay_rel_pos = cpu.decay_rel_pos;
        let (m, v) = cpu.moments();
        opt.restore(dev, cpu.step, m, v)?;
        Ok(opt)
    }
}
