//! The op set the models, the OOD scores and (later) training are written against.
//!
//! Shape letters, used in every comment of the crate: `B` batch, `N` tokens (1 + G patches, 197 for
//! a 224 image with patch 16), `G` patches, `D` channels, `H` heads, `Dh` head dim, `F` MLP hidden,
//! `C` classes, `M` rows of a matrix, `K` inner dimension.
//!
//! Each function takes and returns `Tensor`s and dispatches on where the data lives. Today every
//! tensor is on the CPU; the CUDA backend adds its arm to each op, with the same names
//! (`cpu::layernorm::forward` / `cuda::layernorm::forward`), so the model code stays as it is.

/// The element type of a CUDA forward's activations (`--precision`): f32, or bf16 storage with
/// f32 accumulation. Defined here, below the model and the command line that both use it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

/// Where a command computes (`--device`): the CPU, CUDA device 0, or CUDA when a device is
/// usable and else the CPU with a one-line note (pipeline::device::on_cuda).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
    Auto,
}

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod memory_budget;

use crate::error::{Error, Result};
use crate::profile;
use crate::tensor::Tensor;

fn check(what: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.shape() != want {
        return Err(Error::Data(format!(
            "{what}: expected shape {want:?}, got {:?}",
            t.shape()
        )));
    }
    Ok(())
}

/// Epilogue applied to a linear layer's output, fused into one pass over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    /// Exact (erf) GELU, as torch.nn.GELU().
    Gelu,
}

/// y[M, N] = act(x[M, K] · w[N, K]ᵀ + b[N]) (nn.Linear weight layout, read in place).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    let (m, k) = x.dims2("linear input")?;
    let (n, k2) = w.dims2("linear weight")?;
    if k != k2 {
        return Err(Error::Data(format!(
            "linear: input has {k} features but the weight expects {k2}"
        )));
    }
    if let Some(b) = b {
        check("linear bias", b, &[n])?;
    }
    let mut out = {
        let _t = profile::scope("gemm");
        cpu::matmul::linear_new(x.as_slice(), w.as_slice(), m, k, n)
    };
    epilogue(&mut out, n, b.map(|b| b.as_slice()), act);
    Tensor::from_vec(&[m, n], out)
}

fn epilogue(out: &mut [f32], n: usize, bias: Option<&[f32]>, act: Activation) {
    use rayon::prelude::*;
    let chunk = n * 8;
    match (bias, act) {
        (None, Activation::None) => {}
        (Some(b), Activation::None) => {
            let _t = profile::scope("bias");
            out.par_chunks_mut(chunk)
                .for_each(|c| cpu::vecmath::bias_rows(c, b));
        }
        (Some(b), Activation::Gelu) => {
            let _t = profile::scope("gelu");
            out.par_chunks_mut(chunk)
                .for_each(|c| cpu::vecmath::bias_gelu_rows(c, b));
        }
        (None, Activation::Gelu) => {
            let _t = profile::scope("gelu");
            out.par_chunks_mut(chunk).for_each(cpu::vecmath::gelu_slice);
        }
    }
}

/// LayerNorm over the last dim of x [.., D] with γ, β [D].
pub fn layernorm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let _t = profile::scope("layernorm");
    let d = *x.shape().last().unwrap_or(&0);
    check("layernorm weight", gamma, &[d])?;
    check("layernorm bias", beta, &[d])?;
    let out = cpu::layernorm::forward_new(x.as_slice(), gamma.as_slice(), beta.as_slice(), eps);
    Tensor::from_vec(x.shape(), out)
}

/// Self-attention on a fused qkv activation [B·N, 3·D] → [B·N, D], with an optional additive
/// bias [H, N, N] shared by all images (BEiT's relative-position bias).
pub fn attention(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    b: usize,
    n: usize,
    heads: usize,
) -> Result<Tensor> {
    attention_impl(qkv, bias, b, n, heads, false).map(|(out, _)| out)
}

/// `attention` that also returns the probabilities P [B, H, N, N] its backward reads.
pub fn attention_keep_probs(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    b: usize,
    n: usize,
    heads: usize,
) -> Result<(Tensor, Vec<f32>)> {
    attention_impl(qkv, bias, b, n, heads, true).map(|(out, p)| (out, p.unwrap_or_default()))
}

fn attention_impl(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    b: usize,
    n: usize,
    heads: usize,
    keep_probs: bool,
) -> Result<(Tensor, Option<Vec<f32>>)> {
    let _t = profile::scope("attention");
    let (rows, three_d) = qkv.dims2("attention qkv")?;
    if rows != b * n || three_d % (3 * heads) != 0 {
        return Err(Error::Data(format!(
            "attention: qkv shape {:?} does not fit B={b}, N={n}, H={heads}",
            qkv.shape()
        )));
    }
    let d = three_d / 3;
    if let Some(bias) = bias {
        check("attention bias", bias, &[heads, n, n])?;
    }
    let dims = cpu::attention::Dims {
        b,
        n,
        h: heads,
        dh: d / heads,
    };
    let mut out = vec![0.0f32; b * n * d];
    let (qkv, bias) = (qkv.as_slice(), bias.map(|t| t.as_slice()));
    let probs = if keep_probs {
        Some(cpu::attention::forward_keep_probs(
            qkv, bias, &dims, &mut out,
        ))
    } else {
        cpu::attention::forward(qkv, bias, &dims, &mut out);
        None
    };
    Ok((Tensor::from_vec(&[b * n, d], out)?, probs))
}

