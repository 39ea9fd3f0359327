//! The op set the training tape runs on: each of the model's forward ops, returning what its
//! backward needs, and that backward. The tape (`train::tape`) is written once over this trait;
//! `CpuTrain` (model/cpu_train.rs) and `CudaExec` (model/cuda_train.rs) implement it, so a model
//! op added here trains on every device. Shapes as in `exec::Exec`; every gradient is f32 and has
//! the layout of the value it belongs to (a parameter's gradient that of the parameter).

use crate::backend::{Activation, Pool};
use crate::error::Result;
use crate::model::layers::{Linear, Norm, Param};
use crate::tensor::Tensor;

/// Attention's sizes: batch, tokens, heads, head dim.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub dh: usize,
}

/// The relative-position bias as the backward sees it: the table and its N·N index.
pub struct TableRef<'a> {
    pub table: &'a Param,
    pub index: &'a [usize],
}

/// Two gradients and an optional third, as the backward ops below name them.
pub type GradTriple<G> = (G, G, Option<G>);

pub trait TrainExec {
    /// A forward value, shared between the tape's records (cheap to clone).
    type Buf: Clone;
    /// A gradient buffer (f32).
    type Grad;
    /// What attention's backward reads besides qkv (the probabilities, or flash statistics).
    type AttnSaved;
    /// What LayerNorm's backward reads besides x (each row's mean and 1/std, or nothing when the
    /// executor recomputes them).
    type NormSaved;

    fn shape(v: &Self::Buf) -> &[usize];

    // --- forward ---------------------------------------------------------------------------
    fn input(&mut self, images: &Tensor) -> Result<Self::Buf>;
    /// images → (patch tokens, the im2col patches that the weight gradient reads)
    fn patch_embed(
        &mut self,
        images: &Self::Buf,
        w: &Param,
        b: &Param,
    ) -> Result<(Self::Buf, Self::Buf)>;
    fn assemble_tokens(
        &mut self,
        patches: &Self::Buf,
        cls: &Param,
        pos: Option<&Param>,
        b: usize,
    ) -> Result<Self::Buf>;
    /// (y, what the backward reads besides x)
    fn layernorm(
        &mut self,
        x: &Self::Buf,
        norm: &Norm,
        eps: f32,
    ) -> Result<(Self::Buf, Self::NormSaved)>;
    /// (y, the pre-activation when `act` is GELU)
    fn linear(
        &mut self,
        x: &Self::Buf,
        l: &Linear,
        act: Activation,
    ) -> Result<(Self::Buf, Option<Self::Buf>)>;
    fn attention(
        &mut self,
        qkv: &Self::Buf,
        bias: Option<&crate::model::layers::RelBias>,
        dims: AttnDims,
    ) -> Result<(Self::Buf, Self::AttnSaved)>;
    /// Each image's rows of y [B·n, D] times keep[image] (drop-path).
    fn scale_rows(&mut self, y: &Self::Buf, keep: &[f32], n: usize) -> Result<Self::Buf>;
    /// x + γ ⊙ y, into a new value (x stays readable by the records that hold it).
    fn residual(
        &mut self,
        x: &Self::Buf,
        y: &Self::Buf,
        gamma: Option<&Param>,
    ) -> Result<Self::Buf>;
    fn pool(&mut self, x: &Self::Buf, b: usize, how: Pool) -> Result<Self::Buf>;
    fn mask_rows(&mut self, x: &Self::Buf, mask: &[bool], token: &Param) -> Result<Self::Buf>;
    fn gather_rows(&mut self, x: &Self::Buf, rows: &[usize]) -> Result<Self::Buf>;
    fn to_host(&mut self, v: &Self::Buf) -> Result<Tensor>;

    // --- losses: the scalar comes to the host, the gradient stays on the executor --------------
    /// Cross-entropy with label smoothing ε of logits [B, C] against `labels` (B of them, each
    /// < C), as `train::loss::cross_entropy`: (the batch-mean loss, dlogits).
    fn cross_entropy(
        &mut self,
        logits: &Self::Buf,
        labels: &[usize],
        smoothing: f32,
    ) -> Result<(f32, Self::Grad)>;
    /// MOS's group-softmax loss of logits [B, Σ(size + 1)] (`groups` the sizes, classes assigned
    /// in order) against class `labels` (B of them, each < Σ size), as
    /// `train::loss::group_softmax`: (the sum over groups of each group's batch-mean loss, dlogits).
    fn group_softmax(
        &mut self,
        logits: &Self::Buf,
        groups: &[usize],
        labels: &[usize],
    ) -> Result<(f32, Self::Grad)>;
    /// Mean squared error of pred [R, K] against `target` (R·K values), as `train::mim::mse`:
    /// (loss, dpred).
    fn mse(&mut self, pred: &Self::Buf, target: &[f32]) -> Result<(f32, Self::Grad)>;

