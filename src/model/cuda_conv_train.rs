//! `ConvTrainExec` on one CUDA device: resnet_train.rs's training forward and backward run here
//! unchanged, each op a launcher of backend/cuda/{conv,conv_grad,elementwise}.rs. The encoder's
//! parameters (convolution weights as [Cout, kh, kw, Cin], BatchNorm γ, β and running statistics)
//! and SGD's momentum buffers live on the device for the whole run; a step's host traffic is the
//! images up, the pooled features and the last map down, and their gradients up. The host sees
//! the parameters again only at `download` (a checkpoint). All f32.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::backend::cpu::conv::{weight_to_hwc, Conv, PoolPad};
use crate::backend::cuda::conv_grad::{self as cg, BatchNormSaved};
use crate::backend::cuda::device::cuda_err;
use crate::backend::cuda::{self as cu, CudaDevice};
use crate::error::{Error, Result};
use crate::model::conv_exec::Nhwc;
use crate::model::conv_train_exec::{hwc_to_oihw, param, ConvTrainExec};
use crate::model::resnet_train::ResNetTrain;
use crate::tensor::Tensor;

const BN_PARTS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

pub struct CudaConvTrain {
    dev: Arc<CudaDevice>,
    /// The encoder's parameters by checkpoint name; a convolution weight as [Cout, kh, kw, Cin].
    params: HashMap<String, CudaSlice<f32>>,
    /// SGD's momentum buffers, in their parameter's layout, once a step has made them.
    momentum: HashMap<String, CudaSlice<f32>>,
    /// Each convolution weight's geometry (its layout on the way back to the host).
    convs: HashMap<String, Conv>,
}

impl CudaConvTrain {
    /// Uploads `net`'s parameters from `params` (checked against its shapes) and the momentum
    /// buffers `momentum` holds for them.
    pub fn new(
        dev: Arc<CudaDevice>,
        net: &ResNetTrain,
        params: &BTreeMap<String, Tensor>,
        momentum: &BTreeMap<String, Vec<f32>>,
    ) -> Result<CudaConvTrain> {
        let mut ex = CudaConvTrain {
            dev,
            params: HashMap::new(),
            momentum: HashMap::new(),
            convs: HashMap::new(),
        };
        for u in net.units() {
            let cv = u.cv;
            let name = format!("{}.weight", u.conv);
            let w = param(params, &name, &[cv.cout, cv.cin, cv.k, cv.k])?;
            let to_hwc = |v: &[f32]| weight_to_hwc(v, cv.cout, cv.cin, cv.k);
            ex.params.insert(name.clone(), ex.dev.upload(&to_hwc(w))?);
            if let Some(m) = momentum.get(&name) {
                ex.momentum.insert(name.clone(), ex.dev.upload(&to_hwc(m))?);
            }
            ex.convs.insert(name, cv);
            for part in BN_PARTS {
                let name = format!("{}.{part}", u.bn);
                let v = param(params, &name, &[cv.cout])?;
                ex.params.insert(name.clone(), ex.dev.upload(v)?);
                if let Some(m) = momentum.get(&name) {
                    ex.momentum.insert(name, ex.dev.upload(m)?);
                }
            }
        }
        Ok(ex)
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    fn get(&self, name: &str) -> Result<&CudaSlice<f32>> {
        self.params
            .get(name)
            .ok_or_else(|| Error::Usage(format!("training a ResNet needs `{name}`")))
    }

    /// torch.optim.SGD on the device (`train::mode::sgd_update`'s step): every parameter with a
    /// gradient in `grads` (in name order), its momentum buffer made at zero on first use.
    pub fn sgd(
        &mut self,
        grads: &HashMap<String, CudaSlice<f32>>,
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    ) -> Result<()> {
        let mut names: Vec<&String> = grads.keys().collect();
        names.sort();
        for name in names {
            let g = &grads[name];
            let w = self.params.get_mut(name).ok_or_else(|| {
                Error::Cuda(format!("a gradient of `{name}`, which is not a parameter"))
            })?;
            if !self.momentum.contains_key(name) {
                self.momentum.insert(name.clone(), self.dev.zeros(g.len())?);
            }
            let buf = self.momentum.get_mut(name).expect("inserted above");
            cg::sgd_momentum(&self.dev, w, g, buf, lr, momentum, weight_decay)?;
        }
        Ok(())
    }

    /// The device's parameters and momentum buffers into the host maps, in the checkpoint's
    /// layout (a convolution weight as [Cout, Cin, kh, kw]).
    pub fn download(
        &self,
        params: &mut BTreeMap<String, Tensor>,
        momentum: &mut BTreeMap<String, Vec<f32>>,
    ) -> Result<()> {
        let host = |name: &str, d: &CudaSlice<f32>| -> Result<Vec<f32>> {
            let v = self.dev.download(d)?;
            Ok(match self.convs.get(name) {
                Some(cv) => hwc_to_oihw(&v, cv.cout, cv.cin, cv.k),
                None => v,
            })
        };
        for (name, d) in &self.params {
            let v = host(name, d)?;
            let shape = params
                .get(name)
                .map_or_else(|| vec![v.len()], |t| t.shape().to_vec());
            params.insert(name.clone(), Tensor::from_vec(&shape, v)?);
        }
        for (name, d) in &self.momentum {
            momentum.insert(name.clone(), host(name, d)?);
        }
        Ok(())
    }

    fn map(&self, d: Nhwc) -> Result<CudaSlice<f32>> {
        cu::device::nonempty(&format!("map {d:?}"), d.len())?;
        self.dev.empty::<f32>(d.len())
    }
}

fn nhwc(d: Nhwc) -> (usize, usize, usize, usize) {
    (d.b, d.h, d.w, d.c)
}

impl ConvTrainExec for CudaConvTrain {
    type S = CudaSlice<f32>;
    type BnSaved = BatchNormSaved;

