//! The device memory a ResNet or BiT forward takes on `CudaConvExec`, counted without a device: a
//! `ConvExec` whose maps are only byte counts, run through the net's own forward, so the count
//! follows the same ops in the same order. Each op holds what the CUDA executor allocates for it
//! (backend/cuda/conv.rs: the f32 accumulator, the im2col rows in T in chunks of at most
//! `MAX_COLS_BYTES`, the output map; the uploaded input beside its NHWC copy; the pooled features
//! and logits), and a map is given back when the forward drops it, as the stream-ordered pool
//! gets it back. Parameters count once each, by checkpoint name. cuBLAS's workspace and the
//! allocator's rounding are what `HEADROOM_BYTES` is for.

use std::cell::Cell;
use std::collections::HashSet;
use std::marker::PhantomData;
use std::rc::Rc;

use crate::backend::cuda::conv::MAX_COLS_BYTES;
use crate::backend::cuda::Storage;
use crate::error::Result;
use crate::model::conv_exec::{
    window_out, ConvExec, ConvParams, GroupNormParams, Head, Map, Nhwc, PoolPad,
};
use crate::model::cuda_conv::ConvNet;
use crate::model::Output;
use crate::tensor::Tensor;

const F32: usize = std::mem::size_of::<f32>();

/// Live and peak bytes of the maps and scratch.
#[derive(Default)]
struct Counter {
    live: Cell<usize>,
    peak: Cell<usize>,
}

impl Counter {
    /// Bytes held until the returned value drops.
    fn hold(self: &Rc<Self>, bytes: usize) -> Held {
        let live = self.live.get() + bytes;
        self.live.set(live);
        self.peak.set(self.peak.get().max(live));
        Held {
            bytes,
            counter: Rc::clone(self),
        }
    }

    /// Bytes held for the length of one call, on top of what is live.
    fn briefly(&self, bytes: usize) {
        self.peak.set(self.peak.get().max(self.live.get() + bytes));
    }
}

/// A map's bytes, given back when it drops.
pub struct Held {
    bytes: usize,
    counter: Rc<Counter>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counter.live.set(self.counter.live.get() - self.bytes);
    }
}

struct CountingExec<T> {
    counter: Rc<Counter>,
    params: HashSet<String>,
    param_bytes: usize,
    _t: PhantomData<T>,
}

impl<T: Storage> CountingExec<T> {
    fn param(&mut self, name: String, bytes: usize) {
        if self.params.insert(name) {
            self.param_bytes += bytes;
        }
    }
}

impl<T: Storage> ConvExec for CountingExec<T> {
    type S = Held;

    fn input(&mut self, images: &Tensor) -> Result<Map<Held>> {
        let s = images.shape();
        let dims = Nhwc {
            b: s[0],
            c: s[1],
            h: s[2],
            w: s[3],
        };
        // The upload and its NHWC copy are both live until the upload is dropped.
        self.counter.briefly(2 * dims.len() * F32);
        Ok(Map {
            dims,
            data: self.counter.hold(dims.len() * F32),
        })
    }

    fn conv2d(
        &mut self,
        x: &Map<Held>,
        p: &ConvParams,
        _residual: Option<&Map<Held>>,
        _relu: bool,
    ) -> Result<Map<Held>> {
        let (d, cv) = (x.dims, p.cv);
        let t = std::mem::size_of::<T>();
        self.param(p.name.to_string(), cv.cout * cv.patch_len() * t);
        if p.b.is_some() {
            self.param(format!("{}.bias", p.name), cv.cout * F32);
        }
        let out = window_out(d, cv.cout, (cv.k, cv.stride, cv.pad));
        let (rows, k) = (out.b * out.h * out.w, cv.patch_len());
        let cols = if cv.k == 1 && cv.stride == 1 && cv.pad == 0 {
            if T::NAME == "f32" {
                0
            } else {
                rows * k * t
            }
        } else {
            let per_image = out.h * out.w * k;
            let chunk = (MAX_COLS_BYTES / (per_image * t).max(1)).clamp(1, d.b.max(1));
            chunk * per_image * t
        };
        // The accumulator lives through the call; the im2col rows go before the output comes.
        let acc = rows * cv.cout * F32;
        self.counter.briefly(acc + cols.max(out.len() * F32));
        Ok(Map {
            dims: out,
            data: self.counter.hold(out.len() * F32),
        })
    }

    fn max_pool(
        &mut self,
        x: &Map<Held>,
        (k, s, p): (usize, usize, usize),
        _pad: PoolPad,
    ) -> Result<Map<Held>> {
        let out = window_out(x.dims, x.dims.c, (k, s, p));
        Ok(Map {
            dims: out,
            data: self.counter.hold(out.len() * F32),
        })
    }

    fn group_norm(
        &mut self,
        x: &Map<Held>,
        gn: &GroupNormParams,
        _relu: bool,
    ) -> Result<Map<Held>> {
        self.param(format!("{}.weight", gn.name), gn.gamma.len() * F32);
        self.param(format!("{}.bias", gn.name), gn.beta.len() * F32);
        Ok(Map {
            dims: x.dims,
            data: self.counter.hold(x.dims.len() * F32),
        })
    }

    fn pool_and_classify(&mut self, x: &Map<Held>, head: Option<Head>) -> Result<Output> {
        let (b, f) = (x.dims.b, x.dims.c);
        let classes = head.as_ref().map_or(0, |h| h.fc.0.shape()[0]);
        if let Some(h) = &head {
            self.param(format!("{}.weight", h.name), h.fc.0.as_slice().len() * F32);
            self.param(format!("{}.bias", h.name), h.fc.1.as_slice().len() * F32);
        }
        self.counter.briefly((b * f + b * classes) * F32);
        Ok(Output {
            features: Tensor::zeros(&[b, f]),
            logits: head.map(|_| Tensor::zeros(&[b, classes])),
        })
    }

    fn to_host(&mut self, x: &Map<Held>) -> Result<Tensor> {
        let d = x.dims;
        Ok(Tensor::zeros(&[d.b, d.h * d.w, d.c]))
    }
}

/// Device bytes of one forward of `net` on `images` [B, C, H, W] at precision T: the parameters,
/// and the peak of the maps and scratch (`local`: the last map is read back too). Only the
/// images' shape is read.
pub fn forward_bytes<T: Storage>(net: ConvNet, images: &Tensor, local: bool) -> Result<usize> {
    let mut e = CountingExec::<T> {
        counter: Rc::new(Counter::default()),
        params: HashSet::new(),
        param_bytes: 0,
        _t: PhantomData,
    };
    match (net, local) {
        (ConvNet::ResNet(m), false) => m.forward_on(&mut e, images).map(drop)?,
        (ConvNet::ResNet(m), true) => m.forward_local_on(&mut e, images).map(drop)?,
        (ConvNet::Bit(m), false) => m.forward_on(&mut e, images).map(drop)?,
        (ConvNet::Bit(m), true) => m.forward_local_on(&mut e, images).map(drop)?,
    }
    Ok(e.param_bytes + e.counter.peak.get())
}
