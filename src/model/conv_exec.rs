//! How a convolutional net's forward (ResNet, BiT) is executed: the forward is written once over
//! this op set, `ConvInfer` runs the CPU ops of backend/cpu/{conv,groupnorm}.rs, and
//! `cuda_conv::CudaConvExec` runs kernels/{conv,groupnorm}.cu and cuBLAS with the activations kept
//! on the device. Activations are NHWC maps [B, H, W, C] (the CPU layout: a kernel tap reads C
//! contiguous values and a GEMM's output rows are already NHWC). A residual add and its ReLU are
//! the epilogue of the convolution that ends the branch, as on the CPU.

pub use crate::backend::cpu::conv::PoolPad;
use crate::backend::cpu::conv::{self, Conv, Epilogue};
use crate::backend::cpu::groupnorm;
use crate::error::{Error, Result};
use crate::model::Output;
use crate::tensor::Tensor;

/// The shape of an NHWC map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nhwc {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Nhwc {
    pub fn len(&self) -> usize {
        self.b * self.h * self.w * self.c
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An activation map: its shape and its storage (a host Vec, a device buffer).
pub struct Map<S> {
    pub dims: Nhwc,
    pub data: S,
}

/// A convolution's parameters as the executors take them: the checkpoint name it is found again
/// by (a device uploads it once), its geometry, the weight [Cout, kh, kw, Cin] and an optional
/// bias [Cout] (a folded BatchNorm).
pub struct ConvParams<'a> {
    pub name: &'a str,
    pub cv: &'a Conv,
    pub w: &'a [f32],
    pub b: Option<&'a [f32]>,
}

/// GroupNorm's affine parameters [C], its group count and ε, under its checkpoint name.
pub struct GroupNormParams<'a> {
    pub name: &'a str,
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub groups: usize,
    pub eps: f32,
}

/// A linear head: weight [classes, F], bias [classes], under its checkpoint name.
pub struct Head<'a> {
    pub name: &'a str,
    pub fc: &'a (Tensor, Tensor),
}

pub trait ConvExec {
    /// A map's storage.
    type S;
    /// images [B, C, H, W] (NCHW, normalised) → the NHWC map.
    fn input(&mut self, images: &Tensor) -> Result<Map<Self::S>>;
    /// act(conv(x) + bias (+ residual)), act = ReLU when `relu`; zero padding.
    fn conv2d(
        &mut self,
        x: &Map<Self::S>,
        p: &ConvParams,
        residual: Option<&Map<Self::S>>,
        relu: bool,
    ) -> Result<Map<Self::S>>;
    /// Max pooling: window (k, stride s, padding p).
    fn max_pool(
        &mut self,
        x: &Map<Self::S>,
        window: (usize, usize, usize),
        pad: PoolPad,
    ) -> Result<Map<Self::S>>;
    /// GroupNorm per image, then ReLU when `relu`.
    fn group_norm(
        &mut self,
        x: &Map<Self::S>,
        gn: &GroupNormParams,
        relu: bool,
    ) -> Result<Map<Self::S>>;
    /// Global average pooling to the features [B, C] and the head's logits, on the host.
    fn pool_and_classify(&mut self, x: &Map<Self::S>, head: Option<Head>) -> Result<Output>;
    /// The map as host local tokens [B, H·W, C].
    fn to_host(&mut self, x: &Map<Self::S>) -> Result<Tensor>;
}

/// The `[B, C, H, W]` of `images`, checked against the model's input channels.
pub fn image_dims(images: &Tensor, in_chans: usize, model: &str) -> Result<Nhwc> {
    match images.shape() {
        [b, c, h, w] if *c == in_chans && *h > 0 && *w > 0 => Ok(Nhwc {
            b: *b,
            h: *h,
            w: *w,
            c: *c,
        }),
        other => Err(Error::Data(format!(
            "{model} expects images [B, {in_chans}, H, W], got {other:?}"
        ))),
    }
}

