//! Launcher of kernels/flash_attention.cu: fused multi-head self-attention on tensor cores (bf16
//! mma, f32 softmax and accumulation), same contract as `attention::forward` (qkv [B·N, 3·D],
//! bias [H, N, N] f32 or none, out [B·N, D], as src/backend/cpu/attention.rs) for head dim 64,
//! plus the optional row log-sum-exp lse [B, H, N] that a backward uses to rebuild P.
//!
//! Other head dims have no kernel: `unsupported` says why, and the caller runs
//! `attention::forward_batched` (any head dim) instead; `forward` refuses them rather than
//! compute a wrong result.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::attention::Dims;
use super::device::{as_i32, check_len, CudaDevice};
use super::{ptr_mut_or_null, ptr_or_null};
use crate::error::{Error, Result};

/// The one head dim the kernel is written for (every ViT/BEiT preset at patch 16).
pub const HEAD_DIM: usize = 64;
/// Query rows per block (FA_BQ).
const BQ: usize = 64;
/// Q, then K and V double-buffered: 5 tiles of 64 rows × 72 bf16 (kernels/flash_attention.cu).
const SMEM_BYTES: u32 = 5 * 64 * 72 * 2;

/// None when the tensor-core kernel takes these dims, else the reason it does not (the note to
/// show when falling back to the cuBLAS path).
pub fn unsupported(dims: &Dims) -> Option<String> {
    if dims.dh != HEAD_DIM {
        return Some(format!(
            "flash attention takes head dim {HEAD_DIM}, not {}: using the cuBLAS attention",
            dims.dh
        ));
    }
    if dims.b > 65535 || dims.h > 65535 {
        return Some(format!(
            "flash attention: grid dims B = {}, H = {} exceed 65535: using the cuBLAS attention",
            dims.b, dims.h
        ));
    }
    None
}

/// out = softmax(scale·q kᵀ + bias) v per (image, head); `lse`, when given, receives
/// log Σ_j exp(scale·q_i·k_j + bias_ij) for each (image, head, row), [B, H, N].
pub fn forward(
    dev: &CudaDevice,
    qkv: &CudaSlice<bf16>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<bf16>,
    lse: Option<&mut CudaSlice<f32>>,
    dims: &Dims,
    scale: f32,
) -> Result<()> {
    if let Some(why) = unsupported(dims) {
        return Err(Error::Cuda(why));
    }
    let Dims { b, n, h, dh } = *dims;
    let d = h * dh;
    check_len("flash attention qkv", qkv, b * n * 3 * d)?;
    check_len("flash attention out", out, b * n * d)?;
    if let Some(bias) = bias {
        check_len("flash attention bias", bias, h * n * n)?;
    }
    if let Some(lse) = &lse {
        check_len("flash attention lse", lse, b * h * n)?;
    }
    let (ni, hi) = (as_i32("N", n)?, as_i32("H", h)?);
    if b == 0 || n == 0 || h == 0 {
        return Ok(());
    }
    let s = dev.stream();
    // cp.async moves 16-byte chunks: the rows (3·D·2 bytes) are multiples of 16, the base must be.
    if qkv.device_ptr(s).0 % 16 != 0 {
        return Err(Error::Cuda(
            "flash attention: qkv is not 16-byte aligned".into(),
        ));
    }
    let name = "flash_attention_fwd_bf16_d64";
    let f = dev.function("flash_attention", name)?;
    let (pb, pl) = (ptr_or_null(s, bias), ptr_mut_or_null(s, lse));
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BQ) as u32, h as u32, b as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: SMEM_BYTES,
    };
    // SAFETY: qkv, out, bias and lse were checked against (B, N, H, 64); 46 KB of dynamic shared
    // memory is under the 48 KB every sm_70+ block may use without the opt-in attribute.
    unsafe { launch!(dev, f, name, cfg, [qkv, &pb, out, &pl, &ni, &hi, &scale]) }?;
    Ok(())
}

/// Images whose dS one dK/dV block adds into one dbias partial (then summed in group order): a
/// fixed number, so dbias is the same bit for bit for any batch split or GPU.
pub const IMAGES_PER_GROUP: usize = 4;
/// Query rows per dQ block and keys per dK/dV block.
const BWD_ROWS: usize = 64;
/// 64-row K and V (or Q and dO) plus two double-buffered 32-row tiles of 72 bf16.
const BWD_SMEM_BYTES: u32 = (2 * 64 + 4 * 32) * 72 * 2;

/// What the backward reads: the forward's inputs, its out and its lse.
pub struct Saved<'a> {
    pub qkv: &'a CudaSlice<bf16>,
    pub bias: Option<&'a CudaSlice<f32>>,
    pub out: &'a CudaSlice<bf16>,
    pub lse: &'a CudaSlice<f32>,
}

/// What the backward writes: dqkv [B·N, 3·D] f32 (all of it), and dbias [H, N, N] f32 summed over
/// the batch when wanted.
pub struct Grads<'a> {
    pub dqkv: &'a mut CudaSlice<f32>,
    pub dbias: Option<&'a mut CudaSlice<f32>>,
}

/// The backward's scratch, made once per (batch, dims): δ [B·H·N], and the dbias partials
/// [G·H·N·N] for G = ceil(B / IMAGES_PER_GROUP) > 1 groups (with one group the kernel writes
/// dbias itself).
pub struct Workspace {
    pub delta: CudaSlice<f32>,
    pub dbias_part: Option<CudaSlice<f32>>,
}