/// images [B, C, H, W] → patch tokens [B·G, D] through the conv weight [D, C, P, P] and bias [D].
pub fn patch_embed(images: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let [b, c, hgt, wid] = images.shape()[..] else {
        return Err(Error::Data(format!(
            "patch_embed: expected images [B, C, H, W], got {:?}",
            images.shape()
        )));
    };
    let [d, wc, p, p2] = w.shape()[..] else {
        return Err(Error::Data(format!(
            "patch_embed: weight shape {:?}",
            w.shape()
        )));
    };
    if wc != c || p != p2 || hgt % p != 0 || wid % p != 0 {
        return Err(Error::Data(format!(
            "patch_embed: images {:?} do not fit the conv weight {:?}",
            images.shape(),
            w.shape()
        )));
    }
    let cols = {
        let _t = profile::scope("patch_embed");
        cpu::patch_embed::im2col(images.as_slice(), b, c, hgt, wid, p)
    };
    let g = (hgt / p) * (wid / p);
    let cols = Tensor::from_vec(&[b * g, c * p * p], cols)?;
    let w2 = w.clone().reshape(&[d, c * p * p])?;
    linear(&cols, &w2, Some(bias), Activation::None)
}

/// The row width D of a residual x + γ ⊙ y, once x and y agree in shape and γ is [D].
fn residual_width(x: &Tensor, y: &Tensor, gamma: Option<&Tensor>) -> Result<usize> {
    if x.shape() != y.shape() {
        return Err(Error::Data(format!(
            "residual: shapes {:?} and {:?} differ",
            x.shape(),
            y.shape()
        )));
    }
    let d = *x.shape().last().unwrap_or(&1);
    if let Some(g) = gamma {
        check("layer scale", g, &[d])?;
    }
    Ok(d)
}

/// x [M, D] += γ ⊙ y [M, D].
pub fn residual(x: &mut Tensor, y: &Tensor, gamma: Option<&Tensor>) -> Result<()> {
    let _t = profile::scope("residual");
    let d = residual_width(x, y, gamma)?;
    let g = gamma.map(|g| g.as_slice());
    cpu::elementwise::residual_scaled(x.as_mut_slice(), y.as_slice(), g, d);
    Ok(())
}

/// x + γ ⊙ y [M, D] as a new tensor (x and y unchanged).
pub fn residual_new(x: &Tensor, y: &Tensor, gamma: Option<&Tensor>) -> Result<Tensor> {
    let _t = profile::scope("residual");
    let d = residual_width(x, y, gamma)?;
    let g = gamma.map(|g| g.as_slice());
    let out = cpu::elementwise::residual_scaled_new(x.as_slice(), y.as_slice(), g, d);
    Tensor::from_vec(x.shape(), out)
}

/// Patch tokens [B·G, D] → sequence [B·N, D] with the class token first, plus pos [N, D] if any.
pub fn assemble_tokens(
    patches: &Tensor,
    cls: &Tensor,
    pos: Option<&Tensor>,
    b: usize,
) -> Result<Tensor> {
    let (bg, d) = patches.dims2("patch tokens")?;
    let g = bg / b;
    check("cls_token", cls, &[d])?;
    if let Some(pos) = pos {
        check("pos_embed", pos, &[g + 1, d])?;
    }
    let out = cpu::elementwise::assemble_tokens(
        patches.as_slice(),
        cls.as_slice(),
        pos.map(|p| p.as_slice()),
        b,
        g,
        d,
    );
    Tensor::from_vec(&[b * (g + 1), d], out)
}

/// Pooling of a token sequence [B·N, D] into [B, D].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Mean of the patch tokens (class token excluded): BEiT's `global_pool='avg'`.
    MeanPatches,
    /// The class token: ViT's `global_pool='token'`.
    ClassToken,
}

pub fn pool(x: &Tensor, b: usize, how: Pool) -> Result<Tensor> {
    let _t = profile::scope("pool");
    let (bn, d) = x.dims2("pool input")?;
    let n = bn / b;
    let out = match how {
        Pool::MeanPatches => cpu::reduce::mean_tokens(x.as_slice(), b, n, d, 1),
        Pool::ClassToken => cpu::reduce::take_token(x.as_slice(), b, n, d, 0),
    };
    Tensor::from_vec(&[b, d], out)
}

/// Rows of x [M, D] whose mask is set are replaced by `token` [D].
pub fn mask_rows(x: &Tensor, mask: &[bool], token: &Tensor) -> Result<Tensor> {
    let (m, d) = x.dims2("mask_rows input")?;
    check("mask token", token, &[d])?;
    if mask.len() != m {
        return Err(Error::Data(format!(
            "mask_rows: mask has {} entries for {m} rows",
            mask.len()
        )));
    }
    let mut y = x.clone();
    cpu::elementwise::mask_rows(y.as_mut_slice(), mask, token.as_slice());
    Ok(y)
}

/// x [M, D] → x[rows] [R, D].
pub fn gather_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let (m, d) = x.dims2("gather_rows input")?;
    if let Some(&bad) = rows.iter().find(|&&r| r >= m) {
        return Err(Error::Data(format!(
            "gather_rows: row {bad} out of range for {m} rows"
        )));
    }
    Tensor::from_vec(
        &[rows.len(), d],
        cpu::elementwise::gather_rows(x.as_slice(), rows, d),
    )
}
