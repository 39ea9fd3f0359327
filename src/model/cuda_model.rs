//! A `VisionTransformer` on one CUDA device: the model's own forward run by `CudaExec`, with the
//! memory a batch needs taken from that executor's buffer plan, measured, so a batch too large
//! fails before it runs and names a batch that fits.
//!
//! With graphs on (`set_graphs`; extraction turns them on unless `MOOD_CUDA_GRAPH=0`), `forward`
//! replays a CUDA graph of the whole forward for a batch shape seen before: the first batch of a
//! shape runs eagerly (uploading the parameters and making the attention workspace, host work a
//! capture cannot hold), the second is captured with the executor reading its images from a fixed
//! device buffer and the features and logits copied into fixed output buffers, and every batch of
//! that shape after it is one upload, one graph launch and one download. A batch of another shape
//! (the last, partial one) drops the graph and runs eagerly. A capture that fails is a one-line
//! note and the eager forward, never a wrong result.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::graph::DeviceGraph;
use crate::backend::cuda::CudaDevice;
use crate::backend::memory_budget::{batch_too_large, max_batch_that_fits, HEADROOM_BYTES};
use crate::error::{Error, Result};
use crate::model::cuda_attention::{Compute, Workspace};
use crate::model::cuda_exec::{CudaExec, DeviceValue, Lease};
use crate::model::{Output, VisionTransformer};
use crate::tensor::Tensor;

/// Device bytes of a forward batch: `per_image` more for each image, `fixed` whatever the batch
/// (attention's workspace), both measured as the executor's peak of live activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferPlan {
    pub per_image: usize,
    pub fixed: usize,
}

impl BufferPlan {
    /// The peak bytes a batch of `b` needs, by this plan.
    pub fn bytes(&self, b: usize) -> usize {
        self.fixed + b * self.per_image
    }
}

pub struct CudaModel<'m, T: Compute> {
    pub model: &'m VisionTransformer,
    pub exec: CudaExec<T>,
    plan: Option<BufferPlan>,
    /// Whether `forward` replays CUDA graphs (see the module doc).
    graphs: bool,
    graph: Option<GraphedForward<T>>,
    /// The image shape of the last `forward`, and shapes whose capture failed.
    last_shape: Vec<usize>,
    refused: Vec<Vec<usize>>,
    launches: usize,
}

/// The forward for one image shape as a CUDA graph, with the device buffers it reads and writes.
struct GraphedForward<T> {
    shape: Vec<usize>,
    graph: DeviceGraph,
    /// [B, C, H, W] images, copied into the executor's first activation by the graph.
    input: CudaSlice<f32>,
    features: (Vec<usize>, CudaSlice<f32>),
    logits: Option<(Vec<usize>, CudaSlice<f32>)>,
    /// The attention workspace the recorded launches use, held while the graph lives.
    _workspace: Option<(Workspace<T>, Lease)>,
}

/// `MOOD_CUDA_GRAPH=0` turns CUDA graphs off where they are on by default (extraction).
pub fn graphs_from_env() -> bool {
    std::env::var("MOOD_CUDA_GRAPH").map_or(true, |v| v != "0")
}

/// Copies an f32 output of the forward into a graph's fixed buffer, inside the capture.
fn copy_output<T>(
    dev: &CudaDevice,
    v: &DeviceValue<T>,
    (shape, out): &mut (Vec<usize>, CudaSlice<f32>),
    what: &str,
) -> Result<()> {
    if v.shape() != &shape[..] {
        return Err(Error::Cuda(format!(
            "graphed forward: {what} {:?}, expected {shape:?}",
            v.shape()
        )));
    }
    dev.stream()
        .memcpy_dtod(v.f32(what)?, out)
        .map_err(crate::backend::cuda::device::cuda_err(format!(
            "copy the {what}"
        )))
}