impl Workspace {
    pub fn new(dev: &CudaDevice, dims: &Dims, want_dbias: bool) -> Result<Workspace> {
        let Dims { b, n, h, .. } = *dims;
        let groups = b.div_ceil(IMAGES_PER_GROUP);
        Ok(Workspace {
            delta: dev.zeros::<f32>((b * h * n).max(1))?,
            dbias_part: if want_dbias && groups > 1 {
                Some(dev.zeros::<f32>(groups * h * n * n)?)
            } else {
                None
            },
        })
    }
}

/// Gradients of `forward` given dout [B·N, D] bf16: dqkv, and dbias when `grads.dbias` is given
/// (which needs `saved.bias`' shape, [H, N, N], whether or not the forward had a bias).
pub fn backward(
    dev: &CudaDevice,
    saved: &Saved,
    dout: &CudaSlice<bf16>,
    grads: Grads,
    ws: &mut Workspace,
    dims: &Dims,
    scale: f32,
) -> Result<()> {
    if let Some(why) = unsupported(dims) {
        return Err(Error::Cuda(why));
    }
    let Dims { b, n, h, dh } = *dims;
    let (d, hnn) = (h * dh, h * n * n);
    let groups = b.div_ceil(IMAGES_PER_GROUP);
    check_len("flash attention qkv", saved.qkv, b * n * 3 * d)?;
    check_len("flash attention out", saved.out, b * n * d)?;
    check_len("flash attention lse", saved.lse, b * h * n)?;
    check_len("flash attention dout", dout, b * n * d)?;
    check_len("flash attention dqkv", grads.dqkv, b * n * 3 * d)?;
    check_len("flash attention delta", &ws.delta, (b * h * n).max(1))?;
    if let Some(bias) = saved.bias {
        check_len("flash attention bias", bias, hnn)?;
    }
    let Grads { dqkv, mut dbias } = grads;
    if let Some(db) = &dbias {
        check_len("flash attention dbias", db, hnn)?;
        if groups > 1 {
            let part = ws.dbias_part.as_ref().ok_or_else(|| {
                Error::Cuda("flash attention: the workspace has no dbias partials".into())
            })?;
            check_len("flash attention dbias partials", part, groups * hnn)?;
        }
    }
    let (bi, ni, hi) = (as_i32("B", b)?, as_i32("N", n)?, as_i32("H", h)?);
    let gi = as_i32("images per group", IMAGES_PER_GROUP)?;
    if b == 0 || n == 0 || h == 0 {
        return Ok(());
    }
    let s = dev.stream();
    for (what, p) in [
        ("qkv", saved.qkv.device_ptr(s).0),
        ("dout", dout.device_ptr(s).0),
    ] {
        if p % 16 != 0 {
            return Err(Error::Cuda(format!(
                "flash attention: {what} is not 16-byte aligned"
            )));
        }
    }
    let name = "flash_attention_bwd_delta_bf16";
    let f = dev.function("flash_attention", name)?;
    let delta = &mut ws.delta;
    // SAFETY: out and dout hold B·N·D, delta B·H·N (checked above).
    unsafe {
        launch!(
            dev,
            f,
            name,
            dev.grid_stride(b * h * n),
            [saved.out, dout, &mut *delta, &bi, &ni, &hi]
        )
    }?;

    let pb = ptr_or_null(s, saved.bias);
    // One group: the dK/dV kernel writes dbias itself; else its partials, summed below.
    let part = match (&mut dbias, groups) {
        (None, _) => 0,
        (Some(db), 1) => ptr_mut_or_null(s, Some(&mut **db)),
        (Some(_), _) => ptr_mut_or_null(s, ws.dbias_part.as_mut()),
    };
    let name = "flash_attention_bwd_dkdv_bf16_d64";
    let f = dev.function("flash_attention", name)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BWD_ROWS) as u32, h as u32, groups as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: BWD_SMEM_BYTES,
    };
    let (qkv, lse, delta) = (saved.qkv, saved.lse, &ws.delta);
    // SAFETY: every buffer was checked against (B, N, H, 64) and the group count; 36 KB of
    // dynamic shared memory needs no opt-in.
    unsafe {
        launch!(
            dev,
            f,
            name,
            cfg,
            [qkv, &pb, dout, lse, delta, &mut *dqkv, &part, &bi, &ni, &hi, &gi, &scale]
        )
    }?;
    let name = "flash_attention_bwd_dq_bf16_d64";
    let f = dev.function("flash_attention", name)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(BWD_ROWS) as u32, h as u32, b as u32),
        ..cfg
    };
    // SAFETY: as above; this kernel writes the q columns of dqkv, the one before the k and v ones.
    unsafe {
        launch!(
            dev,
            f,
            name,
            cfg,
            [qkv, &pb, dout, lse, delta, &mut *dqkv, &ni, &hi, &scale]
        )
    }?;
    if let (Some(db), true) = (dbias, groups > 1) {
        let name = "flash_attention_bwd_dbias_reduce";
        let f = dev.function("flash_attention", name)?;
        let part = ws.dbias_part.as_ref().expect("checked above");
        let (len, gs) = (hnn as i64, as_i32("groups", groups)?);
        // SAFETY: part holds G·H·N·N floats and dbias H·N·N.
        unsafe { launch!(dev, f, name, dev.grid_stride(hnn), [part, db, &len, &gs]) }?;
    }
    Ok(())
}
