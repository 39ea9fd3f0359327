//! MODE's ALPA loss (SPEC E): an attention-based similarity between the local (patch-token)
//! features of two views, then a supervised contrastive loss over all pairs of a batch. Written
//! twice: `Alpa::forward_backward` over plain host arrays (the reference, held to PyTorch), and
//! `alpa_on` over the training executor's ops (`TrainExec`: bias-free linear, ReLU, the cross-view
//! attention terms), so that it runs on the CPU and on CUDA from one description; the latter's
//! CPU ops are this file's functions. The gradient with respect to the local features goes back
//! into the backbone through the tape.
//!
//! For views a, b with tokens F [T, D]: Q, K, V = MLP_{q,k,v}(F), each Linear(D→D) → ReLU →
//! Linear(D→d), no biases. Ã = softmax(Q_b K_aᵀ/√d)·V_a, B̃ = softmax(Q_a K_bᵀ/√d)·V_b and
//! s(a, b) = mean_p [cos(V_a[p], B̃[p]) + cos(V_b[p], Ã[p])] ∈ [−2, 2], symmetric.
//! logits_ij = τ·s(i, j) (τ = 10), self-pairs excluded; with P(i) the other views of i's label,
//! L = −(1/M) Σ_i Σ_{j∈P(i)} (logits_ij − log Σ_{k≠i} exp logits_ik) / max(1, |P(i)|).

use rayon::prelude::*;

use crate::backend::cpu::matmul::linear_nobias;
use crate::backend::Activation;
use crate::error::{Error, Result};
use crate::model::layers::{Linear, LinearBias, Param};
use crate::model::train_exec::TrainExec;

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
    // Source views go in a fixed number of contiguous chunks, each summed in order and the chunk
    // sums added in order: the same bits for any thread count (rayon's fold/reduce would group
    // them as work is stolen, and a run would not repeat).
    let chunk = m.div_ceil(CROSS_CHUNKS).max(1);
    let partial: Vec<CrossSums> = (0..m.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            (c * chunk..((c + 1) * chunk).min(m)).fold(
                CrossSums::zeros(m, rows, d, g.is_some()),
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
        })
        .collect();
    partial
        .into_iter()
        .reduce(CrossSums::add)
        .unwrap_or_else(|| CrossSums::zeros(m, rows, d, g.is_some()))
}

/// How many partial sums `cross_terms` keeps at once (each as large as dQ and dV).
const CROSS_CHUNKS: usize = 8;

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
        let terms = cross_terms(q, k, v, m, t, d, None).terms;
        let SupCon {
            loss,
            similarity: s,
            d_terms: g,
        } = supcon(&terms, labels, t, self.scale);
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
            loss,
            similarity: s,
            d_features,
            d_weights,
        }
    }
}

/// The contrastive half of ALPA, from the cross terms [M, M] (`terms[b·M + a]` = t(b←a)): the
/// loss, the similarity s and ∂L/∂terms.
pub struct SupCon {
    pub loss: f32,
    /// s(a, b) = (t(b←a) + t(a←b)) / T [M, M] (the diagonal is reported, not used by the loss).
    pub similarity: Vec<f32>,
    /// ∂L/∂terms [M, M], laid out as `terms`.
    pub d_terms: Vec<f32>,
}

/// SupCon over logits τ·s of M views with `labels` (T tokens each), and its gradient back to the
/// cross terms. M² values: it runs on the host on every device.
pub fn supcon(terms: &[f32], labels: &[usize], t: usize, scale: f32) -> SupCon {
    let m = labels.len();
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
        let logits: Vec<f64> = (0..m).map(|j| scale as f64 * s[i * m + j] as f64).collect();
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
            ds[i * m + j] += (scale as f64 * dl) as f32;
        }
    }
    // Back through each pair's similarity into the terms: both terms of s(a, b) get
    // ∂L/∂s(a, b) + ∂L/∂s(b, a), over T.
    let mut g = vec![0.0f32; m * m];
    for a in 0..m {
        for b in (0..m).filter(|&b| b != a) {
            g[b * m + a] = (ds[a * m + b] + ds[b * m + a]) / t as f32;
        }
    }
    SupCon {
        loss: loss as f32,
        similarity: s,
        d_terms: g,
    }
}

