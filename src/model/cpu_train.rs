//! The training op set on the CPU: the backend's ops (Arc-shared tensors, so the tape's records
//! hold values without copies) and their backward.

use rayon::prelude::*;

use crate::backend::cpu::{
    attention, elementwise, layernorm, matmul, patch_embed, reduce, vecmath,
};
use crate::backend::{self, Activation, Pool};
use crate::error::{Error, Result};
use crate::model::layers::{Linear, Norm, Param, RelBias};
use crate::model::relpos;
use crate::model::train_exec::{AttnDims, TableRef, TrainExec};
use crate::tensor::Tensor;

#[derive(Default)]
pub struct CpuTrain;

impl TrainExec for CpuTrain {
    type Buf = Tensor;
    type Grad = Vec<f32>;
    /// The softmax probabilities [B, H, N, N].
    type AttnSaved = Vec<f32>;
    /// Nothing: the backward recomputes each row's mean and 1/std from x (one cheap pass).
    type NormSaved = ();

    fn shape(v: &Tensor) -> &[usize] {
        v.shape()
    }

    fn input(&mut self, images: &Tensor) -> Result<Tensor> {
        Ok(images.clone())
    }

    fn patch_embed(&mut self, x: &Tensor, w: &Param, b: &Param) -> Result<(Tensor, Tensor)> {
        let [bb, c, hgt, wid] = x.shape()[..] else {
            return Err(Error::Data(format!(
                "patch_embed: images of shape {:?}",
                x.shape()
            )));
        };
        let [d, _, p, _] = w.value.shape()[..] else {
            return Err(Error::Data(format!(
                "{}: weight of shape {:?}",
                w.name,
                w.value.shape()
            )));
        };
        let cols = Tensor::from_vec(
            &[bb * (hgt / p) * (wid / p), c * p * p],
            patch_embed::im2col(x.as_slice(), bb, c, hgt, wid, p),
        )?;
        let w2 = w.value.clone().reshape(&[d, c * p * p])?;
        let y = backend::linear(&cols, &w2, Some(&b.value), Activation::None)?;
        Ok((y, cols))
    }

    fn assemble_tokens(
        &mut self,
        patches: &Tensor,
        cls: &Param,
        pos: Option<&Param>,
        b: usize,
    ) -> Result<Tensor> {
        backend::assemble_tokens(patches, &cls.value, pos.map(|p| &p.value), b)
    }

    fn layernorm(&mut self, x: &Tensor, norm: &Norm, eps: f32) -> Result<(Tensor, ())> {
        Ok((
            backend::layernorm(x, &norm.w.value, &norm.b.value, eps)?,
            (),
        ))
    }

    fn linear(
        &mut self,
        x: &Tensor,
        l: &Linear,
        act: Activation,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match act {
            Activation::None => Ok((backend::linear(x, &l.w.value, l.bias.tensor(), act)?, None)),
            Activation::Gelu => {
                let pre = backend::linear(x, &l.w.value, l.bias.tensor(), Activation::None)?;
                let y = {
                    let _t = crate::profile::scope("gelu");
                    // SAFETY: the chunks cover all of pre's values and gelu_into writes each.
                    unsafe {
                        vecmath::vec_written_by(pre.numel(), |y| {
                            y.par_chunks_mut(1 << 14)
                                .zip(pre.as_slice().par_chunks(1 << 14))
                                .for_each(|(o, i)| vecmath::gelu_into(i, o))
                        })
                    }
                };
                Ok((Tensor::from_vec(pre.shape(), y)?, Some(pre)))
            }
        }
    }

    fn attention(
        &mut self,
        qkv: &Tensor,
        bias: Option<&RelBias>,
        d: AttnDims,
    ) -> Result<(Tensor, Vec<f32>)> {
        backend::attention_keep_probs(qkv, bias.map(|r| &r.dense), d.b, d.n, d.h)
    }

    fn scale_rows(&mut self, y: &Tensor, keep: &[f32], n: usize) -> Result<Tensor> {
        let mut y = y.clone();
        let d = *y.shape().last().unwrap_or(&1);
        for (r, row) in y.as_mut_slice().chunks_exact_mut(d).enumerate() {
            let s = keep[r / n];
            row.iter_mut().for_each(|v| *v *= s);
        }
        Ok(y)
    }

    fn residual(&mut self, x: &Tensor, y: &Tensor, gamma: Option<&Param>) -> Result<Tensor> {
        backend::residual_new(x, y, gamma.map(|g| &g.value))
    }

    fn pool(&mut self, x: &Tensor, b: usize, how: Pool) -> Result<Tensor> {
        backend::pool(x, b, how)
    }

    fn mask_rows(&mut self, x: &Tensor, mask: &[bool], token: &Param) -> Result<Tensor> {
        backend::mask_rows(x, mask, &token.value)
    }

    fn gather_rows(&mut self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        backend::gather_rows(x, rows)
    }

