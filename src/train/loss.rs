//! Classification losses and their gradients.

/// Cross-entropy with label smoothing ε, averaged over the batch, as torch's
/// `CrossEntropyLoss(label_smoothing=ε)`: targets q = (1 − ε)·onehot(y) + ε/C, loss = −Σ q·log softmax(z).
/// Returns (loss, dlogits [B, C]) with dlogits = (softmax(z) − q) / B.
pub fn cross_entropy(
    logits: &[f32],
    labels: &[usize],
    classes: usize,
    smoothing: f32,
) -> (f32, Vec<f32>) {
    let b = labels.len();
    assert_eq!(logits.len(), b * classes);
    let mut grad = vec![0.0f32; logits.len()];
    let mut total = 0.0f64;
    let off = smoothing / classes as f32;
    for (i, (&y, row)) in labels.iter().zip(logits.chunks_exact(classes)).enumerate() {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = m as f64
            + row
                .iter()
                .map(|&v| ((v - m) as f64).exp())
                .sum::<f64>()
                .ln();
        let g = &mut grad[i * classes..(i + 1) * classes];
        for (c, (&z, gc)) in row.iter().zip(g.iter_mut()).enumerate() {
            let q = off + if c == y { 1.0 - smoothing } else { 0.0 };
            let logp = z as f64 - lse;
            total -= q as f64 * logp;
            *gc = ((logp.exp() - q as f64) / b as f64) as f32;
        }
    }
    ((total / b as f64) as f32, grad)
}
