//! The forward half of the tape: each op runs on the backend and pushes the record its backward
//! (in mod.rs) needs.

use super::{Record, Tape, Var};
use crate::backend::cpu::{patch_embed, vecmath};
use crate::backend::{self, Activation, Pool};
use crate::error::{Error, Result};
use crate::model::exec::Exec;
use crate::model::layers::{Linear, Norm, Param, RelBias};
use crate::tensor::Tensor;

impl Exec for Tape {
    type V = Var;

    fn input(&mut self, images: &Tensor) -> Result<Var> {
        self.batch = images.shape()[0];
        Ok(self.push(images.clone()))
    }

    fn patch_embed(&mut self, images: &Var, w: &Param, b: &Param) -> Result<Var> {
        let x = self.get(*images).clone();
        let [bb, c, hgt, wid] = x.shape()[..] else {
            return Err(Error::Data(format!(
                "patch_embed: images of shape {:?}",
                x.shape()
            )));
        };
        let [d, _, p, _] = w.value.shape()[..] else {
            return Err(Error::Data(format!(
                "patch_embed: weight of shape {:?}",
                w.value.shape()
            )));
        };
        let cols = Tensor::from_vec(
            &[bb * (hgt / p) * (wid / p), c * p * p],
            patch_embed::im2col(x.as_slice(), bb, c, hgt, wid, p),
        )?;
        let w2 = Param {
            name: w.name.clone(),
            value: w.value.clone().reshape(&[d, c * p * p])?,
        };
        let y = backend::linear(&cols, &w2.value, Some(&b.value), Activation::None)?;
        let out = self.push(y);
        self.records.push(Record::PatchEmbed {
            img: *images,
            cols,
            w: w2,
            b: b.clone(),
            dims: [bb, c, hgt, wid],
            out,
        });
        Ok(out)
    }

    fn assemble_tokens(
        &mut self,
        patches: Var,
        cls: &Param,
        pos: Option<&Param>,
        b: usize,
    ) -> Result<Var> {
        let y = backend::assemble_tokens(self.get(patches), &cls.value, pos.map(|p| &p.value), b)?;
        let out = self.push(y);
        self.records.push(Record::Assemble {
            patches,
            cls: cls.clone(),
            pos: pos.cloned(),
            b,
            out,
        });
        Ok(out)
    }

    fn layernorm(&mut self, x: &Var, norm: &Norm, eps: f32) -> Result<Var> {
        let xv = self.get(*x).clone();
        let y = backend::layernorm(&xv, &norm.w.value, &norm.b.value, eps)?;
        let out = self.push(y);
        self.records.push(Record::LayerNorm {
            x: *x,
            xv,
            norm: norm.clone(),
            eps,
            out,
        });
        Ok(out)
    }

    fn linear(&mut self, x: &Var, l: &Linear, act: Activation) -> Result<Var> {
        let xv = self.get(*x).clone();
        let (y, pre_gelu) = match act {
            Activation::None => (
                backend::linear(&xv, &l.w.value, l.bias.tensor(), act)?,
                None,
            ),
            Activation::Gelu => {
                let pre = backend::linear(&xv, &l.w.value, l.bias.tensor(), Activation::None)?;
                let y = {
                    use rayon::prelude::*;
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
                (Tensor::from_vec(pre.shape(), y)?, Some(pre))
            }
        };
        let out = self.push(y);
        self.records.push(Record::Linear {
            x: *x,
            xv,
            l: l.clone(),
            pre_gelu,
            out,
        });
        Ok(out)
    }

    fn attention(
        &mut self,
        qkv: Var,
        bias: Option<&RelBias>,
        b: usize,
        n: usize,
        heads: usize,
    ) -> Result<Var> {
        let qkvv = self.get(qkv).clone();
        let (y, probs) = backend::attention_keep_probs(&qkvv, bias.map(|r| &r.dense), b, n, heads)?;
        let dh = qkvv.shape()[1] / 3 / heads;
        let table = bias.map(|r| (r.table.clone(), r.index.clone()));
        let out = self.push(y);
        self.records.push(Record::Attention {
            qkv,
            qkvv,
            probs,
            table,
            dims: [b, n, heads, dh],
            out,
        });
        Ok(out)
    }

    fn residual(&mut self, x: Var, y: Var, gamma: Option<&Param>, block: usize) -> Result<Var> {
        let mut yv = self.get(y).clone();
        // Drop-path: each image's branch is kept with probability 1 − p and then scaled by 1/(1 − p)
        // (timm's DropPath); the scaled branch is what backward sees, so dγ and dy follow.
        let rate = self.drop_path.get(block).copied().unwrap_or(0.0);
        let mut row_scale = None;
        if rate > 0.0 {
            let rows = yv.shape()[0];
            let b = self.batch.max(1);
            let n = rows / b;
            let keep: Vec<f32> = (0..b)
                .map(|_| {
                    if self.rng.uniform() < rate as f64 {
                        0.0
                    } else {
                        1.0 / (1.0 - rate)
                    }
                })
                .collect();
            let d = yv.shape()[1];
            for (r, row) in yv.as_mut_slice().chunks_exact_mut(d).enumerate() {
                let s = keep[r / n];
                row.iter_mut().for_each(|v| *v *= s);
            }
            row_scale = Some((keep, n));
        }
        // x stays shared with the records that read it: the sum goes into a new tensor.
        let sum = backend::residual_new(self.get(x), &yv, gamma.map(|g| &g.value))?;
        let out = self.push(sum);
        self.records.push(Record::Residual {
            x,
            y,
            yv,
            gamma: gamma.cloned(),
            row_scale,
            out,
        });
        Ok(out)
    }

    fn pool(&mut self, x: Var, b: usize, how: Pool) -> Result<Var> {
        let xv = self.get(x);
        let n = xv.shape()[0] / b;
        let y = backend::pool(xv, b, how)?;
        let out = self.push(y);
        self.records.push(Record::Pool { x, b, n, how, out });
        Ok(out)
    }

    fn mask_rows(&mut self, x: Var, mask: &[bool], token: &Param) -> Result<Var> {
        let y = backend::mask_rows(self.get(x), mask, &token.value)?;
        let out = self.push(y);
        self.records.push(Record::MaskRows {
            x,
            mask: mask.to_vec(),
            token: token.clone(),
            out,
        });
        Ok(out)
    }

    fn gather_rows(&mut self, x: &Var, rows: &[usize]) -> Result<Var> {
        let x = *x;
        let m = self.get(x).shape()[0];
        let y = backend::gather_rows(self.get(x), rows)?;
        let out = self.push(y);
        self.records.push(Record::GatherRows {
            x,
            rows: rows.to_vec(),
            m,
            out,
        });
        Ok(out)
    }

    fn to_host(&mut self, v: &Var) -> Result<Tensor> {
        Ok(self.get(*v).clone())
    }
}
