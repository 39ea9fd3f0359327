//! Launchers of kernels/optim.cu: the gradients' joint L2 norm for clipping, and `DeviceAdamW`,
//! AdamW over every parameter in one multi-tensor launch with the moments kept on the device.
//! Same semantics as src/train/optim.rs (`grad_norm`, `AdamW::update_scaled`): bias correction,
//! decoupled weight decay by MOOD's parameter groups (`uses_weight_decay`), layer-wise lr decay
//! (`layer_scale`; both in src/param_groups.rs, since the backend imports nothing from train) and
//! the clipping factor applied to each gradient inside the update. `DeviceAdamW::from_cpu` is
//! written in src/train/optim.rs, beside the CPU optimiser it copies.
//!
//! Clipping: `grad_norm` downloads the norm (8 bytes, one sync per step) and the caller computes
//! `train::optim::clip_coef` on the host, passing it to `DeviceAdamW::step` as `grad_scale`.

use std::collections::HashMap;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
use super::{ptr_mut_or_null, ptr_or_null};
use crate::error::{Error, Result};
use crate::param_groups::{layer_scale, uses_weight_decay, Moments};

/// Elements per block of the multi-tensor kernels (`OPT_CHUNK` in kernels/optim.cu).
const CHUNK: usize = 16384;

/// first [T + 1]: the first chunk of each tensor of these lengths; first[T] = the chunk count.
fn chunk_starts(lens: impl Iterator<Item = usize>) -> Result<Vec<i32>> {
    let mut first = vec![0i32];
    let mut k = 0usize;
    for len in lens {
        k += len.div_ceil(CHUNK);
        first.push(as_i32("optimizer chunks", k)?);
    }
    Ok(first)
}

fn one_block_per_chunk(chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (chunks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Σ_t Σ_i g_t[i]² over every gradient, as a 1-element device buffer (f64). Summed in a fixed
/// order: each chunk of 16384 elements of one tensor in f64 (an f32 square is exact in f64) by a
/// fixed tree over 256 threads, the chunks of a tensor in order, then the tensors in the order
/// given. The CPU's `train::optim::grad_norm` also sums in f64, in another order; the two agree
/// to about 1e-15 relative, so the f32 norms almost always have the same bits.
pub fn grad_sq_norm(dev: &CudaDevice, grads: &[&CudaSlice<f32>]) -> Result<CudaSlice<f64>> {
    let t = grads.len();
    let mut total = dev.zeros::<f64>(1)?;
    let first = chunk_starts(grads.iter().map(|g| g.len()))?;
    let chunks = first[t] as usize;
    if chunks == 0 {
        return Ok(total);
    }
    let s = dev.stream();
    let table: Vec<u64> = grads
        .iter()
        .flat_map(|g| [ptr_or_null(s, Some(*g)), g.len() as u64])
        .collect();
    let ti = as_i32("tensors", t)?;
    let (table, first_d) = (dev.upload(&table)?, dev.upload(&first)?);
    let mut part = dev.empty::<f64>(chunks)?;
    let mut per_tensor = dev.empty::<f64>(t)?;
    let f = dev.function("optim", "sq_norm_part")?;
    // SAFETY: the table holds (pointer, length) of T live gradients (frees are ordered on the
    // device's one stream, after this kernel); part holds one value per chunk, first T + 1
    // chunk starts.
    unsafe {
        launch!(
            dev,
            f,
            "sq_norm_part",
            one_block_per_chunk(chunks),
            [&table, &first_d, &ti, &mut part]
        )
    }?;
    let f = dev.function("optim", "sq_norm_finish")?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: part holds first[T] values, per_tensor T, total 1.
    unsafe {
        launch!(
            dev,
            f,
            "sq_norm_finish",
            cfg,
            [&part, &first_d, &ti, &mut per_tensor, &mut total]
        )
    }?;
    Ok(total)
}

/// The joint L2 norm of the gradients, as `train::optim::grad_norm` (√ of the f64 sum, then
/// f32): `grad_sq_norm` and one 8-byte download.
pub fn grad_norm(dev: &CudaDevice, grads: &[&CudaSlice<f32>]) -> Result<f32> {
    let sq = dev.download(&grad_sq_norm(dev, grads)?)?;
    Ok(sq[0].sqrt() as f32)
}

/// One parameter's optimiser state.
struct Slot {
    name: String,
    shape: Vec<usize>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    /// Updated at least once (or restored): only these are in `moments`, as on the CPU, whose
    /// moments exist only for parameters that had a gradient.
    live: bool,
}

/// AdamW with its first and second moments on the device, one pair of zero-initialised buffers
/// per parameter, registered by name at construction. Hyper-parameters and defaults are those of
/// `train::optim::AdamW` (β = (0.9, 0.999), eps = 1e-8, the relative-position tables decayed).
pub struct DeviceAdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub layer_decay: f32,
    /// Decay the relative-position tables (MOOD) or not (timm).
    pub decay_rel_pos: bool,
    pub depth: usize,
    /// Updates done so far (bias correction uses step + 1 at the next one).
    pub step: u32,
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
}

/// One parameter of a step: (name, value [len] updated in place, gradient [len]).
pub type StepParam<'a> = (&'a str, &'a mut CudaSlice<f32>, &'a CudaSlice<f32>);

