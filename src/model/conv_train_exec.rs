//! The op set a ResNet's training forward and backward (resnet_train.rs) run on: written once over
//! `ConvTrainExec`, executed by `CpuConvTrain` (below: backend/cpu/{conv,conv_grad}.rs on host
//! vectors) and `cuda_conv_train::CudaConvTrain` (kernels on one device, parameters and the SGD
//! state kept there). Maps are NHWC [B, H, W, C] f32. Parameters are named as in the checkpoint
//! (a convolution by its `….weight`, a BatchNorm by its prefix) and held by the executor; a
//! convolution weight's gradient comes back in the layout the executor holds the weight in
//! (`CpuConvTrain`: the checkpoint's [Cout, Cin, kh, kw]).

use std::collections::BTreeMap;

use crate::backend::cpu::conv::{self, Conv, Epilogue};
use crate::backend::cpu::conv_grad::{self, BatchNormSaved};
use crate::error::{Error, Result};
use crate::model::conv_exec::Nhwc;
use crate::tensor::Tensor;

pub trait ConvTrainExec {
    /// A map, a vector of features or a parameter's gradient (f32).
    type S;
    /// What BatchNorm's backward reads from its training forward.
    type BnSaved;

    fn len(x: &Self::S) -> usize;
    fn upload(&mut self, host: &[f32]) -> Result<Self::S>;
    fn download(&mut self, x: &Self::S) -> Result<Vec<f32>>;
    /// A second buffer with x's values.
    fn copy(&mut self, x: &Self::S) -> Result<Self::S>;

    // --- forward ---------------------------------------------------------------------------
    /// images [B, C, H, W] (NCHW, checked by the caller) → NHWC.
    fn input(&mut self, images: &Tensor) -> Result<Self::S>;
    /// conv(x) with the weight `weight` (no bias), zero padding; x [dims], dims.c = cv.cin.
    fn conv2d(&mut self, x: &Self::S, dims: Nhwc, weight: &str, cv: &Conv) -> Result<Self::S>;
    /// BatchNorm `bn` on its batch statistics over x [rows, c]; its running statistics move by
    /// `momentum` (held by the executor).
    fn batch_norm_train(
        &mut self,
        x: &Self::S,
        bn: &str,
        c: usize,
        momentum: f32,
        eps: f32,
    ) -> Result<(Self::S, Self::BnSaved)>;
    /// max(x, 0) in place.
    fn relu(&mut self, x: &mut Self::S) -> Result<()>;
    /// acc += x.
    fn add(&mut self, acc: &mut Self::S, x: &Self::S) -> Result<()>;
    /// Max pooling, window (k, stride, padding) with padded taps never winning.
    fn max_pool(
        &mut self,
        x: &Self::S,
        dims: Nhwc,
        window: (usize, usize, usize),
    ) -> Result<Self::S>;
    /// The mean over H·W: [B, C].
    fn mean_hw(&mut self, x: &Self::S, dims: Nhwc) -> Result<Self::S>;

    // --- backward --------------------------------------------------------------------------
    /// (dx, dγ, dβ) of BatchNorm `bn` from dy [rows, c].
    fn batch_norm_backward(
        &mut self,
        dy: &Self::S,
        bn: &str,
        c: usize,
        saved: &Self::BnSaved,
    ) -> Result<(Self::S, Self::S, Self::S)>;
    /// (dx, dweight) of `conv2d(x, dims, weight, cv)` from dy.
    fn conv2d_backward(
        &mut self,
        x: &Self::S,
        dims: Nhwc,
        weight: &str,
        cv: &Conv,
        dy: &Self::S,
    ) -> Result<(Self::S, Self::S)>;
    /// dy where the ReLU's output y > 0, else 0.
    fn relu_backward(&mut self, y: &Self::S, dy: &Self::S) -> Result<Self::S>;
    fn max_pool_backward(
        &mut self,
        x: &Self::S,
        dims: Nhwc,
        window: (usize, usize, usize),
        dy: &Self::S,
    ) -> Result<Self::S>;
    /// dy [B, C] spread evenly over the map [dims].
    fn mean_hw_backward(&mut self, dy: &Self::S, dims: Nhwc) -> Result<Self::S>;
}

/// `params[name]`, checked to have `shape`.
pub fn param<'p>(
    params: &'p BTreeMap<String, Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<&'p [f32]> {
    let t = params
        .get(name)
        .ok_or_else(|| Error::Usage(format!("training a ResNet needs `{name}`")))?;
    if t.shape() != shape {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: shape.to_vec(),
            got: t.shape().to_vec(),
            file: None,
        });
    }
    Ok(t.as_slice())
}

/// [Cout, kh, kw, Cin] (the executors' layout) back to torch's [Cout, Cin, kh, kw].
pub fn hwc_to_oihw(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    for o in 0..cout {
        for c in 0..cin {
            for i in 0..k {
                for j in 0..k {
                    out[((o * cin + c) * k + i) * k + j] = w[((o * k + i) * k + j) * cin + c];
                }
            }
        }
    }
    out
}

