//! Which CUDA attention a forward runs, per precision, and the workspace it needs:
//!   - `Flash`: tensor-core flash attention (kernels/flash_attention.cu), bf16, head dim 64: every
//!     ViT/BEiT preset at patch 16. The default where it applies.
//!   - `Fused`: the FMA fused kernel (kernels/attention.cu), bf16, head dims 64 and 80.
//!   - `Gemm`: cuBLAS over the whole batch (strided-batched GEMMs around the bias + softmax
//!     kernels), any head dim; the only path at f32, and the fallback of the others.
//!
//! `MOOD_CUDA_ATTENTION=flash|fused|gemm` asks for one; a path that cannot take the shape falls
//! back to `Gemm` with a note, never a wrong result.

use cudarc::driver::CudaSlice;

use crate::backend::cuda::attention::{AttentionGemms, BatchedScratch, Dims};
use crate::backend::cuda::{self as cu, CudaDevice, Storage};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    Flash,
    Fused,
    Gemm,
}

impl AttentionPath {
    fn parse(s: &str) -> Option<AttentionPath> {
        match s {
            "flash" => Some(AttentionPath::Flash),
            "fused" => Some(AttentionPath::Fused),
            "gemm" => Some(AttentionPath::Gemm),
            _ => None,
        }
    }

    /// Why this path cannot run `dims` at precision `precision` (None: it can).
    pub fn refuses(self, precision: &str, dims: &Dims) -> Option<String> {
        match (self, precision) {
            (AttentionPath::Gemm, _) => None,
            (_, "f32") => Some("f32 attention runs on cuBLAS only".into()),
            (AttentionPath::Flash, _) => cu::flash_attention::unsupported(dims),
            (AttentionPath::Fused, _) if !cu::attention::HEAD_DIMS.contains(&dims.dh) => {
                Some(format!(
                    "the fused attention kernel has head dims {:?}, not {}",
                    cu::attention::HEAD_DIMS,
                    dims.dh
                ))
            }
            (AttentionPath::Fused, _) => None,
        }
    }

    /// The path for precision `T` and head dim `dh`: `MOOD_CUDA_ATTENTION` if set and able,
    /// else the fastest that takes the shape. A request that cannot run is said in a note.
    pub fn choose(precision: &str, name: &str, dh: usize) -> AttentionPath {
        let probe = Dims {
            b: 1,
            n: 1,
            h: 1,
            dh,
        };
        let asked = std::env::var("MOOD_CUDA_ATTENTION").ok();
        if let Some(p) = asked.as_deref().and_then(AttentionPath::parse) {
            match p.refuses(precision, &probe) {
                None => return p,
                Some(why) => eprintln!("note: {name}: MOOD_CUDA_ATTENTION={p:?}: {why}"),
            }
        }
        let best = [
            AttentionPath::Flash,
            AttentionPath::Fused,
            AttentionPath::Gemm,
        ]
        .into_iter()
        .find(|p| p.refuses(precision, &probe).is_none())
        .unwrap_or(AttentionPath::Gemm);
        if precision != "f32" && best == AttentionPath::Gemm && asked.is_none() {
            eprintln!("note: {name}: head dim {dh} has no fused attention kernel; attention runs on cuBLAS");
        }
        best
    }
}

/// The workspace of the `Gemm` path for one batch shape (the others need none).
pub struct Workspace<T> {
    pub dims: Dims,
    pub batched: BatchedScratch<T>,
}

impl<T: Storage> Workspace<T> {
    pub fn new(dev: &CudaDevice, dims: &Dims) -> Result<Workspace<T>> {
        Ok(Workspace {
            dims: *dims,
            batched: BatchedScratch::new(dev, dims)?,
        })
    }

    /// Device bytes it holds.
    pub fn bytes(&self) -> usize {
        let b = &self.batched;
        (b.qkvh.len() + b.oh.len()) * std::mem::size_of::<T>()
            + (b.scores.len() + b.probs.len()) * 4
            + b.probs_half.as_ref().map_or(0, |p| p.len() * 2)
    }
}

/// The attention op per precision (the paths differ by precision; the cuBLAS one is generic).
pub trait Compute: AttentionGemms {
    #[allow(clippy::too_many_arguments)]
    fn attention(
        dev: &CudaDevice,
        path: AttentionPath,
        qkv: &CudaSlice<Self>,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<Self>,
        dims: &Dims,
        ws: Option<&mut Workspace<Self>>,
    ) -> Result<()>;

    /// The cuBLAS path that also keeps the probabilities [B, H, N, N] (f32) for backward, in
    /// the caller's `probs` (no allocation).
    #[allow(clippy::too_many_arguments)]
    fn attention_keep_probs(
        dev: &CudaDevice,
        qkv: &CudaSlice<Self>,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<Self>,
        dims: &Dims,
        ws: Option<&mut Workspace<Self>>,
        probs: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let scale = (dims.dh as f32).powf(-0.5);
        let ws = workspace(ws, dims)?;
        cu::attention::forward_keep_probs_into(dev, qkv, bias, out, dims, scale, ws, probs)
    }
}

fn workspace<'a, T>(
    ws: Option<&'a mut Workspace<T>>,
    dims: &Dims,
) -> Result<&'a mut BatchedScratch<T>> {
    match ws {
        Some(w)
            if (w.dims.b, w.dims.n, w.dims.h, w.dims.dh) == (dims.b, dims.n, dims.h, dims.dh) =>
        {
            Ok(&mut w.batched)
        }
        _ => Err(Error::Cuda(format!(
            "attention: no cuBLAS workspace for {dims:?}"
        ))),
    }
}

impl Compute for f32 {
    fn attention(
        dev: &CudaDevice,
        path: AttentionPath,
        qkv: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        dims: &Dims,
        ws: Option<&mut Workspace<f32>>,
    ) -> Result<()> {
        if path != AttentionPath::Gemm {
            return Err(Error::Cuda(format!("f32 attention has no {path:?} path")));
        }
        let scale = (dims.dh as f32).powf(-0.5);
        cu::attention::forward_batched(dev, qkv, bias, out, dims, scale, workspace(ws, dims)?)
    }
}

impl Compute for half::bf16 {
    fn attention(
        dev: &CudaDevice,
        path: AttentionPath,
        qkv: &CudaSlice<half::bf16>,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<half::bf16>,
        dims: &Dims,
        ws: Option<&mut Workspace<half::bf16>>,
    ) -> Result<()> {
        let scale = (dims.dh as f32).powf(-0.5);
        match path {
            AttentionPath::Flash => {
                cu::flash_attention::forward(dev, qkv, bias, out, None, dims, scale)
            }
            AttentionPath::Fused => cu::attention::forward(dev, qkv, bias, out, dims, scale),
            AttentionPath::Gemm => {
                let ws = workspace(ws, dims)?;
                cu::attention::forward_batched(dev, qkv, bias, out, dims, scale, ws)
            }
        }
    }
}
