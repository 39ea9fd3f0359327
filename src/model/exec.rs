//! How a forward pass is executed. The model's forward is written once over this small op set;
//! `Infer` runs the CPU backend ops directly, `cuda_exec::CudaExec` runs them on a CUDA device
//! with the activations kept there, and the training tape (`train::tape::Tape`) also records what
//! backward needs. Shape letters as in `backend`.

use crate::backend::{self, Activation, Pool};
use crate::error::Result;
use crate::model::layers::{Linear, Norm, Param, RelBias};
use crate::tensor::Tensor;

pub trait Exec {
    /// An activation: a tensor for inference, a tape variable for training.
    type V;
    /// images [B, C, H, W]
    fn input(&mut self, images: &Tensor) -> Result<Self::V>;
    /// images → patch tokens [B·G, D]
    fn patch_embed(&mut self, images: &Self::V, w: &Param, b: &Param) -> Result<Self::V>;
    /// patch tokens [B·G, D] → sequence [B·N, D] with the class token first (+ pos [N, D])
    fn assemble_tokens(
        &mut self,
        patches: Self::V,
        cls: &Param,
        pos: Option<&Param>,
        b: usize,
    ) -> Result<Self::V>;
    fn layernorm(&mut self, x: &Self::V, norm: &Norm, eps: f32) -> Result<Self::V>;
    fn linear(&mut self, x: &Self::V, l: &Linear, act: Activation) -> Result<Self::V>;
    /// qkv [B·N, 3·D] → [B·N, D]
    fn attention(
        &mut self,
        qkv: Self::V,
        bias: Option<&RelBias>,
        b: usize,
        n: usize,
        heads: usize,
    ) -> Result<Self::V>;
    /// x + γ ⊙ y, the residual of block `block` (training executors apply drop-path there).
    fn residual(
        &mut self,
        x: Self::V,
        y: Self::V,
        gamma: Option<&Param>,
        block: usize,
    ) -> Result<Self::V>;
    /// The residual of block `block` and the LayerNorm that follows it, as one op: returns
    /// (x + γ ⊙ y, LN(x + γ ⊙ y)). By default the two ops one after the other (the CPU and the
    /// training tape: the same values and records as calling them apart); the CUDA executor
    /// runs them as one pass over the residual stream.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm(
        &mut self,
        x: Self::V,
        y: Self::V,
        gamma: Option<&Param>,
        block: usize,
        norm: &Norm,
        eps: f32,
    ) -> Result<(Self::V, Self::V)> {
        let x = self.residual(x, y, gamma, block)?;
        let h = self.layernorm(&x, norm, eps)?;
        Ok((x, h))
    }
    /// [B·N, D] → [B, D]
    fn pool(&mut self, x: Self::V, b: usize, how: Pool) -> Result<Self::V>;
    /// Rows of x [M, D] with mask set become `token` (masked image modelling).
    fn mask_rows(&mut self, x: Self::V, mask: &[bool], token: &Param) -> Result<Self::V>;
    /// x [M, D] → x[rows] [R, D]
    fn gather_rows(&mut self, x: &Self::V, rows: &[usize]) -> Result<Self::V>;
    /// The value as a host tensor (a copy from the device where it lives there).
    fn to_host(&mut self, v: &Self::V) -> Result<Tensor>;
}

/// Plain inference: every op goes straight to the backend; nothing is kept.
pub struct Infer;

impl Exec for Infer {
    type V = Tensor;

    fn input(&mut self, images: &Tensor) -> Result<Tensor> {
        Ok(images.clone())
    }

    fn patch_embed(&mut self, images: &Tensor, w: &Param, b: &Param) -> Result<Tensor> {
        backend::patch_embed(images, &w.value, &b.value)
    }

    fn assemble_tokens(
        &mut self,
        patches: Tensor,
        cls: &Param,
        pos: Option<&Param>,
        b: usize,
    ) -> Result<Tensor> {
        backend::assemble_tokens(&patches, &cls.value, pos.map(|p| &p.value), b)
    }

    fn layernorm(&mut self, x: &Tensor, norm: &Norm, eps: f32) -> Result<Tensor> {
        backend::layernorm(x, &norm.w.value, &norm.b.value, eps)
    }

    fn linear(&mut self, x: &Tensor, l: &Linear, act: Activation) -> Result<Tensor> {
        backend::linear(x, &l.w.value, l.bias.tensor(), act)
    }

    fn attention(
        &mut self,
        qkv: Tensor,
        bias: Option<&RelBias>,
        b: usize,
        n: usize,
        heads: usize,
    ) -> Result<Tensor> {
        backend::attention(&qkv, bias.map(|r| &r.dense), b, n, heads)
    }

    fn residual(
        &mut self,
        mut x: Tensor,
        y: Tensor,
        gamma: Option<&Param>,
        _block: usize,
    ) -> Result<Tensor> {
        backend::residual(&mut x, &y, gamma.map(|g| &g.value))?;
        Ok(x)
    }

    fn pool(&mut self, x: Tensor, b: usize, how: Pool) -> Result<Tensor> {
        backend::pool(&x, b, how)
    }

    fn mask_rows(&mut self, x: Tensor, mask: &[bool], token: &Param) -> Result<Tensor> {
        backend::mask_rows(&x, mask, &token.value)
    }

    fn gather_rows(&mut self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        backend::gather_rows(x, rows)
    }

    fn to_host(&mut self, v: &Tensor) -> Result<Tensor> {
        Ok(v.clone())
    }
}
