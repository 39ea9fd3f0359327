//! The executor's ops on borrowed values, each a launcher of src/backend/cuda.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};

use crate::backend::cuda as cu;
use crate::backend::cuda::attention::Dims as AttDims;
use crate::backend::cuda::device::{as_i32, cuda_err};
use crate::backend::{Activation, Pool};
use crate::error::{Error, Result};
use crate::model::cuda_attention::{AttentionPath, Compute};
use crate::model::layers::{Linear, Norm, Param, RelBias};
use crate::tensor::Tensor;

use super::{in_blocks, CudaExec, Data, DeviceValue, LtState};

/// The ops on borrowed values: `Exec` (which may consume its inputs) and the training executor
/// (whose records keep them) both run these.
impl<T: Compute> CudaExec<T>
where
    CudaBlas: Gemm<T>,
{
    pub(in crate::model) fn assemble_ref(
        &mut self,
        patches: &DeviceValue<T>,
        cls: &Param,
        pos: Option<&Param>,
        b: usize,
    ) -> Result<DeviceValue<T>> {
        let (bg, d) = patches.rows_cols("assemble_tokens")?;
        let g = bg / b.max(1);
        self.ensure_f32(cls)?;
        if let Some(p) = pos {
            self.ensure_f32(p)?;
        }
        let mut x = self.new_f32(&[b * (g + 1), d])?;
        let pos = pos.map(|p| self.f32_param(&p.name)).transpose()?;
        cu::elementwise::assemble_tokens(
            &self.dev,
            patches.f32("assemble_tokens patches")?,
            self.f32_param(&cls.name)?,
            pos,
            &mut x,
            (b, g, d),
        )?;
        Ok(self.value(&[b * (g + 1), d], Data::F32(x)))
    }

    pub(in crate::model) fn layernorm_ref(
        &mut self,
        x: &DeviceValue<T>,
        norm: &Norm,
        eps: f32,
    ) -> Result<DeviceValue<T>> {
        let (m, d) = x.rows_cols("layernorm")?;
        self.ensure_f32(&norm.w)?;
        self.ensure_f32(&norm.b)?;
        let (w, b) = (self.f32_param(&norm.w.name)?, self.f32_param(&norm.b.name)?);
        match &x.data {
            Data::F32(s) => {
                let mut y = self.new_f32(&[m, d])?;
                cu::layernorm::forward(&self.dev, s, w, b, &mut y, None, (m, d), eps)?;
                Ok(self.value(&[m, d], Data::F32(y)))
            }
            Data::Low(s) => {
                let mut y = self.dev.empty::<T>(m * d)?;
                cu::layernorm::forward(&self.dev, s, w, b, &mut y, None, (m, d), eps)?;
                Ok(self.value(&[m, d], Data::Low(y)))
            }
        }
    }

    /// LayerNorm of the f32 residual stream x stored as T, the operand of the T GEMM that reads
    /// it (one pass: no f32 copy and no cast). An x already in T is normalised as it is.
    pub(in crate::model) fn layernorm_low(
        &mut self,
        x: &DeviceValue<T>,
        norm: &Norm,
        eps: f32,
    ) -> Result<DeviceValue<T>> {
        let Data::F32(s) = &x.data else {
            return self.layernorm_ref(x, norm, eps);
        };
        let (m, d) = x.rows_cols("layernorm")?;
        self.ensure_f32(&norm.w)?;
        self.ensure_f32(&norm.b)?;
        let (w, b) = (self.f32_param(&norm.w.name)?, self.f32_param(&norm.b.name)?);
        let mut y = self.dev.empty::<T>(m * d)?;
        cu::layernorm::forward_from_f32(&self.dev, s, w, b, &mut y, None, (m, d), eps)?;
        Ok(self.value(&[m, d], Data::Low(y)))
    }

    /// x += γ ⊙ y in place (x the f32 residual stream, y a T branch output), then h = LN(x)
    /// stored as T, in one pass (`residual_layernorm_*`).
    pub(in crate::model) fn residual_layernorm_into(
        &mut self,
        x: &mut DeviceValue<T>,
        y: &DeviceValue<T>,
        gamma: Option<&Param>,
        norm: &Norm,
        eps: f32,
    ) -> Result<DeviceValue<T>> {
        let (m, d) = x.rows_cols("residual layernorm")?;
        if y.shape != x.shape {
            return Err(Error::Data(format!(
                "residual: branch {:?} does not match the stream {:?}",
                y.shape, x.shape
            )));
        }
        if let Some(g) = gamma {
            self.ensure_f32(g)?;
        }
        self.ensure_f32(&norm.w)?;
        self.ensure_f32(&norm.b)?;
        let ys = match &y.data {
            Data::Low(s) => s,
            Data::F32(_) => {
                return Err(Error::Cuda(format!(
                    "residual layernorm: the branch must be {}",
                    T::NAME
                )))
            }
        };
        let xs = match &mut x.data {
            Data::F32(s) => s,
            Data::Low(_) => return Err(Error::Cuda("residual: the stream must be f32".into())),
        };
        let g = gamma.map(|g| self.f32_param(&g.name)).transpose()?;
        let ln = (self.f32_param(&norm.w.name)?, self.f32_param(&norm.b.name)?);
        let mut h = self.dev.empty::<T>(m * d)?;
        cu::layernorm::residual_forward(&self.dev, xs, ys, g, ln, &mut h, None, (m, d), eps)?;
        Ok(self.value(&[m, d], Data::Low(h)))
    }

    /// (M, K, N) of linear layer `l` on x, or an error naming the weight.
    fn linear_dims(x: &DeviceValue<T>, l: &Linear) -> Result<(usize, usize, usize)> {
        let (m, k) = x.rows_cols("linear input")?;
        let (n, k2) = l.w.value.dims2(&l.w.name)?;
        if k != k2 {
            return Err(Error::Data(format!(
                "{}: the input has {k} features but the weight expects {k2}",
                l.w.name
            )));
        }
        Ok((m, k, n))
    }

    /// A blocks' linear layer with a bias and no activation, y = x·wᵀ + b at T, as one cuBLASLt
    /// call with the bias in its epilogue; None where cuBLASLt cannot run it (unavailable, or no
    /// algorithm for the shape: said once), and the caller runs `linear_ref`.
    pub(in crate::model) fn linear_lt(
        &mut self,
        x: &DeviceValue<T>,
        l: &Linear,
    ) -> Result<Option<DeviceValue<T>>> {
        let (m, k, n) = Self::linear_dims(x, l)?;
        let Some(bias_key) = self.linear_bias(l)? else {
            return Ok(None);
        };
        if matches!(self.lt, LtState::Untried) {
            self.lt = match cu::lt::Lt::new(&self.dev) {
                Ok(lt) => {
                    let lease = self.meter.take(lt.workspace_size());
                    LtState::Ready { lt, _lease: lease }
                }
                Err(e) => {
                    eprintln!("note: {e}; the blocks' linears add their bias in a second pass");
                    LtState::Unavailable
                }
            };
        }
        // The handle is taken out while the launcher borrows the parameters.
        let mut state = std::mem::replace(&mut self.lt, LtState::Unavailable);
        let LtState::Ready { lt, .. } = &mut state else {
            self.lt = state;
            return Ok(None);
        };
        self.ensure_low(&l.w.name, &l.w.value)?;
        let mut out = self.dev.empty::<T>(m * n)?;
        let run = (|| {
            let mut tmp = None;
            let xin = self.as_low(x, &mut tmp)?;
            let (w, b) = (self.low(&l.w.name)?, self.f32_param(&bias_key)?);
            lt.linear_bias(&self.dev, xin, w, b, &mut out, (m, k, n))
        })();
        self.lt = state;
        if !run? {
            if !self.lt_refused {
                eprintln!(
                    "note: cuBLASLt has no algorithm for {} ({m}x{k}x{n}, {}): cuBLAS and a bias pass instead",
                    l.w.name,
                    T::NAME
                );
                self.lt_refused = true;
            }
            return Ok(None);
        }
        Ok(Some(self.value(&[m, n], Data::Low(out))))
    }

    pub(in crate::model) fn linear_ref(
        &mut self,
        x: &DeviceValue<T>,
        l: &Linear,
        act: Activation,
    ) -> Result<DeviceValue<T>> {
        let (m, k, n) = Self::linear_dims(x, l)?;
        let bias_key = self.linear_bias(l)?.unwrap_or_default();
        if in_blocks(l) {
            self.ensure_low(&l.w.name, &l.w.value)?;
            let mut tmp = None;
            let xin = self.as_low(x, &mut tmp)?;
            let mut out = self.dev.empty::<T>(m * n)?;
            let bias = l
                .bias
                .tensor()
                .map(|_| self.f32_param(&bias_key))
                .transpose()?;
            cu::matmul::linear(
                &self.dev,
                xin,
                self.low(&l.w.name)?,
                bias,
                act,
                &mut out,
                (m, k, n),
            )?;
            Ok(self.value(&[m, n], Data::Low(out)))
        } else {
            self.ensure_f32(&l.w)?;
            let xin = x.f32("linear input (outside the blocks)")?;
            let mut out = self.new_f32(&[m, n])?;
            let bias = l
                .bias
                .tensor()
                .map(|_| self.f32_param(&bias_key))
                .transpose()?;
            cu::matmul::linear::<f32>(
                &self.dev,
                xin,
                self.f32_param(&l.w.name)?,
                bias,
                act,
                &mut out,
                (m, k, n),
            )?;
            Ok(self.value(&[m, n], Data::F32(out)))
        }
    }

    pub(in crate::model) fn attention_ref(
        &mut self,
        qkv: &DeviceValue<T>,
        bias: Option<&RelBias>,
        b: usize,
        n: usize,
        heads: usize,
    ) -> Result<DeviceValue<T>> {
        let (bn, d3) = qkv.rows_cols("attention input")?;
        let d = d3 / 3;
        if bn != b * n || d3 != 3 * d || heads == 0 || d % heads != 0 {
            return Err(Error::Data(format!(
                "attention: qkv [{bn}, {d3}] does not fit B = {b}, N = {n}, H = {heads}"
            )));
        }
        let dims = AttDims {
            b,
            n,
            h: heads,
            dh: d / heads,
        };
        let bias_key = bias.map(|r| self.dense_bias(r, heads)).transpose()?;
        let mut path = self.attention;
        if let Some(why) = path.refuses(T::NAME, &dims) {
            if !self.fell_back {
                eprintln!("note: {why}");
                self.fell_back = true;
            }
            path = AttentionPath::Gemm;
        }
        if path == AttentionPath::Gemm {
            self.ensure_workspace(&dims)?;
        }
        let mut tmp = None;
        let mut out = self.dev.empty::<T>(bn * d)?;
        // The workspace is taken out while the launcher borrows the parameters.
        let mut ws = self.workspace.take();
        let run = (|| {
            let xin = self.as_low(qkv, &mut tmp)?;
            let bias = bias_key.as_deref().map(|k| self.f32_param(k)).transpose()?;
            let w = ws.as_mut().map(|(w, _)| w);
            T::attention(&self.dev, path, xin, bias, &mut out, &dims, w)
        })();
        self.workspace = ws;
        run?;
        Ok(self.value(&[bn, d], Data::Low(out)))
    }

    /// x += γ ⊙ y in place (x is the f32 residual stream).
    pub(in crate::model) fn residual_into(
        &mut self,
        x: &mut DeviceValue<T>,
        y: &DeviceValue<T>,
        gamma: Option<&Param>,
    ) -> Result<()> {
        let (m, d) = x.rows_cols("residual")?;
        if y.shape != x.shape {
            return Err(Error::Data(format!(
                "residual: branch {:?} does not match the stream {:?}",
                y.shape, x.shape
            )));
        }
        if let Some(g) = gamma {
            self.ensure_f32(g)?;
        }
        let g = gamma.map(|g| self.f32_param(&g.name)).transpose()?;
        let xs = match &mut x.data {
            Data::F32(s) => s,
            Data::Low(_) => return Err(Error::Cuda("residual: the stream must be f32".into())),
        };
        match &y.data {
            Data::Low(ys) => cu::elementwise::residual::<T>(&self.dev, xs, ys, g, (m, d))?,
            Data::F32(ys) => cu::elementwise::residual::<f32>(&self.dev, xs, ys, g, (m, d))?,
        }
        Ok(())
    }

    pub(in crate::model) fn pool_ref(
        &mut self,
        x: &DeviceValue<T>,
        b: usize,
        how: Pool,
    ) -> Result<DeviceValue<T>> {
        let (bn, d) = x.rows_cols("pool")?;
        let n = bn / b.max(1);
        let key = (n, how == Pool::MeanPatches);
        if !self.pool_weights.contains_key(&key) {
            let mut w = vec![0.0f32; n];
            match how {
                Pool::MeanPatches => w[1..].fill(1.0 / (n.max(2) - 1) as f32),
                Pool::ClassToken => w[0] = 1.0,
            }
            let up = self.dev.upload(&w)?;
            self.pool_weights.insert(key, up);
        }
        // A batched GEMV: pooled_i [D] = x_i [N, D]ᵀ · w [N] for every image i. Column-major,
        // x_i is [D, N] with ld D and w [N, 1], shared (stride 0).
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: as_i32("D", d)?,
                n: 1,
                k: as_i32("N", n)?,
                alpha: 1.0f32,
                lda: as_i32("D", d)?,
                ldb: as_i32("N", n)?,
                beta: 0.0f32,
                ldc: as_i32("D", d)?,
            },
            batch_size: as_i32("B", b)?,
            stride_a: (n * d) as i64,
            stride_b: 0,
            stride_c: d as i64,
        };
        let mut pooled = self.new_f32(&[b, d])?;
        let xs = x.f32("pool input")?;
        // SAFETY: x holds B·N·D values, the weights N, pooled B·D: the strides stay inside.
        unsafe {
            <CudaBlas as Gemm<f32>>::gemm_strided_batched(
                self.dev.blas(),
                cfg,
                xs,
                &self.pool_weights[&key],
                &mut pooled,
            )
        }
        .map_err(cuda_err("cuBLAS pooling"))?;
        Ok(self.value(&[b, d], Data::F32(pooled)))
    }

    pub(in crate::model) fn mask_rows_ref(
        &mut self,
        x: &DeviceValue<T>,
        mask: &[bool],
        token: &Param,
    ) -> Result<DeviceValue<T>> {
        let (m, d) = x.rows_cols("mask_rows")?;
        if mask.len() != m {
            return Err(Error::Data(format!(
                "mask_rows: mask has {} entries for {m} rows",
                mask.len()
            )));
        }
        self.ensure_f32(token)?;
        let src: Vec<i32> = (0..m)
            .map(|r| if mask[r] { -1 } else { r as i32 })
            .collect();
        let mut out = self.new_f32(&[m, d])?;
        let tok = self.f32_param(&token.name)?;
        cu::elementwise::select_rows(
            &self.dev,
            x.f32("mask_rows input")?,
            &src,
            Some(tok),
            &mut out,
            (m, d),
        )?;
        Ok(self.value(&[m, d], Data::F32(out)))
    }

    pub(in crate::model) fn gather_rows_ref(
        &mut self,
        x: &DeviceValue<T>,
        rows: &[usize],
    ) -> Result<DeviceValue<T>> {
        let (m, d) = x.rows_cols("gather_rows")?;
        let src = rows
            .iter()
            .map(|&r| as_i32("row", r))
            .collect::<Result<Vec<i32>>>()?;
        let mut out = self.new_f32(&[rows.len(), d])?;
        cu::elementwise::select_rows(
            &self.dev,
            x.f32("gather_rows input")?,
            &src,
            None,
            &mut out,
            (m, d),
        )?;
        Ok(self.value(&[rows.len(), d], Data::F32(out)))
    }

    pub(in crate::model) fn host_copy(&self, v: &DeviceValue<T>) -> Result<Tensor> {
        let host = match &v.data {
            Data::F32(s) => self.dev.download(s)?,
            Data::Low(s) => self.dev.download(s)?.into_iter().map(T::to_f32).collect(),
        };
        Tensor::from_vec(&v.shape, host)
    }
}
