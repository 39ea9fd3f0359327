//! A CUDA graph: the launches a closure queues on the device's stream, captured once and replayed
//! with one `cuGraphLaunch`, which saves the per-launch CPU cost that dominates a small batch.
//!
//! The closure runs once, during capture, and nothing it queues executes then: it must not copy
//! between host and device, synchronise, or read device values on the host (the driver refuses
//! those during capture, and the capture fails as a whole), and every buffer a recorded launch
//! touches must outlive the graph. Memory it allocates on the stream belongs to the graph: its
//! addresses are fixed at capture and reused by every launch, so it must also be freed inside the
//! closure (dropped before it returns). Capture is thread-local: other threads may use CUDA
//! meanwhile.

use std::sync::Arc;

use cudarc::driver::{sys, CudaGraph};

use super::device::{cuda_err, CudaDevice};
use crate::error::{Error, Result};

pub struct DeviceGraph {
    graph: CudaGraph,
    dev: Arc<CudaDevice>,
}

impl DeviceGraph {
    /// Runs `body` with the device's stream capturing, and instantiates what it queued. A failure
    /// inside `body`, or a call that cannot be captured, is one `Error::Cuda` naming the first
    /// cause; the stream is out of capture mode either way.
    pub fn capture(
        dev: &Arc<CudaDevice>,
        body: impl FnOnce() -> Result<()>,
    ) -> Result<DeviceGraph> {
        let stream = dev.stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err("begin graph capture"))?;
        let ran = body();
        // A buffer freed inside a failed capture leaves its error in the context (cudarc records
        // errors of drops there); take it now, or ending the capture would report it instead of
        // ending it.
        let dropped = dev.context().check_err();
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        let graph = match (ran, dropped, ended) {
            (Err(e), _, _) => return Err(Error::Cuda(format!("graph capture: {e}"))),
            (Ok(()), Err(e), _) => {
                return Err(Error::Cuda(format!(
                    "graph capture: freeing a buffer: {e:?}"
                )))
            }
            (Ok(()), Ok(()), Err(e)) => return Err(cuda_err("graph capture")(e)),
            (Ok(()), Ok(()), Ok(None)) => {
                return Err(Error::Cuda("graph capture: nothing was captured".into()))
            }
            (Ok(()), Ok(()), Ok(Some(g))) => g,
        };
        Ok(DeviceGraph {
            graph,
            dev: Arc::clone(dev),
        })
    }

    /// Queues one run of the graph on the device's stream (`CudaDevice::sync` waits for it).
    pub fn launch(&self) -> Result<()> {
        self.graph.launch().map_err(cuda_err("graph launch"))
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
}
