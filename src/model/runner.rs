//! A model ready to run batches on one device: what extraction and `mood forward` drive, whatever
//! the device (`CpuRunner` here, `cuda_model::CudaModel` on a GPU). Both run the one forward of
//! `vit.rs` through their executor.

use crate::error::Result;
use crate::model::{Output, VisionTransformer};
use crate::tensor::Tensor;

pub trait Runner {
    /// images [B, C, S, S], normalised → features [B, D] and logits [B, C] on the host.
    fn forward(&mut self, images: &Tensor) -> Result<Output>;
    /// `forward` and the last block's patch tokens [B, G, D] (MODE's local features).
    fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)>;
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
}
