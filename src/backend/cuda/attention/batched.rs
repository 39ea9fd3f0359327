//! The whole-batch attention forward (`forward_batched`): q, k, v split head-major once, then
//! `gemm::attend` over all images × heads (one strided-batched GEMM for the scores and one for
//! P·V around the bias add and the softmax), in a fixed number of launches whatever B; and the
//! variants that keep the probabilities for the backward (`forward_keep_probs[_into]`).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::gemm::{self, AttentionGemms, HeadLayout};
use super::Dims;
use crate::backend::cuda::device::{check_len, nonempty, CudaDevice};
use crate::backend::cuda::{ptr_mut_or_null, ptr_or_null, Storage};
use crate::error::Result;

/// Scratch of `forward_batched` for B images at once, made once per (batch, dims): q, k, v
/// head-major (`qkvh`, 3·B·N·D), the head-major output (`oh`, B·N·D), the scores and
/// probabilities (B·H·N·N f32 each), and for bf16 the probabilities rounded to bf16.
pub struct BatchedScratch<T> {
    pub qkvh: CudaSlice<T>,
    pub oh: CudaSlice<T>,
    pub scores: CudaSlice<f32>,
    pub probs: CudaSlice<f32>,
    pub probs_half: Option<CudaSlice<T>>,
}

impl<T: Storage> BatchedScratch<T> {
    pub fn new(dev: &CudaDevice, dims: &Dims) -> Result<BatchedScratch<T>> {
        let Dims { b, n, h, dh } = *dims;
        let (bnd, bhnn) = ((b * n * h * dh).max(1), (b * h * n * n).max(1));
        Ok(BatchedScratch {
            qkvh: dev.zeros::<T>(3 * bnd)?,
            oh: dev.zeros::<T>(bnd)?,
            scores: dev.zeros::<f32>(bhnn)?,
            probs: dev.zeros::<f32>(bhnn)?,
            probs_half: if T::NAME == "bf16" {
                Some(dev.zeros::<T>(bhnn)?)
            } else {
                None
            },
        })
    }
}

/// qkv [B·N, 3·D] → scratch.qkvh [3, B, H, N, Dh], checking every buffer on the way.
fn split_heads<T: Storage>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    out: &CudaSlice<T>,
    dims: &Dims,
    ws: &mut BatchedScratch<T>,
) -> Result<bool> {
    let Dims { b, n, h, dh } = *dims;
    let (d, bhnn) = (h * dh, b * h * n * n);
    dims.check_io(qkv, bias, out)?;
    check_len("attention qkvh", &ws.qkvh, (b * n * d).max(1) * 3)?;
    check_len("attention oh", &ws.oh, (b * n * d).max(1))?;
    check_len("attention scores", &ws.scores, bhnn.max(1))?;
    check_len("attention probs", &ws.probs, bhnn.max(1))?;
    gemm::check_rounded(ws.probs_half.as_ref(), bhnn.max(1))?;
    if b * n * d == 0 {
        return Ok(false);
    }
    permute(dev, "split", qkv, &mut ws.qkvh, 3 * b * n * d, dims)?;
    Ok(true)
}

/// attention_{split,merge}_heads_T over `count` output elements.
pub(super) fn permute<T: Storage>(
    dev: &CudaDevice,
    which: &str,
    src: &CudaSlice<T>,
    dst: &mut CudaSlice<T>,
    count: usize,
    dims: &Dims,
) -> Result<()> {
    let (bi, ni, hi, di) = dims.kernel_args()?;
    let name = format!("attention_{which}_heads_{}", T::NAME);
    let f = dev.function("attention", &name)?;
    // SAFETY: the caller checked src and dst against (B, N, H, Dh): count elements each way.
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(count),
            [src, dst, &bi, &ni, &hi, &di]
        )
    }
}

