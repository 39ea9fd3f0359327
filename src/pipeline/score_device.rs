//! `--device cpu|cuda|auto` of `mood score` and `mood eval` (and `mood bench --ood`): the methods
//! with a GPU scorer (src/ood/cuda_score.rs: the Mahalanobis family and kNN) score on CUDA device
//! 0, every other method on the CPU, which is said once, on one line. `cuda` without a usable
//! device is a one-line error; `auto` falls back to the CPU with a one-line note (the rule of
//! device::on_cuda, shared with the forward commands).

use crate::backend::Device;
use crate::error::Result;
use crate::ood::detector::{Detector, Inputs};

/// Where scores are computed: the CPU only, or a CUDA device for the methods it supports.
pub struct ScoreDevice {
    #[cfg(feature = "cuda")]
    gpu: Option<crate::backend::cuda::CudaDevice>,
    /// `--device auto`: a GPU scorer that cannot be set up (out of memory) falls back too.
    #[cfg(feature = "cuda")]
    auto: bool,
}

/// A detector ready to score on its device.
pub enum Prepared<'a> {
    Cpu(&'a Detector),
    #[cfg(feature = "cuda")]
    Gpu(&'a Detector, crate::ood::cuda_score::CudaScorer<'a>),
}

impl Prepared<'_> {
    pub fn score(&self, inputs: &Inputs) -> Result<Vec<f32>> {
        match self {
            Prepared::Cpu(det) => det.score(inputs),
            #[cfg(feature = "cuda")]
            Prepared::Gpu(det, gpu) => gpu.score(det.check_features(inputs)?),
        }
    }

    pub fn on_gpu(&self) -> bool {
        !matches!(self, Prepared::Cpu(_))
    }
}

impl ScoreDevice {
    pub fn cpu() -> ScoreDevice {
        ScoreDevice {
            #[cfg(feature = "cuda")]
            gpu: None,
            #[cfg(feature = "cuda")]
            auto: false,
        }
    }

    /// Opens the device `--device` asks for (see the module doc).
    pub fn open(device: Device) -> Result<ScoreDevice> {
        let gpu = super::device::on_cuda(device, "scoring", open_gpu)?;
        #[cfg(not(feature = "cuda"))]
        let _: Option<()> = gpu;
        Ok(ScoreDevice {
            #[cfg(feature = "cuda")]
            gpu,
            #[cfg(feature = "cuda")]
            auto: device == Device::Auto,
        })
    }

    /// Where the scores are computed, for a report's provenance: "cpu (<processor>, N threads)",
    /// or the GPU's name first when the GPU methods score there.
    pub fn describe(&self) -> String {
        let cpu = format!("cpu ({})", crate::backend::cpu::describe());
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return format!(
                "cuda ({}) for {}; {cpu} for the rest",
                gpu.name(),
                gpu_methods()
            );
        }
        cpu
    }

    pub fn on_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.gpu.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Whether `method` would score on the GPU here.
    pub fn runs_on_gpu(&self, method: &str) -> bool {
        #[cfg(feature = "cuda")]
        return self.on_gpu() && crate::ood::cuda_score::supported(method);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = method;
            false
        }
    }

    /// With a GPU in use, one line naming those of `names` that score on the CPU; else nothing.
    pub fn note_cpu_methods(&self, names: &[&str]) {
        let cpu: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.runs_on_gpu(n))
            .collect();
        if self.on_gpu() && !cpu.is_empty() {
            eprintln!(
                "note: no CUDA scorer for {}: scored on the CPU (CUDA scores {})",
                cpu.join(", "),
                gpu_methods()
            );
        }
    }

    /// The detector on this device: its statistics uploaded when its method runs on the GPU.
    pub fn prepare<'a>(&'a self, det: &'a Detector) -> Result<Prepared<'a>> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = &self.gpu {
            match crate::ood::cuda_score::CudaScorer::new(dev, det) {
                Ok(Some(gpu)) => return Ok(Prepared::Gpu(det, gpu)),
                Ok(None) => {}
                Err(e) if self.auto => eprintln!(
                    "note: --device auto: {e}; scoring {} on the CPU",
                    det.method()
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(Prepared::Cpu(det))
    }
}

/// The methods with a GPU scorer, comma-separated.
pub fn gpu_methods() -> String {
    #[cfg(feature = "cuda")]
    return crate::ood::cuda_score::CUDA_METHODS.join(", ");
    #[cfg(not(feature = "cuda"))]
    "none in this build".to_string()
}

#[cfg(feature = "cuda")]
fn open_gpu() -> Result<crate::backend::cuda::CudaDevice> {
    let dev = crate::backend::cuda::CudaDevice::new(0)?;
    eprintln!("cuda: {}", dev.describe());
    Ok(dev)
}

#[cfg(not(feature = "cuda"))]
fn open_gpu() -> Result<()> {
    Err(crate::error::Error::Cuda(
        "this binary was built without the `cuda` feature".into(),
    ))
}
