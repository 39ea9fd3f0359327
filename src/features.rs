//! The values every layer passes around, in a leaf module that imports nothing of the crate:
//! feature matrices and what a store offers (`Matrix`, `Inputs`), and a classifier's head with
//! the norm before it (`Head`, `FcNorm`). The model makes them, the store saves and loads them,
//! extraction writes them and the OOD scores read them, without any of those importing another.

/// fc_norm: a LayerNorm applied to each pooled vector.
#[derive(Clone)]
pub struct FcNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

/// A linear head W [C, D], b [C], and the fc_norm before it when known (for `csd`).
#[derive(Clone)]
pub struct Head {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub fc_norm: Option<FcNorm>,
}

/// A row-major matrix view.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub cols: usize,
}

impl Matrix<'_> {
    pub fn rows(&self) -> usize {
        self.data.len() / self.cols.max(1)
    }
}

/// What a store offers to fit on or to score.
#[derive(Clone, Copy, Default)]
pub struct Inputs<'a> {
    pub features: Option<Matrix<'a>>,
    pub logits: Option<Matrix<'a>>,
    pub labels: Option<&'a [usize]>,
    /// [n, T·D] with `local_tokens` = T.
    pub local: Option<Matrix<'a>>,
    pub local_tokens: usize,
    pub head: Option<&'a Head>,
    /// [n] ODIN scores from the extraction (`mood extract --odin`).
    pub odin: Option<&'a [f32]>,
    /// [n, L·D] per-block pooled features (`mood extract --layers`), with `layer_blocks` the L
    /// block numbers.
    pub layers: Option<Matrix<'a>>,
    pub layer_blocks: &'a [usize],
}
