//! MODE's ALPA loss (SPEC E): an attention-based similarity between the local (patch-token)
//! features of two views, then a supervised contrastive loss over all pairs of a batch. Forward
//! and backward are written out here over plain arrays; the gradient with respect to the local
//! features goes back into the backbone through the tape.
//!
//! For views a, b with tokens F [T, D]: Q, K, V = MLP_{q,k,v}(F), each Linear(D→D) → ReLU →
//! Linear(D→d), no biases. Ã = softmax(Q_b K_aᵀ/√d)·V_a, B̃ = softmax(Q_a K_bᵀ/√d)·V_b and
//! s(a, b) = mean_p [cos(V_a[p], B̃[p]) + cos(V_b[p], Ã[p])] ∈ [−2, 2], symmetric.
//! logits_ij = τ·s(i, j) (τ = 10), self-pairs excluded; with P(i) the other views of i's label,
//! L = −(1/M) Σ_i Σ_{j∈P(i)} (logits_ij − log Σ_{k≠i} exp logits_ik) / max(1, |P(i)|).

use rayon::prelude::*;

use crate::backend::cpu::matmul::linear_nobias;

/// The six MLP weights in nn.Linear layout: `query.0` [D, D], `query.2` [d, D], likewise key and value.
pub const WEIGHT_NAMES: [&str; 6] = ["query.0", "query.2", "key.0", "key.2", "value.0", "value.2"];

pub struct Alpa<'w> {
    /// Weights in `WEIGHT_NAMES` order.
    pub weights: [&'w [f32]; 6],
    pub dim: usize,
    pub proj: usize,
    /// τ, used as a multiplier (MODE's temperature_s = 10).
    pub scale: f32,
}

pub struct AlpaOutput {
    pub loss: f32,
    /// s(a, b) [M, M]
    pub similarity: Vec<f32>,
    /// ∂L/∂F [M, T, D]
    pub d_features: Vec<f32>,
    /// ∂L/∂weights, in `WEIGHT_NAMES` order
    pub d_weights: [Vec<f32>; 6],
}

/// One MLP branch on all tokens: hidden = relu(F W1ᵀ) [N, D], out = hidden W2ᵀ [N, d].
fn mlp(
    f: &[f32],
    w1: &[f32],
    w2: &[f32],
    n: usize,
    dim: usize,
    proj: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut h = vec![0.0f32; n * dim];
    linear_nobias(f, w1, n, dim, dim, &mut h);
    h.iter_mut().for_each(|v| *v = v.max(0.0));
    let mut out = vec![0.0f32; n * proj];
    linear_nobias(&h, w2, n, dim, proj, &mut out);
    (h, out)
}

/// c[m, n] (+)= a · b, where a is [m, k] (or its transpose, stored [k, m]) and b is [k, n] (or
/// its transpose, stored [n, k]); single-threaded, as callers run one per rayon task.
fn gemm(
    a: (&[f32], bool),
    b: (&[f32], bool),
    m: usize,
    k: usize,
    n: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    gemm_par(a, b, (m, k, n), c, accumulate, false)
}

/// `gemm`, optionally spread over the rayon pool (for the MLPs' large products).
fn gemm_par(
    (a, a_t): (&[f32], bool),
    (b, b_t): (&[f32], bool),
    (m, k, n): (usize, usize, usize),
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    use crate::backend::cpu::matmul::{gemm_strided, MatMut, MatRef};
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n);
    let a = if a_t {
        MatRef::transposed(a, m)
    } else {
        MatRef::row_major(a, k)
    };
    let b = if b_t {
        MatRef::transposed(b, k)
    } else {
        MatRef::row_major(b, n)
    };
    // SAFETY: the assertion bounds every view; `c` is a distinct &mut.
    unsafe {
        gemm_strided(
            m,
            n,
            k,
            MatMut::row_major(c, n),
            accumulate,
            a,
            b,
            1.0,
            parallel,
        )
    }
}

/// cos(u, v) with torch's eps (1e-8) on each norm; with `g`, adds g·∂cos/∂u to `du` and
/// g·∂cos/∂v to `dv`.
fn cosine(u: &[f32], v: &[f32], g: Option<(f32, &mut [f32], &mut [f32])>) -> f32 {
    let (mut uu, mut vv, mut uv) = (0.0f32, 0.0f32, 0.0f32);
    for (a, b) in u.iter().zip(v) {
        uu += a * a;
        vv += b * b;
        uv += a * b;
    }
    let (nu, nv) = (uu.sqrt().max(1e-8), vv.sqrt().max(1e-8));
    let c = uv / (nu * nv);
    if let Some((g, du, dv)) = g {
        let (inv_uv, cu, cv) = (g / (nu * nv), g * c / (nu * nu), g * c / (nv * nv));
        for (((a, b), da), db) in u.iter().zip(v).zip(du.iter_mut()).zip(dv.iter_mut()) {
            *da += b * inv_uv - a * cu;
            *db += a * inv_uv - b * cv;
        }
    }
    c
}

