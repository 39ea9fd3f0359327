//! MOS's group-softmax head fine-tuned on extracted features (the backbone frozen), as MOS's
//! `finetune.py` trains it with `num_block_open=0`: a linear head of Σ_g (size_g + 1) logits,
//! zero-initialised (`zero_head=True`), the group-softmax loss (loss.rs `group_softmax`: a sum over
//! groups of the batch-mean cross-entropy, slot 0 of each group being "others"), SGD with momentum
//! 0.9 and no weight decay, and BiT's learning-rate rule (`hyperrule.get_lr`): linear warm-up over
//! the first support, then ÷10 after each later support, stopping at the last; the supports are
//! [100, 200, 300, 400, 500] steps below 20 000 images, [500, 3000, 6000, 9000, 10 000] below
//! 500 000 and [500, 6000, 12 000, 18 000, 20 000] above. MOS's mixup (α = 0.1 from 20 000 images
//! on) mixes images, which features cannot reproduce, so it is left out.
//!
//! Classes reach the groups through a [`GroupLayout`]: each class's (group, index within the
//! group), as MOS's list files give them per image, or classes in order over the group sizes.

use rayon::prelude::*;

use crate::backend::cpu::matmul;
use crate::error::{Error, Result};
use crate::train::loss;

/// Which group, and which place in it, each class has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    /// Classes per group.
    pub sizes: Vec<usize>,
    /// Class c → (group, index within the group).
    pub of_class: Vec<(usize, usize)>,
}

impl GroupLayout {
    /// Classes 0.. assigned to the groups in order (group g holds the next `sizes[g]` classes).
    pub fn in_order(sizes: &[usize]) -> GroupLayout {
        let of_class = sizes
            .iter()
            .enumerate()
            .flat_map(|(g, &n)| (0..n).map(move |i| (g, i)))
            .collect();
        GroupLayout {
            sizes: sizes.to_vec(),
            of_class,
        }
    }

    /// A layout file: line c is class c's `group index` (both from 0, as in MOS's list files).
    /// Every group must be used and its indices must be 0..size without gaps or repeats.
    pub fn parse(text: &str, what: &str) -> Result<GroupLayout> {
        let bad = |line: usize, why: &str| Error::Data(format!("{what} line {line}: {why}"));
        let mut of_class = Vec::new();
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut it = l.split_whitespace().map(str::parse::<usize>);
            match (it.next(), it.next(), it.next()) {
                (Some(Ok(g)), Some(Ok(k)), None) => of_class.push((g, k)),
                _ => return Err(bad(i + 1, "expected `group index` (two integers)")),
            }
        }
        if of_class.is_empty() {
            return Err(Error::Data(format!("{what}: no classes")));
        }
        let groups = of_class.iter().map(|&(g, _)| g).max().unwrap_or(0) + 1;
        let mut seen: Vec<Vec<bool>> = vec![Vec::new(); groups];
        for &(g, k) in &of_class {
            if seen[g].len() <= k {
                seen[g].resize(k + 1, false);
            }
            if seen[g][k] {
                return Err(Error::Data(format!(
                    "{what}: group {g} index {k} is given to two classes"
                )));
            }
            seen[g][k] = true;
        }
        for (g, s) in seen.iter().enumerate() {
            if s.is_empty() || s.contains(&false) {
                return Err(Error::Data(format!(
                    "{what}: group {g} has no classes or a gap in its indices"
                )));
            }
        }
        Ok(GroupLayout {
            sizes: seen.iter().map(Vec::len).collect(),
            of_class,
        })
    }

    /// Logits of the head: each group's classes and its "others".
    pub fn width(&self) -> usize {
        self.sizes.iter().map(|s| s + 1).sum()
    }

    /// MOS's per-group targets for class `c`: index + 1 in its own group, 0 ("others") elsewhere.
    pub fn labels(&self, c: usize) -> Option<Vec<usize>> {
        let &(g, k) = self.of_class.get(c)?;
        let mut out = vec![0; self.sizes.len()];
        out[g] = k + 1;
        Some(out)
    }
}

