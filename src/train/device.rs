//! Where a training step runs. A step (train/step.rs) is written once over `TrainDevice`: it asks
//! for a tape, runs the model's forward on it, computes the loss on the tape's executor (only the
//! scalar comes back to the host), and hands the tape back with the loss's gradient for backward,
//! clipping and the update. `OnCpu` updates the
//! host parameters with `optim::AdamW`; `OnCuda` keeps f32 masters and AdamW's moments on the
//! device (one multi-tensor launch per step) and copies them back only when the loop saves.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::model::config::VitConfig;
use crate::model::cpu_train::CpuTrain;
use crate::model::train_exec::TrainExec;
use crate::tensor::Tensor;
use crate::train::optim::{clip_and_update, AdamW};
use crate::train::tape::{Tape, Var};

/// Where `mood finetune` and `mood pretrain` train.
#[derive(Clone)]
pub enum TrainOn {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda {
        dev: std::sync::Arc<crate::backend::cuda::CudaDevice>,
        precision: crate::backend::Precision,
    },
}

impl TrainOn {
    /// What a checkpoint's provenance says about where it was trained.
    pub fn describe(&self) -> String {
        match self {
            TrainOn::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            TrainOn::Cuda { dev, precision } => {
                format!("cuda: {} ({precision:?})", dev.name())
            }
        }
    }
}

pub trait TrainDevice {
    type E: TrainExec;
    /// Called once before the first step, with the parameters and optimiser state to start from.
    fn start(&mut self, params: &BTreeMap<String, Tensor>, opt: &AdamW) -> Result<()>;
    /// A tape for one step, with drop-path at `drop_path` (linspace over `depth` blocks).
    fn tape(&mut self, drop_path: f32, depth: usize, seed: u64) -> Result<Tape<Self::E>>;
    /// Backward from `seeds` (gradients on the executor), gradient clipping at `clip` (0: none) and one AdamW update at `lr`;
    /// returns the gradient norm before clipping.
    fn update(
        &mut self,
        tape: Tape<Self::E>,
        seeds: Vec<(Var, <Self::E as TrainExec>::Grad)>,
        params: &mut BTreeMap<String, Tensor>,
        opt: &mut AdamW,
        lr: f32,
        clip: f32,
    ) -> Result<f32>;
    /// Brings the parameters and the optimiser state back to the host (before a checkpoint).
    fn sync(&mut self, params: &mut BTreeMap<String, Tensor>, opt: &mut AdamW) -> Result<()>;
    /// Fails, before anything is on the device, when a step of `batch` images of `cfg` with
    /// `params` would not fit in the device's free memory, naming the largest batch that would.
    /// The host has no such limit.
    fn check_batch_fits(
        &mut self,
        _cfg: &VitConfig,
        _params: &BTreeMap<String, Tensor>,
        _batch: usize,
    ) -> Result<()> {
        Ok(())
    }
}

/// Device bytes of one training step (`train_step_bytes`): `fixed` whatever the batch, plus
/// `per_image` for each image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainBytes {
    pub fixed: usize,
    pub per_image: usize,
}

