//! The model's `Exec` on one CUDA device: `VisionTransformer`'s own forward, forward_local and
//! forward_masked run here unchanged, each op a launcher of src/backend/cuda. Parameters are
//! uploaded on first use and found again by their checkpoint name; activations stay on the
//! device, and the host sees a value only where a caller asks (`Exec::to_host`).
//!
//! Precision T (`--precision`) is autocast's rule, as timm's bf16 autocast applies it:
//!   - the transformer blocks' GEMMs and attention take T operands with f32 accumulation (f32:
//!     cuBLAS sgemm, no TF32; bf16: cublasGemmEx; attention as `cuda_attention` chooses: flash
//!     attention on tensor cores at bf16 where it applies, cuBLAS over the batch otherwise);
//!   - LayerNorm reads the f32 residual stream and writes f32 (cast to T by the GEMM that reads
//!     it); the patch embedding, the residual stream, pooling, the final norm and every linear
//!     layer outside the blocks (the head, MIM's lm_head) stay f32: they are a sliver of the
//!     FLOPs and their outputs are what OOD scores read.
//!
//! Every activation is counted by a meter (live and peak bytes), so that the memory a batch
//! needs is this executor's own buffer plan, measured (`super::cuda_model`), not a second model.

use std::any::Any;
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::attention::Dims as AttDims;
use crate::backend::cuda::device::{as_i32, cuda_err};
use crate::backend::cuda::{self as cu, CudaDevice};
use crate::backend::{Activation, Pool};
use crate::error::{Error, Result};
use crate::model::cuda_attention::{AttentionPath, Compute, Workspace};
use crate::model::exec::Exec;
use crate::model::layers::{Linear, LinearBias, Norm, Param, RelBias};
use crate::tensor::Tensor;

/// Live and peak bytes of the executor's activations and workspace.
#[derive(Default)]
pub struct Meter {
    live: Cell<usize>,
    peak: Cell<usize>,
}

impl Meter {
    fn take(self: &Rc<Self>, bytes: usize) -> Lease {
        let live = self.live.get() + bytes;
        self.live.set(live);
        self.peak.set(self.peak.get().max(live));
        Lease {
            bytes,
            meter: Rc::clone(self),
        }
    }

    /// Starts a new peak from what is live now.
    pub fn reset_peak(&self) {
        self.peak.set(self.live.get());
    }

    pub fn peak(&self) -> usize {
        self.peak.get()
    }
}

/// Bytes held by one buffer, given back to the meter when the buffer goes.
pub(super) struct Lease {
    bytes: usize,
    meter: Rc<Meter>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.meter.live.set(self.meter.live.get() - self.bytes);
    }
}

pub(super) enum Data<T> {
    F32(CudaSlice<f32>),
    Low(CudaSlice<T>),
}

/// An activation on the device: its shape, its storage (f32 or the compute type T) and its lease.
pub struct DeviceValue<T> {
    pub(super) shape: Vec<usize>,
    pub(super) data: Data<T>,
    _lease: Lease,
}

impl<T> DeviceValue<T> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub(super) fn rows_cols(&self, what: &str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [m, d] => Ok((m, d)),
            ref s => Err(Error::Data(format!(
                "{what}: expected a matrix, got shape {s:?}"
            ))),
        }
    }

    pub(super) fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            Data::F32(s) => Ok(s),
            Data::Low(_) => Err(Error::Cuda(format!("{what}: expected an f32 activation"))),
        }
    }
}

/// A parameter on the device: f32, or T for the blocks' GEMM weights.
enum DeviceParam<T> {
    F32(CudaSlice<f32>),
    Low(CudaSlice<T>),
}