    fn len(x: &CudaSlice<f32>) -> usize {
        x.len()
    }

    fn upload(&mut self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.dev.upload(host)
    }

    fn download(&mut self, x: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.dev.download(x)
    }

    fn copy(&mut self, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        self.dev.stream().clone_dtod(x).map_err(cuda_err("copy"))
    }

    fn input(&mut self, images: &Tensor) -> Result<CudaSlice<f32>> {
        let [b, c, h, w] = *images.shape() else {
            return Err(Error::Data(format!(
                "expected images [B, C, H, W], got {:?}",
                images.shape()
            )));
        };
        let x = self.dev.upload(images.as_slice())?;
        let mut y = self.map(Nhwc { b, h, w, c })?;
        cu::conv::nchw_to_nhwc(&self.dev, &x, &mut y, (b, c, h, w))?;
        Ok(y)
    }

    fn conv2d(
        &mut self,
        x: &CudaSlice<f32>,
        d: Nhwc,
        weight: &str,
        cv: &Conv,
    ) -> Result<CudaSlice<f32>> {
        let w = self.get(weight)?;
        cu::conv::conv2d::<f32>(&self.dev, x, (d.b, d.h, d.w), w, cv, None, None, false)
    }

    fn batch_norm_train(
        &mut self,
        x: &CudaSlice<f32>,
        bn: &str,
        c: usize,
        momentum: f32,
        eps: f32,
    ) -> Result<(CudaSlice<f32>, BatchNormSaved)> {
        let (rm_name, rv_name) = (format!("{bn}.running_mean"), format!("{bn}.running_var"));
        // Out of the map while the launcher writes them, back in whatever it returns.
        let mut rm = self.params.remove(&rm_name);
        let mut rv = self.params.remove(&rv_name);
        let out = match (&mut rm, &mut rv) {
            (Some(rm), Some(rv)) => {
                let gamma = self.get(&format!("{bn}.weight"))?;
                let beta = self.get(&format!("{bn}.bias"))?;
                cg::batch_norm_train(&self.dev, x, c, (gamma, beta), (rm, rv), momentum, eps)
            }
            _ => Err(Error::Usage(format!(
                "training a ResNet needs `{rm_name}` and `{rv_name}`"
            ))),
        };
        for (name, v) in [(rm_name, rm), (rv_name, rv)] {
            if let Some(v) = v {
                self.params.insert(name, v);
            }
        }
        out
    }

    fn relu(&mut self, x: &mut CudaSlice<f32>) -> Result<()> {
        cg::relu(&self.dev, x)
    }

    fn add(&mut self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<()> {
        cu::elementwise::add_assign(&self.dev, acc, x)
    }

    fn max_pool(
        &mut self,
        x: &CudaSlice<f32>,
        d: Nhwc,
        (k, s, p): (usize, usize, usize),
    ) -> Result<CudaSlice<f32>> {
        let out = crate::model::conv_exec::window_out(d, d.c, (k, s, p));
        let mut y = self.map(out)?;
        cu::conv::max_pool(&self.dev, x, &mut y, nhwc(d), (k, s, p), PoolPad::NegInf)?;
        Ok(y)
    }

    fn mean_hw(&mut self, x: &CudaSlice<f32>, d: Nhwc) -> Result<CudaSlice<f32>> {
        let mut y = self.dev.empty::<f32>(d.b * d.c)?;
        cu::conv::mean_hw(&self.dev, x, &mut y, (d.b, d.h * d.w, d.c))?;
        Ok(y)
    }

    fn batch_norm_backward(
        &mut self,
        dy: &CudaSlice<f32>,
        bn: &str,
        c: usize,
        saved: &BatchNormSaved,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let gamma = self.get(&format!("{bn}.weight"))?;
        cg::batch_norm_backward(&self.dev, dy, c, gamma, saved)
    }

    fn conv2d_backward(
        &mut self,
        x: &CudaSlice<f32>,
        d: Nhwc,
        weight: &str,
        cv: &Conv,
        dy: &CudaSlice<f32>,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let w = self.get(weight)?;
        cg::conv2d_backward(&self.dev, x, (d.b, d.h, d.w), w, cv, dy)
    }

    fn relu_backward(&mut self, y: &CudaSlice<f32>, dy: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
        cg::relu_backward(&self.dev, y, dy)
    }

    fn max_pool_backward(
        &mut self,
        x: &CudaSlice<f32>,
        d: Nhwc,
        window: (usize, usize, usize),
        dy: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        cg::max_pool_backward(&self.dev, x, nhwc(d), window, dy)
    }

    fn mean_hw_backward(&mut self, dy: &CudaSlice<f32>, d: Nhwc) -> Result<CudaSlice<f32>> {
        cg::mean_hw_backward(&self.dev, dy, nhwc(d))
    }
}
