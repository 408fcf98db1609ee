//! CUDA graphs for micro-batches. A training micro-batch of the locked config is about 10k
//! launches (8,098), each bound and issued from the host; at a few microseconds apiece that
//! rivals the GPU time of the micro-batch itself. The launches depend only on the token count and
//! sequence length, on how many nodes run and on whether this is the step's first micro-batch
//! (the gradient kernels' `accum` flag): every address is fixed once the
//! backend is allocated and every input arrives by copy into its buffer. So the launch sequence is
//! captured once per such key and replayed with one `cuGraphLaunch`: same kernels, same order,
//! same arguments, hence bitwise the same results (`tests/cuda.rs` checks this).
//!
//! Capture runs on a non-blocking side stream (the legacy default stream, which orders the
//! synchronous copies, cannot be captured); the replay goes to the default stream.

use anyhow::{anyhow, Result};
use cudarc::driver::{sys, CudaContext};
use std::sync::Arc;

/// An instantiated graph; destroyed with its context bound.
pub struct GraphExec {
    exec: sys::CUgraphExec,
    ctx: Arc<CudaContext>,
}

impl GraphExec {
    pub fn launch(&self, stream: sys::CUstream) -> Result<()> {
        unsafe { sys::cuGraphLaunch(self.exec, stream) }.result().map_err(|e| anyhow!("replaying a micro-batch: {e}"))
    }
}

impl Drop for GraphExec {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = unsafe { sys::cuGraphExecDestroy(self.exec) };
    }
}

/// Records what `issue` launches on `stream` (a non-blocking stream) into an executable graph.
/// The stream leaves capture mode whatever `issue` returns.
pub fn capture(ctx: &Arc<CudaContext>, stream: sys::CUstream, issue: impl FnOnce() -> Result<()>) -> Result<GraphExec> {
    let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    unsafe { sys::cuStreamBeginCapture_v2(stream, mode) }.result().map_err(|e| anyhow!("starting a capture: {e}"))?;
    let issued = issue();
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    let ended = unsafe { sys::cuStreamEndCapture(stream, &mut graph) }.result();
    issued?;
    ended.map_err(|e| anyhow!("ending a capture: {e}"))?;
    let mut exec: sys::CUgraphExec = std::ptr::null_mut();
    let made = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result();
    unsafe { sys::cuGraphDestroy(graph) };
    made.map_err(|e| anyhow!("instantiating a captured micro-batch: {e}"))?;
    Ok(GraphExec { exec, ctx: ctx.clone() })
}
