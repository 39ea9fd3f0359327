//! BEiT / ViT inference on one CUDA device: the same forward as `vit.rs`, with the weights of a
//! loaded `VisionTransformer` uploaded once and every op a CUDA launcher.
//!
//! Precision is the type parameter T of the GEMM operands and activations between ops:
//!   - f32: cuBLAS sgemm (no TF32) and the cuBLAS attention path; meant to match the CPU and
//!     timm at f32 tolerance.
//!   - bf16: bf16 GEMMs with f32 accumulation and the fused attention kernel (head dim 64 or 80),
//!     or with `MOOD_CUDA_ATTENTION=gemm` attention on cuBLAS too (any head dim); what a GPU
//!     throughput figure should be taken on.
//!
//! In both, the residual stream x [B·N, D], the patch embedding, the pooling, the final norm and
//! the head stay f32 (they are a sliver of the FLOPs, and x accumulates over every block).
//! Written against the launchers directly rather than the `Exec` trait: that trait hands out host
//! `Tensor`s (`value`) and takes host `Param`s, which would mean a copy per op.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::attention::Dims as AttDims;
use crate::backend::cuda::device::{as_i32, cuda_err};
use crate::backend::cuda::{self as cu, CudaDevice, Storage};
use crate::backend::Precision;
use crate::backend::{Activation, Pool};
use crate::error::{Error, Result};
use crate::model::gpu_memory;
use crate::model::layers::{Linear, Norm};
use crate::model::{Output, VisionTransformer, VitConfig};
use crate::tensor::Tensor;

/// Buffers the attention paths need beyond their input and output (one image at a time).
pub struct Scratch {
    /// Whether attention runs as cuBLAS GEMMs around the softmax kernel: always in f32; in bf16
    /// when `MOOD_CUDA_ATTENTION=gemm` (default there: the fused kernel).
    pub gemm: bool,
    scores: CudaSlice<f32>,
    probs: CudaSlice<f32>,
    probs_bf16: CudaSlice<half::bf16>,
}

impl Scratch {
    pub fn new<T: Compute>(dev: &CudaDevice, dims: &AttDims, gemm: bool) -> Result<Scratch> {
        let gemm = gemm || T::NAME == "f32";
        let hnn = if gemm { dims.h * dims.n * dims.n } else { 1 };
        let hnn_bf16 = if gemm && T::NAME != "f32" { hnn } else { 1 };
        Ok(Scratch {
            gemm,
            scores: dev.zeros(hnn)?,
            probs: dev.zeros(hnn)?,
            probs_bf16: dev.zeros(hnn_bf16)?,
        })
    }
}

/// `MOOD_CUDA_ATTENTION=gemm`: bf16 attention through cuBLAS instead of the fused kernel.
pub fn attention_by_gemm() -> bool {
    std::env::var("MOOD_CUDA_ATTENTION").is_ok_and(|v| v == "gemm")
}

/// What differs between the precisions: the LayerNorm input and the attention op.
pub trait Compute: Storage {
    /// The residual stream as LayerNorm's input type: x itself, or its cast into `tmp`.
    fn ln_input<'a>(
        dev: &CudaDevice,
        x: &'a CudaSlice<f32>,
        tmp: &'a mut CudaSlice<Self>,
    ) -> Result<&'a CudaSlice<Self>>;

    fn attention(
        dev: &CudaDevice,
        qkv: &CudaSlice<Self>,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<Self>,
        dims: &AttDims,
        scratch: &mut Scratch,
    ) -> Result<()>;
}

impl Compute for f32 {
    fn ln_input<'a>(
        _dev: &CudaDevice,
        x: &'a CudaSlice<f32>,
        _tmp: &'a mut CudaSlice<f32>,
    ) -> Result<&'a CudaSlice<f32>> {
        Ok(x)
    }

    fn attention(
        dev: &CudaDevice,
        qkv: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        dims: &AttDims,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let scale = (dims.dh as f32).powf(-0.5);
        let buffers = (&mut scratch.scores, &mut scratch.probs);
        cu::attention::forward_f32(dev, qkv, bias, out, dims, scale, buffers)
    }
}