pub struct CudaExec<T: Compute> {
    dev: Arc<CudaDevice>,
    params: HashMap<String, DeviceParam<T>>,
    /// Token weights of the pooling per (tokens, how): 1/(N−1) on the patches (mean) or one-hot
    /// on the class token, used as a batched GEMV.
    pool_weights: HashMap<(usize, bool), CudaSlice<f32>>,
    /// Which attention runs (`cuda_attention`), and the cuBLAS path's workspace for the last
    /// batch shape.
    attention: AttentionPath,
    pub(super) workspace: Option<(Workspace<T>, Lease)>,
    /// A path fell back to cuBLAS for a shape it cannot take; said once.
    fell_back: bool,
    meter: Rc<Meter>,
    head_dim: Option<usize>,
    /// Training: the f32 master copy of every trained parameter, by name, which the device
    /// optimiser updates in place; `params` then caches only what is derived from them.
    pub(super) masters: HashMap<String, CudaSlice<f32>>,
    /// The relative-position gradient's inverse index per table (training; made once).
    pub(super) relpos: HashMap<String, cu::attention::RelposScatter>,
    /// Training: attention's kept probabilities and backward scratch, reused across steps.
    pub(super) train_scratch: crate::model::cuda_train::TrainScratch<T>,
    /// Images already on the device that `input` copies from (benchmarks time the forward
    /// without the host-to-device transfer).
    staged: Option<(Vec<usize>, CudaSlice<f32>)>,
}

/// The f32 slice as `CudaSlice<T>` when T is f32 (no copy), else None.
fn same_type<T: 'static>(s: &CudaSlice<f32>) -> Option<&CudaSlice<T>> {
    (s as &dyn Any).downcast_ref::<CudaSlice<T>>()
}