/// The output shape of a window (k, s, p) over `d`.
pub fn window_out(d: Nhwc, c: usize, (k, s, p): (usize, usize, usize)) -> Nhwc {
    let size = |n: usize| (n + 2 * p).checked_sub(k).map_or(0, |r| r / s + 1);
    Nhwc {
        b: d.b,
        h: size(d.h),
        w: size(d.w),
        c,
    }
}

/// The CPU executor: each op is the backend/cpu op the models called before this trait existed,
/// so the results are those ops' bits.
pub struct ConvInfer;

impl ConvExec for ConvInfer {
    type S = Vec<f32>;

    fn input(&mut self, images: &Tensor) -> Result<Map<Vec<f32>>> {
        let [b, c, h, w] = images.shape() else {
            return Err(Error::Data(format!(
                "expected images [B, C, H, W], got {:?}",
                images.shape()
            )));
        };
        let data = conv::nchw_to_nhwc(images.as_slice(), *b, *c, *h, *w);
        Ok(Map {
            dims: Nhwc {
                b: *b,
                h: *h,
                w: *w,
                c: *c,
            },
            data,
        })
    }

    fn conv2d(
        &mut self,
        x: &Map<Vec<f32>>,
        p: &ConvParams,
        residual: Option<&Map<Vec<f32>>>,
        relu: bool,
    ) -> Result<Map<Vec<f32>>> {
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
        let ep = Epilogue {
            bias: p.b,
            residual: residual.map(|r| r.data.as_slice()),
            relu,
        };
        let data = conv::conv2d(&x.data, (d.b, d.h, d.w), p.w, p.cv, &ep);
        Ok(Map { dims: out, data })
    }

    fn max_pool(
        &mut self,
        x: &Map<Vec<f32>>,
        (k, s, p): (usize, usize, usize),
        pad: PoolPad,
    ) -> Result<Map<Vec<f32>>> {
        let d = x.dims;
        let out = window_out(d, d.c, (k, s, p));
        let data = match pad {
            PoolPad::NegInf => conv::max_pool(&x.data, (d.b, d.h, d.w, d.c), k, s, p),
            PoolPad::Zero => {
                let padded = pad_zero(&x.data, (d.b, d.h, d.w, d.c), p);
                conv::max_pool(&padded, (d.b, d.h + 2 * p, d.w + 2 * p, d.c), k, s, 0)
            }
        };
        Ok(Map { dims: out, data })
    }

    fn group_norm(
        &mut self,
        x: &Map<Vec<f32>>,
        gn: &GroupNormParams,
        relu: bool,
    ) -> Result<Map<Vec<f32>>> {
        let d = x.dims;
        if gn.gamma.len() != d.c || gn.groups == 0 || d.c % gn.groups != 0 {
            return Err(Error::Data(format!(
                "{}: {} channels in {} groups cannot take a map {d:?}",
                gn.name,
                gn.gamma.len(),
                gn.groups
            )));
        }
        let data = groupnorm::group_norm(
            &x.data,
            (d.b, d.h * d.w, d.c),
            gn.groups,
            (gn.gamma, gn.beta),
            gn.eps,
            relu,
        );
        Ok(Map { dims: d, data })
    }

    fn pool_and_classify(&mut self, x: &Map<Vec<f32>>, head: Option<Head>) -> Result<Output> {
        super::resnet::pool_and_classify(&x.data, x.dims.b, x.dims.c, head.map(|h| h.fc))
    }

    fn to_host(&mut self, x: &Map<Vec<f32>>) -> Result<Tensor> {
        let d = x.dims;
        Tensor::from_vec(&[d.b, d.h * d.w, d.c], x.data.clone())
    }
}

/// x [B, H, W, C] with `p` rows and columns of zeros around each image.
fn pad_zero(x: &[f32], (b, h, w, c): (usize, usize, usize, usize), p: usize) -> Vec<f32> {
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let mut out = vec![0.0f32; b * hp * wp * c];
    for bi in 0..b {
        for y in 0..h {
            let src = ((bi * h + y) * w) * c;
            let dst = ((bi * hp + y + p) * wp + p) * c;
            out[dst..dst + w * c].copy_from_slice(&x[src..src + w * c]);
        }
    }
    out
}
