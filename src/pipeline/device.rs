//! Device choice for every command that computes: the `--device cpu|cuda|auto` rule (`on_cuda`,
//! `cpu_only`), the model that `mood forward` and `mood extract` run their batches through (on the
//! CPU, or on CUDA device 0), and the device training and the demo run on (`open_cuda`,
//! `runner_on`). `--device auto` falls back to the CPU with a one-line note when no device is
//! usable.

use crate::backend::{Device, Precision};
use crate::error::Result;
use crate::model::backbone::Backbone;
use crate::model::runner::{CpuRunner, Runner};
use crate::model::VisionTransformer;
use crate::train::device::TrainOn;

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
    use crate::model::cuda_model::{graphs_from_env, CudaModel};
    let dev = std::sync::Arc::new(CudaDevice::new(0)?);
    eprintln!("cuda: {}", dev.describe());
    // The model name only: free memory and the like change from run to run.
    let name = format!("cuda: {}", dev.name());
    let r: Box<dyn Runner + '_> = match precision {
        Precision::F32 => {
            let mut gpu = CudaModel::<f32>::new(dev, model);
            gpu.check_batch_fits(batch)?;
            gpu.set_graphs(graphs_from_env());
            Box::new(gpu)
        }
        Precision::Bf16 => {
            let mut gpu = CudaModel::<half::bf16>::new(dev, model);
            gpu.check_batch_fits(batch)?;
            gpu.set_graphs(graphs_from_env());
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

/// CUDA device 0 for training (and the tape of ODIN scores), at `precision`.
#[cfg(feature = "cuda")]
pub fn open_cuda(precision: Precision) -> Result<TrainOn> {
    let dev = std::sync::Arc::new(crate::backend::cuda::CudaDevice::new(0)?);
    eprintln!("cuda: {}", dev.describe());
    Ok(TrainOn::Cuda { dev, precision })
}

#[cfg(not(feature = "cuda"))]
pub fn open_cuda(_: Precision) -> Result<TrainOn> {
    Err(crate::error::Error::Cuda(
        "this binary was built without the `cuda` feature".into(),
    ))
}

/// Where to train from `--device` and `--precision` (`doing`, e.g. "training", names the work in
/// `auto`'s note when it falls back to the CPU).
pub fn train_on(device: Device, precision: Precision, doing: &str) -> Result<TrainOn> {
    Ok(on_cuda(device, doing, || open_cuda(precision))?.unwrap_or(TrainOn::Cpu))
}

/// A transformer's forward on the device training ran on (the one forward of vit.rs through its
/// executor), with no memory check: the demo's models are small.
pub fn runner_on<'m>(model: &'m VisionTransformer, on: &TrainOn) -> Box<dyn Runner + 'm> {
    match on {
        TrainOn::Cpu => Box::new(CpuRunner(model)),
        #[cfg(feature = "cuda")]
        TrainOn::Cuda { dev, precision } => {
            use crate::model::cuda_model::CudaModel;
            match precision {
                Precision::F32 => Box::new(CudaModel::<f32>::new(dev.clone(), model)),
                Precision::Bf16 => Box::new(CudaModel::<half::bf16>::new(dev.clone(), model)),
            }
        }
    }
}
