//! ODIN (Liang et al. 2018; SPEC D4), through the model: with ŷ = argmax z(x) and
//! L = CE(z(x)/T, ŷ), perturb the input against the gradient, x' = x − ε·sign(∂L/∂x) (a zero
//! gradient counts as +; the step is in normalised-input units), and score max softmax(z(x')/T).
//! Defaults T = 1000, ε = 0.0014 (SPEC Part 1). Higher = more in-distribution.

use crate::error::{Error, Result};
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

/// ODIN scores of a batch of normalised images [B, C, H, W].
pub fn scores(
    model: &VisionTransformer,
    images: &Tensor,
    temperature: f32,
    epsilon: f32,
) -> Result<Vec<f32>> {
    if !temperature.is_finite() || temperature <= 0.0 || !epsilon.is_finite() || epsilon < 0.0 {
        return Err(Error::Usage(format!(
            "ODIN needs temperature > 0 and epsilon >= 0, got T = {temperature}, eps = {epsilon}"
        )));
    }
    let mut tape = Tape::new();
    tape.want_input_grad = true;
    let (_, logits) = model.forward_with(&mut tape, images)?;
    let logits = logits.ok_or_else(|| Error::Usage("ODIN needs a classification head".into()))?;
    let z = tape.value(&logits).clone();
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
    let grads = tape.backward(logits, dz)?;
    let gx = grads
        .input
        .ok_or_else(|| Error::Data("no input gradient was recorded".into()))?;
    let mut x2 = images.clone();
    for (v, g) in x2.as_mut_slice().iter_mut().zip(&gx) {
        *v -= epsilon * if *g >= 0.0 { 1.0 } else { -1.0 };
    }
    let z2 = model
        .forward(&x2)?
        .logits
        .ok_or_else(|| Error::Usage("ODIN needs a classification head".into()))?;
    Ok(z2
        .as_slice()
        .chunks(c)
        .map(|row| {
            softmax_t(row, temperature)
                .into_iter()
                .fold(0.0f64, f64::max) as f32
        })
        .collect())
}