/// The CPU op `alpa_terms` (see `TrainExec`): every cross term t(b←a) of q, k, v [M·T, d], as
/// `terms[b·M + a]`.
pub fn alpa_terms(q: &[f32], k: &[f32], v: &[f32], m: usize, d: usize) -> Vec<f32> {
    let t = q.len() / (m * d).max(1);
    cross_terms(q, k, v, m, t, d, None).terms
}

/// The CPU op `alpa_terms_backward`: (dq, dk, dv) [M·T, d] for ∂L/∂terms `g` [M, M].
pub fn alpa_terms_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    m: usize,
    d: usize,
    g: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t = q.len() / (m * d).max(1);
    let CrossSums { dq, dk, dv, .. } = cross_terms(q, k, v, m, t, d, Some(g));
    (dq, dk, dv)
}

/// What `alpa_on` returns: the loss and similarity as `AlpaOutput`, the gradients (of
/// weight·L) on the executor.
pub struct AlpaGrads<G> {
    pub loss: f32,
    pub similarity: Vec<f32>,
    /// ∂(weight·L)/∂F [M·T, D]
    pub d_features: G,
    /// ∂(weight·L)/∂weights, in `WEIGHT_NAMES` order
    pub d_weights: [G; 6],
}

/// ALPA's forward and backward over the training executor's ops, for local features [M·T, D]
/// of M views with `labels`; the gradients are those of `weight`·L (the term's weight in the
/// fine-tuning loss). The features, the MLPs' activations and Q, K, V stay on the executor; only
/// the M×M matrix of cross terms comes to the host for SupCon (a few KB, where a device SupCon
/// would be M launches' worth of bookkeeping for M² values) and its gradient goes back.
pub fn alpa_on<E: TrainExec>(
    exec: &mut E,
    features: &E::Buf,
    weights: &[Param; 6],
    labels: &[usize],
    scale: f32,
    weight: f32,
) -> Result<AlpaGrads<E::Grad>> {
    let m = labels.len();
    let rows = match E::shape(features) {
        [rows, _] if m > 0 && rows % m == 0 => *rows,
        f => {
            return Err(Error::Data(format!(
                "ALPA: local features {f:?} do not split into {m} views"
            )))
        }
    };
    let t = rows / m;
    let linear = |w: &Param| Linear {
        w: w.clone(),
        bias: LinearBias::None,
    };
    let mut branches = Vec::with_capacity(3);
    for i in 0..3 {
        let (l1, l2) = (linear(&weights[2 * i]), linear(&weights[2 * i + 1]));
        let (pre, _) = exec.linear(features, &l1, Activation::None)?;
        let hidden = exec.relu(&pre)?;
        let (out, _) = exec.linear(&hidden, &l2, Activation::None)?;
        branches.push((l1, l2, hidden, out));
    }
    let (q, k, v) = (&branches[0].3, &branches[1].3, &branches[2].3);
    let terms = exec.alpa_terms(q, k, v, m)?;
    let sc = supcon(&terms, labels, t, scale);
    let g: Vec<f32> = sc.d_terms.iter().map(|x| x * weight).collect();
    let (dq, dk, dv) = exec.alpa_terms_backward(q, k, v, m, &g)?;
    let mut d_features: Option<E::Grad> = None;
    let mut d_weights: Vec<E::Grad> = Vec::with_capacity(6);
    for ((l1, l2, hidden, _), dout) in branches.iter().zip([dq, dk, dv]) {
        let (dh, dw2, _) = exec.linear_backward(hidden, l2, None, dout)?;
        let dh = exec.relu_backward(hidden, dh)?;
        let (df, dw1, _) = exec.linear_backward(features, l1, None, dh)?;
        match d_features.as_mut() {
            None => d_features = Some(df),
            Some(acc) => exec.add_grad(acc, &df)?,
        }
        d_weights.push(dw1);
        d_weights.push(dw2);
    }
    let mut it = d_weights.into_iter();
    Ok(AlpaGrads {
        loss: sc.loss,
        similarity: sc.similarity,
        d_features: d_features.expect("three branches"),
        d_weights: std::array::from_fn(|_| it.next().expect("six weights")),
    })
}