    fn to_host(&mut self, v: &Tensor) -> Result<Tensor> {
        Ok(v.clone())
    }

    fn cross_entropy(
        &mut self,
        logits: &Tensor,
        labels: &[usize],
        smoothing: f32,
    ) -> Result<(f32, Vec<f32>)> {
        let (b, c) = loss_rows("cross_entropy logits", logits, labels.len())?;
        if let Some(&bad) = labels.iter().find(|&&y| y >= c) {
            return Err(Error::Data(format!(
                "cross_entropy: label {bad} out of range for {c} classes"
            )));
        }
        debug_assert_eq!(b, labels.len());
        Ok(crate::train::loss::cross_entropy(
            logits.as_slice(),
            labels,
            c,
            smoothing,
        ))
    }

    fn group_softmax(
        &mut self,
        logits: &Tensor,
        groups: &[usize],
        labels: &[usize],
    ) -> Result<(f32, Vec<f32>)> {
        let per_group = crate::train::loss::group_targets(labels, groups)?;
        let width: usize = groups.iter().map(|s| s + 1).sum();
        let (_, c) = loss_rows("group_softmax logits", logits, labels.len())?;
        if c != width {
            return Err(Error::Data(format!(
                "group_softmax: {c} logits per image for groups {groups:?} ({width} outputs)"
            )));
        }
        Ok(crate::train::loss::group_softmax(
            logits.as_slice(),
            groups,
            &per_group,
        ))
    }

    fn mse(&mut self, pred: &Tensor, target: &[f32]) -> Result<(f32, Vec<f32>)> {
        if pred.numel() != target.len() {
            return Err(Error::Data(format!(
                "mse: {} predictions against {} targets",
                pred.numel(),
                target.len()
            )));
        }
        Ok(crate::train::mim::mse(pred.as_slice(), target))
    }

    fn relu(&mut self, x: &Tensor) -> Result<Tensor> {
        Tensor::from_vec(x.shape(), x.as_slice().iter().map(|v| v.max(0.0)).collect())
    }

    fn relu_backward(&mut self, y: &Tensor, mut dy: Vec<f32>) -> Result<Vec<f32>> {
        dy.iter_mut().zip(y.as_slice()).for_each(|(g, &h)| {
            if h <= 0.0 {
                *g = 0.0
            }
        });
        Ok(dy)
    }

    fn alpa_terms(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, m: usize) -> Result<Vec<f32>> {
        let d = alpa_dims(q, k, v, m)?;
        Ok(crate::train::alpa::alpa_terms(
            q.as_slice(),
            k.as_slice(),
            v.as_slice(),
            m,
            d,
        ))
    }

    fn alpa_terms_backward(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        m: usize,
        g: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let d = alpa_dims(q, k, v, m)?;
        if g.len() != m * m {
            return Err(Error::Data(format!(
                "alpa_terms_backward: {} gradients for {m}×{m} terms",
                g.len()
            )));
        }
        Ok(crate::train::alpa::alpa_terms_backward(
            q.as_slice(),
            k.as_slice(),
            v.as_slice(),
            m,
            d,
            g,
        ))
    }

    fn grad_len(g: &Vec<f32>) -> usize {
        g.len()
    }

    fn grad_from_host(&mut self, g: &[f32]) -> Result<Vec<f32>> {
        Ok(g.to_vec())
    }

    fn grad_to_host(&mut self, g: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(g.clone())
    }

    fn add_grad(&mut self, acc: &mut Vec<f32>, g: &Vec<f32>) -> Result<()> {
        elementwise::add_assign_parallel(acc, g);
        Ok(())
    }

    fn grad_range(&mut self, g: &Vec<f32>, start: usize, end: usize) -> Result<Vec<f32>> {
        Ok(g[start..end].to_vec())
    }

    fn patch_embed_backward(
        &mut self,
        cols: &Tensor,
        w: &Param,
        [bb, c, hgt, wid]: [usize; 4],
        dy: Vec<f32>,
        want_input: bool,
    ) -> Result<(Vec<f32>, Vec<f32>, Option<Vec<f32>>)> {
        let (m, k) = (cols.shape()[0], cols.shape()[1]);
        let n = w.value.shape()[0];
        let (dcols, dw, db) =
            matmul::linear_backward(cols.as_slice(), w.value.as_slice(), &dy, m, k, n);
        let dimg = want_input.then(|| {
            let p = ((k / c) as f64).sqrt().round() as usize;
            patch_embed::col2im(&dcols, bb, c, hgt, wid, p)
        });
        Ok((dw, db, dimg))
    }