impl<T: Compute> CudaExec<T>
where
    CudaBlas: Gemm<T>,
{
    /// An executor for a model `name` with head dim `head_dim` (which attention runs depends on
    /// it; see `cuda_attention`).
    pub fn new(dev: Arc<CudaDevice>, name: &str, head_dim: usize) -> CudaExec<T> {
        CudaExec {
            dev,
            params: HashMap::new(),
            pool_weights: HashMap::new(),
            attention: AttentionPath::choose(T::NAME, name, head_dim),
            workspace: None,
            fell_back: false,
            meter: Rc::new(Meter::default()),
            staged: None,
            head_dim: Some(head_dim),
            relpos: HashMap::new(),
            train_scratch: Default::default(),
            masters: HashMap::new(),
        }
    }

    /// Uploads `images` once; each later `input` of that shape copies them on the device.
    pub fn stage_input(&mut self, images: &Tensor) -> Result<()> {
        let up = self.dev.upload(images.as_slice())?;
        self.staged = Some((images.shape().to_vec(), up));
        Ok(())
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Runs attention on `path` from now on; refused for a path that cannot take this model's
    /// head dim at this precision.
    pub fn set_attention(&mut self, path: AttentionPath) -> Result<()> {
        let dh = self.head_dim.unwrap_or(0);
        let probe = AttDims {
            b: 1,
            n: 1,
            h: 1,
            dh,
        };
        if let Some(why) = path.refuses(T::NAME, &probe) {
            return Err(Error::Cuda(format!("attention {path:?}: {why}")));
        }
        self.attention = path;
        self.workspace = None;
        Ok(())
    }

    /// The attention path in use.
    pub fn attention(&self) -> AttentionPath {
        self.attention
    }

    pub(super) fn value(&self, shape: &[usize], data: Data<T>) -> DeviceValue<T> {
        let bytes = match &data {
            Data::F32(s) => s.len() * 4,
            Data::Low(s) => s.len() * std::mem::size_of::<T>(),
        };
        DeviceValue {
            shape: shape.to_vec(),
            data,
            _lease: self.meter.take(bytes),
        }
    }

    pub(super) fn new_f32(&self, shape: &[usize]) -> Result<CudaSlice<f32>> {
        self.dev.empty(shape.iter().product())
    }

    /// The f32 parameter `name` (uploaded on first use).
    pub(super) fn param_f32(&mut self, name: &str, t: &Tensor) -> Result<&CudaSlice<f32>> {
        if self.masters.contains_key(name) {
            return Ok(&self.masters[name]);
        }
        if !self.params.contains_key(name) {
            let up = self.dev.upload(t.as_slice())?;
            self.params.insert(name.to_string(), DeviceParam::F32(up));
        }
        match &self.params[name] {
            DeviceParam::F32(s) => Ok(s),
            DeviceParam::Low(_) => Err(Error::Cuda(format!("{name}: uploaded as {}", T::NAME))),
        }
    }

    /// Uploads the T parameter `name` if it is not on the device yet.
    pub(super) fn ensure_low(&mut self, name: &str, t: &Tensor) -> Result<()> {
        if !self.params.contains_key(name) && self.masters.contains_key(name) {
            let m = &self.masters[name];
            let low = match same_type::<T>(m) {
                Some(same) => self.dev.stream().clone_dtod(same),
                None => {
                    let mut out = self.dev.empty::<T>(m.len())?;
                    cu::elementwise::cast(&self.dev, m, &mut out)?;
                    Ok(out)
                }
            }
            .map_err(cuda_err("copy a master weight"))?;
            self.params.insert(name.to_string(), DeviceParam::Low(low));
        }
        if !self.params.contains_key(name) {
            let host: Vec<T> = t.as_slice().iter().map(|&v| T::from_f32(v)).collect();
            let up = self.dev.upload(&host)?;
            self.params.insert(name.to_string(), DeviceParam::Low(up));
        }
        Ok(())
    }

    pub(super) fn low(&self, name: &str) -> Result<&CudaSlice<T>> {
        match self.params.get(name) {
            Some(DeviceParam::Low(s)) => Ok(s),
            _ => Err(Error::Cuda(format!("{name}: not uploaded as {}", T::NAME))),
        }
    }

    pub(super) fn f32_param(&self, name: &str) -> Result<&CudaSlice<f32>> {
        if let Some(m) = self.masters.get(name) {
            return Ok(m);
        }
        match self.params.get(name) {
            Some(DeviceParam::F32(s)) => Ok(s),
            _ => Err(Error::Cuda(format!("{name}: not uploaded as f32"))),
        }
    }

    pub(super) fn ensure_f32(&mut self, p: &Param) -> Result<()> {
        self.param_f32(&p.name, &p.value).map(|_| ())
    }

    /// A tensor derived from parameters, cached under `key` until `refresh_params`: from the
    /// masters when training (`from_masters`, given the host copies of the masters it names),
    /// else uploaded from the host value.
    fn derived_f32(
        &mut self,
        key: &str,
        host: &Tensor,
        sources: &[&str],
        from_masters: impl FnOnce(&[Vec<f32>]) -> Vec<f32>,
    ) -> Result<()> {
        if self.params.contains_key(key) {
            return Ok(());
        }
        let up = if sources.iter().all(|s| self.masters.contains_key(*s)) && !sources.is_empty() {
            let inputs = sources
                .iter()
                .map(|s| self.dev.download(&self.masters[*s]))
                .collect::<Result<Vec<_>>>()?;
            self.dev.upload(&from_masters(&inputs))?
        } else {
            self.dev.upload(host.as_slice())?
        };
        self.params.insert(key.to_string(), DeviceParam::F32(up));
        Ok(())
    }

    /// The key of linear layer `l`'s f32 bias on the device (None without one): the parameter
    /// itself, or BEiT's joined [q; 0; v] qkv bias.
    pub(super) fn linear_bias(&mut self, l: &Linear) -> Result<Option<String>> {
        match &l.bias {
            LinearBias::None => Ok(None),
            LinearBias::Full(p) => {
                self.ensure_f32(p)?;
                Ok(Some(p.name.clone()))
            }
            LinearBias::QV { q, v, joined } => {
                let key = format!("{}:bias", l.w.name);
                self.derived_f32(&key, joined, &[&q.name, &v.name], |qv| {
                    let d = qv[0].len();
                    let mut out = qv[0].clone();
                    out.extend(std::iter::repeat_n(0.0, d));
                    out.extend_from_slice(&qv[1]);
                    out
                })?;
                Ok(Some(key))
            }
        }
    }

    /// The key of the dense relative-position bias [H, N, N] of `r` on the device.
    pub(super) fn dense_bias(&mut self, r: &RelBias, heads: usize) -> Result<String> {
        let key = format!("{}:dense", r.table.name);
        self.derived_f32(&key, &r.dense, &[&r.table.name], |t| {
            crate::model::relpos::gather_bias(&t[0], heads, &r.index)
        })?;
        Ok(key)
    }

    /// Trains from now on: every tensor of `params` becomes an f32 master on the device (found by
    /// name before anything cached), and what was cached is dropped.
    pub fn set_masters(
        &mut self,
        params: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        self.params.clear();
        self.masters = params
            .iter()
            .map(|(k, t)| Ok((k.clone(), self.dev.upload(t.as_slice())?)))
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// The masters, for the optimiser to update in place.
    pub fn masters_mut(&mut self) -> &mut HashMap<String, CudaSlice<f32>> {
        &mut self.masters
    }

    /// After an update of the masters: drops what was derived from them (T copies of the GEMM
    /// weights, joined biases, dense position biases), so the next forward derives it again.
    pub fn refresh_params(&mut self) {
        self.params.clear();
    }

    /// The masters downloaded, by name (checkpoints, evaluation on the host).
    pub fn download_masters(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out: Vec<_> = self
            .masters
            .iter()
            .map(|(k, s)| Ok((k.clone(), self.dev.download(s)?)))
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// x as T: itself, or a T copy of an f32 activation (T ≠ f32).
    pub(super) fn as_low<'a>(
        &self,
        x: &'a DeviceValue<T>,
        tmp: &'a mut Option<CudaSlice<T>>,
    ) -> Result<&'a CudaSlice<T>> {
        match &x.data {
            Data::Low(s) => Ok(s),
            Data::F32(s) => match same_type::<T>(s) {
                Some(same) => Ok(same),
                None => {
                    let mut out = self.dev.empty::<T>(s.len())?;
                    cu::elementwise::cast(&self.dev, s, &mut out)?;
                    Ok(tmp.insert(out))
                }
            },
        }
    }

    /// The cuBLAS attention's workspace for `dims` (made once per batch shape and kept).
    pub(super) fn ensure_workspace(&mut self, dims: &AttDims) -> Result<()> {
        let same = matches!(&self.workspace, Some((w, _)) if (w.dims.b, w.dims.n, w.dims.h, w.dims.dh) == (dims.b, dims.n, dims.h, dims.dh));
        if !same {
            self.workspace = None; // give the old workspace back before making the new one
            let w = Workspace::new(&self.dev, dims)?;
            let lease = self.meter.take(w.bytes());
            self.workspace = Some((w, lease));
        }
        Ok(())
    }
}

/// Whether a linear layer runs at T: the transformer blocks' GEMMs (autocast's rule; see the
/// module doc), found by the checkpoint's own names.
pub(super) fn in_blocks(l: &Linear) -> bool {
    l.w.name.starts_with("blocks.")
}

impl<T: Compute> Exec for CudaExec<T>
where
    CudaBlas: Gemm<T>,
{
    type V = DeviceValue<T>;

    fn input(&mut self, images: &Tensor) -> Result<DeviceValue<T>> {
        let up = match &self.staged {
            Some((shape, s)) if shape == images.shape() => self
                .dev
                .stream()
                .clone_dtod(s)
                .map_err(cuda_err("copy the staged images"))?,
            _ => self.dev.upload(images.as_slice())?,
        };
        Ok(self.value(images.shape(), Data::F32(up)))
    }

    fn patch_embed(
        &mut self,
        images: &DeviceValue<T>,
        w: &Param,
        b: &Param,
    ) -> Result<DeviceValue<T>> {
        let (bn, c, h, wd) = match images.shape[..] {
            [b, c, h, w] => (b, c, h, w),
            ref s => {
                return Err(Error::Data(format!(
                    "patch_embed: expected [B, C, H, W], got {s:?}"
                )))
            }
        };
        let (d, p) = match w.value.shape() {
            [d, _, p, _] => (*d, *p),
            s => {
                return Err(Error::Data(format!(
                    "{}: expected [D, C, P, P], got {s:?}",
                    w.name
                )))
            }
        };
        self.ensure_f32(w)?;
        self.ensure_f32(b)?;
        let dims = cu::patch_embed::Dims {
            b: bn,
            c,
            h,
            w: wd,
            p,
        };
        let out = cu::patch_embed::forward::<f32>(
            &self.dev,
            images.f32("patch_embed input")?,
            self.f32_param(&w.name)?,
            self.f32_param(&b.name)?,
            dims,
            d,
        )?;
        Ok(self.value(&[bn * dims.patches(), d], Data::F32(out)))
    }

    fn assemble_tokens(
        &mut self,
        patches: DeviceValue<T>,
        cls: &Param,
        pos: Option<&Param>,
        b: usize,
    ) -> Result<DeviceValue<T>> {
        self.assemble_ref(&patches, cls, pos, b)
    }

    fn layernorm(&mut self, x: &DeviceValue<T>, norm: &Norm, eps: f32) -> Result<DeviceValue<T>> {
        self.layernorm_ref(x, norm, eps)
    }

    fn linear(
        &mut self,
        x: &DeviceValue<T>,
        l: &Linear,
        act: Activation,
    ) -> Result<DeviceValue<T>> {
        self.linear_ref(x, l, act)
    }

    fn attention(
        &mut self,
        qkv: DeviceValue<T>,
        bias: Option<&RelBias>,
        b: usize,
        n: usize,
        heads: usize,
    ) -> Result<DeviceValue<T>> {
        self.attention_ref(&qkv, bias, b, n, heads)
    }

    fn residual(
        &mut self,
        mut x: DeviceValue<T>,
        y: DeviceValue<T>,
        gamma: Option<&Param>,
        _block: usize,
    ) -> Result<DeviceValue<T>> {
        self.residual_into(&mut x, &y, gamma)?;
        Ok(x)
    }

    fn pool(&mut self, x: DeviceValue<T>, b: usize, how: Pool) -> Result<DeviceValue<T>> {
        self.pool_ref(&x, b, how)
    }

    fn mask_rows(
        &mut self,
        x: DeviceValue<T>,
        mask: &[bool],
        token: &Param,
    ) -> Result<DeviceValue<T>> {
        self.mask_rows_ref(&x, mask, token)
    }

    fn gather_rows(&mut self, x: &DeviceValue<T>, rows: &[usize]) -> Result<DeviceValue<T>> {
        self.gather_rows_ref(x, rows)
    }

    fn to_host(&mut self, v: &DeviceValue<T>) -> Result<Tensor> {
        self.host_copy(v)
    }
}

/// The ops on borrowed values: `Exec` (which may consume its inputs) and the training executor
/// (whose records keep them) both run these.
impl<T: Compute> CudaExec<T>
where
    CudaBlas: Gemm<T>,
{
    pub(super) fn assemble_ref(
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

    pub(super) fn layernorm_ref(
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

    pub(super) fn linear_ref(
        &mut self,
        x: &DeviceValue<T>,
        l: &Linear,
        act: Activation,
    ) -> Result<DeviceValue<T>> {
        let (m, k) = x.rows_cols("linear input")?;
        let (n, k2) = l.w.value.dims2(&l.w.name)?;
        if k != k2 {
            return Err(Error::Data(format!(
                "{}: the input has {k} features but the weight expects {k2}",
                l.w.name
            )));
        }
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

    pub(super) fn attention_ref(
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
    pub(super) fn residual_into(
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

    pub(super) fn pool_ref(
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

    pub(super) fn mask_rows_ref(
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

    pub(super) fn gather_rows_ref(
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

    pub(super) fn host_copy(&self, v: &DeviceValue<T>) -> Result<Tensor> {
        let host = match &v.data {
            Data::F32(s) => self.dev.download(s)?,
            Data::Low(s) => self.dev.download(s)?.into_iter().map(T::to_f32).collect(),
        };
        Tensor::from_vec(&v.shape, host)
    }
}