/// The CPU executor over host parameters (read, never written): each op is the CPU op resnet_train
/// called before this trait existed, so the results keep those ops' bits. The running statistics
/// after the batch collect in `running` (the parameters stay as they were).
pub struct CpuConvTrain<'p> {
    params: &'p BTreeMap<String, Tensor>,
    /// Each BatchNorm's (`….running_mean`, `….running_var`) after the batch, in forward order.
    pub running: Vec<(String, Vec<f32>)>,
}

impl<'p> CpuConvTrain<'p> {
    pub fn new(params: &'p BTreeMap<String, Tensor>) -> CpuConvTrain<'p> {
        CpuConvTrain {
            params,
            running: Vec::new(),
        }
    }

    /// The weight [Cout, Cin, k, k] in the CPU layout [Cout, k, k, Cin].
    fn weight_hwc(&self, name: &str, cv: &Conv) -> Result<Vec<f32>> {
        let w = param(self.params, name, &[cv.cout, cv.cin, cv.k, cv.k])?;
        Ok(conv::weight_to_hwc(w, cv.cout, cv.cin, cv.k))
    }
}

fn nhwc(d: Nhwc) -> (usize, usize, usize, usize) {
    (d.b, d.h, d.w, d.c)
}

impl ConvTrainExec for CpuConvTrain<'_> {
    type S = Vec<f32>;
    type BnSaved = BatchNormSaved;

    fn len(x: &Vec<f32>) -> usize {
        x.len()
    }

    fn upload(&mut self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn download(&mut self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn copy(&mut self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn input(&mut self, images: &Tensor) -> Result<Vec<f32>> {
        let [b, c, h, w] = images.shape() else {
            return Err(Error::Data(format!(
                "expected images [B, C, H, W], got {:?}",
                images.shape()
            )));
        };
        Ok(conv::nchw_to_nhwc(images.as_slice(), *b, *c, *h, *w))
    }

    fn conv2d(&mut self, x: &Vec<f32>, d: Nhwc, weight: &str, cv: &Conv) -> Result<Vec<f32>> {
        let w = self.weight_hwc(weight, cv)?;
        Ok(conv::conv2d(
            x,
            (d.b, d.h, d.w),
            &w,
            cv,
            &Epilogue::default(),
        ))
    }

    fn batch_norm_train(
        &mut self,
        x: &Vec<f32>,
        bn: &str,
        c: usize,
        momentum: f32,
        eps: f32,
    ) -> Result<(Vec<f32>, BatchNormSaved)> {
        let p = |what: &str| param(self.params, &format!("{bn}.{what}"), &[c]);
        let (gamma, beta) = (p("weight")?, p("bias")?);
        let mut rm = p("running_mean")?.to_vec();
        let mut rv = p("running_var")?.to_vec();
        let out =
            conv_grad::batch_norm_train(x, c, (gamma, beta), (&mut rm, &mut rv), momentum, eps);
        self.running.push((format!("{bn}.running_mean"), rm));
        self.running.push((format!("{bn}.running_var"), rv));
        Ok(out)
    }

    fn relu(&mut self, x: &mut Vec<f32>) -> Result<()> {
        x.iter_mut().for_each(|v| *v = v.max(0.0));
        Ok(())
    }

    fn add(&mut self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        acc.iter_mut().zip(x).for_each(|(a, s)| *a += s);
        Ok(())
    }

    fn max_pool(
        &mut self,
        x: &Vec<f32>,
        d: Nhwc,
        (k, s, p): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        Ok(conv::max_pool(x, nhwc(d), k, s, p))
    }

    fn mean_hw(&mut self, x: &Vec<f32>, d: Nhwc) -> Result<Vec<f32>> {
        Ok(conv::mean_hw(x, nhwc(d)))
    }

    fn batch_norm_backward(
        &mut self,
        dy: &Vec<f32>,
        bn: &str,
        c: usize,
        saved: &BatchNormSaved,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let gamma = param(self.params, &format!("{bn}.weight"), &[c])?;
        Ok(conv_grad::batch_norm_backward(dy, c, gamma, saved))
    }

    fn conv2d_backward(
        &mut self,
        x: &Vec<f32>,
        d: Nhwc,
        weight: &str,
        cv: &Conv,
        dy: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let w = self.weight_hwc(weight, cv)?;
        let (dx, dw, _) = conv_grad::conv2d_backward(x, (d.b, d.h, d.w), &w, cv, dy);
        Ok((dx, hwc_to_oihw(&dw, cv.cout, cv.cin, cv.k)))
    }

    fn relu_backward(&mut self, y: &Vec<f32>, dy: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(conv_grad::relu_backward(y, dy))
    }

    fn max_pool_backward(
        &mut self,
        x: &Vec<f32>,
        d: Nhwc,
        window: (usize, usize, usize),
        dy: &Vec<f32>,
    ) -> Result<Vec<f32>> {
        Ok(conv_grad::max_pool_backward(x, nhwc(d), window, dy))
    }

    fn mean_hw_backward(&mut self, dy: &Vec<f32>, d: Nhwc) -> Result<Vec<f32>> {
        Ok(conv_grad::mean_hw_backward(dy, nhwc(d)))
    }
}
