//! The convolutional nets' `ConvExec` on one CUDA device: ResNet's and BiT's own forwards
//! (resnet.rs, bit.rs) run here unchanged, each op a launcher of backend/cuda/{conv,groupnorm}.rs.
//! Parameters are uploaded on first use and found again by their checkpoint name; the maps stay
//! on the device and the host sees the features, the logits and (forward_local) the last map.
//!
//! Precision T is the convolutions' GEMM operand type: at bf16 the weights are stored as bf16 and
//! each convolution's im2col rows are rounded to bf16 (cuBLAS GemmEx, f32 accumulation); at f32
//! it is sgemm (no TF32). The maps between ops stay f32 whatever T, as the ViT executor keeps
//! its residual stream: bias, residual and ReLU are added to the f32 accumulator, and GroupNorm,
//! max-pool, pooling and the fc layer read and write f32. Storing the maps as bf16 too was
//! measured first: BiT's GroupNorms amplify the rounding of their input (a residual stream whose
//! mean outgrows its spread), and the tiny BiT's logits moved by 1.5e-1 against the CPU.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::backend::cuda::{self as cu, CudaDevice, Storage};
use crate::backend::Activation;
use crate::error::{Error, Result};
use crate::model::bit::Bit;
use crate::model::conv_exec::{
    window_out, ConvExec, ConvParams, GroupNormParams, Head, Map, Nhwc, PoolPad,
};
use crate::model::resnet::ResNet;
use crate::model::runner::Runner;
use crate::model::Output;
use crate::tensor::Tensor;

pub struct CudaConvExec<T: Storage> {
    dev: Arc<CudaDevice>,
    /// Convolution weights [Cout, kh, kw, Cin] as T, by checkpoint name.
    weights: HashMap<String, CudaSlice<T>>,
    /// Biases, GroupNorm's γ and β, the fc layer: f32, by checkpoint key.
    f32s: HashMap<String, CudaSlice<f32>>,
}

fn upload_f32<'a>(
    dev: &CudaDevice,
    cache: &'a mut HashMap<String, CudaSlice<f32>>,
    key: String,
    host: &[f32],
) -> Result<&'a CudaSlice<f32>> {
    if !cache.contains_key(&key) {
        let d = dev.upload(host)?;
        cache.insert(key.clone(), d);
    }
    Ok(&cache[&key])
}

impl<T: Storage> CudaConvExec<T> {
    pub fn new(dev: Arc<CudaDevice>) -> CudaConvExec<T> {
        CudaConvExec {
            dev,
            weights: HashMap::new(),
            f32s: HashMap::new(),
        }
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    fn empty(&self, d: Nhwc) -> Result<CudaSlice<f32>> {
        cu::device::nonempty(&format!("map {d:?}"), d.len())?;
        self.dev.empty::<f32>(d.len())
    }
}

impl<T: Storage> ConvExec for CudaConvExec<T> {
    type S = CudaSlice<f32>;

    fn input(&mut self, images: &Tensor) -> Result<Map<CudaSlice<f32>>> {
        let [b, c, h, w] = images.shape() else {
            return Err(Error::Data(format!(
                "expected images [B, C, H, W], got {:?}",
                images.shape()
            )));
        };
        let dims = Nhwc {
            b: *b,
            h: *h,
            w: *w,
            c: *c,
        };
        let x = self.dev.upload(images.as_slice())?;
        let mut y = self.empty(dims)?;
        cu::conv::nchw_to_nhwc(&self.dev, &x, &mut y, (*b, *c, *h, *w))?;
        Ok(Map { dims, data: y })
    }

    fn conv2d(
        &mut self,
        x: &Map<CudaSlice<f32>>,
        p: &ConvParams,
        residual: Option<&Map<CudaSlice<f32>>>,
        relu: bool,
    ) -> Result<Map<CudaSlice<f32>>> {
        let d = x.dims;
        let out = window_out(d, p.cv.cout, (p.cv.k, p.cv.stride, p.cv.pad));
        if d.c != p.cv.cin || out.is_empty() {
            return Err(Error::Data(format!(
                "{}: a {:?} convolution cannot take a map {d:?}",
                p.name, p.cv
            )));
        }
        if let Some(r) = residual {
            if r.dims != out {
                return Err(Error::Data(format!(
                    "{}: residual {:?}, the output is {out:?}",
                    p.name, r.dims
                )));
            }
        }
        if !self.weights.contains_key(p.name) {
            let host: Vec<T> = p.w.iter().map(|&v| T::from_f32(v)).collect();
            let up = self.dev.upload(&host)?;
            self.weights.insert(p.name.to_string(), up);
        }
        let bias = match p.b {
            Some(b) => Some(upload_f32(
                &self.dev,
                &mut self.f32s,
                format!("{}.bias", p.name),
                b,
            )?),
            None => None,
        };
        let data = cu::conv::conv2d(
            &self.dev,
            &x.data,
            (d.b, d.h, d.w),
            &self.weights[p.name],
            p.cv,
            bias,
            residual.map(|r| &r.data),
            relu,
        )?;
        Ok(Map { dims: out, data })
    }

    fn max_pool(
        &mut self,
        x: &Map<CudaSlice<f32>>,
        (k, s, p): (usize, usize, usize),
        pad: PoolPad,
    ) -> Result<Map<CudaSlice<f32>>> {
        let d = x.dims;
        let out = window_out(d, d.c, (k, s, p));
        let mut y = self.empty(out)?;
        cu::conv::max_pool(
            &self.dev,
            &x.data,
            &mut y,
            (d.b, d.h, d.w, d.c),
            (k, s, p),
            pad,
        )?;
        Ok(Map { dims: out, data: y })
    }