impl Compute for half::bf16 {
    fn ln_input<'a>(
        dev: &CudaDevice,
        x: &'a CudaSlice<f32>,
        tmp: &'a mut CudaSlice<half::bf16>,
    ) -> Result<&'a CudaSlice<half::bf16>> {
        cu::elementwise::cast(dev, x, tmp)?;
        Ok(tmp)
    }

    fn attention(
        dev: &CudaDevice,
        qkv: &CudaSlice<half::bf16>,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<half::bf16>,
        dims: &AttDims,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let scale = (dims.dh as f32).powf(-0.5);
        if scratch.gemm {
            let s = scratch;
            let buffers = (&mut s.scores, &mut s.probs, &mut s.probs_bf16);
            cu::attention::forward_bf16_gemm(dev, qkv, bias, out, dims, scale, buffers)
        } else {
            cu::attention::forward(dev, qkv, bias, out, dims, scale)
        }
    }
}

struct DLinear<T> {
    w: CudaSlice<T>,
    b: Option<CudaSlice<f32>>,
    /// (out features N, in features K)
    nk: (usize, usize),
}

struct DNorm {
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
}

struct DBlock<T> {
    norm1: DNorm,
    qkv: DLinear<T>,
    rel_bias: Option<CudaSlice<f32>>,
    proj: DLinear<T>,
    norm2: DNorm,
    fc1: DLinear<T>,
    fc2: DLinear<T>,
    gamma1: Option<CudaSlice<f32>>,
    gamma2: Option<CudaSlice<f32>>,
}

pub struct CudaVit<T: Compute> {
    pub cfg: VitConfig,
    /// bf16: attention on cuBLAS rather than the fused kernel (set from `MOOD_CUDA_ATTENTION=gemm`
    /// at load; needed for head dims the kernel lacks). f32 always uses cuBLAS.
    pub attention_gemm: bool,
    /// [D, C·P·P], f32
    patch: DLinear<f32>,
    cls: CudaSlice<f32>,
    pos: Option<CudaSlice<f32>>,
    blocks: Vec<DBlock<T>>,
    /// Token weights of the pooling [N]: 1/(N−1) on the patches (BEiT) or one-hot on the class
    /// token (ViT).
    pool_w: CudaSlice<f32>,
    /// `norm` (ViT, class token) or `fc_norm` (BEiT, mean of patches)
    final_norm: DNorm,
    head: Option<DLinear<f32>>,
}

fn up<T: Storage>(dev: &CudaDevice, t: &Tensor) -> Result<CudaSlice<T>> {
    let host: Vec<T> = t.as_slice().iter().map(|&v| T::from_f32(v)).collect();
    dev.upload(&host)
}

fn up_linear<T: Storage>(dev: &CudaDevice, l: &Linear) -> Result<DLinear<T>> {
    let (n, k) = l.w.value.dims2(&l.w.name)?;
    Ok(DLinear {
        w: up(dev, &l.w.value)?,
        b: l.bias.tensor().map(|b| up(dev, b)).transpose()?,
        nk: (n, k),
    })
}

fn up_norm(dev: &CudaDevice, n: &Norm) -> Result<DNorm> {
    Ok(DNorm {
        w: up(dev, &n.w.value)?,
        b: up(dev, &n.b.value)?,
    })
}

