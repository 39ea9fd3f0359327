//! Multi-head self-attention with an optional additive bias (BEiT's relative-position bias):
//!   out_h = softmax(scale · q_h k_hᵀ + bias_h) v_h,   scale = Dh^-1/2,
//! read straight out of the fused qkv activation [B·N, 3·D] (q | k | v, head h at h·Dh), written into
//! out [B·N, D] with heads concatenated. One task per (image, head): the N×N score matrix lives in a
//! per-task buffer that stays in cache, never the whole [B, H, N, N] tensor.

use rayon::prelude::*;

use super::matmul::{gemm_strided, MatMut, MatRef};
use super::vecmath;

pub struct Dims {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub dh: usize,
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint region.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks write disjoint (image, head) column blocks of the output; see `forward`.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    // A method (not the field) so closures capture the Sync wrapper, not the raw pointer.
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// qkv: [B·N, 3·D]; bias: [H, N, N] or none; out: [B·N, D] with D = H·Dh.
pub fn forward(qkv: &[f32], bias: Option<&[f32]>, dims: &Dims, out: &mut [f32]) {
    forward_into(qkv, bias, dims, out, None);
}

/// `forward` that also returns the attention probabilities P [B, H, N, N] (rows summing to 1),
/// for a backward that reads P instead of recomputing q·kᵀ and the softmax (15 MB a layer for
/// BEiT-B at batch 8, as PyTorch's autograd keeps too).
pub fn forward_keep_probs(
    qkv: &[f32],
    bias: Option<&[f32]>,
    dims: &Dims,
    out: &mut [f32],
) -> Vec<f32> {
    let len = dims.b * dims.h * dims.n * dims.n;
    // SAFETY: every (image, head) task writes its whole n×n block of P (the q·kᵀ gemm does not
    // read its destination) before reading it.
    unsafe {
        super::matmul::filled_by(len, |probs| {
            forward_into(qkv, bias, dims, out, Some(SharedMut(probs)))
        })
    }
}

fn forward_into(
    qkv: &[f32],
    bias: Option<&[f32]>,
    dims: &Dims,
    out: &mut [f32],
    probs: Option<SharedMut>,
) {
    let Dims { b, n, h, dh } = *dims;
    let d = h * dh;
    assert!(qkv.len() == b * n * 3 * d && out.len() == b * n * d);
    if let Some(bias) = bias {
        assert!(bias.len() == h * n * n);
    }
    let scale = (dh as f32).powf(-0.5);
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..b * h).into_par_iter().for_each_init(
        || {
            (
                vec![0.0f32; if probs.is_some() { 0 } else { n * n }],
                vec![0.0f32; n],
            )
        },
        |(scratch, sums), task| {
            let (img, head) = (task / h, task % h);
            let scores: &mut [f32] = match probs {
                // SAFETY: task's own n×n block of the [B·H, N, N] probabilities.
                Some(p) => unsafe {
                    std::slice::from_raw_parts_mut(p.ptr().add(task * n * n), n * n)
                },
                None => scratch,
            };
            let base = img * n * 3 * d;
            let q = MatRef {
                ptr: qkv[base + head * dh..].as_ptr(),
                rs: 3 * d as isize,
                cs: 1,
            };
            // kᵀ: element (c, j) = k[j, c].
            let kt = MatRef {
                ptr: qkv[base + d + head * dh..].as_ptr(),
                rs: 1,
                cs: 3 * d as isize,
            };
            let v = MatRef {
                ptr: qkv[base + 2 * d + head * dh..].as_ptr(),
                rs: 3 * d as isize,
                cs: 1,
            };
            // SAFETY: q, kᵀ, v are views inside `qkv` bounded by the assertion above; `scores` is
            // this task's own n×n buffer.
            unsafe {
                gemm_strided(
                    n,
                    n,
                    dh,
                    MatMut::row_major(scores, n),
                    false,
                    q,
                    kt,
                    scale,
                    false,
                );
            }
            let bias_h = bias.map(|bb| &bb[head * n * n..(head + 1) * n * n]);
            vecmath::softmax_rows_unnormalised(scores, bias_h, n, sums);
            if probs.is_some() {
                // The kept P must be normalised; the output then needs no scaling.
                for (row, s) in scores.chunks_exact_mut(n).zip(sums.iter_mut()) {
                    vecmath::scale(row, 1.0 / *s);
                    *s = 1.0;
                }
            }
            let dst = MatMut {
                // SAFETY: in bounds: row img·N, column head·Dh of out [B·N, D].
                ptr: unsafe { out_ptr.ptr().add(img * n * d + head * dh) },
                rs: d as isize,
                cs: 1,
            };
            // SAFETY: dst covers rows img·N.. img·N+N, columns head·Dh.. +Dh, disjoint per task.
            unsafe {
                gemm_strided(
                    n,
                    dh,
                    n,
                    dst,
                    false,
                    MatRef::row_major(scores, n),
                    v,
                    1.0,
                    false,
                );
            }
            if probs.is_none() {
                // Softmax normalisation applied to the [N, Dh] output rather than the [N, N] scores.
                for (i, s) in sums.iter().enumerate() {
                    // SAFETY: row img·N+i, columns head·Dh..+Dh of out: this task's own block.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(dst.ptr.offset(i as isize * dst.rs), dh)
                    };
                    vecmath::scale(row, 1.0 / s);
                }
            }
        },
    );
}