/// `forward_gemm` for the whole batch in a fixed number of launches, whatever B: split heads,
/// `gemm::attend` over the B·H head-major [N, Dh] matrices (ONE strided-batched GEMM for the
/// scores, the bias add broadcast over images and the softmax over all B·H·N rows, ONE GEMM for
/// P·V), merge heads. Same contract, precisions and head dims as `forward_gemm` (any head dim:
/// at bf16 this is the fallback of `flash_attention::forward`); `ws` from `BatchedScratch::new`
/// for these dims.
pub fn forward_batched<T: AttentionGemms>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    dims: &Dims,
    scale: f32,
    ws: &mut BatchedScratch<T>,
) -> Result<()> {
    if !split_heads(dev, qkv, bias, out, dims, ws)? {
        return Ok(());
    }
    let Dims { b, n, h, dh } = *dims;
    let bnd = b * n * h * dh;
    let BatchedScratch {
        qkvh,
        oh,
        scores,
        probs,
        probs_half,
    } = ws;
    let q = qkvh.slice(0..bnd);
    let k = qkvh.slice(bnd..2 * bnd);
    let v = qkvh.slice(2 * bnd..3 * bnd);
    let at = HeadLayout {
        ld: dh,
        ld_out: dh,
        stride: n * dh,
    };
    // SAFETY: q, k, v and oh hold B·H matrices of N·Dh, the scratch B·H of N·N (checked in
    // split_heads).
    unsafe {
        gemm::attend(
            dev,
            "cuBLAS batched attention",
            (q, k, v),
            bias,
            &mut oh.as_view_mut(),
            dims,
            at,
            scale,
            (scores, probs, probs_half.as_mut()),
        )
    }?;
    permute(dev, "merge", oh, out, bnd, dims)
}

/// B·H·N·N, the length of the probabilities a keep-probs forward hands back, refusing an empty
/// shape before anything is allocated.
fn kept_len(dims: &Dims) -> Result<usize> {
    let Dims { b, n, h, dh } = *dims;
    nonempty(
        &format!("attention keep-probs ({dims})"),
        b * h * n * n * dh,
    )?;
    Ok(b * h * n * n)
}

/// `forward_batched` that also returns the softmax probabilities P [B, H, N, N] (f32, rows
/// summing to 1; at bf16 before the rounding that feeds P·V) of softmax(scale·Q_bh K_bhᵀ +
/// bias_h): what `backward_batched` reads, as `backend::attention_keep_probs` on the CPU. qkv
/// [B·N, 3·D], bias [H, N, N] or None, out [B·N, D]; `ws` from `BatchedScratch::new` for these
/// dims. Allocates P; a caller that keeps its P buffers (one per layer, each living until its
/// backward) passes them to `forward_keep_probs_into` instead.
pub fn forward_keep_probs<T: AttentionGemms>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    dims: &Dims,
    scale: f32,
    ws: &mut BatchedScratch<T>,
) -> Result<CudaSlice<f32>> {
    let mut probs = dev.empty::<f32>(kept_len(dims)?)?;
    forward_keep_probs_into(dev, qkv, bias, out, dims, scale, ws, &mut probs)?;
    Ok(probs)
}

/// `forward_keep_probs` writing P into the caller's `probs` [B, H, N, N]: no allocation. The
/// caller's buffer is swapped in as the scratch's probabilities for the forward, so the softmax
/// writes P there in place and keeping it costs no copy.
#[allow(clippy::too_many_arguments)]
pub fn forward_keep_probs_into<T: AttentionGemms>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    dims: &Dims,
    scale: f32,
    ws: &mut BatchedScratch<T>,
    probs: &mut CudaSlice<f32>,
) -> Result<()> {
    let bhnn = kept_len(dims)?;
    check_len("attention probs scratch", &ws.probs, bhnn)?;
    check_len("attention kept probs", probs, bhnn)?;
    std::mem::swap(&mut ws.probs, probs);
    let r = forward_batched(dev, qkv, bias, out, dims, scale, ws);
    // Swapped back whatever happened, so the scratch keeps its own buffer.
    std::mem::swap(&mut ws.probs, probs);
    r
}

/// The device address of element `off` of a buffer of T.
pub(super) fn at<T>(dev: &CudaDevice, s: &CudaSlice<T>, off: usize) -> u64 {
    ptr_or_null(dev.stream(), Some(s)) + (off * std::mem::size_of::<T>()) as u64
}

pub(super) fn at_mut<T>(dev: &CudaDevice, s: &mut CudaSlice<T>, off: usize) -> u64 {
    ptr_mut_or_null(dev.stream(), Some(s)) + (off * std::mem::size_of::<T>()) as u64
}
