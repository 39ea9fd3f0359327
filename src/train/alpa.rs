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

/// Small dense helpers on row-major matrices (T and d are tens, so plain loops suffice).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums, so the loop vectorises (a single running sum cannot be
    // reordered by the compiler).
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn mm_nt(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = dot(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
        }
    }
    c
}

fn mm_nn(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for x in 0..k {
            let av = a[i * k + x];
            for j in 0..n {
                c[i * n + j] += av * b[x * n + j];
            }
        }
    }
    c
}

fn mm_tn_add(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    // out [k, n] += aᵀ [k, m] · b [m, n]
    for i in 0..m {
        for x in 0..k {
            let av = a[i * k + x];
            for j in 0..n {
                out[x * n + j] += av * b[i * n + j];
            }
        }
    }
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

/// cos(u, v) and its gradients with respect to u and v, with torch's eps (1e-8) on each norm.
fn cosine(u: &[f32], v: &[f32]) -> (f32, Vec<f32>, Vec<f32>) {
    let nu = u.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-8);
    let nv = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-8);
    let dot: f32 = u.iter().zip(v).map(|(a, b)| a * b).sum();
    let c = dot / (nu * nv);
    let du = u
        .iter()
        .zip(v)
        .map(|(a, b)| b / (nu * nv) - c * a / (nu * nu))
        .collect();
    let dv = u
        .iter()
        .zip(v)
        .map(|(a, b)| a / (nu * nv) - c * b / (nv * nv))
        .collect();
    (c, du, dv)
}

/// Gradient buffers of one cross term: [∂Q_b, ∂K_a, ∂V_a, ∂V_b], each [T, d].
type TermGrads = [Vec<f32>; 4];

