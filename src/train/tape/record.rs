//! The forward half of the tape: each op runs on the training executor and pushes the record its
//! backward (in mod.rs) needs.

use super::{Record, Tape, Var};
use crate::backend::{Activation, Pool};
use crate::error::{Error, Result};
use crate::model::exec::Exec;
use crate::model::layers::{Linear, Norm, Param, RelBias};
use crate::model::train_exec::{AttnDims, TrainExec};
use crate::tensor::Tensor;

impl<E: TrainExec> Exec for Tape<E> {
    type V = Var;

    fn input(&mut self, images: &Tensor) -> Result<Var> {
        self.batch = images.shape()[0];
        let v = self.exec.input(images)?;
        Ok(self.push(v))
    }

    fn patch_embed(&mut self, images: &Var, w: &Param, b: &Param) -> Result<Var> {
        let x = self.get(*images).clone();
        let dims: [usize; 4] = E::shape(&x)
            .try_into()
            .map_err(|_| Error::Data(format!("patch_embed: images of shape {:?}", E::shape(&x))))?;
        let (y, cols) = self.exec.patch_embed(&x, w, b)?;
        let out = self.push(y);
        self.records.push(Record::PatchEmbed {
            cols,
            w: w.clone(),
            b: b.clone(),
            dims,
            img: *images,
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
        let p = self.get(patches).clone();
        let y = self.exec.assemble_tokens(&p, cls, pos, b)?;
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
        let (y, saved) = self.exec.layernorm(&xv, norm, eps)?;
        let out = self.push(y);
        self.records.push(Record::LayerNorm {
            x: *x,
            xv,
            saved,
            norm: norm.clone(),
            eps,
            out,
        });
        Ok(out)
    }

    fn linear(&mut self, x: &Var, l: &Linear, act: Activation) -> Result<Var> {
        let xv = self.get(*x).clone();
        let (y, pre_gelu) = self.exec.linear(&xv, l, act)?;
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
        let width = E::shape(&qkvv).get(1).copied().unwrap_or(0);
        if heads == 0 || width % (3 * heads) != 0 {
            return Err(Error::Data(format!(
                "attention: qkv width {width} does not split into 3 x {heads} heads"
            )));
        }
        let dims = AttnDims {
            b,
            n,
            h: heads,
            dh: width / 3 / heads,
        };
        let (y, saved) = self.exec.attention(&qkvv, bias, dims)?;
        let table = bias.map(|r| (r.table.clone(), r.index.clone()));
        let out = self.push(y);
        self.records.push(Record::Attention {
            qkv,
            qkvv,
            saved,
            table,
            dims,
            out,
        });
        Ok(out)
    }

    fn residual(&mut self, x: Var, y: Var, gamma: Option<&Param>, block: usize) -> Result<Var> {
        // Drop-path: each image's branch is kept with probability 1 − p and then scaled by 1/(1 − p)
        // (timm's DropPath); the scaled branch is what backward sees, so dγ and dy follow.
        let rate = self.drop_path.get(block).copied().unwrap_or(0.0);
        let mut yv = self.get(y).clone();
        let mut row_scale = None;
        if rate > 0.0 {
            let rows = E::shape(&yv)[0];
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
            yv = self.exec.scale_rows(&yv, &keep, n)?;
            row_scale = Some((keep, n));
        }
        let xv = self.get(x).clone();
        let sum = self.exec.residual(&xv, &yv, gamma)?;
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
        let xv = self.get(x).clone();
        let n = E::shape(&xv)[0] / b.max(1);
        let y = self.exec.pool(&xv, b, how)?;
        let out = self.push(y);
        self.records.push(Record::Pool { x, b, n, how, out });
        Ok(out)
    }

    fn mask_rows(&mut self, x: Var, mask: &[bool], token: &Param) -> Result<Var> {
        let xv = self.get(x).clone();
        let y = self.exec.mask_rows(&xv, mask, token)?;
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
        let xv = self.get(x).clone();
        let m = E::shape(&xv)[0];
        let y = self.exec.gather_rows(&xv, rows)?;
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
        let b = self.get(*v).clone();
        self.exec.to_host(&b)
    }
}