impl DeviceAdamW {
    /// Moments for every (name, shape) in `params` (zeros on the device); the shape decides the
    /// weight-decay group as on the CPU (1-D tensors are not decayed).
    pub fn new(
        dev: &CudaDevice,
        params: &[(&str, &[usize])],
        weight_decay: f32,
        layer_decay: f32,
        depth: usize,
    ) -> Result<DeviceAdamW> {
        let mut slots = Vec::with_capacity(params.len());
        let mut by_name = HashMap::new();
        for &(name, shape) in params {
            if by_name.insert(name.to_string(), slots.len()).is_some() {
                return Err(Error::Data(format!(
                    "DeviceAdamW: parameter {name} given twice"
                )));
            }
            let len = shape.iter().product();
            slots.push(Slot {
                name: name.to_string(),
                shape: shape.to_vec(),
                m: dev.zeros(len)?,
                v: dev.zeros(len)?,
                live: false,
            });
        }
        Ok(DeviceAdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            layer_decay,
            decay_rel_pos: true,
            depth,
            step: 0,
            slots,
            by_name,
        })
    }

    /// One AdamW update of every parameter in `params` at base learning rate `lr`, each gradient
    /// multiplied by `grad_scale` first (the clipping factor, `train::optim::clip_coef`; 1 for
    /// none): per tensor lr_t = lr · layer_scale(name), weight decay by `uses_weight_decay`, then
    /// torch.optim.AdamW's update (kernels/optim.cu), all tensors in one launch. Every name must
    /// be registered, once, with value and gradient of its length; otherwise nothing is updated
    /// and the step count stays.
    pub fn step(
        &mut self,
        dev: &CudaDevice,
        params: &mut [StepParam<'_>],
        lr: f32,
        grad_scale: f32,
    ) -> Result<()> {
        let mut seen = vec![false; self.slots.len()];
        let mut idx = Vec::with_capacity(params.len());
        for (name, p, g) in params.iter() {
            let i = *self.by_name.get(*name).ok_or_else(|| {
                Error::Data(format!("DeviceAdamW: no moments for parameter {name}"))
            })?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(Error::Data(format!(
                    "DeviceAdamW: parameter {name} given twice in one step"
                )));
            }
            let len = self.slots[i].m.len();
            check_len(&format!("adamw {name}"), p, len)?;
            check_len(&format!("adamw {name} gradient"), g, len)?;
            idx.push(i);
        }
        // The step count and the live flags change only once the update is queued.
        let step = self.step + 1;
        // The CPU's coefficients, computed the same way in f32.
        let bc1 = 1.0 - self.beta1.powi(step as i32);
        let bc2 = 1.0 - self.beta2.powi(step as i32);
        let sqrt_bc2 = bc2.sqrt();
        let first = chunk_starts(idx.iter().map(|&i| self.slots[i].m.len()))?;
        let chunks = *first.last().unwrap_or(&0) as usize;
        let commit = |opt: &mut DeviceAdamW| {
            opt.step = step;
            for &i in &idx {
                opt.slots[i].live = true;
            }
        };
        if chunks == 0 {
            commit(self);
            return Ok(());
        }
        // (1 − lr_t·wd_t, lr_t / (1 − β1ᵗ)) per tensor, the CPU's coefficients in f32.
        let coef: Vec<f32> = params
            .iter()
            .zip(&idx)
            .flat_map(|((name, _, _), &i)| {
                let lr_t = lr * layer_scale(name, self.depth, self.layer_decay);
                let decays = uses_weight_decay(name, &self.slots[i].shape, self.decay_rel_pos);
                let wd = if decays { self.weight_decay } else { 0.0 };
                [1.0 - lr_t * wd, lr_t / bc1]
            })
            .collect();
        let s = dev.stream().clone();
        let mut table = Vec::with_capacity(5 * params.len());
        // Per-slot mutable borrows of m and v, taken in the order of `params`.
        let mut mv: Vec<Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>> = self
            .slots
            .iter_mut()
            .map(|s| Some((&mut s.m, &mut s.v)))
            .collect();
        for ((_, p, g), &i) in params.iter_mut().zip(&idx) {
            let (m, v) = mv[i].take().expect("each slot once (checked above)");
            table.extend([
                ptr_mut_or_null(&s, Some(&mut **p)),
                ptr_or_null(&s, Some(*g)),
                ptr_mut_or_null(&s, Some(m)),
                ptr_mut_or_null(&s, Some(v)),
                g.len() as u64,
            ]);
        }
        let ti = as_i32("tensors", params.len())?;
        let (table, coef, first) = (dev.upload(&table)?, dev.upload(&coef)?, dev.upload(&first)?);
        let f = dev.function("optim", "adamw_step")?;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        // SAFETY: the table holds the addresses of T live (value, gradient, m, v) quadruples of
        // the checked lengths, none aliasing another (distinct names, distinct slots). Frees are
        // ordered on the device's one stream, so a buffer dropped after this returns (the table
        // too) is released only after the kernel has run.
        unsafe {
            launch!(
                dev,
                f,
                "adamw_step",
                one_block_per_chunk(chunks),
                [
                    &table,
                    &coef,
                    &first,
                    &ti,
                    &b1,
                    &b2,
                    &eps,
                    &sqrt_bc2,
                    &grad_scale
                ]
            )
        }?;
        commit(self);
        Ok(())
    }

    /// The moments of every parameter updated (or restored) so far, by name, downloaded: what a
    /// checkpoint stores, as `train::optim::AdamW::moments`.
    pub fn moments(&self, dev: &CudaDevice) -> Result<(Moments, Moments)> {
        let (mut m, mut v) = (HashMap::new(), HashMap::new());
        for s in self.slots.iter().filter(|s| s.live) {
            m.insert(s.name.clone(), dev.download(&s.m)?);
            v.insert(s.name.clone(), dev.download(&s.v)?);
        }
        Ok((m, v))
    }

    /// Restores the step count and moments from a checkpoint, as `AdamW::restore`: parameters
    /// absent from both maps start again from zeros. A name that is not registered, or a moment
    /// of another length, is an error (and nothing is changed).
    pub fn restore(&mut self, dev: &CudaDevice, step: u32, m: &Moments, v: &Moments) -> Result<()> {
        for (what, map) in [("m", m), ("v", v)] {
            for (name, vals) in map {
                let i = *self.by_name.get(name).ok_or_else(|| {
                    Error::Data(format!("DeviceAdamW restore: unknown parameter {name}"))
                })?;
                let want = self.slots[i].m.len();
                if vals.len() != want {
                    return Err(Error::Data(format!(
                        "DeviceAdamW restore: {what} of {name} has {} values, the parameter {want}",
                        vals.len()
                    )));
                }
            }
        }
        for s in &mut self.slots {
            let len = s.m.len();
            let load = |map: &Moments| match map.get(&s.name) {
                Some(vals) => dev.upload(vals),
                None => dev.zeros(len),
            };
            let (nm, nv) = (load(m)?, load(v)?);
            s.live = m.contains_key(&s.name) || v.contains_key(&s.name);
            s.m = nm;
            s.v = nv;
        }
        self.step = step;
        Ok(())
    }
}