/// BiT's learning rate at `step` for `n` training images, None once training is over.
pub fn bit_lr(step: usize, n: usize, base_lr: f64) -> Option<f64> {
    let supports: [usize; 5] = if n < 20_000 {
        [100, 200, 300, 400, 500]
    } else if n < 500_000 {
        [500, 3000, 6000, 9000, 10_000]
    } else {
        [500, 6000, 12_000, 18_000, 20_000]
    };
    if step < supports[0] {
        return Some(base_lr * step as f64 / supports[0] as f64);
    }
    if step >= supports[4] {
        return None;
    }
    let decays = supports[1..].iter().filter(|&&s| s < step).count();
    Some(base_lr / 10f64.powi(decays as i32))
}

#[derive(Clone, Debug)]
pub struct MosHeadConfig {
    pub batch: usize,
    pub base_lr: f64,
    pub momentum: f64,
    pub seed: u64,
}

impl Default for MosHeadConfig {
    /// MOS's finetune_group_softmax.sh: batch 512, lr 0.003.
    fn default() -> Self {
        MosHeadConfig {
            batch: 512,
            base_lr: 0.003,
            momentum: 0.9,
            seed: 0,
        }
    }
}

/// The fitted head: weight [W, D], bias [W], W = layout.width(); and the last step's loss.
pub struct MosHead {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub steps: usize,
    pub last_loss: f32,
}