/// An estimate, from the shapes alone, of the device memory a training step of `cfg` needs, at
/// `low` bytes per value of the blocks' GEMM operands (4: f32, 2: bf16). The fixed part is what
/// lives across steps or is made once per step whatever the batch: the f32 masters, AdamW's two
/// moments, the parameter gradients, the T copies of the weights the forward derives, and the
/// dense relative-position biases [H, N, N] per block. Per image, in f32 (the training executor
/// keeps f32 activations; bf16 only narrows GEMM operand copies, counted at f32 too, so this errs
/// high): the input image; per block what the tape keeps for backward, ten [N, D] activations
/// (norm1, qkv counted as three, attention out, proj, residual, norm2, fc2, residual, input),
/// fc1 before and after GELU [N, M], and the attention probabilities with the scores
/// [H, N, N] twice; then one block's backward scratch in flight (four [N, D], one [N, M], two
/// [H, N, N]), the patch embedding and final norm (four [N, D]), and the head's logits and their
/// gradient over every token ([N, V] twice, V the widest head: the classes, or MIM's vocabulary).
/// With ALPA's MLPs among the parameters, the fixed part also holds ALPA's scratch bound.
pub fn train_step_bytes(
    cfg: &VitConfig,
    params: &BTreeMap<String, Tensor>,
    low: usize,
) -> TrainBytes {
    let p: usize = params.values().map(|t| t.numel()).sum();
    let (n, d, m, h, l) = (
        cfg.tokens(),
        cfg.embed_dim,
        cfg.mlp_hidden,
        cfg.num_heads,
        cfg.depth,
    );
    let head = ["head.weight", "lm_head.weight"]
        .iter()
        .filter_map(|k| params.get(*k).and_then(|t| t.shape().first().copied()))
        .max()
        .unwrap_or(cfg.num_classes);
    let (nd, nm, hnn) = (n * d, n * m, h * n * n);
    let mut fixed = p * (4 * 4 + low) + l * hnn * 4;
    // ALPA (finetune --alpa) allocates its cross terms' scratch per step, bounded whatever the
    // batch.
    if params.keys().any(|k| k.starts_with("alpa.")) {
        fixed += crate::backend::memory_budget::ALPA_SCRATCH_BYTES;
    }
    let per_block = 10 * nd + 2 * nm + 2 * hnn;
    let values = cfg.in_chans * cfg.img_size * cfg.img_size
        + l * per_block
        + (4 * nd + nm + 2 * hnn)
        + 4 * nd
        + 2 * n * head;
    TrainBytes {
        fixed,
        per_image: values * 4,
    }
}

/// Training on the CPU: the host parameters are updated in place.
pub struct OnCpu;

impl TrainDevice for OnCpu {
    type E = CpuTrain;

    fn start(&mut self, _: &BTreeMap<String, Tensor>, _: &AdamW) -> Result<()> {
        Ok(())
    }

    fn tape(&mut self, drop_path: f32, depth: usize, seed: u64) -> Result<Tape> {
        Ok(Tape::with_drop_path(drop_path, depth, seed))
    }

    fn update(
        &mut self,
        tape: Tape,
        seeds: Vec<(Var, Vec<f32>)>,
        params: &mut BTreeMap<String, Tensor>,
        opt: &mut AdamW,
        lr: f32,
        clip: f32,
    ) -> Result<f32> {
        let (grads, _) = tape.backward_from(seeds)?;
        Ok(clip_and_update(opt, params, &grads.params, lr, clip))
    }