    // --- ALPA's head (train::alpa::alpa_on) -----------------------------------------------------
    /// max(x, 0), f32.
    fn relu(&mut self, x: &Self::Buf) -> Result<Self::Buf>;
    /// dy where the ReLU's output y > 0, else 0.
    fn relu_backward(&mut self, y: &Self::Buf, dy: Self::Grad) -> Result<Self::Grad>;
    /// ALPA's cross terms of q, k, v [M·T, d] (M views of T tokens, f32):
    /// t(b←a) = Σ_p cos(V_b[p], (softmax(Q_b K_aᵀ/√d) V_a)[p]), as `terms[b·M + a]` [M, M] on the
    /// host (the one small matrix SupCon needs), as `train::alpa::alpa_terms`.
    fn alpa_terms(
        &mut self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        m: usize,
    ) -> Result<Vec<f32>>;
    /// (dq, dk, dv) [M·T, d] for ∂L/∂terms `g` [M, M] (from the host).
    fn alpa_terms_backward(
        &mut self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        m: usize,
        g: &[f32],
    ) -> Result<(Self::Grad, Self::Grad, Self::Grad)>;

    // --- gradients ---------------------------------------------------------------------------
    fn grad_len(g: &Self::Grad) -> usize;
    fn grad_from_host(&mut self, g: &[f32]) -> Result<Self::Grad>;
    fn grad_to_host(&mut self, g: &Self::Grad) -> Result<Vec<f32>>;
    /// acc += g
    fn add_grad(&mut self, acc: &mut Self::Grad, g: &Self::Grad) -> Result<()>;
    /// g[start..end] as a new gradient (the q and v parts of BEiT's joined qkv bias).
    fn grad_range(&mut self, g: &Self::Grad, start: usize, end: usize) -> Result<Self::Grad>;

    // --- backward ----------------------------------------------------------------------------
    /// (dw [D, C·P·P] laid out as w's [D, C, P, P], db, dimages when `want_input`)
    fn patch_embed_backward(
        &mut self,
        cols: &Self::Buf,
        w: &Param,
        image_dims: [usize; 4],
        dy: Self::Grad,
        want_input: bool,
    ) -> Result<GradTriple<Self::Grad>>;
    /// dy [B·N, D] → (dpatches [B·(N−1), D], dcls [D], dpos [N, D] when `has_pos`)
    fn assemble_backward(
        &mut self,
        dy: Self::Grad,
        b: usize,
        d: usize,
        has_pos: bool,
    ) -> Result<GradTriple<Self::Grad>>;
    /// (dx, dγ, dβ)
    fn layernorm_backward(
        &mut self,
        x: &Self::Buf,
        saved: &Self::NormSaved,
        norm: &Norm,
        eps: f32,
        dy: Self::Grad,
    ) -> Result<(Self::Grad, Self::Grad, Self::Grad)>;
    /// (dx, dw, db when the layer has a bias); `pre_gelu` is the saved pre-activation.
    fn linear_backward(
        &mut self,
        x: &Self::Buf,
        l: &Linear,
        pre_gelu: Option<&Self::Buf>,
        dy: Self::Grad,
    ) -> Result<GradTriple<Self::Grad>>;
    /// (dqkv, the table's gradient [rows, H] when there is a bias); `saved` is handed over, so an
    /// executor may keep its buffers for the next forward.
    fn attention_backward(
        &mut self,
        qkv: &Self::Buf,
        saved: Self::AttnSaved,
        table: Option<TableRef<'_>>,
        dims: AttnDims,
        dy: Self::Grad,
    ) -> Result<(Self::Grad, Option<Self::Grad>)>;
    /// (dbranch = dy ⊙ γ (⊙ keep), dγ = Σ_rows dy ⊙ yv) for the branch `yv` as added.
    fn residual_backward(
        &mut self,
        yv: &Self::Buf,
        gamma: Option<&Param>,
        row_scale: Option<(&[f32], usize)>,
        dy: &Self::Grad,
    ) -> Result<(Self::Grad, Option<Self::Grad>)>;
    fn pool_backward(
        &mut self,
        dy: Self::Grad,
        b: usize,
        n: usize,
        how: Pool,
    ) -> Result<Self::Grad>;
    /// (dx, dtoken)
    fn mask_rows_backward(
        &mut self,
        dy: Self::Grad,
        mask: &[bool],
        d: usize,
    ) -> Result<(Self::Grad, Self::Grad)>;
    fn gather_rows_backward(
        &mut self,
        dy: Self::Grad,
        rows: &[usize],
        m: usize,
    ) -> Result<Self::Grad>;
}