/// Fits the group-softmax head on `features` [n, dim] with class `labels` [n].
pub fn fit(
    features: &[f32],
    dim: usize,
    labels: &[usize],
    layout: &GroupLayout,
    cfg: &MosHeadConfig,
) -> Result<MosHead> {
    let n = labels.len();
    if n == 0 || dim == 0 || features.len() != n * dim {
        return Err(Error::Data(format!(
            "mos head: {} feature values for {n} labels of width {dim}",
            features.len()
        )));
    }
    if cfg.batch == 0 || cfg.base_lr.is_nan() || cfg.base_lr <= 0.0 {
        return Err(Error::Usage(
            "mos head: the batch and learning rate must be positive".into(),
        ));
    }
    let targets: Vec<Vec<usize>> = labels
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            layout.labels(c).ok_or_else(|| {
                Error::Data(format!(
                    "mos head: row {i} has class {c}, the group layout has {} classes",
                    layout.of_class.len()
                ))
            })
        })
        .collect::<Result<_>>()?;
    let w = layout.width();
    let mut weight = vec![0.0f32; w * dim];
    let mut bias = vec![0.0f32; w];
    let (mut vw, mut vb) = (vec![0.0f32; w * dim], vec![0.0f32; w]);
    let mut rng = crate::rng::Rng::new(cfg.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut pos = n;
    let (mut step, mut last_loss) = (0, f32::NAN);
    let b = cfg.batch.min(n);
    while let Some(lr) = bit_lr(step, n, cfg.base_lr) {
        // A new shuffle whenever the previous one is used up (Fisher-Yates).
        if pos + b > n {
            for i in (1..n).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
            pos = 0;
        }
        let rows = &order[pos..pos + b];
        pos += b;
        let x: Vec<f32> = rows
            .iter()
            .flat_map(|&r| features[r * dim..(r + 1) * dim].iter().copied())
            .collect();
        let y: Vec<Vec<usize>> = rows.iter().map(|&r| targets[r].clone()).collect();
        let mut z = matmul::linear_new(&x, &weight, b, dim, w);
        for row in z.chunks_exact_mut(w) {
            row.iter_mut().zip(&bias).for_each(|(v, c)| *v += c);
        }
        let (l, dz) = loss::group_softmax(&z, &layout.sizes, &y);
        last_loss = l;
        // dW [W, D] = dzᵀ [W, B] · x [B, D], as x-major products of the transposes.
        let dzt = transpose(&dz, b, w);
        let xt = transpose(&x, b, dim);
        let gw = matmul::linear_new(&dzt, &xt, w, b, dim);
        let mut gb = vec![0.0f32; w];
        for row in dz.chunks_exact(w) {
            gb.iter_mut().zip(row).for_each(|(g, d)| *g += d);
        }
        // torch.optim.SGD with momentum, no dampening or weight decay: v = μv + g; p −= lr·v.
        let (mu, lr) = (cfg.momentum as f32, lr as f32);
        weight
            .par_iter_mut()
            .zip(vw.par_iter_mut())
            .zip(gw.par_iter())
            .for_each(|((p, v), g)| {
                *v = mu * *v + g;
                *p -= lr * *v;
            });
        for ((p, v), g) in bias.iter_mut().zip(vb.iter_mut()).zip(&gb) {
            *v = mu * *v + g;
            *p -= lr * *v;
        }
        step += 1;
    }
    Ok(MosHead {
        weight,
        bias,
        steps: step,
        last_loss,
    })
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_rule_warms_up_then_steps_down() {
        assert_eq!(bit_lr(0, 100, 0.003), Some(0.0));
        assert_eq!(bit_lr(50, 100, 0.003), Some(0.0015));
        assert_eq!(bit_lr(150, 100, 0.003), Some(0.003));
        assert!((bit_lr(201, 100, 0.003).unwrap() - 0.0003).abs() < 1e-12);
        assert_eq!(bit_lr(500, 100, 0.003), None);
        assert_eq!(bit_lr(5_999, 1_281_167, 0.003), Some(0.003));
        assert!((bit_lr(6_001, 1_281_167, 0.003).unwrap() - 0.0003).abs() < 1e-12);
    }

    #[test]
    fn layouts_parse_and_refuse_gaps() {
        let l = GroupLayout::parse("1 0\n0 0\n0 1\n", "groups.txt").unwrap();
        assert_eq!(l.sizes, vec![2, 1]);
        assert_eq!(l.labels(0), Some(vec![0, 1]));
        assert_eq!(l.labels(2), Some(vec![2, 0]));
        assert_eq!(
            GroupLayout::in_order(&[2, 1]).of_class,
            [(0, 0), (0, 1), (1, 0)]
        );
        for bad in ["0 0\n0 2\n", "0 0\n0 0\n", "0\n", ""] {
            let e = GroupLayout::parse(bad, "groups.txt")
                .unwrap_err()
                .to_string();
            assert!(e.contains("groups.txt"), "{e}");
        }
    }

    #[test]
    fn a_fitted_head_classifies_and_mos_ranks_id_above_ood() {
        // 6 classes in groups of 2, 3 and 1, as Gaussian clusters in 8 dimensions.
        let layout = GroupLayout::in_order(&[2, 3, 1]);
        let (dim, per) = (8, 60);
        let mut rng = crate::rng::Rng::new(7);
        let centres: Vec<Vec<f32>> = (0..6)
            .map(|_| (0..dim).map(|_| 3.0 * rng.normal() as f32).collect())
            .collect();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (c, ctr) in centres.iter().enumerate() {
            for _ in 0..per {
                x.extend(ctr.iter().map(|m| m + 0.5 * rng.normal() as f32));
                y.push(c);
            }
        }
        let cfg = MosHeadConfig {
            batch: 64,
            base_lr: 0.1,
            ..Default::default()
        };
        let head = fit(&x, dim, &y, &layout, &cfg).unwrap();
        assert_eq!(head.steps, 500);
        let w = layout.width();
        let logits = |x: &[f32]| {
            let n = x.len() / dim;
            let mut z = matmul::linear_new(x, &head.weight, n, dim, w);
            for row in z.chunks_exact_mut(w) {
                row.iter_mut().zip(&head.bias).for_each(|(v, c)| *v += c);
            }
            z
        };
        let z = logits(&x);
        let right = z
            .chunks(w)
            .zip(&y)
            .filter(|(r, &c)| loss::group_predict(r, &layout.sizes) == c)
            .count();
        assert!(right as f32 / y.len() as f32 > 0.95, "{right}/{}", y.len());
        // Far-away points score lower than the clusters under MOS.
        let ood: Vec<f32> = (0..per * dim).map(|_| 12.0 * rng.normal() as f32).collect();
        let id_s = crate::ood::logits::mos(&z, &layout.sizes).unwrap();
        let ood_s = crate::ood::logits::mos(&logits(&ood), &layout.sizes).unwrap();
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!(
            mean(&id_s) > mean(&ood_s),
            "{} vs {}",
            mean(&id_s),
            mean(&ood_s)
        );
    }
}
