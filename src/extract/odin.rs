//! ODIN (Liang et al. 2018; SPEC D4), through the model: with ŷ = argmax z(x) and
//! L = CE(z(x)/T, ŷ), perturb the input against the gradient, x' = x − ε·sign(∂L/∂x) (a zero
//! gradient counts as +; the step is in normalised-input units), and score max softmax(z(x')/T).
//! Defaults T = 1000, ε = 0.0014 (SPEC Part 1). Higher = more in-distribution.

use crate::error::{Error, Result};
use crate::model::cpu_train::CpuTrain;
use crate::model::exec::Exec;
use crate::model::train_exec::TrainExec;
use crate::model::VisionTransformer;
use crate::tensor::Tensor;
use crate::train::tape::Tape;

fn softmax_t(row: &[f32], t: f32) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = row
        .iter()
        .map(|&z| ((z as f64 - m) / t as f64).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// ODIN scores of a batch of normalised images [B, C, H, W], on the CPU.
pub fn scores(
    model: &VisionTransformer,
    images: &Tensor,
    temperature: f32,
    epsilon: f32,
) -> Result<Vec<f32>> {
    Ok(scores_on(CpuTrain, model, images, temperature, epsilon)?.0)
}

/// `scores` with the forward, backward and second forward on `exec` (the CPU, or a CUDA
/// device), which is handed back with the scores.
pub fn scores_on<E: TrainExec>(
    exec: E,
    model: &VisionTransformer,
    images: &Tensor,
    temperature: f32,
    epsilon: f32,
) -> Result<(Vec<f32>, E)> {
    if !temperature.is_finite() || temperature <= 0.0 || !epsilon.is_finite() || epsilon < 0.0 {
        return Err(Error::Usage(format!(
            "ODIN needs temperature > 0 and epsilon >= 0, got T = {temperature}, eps = {epsilon}"
        )));
    }
    let no_head = || Error::Usage("ODIN needs a classification head".into());
    let mut tape = Tape::on(exec);
    tape.want_input_grad = true;
    let (_, logits) = model.forward_with(&mut tape, images)?;
    let logits = logits.ok_or_else(no_head)?;
    let z = tape.to_host(&logits)?;
    let c = z.shape()[1];
    // dL/dz of CE(z/T, ŷ) per image: (softmax(z/T) − onehot(ŷ))/T. Only the sign of ∂L/∂x is used,
    // so the batch mean's 1/B factor is left out.
    let mut dz = Vec::with_capacity(z.numel());
    for row in z.as_slice().chunks(c) {
        let p = softmax_t(row, temperature);
        let yhat = (0..c)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(0);
        dz.extend(
            p.iter().enumerate().map(|(k, &pk)| {
                ((pk - f64::from(u8::from(k == yhat))) / temperature as f64) as f32
            }),
        );
    }
    let (grads, mut exec) = tape.backward_keep(vec![(logits, dz)])?;
    let gx = grads
        .input
        .ok_or_else(|| Error::Data("no input gradient was recorded".into()))?;
    let gx = exec.grad_to_host(&gx)?;
    let mut x2 = images.clone();
    for (v, g) in x2.as_mut_slice().iter_mut().zip(&gx) {
        *v -= epsilon * if *g >= 0.0 { 1.0 } else { -1.0 };
    }
    // The second forward on the same executor (a tape whose records are simply dropped).
    let mut tape = Tape::on(exec);
    let (_, z2) = model.forward_with(&mut tape, &x2)?;
    let z2 = tape.to_host(&z2.ok_or_else(no_head)?)?;
    let scores = z2
        .as_slice()
        .chunks(c)
        .map(|row| {
            softmax_t(row, temperature)
                .into_iter()
                .fold(0.0f64, f64::max) as f32
        })
        .collect();
    Ok((scores, tape.into_exec()))
}

/// Where ODIN runs during an extraction, kept across batches so that the parameters go to the
/// device once: the CPU, or the CUDA device the features come from.
pub enum OdinExec {
    Cpu,
    #[cfg(feature = "cuda")]
    CudaF32(crate::model::cuda_exec::CudaExec<f32>),
    #[cfg(feature = "cuda")]
    CudaBf16(crate::model::cuda_exec::CudaExec<half::bf16>),
}

impl OdinExec {
    pub fn new(on: &crate::train::device::TrainOn, model: &VisionTransformer) -> OdinExec {
        match on {
            crate::train::device::TrainOn::Cpu => OdinExec::Cpu,
            #[cfg(feature = "cuda")]
            crate::train::device::TrainOn::Cuda { dev, precision } => {
                use crate::model::cuda_exec::CudaExec;
                let dh = model.cfg.embed_dim / model.cfg.num_heads.max(1);
                let (dev, name) = (std::sync::Arc::clone(dev), &model.cfg.name);
                match precision {
                    crate::backend::Precision::F32 => {
                        OdinExec::CudaF32(CudaExec::new(dev, name, dh))
                    }
                    crate::backend::Precision::Bf16 => {
                        OdinExec::CudaBf16(CudaExec::new(dev, name, dh))
                    }
                }
            }
        }
    }

    /// ODIN scores of one batch (see `scores`).
    pub fn scores(
        &mut self,
        model: &VisionTransformer,
        images: &Tensor,
        temperature: f32,
        epsilon: f32,
    ) -> Result<Vec<f32>> {
        match std::mem::replace(self, OdinExec::Cpu) {
            OdinExec::Cpu => scores(model, images, temperature, epsilon),
            #[cfg(feature = "cuda")]
            OdinExec::CudaF32(e) => {
                let (s, e) = scores_on(e, model, images, temperature, epsilon)?;
                *self = OdinExec::CudaF32(e);
                Ok(s)
            }
            #[cfg(feature = "cuda")]
            OdinExec::CudaBf16(e) => {
                let (s, e) = scores_on(e, model, images, temperature, epsilon)?;
                *self = OdinExec::CudaBf16(e);
                Ok(s)
            }
        }
    }
}
