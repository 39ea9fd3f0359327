//! A model ready to run batches on one device: what extraction and `mood forward` drive, whatever
//! the device (`CpuRunner` here, `cuda_model::CudaModel` on a GPU). Both run the one forward of
//! `vit.rs` through their executor.

use crate::error::{Error, Result};
use crate::model::{Output, VisionTransformer};
use crate::tensor::Tensor;

pub trait Runner {
    /// images [B, C, S, S], normalised → features [B, D] and logits [B, C] on the host.
    fn forward(&mut self, images: &Tensor) -> Result<Output>;
    /// `forward` and the last block's patch tokens [B, G, D] (MODE's local features).
    fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)>;
    /// `forward`, the last block's patch tokens when `local`, and for each of `layers` the mean
    /// of that transformer block's output patch tokens [B, L, D] (`mood extract --layers`).
    /// Backbones without a per-block hook in their forward refuse.
    fn forward_layers(
        &mut self,
        _images: &Tensor,
        _layers: &[usize],
        _local: bool,
    ) -> Result<(Output, Option<Tensor>, Tensor)> {
        Err(Error::Usage(
            "--layers: this backbone's forward has no per-block hook (only the transformers' does)"
                .into(),
        ))
    }
}

/// The model on the CPU.
pub struct CpuRunner<'m>(pub &'m VisionTransformer);

impl Runner for CpuRunner<'_> {
    fn forward(&mut self, images: &Tensor) -> Result<Output> {
        self.0.forward(images)
    }

    fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)> {
        self.0.forward_local(images)
    }

    fn forward_layers(
        &mut self,
        images: &Tensor,
        layers: &[usize],
        local: bool,
    ) -> Result<(Output, Option<Tensor>, Tensor)> {
        self.0
            .forward_layers_on(&mut crate::model::exec::Infer, images, layers, local)
    }
}
