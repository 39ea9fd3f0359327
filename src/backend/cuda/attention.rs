//! Launcher of kernels/attention.cu: fused multi-head self-attention with an optional additive
//! bias [H, N, N] (BEiT's relative-position bias), read from the fused qkv activation [B·N, 3·D]
//! and written as [B·N, D], heads concatenated; same layout and math as
//! src/backend/cpu/attention.rs. bf16 or f16 storage, f32 softmax and accumulation; the head dim
//! must be one the kernel was instantiated for (64 or 80).
//!
//! `forward_gemm` is the cuBLAS path for any head dim, f32 (exact precision) or bf16: per image,
//! two strided-batched GEMMs over the heads around the bias add and the softmax kernel (the
//! [H, N, N] scores go through memory, which the fused kernel avoids).
//!
//! `forward_batched` does the same for the whole batch in a fixed number of launches (heads split
//! to [3, B, H, N, Dh] first, so that one strided batch spans images × heads), with its scratch
//! made once (`BatchedScratch`). It is what a model forward at f32 uses. Both run the one
//! sequence in `gemm` (`attend`); `AttentionGemms` holds the GEMMs that differ by precision.
//!
//! For training: `forward_keep_probs[_into]` also hand back the probabilities P [B, H, N, N],
//! `backward_batched` is their backward from P (strided-batched cuBLAS over images × heads around
//! a softmax-backward kernel, f32 gradients), and `RelposScatter` turns the dense bias gradient
//! into BEiT's relative-position table gradient. Every sum runs in a fixed order (no atomics), so
//! two runs give the same bits.
//!
//! This file holds the per-image forwards (the fused kernel and `forward_gemm`); `gemm` the
//! cuBLAS sequence they share with `batched`, the whole-batch forwards and their keep-probabilities
//! variants; `backward` the training backward and the relative-position table gradient. All are
//! re-exported here.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{as_i32, check_len, CudaDevice};
use super::{ptr_or_null, Storage};
use crate::error::{Error, Result};

mod backward;
mod batched;
mod gemm;

pub use backward::{
    backward_batched, backward_batched_with, relpos_table_grad, BackwardScratch, RelposScatter,
};
pub use batched::{forward_batched, forward_keep_probs, forward_keep_probs_into, BatchedScratch};
pub use gemm::AttentionGemms;
use gemm::HeadLayout;

/// Query rows per block (kernels/attention.cu ATT_BQ).
const BQ: usize = 32;

/// The head dims the kernel is compiled for.
pub const HEAD_DIMS: [usize; 2] = [64, 80];

/// B images of N tokens with H heads of `dh`; `scale` is usually dh^-1/2.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub dh: usize,
}

impl Dims {
    /// (B, N, H, Dh) as the kernels' i32 arguments.
    fn kernel_args(&self) -> Result<(i32, i32, i32, i32)> {
        Ok((
            as_i32("B", self.b)?,
            as_i32("N", self.n)?,
            as_i32("H", self.h)?,
            as_i32("Dh", self.dh)?,
        ))
    }

    /// Checks the buffers of every attention forward against these dims: qkv [B·N, 3·D], out
    /// [B·N, D] and the bias [H, N, N].
    fn check_io<T>(
        &self,
        qkv: &CudaSlice<T>,
        bias: Option<&CudaSlice<f32>>,
        out: &CudaSlice<T>,
    ) -> Result<()> {
        let Dims { b, n, h, dh } = *self;
        check_len("attention qkv", qkv, b * n * 3 * h * dh)?;
        check_len("attention out", out, b * n * h * dh)?;
        if let Some(bias) = bias {
            check_len("attention bias", bias, h * n * n)?;
        }
        Ok(())
    }
}

/// "B = …, N = …, H = …, Dh = …", as the errors name a shape.
impl std::fmt::Display for Dims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Dims { b, n, h, dh } = self;
        write!(f, "B = {b}, N = {n}, H = {h}, Dh = {dh}")
    }
}

pub fn forward<T: Storage>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    dims: &Dims,
    scale: f32,
) -> Result<()> {
    let Dims { b, n, h, dh } = *dims;
    if T::NAME == "f32" {
        return Err(Error::Cuda(
            "attention: the fused kernel takes bf16 or f16 (cast qkv first)".into(),
        ));
    }
    if !HEAD_DIMS.contains(&dh) {
        return Err(Error::Cuda(format!(
            "attention: head dim {dh} has no kernel (have {HEAD_DIMS:?})"
        )));
    }
    dims.check_io(qkv, bias, out)?;
    let (ni, hi) = (as_i32("N", n)?, as_i32("H", h)?);
    if b == 0 || n == 0 || h == 0 {
        return Ok(());
    }
    if b > 65535 || h > 65535 {
        return Err(Error::Cuda(format!(
            "attention: grid dims B = {b}, H = {h} exceed 65535"
        )));
    }
    let name = format!("attention_fwd_{}_d{dh}", T::NAME);
    let f = dev.function("attention", &name)?;
    let s = dev.stream();
    let pb = ptr_or_null(s, bias);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BQ) as u32, h as u32, b as u32),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: qkv, out and bias were checked against (B, N, H, Dh); Dh selects the kernel.
    unsafe { launch!(dev, f, name, cfg, [qkv, &pb, out, &ni, &hi, &scale]) }?;
    Ok(())
}

/// Attention on cuBLAS for any head dim, one image at a time, same contract as `forward`: per
/// image, two strided-batched GEMMs over the heads in place in qkv and out (`gemm::attend`)
/// around the bias add and the softmax kernel, the [H, N, N] scores going through memory, which
/// the fused kernel avoids. f32: the exact-precision path (sgemm). bf16: tensor-core GEMMs with
/// f32 accumulation, the scores in f32 and the probabilities rounded to bf16 for O = P V.
/// `scratch` = (scores, probs) f32 and, at bf16, the rounded probabilities: H·N·N each.
pub fn forward_gemm<T: AttentionGemms>(
    dev: &CudaDevice,
    qkv: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    dims: &Dims,
    scale: f32,
    scratch: (
        &mut CudaSlice<f32>,
        &mut CudaSlice<f32>,
        Option<&mut CudaSlice<T>>,
    ),
) -> Result<()> {
    let Dims { b, n, h, dh } = *dims;
    let d = h * dh;
    dims.check_io(qkv, bias, out)?;
    let hnn = h * n * n;
    let (scores, probs, mut rounded) = scratch;
    check_len("attention scores", scores, hnn)?;
    check_len("attention probs", probs, hnn)?;
    gemm::check_rounded(rounded.as_deref(), hnn)?;
    if b * n * h == 0 {
        return Ok(());
    }
    let at = HeadLayout {
        ld: 3 * d,
        ld_out: d,
        stride: dh,
    };
    let image = Dims { b: 1, ..*dims };
    for img in 0..b {
        let base = img * n * 3 * d;
        let q = qkv.slice(base..base + n * 3 * d);
        let k = qkv.slice(base + d..base + n * 3 * d);
        let v = qkv.slice(base + 2 * d..base + n * 3 * d);
        let mut o = out.slice_mut(img * n * d..(img + 1) * n * d);
        let scratch = (&mut *scores, &mut *probs, rounded.as_deref_mut());
        // SAFETY: head h of q/k/v starts h·Dh into its view and spans N rows of stride 3·D inside
        // this image's block, head h of o N rows of stride D; the scratch holds H·N·N.
        unsafe {
            gemm::attend(
                dev,
                "cuBLAS attention",
                (q, k, v),
                bias,
                &mut o,
                &image,
                at,
                scale,
                scratch,
            )
        }?;
    }
    Ok(())
}