fn softmax_rows(s: &mut [f32], n: usize) {
    for r in s.chunks_mut(n) {
        let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f32 = r
            .iter_mut()
            .map(|v| {
                *v = (*v - m).exp();
                *v
            })
            .sum();
        r.iter_mut().for_each(|v| *v /= sum);
    }
}

/// Per-thread sums of the cross terms' pass: terms [M, M] and, with gradients, dQ, dK, dV [M·T, d].
struct CrossSums {
    terms: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl CrossSums {
    fn zeros(m: usize, rows: usize, d: usize, grads: bool) -> Self {
        let g = if grads { rows * d } else { 0 };
        CrossSums {
            terms: vec![0.0; m * m],
            dq: vec![0.0; g],
            dk: vec![0.0; g],
            dv: vec![0.0; g],
        }
    }

    fn add(mut self, o: CrossSums) -> Self {
        for (x, y) in [
            (&mut self.terms, o.terms),
            (&mut self.dq, o.dq),
            (&mut self.dk, o.dk),
            (&mut self.dv, o.dv),
        ] {
            x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
        }
        self
    }
}

/// Every ordered cross term t(b←a) = Σ_p cos(V_b[p], X̃_ba[p]), X̃_ba = softmax(Q_b K_aᵀ/√d)·V_a,
/// as `terms[b·M + a]`; with `g` = ∂L/∂t (same layout), also dQ, dK, dV.
///
/// One task per source view a computes the terms of every b against it with two GEMMs over all
/// M·T query rows at once (S = Q·K_aᵀ [M·T, T], then X̃ = P·V_a [M·T, d]), instead of M² small
/// products; the backward pass is four more GEMMs per a.
fn cross_terms(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    m: usize,
    t: usize,
    d: usize,
    g: Option<&[f32]>,
) -> CrossSums {
    let rows = m * t;
    let blk = t * d;
    let inv = 1.0 / (d as f32).sqrt();
    (0..m)
        .into_par_iter()
        .fold(
            || CrossSums::zeros(m, rows, d, g.is_some()),
            |mut acc, a| {
                let (ka, va) = (&k[a * blk..(a + 1) * blk], &v[a * blk..(a + 1) * blk]);
                let mut p = vec![0.0f32; rows * t];
                gemm((q, false), (ka, true), rows, d, t, &mut p, false);
                p.iter_mut().for_each(|x| *x *= inv);
                softmax_rows(&mut p, t);
                let mut x = vec![0.0f32; rows * d];
                gemm((&p, false), (va, false), rows, t, d, &mut x, false);
                let Some(g) = g else {
                    for (r, (vr, xr)) in v.chunks_exact(d).zip(x.chunks_exact(d)).enumerate() {
                        acc.terms[(r / t) * m + a] += cosine(vr, xr, None);
                    }
                    return acc;
                };
                let mut dx = vec![0.0f32; rows * d];
                for (r, ((vr, xr), dxr)) in v
                    .chunks_exact(d)
                    .zip(x.chunks_exact(d))
                    .zip(dx.chunks_exact_mut(d))
                    .enumerate()
                {
                    let gb = g[(r / t) * m + a];
                    let dvr = &mut acc.dv[r * d..(r + 1) * d];
                    acc.terms[(r / t) * m + a] +=
                        cosine(vr, xr, (gb != 0.0).then_some((gb, dvr, dxr)));
                }
                // X̃ = P V_a: dP = dX̃ V_aᵀ, dV_a += Pᵀ dX̃.
                let mut dp = vec![0.0f32; rows * t];
                gemm((&dx, false), (va, true), rows, d, t, &mut dp, false);
                gemm(
                    (&p, true),
                    (&dx, false),
                    t,
                    rows,
                    d,
                    &mut acc.dv[a * blk..(a + 1) * blk],
                    true,
                );
                // Softmax backward, then S = Q K_aᵀ/√d: dQ += dS K_a, dK_a += dSᵀ Q.
                for (pr, dpr) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
                    let dot: f32 = pr.iter().zip(dpr.iter()).map(|(x, y)| x * y).sum();
                    for (pc, dc) in pr.iter().zip(dpr.iter_mut()) {
                        *dc = pc * (*dc - dot) * inv;
                    }
                }
                gemm((&dp, false), (ka, false), rows, t, d, &mut acc.dq, true);
                gemm(
                    (&dp, true),
                    (q, false),
                    t,
                    rows,
                    d,
                    &mut acc.dk[a * blk..(a + 1) * blk],
                    true,
                );
                acc
            },
        )
        .reduce(|| CrossSums::zeros(m, rows, d, g.is_some()), CrossSums::add)
}