/// Gradients of `forward` given dout [B·N, D] and the probabilities P of `forward_keep_probs`:
/// dqkv [B·N, 3·D] and, when `want_dbias`, dbias [H, N, N] summed over images. Per (image, head):
///   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),  dQ = s·dS·K,  dK = s·dSᵀ·Q,  dB = dS.
/// Tasks run head by head over groups of images, so each adds its dS straight into its own
/// dbias partial instead of keeping every image's dS for a reduction afterwards.
pub fn backward(
    qkv: &[f32],
    probs: &[f32],
    want_dbias: bool,
    dims: &Dims,
    dout: &[f32],
) -> (Vec<f32>, Option<Vec<f32>>) {
    let Dims { b, n, h, dh } = *dims;
    let d = h * dh;
    assert!(qkv.len() == b * n * 3 * d && dout.len() == b * n * d);
    assert!(probs.len() == b * h * n * n);
    let scale = (dh as f32).powf(-0.5);
    // Tasks are (head, group of IMAGES_PER_GROUP images); each group holds one [H, N, N] dbias
    // partial, and the partials are added in group order. A fixed group size (not one derived
    // from the thread count) keeps dbias bit for bit the same on any machine.
    const IMAGES_PER_GROUP: usize = 4;
    let per_group = IMAGES_PER_GROUP.min(b.max(1));
    let groups = b.div_ceil(per_group).max(1);
    let mut partials = vec![0.0f32; if want_dbias { groups * h * n * n } else { 0 }];
    let part_ptr = SharedMut(partials.as_mut_ptr());
    let view = |base: *const f32, off: usize| MatRef {
        // SAFETY (of every use below): offsets stay inside the [B·N, 3·D] or [B·N, D] buffers.
        ptr: unsafe { base.add(off) },
        rs: 3 * d as isize,
        cs: 1,
    };
    let task_body = |dq_ptr: SharedMut, dp: &mut [f32], group: usize, head: usize| {
        let images = group * per_group..((group + 1) * per_group).min(b);
        for img in images {
            let p = &probs[(img * h + head) * n * n..(img * h + head + 1) * n * n];
            let base = img * n * 3 * d + head * dh;
            let (q, k, v) = (
                view(qkv.as_ptr(), base),
                view(qkv.as_ptr(), base + d),
                view(qkv.as_ptr(), base + 2 * d),
            );
            let vt = MatRef {
                ptr: v.ptr,
                rs: 1,
                cs: v.rs,
            };
            let d_o = MatRef {
                ptr: dout[img * n * d + head * dh..].as_ptr(),
                rs: d as isize,
                cs: 1,
            };
            let out_view = |off: usize| MatMut {
                // SAFETY: this task's own rows and head columns of dqkv.
                ptr: unsafe { dq_ptr.ptr().add(base + off) },
                rs: 3 * d as isize,
                cs: 1,
            };
            let pt = MatRef {
                ptr: p.as_ptr(),
                rs: 1,
                cs: n as isize,
            };
            // SAFETY: all views are bounded as stated above; dp is this task's buffer and the
            // dqkv blocks written are disjoint between tasks.
            unsafe {
                gemm_strided(n, dh, n, out_view(2 * d), false, pt, d_o, 1.0, false);
                gemm_strided(
                    n,
                    n,
                    dh,
                    MatMut::row_major(dp, n),
                    false,
                    d_o,
                    vt,
                    1.0,
                    false,
                );
            }
            for (prow, dprow) in p.chunks_exact(n).zip(dp.chunks_exact_mut(n)) {
                let dot = vecmath::dot(prow, dprow);
                for (g, pv) in dprow.iter_mut().zip(prow) {
                    *g = pv * (*g - dot);
                }
            }
            if want_dbias {
                // SAFETY: the (group, head) block of the partials belongs to this task alone.
                let acc = unsafe {
                    std::slice::from_raw_parts_mut(
                        part_ptr.ptr().add((group * h + head) * n * n),
                        n * n,
                    )
                };
                vecmath::add_assign(acc, dp);
            }
            // SAFETY: as above; dp now holds dS.
            unsafe {
                gemm_strided(
                    n,
                    dh,
                    n,
                    out_view(0),
                    false,
                    MatRef::row_major(dp, n),
                    k,
                    scale,
                    false,
                );
                let dst = MatRef {
                    ptr: dp.as_ptr(),
                    rs: 1,
                    cs: n as isize,
                };
                gemm_strided(n, dh, n, out_view(d), false, dst, q, scale, false);
            }
        }
    };
    // SAFETY: the (image, head) tasks together write every q, k and v column block of dqkv, each
    // by a gemm that does not read its destination.
    let dqkv = unsafe {
        super::matmul::filled_by(b * n * 3 * d, |dq| {
            let dq_ptr = SharedMut(dq);
            (0..groups * h).into_par_iter().for_each_init(
                || vec![0.0f32; n * n],
                |dp, task| task_body(dq_ptr, dp, task / h, task % h),
            );
        })
    };
    let dbias = want_dbias.then(|| {
        let (first, rest) = partials.split_at_mut(h * n * n);
        for part in rest.chunks_exact(h * n * n) {
            vecmath::add_assign(first, part);
        }
        partials.truncate(h * n * n);
        partials
    });
    (dqkv, dbias)
}

