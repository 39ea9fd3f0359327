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
use crate::backend::cuda::device::cuda_err;
use crate::backend::{Activation, Pool};
use crate::error::{Error, Result};
use crate::model::cpu_train::CpuTrain;
use crate::model::cuda_attention::Compute;
use crate::model::cuda_exec::{CudaExec, Data, DeviceValue};
use crate::model::exec::Exec;
use crate::model::layers::{Linear, Norm, Param, RelBias};
use crate::model::train_exec::{AttnDims, TableRef, TrainExec};
use crate::tensor::Tensor;

type Buf<T> = Rc<DeviceValue<T>>;

impl<T: Compute> CudaExec<T>
where
    CudaBlas: Gemm<T>,
{
    fn host(&self, v: &DeviceValue<T>) -> Result<Tensor> {
        self.host_copy(v)
    }

    fn host_grad(&self, g: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.device().download(g)
    }

    fn up(&self, g: &[f32]) -> Result<CudaSlice<f32>> {
        self.device().upload(g)
    }

    fn up_value(&self, t: &Tensor) -> Result<Buf<T>> {
        let s = self.up(t.as_slice())?;
        Ok(Rc::new(self.value(t.shape(), Data::F32(s))))
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

    fn layernorm(&mut self, x: &Buf<T>, norm: &Norm, eps: f32) -> Result<Buf<T>> {
        Ok(Rc::new(self.layernorm_ref(x, norm, eps)?))
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
        let host = self.host(qkv)?;
        let (y, probs) = CpuTrain.attention(&host, bias, d)?;
        Ok((self.up_value(&y)?, self.up(&probs)?))
    }

    fn scale_rows(&mut self, y: &Buf<T>, keep: &[f32], n: usize) -> Result<Buf<T>> {
        let host = self.host(y)?;
        let out = CpuTrain.scale_rows(&host, keep, n)?;
        self.up_value(&out)
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
        let mut a = self.host_grad(acc)?;
        let b = self.host_grad(g)?;
        CpuTrain.add_grad(&mut a, &b)?;
        *acc = self.up(&a)?;
        Ok(())
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
        image_dims: [usize; 4],
        dy: CudaSlice<f32>,
        want_input: bool,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let cols = self.host(cols)?;
        let dy = self.host_grad(&dy)?;
        let (dw, db, di) = CpuTrain.patch_embed_backward(&cols, w, image_dims, dy, want_input)?;
        Ok((
            self.up(&dw)?,
            self.up(&db)?,
            di.map(|d| self.up(&d)).transpose()?,
        ))
    }

    fn assemble_backward(
        &mut self,
        dy: CudaSlice<f32>,
        b: usize,
        d: usize,
        has_pos: bool,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let dy = self.host_grad(&dy)?;
        let (dp, dc, dpos) = CpuTrain.assemble_backward(dy, b, d, has_pos)?;
        Ok((
            self.up(&dp)?,
            self.up(&dc)?,
            dpos.map(|d| self.up(&d)).transpose()?,
        ))
    }

    fn layernorm_backward(
        &mut self,
        x: &Buf<T>,
        norm: &Norm,
        eps: f32,
        dy: CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let (m, d) = x.rows_cols("layernorm backward")?;
        let xs = x.f32("layernorm input")?;
        self.ensure_f32(&norm.w)?;
        self.ensure_f32(&norm.b)?;
        // The statistics are recomputed here rather than kept from the forward: one cheap pass
        // over x, and the tape holds no per-op extras for LayerNorm.
        let dev = self.device().clone();
        let mut scratch = dev.empty::<f32>(m * d)?;
        let mut mean = dev.empty::<f32>(m)?;
        let mut rstd = dev.empty::<f32>(m)?;
        let (g, bta) = (self.f32_param(&norm.w.name)?, self.f32_param(&norm.b.name)?);
        cu::layernorm::forward::<f32>(
            &dev,
            xs,
            g,
            bta,
            &mut scratch,
            Some((&mut mean, &mut rstd)),
            (m, d),
            eps,
        )?;
        let (dgamma, dbeta) =
            cu::layernorm::backward::<f32>(&dev, xs, g, &mean, &rstd, &dy, &mut scratch, (m, d))?;
        Ok((scratch, dgamma, dbeta))
    }

    fn linear_backward(
        &mut self,
        x: &Buf<T>,
        l: &Linear,
        pre_gelu: Option<&Buf<T>>,
        dy: CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let xh = self.host(x)?;
        let pre = pre_gelu.map(|p| self.host(p)).transpose()?;
        let dy = self.host_grad(&dy)?;
        let (dx, dw, db) = CpuTrain.linear_backward(&xh, l, pre.as_ref(), dy)?;
        Ok((
            self.up(&dx)?,
            self.up(&dw)?,
            db.map(|d| self.up(&d)).transpose()?,
        ))
    }

    fn attention_backward(
        &mut self,
        qkv: &Buf<T>,
        probs: &CudaSlice<f32>,
        table: Option<TableRef<'_>>,
        d: AttnDims,
        dy: CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let q = self.host(qkv)?;
        let p = self.host_grad(probs)?;
        let dy = self.host_grad(&dy)?;
        let (dq, dt) = CpuTrain.attention_backward(&q, &p, table, d, dy)?;
        Ok((self.up(&dq)?, dt.map(|t| self.up(&t)).transpose()?))
    }

    fn residual_backward(
        &mut self,
        yv: &Buf<T>,
        gamma: Option<&Param>,
        row_scale: Option<(&[f32], usize)>,
        dy: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let y = self.host(yv)?;
        let dy = self.host_grad(dy)?;
        let (db, dg) = CpuTrain.residual_backward(&y, gamma, row_scale, &dy)?;
        Ok((self.up(&db)?, dg.map(|g| self.up(&g)).transpose()?))
    }

    fn pool_backward(
        &mut self,
        dy: CudaSlice<f32>,
        b: usize,
        n: usize,
        how: Pool,
    ) -> Result<CudaSlice<f32>> {
        let dy = self.host_grad(&dy)?;
        let dx = CpuTrain.pool_backward(dy, b, n, how)?;
        self.up(&dx)
    }

    fn mask_rows_backward(
        &mut self,
        dy: CudaSlice<f32>,
        mask: &[bool],
        d: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let dy = self.host_grad(&dy)?;
        let (dx, dt) = CpuTrain.mask_rows_backward(dy, mask, d)?;
        Ok((self.up(&dx)?, self.up(&dt)?))
    }

    fn gather_rows_backward(
        &mut self,
        dy: CudaSlice<f32>,
        rows: &[usize],
        m: usize,
    ) -> Result<CudaSlice<f32>> {
        let dy = self.host_grad(&dy)?;
        let dx = CpuTrain.gather_rows_backward(dy, rows, m)?;
        self.up(&dx)
    }
}