impl Alpa<'_> {
    /// Loss and gradients for local features [M, T, D] of M views with `labels`.
    pub fn forward_backward(
        &self,
        features: &[f32],
        labels: &[usize],
        tokens: usize,
    ) -> AlpaOutput {
        let (dim, d, t) = (self.dim, self.proj, tokens);
        let m = labels.len();
        let n = m * t;
        let w = &self.weights;
        let branches: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
            .map(|i| mlp(features, w[2 * i], w[2 * i + 1], n, dim, d))
            .collect();
        let (q, k, v) = (&branches[0].1, &branches[1].1, &branches[2].1);
        // s(a, b) = (t(b←a) + t(a←b)) / T (the diagonal is reported, not used by the loss).
        let terms = cross_terms(q, k, v, m, t, d, None).terms;
        let mut s = vec![0.0f32; m * m];
        for a in 0..m {
            for b in 0..m {
                s[a * m + b] = (terms[b * m + a] + terms[a * m + b]) / t as f32;
            }
        }
        // Contrastive loss over logits τ·s and its gradient ∂L/∂s (symmetric pairs summed).
        let mut loss = 0.0f64;
        let mut ds = vec![0.0f32; m * m];
        for i in 0..m {
            let logits: Vec<f64> = (0..m)
                .map(|j| self.scale as f64 * s[i * m + j] as f64)
                .collect();
            let mx = (0..m)
                .filter(|&j| j != i)
                .map(|j| logits[j])
                .fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..m)
                .filter(|&j| j != i)
                .map(|j| (logits[j] - mx).exp())
                .sum();
            let lse = mx + sum.ln();
            let pos: Vec<usize> = (0..m)
                .filter(|&j| j != i && labels[j] == labels[i])
                .collect();
            if pos.is_empty() {
                continue;
            }
            let c = pos.len() as f64;
            loss -= pos.iter().map(|&j| logits[j] - lse).sum::<f64>() / c / m as f64;
            for j in (0..m).filter(|&j| j != i) {
                let soft = (logits[j] - lse).exp();
                let ind = if labels[j] == labels[i] { 1.0 } else { 0.0 };
                let dl = (soft - ind / c) * c / c / m as f64;
                ds[i * m + j] += (self.scale as f64 * dl) as f32;
            }
        }
        // Back through each pair's similarity into Q, K, V: both terms of s(a, b) get
        // ∂L/∂s(a, b) + ∂L/∂s(b, a), over T.
        let mut g = vec![0.0f32; m * m];
        for a in 0..m {
            for b in (0..m).filter(|&b| b != a) {
                g[b * m + a] = (ds[a * m + b] + ds[b * m + a]) / t as f32;
            }
        }
        let CrossSums { dq, dk, dv, .. } = cross_terms(q, k, v, m, t, d, Some(&g));
        // Back through the MLPs: out = relu(F W1ᵀ) W2ᵀ.
        let mut d_features = vec![0.0f32; n * dim];
        let mut d_weights: [Vec<f32>; 6] = Default::default();
        for (i, dout) in [dq, dk, dv].into_iter().enumerate() {
            let h = &branches[i].0;
            let mut dw2 = vec![0.0f32; d * dim];
            gemm_par(
                (&dout, true),
                (h, false),
                (d, n, dim),
                &mut dw2,
                false,
                true,
            );
            let mut dh = vec![0.0f32; n * dim];
            gemm_par(
                (&dout, false),
                (w[2 * i + 1], false),
                (n, d, dim),
                &mut dh,
                false,
                true,
            );
            dh.iter_mut().zip(h).for_each(|(g, hv)| {
                if *hv <= 0.0 {
                    *g = 0.0
                }
            });
            let mut dw1 = vec![0.0f32; dim * dim];
            gemm_par(
                (&dh, true),
                (features, false),
                (dim, n, dim),
                &mut dw1,
                false,
                true,
            );
            let mut df = vec![0.0f32; n * dim];
            gemm_par(
                (&dh, false),
                (w[2 * i], false),
                (n, dim, dim),
                &mut df,
                false,
                true,
            );
            d_features.iter_mut().zip(&df).for_each(|(a, b)| *a += b);
            d_weights[2 * i] = dw1;
            d_weights[2 * i + 1] = dw2;
        }
        AlpaOutput {
            loss: loss as f32,
            similarity: s,
            d_features,
            d_weights,
        }
    }
}
