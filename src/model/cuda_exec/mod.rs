//! The model's `Exec` on one CUDA device: `VisionTransformer`'s own forward, forward_local and
//! forward_masked run here unchanged, each op a launcher of src/backend/cuda. Parameters are
//! uploaded on first use and found again by their checkpoint name; activations stay on the
//! device, and the host sees a value only where a caller asks (`Exec::to_host`).
//!
//! Precision T (`--precision`) is autocast's rule, as timm's bf16 autocast applies it:
//!   - the transformer blocks' GEMMs and attention take T operands with f32 accumulation (f32:
//!     no TF32; qkv, proj and fc2 on cuBLASLt with the f32 bias in the epilogue, rounded to T
//!     once, and on cuBLAS sgemm / cublasGemmEx plus a bias pass where cuBLASLt has no
//!     algorithm; fc1 on cuBLAS then bias + exact GELU in one pass; attention as
//!     `cuda_attention` chooses: flash attention on tensor cores at bf16 where it applies,
//!     cuBLAS over the batch otherwise);
//!   - the blocks' LayerNorms (norm1, norm2) read the f32 residual stream and write T, the GEMM's
//!     operand, in one pass; a residual followed by one of them is one pass too
//!     (`Exec::residual_layernorm`: x += γ ⊙ y in f32, then LN(x) as T). The patch embedding,
//!     the residual stream, pooling, the final norm and fc_norm and every linear layer outside
//!     the blocks (the head, MIM's lm_head) stay f32: they are a sliver of the FLOPs and their
//!     outputs are what OOD scores read.
//!
//! The training executor (`super::cuda_train`) runs the `*_ref` ops of `ops`: f32 LayerNorm
//! outputs and the cuBLAS linears, as before the fused passes.
//!
//! Every activation is counted by a meter (live and peak bytes), so that the memory a batch
//! needs is this executor's own buffer plan, measured (`super::cuda_model`), not a second model.
//!
//! Files: this one holds the executor and its `Exec`; `values` the activations and their meter,
//! `params` the parameters on the device (uploads, T copies, derived tensors, training masters),
//! `ops` the ops on borrowed values that `Exec` and the training executor both run.

use std::any::Any;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::attention::Dims as AttDims;
use crate::backend::cuda::device::cuda_err;
use crate::backend::cuda::{self as cu, CudaDevice};
use crate::backend::{Activation, Pool};
use crate::error::{Error, Result};
use crate::model::cuda_attention::{AttentionPath, Compute, Workspace};
use crate::model::exec::Exec;
use crate::model::layers::{Linear, Norm, Param, RelBias};
use crate::tensor::Tensor;

mod ops;
mod params;
mod values;

pub(in crate::model) use values::{Data, Lease};
pub use values::{DeviceValue, Meter};

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
    /// The relative-position index per table on the device, for the dense bias's gather.
    relpos_gather: HashMap<String, cu::relpos::RelposGather>,
    /// Training: attention's kept probabilities and backward scratch, reused across steps.
    pub(super) train_scratch: crate::model::cuda_train::TrainScratch<T>,
    /// Images already on the device that `input` copies from (benchmarks time the forward
    /// without the host-to-device transfer).
    staged: Option<(Vec<usize>, CudaSlice<f32>)>,
    /// cuBLASLt for the blocks' linears without activation (the bias in the GEMM's epilogue).
    lt: LtState,
    /// cuBLASLt had no algorithm for a shape (cuBLAS and a bias pass ran instead); said once.
    lt_refused: bool,
}

/// The executor's cuBLASLt: not made yet, made (with its workspace's lease), or unavailable.
enum LtState {
    Untried,
    Ready { lt: cu::lt::Lt, _lease: Lease },
    Unavailable,
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
            relpos_gather: HashMap::new(),
            train_scratch: Default::default(),
            masters: HashMap::new(),
            lt: LtState::Untried,
            lt_refused: false,
        }
    }

    /// Uploads `images` once; each later `input` of that shape copies them on the device.
    pub fn stage_input(&mut self, images: &Tensor) -> Result<()> {
        let up = self.dev.upload(images.as_slice())?;
        self.staged = Some((images.shape().to_vec(), up));
        Ok(())
    }

    /// Puts `staged` in place of the staged images, returning what was there: a graphed forward
    /// lends its own input buffer for the capture (`super::cuda_model`).
    pub fn swap_staged(
        &mut self,
        staged: Option<(Vec<usize>, CudaSlice<f32>)>,
    ) -> Option<(Vec<usize>, CudaSlice<f32>)> {
        std::mem::replace(&mut self.staged, staged)
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

/// Whether a LayerNorm feeds a T GEMM: the transformer blocks' norm1 and norm2 (their output is
/// stored as T); the final norm and fc_norm stay f32.
pub(super) fn norm_in_blocks(n: &Norm) -> bool {
    n.w.name.starts_with("blocks.")
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
        match norm_in_blocks(norm) {
            true => self.layernorm_low(x, norm, eps),
            false => self.layernorm_ref(x, norm, eps),
        }
    }

    fn linear(
        &mut self,
        x: &DeviceValue<T>,
        l: &Linear,
        act: Activation,
    ) -> Result<DeviceValue<T>> {
        // The blocks' qkv, proj and fc2: the bias in cuBLASLt's epilogue where it takes the shape.
        if act == Activation::None && in_blocks(l) && l.bias.tensor().is_some() {
            if let Some(y) = self.linear_lt(x, l)? {
                return Ok(y);
            }
        }
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

    fn residual_layernorm(
        &mut self,
        mut x: DeviceValue<T>,
        y: DeviceValue<T>,
        gamma: Option<&Param>,
        _block: usize,
        norm: &Norm,
        eps: f32,
    ) -> Result<(DeviceValue<T>, DeviceValue<T>)> {
        if norm_in_blocks(norm) && matches!(y.data, Data::Low(_)) {
            let h = self.residual_layernorm_into(&mut x, &y, gamma, norm, eps)?;
            return Ok((x, h));
        }
        // A norm outside the blocks keeps its f32 output: the two ops apart.
        self.residual_into(&mut x, &y, gamma)?;
        let h = self.layernorm_ref(&x, norm, eps)?;
        Ok((x, h))
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