    fn group_norm(
        &mut self,
        x: &Map<CudaSlice<f32>>,
        gn: &GroupNormParams,
        relu: bool,
    ) -> Result<Map<CudaSlice<f32>>> {
        let d = x.dims;
        let mut y = self.empty(d)?;
        let gk = format!("{}.weight", gn.name);
        let bk = format!("{}.bias", gn.name);
        upload_f32(&self.dev, &mut self.f32s, gk.clone(), gn.gamma)?;
        upload_f32(&self.dev, &mut self.f32s, bk.clone(), gn.beta)?;
        cu::groupnorm::group_norm(
            &self.dev,
            &x.data,
            (&self.f32s[&gk], &self.f32s[&bk]),
            &mut y,
            (d.b, d.h * d.w, d.c),
            gn.groups,
            gn.eps,
            relu,
        )?;
        Ok(Map { dims: d, data: y })
    }

    fn pool_and_classify(&mut self, x: &Map<CudaSlice<f32>>, head: Option<Head>) -> Result<Output> {
        let d = x.dims;
        let (b, f) = (d.b, d.c);
        let mut feats = self.dev.empty::<f32>(b * f)?;
        cu::conv::mean_hw(&self.dev, &x.data, &mut feats, (b, d.h * d.w, f))?;
        let logits = match head {
            Some(Head {
                name,
                fc: (w, bias),
            }) => {
                let classes = w.shape()[0];
                if w.shape() != [classes, f] {
                    return Err(Error::Data(format!(
                        "{name}: weight {:?} for {f} features",
                        w.shape()
                    )));
                }
                let wk = format!("{name}.weight");
                let bk = format!("{name}.bias");
                upload_f32(&self.dev, &mut self.f32s, wk.clone(), w.as_slice())?;
                upload_f32(&self.dev, &mut self.f32s, bk.clone(), bias.as_slice())?;
                let mut z = self.dev.empty::<f32>(b * classes)?;
                cu::matmul::linear::<f32>(
                    &self.dev,
                    &feats,
                    &self.f32s[&wk],
                    Some(&self.f32s[&bk]),
                    Activation::None,
                    &mut z,
                    (b, f, classes),
                )?;
                Some(Tensor::from_vec(&[b, classes], self.dev.download(&z)?)?)
            }
            None => None,
        };
        Ok(Output {
            features: Tensor::from_vec(&[b, f], self.dev.download(&feats)?)?,
            logits,
        })
    }

    fn to_host(&mut self, x: &Map<CudaSlice<f32>>) -> Result<Tensor> {
        let d = x.dims;
        Tensor::from_vec(&[d.b, d.h * d.w, d.c], self.dev.download(&x.data)?)
    }
}

/// The convolutional nets this executor runs.
#[derive(Clone, Copy)]
pub enum ConvNet<'m> {
    ResNet(&'m ResNet),
    Bit(&'m Bit),
}

/// A ResNet or BiT on one CUDA device: what extraction and `mood forward` drive.
pub struct CudaConvModel<'m, T: Storage> {
    pub net: ConvNet<'m>,
    pub exec: CudaConvExec<T>,
    /// Whether the first batch was checked against the free device memory.
    checked: bool,
}

impl<'m, T: Storage> CudaConvModel<'m, T> {
    /// Nothing is uploaded yet: each parameter goes to the device on its first use.
    pub fn new(dev: Arc<CudaDevice>, net: ConvNet<'m>) -> CudaConvModel<'m, T> {
        CudaConvModel {
            net,
            exec: CudaConvExec::new(dev),
            checked: false,
        }
    }

    /// Fails, before the first batch uploads anything, when a batch of `images`' shape would not
    /// fit in the device's free memory (with `HEADROOM_BYTES` kept back); the message names a
    /// batch that would, from the counts of batches of 1 and 2 (linear in the batch, so it errs
    /// low where im2col's chunking caps the scratch of large batches).
    pub fn check_batch_fits(&mut self, images: &Tensor, local: bool) -> Result<()> {
        use crate::backend::memory_budget::{batch_too_large, HEADROOM_BYTES};
        use crate::model::cuda_conv_memory::forward_bytes;
        if self.checked {
            return Ok(());
        }
        let s = images.shape();
        let need = forward_bytes::<T>(self.net, images, local)?;
        let (free, _) = self.exec.device().memory()?;
        if need + HEADROOM_BYTES > free {
            let with = |b: usize| {
                forward_bytes::<T>(self.net, &Tensor::zeros(&[b, s[1], s[2], s[3]]), local)
            };
            let (one, two) = (with(1)?, with(2)?);
            let per_image = two.saturating_sub(one).max(1);
            let fixed = one.saturating_sub(per_image) + HEADROOM_BYTES;
            return Err(Error::Cuda(batch_too_large(s[0], free, per_image, fixed)));
        }
        self.checked = true;
        Ok(())
    }
}

impl<T: Storage> Runner for CudaConvModel<'_, T> {
    fn forward(&mut self, images: &Tensor) -> Result<Output> {
        self.check_batch_fits(images, false)?;
        match self.net {
            ConvNet::ResNet(m) => m.forward_on(&mut self.exec, images),
            ConvNet::Bit(m) => m.forward_on(&mut self.exec, images),
        }
    }

    fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)> {
        self.check_batch_fits(images, true)?;
        match self.net {
            ConvNet::ResNet(m) => m.forward_local_on(&mut self.exec, images),
            ConvNet::Bit(m) => m.forward_local_on(&mut self.exec, images),
        }
    }
}
