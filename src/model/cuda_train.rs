//! The training op set (`TrainExec`) on a CUDA device: the tape's records hold shared device
//! values (`Rc<DeviceValue>`), gradients are f32 device buffers, and each backward op is a
//! launcher of src/backend/cuda. Precision follows the forward (`cuda_exec`'s autocast rule);
//! gradients are f32 throughout.
//!
//! Parameters are the executor's: uploaded on first use (gradient checks), or set as f32 master
//! copies by `CudaExec::set_masters` for training, which the device optimizer then updates in
//! place; `refresh_params` drops what was derived from them (the T copies of the GEMM weights,
//! the joined qkv bias, the dense relative-position bias) so the next forward derives it again.

use std::rc::Rc;

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda as cu;
use crate::backend::cuda::attention::Dims as AttDims;
use crate::backend::cuda::device::cuda_err;
use crate::backend::{Activation, Pool};
use crate::error::{Error, Result};
use crate::model::cuda_attention::Compute;
use crate::model::cuda_exec::in_blocks;
use crate::model::cuda_exec::{CudaExec, Data, DeviceValue};
use crate::model::exec::Exec;
use crate::model::layers::{Linear, Norm, Param, RelBias};
use crate::model::train_exec::{AttnDims, GradTriple, TableRef, TrainExec};
use crate::tensor::Tensor;

mod losses;

type Buf<T> = Rc<DeviceValue<T>>;

/// What attention in training reuses from step to step instead of allocating per call: the
/// probability buffers P [B, H, N, N] that the backward hands back (each layer's P lives from its
/// forward to its backward, so a step holds one per layer), and the backward's scratch for the
/// last shape, per operand type (qkv at T from the blocks, or f32).
pub struct TrainScratch<T> {
    spare_probs: Vec<CudaSlice<f32>>,
    backward_low: Option<cu::attention::BackwardScratch<T>>,
    backward_f32: Option<cu::attention::BackwardScratch<f32>>,
}

impl<T> Default for TrainScratch<T> {
    fn default() -> TrainScratch<T> {
        TrainScratch {
            spare_probs: Vec::new(),
            backward_low: None,
            backward_f32: None,
        }
    }
}

impl<T> TrainScratch<T> {
    /// A P buffer of `len` values: a spare one if there is one of that size, else a new one
    /// (spares of another size, from an earlier shape, are dropped).
    fn probs(&mut self, dev: &cu::CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
        self.spare_probs.retain(|p| p.len() == len);
        match self.spare_probs.pop() {
            Some(p) => Ok(p),
            None => dev.empty::<f32>(len.max(1)),
        }
    }
}

/// `slot`'s backward scratch, made anew when it is missing or for other dims.
fn backward_scratch<'a, S: cu::Storage>(
    dev: &cu::CudaDevice,
    slot: &'a mut Option<cu::attention::BackwardScratch<S>>,
    dims: &AttDims,
) -> Result<&'a mut cu::attention::BackwardScratch<S>> {
    let fits = slot.as_ref().is_some_and(|w| {
        let d = w.dims();
        (d.b, d.n, d.h, d.dh) == (dims.b, dims.n, dims.h, dims.dh)
    });
    if !fits {
        *slot = None; // give the old scratch back before making the new one
        *slot = Some(cu::attention::BackwardScratch::new(dev, dims)?);
    }
    Ok(slot.as_mut().expect("made above"))
}

impl<T: Compute> CudaExec<T>
where
    CudaBlas: Gemm<T>,
{
    fn host_grad(&self, g: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.device().download(g)
    }

    fn up(&self, g: &[f32]) -> Result<CudaSlice<f32>> {
        self.device().upload(g)
    }
}