impl<'m, T: Compute> CudaModel<'m, T>
where
    CudaBlas: Gemm<T>,
{
    /// Nothing is uploaded yet: each parameter goes to the device on its first use.
    pub fn new(dev: Arc<CudaDevice>, model: &'m VisionTransformer) -> CudaModel<'m, T> {
        let cfg = &model.cfg;
        CudaModel {
            exec: CudaExec::new(dev, &cfg.name, cfg.head_dim()),
            model,
            plan: None,
            graphs: false,
            graph: None,
            last_shape: Vec::new(),
            refused: Vec::new(),
            launches: 0,
        }
    }

    /// Turns CUDA graphs for `forward` on or off (off drops a captured graph).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.graph = None;
        }
    }

    /// How many batches ran as a graph launch so far.
    pub fn graph_launches(&self) -> usize {
        self.launches
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        self.exec.device()
    }

    /// The buffer plan, measured once by forwards of 1 and 2 blank images (activations grow
    /// linearly with the batch; the workspace does not). This also uploads every parameter.
    pub fn buffer_plan(&mut self) -> Result<BufferPlan> {
        if let Some(p) = self.plan {
            return Ok(p);
        }
        let cfg = &self.model.cfg;
        let mut peak = |b: usize| -> Result<usize> {
            let x = Tensor::zeros(&[b, cfg.in_chans, cfg.img_size, cfg.img_size]);
            self.exec.meter().reset_peak();
            self.model.forward_on(&mut self.exec, &x)?;
            Ok(self.exec.meter().peak())
        };
        let (one, two) = (peak(1)?, peak(2)?);
        let per_image = two.saturating_sub(one);
        let plan = BufferPlan {
            per_image,
            fixed: one.saturating_sub(per_image),
        };
        self.plan = Some(plan);
        Ok(plan)
    }

    /// Fails, before a batch of `b` runs, when it would not fit in the device's free memory
    /// (with `HEADROOM_BYTES` kept back); the message names the largest batch that would.
    pub fn check_batch_fits(&mut self, b: usize) -> Result<()> {
        let plan = self.buffer_plan()?;
        let (free, _) = self.device().memory()?;
        let fixed = plan.fixed + HEADROOM_BYTES;
        if b > max_batch_that_fits(free, plan.per_image, fixed) {
            return Err(Error::Cuda(batch_too_large(b, free, plan.per_image, fixed)));
        }
        Ok(())
    }

    /// An out-of-memory error from a batch of `b` (another process took memory since the check)
    /// as the same advice; other errors unchanged.
    fn batch_error(&self, b: usize, e: Error) -> Error {
        match (e, self.plan) {
            (Error::CudaOutOfMemory(_), Some(plan)) => {
                // The failed forward's buffers are freed by now, so this is what a batch can use.
                let free = self.device().memory().map_or(0, |(free, _)| free);
                let fixed = plan.fixed + HEADROOM_BYTES;
                Error::Cuda(batch_too_large(b, free, plan.per_image, fixed))
            }
            (e, _) => e,
        }
    }

    /// images [B, C, H, W], normalised → features [B, D] and logits [B, C] on the host; with
    /// graphs on, replayed as a CUDA graph where the module doc says.
    pub fn forward(&mut self, images: &Tensor) -> Result<Output> {
        let b = images.shape().first().copied().unwrap_or(0);
        let graphed = match self.graphs {
            true => self.forward_graphed(images),
            false => Ok(None),
        };
        self.last_shape = images.shape().to_vec();
        match graphed.map_err(|e| self.batch_error(b, e))? {
            Some(out) => Ok(out),
            None => self
                .model
                .forward_on(&mut self.exec, images)
                .map_err(|e| self.batch_error(b, e)),
        }
    }

    /// The graphed forward where it applies (Some), else None for the eager one.
    fn forward_graphed(&mut self, images: &Tensor) -> Result<Option<Output>> {
        let shape = images.shape();
        if self.graph.as_ref().is_some_and(|g| g.shape != shape) {
            self.graph = None; // gives its memory back before the eager forward of another shape
        }
        if self.graph.is_none() {
            if self.last_shape != shape || self.refused.iter().any(|s| s == shape) {
                return Ok(None);
            }
            let first = self
                .capture(images)
                .and_then(|g| self.graph.insert(g).launch_with(images));
            if let Err(e) = first {
                eprintln!(
                    "note: CUDA graph of the forward for batch {shape:?} failed, running it eagerly: {e}"
                );
                self.graph = None;
                self.refused.push(shape.to_vec());
                return Ok(None);
            }
            self.launches += 1;
            return self.graph.as_ref().map(|g| g.download()).transpose();
        }
        let g = self.graph.as_mut().expect("a graph for this shape");
        g.launch_with(images)?;
        self.launches += 1;
        g.download().map(Some)
    }

    /// Captures the forward for `images`' shape now, after an eager forward of it unless that
    /// was the last to run, for `launch_graph`. The images go into the graph's input buffer.
    pub fn capture_graph(&mut self, images: &Tensor) -> Result<()> {
        if self
            .graph
            .as_ref()
            .is_some_and(|g| g.shape == images.shape())
        {
            return Ok(());
        }
        self.graph = None;
        if self.last_shape != images.shape() {
            self.model.forward_on(&mut self.exec, images)?;
            self.last_shape = images.shape().to_vec();
        }
        let g = self.capture(images)?;
        self.graph = Some(g);
        Ok(())
    }

    /// Queues one launch of the graph `capture_graph` made, on the images in its input buffer
    /// (what a throughput benchmark times; `device().sync()` waits).
    pub fn launch_graph(&mut self) -> Result<()> {
        let g = self
            .graph
            .as_ref()
            .ok_or_else(|| Error::Cuda("launch_graph: no graph captured".into()))?;
        g.graph.launch()?;
        self.launches += 1;
        Ok(())
    }

    /// Captures the forward for `images`' shape, which ran eagerly just before (so every
    /// parameter is on the device and the attention workspace is made for this shape).
    fn capture(&mut self, images: &Tensor) -> Result<GraphedForward<T>> {
        let dev = Arc::clone(self.exec.device());
        let b = images.shape()[0];
        let d = self.model.cfg.embed_dim;
        let mut features = (vec![b, d], dev.empty::<f32>(b * d)?);
        let mut logits = match self.model.num_classes() {
            Some(c) => Some((vec![b, c], dev.empty::<f32>(b * c)?)),
            None => None,
        };
        let input = dev.upload(images.as_slice())?;
        let lent = self
            .exec
            .swap_staged(Some((images.shape().to_vec(), input)));
        let (model, exec) = (self.model, &mut self.exec);
        let graph = DeviceGraph::capture(&dev, || {
            let (f, l) = model.forward_with(exec, images)?;
            copy_output(&dev, &f, &mut features, "features")?;
            match (l, logits.as_mut()) {
                (Some(l), Some(out)) => copy_output(&dev, &l, out, "logits"),
                (None, None) => Ok(()),
                _ => Err(Error::Cuda(
                    "graphed forward: logits where none were expected".into(),
                )),
            }
        });
        let input = self.exec.swap_staged(lent).map(|(_, s)| s);
        let graph = graph?;
        Ok(GraphedForward {
            shape: images.shape().to_vec(),
            graph,
            input: input.ok_or_else(|| Error::Cuda("graphed forward: input buffer lost".into()))?,
            features,
            logits,
            _workspace: self.exec.workspace.take(),
        })
    }

    /// `forward` and the last block's patch tokens [B, G, D] (MODE's local features).
    pub fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)> {
        let b = images.shape().first().copied().unwrap_or(0);
        self.model
            .forward_local_on(&mut self.exec, images)
            .map_err(|e| self.batch_error(b, e))
    }

    /// The forward with its outputs left on the device (queued; `device().sync()` waits): what
    /// a throughput benchmark times.
    pub fn forward_queued(&mut self, images: &Tensor) -> Result<()> {
        let b = images.shape().first().copied().unwrap_or(0);
        self.model
            .forward_with(&mut self.exec, images)
            .map(drop)
            .map_err(|e| self.batch_error(b, e))
    }
}

