//! Where a step of MODE's training (train/mode.rs) runs. On the CPU: `loss_and_grads` and
//! `sgd_update` on the host parameters. On a CUDA device: the encoder and its SGD momentum stay
//! on the device (model/cuda_conv_train.rs) and resnet_train.rs's forward and backward run there;
//! each step brings the pooled features and the last map to the host, where SupCon and ALPA
//! (`head_losses`) compute the loss, update their own heads by SGD and send ∂features and ∂map
//! back for the backward and the device's SGD. `sync` brings the encoder and its momentum back to
//! the host maps before a checkpoint.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::model::resnet_train::ResNetTrain;
use crate::tensor::Tensor;
use crate::train::device::TrainOn;
use crate::train::mode::{loss_and_grads, sgd_update, ModeSettings, StepLoss};

pub enum ModeStep {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::model::cuda_conv_train::CudaConvTrain>),
}

impl ModeStep {
    /// A step on `on`, starting from `params` and the momentum buffers in `momentum`.
    pub fn new(
        on: &TrainOn,
        net: &ResNetTrain,
        params: &BTreeMap<String, Tensor>,
        momentum: &BTreeMap<String, Vec<f32>>,
    ) -> Result<ModeStep> {
        match on {
            TrainOn::Cpu => {
                let _ = (net, params, momentum);
                Ok(ModeStep::Cpu)
            }
            #[cfg(feature = "cuda")]
            TrainOn::Cuda { dev, .. } => {
                use crate::model::cuda_conv_train::CudaConvTrain;
                let ex = CudaConvTrain::new(dev.clone(), net, params, momentum)?;
                Ok(ModeStep::Cuda(Box::new(ex)))
            }
        }
    }

    /// The loss of `views` (labels repeated) and, when it is finite, one SGD update at `lr` of
    /// every trained parameter.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        net: &ResNetTrain,
        params: &mut BTreeMap<String, Tensor>,
        momentum: &mut BTreeMap<String, Vec<f32>>,
        views: &Tensor,
        labels: &[usize],
        s: &ModeSettings,
        lr: f32,
    ) -> Result<StepLoss> {
        match self {
            ModeStep::Cpu => {
                let (loss, grads) = loss_and_grads(net, params, views, labels, s)?;
                if loss.total.is_finite() {
                    sgd_update(params, momentum, &grads, lr, s);
                }
                Ok(loss)
            }
            #[cfg(feature = "cuda")]
            // No estimate of a ResNet step's memory up front: a batch that does not fit fails at
            // its first allocation, named here with the option that fixes it.
            ModeStep::Cuda(ex) => {
                cuda_step(ex.as_mut(), net, params, momentum, views, labels, s, lr).map_err(|e| {
                    match e {
                        crate::error::Error::CudaOutOfMemory(what) => {
                            crate::error::Error::Cuda(format!(
                                "out of GPU memory at --batch {} ({what}): use a smaller --batch",
                                s.batch
                            ))
                        }
                        e => e,
                    }
                })
            }
        }
    }

    /// The device's parameters and momentum buffers into the host maps (nothing on the CPU).
    pub fn sync(
        &self,
        params: &mut BTreeMap<String, Tensor>,
        momentum: &mut BTreeMap<String, Vec<f32>>,
    ) -> Result<()> {
        match self {
            ModeStep::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            ModeStep::Cuda(ex) => ex.download(params, momentum),
        }
    }
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn cuda_step(
    ex: &mut crate::model::cuda_conv_train::CudaConvTrain,
    net: &ResNetTrain,
    params: &mut BTreeMap<String, Tensor>,
    momentum: &mut BTreeMap<String, Vec<f32>>,
    views: &Tensor,
    labels: &[usize],
    s: &ModeSettings,
    lr: f32,
) -> Result<StepLoss> {
    use crate::model::conv_train_exec::ConvTrainExec;
    let fw = net.forward_on(&mut *ex, views)?;
    let map = ex.download(&fw.map)?;
    let features = ex.download(&fw.features)?;
    let h = crate::train::mode::head_losses(params, &features, &map, fw.map_dims, labels, s)?;
    let d_map = h.d_map.map(|d| ex.upload(&d)).transpose()?;
    let d_features = h.d_features.map(|d| ex.upload(&d)).transpose()?;
    let bw = net.backward_on(&mut *ex, &fw.tape, fw.map_dims, d_map, d_features.as_ref())?;
    if h.loss.total.is_finite() {
        ex.sgd(&bw.params, lr, s.momentum, s.weight_decay)?;
        sgd_update(params, momentum, &h.grads.into_iter().collect(), lr, s);
    }
    Ok(h.loss)
}
