//! The model that `mood forward` and `mood extract` run their batches through: on the CPU, or on
//! CUDA device 0 (`--device cuda`), with `--device auto` falling back to the CPU with a one-line
//! note when no device is usable.

use super::bench::{Device, Precision};
use crate::error::Result;
use crate::model::backbone::Backbone;
use crate::model::runner::Runner;
use crate::model::VisionTransformer;

/// The model on `device`. On CUDA, `batch` (the largest batch it will be given) is checked
/// against the free device memory first, so that a batch too big fails now with one that fits.
pub fn runner(
    model: &Backbone,
    device: Device,
    precision: Precision,
    batch: usize,
) -> Result<Box<dyn Runner + '_>> {
    Ok(runner_described(model, device, precision, batch)?.0)
}

/// `runner`, with where it runs: "cpu" or "cuda: <device>" (a store records it, since another
/// device rounds differently).
pub fn runner_described(
    model: &Backbone,
    device: Device,
    precision: Precision,
    batch: usize,
) -> Result<(Box<dyn Runner + '_>, String)> {
    let Some(vit) = model.as_vit() else {
        let cuda = on_cuda(device, "running", || cuda_conv_runner(model, precision))?;
        return Ok(cuda.unwrap_or_else(|| (model.cpu_runner(), "cpu".into())));
    };
    let cuda = on_cuda(device, "running", || cuda_runner(vit, precision, batch))?;
    Ok(cuda.unwrap_or_else(|| (model.cpu_runner(), "cpu".into())))
}

/// The `--device` rule of every command that computes: `cpu` → None; `cuda` → `open()`, whose
/// error (no usable device) is the command's one-line error; `auto` → `open()`, or None after a
/// one-line note saying why and that the work is `doing` ("running", "scoring") on the CPU.
pub fn on_cuda<T>(
    device: Device,
    doing: &str,
    open: impl FnOnce() -> Result<T>,
) -> Result<Option<T>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda => open().map(Some),
        Device::Auto => Ok(open()
            .inspect_err(|e| eprintln!("note: --device auto: {e}; {doing} on the CPU"))
            .ok()),
    }
}

/// `--device` of a command whose work has no CUDA path yet (`what`, e.g. "training"): `cuda`
/// is refused in one line, `auto` notes that it runs on the CPU.
pub fn cpu_only(device: Device, what: &str, why: &str) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda => Err(crate::error::Error::Usage(format!(
            "--device cuda: {what} runs on the CPU in this version ({why}); use --device cpu or auto"
        ))),
        Device::Auto => {
            eprintln!("note: --device auto: {what} runs on the CPU ({why})");
            Ok(())
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_runner(
    model: &VisionTransformer,
    precision: Precision,
    batch: usize,
) -> Result<(Box<dyn Runner + '_>, String)> {
    use crate::backend::cuda::CudaDevice;
    use crate::model::cuda_model::CudaModel;
    let dev = std::sync::Arc::new(CudaDevice::new(0)?);
    eprintln!("cuda: {}", dev.describe());
    // The model name only: free memory and the like change from run to run.
    let name = format!("cuda: {}", dev.name());
    let r: Box<dyn Runner + '_> = match precision {
        Precision::F32 => {
            let mut gpu = CudaModel::<f32>::new(dev, model);
            gpu.check_batch_fits(batch)?;
            Box::new(gpu)
        }
        Precision::Bf16 => {
            let mut gpu = CudaModel::<half::bf16>::new(dev, model);
            gpu.check_batch_fits(batch)?;
            Box::new(gpu)
        }
    };
    Ok((r, name))
}

/// A ResNet or BiT on CUDA device 0 (src/model/cuda_conv.rs).
#[cfg(feature = "cuda")]
pub fn cuda_conv_runner(
    model: &Backbone,
    precision: Precision,
) -> Result<(Box<dyn Runner + '_>, String)> {
    use crate::backend::cuda::CudaDevice;
    use crate::model::cuda_conv::{ConvNet, CudaConvModel};
    let net = match model {
        Backbone::ResNet(m) => ConvNet::ResNet(m),
        Backbone::Bit(m) => ConvNet::Bit(m),
        Backbone::Vit(_) => {
            return Err(crate::error::Error::Usage(
                "a vision transformer runs on CudaModel, not the convolutional executor".into(),
            ))
        }
    };
    let dev = std::sync::Arc::new(CudaDevice::new(0)?);
    eprintln!("cuda: {}", dev.describe());
    let name = format!("cuda: {}", dev.name());
    let r: Box<dyn Runner + '_> = match precision {
        Precision::F32 => Box::new(CudaConvModel::<f32>::new(dev, net)),
        Precision::Bf16 => Box::new(CudaConvModel::<half::bf16>::new(dev, net)),
    };
    Ok((r, name))
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_conv_runner(
    _model: &Backbone,
    _precision: Precision,
) -> Result<(Box<dyn Runner + '_>, String)> {
    Err(crate::error::Error::Cuda(
        "this binary was built without the `cuda` feature".into(),
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner(
    _model: &VisionTransformer,
    _precision: Precision,
    _batch: usize,
) -> Result<(Box<dyn Runner + '_>, String)> {
    Err(crate::error::Error::Cuda(
        "this binary was built without the `cuda` feature".into(),
    ))
}