/// One direction of the cross-attention: X̃ = softmax(Q_b K_aᵀ/√d)·V_a and the term
/// Σ_p cos(V_b[p], X̃[p]); with `grads` = (g = ∂L/∂term, buffers), adds the gradients into Q_b,
/// K_a, V_a and V_b.
#[allow(clippy::too_many_arguments)]
fn cross_term(
    qb: &[f32],
    ka: &[f32],
    va: &[f32],
    vb: &[f32],
    t: usize,
    d: usize,
    grads: Option<(f32, &mut TermGrads)>,
) -> f32 {
    let inv = 1.0 / (d as f32).sqrt();
    let mut p = mm_nt(qb, ka, t, d, t);
    p.iter_mut().for_each(|v| *v *= inv);
    softmax_rows(&mut p, t);
    let x = mm_nn(&p, va, t, t, d);
    let mut total = 0.0;
    let mut dx = vec![0.0f32; t * d];
    let mut dvb = vec![0.0f32; t * d];
    for r in 0..t {
        let (c, du, dv) = cosine(&vb[r * d..(r + 1) * d], &x[r * d..(r + 1) * d]);
        total += c;
        dvb[r * d..(r + 1) * d].copy_from_slice(&du);
        dx[r * d..(r + 1) * d].copy_from_slice(&dv);
    }
    if let Some((g, [dqb, dka, dva, dvb_out])) = grads {
        dvb.iter_mut().for_each(|v| *v *= g);
        dx.iter_mut().for_each(|v| *v *= g);
        dvb_out.iter_mut().zip(&dvb).for_each(|(a, b)| *a += b);
        // X = P V_a: dP = dX V_aᵀ, dV_a += Pᵀ dX.
        let dp = mm_nt(&dx, va, t, d, t);
        mm_tn_add(&p, &dx, t, t, d, dva);
        // Softmax backward, then S = Q_b K_aᵀ/√d.
        let mut ds = vec![0.0f32; t * t];
        for r in 0..t {
            let pr = &p[r * t..(r + 1) * t];
            let dpr = &dp[r * t..(r + 1) * t];
            let dot: f32 = pr.iter().zip(dpr).map(|(a, b)| a * b).sum();
            for c in 0..t {
                ds[r * t + c] = pr[c] * (dpr[c] - dot) * inv;
            }
        }
        let dq = mm_nn(&ds, ka, t, t, d);
        dqb.iter_mut().zip(&dq).for_each(|(a, b)| *a += b);
        mm_tn_add(&ds, qb, t, t, d, dka);
    }
    total
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
        let blk = t * d;
        let view = |x: &[f32], i: usize| -> Vec<f32> { x[i * blk..(i + 1) * blk].to_vec() };
        // s(a, b) for a ≤ b (the diagonal is reported, not used by the loss).
        let upper: Vec<(usize, usize)> = (0..m).flat_map(|a| (a..m).map(move |b| (a, b))).collect();
        let sims: Vec<f32> = upper
            .par_iter()
            .map(|&(a, b)| {
                let t1 = cross_term(
                    &view(q, b),
                    &view(k, a),
                    &view(v, a),
                    &view(v, b),
                    t,
                    d,
                    None,
                );
                let t2 = cross_term(
                    &view(q, a),
                    &view(k, b),
                    &view(v, b),
                    &view(v, a),
                    t,
                    d,
                    None,
                );
                (t1 + t2) / t as f32
            })
            .collect();
        let mut s = vec![0.0f32; m * m];
        for (&(a, b), &v) in upper.iter().zip(&sims) {
            s[a * m + b] = v;
            s[b * m + a] = v;
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
        // Back through each pair's similarity into Q, K, V.
        let pairs: Vec<(usize, usize)> = upper.into_iter().filter(|(a, b)| a != b).collect();
        let zero = || vec![0.0f32; n * d];
        let (dq, dk, dv) = pairs
            .par_iter()
            .fold(
                || (zero(), zero(), zero()),
                |(mut dq, mut dk, mut dv), &(a, b)| {
                    let g = (ds[a * m + b] + ds[b * m + a]) / t as f32;
                    if g != 0.0 {
                        let add = |dst: &mut [f32], i: usize, src: &[f32]| {
                            dst[i * blk..(i + 1) * blk]
                                .iter_mut()
                                .zip(src)
                                .for_each(|(x, y)| *x += y)
                        };
                        // s(a, b) has two terms: (Q_b, K_a, V_a, V_b) and (Q_a, K_b, V_b, V_a).
                        for (x, y) in [(a, b), (b, a)] {
                            let mut buf: TermGrads = std::array::from_fn(|_| vec![0.0f32; blk]);
                            cross_term(
                                &view(q, y),
                                &view(k, x),
                                &view(v, x),
                                &view(v, y),
                                t,
                                d,
                                Some((g, &mut buf)),
                            );
                            add(&mut dq, y, &buf[0]);
                            add(&mut dk, x, &buf[1]);
                            add(&mut dv, x, &buf[2]);
                            add(&mut dv, y, &buf[3]);
                        }
                    }
                    (dq, dk, dv)
                },
            )
            .reduce(
                || (zero(), zero(), zero()),
                |(mut a1, mut a2, mut a3), (b1, b2, b3)| {
                    for (x, y) in [(&mut a1, b1), (&mut a2, b2), (&mut a3, b3)] {
                        x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                    }
                    (a1, a2, a3)
                },
            );
        // Back through the MLPs: out = relu(F W1ᵀ) W2ᵀ.
        let mut d_features = vec![0.0f32; n * dim];
        let mut d_weights: [Vec<f32>; 6] = Default::default();
        for (i, dout) in [dq, dk, dv].into_iter().enumerate() {
            let h = &branches[i].0;
            let mut dw2 = vec![0.0f32; d * dim];
            mm_tn_add(&dout, h, n, d, dim, &mut dw2);
            let mut dh = mm_nn(&dout, w[2 * i + 1], n, d, dim);
            dh.iter_mut().zip(h).for_each(|(g, hv)| {
                if *hv <= 0.0 {
                    *g = 0.0
                }
            });
            let mut dw1 = vec![0.0f32; dim * dim];
            mm_tn_add(&dh, features, n, dim, dim, &mut dw1);
            let df = mm_nn(&dh, w[2 * i], n, dim, dim);
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
