//! Reverse-mode autodiff for the model's op set: `Tape` is an `Exec` that runs each op on the
//! backend and records what its backward needs (Arc-shared tensors, no copies). `backward` walks the
//! records in reverse, accumulating parameter gradients by the checkpoint's names; each record, and
//! the activations only it held, is dropped as soon as its backward has run. The recording half (the
//! `Exec` impl) is in record.rs, the backward here.

use std::collections::HashMap;

use crate::backend::cpu::{
    attention, elementwise, layernorm, matmul, patch_embed, reduce, vecmath,
};
use crate::backend::Pool;
use crate::error::{Error, Result};
use crate::model::init::Rng;
use crate::model::layers::{Linear, LinearBias, Norm, Param};
use crate::model::relpos;
use crate::tensor::Tensor;

mod record;

/// An activation on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

enum Record {
    PatchEmbed {
        img: Var,
        cols: Tensor,
        w: Param,
        b: Param,
        dims: [usize; 4],
        out: Var,
    },
    Assemble {
        patches: Var,
        cls: Param,
        pos: Option<Param>,
        b: usize,
        out: Var,
    },
    LayerNorm {
        x: Var,
        xv: Tensor,
        norm: Norm,
        eps: f32,
        out: Var,
    },
    Linear {
        x: Var,
        xv: Tensor,
        l: Linear,
        pre_gelu: Option<Tensor>,
        out: Var,
    },
    Attention {
        qkv: Var,
        qkvv: Tensor,
        /// The softmax probabilities [B, H, N, N] of the forward.
        probs: Vec<f32>,
        /// The relative-position table and its index into the dense [H, N, N] bias.
        table: Option<(Param, Vec<usize>)>,
        dims: [usize; 4],
        out: Var,
    },
    Residual {
        x: Var,
        y: Var,
        /// The branch as added (after drop-path scaling).
        yv: Tensor,
        gamma: Option<Param>,
        /// Drop-path factors per image and tokens per image, when drop-path was applied.
        row_scale: Option<(Vec<f32>, usize)>,
        out: Var,
    },
    Pool {
        x: Var,
        b: usize,
        n: usize,
        how: Pool,
        out: Var,
    },
    MaskRows {
        x: Var,
        mask: Vec<bool>,
        token: Param,
        out: Var,
    },
    GatherRows {
        x: Var,
        rows: Vec<usize>,
        m: usize,
        out: Var,
    },
}

pub struct Tape {
    values: Vec<Option<Tensor>>,
    records: Vec<Record>,
    /// Also compute the gradient with respect to the input images (ODIN, input saliency).
    pub want_input_grad: bool,
    /// Drop-path rate of each block (empty: none), as timm's linspace(0, rate, depth).
    pub drop_path: Vec<f32>,
    batch: usize,
    rng: Rng,
}

impl Default for Tape {
    fn default() -> Tape {
        Tape {
            values: Vec::new(),
            records: Vec::new(),
            want_input_grad: false,
            drop_path: Vec::new(),
            batch: 1,
            rng: Rng::new(0),
        }
    }
}

/// Gradients by parameter name (values laid out as the parameter's tensor), plus the images'.
impl Record {
    fn profile_name(&self) -> &'static str {
        match self {
            Record::PatchEmbed { .. } => "patch_embed_bwd",
            Record::Assemble { .. } => "tokens_bwd",
            Record::LayerNorm { .. } => "layernorm_bwd",
            Record::Linear { .. } => "linear_bwd",
            Record::Attention { .. } => "attention_bwd",
            Record::Residual { .. } => "residual_bwd",
            Record::Pool { .. } => "pool_bwd",
            Record::MaskRows { .. } => "mask_bwd",
            Record::GatherRows { .. } => "gather_bwd",
        }
    }
}

#[derive(Default)]
pub struct Grads {
    pub params: HashMap<String, Vec<f32>>,
    pub input: Option<Vec<f32>>,
}

/// Adds `g` to the gradient of `name`, taking ownership of it when it is the first.
fn add_into(map: &mut HashMap<String, Vec<f32>>, name: &str, g: Vec<f32>) {
    match map.get_mut(name) {
        Some(acc) => elementwise::add_assign_parallel(acc, &g),
        None => {
            map.insert(name.to_string(), g);
        }
    }
}

impl Tape {
    pub fn new() -> Tape {
        Tape::default()
    }