impl<T: Compute> crate::model::runner::Runner for CudaModel<'_, T>
where
    CudaBlas: Gemm<T>,
{
    fn forward(&mut self, images: &Tensor) -> Result<Output> {
        CudaModel::forward(self, images)
    }

    fn forward_local(&mut self, images: &Tensor) -> Result<(Output, Tensor)> {
        CudaModel::forward_local(self, images)
    }

    fn forward_layers(
        &mut self,
        images: &Tensor,
        layers: &[usize],
        local: bool,
    ) -> Result<(Output, Option<Tensor>, Tensor)> {
        let b = images.shape().first().copied().unwrap_or(0);
        self.model
            .forward_layers_on(&mut self.exec, images, layers, local)
            .map_err(|e| self.batch_error(b, e))
    }
}

impl<T> GraphedForward<T> {
    /// Copies `images` into the graph's input buffer and queues one launch.
    fn launch_with(&mut self, images: &Tensor) -> Result<()> {
        let dev = self.graph.device();
        dev.stream()
            .memcpy_htod(images.as_slice(), &mut self.input)
            .map_err(crate::backend::cuda::device::cuda_err("upload the images"))?;
        self.graph.launch()
    }

    /// The features and logits of the last launch, on the host (waits for it).
    fn download(&self) -> Result<Output> {
        let dev = self.graph.device();
        let host = |(shape, s): &(Vec<usize>, CudaSlice<f32>)| -> Result<Tensor> {
            Tensor::from_vec(shape, dev.download(s)?)
        };
        Ok(Output {
            features: host(&self.features)?,
            logits: self.logits.as_ref().map(host).transpose()?,
        })
    }
}