impl<T: Compute> CudaVit<T>
where
    CudaBlas: Gemm<T>,
{
    /// Uploads every weight of `model` (relative-position biases expanded to [H, N, N]).
    pub fn load(dev: &CudaDevice, model: &VisionTransformer) -> Result<CudaVit<T>> {
        let cfg = model.cfg.clone();
        let mut attention_gemm = attention_by_gemm();
        let fused = T::NAME != "f32" && !attention_gemm;
        if fused && !cu::attention::HEAD_DIMS.contains(&cfg.head_dim()) {
            // Never a refusal for a shape the fused kernel lacks: the cuBLAS path takes any head
            // dim, at some speed cost, so say so and use it.
            eprintln!(
                "note: {}: head dim {} has no fused attention kernel (have {:?}); attention runs on cuBLAS",
                cfg.name,
                cfg.head_dim(),
                cu::attention::HEAD_DIMS
            );
            attention_gemm = true;
        }
        let d = cfg.embed_dim;
        let patch_w = model
            .patch_w
            .value
            .clone()
            .reshape(&[d, cfg.in_chans * cfg.patch_size * cfg.patch_size])?;
        let patch = DLinear {
            w: up(dev, &patch_w)?,
            b: Some(up(dev, &model.patch_b.value)?),
            nk: (d, patch_w.shape()[1]),
        };
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for b in &model.blocks {
            blocks.push(DBlock {
                norm1: up_norm(dev, &b.norm1)?,
                qkv: up_linear(dev, &b.qkv)?,
                rel_bias: b
                    .rel_bias
                    .as_deref()
                    .map(|r| up(dev, &r.dense))
                    .transpose()?,
                proj: up_linear(dev, &b.proj)?,
                norm2: up_norm(dev, &b.norm2)?,
                fc1: up_linear(dev, &b.fc1)?,
                fc2: up_linear(dev, &b.fc2)?,
                gamma1: b.gamma1.as_ref().map(|g| up(dev, &g.value)).transpose()?,
                gamma2: b.gamma2.as_ref().map(|g| up(dev, &g.value)).transpose()?,
            });
        }
        let final_norm = match cfg.pool {
            Pool::ClassToken => model.norm.as_ref(),
            Pool::MeanPatches => model.fc_norm.as_ref(),
        }
        .ok_or_else(|| Error::Cuda(format!("{}: no final norm", cfg.name)))?;
        let n = cfg.tokens();
        let mut pool_w = vec![0.0f32; n];
        match cfg.pool {
            Pool::MeanPatches => pool_w[1..].fill(1.0 / (n - 1) as f32),
            Pool::ClassToken => pool_w[0] = 1.0,
        }
        Ok(CudaVit {
            attention_gemm,
            pool_w: dev.upload(&pool_w)?,
            patch,
            cls: up(dev, &model.cls.value)?,
            pos: model.pos.as_ref().map(|p| up(dev, &p.value)).transpose()?,
            blocks,
            final_norm: up_norm(dev, final_norm)?,
            head: model.head.as_ref().map(|h| up_linear(dev, h)).transpose()?,
            cfg,
        })
    }

    /// The precision this forward runs at, for the memory estimate.
    fn precision() -> Precision {
        if T::NAME == "f32" {
            Precision::F32
        } else {
            Precision::Bf16
        }
    }

    /// (bytes per image, fixed bytes) a forward batch allocates (src/model/gpu_memory.rs).
    fn batch_bytes(&self) -> (usize, usize) {
        let p = Self::precision();
        (
            gpu_memory::activation_bytes_per_image(&self.cfg, p),
            gpu_memory::fixed_bytes(&self.cfg, p, self.attention_gemm || T::NAME == "f32"),
        )
    }

    /// Fails, before anything is allocated, when a batch of `b` images would not fit in the
    /// device's free memory; the message names the largest batch that would.
    pub fn check_batch_fits(&self, dev: &CudaDevice, b: usize) -> Result<()> {
        let (free, _) = dev.memory()?;
        let (per_image, fixed) = self.batch_bytes();
        if b > gpu_memory::max_batch_that_fits(free, per_image, fixed) {
            return Err(Error::Cuda(gpu_memory::batch_too_large(
                b, free, per_image, fixed,
            )));
        }
        Ok(())
    }

    /// An out-of-memory error from a batch of `b` (the estimate was short, or another process took
    /// memory since the check) as the same advice; other errors unchanged.
    fn batch_error(&self, dev: &CudaDevice, b: usize, e: Error) -> Error {
        match e {
            Error::CudaOutOfMemory(_) => {
                // The failed forward's buffers are freed by now, so this is what a batch can use.
                let free = dev.memory().map_or(0, |(free, _)| free);
                let (per_image, fixed) = self.batch_bytes();
                Error::Cuda(gpu_memory::batch_too_large(b, free, per_image, fixed))
            }
            e => e,
        }
    }

    /// images [B, C, H, W], normalised → features [B, D] and logits [B, C], as
    /// `VisionTransformer::forward`: upload, `forward_device`, download.
    pub fn forward(&self, dev: &CudaDevice, images: &Tensor) -> Result<Output> {
        let cfg = &self.cfg;
        let s = cfg.img_size;
        let b = match images.shape() {
            [b, c, h, w] if *c == cfg.in_chans && *h == s && *w == s => *b,
            other => {
                return Err(Error::Data(format!(
                    "{} expects images [B, {}, {s}, {s}], got {other:?}",
                    cfg.name, cfg.in_chans
                )))
            }
        };
        let img = dev
            .upload(images.as_slice())
            .map_err(|e| self.batch_error(dev, b, e))?;
        let (feats, logits) = self.forward_device(dev, &img, b)?;
        let logits = match logits {
            Some(l) => Some(Tensor::from_vec(
                &[b, l.len() / b.max(1)],
                dev.download(&l)?,
            )?),
            None => None,
        };
        Ok(Output {
            features: Tensor::from_vec(&[b, cfg.embed_dim], dev.download(&feats)?)?,
            logits,
        })
    }

    /// The forward on device memory: images [B, C, S, S] (f32, already on the device) → features
    /// [B, D] and logits [B, C], queued on the device's stream (call `dev.sync()` to wait). Out of
    /// device memory, the error names a batch that fits.
    pub fn forward_device(
        &self,
        dev: &CudaDevice,
        img: &CudaSlice<f32>,
        b: usize,
    ) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        self.forward_batch(dev, img, b)
            .map_err(|e| self.batch_error(dev, b, e))
    }

    fn forward_batch(
        &self,
        dev: &CudaDevice,
        img: &CudaSlice<f32>,
        b: usize,
    ) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let cfg = &self.cfg;
        let s = cfg.img_size;
        let (n, d, f, h) = (cfg.tokens(), cfg.embed_dim, cfg.mlp_hidden, cfg.num_heads);
        let (g, bn) = (n - 1, b * n);
        let dims = cu::patch_embed::Dims {
            b,
            c: cfg.in_chans,
            h: s,
            w: s,
            p: cfg.patch_size,
        };
        let pb = self.patch.b.as_ref().expect("patch embed has a bias");
        let patches =
            cu::patch_embed::forward::<f32>(dev, img, &self.patch.w, pb, dims, self.patch.nk.0)?;

        let mut x = dev.zeros::<f32>(bn * d)?;
        let pos = self.pos.as_ref();
        cu::elementwise::assemble_tokens(dev, &patches, &self.cls, pos, &mut x, (b, g, d))?;

        let mut xt = dev.zeros::<T>(if T::NAME == "f32" { 1 } else { bn * d })?;
        let mut hbuf = dev.zeros::<T>(bn * d)?;
        let mut qkv = dev.zeros::<T>(bn * 3 * d)?;
        let mut att = dev.zeros::<T>(bn * d)?;
        let mut ybuf = dev.zeros::<T>(bn * d)?;
        let mut mlp = dev.zeros::<T>(bn * f)?;
        let ad = AttDims {
            b,
            n,
            h,
            dh: cfg.head_dim(),
        };
        if !self.attention_gemm && T::NAME != "f32" && !cu::attention::HEAD_DIMS.contains(&ad.dh) {
            return Err(Error::Cuda(format!(
                "{}: head dim {} has no fused attention kernel; set attention_gemm",
                cfg.name, ad.dh
            )));
        }
        let mut scratch = Scratch::new::<T>(dev, &ad, self.attention_gemm)?;
        let lin = |x: &CudaSlice<T>, l: &DLinear<T>, act, out: &mut CudaSlice<T>| {
            cu::matmul::linear(dev, x, &l.w, l.b.as_ref(), act, out, (bn, l.nk.1, l.nk.0))
        };
        for blk in &self.blocks {
            let xin = T::ln_input(dev, &x, &mut xt)?;
            cu::layernorm::forward(
                dev,
                xin,
                &blk.norm1.w,
                &blk.norm1.b,
                &mut hbuf,
                None,
                (bn, d),
                cfg.eps,
            )?;
            lin(&hbuf, &blk.qkv, Activation::None, &mut qkv)?;
            T::attention(
                dev,
                &qkv,
                blk.rel_bias.as_ref(),
                &mut att,
                &ad,
                &mut scratch,
            )?;
            lin(&att, &blk.proj, Activation::None, &mut ybuf)?;
            cu::elementwise::residual(dev, &mut x, &ybuf, blk.gamma1.as_ref(), (bn, d))?;
            let xin = T::ln_input(dev, &x, &mut xt)?;
            cu::layernorm::forward(
                dev,
                xin,
                &blk.norm2.w,
                &blk.norm2.b,
                &mut hbuf,
                None,
                (bn, d),
                cfg.eps,
            )?;
            lin(&hbuf, &blk.fc1, Activation::Gelu, &mut mlp)?;
            lin(&mlp, &blk.fc2, Activation::None, &mut ybuf)?;
            cu::elementwise::residual(dev, &mut x, &ybuf, blk.gamma2.as_ref(), (bn, d))?;
        }

        // Pooling as a batched GEMV: pooled_i [D] = x_i [N, D]ᵀ · pool_w [N] for every image i,
        // then the final norm (per row, so norm-then-take = take-then-norm for the class token).
        // Column-major, x_i is [D, N] with ld D and pool_w [N, 1], shared (stride 0).
        let mut pooled = dev.zeros::<f32>(b * d)?;
        let pool_cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: as_i32("D", d)?,
                n: 1,
                k: as_i32("N", n)?,
                alpha: 1.0f32,
                lda: as_i32("D", d)?,
                ldb: as_i32("N", n)?,
                beta: 0.0f32,
                ldc: as_i32("D", d)?,
            },
            batch_size: as_i32("B", b)?,
            stride_a: (n * d) as i64,
            stride_b: 0,
            stride_c: d as i64,
        };
        // SAFETY: x holds B·N·D values, pool_w N, pooled B·D: the strides above stay inside.
        unsafe {
            <CudaBlas as Gemm<f32>>::gemm_strided_batched(
                dev.blas(),
                pool_cfg,
                &x,
                &self.pool_w,
                &mut pooled,
            )
        }
        .map_err(cuda_err("cuBLAS pooling"))?;
        let mut feats = dev.zeros::<f32>(b * d)?;
        let fnorm = &self.final_norm;
        cu::layernorm::forward(
            dev,
            &pooled,
            &fnorm.w,
            &fnorm.b,
            &mut feats,
            None,
            (b, d),
            cfg.eps,
        )?;
        let logits = match &self.head {
            Some(hd) => {
                let mut out = dev.zeros::<f32>(b * hd.nk.0)?;
                cu::matmul::linear::<f32>(
                    dev,
                    &feats,
                    &hd.w,
                    hd.b.as_ref(),
                    Activation::None,
                    &mut out,
                    (b, d, hd.nk.0),
                )?;
                Some(out)
            }
            None => None,
        };
        Ok((feats, logits))
    }
}