    /// A tape that applies drop-path with rates linspace(0, `rate`, depth), seeded by `seed`.
    pub fn with_drop_path(rate: f32, depth: usize, seed: u64) -> Tape {
        let drop_path = (0..depth)
            .map(|i| {
                if depth > 1 {
                    rate * i as f32 / (depth - 1) as f32
                } else {
                    0.0
                }
            })
            .collect();
        Tape {
            drop_path,
            rng: Rng::new(seed),
            ..Tape::default()
        }
    }

    fn push(&mut self, t: Tensor) -> Var {
        self.values.push(Some(t));
        Var(self.values.len() - 1)
    }

    /// A recorded activation's value (on the host: this tape runs on the CPU).
    pub fn value(&self, v: &Var) -> &Tensor {
        self.get(*v)
    }

    fn get(&self, v: Var) -> &Tensor {
        self.values[v.0]
            .as_ref()
            .expect("tape value read after backward freed it")
    }

    /// Runs backward from `out` with upstream gradient `dout` (same layout as `out`'s value).
    pub fn backward(self, out: Var, dout: Vec<f32>) -> Result<Grads> {
        self.backward_many(vec![(out, dout)])
    }

    /// Backward from several outputs at once (a loss over logits plus one over patch tokens):
    /// each seed's gradient enters at its output and they add up where the graph joins.
    pub fn backward_many(mut self, seeds: Vec<(Var, Vec<f32>)>) -> Result<Grads> {
        let mut vg: Vec<Option<Vec<f32>>> = vec![None; self.values.len()];
        for (out, dout) in seeds {
            if dout.len() != self.get(out).numel() {
                return Err(Error::Data(format!(
                    "backward: gradient has {} values, output has {}",
                    dout.len(),
                    self.get(out).numel()
                )));
            }
            match &mut vg[out.0] {
                Some(a) => a.iter_mut().zip(&dout).for_each(|(x, y)| *x += y),
                slot @ None => *slot = Some(dout),
            }
        }
        // Forward values are no longer needed: records hold what backward reads.
        self.values.clear();
        let mut grads = Grads::default();
        let acc = |vg: &mut Vec<Option<Vec<f32>>>, v: Var, g: Vec<f32>| match &mut vg[v.0] {
            Some(a) => elementwise::add_assign_parallel(a, &g),
            slot @ None => *slot = Some(g),
        };
        while let Some(rec) = self.records.pop() {
            let _t = crate::profile::scope(rec.profile_name());
            match rec {
                Record::Pool { x, b, n, how, out } => {
                    let Some(dy) = vg[out.0].take() else { continue };
                    let d = dy.len() / b;
                    let dx = match how {
                        Pool::MeanPatches => reduce::mean_tokens_backward(&dy, b, n, d, 1),
                        Pool::ClassToken => {
                            let mut dx = vec![0.0f32; b * n * d];
                            for img in 0..b {
                                dx[img * n * d..img * n * d + d]
                                    .copy_from_slice(&dy[img * d..(img + 1) * d]);
                            }
                            dx
                        }
                    };
                    acc(&mut vg, x, dx);
                }
                Record::MaskRows {
                    x,
                    mask,
                    token,
                    out,
                } => {
                    let Some(dy) = vg[out.0].take() else { continue };
                    let (dx, dt) = elementwise::mask_rows_backward(&dy, &mask, token.value.numel());
                    add_into(&mut grads.params, &token.name, dt);
                    acc(&mut vg, x, dx);
                }
                Record::GatherRows { x, rows, m, out } => {
                    let Some(dy) = vg[out.0].take() else { continue };
                    let d = dy.len() / rows.len().max(1);
                    acc(
                        &mut vg,
                        x,
                        elementwise::gather_rows_backward(&dy, &rows, m, d),
                    );
                }
                Record::Residual {
                    x,
                    y,
                    yv,
                    gamma,
                    row_scale,
                    out,
                } => {
                    let Some(dy) = vg[out.0].take() else { continue };
                    let d = *yv.shape().last().unwrap_or(&1);
                    let (dbranch, dgamma) = elementwise::residual_scaled_backward(
                        yv.as_slice(),
                        gamma.as_ref().map(|g| g.value.as_slice()),
                        &dy,
                        d,
                    );
                    if let (Some(g), Some(dg)) = (&gamma, dgamma) {
                        add_into(&mut grads.params, &g.name, dg);
                    }
                    let mut dbranch = dbranch;
                    if let Some((keep, n)) = &row_scale {
                        for (r, row) in dbranch.chunks_exact_mut(d).enumerate() {
                            let s = keep[r / n];
                            row.iter_mut().for_each(|v| *v *= s);
                        }
                    }
                    acc(&mut vg, y, dbranch);
                    acc(&mut vg, x, dy);
                }
                Record::Linear {
                    x,
                    xv,
                    l,
                    pre_gelu,
                    out,
                } => {
                    let Some(mut dy) = vg[out.0].take() else {
                        continue;
                    };
                    if let Some(pre) = pre_gelu {
                        use rayon::prelude::*;
                        dy.par_chunks_mut(1 << 14)
                            .zip(pre.as_slice().par_chunks(1 << 14))
                            .for_each(|(g, x)| vecmath::gelu_backward_inplace(x, g));
                    }
                    let (m, k) = (xv.shape()[0], xv.shape()[1]);
                    let n = l.w.value.shape()[0];
                    let (dx, dw, db) =
                        matmul::linear_backward(xv.as_slice(), l.w.value.as_slice(), &dy, m, k, n);
                    add_into(&mut grads.params, &l.w.name, dw);
                    match &l.bias {
                        LinearBias::None => {}
                        LinearBias::Full(p) => add_into(&mut grads.params, &p.name, db),
                        LinearBias::QV { q, v, .. } => {
                            let d = n / 3;
                            add_into(&mut grads.params, &q.name, db[..d].to_vec());
                            add_into(&mut grads.params, &v.name, db[2 * d..].to_vec());
                        }
                    }
                    acc(&mut vg, x, dx);
                }
                Record::Attention {
                    qkv,
                    qkvv,
                    probs,
                    table,
                    dims,
                    out,
                } => {
                    let Some(dy) = vg[out.0].take() else { continue };
                    let [b, n, h, dh] = dims;
                    let ad = attention::Dims { b, n, h, dh };
                    let (dqkv, dbias) =
                        attention::backward(qkvv.as_slice(), &probs, table.is_some(), &ad, &dy);
                    if let (Some((param, index)), Some(db)) = (&table, dbias) {
                        let rows = param.value.shape()[0];
                        let dt = relpos::scatter_bias_grad(&db, h, index, rows);
                        add_into(&mut grads.params, &param.name, dt);
                    }
                    acc(&mut vg, qkv, dqkv);
                }
                Record::LayerNorm {
                    x,
                    xv,
                    norm,
                    eps,
                    out,
                } => {
                    let Some(dy) = vg[out.0].take() else { continue };
                    let (dx, dg, db) =
                        layernorm::backward(xv.as_slice(), norm.w.value.as_slice(), eps, &dy);
                    add_into(&mut grads.params, &norm.w.name, dg);
                    add_into(&mut grads.params, &norm.b.name, db);
                    acc(&mut vg, x, dx);
                }
                Record::Assemble {
                    patches,
                    cls,
                    pos,
                    b,
                    out,
                } => {
                    let Some(dy) = vg[out.0].take() else { continue };
                    let d = cls.value.numel();
                    let n = dy.len() / (b * d);
                    let mut dcls = vec![0.0f32; d];
                    let mut dpos = vec![0.0f32; n * d];
                    let mut dpatch = Vec::with_capacity(b * (n - 1) * d);
                    for img in dy.chunks_exact(n * d) {
                        dcls.iter_mut().zip(&img[..d]).for_each(|(a, g)| *a += g);
                        dpos.iter_mut().zip(img).for_each(|(a, g)| *a += g);
                        dpatch.extend_from_slice(&img[d..]);
                    }
                    add_into(&mut grads.params, &cls.name, dcls);
                    if let Some(p) = &pos {
                        add_into(&mut grads.params, &p.name, dpos);
                    }
                    acc(&mut vg, patches, dpatch);
                }
                Record::PatchEmbed {
                    img,
                    cols,
                    w,
                    b,
                    dims,
                    out,
                } => {
                    let Some(dy) = vg[out.0].take() else { continue };
                    let [bb, c, hgt, wid] = dims;
                    let (m, k) = (cols.shape()[0], cols.shape()[1]);
                    let n = w.value.shape()[0];
                    let (dcols, dw, db) =
                        matmul::linear_backward(cols.as_slice(), w.value.as_slice(), &dy, m, k, n);
                    add_into(&mut grads.params, &w.name, dw);
                    add_into(&mut grads.params, &b.name, db);
                    if self.want_input_grad {
                        // The weight was recorded as [D, C·P·P].
                        let p = ((k / c) as f64).sqrt().round() as usize;
                        acc(
                            &mut vg,
                            img,
                            patch_embed::col2im(&dcols, bb, c, hgt, wid, p),
                        );
                    }
                }
            }
        }
        if self.want_input_grad {
            grads.input = vg.first_mut().and_then(|g| g.take());
        }
        Ok(grads)
    }
}
