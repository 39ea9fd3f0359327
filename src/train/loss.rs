//! Classification losses and their gradients.

use crate::error::{Error, Result};

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

/// MOS's group-softmax loss: logits [B, Σ(size_g + 1)] split into contiguous group slices, slot 0 of
/// each slice being the group's "others" category; `labels[i][g]` is the within-slice target of
/// image i in group g (0 = others, k + 1 = class k of the group). Loss = Σ_g mean_i CE(slice_g, label_g)
/// (a sum over groups, each a batch mean). Returns (loss, dlogits).
pub fn group_softmax(
    logits: &[f32],
    group_sizes: &[usize],
    labels: &[Vec<usize>],
) -> (f32, Vec<f32>) {
    let width: usize = group_sizes.iter().map(|s| s + 1).sum();
    let b = labels.len();
    assert_eq!(logits.len(), b * width);
    let mut grad = vec![0.0f32; logits.len()];
    let mut total = 0.0f32;
    let mut start = 0;
    for (g, &size) in group_sizes.iter().enumerate() {
        let w = size + 1;
        let slice: Vec<f32> = (0..b)
            .flat_map(|i| {
                logits[i * width + start..i * width + start + w]
                    .iter()
                    .copied()
            })
            .collect();
        let y: Vec<usize> = labels.iter().map(|l| l[g]).collect();
        let (l, dg) = cross_entropy(&slice, &y, w, 0.0);
        total += l;
        for i in 0..b {
            grad[i * width + start..i * width + start + w].copy_from_slice(&dg[i * w..(i + 1) * w]);
        }
        start += w;
    }
    (total, grad)
}

/// MOS's labels for class `c` when classes are assigned to groups in order (group g holds
/// `group_sizes[g]` consecutive classes): the class's own group gets its index + 1, every other
/// group 0 ("others"). None if `c` is beyond the groups.
pub fn group_labels(c: usize, group_sizes: &[usize]) -> Option<Vec<usize>> {
    let mut start = 0;
    let mut out = vec![0; group_sizes.len()];
    for (g, &size) in group_sizes.iter().enumerate() {
        if c < start + size {
            out[g] = c - start + 1;
            return Some(out);
        }
        start += size;
    }
    None
}

/// `group_labels` of every image's class: [B][G], or a one-line error naming the first class
/// beyond the groups.
pub fn group_targets(labels: &[usize], group_sizes: &[usize]) -> Result<Vec<Vec<usize>>> {
    labels
        .iter()
        .map(|&c| {
            group_labels(c, group_sizes).ok_or_else(|| {
                Error::Data(format!(
                    "label {c} out of range for groups {group_sizes:?} ({} classes)",
                    group_sizes.iter().sum::<usize>()
                ))
            })
        })
        .collect()
}

/// MOS's prediction (SPEC F): in each group the best non-"others" probability; the class of the
/// group where it is highest, numbered as in `group_labels`.
pub fn group_predict(row: &[f32], group_sizes: &[usize]) -> usize {
    let (mut start, mut first_class) = (0, 0);
    let (mut best, mut best_p) = (0, f64::NEG_INFINITY);
    for &size in group_sizes {
        let slice = &row[start..start + size + 1];
        let m = slice.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let sum: f64 = slice.iter().map(|&v| (v as f64 - m).exp()).sum();
        for k in 0..size {
            let p = (slice[k + 1] as f64 - m).exp() / sum;
            if p > best_p {
                (best, best_p) = (first_class + k, p);
            }
        }
        start += size + 1;
        first_class += size;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_labels_and_prediction_follow_the_class_order() {
        let g = [2, 3];
        assert_eq!(group_labels(0, &g), Some(vec![1, 0]));
        assert_eq!(group_labels(1, &g), Some(vec![2, 0]));
        assert_eq!(group_labels(4, &g), Some(vec![0, 3]));
        assert_eq!(group_labels(5, &g), None);
        // Group 0: others dominates; group 1: its third class (class 4) is confident.
        let row = [5.0, 0.0, 0.0, -1.0, 0.0, 0.0, 4.0];
        assert_eq!(group_predict(&row, &g), 4);
        let row = [0.0, 3.0, 0.0, 2.0, 0.0, 0.0, 0.0];
        assert_eq!(group_predict(&row, &g), 0);
    }
}