/// Plain reference: materialise every score, f64 accumulation. For tests.
pub fn reference(qkv: &[f32], bias: Option<&[f32]>, dims: &Dims) -> Vec<f32> {
    let Dims { b, n, h, dh } = *dims;
    let d = h * dh;
    let scale = (dh as f64).powf(-0.5);
    let mut out = vec![0.0f32; b * n * d];
    let at = |img: usize, tok: usize, part: usize, head: usize, c: usize| {
        qkv[(img * n + tok) * 3 * d + part * d + head * dh + c] as f64
    };
    for img in 0..b {
        for head in 0..h {
            for i in 0..n {
                let mut s: Vec<f64> = (0..n)
                    .map(|j| {
                        let dot: f64 = (0..dh)
                            .map(|c| at(img, i, 0, head, c) * at(img, j, 1, head, c))
                            .sum();
                        dot * scale + bias.map_or(0.0, |bb| bb[(head * n + i) * n + j] as f64)
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s
                    .iter_mut()
                    .map(|v| {
                        *v = (*v - m).exp();
                        *v
                    })
                    .sum();
                for c in 0..dh {
                    let acc: f64 = (0..n).map(|j| s[j] / z * at(img, j, 2, head, c)).sum();
                    out[(img * n + i) * d + head * dh + c] = acc as f32;
                }
            }
        }
    }
    out
}