    fn sync(&mut self, _: &mut BTreeMap<String, Tensor>, _: &mut AdamW) -> Result<()> {
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub use cuda::OnCuda;

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use cudarc::cublas::{CudaBlas, Gemm};

    use super::TrainDevice;
    use crate::backend::cuda::optim::{grad_norm, DeviceAdamW, StepParam};
    use crate::backend::cuda::CudaDevice;
    use crate::backend::memory_budget::{batch_too_large, max_batch_that_fits, HEADROOM_BYTES};
    use crate::error::{Error, Result};
    use crate::model::config::VitConfig;
    use crate::model::cuda_attention::Compute;
    use crate::model::cuda_exec::CudaExec;
    use crate::tensor::Tensor;
    use crate::train::optim::{clip_coef, AdamW};
    use crate::train::tape::{Tape, Var};

    /// Training on a CUDA device at precision T (autocast's rule, model/cuda_exec.rs).
    pub struct OnCuda<T: Compute> {
        dev: Arc<CudaDevice>,
        model: String,
        head_dim: usize,
        exec: Option<CudaExec<T>>,
        opt: Option<DeviceAdamW>,
    }

    impl<T: Compute> OnCuda<T>
    where
        CudaBlas: Gemm<T>,
    {
        /// For model `model` (its name chooses the attention path) with head dim `head_dim`.
        pub fn new(dev: Arc<CudaDevice>, model: &str, head_dim: usize) -> OnCuda<T> {
            OnCuda {
                dev,
                model: model.into(),
                head_dim,
                exec: None,
                opt: None,
            }
        }

        fn lost() -> Error {
            Error::Cuda("the CUDA training state was lost after an earlier error".into())
        }
    }

    impl<T: Compute> TrainDevice for OnCuda<T>
    where
        CudaBlas: Gemm<T>,
    {
        type E = CudaExec<T>;

        fn start(&mut self, params: &BTreeMap<String, Tensor>, opt: &AdamW) -> Result<()> {
            let mut exec = CudaExec::<T>::new(Arc::clone(&self.dev), &self.model, self.head_dim);
            exec.set_masters(params)?;
            let shapes: Vec<(&str, &[usize])> = params
                .iter()
                .map(|(k, t)| (k.as_str(), t.shape()))
                .collect();
            self.opt = Some(DeviceAdamW::from_cpu(&self.dev, opt, &shapes)?);
            self.exec = Some(exec);
            Ok(())
        }

        fn tape(&mut self, drop_path: f32, depth: usize, seed: u64) -> Result<Tape<CudaExec<T>>> {
            let exec = self.exec.take().ok_or_else(Self::lost)?;
            let mut tape = Tape::on(exec);
            tape.set_drop_path(drop_path, depth, seed);
            Ok(tape)
        }

        fn update(
            &mut self,
            tape: Tape<CudaExec<T>>,
            seeds: Vec<(Var, cudarc::driver::CudaSlice<f32>)>,
            _params: &mut BTreeMap<String, Tensor>,
            _opt: &mut AdamW,
            lr: f32,
            clip: f32,
        ) -> Result<f32> {
            let (grads, mut exec) = tape.backward_from(seeds)?;
            let mut names: Vec<&String> = grads.params.keys().collect();
            names.sort();
            // The norm sums the tensors in name order, so a run repeats bit for bit.
            let sorted: Vec<_> = names.iter().map(|n| &grads.params[*n]).collect();
            let norm = grad_norm(&self.dev, &sorted)?;
            let opt = self.opt.as_mut().ok_or_else(Self::lost)?;
            let masters = exec.masters_mut();
            if let Some(stray) = names.iter().find(|n| !masters.contains_key(n.as_str())) {
                return Err(Error::Cuda(format!(
                    "gradient of `{stray}`, which is not a trained parameter"
                )));
            }
            let mut list: Vec<StepParam> = masters
                .iter_mut()
                .filter_map(|(k, m)| grads.params.get(k).map(|g| (k.as_str(), m, g)))
                .collect();
            opt.step(&self.dev, &mut list, lr, clip_coef(norm, clip))?;
            exec.refresh_params();
            self.exec = Some(exec);
            Ok(norm)
        }

        fn check_batch_fits(
            &mut self,
            cfg: &VitConfig,
            params: &BTreeMap<String, Tensor>,
            batch: usize,
        ) -> Result<()> {
            let need = super::train_step_bytes(cfg, params, std::mem::size_of::<T>());
            let (free, _) = self.dev.memory()?;
            let fixed = need.fixed + HEADROOM_BYTES;
            if batch > max_batch_that_fits(free, need.per_image, fixed) {
                return Err(Error::Cuda(batch_too_large(
                    batch,
                    free,
                    need.per_image,
                    fixed,
                )));
            }
            Ok(())
        }

        fn sync(&mut self, params: &mut BTreeMap<String, Tensor>, opt: &mut AdamW) -> Result<()> {
            let exec = self.exec.as_ref().ok_or_else(Self::lost)?;
            for (name, values) in exec.download_masters()? {
                let shape = params
                    .get(&name)
                    .map(|t| t.shape().to_vec())
                    .unwrap_or_else(|| vec![values.len()]);
                params.insert(name, Tensor::from_vec(&shape, values)?);
            }
            let dopt = self.opt.as_ref().ok_or_else(Self::lost)?;
            let (m, v) = dopt.moments(&self.dev)?;
            opt.restore(dopt.step, m, v);
            Ok(())
        }
    }
}
