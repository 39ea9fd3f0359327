//! The supervised contrastive loss (SupCon, Khosla et al. 2020) on a projection head, as MODE's
//! training uses it (SPEC E): forward and backward over plain arrays.
//!
//! Head (`head.0`, `head.2`, nn.Linear layout): p = W₂·ReLU(W₀·f + b₀) + b₂,
//! z = p / max(‖p‖, 1e-12) (F.normalize). M = 2B views, view-major (all first views, then all
//! second views, as SupCon's `torch.cat(torch.unbind(features, 1))`), labels repeated.
//! logits_ij = z_i·z_j / T; P(i) = the other views with i's label ('all' contrast mode);
//! L = −(T/T_base)·(1/M)·Σ_i Σ_{j∈P(i)} (logits_ij − log Σ_{k≠i} exp logits_ik) / |P(i)|
//! (an anchor with no positive adds nothing). T = 0.1, T_base = 0.07 in MODE.

use crate::backend::cpu::matmul::{linear_backward, linear_new};

/// The projection head's parameter names, in nn.Linear layout: weight [out, in], bias [out].
pub const HEAD_NAMES: [&str; 4] = [
    "head.0.weight",
    "head.0.bias",
    "head.2.weight",
    "head.2.bias",
];

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SupCon {
    pub temperature: f32,
    pub base_temperature: f32,
}

impl Default for SupCon {
    fn default() -> SupCon {
        SupCon {
            temperature: 0.1,
            base_temperature: 0.07,
        }
    }
}

pub struct SupConOutput {
    pub loss: f32,
    /// ∂L/∂features [M, F]
    pub d_features: Vec<f32>,
    /// ∂L/∂head parameters in `HEAD_NAMES` order.
    pub d_head: [Vec<f32>; 4],
}

fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
    }
}

impl SupCon {
    /// Loss and gradients for pooled features [M, F] through the head (`head` in `HEAD_NAMES`
    /// order, hidden width F, output width `proj`).
    pub fn forward_backward(
        &self,
        head: [&[f32]; 4],
        features: &[f32],
        labels: &[usize],
        (f, proj): (usize, usize),
    ) -> SupConOutput {
        let m = labels.len();
        let [w0, b0, w2, b2] = head;
        let mut h = linear_new(features, w0, m, f, f);
        add_bias(&mut h, b0);
        h.iter_mut().for_each(|v| *v = v.max(0.0));
        let mut p = linear_new(&h, w2, m, f, proj);
        add_bias(&mut p, b2);
        let norms: Vec<f32> = p
            .chunks_exact(proj)
            .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12))
            .collect();
        let z: Vec<f32> = p
            .chunks_exact(proj)
            .zip(&norms)
            .flat_map(|(r, n)| r.iter().map(move |v| v / n))
            .collect();
        let t = self.temperature as f64;
        let factor = t / self.base_temperature as f64;
        let dot = |i: usize, j: usize| -> f64 {
            z[i * proj..][..proj]
                .iter()
                .zip(&z[j * proj..][..proj])
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        // ∂L/∂logits, then ∂L/∂z_i = Σ_j g_ij z_j / T + Σ_j g_ji z_j / T.
        let mut loss = 0.0f64;
        let mut g = vec![0.0f64; m * m];
        for i in 0..m {
            let pos = (0..m).filter(|&j| j != i && labels[j] == labels[i]).count();
            if pos == 0 {
                continue;
            }
            let logits: Vec<f64> = (0..m).map(|j| dot(i, j) / t).collect();
            let mx = (0..m)
                .filter(|&j| j != i)
                .map(|j| logits[j])
                .fold(f64::NEG_INFINITY, f64::max);
            let lse = mx
                + (0..m)
                    .filter(|&j| j != i)
                    .map(|j| (logits[j] - mx).exp())
                    .sum::<f64>()
                    .ln();
            let c = pos as f64;
            for j in (0..m).filter(|&j| j != i) {
                let positive = labels[j] == labels[i];
                if positive {
                    loss -= factor * (logits[j] - lse) / c / m as f64;
                }
                let ind = if positive { 1.0 / c } else { 0.0 };
                g[i * m + j] = factor * ((logits[j] - lse).exp() - ind) / m as f64;
            }
        }
        let mut dz = vec![0.0f32; m * proj];
        for i in 0..m {
            let mut acc = vec![0.0f64; proj];
            for j in 0..m {
                let gij = (g[i * m + j] + g[j * m + i]) / t;
                if gij != 0.0 {
                    acc.iter_mut()
                        .zip(&z[j * proj..][..proj])
                        .for_each(|(a, v)| *a += gij * *v as f64);
                }
            }
            dz[i * proj..][..proj]
                .iter_mut()
                .zip(&acc)
                .for_each(|(d, a)| *d = *a as f32);
        }
        // Through the normalisation: ∂p = (∂z − z·(z·∂z)) / ‖p‖.
        let mut dp = dz;
        for ((dr, zr), n) in dp
            .chunks_exact_mut(proj)
            .zip(z.chunks_exact(proj))
            .zip(&norms)
        {
            let zd: f32 = dr.iter().zip(zr).map(|(a, b)| a * b).sum();
            dr.iter_mut()
                .zip(zr)
                .for_each(|(d, zv)| *d = (*d - zv * zd) / n);
        }
        let (mut dh, dw2, db2) = linear_backward(&h, w2, &dp, m, f, proj);
        dh.iter_mut().zip(&h).for_each(|(d, hv)| {
            if *hv <= 0.0 {
                *d = 0.0
            }
        });
        let (dfeat, dw0, db0) = linear_backward(features, w0, &dh, m, f, f);
        SupConOutput {
            loss: loss as f32,
            d_features: dfeat,
            d_head: [dw0, db0, dw2, db2],
        }
    }
}
