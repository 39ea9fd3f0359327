//! A `VisionTransformer` on one CUDA device: the model's own forward run by `CudaExec`, with the
//! memory a batch needs taken from that executor's buffer plan, measured, so a batch too large
//! fails before it runs and names a batch that fits.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm};

use crate::backend::cuda::CudaDevice;
use crate::backend::memory_budget::{batch_too_large, max_batch_that_fits, HEADROOM_BYTES};
use crate::error::{Error, Result};
use crate::model::cuda_attention::Compute;
use crate::model::cuda_exec::CudaExec;
use crate::model::{Output, VisionTransformer};
use crate::tensor::Tensor;

/// Device bytes of a forward batch: `per_image` more for each image, `fixed` whatever the batch
/// (attention's workspace), both measured as the executor's peak of live activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferPlan {
    pub per_image: usize,
    pub fixed: usize,
}

impl BufferPlan {
    /// The peak bytes a batch of `b` needs, by this plan.
    pub fn bytes(&self, b: usize) -> usize {
        self.fixed + b * self.per_image
    }
}

pub struct CudaModel<'m, T: Compute> {
    pub model: &'m VisionTransformer,
    pub exec: CudaExec<T>,
    plan: Option<BufferPlan>,
}

impl<'m, T: Compute> CudaModel<'m, T>
where
    CudaBlas: Gemm<T>,
{
    /// Nothing is uploaded yet: each parameter goes to the device on its first use.
    pub fn new(dev: Arc<CudaDevice>, model: &'m VisionTransformer) -> CudaModel<'m, T> {
        let cfg = &model.cfg;
        CudaModel {
            exec: CudaExec::new(dev, &cfg.name, cfg.head_dim()),
            model,
            plan: None,
        }
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        self.exec.device()
    }

    /// The buffer plan, measured once by forwards of 1 and 2 blank images (activations grow
    /// linearly with the batch; the workspace does not). This also uploads every parameter.
    pub fn buffer_plan(&mut self) -> Result<BufferPlan> {
        if let Some(p) = self.plan {
            return Ok(p);
        }
        let cfg = &self.model.cfg;
        let mut peak = |b: usize| -> Result<usize> {
            let x = Tensor::zeros(&[b, cfg.in_chans, cfg.img_size, cfg.img_size]);
            self.exec.meter().reset_peak();
            self.model.forward_on(&mut self.exec, &x)?;
            Ok(self.exec.meter().peak())
        };
        let (one, two) = (peak(1)?, peak(2)?);
        let per_image = two.saturating_sub(one);
        let plan = BufferPlan {
            per_image,
            fixed: one.saturating_sub(per_image),
        };
        self.plan = Some(plan);
        Ok(plan)
    }

    /// Fails, before a batch of `b` runs, when it would not fit in the device's free memory
    /// (with `HEADROOM_BYTES` kept back); the message names the largest batch that would.
    pub fn check_batch_fits(&mut self, b: usize) -> Result<()> {
        let plan = self.buffer_plan()?;
        let (free, _) = self.device().memory()?;
        let fixed = plan.fixed + HEADROOM_BYTES;
        if b > max_batch_that_fits(free, plan.per_image, fixed) {
            return Err(Error::Cuda(batch_too_large(b, free, plan.per_image, fixed)));
        }
        Ok(())
    }

    /// An out-of-memory error from a batch of `b` (another process took memory since the check)
    /// as the same advice; other errors unchanged.
    fn batch_error(&self, b: usize, e: Error) -> Error {
        match (e, self.plan) {
            (Error::CudaOutOfMemory(_), Some(plan)) => {
                // The failed forward's buffers are freed by now, so this is what a batch can use.
                let free = self.device().memory().map_or(0, |(free, _)| free);
                let fixed = plan.fixed + HEADROOM_BYTES;
                Error::Cuda(batch_too_large(b, free, plan.per_image, fixed))
            }
            (e, _) => e,
        }
    }

    /// images [B, C, H, W], normalised → features [B, D] and logits [B, C] on the host.
    pub fn forward(&mut self, images: &Tensor) -> Result<Output> {
        let b = images.shape().first().copied().unwrap_or(0);
        self.model
            .forward_on(&mut self.exec, images)
            .map_err(|e| self.batch_error(b, e))
    }

    /// `forward` and the last block's patch tokens [B, G, D] (MODE's local features).
    pub fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)> {
        let b = images.shape().first().copied().unwrap_or(0);
        self.model
            .forward_local_on(&mut self.exec, images)
            .map_err(|e| self.batch_error(b, e))
    }

    /// The forward with its outputs left on the device (queued; `device().sync()` waits): what
    /// a throughput benchmark times.
    pub fn forward_queued(&mut self, images: &Tensor) -> Result<()> {
        let b = images.shape().first().copied().unwrap_or(0);
        self.model
            .forward_with(&mut self.exec, images)
            .map(drop)
            .map_err(|e| self.batch_error(b, e))
    }
}

impl<T: Compute> crate::model::runner::Runner for CudaModel<'_, T>
where
    CudaBlas: Gemm<T>,
{
    fn forward(&mut self, images: &Tensor) -> Result<Output> {
        CudaModel::forward(self, images)
    }

    fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)> {
        CudaModel::forward_local(self, images)
    }

    fn forward_layers(
        &mut self,
        images: &Tensor,
        layers: &[usize],
        local: bool,
    ) -> Result<(Output, Option<Tensor>, Tensor)> {
        let b = images.shape().first().copied().unwrap_or(0);
        self.model
            .forward_layers_on(&mut self.exec, images, layers, local)
            .map_err(|e| self.batch_error(b, e))
    }
}