    fn assemble_backward(
        &mut self,
        dy: Vec<f32>,
        b: usize,
        d: usize,
        has_pos: bool,
    ) -> Result<(Vec<f32>, Vec<f32>, Option<Vec<f32>>)> {
        let n = dy.len() / (b * d);
        let mut dcls = vec![0.0f32; d];
        let mut dpos = vec![0.0f32; n * d];
        let mut dpatch = Vec::with_capacity(b * (n - 1) * d);
        for img in dy.chunks_exact(n * d) {
            dcls.iter_mut().zip(&img[..d]).for_each(|(a, g)| *a += g);
            dpos.iter_mut().zip(img).for_each(|(a, g)| *a += g);
            dpatch.extend_from_slice(&img[d..]);
        }
        Ok((dpatch, dcls, has_pos.then_some(dpos)))
    }

    fn layernorm_backward(
        &mut self,
        x: &Tensor,
        _: &(),
        norm: &Norm,
        eps: f32,
        dy: Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        Ok(layernorm::backward(
            x.as_slice(),
            norm.w.value.as_slice(),
            eps,
            &dy,
        ))
    }

    fn linear_backward(
        &mut self,
        x: &Tensor,
        l: &Linear,
        pre_gelu: Option<&Tensor>,
        mut dy: Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>, Option<Vec<f32>>)> {
        if let Some(pre) = pre_gelu {
            dy.par_chunks_mut(1 << 14)
                .zip(pre.as_slice().par_chunks(1 << 14))
                .for_each(|(g, x)| vecmath::gelu_backward_inplace(x, g));
        }
        let (m, k) = (x.shape()[0], x.shape()[1]);
        let n = l.w.value.shape()[0];
        let (dx, dw, db) =
            matmul::linear_backward(x.as_slice(), l.w.value.as_slice(), &dy, m, k, n);
        Ok((dx, dw, l.bias.tensor().map(|_| db)))
    }

    fn attention_backward(
        &mut self,
        qkv: &Tensor,
        probs: Vec<f32>,
        table: Option<TableRef<'_>>,
        d: AttnDims,
        dy: Vec<f32>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let ad = attention::Dims {
            b: d.b,
            n: d.n,
            h: d.h,
            dh: d.dh,
        };
        let (dqkv, dbias) = attention::backward(qkv.as_slice(), &probs, table.is_some(), &ad, &dy);
        let dtable = match (table, dbias) {
            (Some(t), Some(db)) => {
                let rows = t.table.value.shape()[0];
                Some(relpos::scatter_bias_grad(&db, d.h, t.index, rows))
            }
            _ => None,
        };
        Ok((dqkv, dtable))
    }

    fn residual_backward(
        &mut self,
        yv: &Tensor,
        gamma: Option<&Param>,
        row_scale: Option<(&[f32], usize)>,
        dy: &Vec<f32>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let d = *yv.shape().last().unwrap_or(&1);
        let (mut dbranch, dgamma) = elementwise::residual_scaled_backward(
            yv.as_slice(),
            gamma.map(|g| g.value.as_slice()),
            dy,
            d,
        );
        if let Some((keep, n)) = row_scale {
            for (r, row) in dbranch.chunks_exact_mut(d).enumerate() {
                let s = keep[r / n];
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        Ok((dbranch, dgamma))
    }

    fn pool_backward(&mut self, dy: Vec<f32>, b: usize, n: usize, how: Pool) -> Result<Vec<f32>> {
        let d = dy.len() / b;
        Ok(match how {
            Pool::MeanPatches => reduce::mean_tokens_backward(&dy, b, n, d, 1),
            Pool::ClassToken => {
                let mut dx = vec![0.0f32; b * n * d];
                for img in 0..b {
                    dx[img * n * d..img * n * d + d].copy_from_slice(&dy[img * d..(img + 1) * d]);
                }
                dx
            }
        })
    }

    fn mask_rows_backward(
        &mut self,
        dy: Vec<f32>,
        mask: &[bool],
        d: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(elementwise::mask_rows_backward(&dy, mask, d))
    }

    fn gather_rows_backward(&mut self, dy: Vec<f32>, rows: &[usize], m: usize) -> Result<Vec<f32>> {
        let d = dy.len() / rows.len().max(1);
        Ok(elementwise::gather_rows_backward(&dy, rows, m, d))
    }
}

/// (rows, columns) of a loss's input [B, C] whose B must be `rows`.
fn loss_rows(what: &str, x: &Tensor, rows: usize) -> Result<(usize, usize)> {
    match x.shape() {
        &[b, c] if b == rows && b > 0 && c > 0 => Ok((b, c)),
        s => Err(Error::Data(format!(
            "{what}: shape {s:?} for {rows} labels (expected [{rows}, classes])"
        ))),
    }
}

/// The projection width d of ALPA's q, k, v, which must be one shape [M·T, d].
fn alpa_dims(q: &Tensor, k: &Tensor, v: &Tensor, m: usize) -> Result<usize> {
    match q.shape() {
        [rows, d] if m > 0 && rows % m == 0 && k.shape() == q.shape() && v.shape() == q.shape() => {
            Ok(*d)
        }
        s => Err(Error::Data(format!(
            "alpa_terms: q {s:?}, k {:?}, v {:?} for {m} views",
            k.shape(),
            v.shape()
        ))),
    }
}