impl<T: Compute> TrainExec for CudaExec<T>
where
    CudaBlas: Gemm<T>,
{
    type Buf = Buf<T>;
    type Grad = CudaSlice<f32>;
    /// The softmax probabilities [B, H, N, N] (f32).
    type AttnSaved = CudaSlice<f32>;
    /// Each row's mean and 1/std [M] (f32), as the forward computed them.
    type NormSaved = (CudaSlice<f32>, CudaSlice<f32>);

    fn shape(v: &Buf<T>) -> &[usize] {
        v.shape()
    }

    fn input(&mut self, images: &Tensor) -> Result<Buf<T>> {
        Ok(Rc::new(Exec::input(self, images)?))
    }

    fn patch_embed(&mut self, images: &Buf<T>, w: &Param, b: &Param) -> Result<(Buf<T>, Buf<T>)> {
        let [bn, c, h, wd] = images.shape[..] else {
            return Err(Error::Data(format!(
                "patch_embed: expected [B, C, H, W], got {:?}",
                images.shape
            )));
        };
        let [d, _, p, _] = w.value.shape()[..] else {
            return Err(Error::Data(format!(
                "{}: expected [D, C, P, P], got {:?}",
                w.name,
                w.value.shape()
            )));
        };
        let dims = cu::patch_embed::Dims {
            b: bn,
            c,
            h,
            w: wd,
            p,
        };
        let (rows, k) = (bn * dims.patches(), dims.patch_len());
        let mut cols = self.new_f32(&[rows, k])?;
        cu::patch_embed::im2col::<f32>(
            self.device(),
            images.f32("patch_embed input")?,
            &mut cols,
            dims,
        )?;
        self.ensure_f32(w)?;
        self.ensure_f32(b)?;
        let mut out = self.new_f32(&[rows, d])?;
        cu::matmul::linear::<f32>(
            self.device(),
            &cols,
            self.f32_param(&w.name)?,
            Some(self.f32_param(&b.name)?),
            Activation::None,
            &mut out,
            (rows, k, d),
        )?;
        let out = Rc::new(self.value(&[rows, d], Data::F32(out)));
        let cols = Rc::new(self.value(&[rows, k], Data::F32(cols)));
        Ok((out, cols))
    }

    fn assemble_tokens(
        &mut self,
        patches: &Buf<T>,
        cls: &Param,
        pos: Option<&Param>,
        b: usize,
    ) -> Result<Buf<T>> {
        Ok(Rc::new(self.assemble_ref(patches, cls, pos, b)?))
    }

    fn layernorm(
        &mut self,
        x: &Buf<T>,
        norm: &Norm,
        eps: f32,
    ) -> Result<(Buf<T>, (CudaSlice<f32>, CudaSlice<f32>))> {
        let (m, d) = x.rows_cols("layernorm")?;
        self.ensure_f32(&norm.w)?;
        self.ensure_f32(&norm.b)?;
        let dev = self.device().clone();
        let (g, b) = (self.f32_param(&norm.w.name)?, self.f32_param(&norm.b.name)?);
        let (mut mean, mut rstd) = (dev.empty::<f32>(m)?, dev.empty::<f32>(m)?);
        let stats = Some((&mut mean, &mut rstd));
        // Output precision as the inference forward: f32 from the f32 residual stream.
        let data = match &x.data {
            Data::F32(s) => {
                let mut y = dev.empty::<f32>(m * d)?;
                cu::layernorm::forward(&dev, s, g, b, &mut y, stats, (m, d), eps)?;
                Data::F32(y)
            }
            Data::Low(s) => {
                let mut y = dev.empty::<T>(m * d)?;
                cu::layernorm::forward(&dev, s, g, b, &mut y, stats, (m, d), eps)?;
                Data::Low(y)
            }
        };
        Ok((Rc::new(self.value(&[m, d], data)), (mean, rstd)))
    }

    fn linear(
        &mut self,
        x: &Buf<T>,
        l: &Linear,
        act: Activation,
    ) -> Result<(Buf<T>, Option<Buf<T>>)> {
        match act {
            Activation::None => Ok((Rc::new(self.linear_ref(x, l, act)?), None)),
            Activation::Gelu => {
                let pre = self.linear_ref(x, l, Activation::None)?;
                let (m, n) = pre.rows_cols("linear")?;
                let data = match &pre.data {
                    Data::F32(s) => {
                        let mut y = self
                            .device()
                            .stream()
                            .clone_dtod(s)
                            .map_err(cuda_err("copy"))?;
                        cu::elementwise::bias_gelu::<f32>(self.device(), &mut y, None, (m, n))?;
                        Data::F32(y)
                    }
                    Data::Low(s) => {
                        let mut y = self
                            .device()
                            .stream()
                            .clone_dtod(s)
                            .map_err(cuda_err("copy"))?;
                        cu::elementwise::bias_gelu::<T>(self.device(), &mut y, None, (m, n))?;
                        Data::Low(y)
                    }
                };
                let y = self.value(&[m, n], data);
                Ok((Rc::new(y), Some(Rc::new(pre))))
            }
        }
    }

    fn attention(
        &mut self,
        qkv: &Buf<T>,
        bias: Option<&RelBias>,
        d: AttnDims,
    ) -> Result<(Buf<T>, CudaSlice<f32>)> {
        let (bn, d3) = qkv.rows_cols("attention input")?;
        if bn != d.b * d.n || d3 != 3 * d.h * d.dh {
            return Err(Error::Data(format!(
                "attention: qkv [{bn}, {d3}] does not fit B = {}, N = {}, H = {}",
                d.b, d.n, d.h
            )));
        }
        let dims = AttDims {
            b: d.b,
            n: d.n,
            h: d.h,
            dh: d.dh,
        };
        let bias_key = bias.map(|r| self.dense_bias(r, d.h)).transpose()?;
        // Training runs the cuBLAS path, which keeps the probabilities backward reads.
        self.ensure_workspace(&dims)?;
        let mut out = self.device().empty::<T>(bn * d.h * d.dh)?;
        let dev = self.device().clone();
        let mut probs = self.train_scratch.probs(&dev, d.b * d.h * d.n * d.n)?;
        let mut ws = self.workspace.take();
        let mut tmp = None;
        let run = (|| {
            let xin = self.as_low(qkv, &mut tmp)?;
            let bias = bias_key.as_deref().map(|k| self.f32_param(k)).transpose()?;
            let w = ws.as_mut().map(|(w, _)| w);
            T::attention_keep_probs(&dev, xin, bias, &mut out, &dims, w, &mut probs)
        })();
        self.workspace = ws;
        run?;
        let y = self.value(&[bn, d.h * d.dh], Data::Low(out));
        Ok((Rc::new(y), probs))
    }

    fn scale_rows(&mut self, y: &Buf<T>, keep: &[f32], n: usize) -> Result<Buf<T>> {
        let (m, d) = y.rows_cols("drop-path")?;
        let k = self.up(keep)?;
        let dev = self.device().clone();
        let data = match &y.data {
            Data::F32(s) => {
                let mut c = dev.stream().clone_dtod(s).map_err(cuda_err("copy"))?;
                cu::elementwise::scale_rows::<f32>(&dev, &mut c, &k, n, d)?;
                Data::F32(c)
            }
            Data::Low(s) => {
                let mut c = dev.stream().clone_dtod(s).map_err(cuda_err("copy"))?;
                cu::elementwise::scale_rows::<T>(&dev, &mut c, &k, n, d)?;
                Data::Low(c)
            }
        };
        Ok(Rc::new(self.value(&[m, d], data)))
    }

    fn residual(&mut self, x: &Buf<T>, y: &Buf<T>, gamma: Option<&Param>) -> Result<Buf<T>> {
        let copy = self
            .device()
            .stream()
            .clone_dtod(x.f32("residual stream")?)
            .map_err(cuda_err("copy the residual stream"))?;
        let mut sum = self.value(&x.shape, Data::F32(copy));
        self.residual_into(&mut sum, y, gamma)?;
        Ok(Rc::new(sum))
    }

    fn pool(&mut self, x: &Buf<T>, b: usize, how: Pool) -> Result<Buf<T>> {
        Ok(Rc::new(self.pool_ref(x, b, how)?))
    }

    fn mask_rows(&mut self, x: &Buf<T>, mask: &[bool], token: &Param) -> Result<Buf<T>> {
        Ok(Rc::new(self.mask_rows_ref(x, mask, token)?))
    }

    fn gather_rows(&mut self, x: &Buf<T>, rows: &[usize]) -> Result<Buf<T>> {
        Ok(Rc::new(self.gather_rows_ref(x, rows)?))
    }

    fn to_host(&mut self, v: &Buf<T>) -> Result<Tensor> {
        self.host_copy(v)
    }

    fn cross_entropy(
        &mut self,
        logits: &Buf<T>,
        labels: &[usize],
        smoothing: f32,
    ) -> Result<(f32, CudaSlice<f32>)> {
        self.cross_entropy_loss(logits, labels, smoothing)
    }

    fn group_softmax(
        &mut self,
        logits: &Buf<T>,
        groups: &[usize],
        labels: &[usize],
    ) -> Result<(f32, CudaSlice<f32>)> {
        self.group_softmax_loss(logits, groups, labels)
    }

    fn mse(&mut self, pred: &Buf<T>, target: &[f32]) -> Result<(f32, CudaSlice<f32>)> {
        self.mse_loss(pred, target)
    }

    fn relu(&mut self, x: &Buf<T>) -> Result<Buf<T>> {
        self.alpa_relu(x)
    }

    fn relu_backward(&mut self, y: &Buf<T>, dy: CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        self.alpa_relu_backward(y, dy)
    }

    fn alpa_terms(&mut self, q: &Buf<T>, k: &Buf<T>, v: &Buf<T>, m: usize) -> Result<Vec<f32>> {
        self.alpa_cross_terms(q, k, v, m)
    }

    fn alpa_terms_backward(
        &mut self,
        q: &Buf<T>,
        k: &Buf<T>,
        v: &Buf<T>,
        m: usize,
        g: &[f32],
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        self.alpa_cross_terms_backward(q, k, v, m, g)
    }

    fn grad_len(g: &CudaSlice<f32>) -> usize {
        g.len()
    }

    fn grad_from_host(&mut self, g: &[f32]) -> Result<CudaSlice<f32>> {
        self.up(g)
    }

    fn grad_to_host(&mut self, g: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.host_grad(g)
    }

    fn add_grad(&mut self, acc: &mut CudaSlice<f32>, g: &CudaSlice<f32>) -> Result<()> {
        cu::elementwise::add_assign(self.device(), acc, g)
    }

    fn grad_range(
        &mut self,
        g: &CudaSlice<f32>,
        start: usize,
        end: usize,
    ) -> Result<CudaSlice<f32>> {
        if start > end || end > g.len() {
            return Err(Error::Cuda(format!(
                "gradient range {start}..{end} of {} values",
                g.len()
            )));
        }
        self.device()
            .stream()
            .clone_dtod(&g.slice(start..end))
            .map_err(cuda_err("copy a gradient range"))
    }

    fn patch_embed_backward(
        &mut self,
        cols: &Buf<T>,
        w: &Param,
        [b, c, h, wd]: [usize; 4],
        dy: CudaSlice<f32>,
        want_input: bool,
    ) -> Result<GradTriple<CudaSlice<f32>>> {
        let (rows, k) = cols.rows_cols("patch_embed backward")?;
        let n = w.value.shape()[0];
        self.ensure_f32(w)?;
        let dev = self.device().clone();
        let (dcols, dw, db) = cu::matmul::linear_backward::<f32>(
            &dev,
            cols.f32("patch_embed cols")?,
            self.f32_param(&w.name)?,
            &dy,
            true,
            (rows, k, n),
        )?;
        let db = db.ok_or_else(|| Error::Cuda("patch_embed backward: no bias gradient".into()))?;
        let dimg = if want_input {
            let p = ((k / c) as f64).sqrt().round() as usize;
            let dims = cu::patch_embed::Dims { b, c, h, w: wd, p };
            Some(cu::patch_embed::col2im(&dev, &dcols, dims)?)
        } else {
            None
        };
        Ok((dw, db, dimg))
    }

    fn assemble_backward(
        &mut self,
        dy: CudaSlice<f32>,
        b: usize,
        d: usize,
        has_pos: bool,
    ) -> Result<GradTriple<CudaSlice<f32>>> {
        let n = dy.len() / (b * d).max(1);
        cu::elementwise::assemble_backward(self.device(), &dy, (b, n, d), has_pos)
    }

    fn layernorm_backward(
        &mut self,
        x: &Buf<T>,
        (mean, rstd): &(CudaSlice<f32>, CudaSlice<f32>),
        norm: &Norm,
        _eps: f32,
        dy: CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let (m, d) = x.rows_cols("layernorm backward")?;
        let xs = x.f32("layernorm input")?;
        self.ensure_f32(&norm.w)?;
        let dev = self.device().clone();
        let mut dx = dev.empty::<f32>(m * d)?;
        let g = self.f32_param(&norm.w.name)?;
        let (dgamma, dbeta) =
            cu::layernorm::backward::<f32>(&dev, xs, g, mean, rstd, &dy, &mut dx, (m, d))?;
        Ok((dx, dgamma, dbeta))
    }

    fn linear_backward(
        &mut self,
        x: &Buf<T>,
        l: &Linear,
        pre_gelu: Option<&Buf<T>>,
        mut dy: CudaSlice<f32>,
    ) -> Result<GradTriple<CudaSlice<f32>>> {
        let dev = self.device().clone();
        if let Some(pre) = pre_gelu {
            match &pre.data {
                Data::F32(p) => cu::elementwise::gelu_backward_into::<f32>(&dev, p, &mut dy)?,
                Data::Low(p) => cu::elementwise::gelu_backward_into::<T>(&dev, p, &mut dy)?,
            }
        }
        let (m, k) = x.rows_cols("linear backward input")?;
        let n = l.w.value.shape()[0];
        let want_db = l.bias.tensor().is_some();
        if in_blocks(l) {
            self.ensure_low(&l.w.name, &l.w.value)?;
            let mut tmp = None;
            let xin = self.as_low(x, &mut tmp)?;
            cu::matmul::linear_backward::<T>(
                &dev,
                xin,
                self.low(&l.w.name)?,
                &dy,
                want_db,
                (m, k, n),
            )
        } else {
            self.ensure_f32(&l.w)?;
            let xin = x.f32("linear backward input (outside the blocks)")?;
            let w = self.f32_param(&l.w.name)?;
            cu::matmul::linear_backward::<f32>(&dev, xin, w, &dy, want_db, (m, k, n))
        }
    }

    fn attention_backward(
        &mut self,
        qkv: &Buf<T>,
        probs: CudaSlice<f32>,
        table: Option<TableRef<'_>>,
        d: AttnDims,
        dy: CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let dev = self.device().clone();
        let dims = AttDims {
            b: d.b,
            n: d.n,
            h: d.h,
            dh: d.dh,
        };
        let scale = (d.dh as f32).powf(-0.5);
        let want_bias = table.is_some();
        let sc = &mut self.train_scratch;
        let (dqkv, dbias) = match &qkv.data {
            Data::F32(q) => {
                let ws = backward_scratch(&dev, &mut sc.backward_f32, &dims)?;
                cu::attention::backward_batched_with::<f32>(
                    &dev, q, &probs, &dy, want_bias, &dims, scale, ws,
                )?
            }
            Data::Low(q) => {
                let ws = backward_scratch(&dev, &mut sc.backward_low, &dims)?;
                cu::attention::backward_batched_with::<T>(
                    &dev, q, &probs, &dy, want_bias, &dims, scale, ws,
                )?
            }
        };
        // P is read; the next step's forward of this shape writes into it again.
        sc.spare_probs.push(probs);
        let dtable = match (table, dbias) {
            (Some(t), Some(db)) => {
                if !self.relpos.contains_key(&t.table.name) {
                    let rows = t.table.value.shape()[0];
                    let sc = cu::attention::RelposScatter::new(&dev, t.index, rows, d.n)?;
                    self.relpos.insert(t.table.name.clone(), sc);
                }
                Some(self.relpos[&t.table.name].grad(&dev, &db, d.h)?)
            }
            _ => None,
        };
        Ok((dqkv, dtable))
    }

    fn residual_backward(
        &mut self,
        yv: &Buf<T>,
        gamma: Option<&Param>,
        row_scale: Option<(&[f32], usize)>,
        dy: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let (m, d) = yv.rows_cols("residual backward")?;
        if let Some(g) = gamma {
            self.ensure_f32(g)?;
        }
        let keep = row_scale
            .map(|(k, n)| self.up(k).map(|k| (k, n)))
            .transpose()?;
        let dev = self.device().clone();
        let g = gamma.map(|g| self.f32_param(&g.name)).transpose()?;
        let rs = keep.as_ref().map(|(k, n)| (k, *n));
        match &yv.data {
            Data::F32(y) => cu::elementwise::residual_backward::<f32>(&dev, y, g, rs, dy, (m, d)),
            Data::Low(y) => cu::elementwise::residual_backward::<T>(&dev, y, g, rs, dy, (m, d)),
        }
    }

    fn pool_backward(
        &mut self,
        dy: CudaSlice<f32>,
        b: usize,
        n: usize,
        how: Pool,
    ) -> Result<CudaSlice<f32>> {
        let d = dy.len() / b.max(1);
        cu::elementwise::pool_backward(self.device(), &dy, (b, n, d), how)
    }

    fn mask_rows_backward(
        &mut self,
        dy: CudaSlice<f32>,
        mask: &[bool],
        d: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        cu::elementwise::mask_rows_backward(self.device(), &dy, mask, d)
    }

    fn gather_rows_backward(
        &mut self,
        dy: CudaSlice<f32>,
        rows: &[usize],
        m: usize,
    ) -> Result<CudaSlice<f32>> {
        let d = dy.len() / rows.len().max(1);
        cu::elementwise::gather_rows_backward(self.device(), &dy, rows, (m, d))
    }
}
