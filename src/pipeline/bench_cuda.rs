//! The measurements of `mood bench --device cuda` (cli/bench_cuda.rs prints them): the forward's
//! times eager and as a CUDA graph here; each op of the forward timed by CUDA events, and each op
//! of a block alone at the model's shapes as the forward runs it, in `op_profile`.

use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::{CudaBlas, Gemm};

use crate::backend::cuda::CudaDevice;
use crate::error::Result;
use crate::model::cuda_attention::Compute;
use crate::model::cuda_model::CudaModel;
use crate::model::VisionTransformer;
use crate::tensor::Tensor;

/// Forward times, seconds: eager and as one CUDA graph launch (`CudaModel::launch_graph`), each
/// with the images on the device and from host images to host outputs.
pub struct Times {
    pub resident: Vec<f64>,
    pub host: Vec<f64>,
    pub graphed: Vec<f64>,
    pub graphed_host: Vec<f64>,
}

/// The forward's times over `iters` passes each: images resident on the device, host to host,
/// and both as one CUDA graph launch a batch.
pub fn forward_times<T: Compute>(
    dev: &Arc<CudaDevice>,
    model: &VisionTransformer,
    x: &Tensor,
    iters: usize,
) -> Result<Times>
where
    CudaBlas: Gemm<T>,
{
    let mut gpu = CudaModel::<T>::new(Arc::clone(dev), model);
    let b = x.shape()[0];
    gpu.check_batch_fits(b)?; // before the batch's buffers: fail with a batch that fits
    gpu.exec.stage_input(x)?;
    for _ in 0..3 {
        gpu.forward_queued(x)?; // warm-up: cuBLAS heuristics, allocator pool
    }
    dev.sync()?;
    let pb = crate::progress::Progress::new(4 * iters as u64, "iter", "progress");
    let mut resident = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        gpu.forward_queued(x)?;
        dev.sync()?;
        resident.push(t.elapsed().as_secs_f64());
        pb.inc(1);
    }
    // The same forward as one graph launch a batch: what the launch overhead costs eagerly.
    gpu.capture_graph(x)?;
    gpu.launch_graph()?;
    dev.sync()?;
    let mut graphed = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        gpu.launch_graph()?;
        dev.sync()?;
        graphed.push(t.elapsed().as_secs_f64());
        pb.inc(1);
    }
    gpu.set_graphs(true); // `forward` now replays that graph: upload, launch, download
    let mut graphed_host = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        gpu.forward(x)?;
        graphed_host.push(t.elapsed().as_secs_f64());
        pb.inc(1);
    }
    drop(gpu);
    let mut host = Vec::with_capacity(iters);
    let mut unstaged = CudaModel::<T>::new(Arc::clone(dev), model);
    unstaged.forward(x)?; // uploads the weights
    for _ in 0..iters {
        let t = Instant::now();
        unstaged.forward(x)?; // returns host tensors, so the device work is finished
        host.push(t.elapsed().as_secs_f64());
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(Times {
        resident,
        host,
        graphed,
        graphed_host,
    })
}

mod op_profile;
pub use op_profile::{op_alone, op_times};
