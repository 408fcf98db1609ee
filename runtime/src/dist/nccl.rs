//! NCCL between GPUs, loaded dynamically through cudarc like the rest of CUDA. The pip wheel
//! (`nvidia-nccl-cu13`, installed by scripts/setup-cuda) ships only `libnccl.so.2`, a name cudarc
//! never tries, so setup-cuda links it as `.cuda/nccl/libnccl.so`; that directory must be on
//! `LD_LIBRARY_PATH` (scripts/test and scripts/gpu-check put it there). Rank 0 makes the unique id
//! and sends it to the others over the job's TCP rendezvous ([`super::Dist`]).

use super::Dist;
use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fails, saying how to install it, where libnccl cannot be loaded.
pub fn check_loadable() -> Result<()> {
    // cudarc panics on a missing library; ask first.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        bail!(
            "NCCL not found: run scripts/setup-cuda (installs nvidia-nccl-cu13 2.30.7 and links .cuda/nccl/libnccl.so) \
             and put .cuda/nccl on LD_LIBRARY_PATH"
        );
    }
    Ok(())
}

/// `(major, minor, patch)` of the loaded NCCL.
pub fn version() -> Result<(u32, u32, u32)> {
    check_loadable()?;
    let v = cudarc::nccl::result::get_nccl_version().map_err(|e| anyhow!("ncclGetVersion: {e:?}"))? as u32;
    // NCCL ≥ 2.9 encodes major·10000 + minor·100 + patch.
    Ok((v / 10000, (v / 100) % 100, v % 100))
}

/// A fresh unique id (rank 0's part of communicator creation; no GPU needed).
pub fn unique_id() -> Result<Vec<u8>> {
    check_loadable()?;
    let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// The id rank 0 made, on every rank (over the TCP rendezvous).
pub fn shared_id(dist: &Dist) -> Result<Id> {
    let mut bytes = if dist.is_root() { unique_id()? } else { Vec::new() };
    dist.broadcast(&mut bytes, 0)?;
    let internal: [std::ffi::c_char; 128] = bytes
        .iter()
        .map(|&b| b as std::ffi::c_char)
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|v: Vec<_>| anyhow!("an NCCL unique id of {} bytes (128 expected)", v.len()))?;
    Ok(Id::uninit(internal))
}

/// This rank's NCCL communicator on `stream`'s GPU.
pub fn communicator(dist: &Dist, stream: Arc<CudaStream>) -> Result<Gpus> {
    let id = shared_id(dist)?;
    let comm = Comm::from_rank(stream.clone(), dist.rank.rank, dist.world(), id)
        .map_err(|e| anyhow!("ncclCommInitRank (rank {} of {}): {e:?}", dist.rank.rank, dist.world()))?;
    Ok(Gpus { comm, stream, timeout: super::timeout() })
}

/// Collectives on device buffers. Each waits for its stream with the job's timeout and aborts
/// the communicator when it passes, so a dead peer ends the job with an error instead of a hang.
pub struct Gpus {
    comm: Comm,
    stream: Arc<CudaStream>,
    timeout: Duration,
}

impl Gpus {
    /// In-place fp32 sum over ranks.
    pub fn all_reduce(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        self.comm.all_reduce_in_place(x, &ReduceOp::Sum).map_err(|e| anyhow!("ncclAllReduce: {e:?}"))?;
        self.wait("all-reduce")
    }

    /// Rank r receives the sum over ranks of the r-th `out.len()`-element segment of `x`.
    pub fn reduce_scatter(&self, x: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
        self.comm.reduce_scatter(x, out, &ReduceOp::Sum).map_err(|e| anyhow!("ncclReduceScatter: {e:?}"))?;
        self.wait("reduce-scatter")
    }

    /// Every rank's `mine` (equal sizes), concatenated in rank order.
    pub fn all_gather<T: cudarc::nccl::NcclType>(&self, mine: &CudaSlice<T>, out: &mut CudaSlice<T>) -> Result<()> {
        self.comm.all_gather(mine, out).map_err(|e| anyhow!("ncclAllGather: {e:?}"))?;
        self.wait("all-gather")
    }

    fn wait(&self, what: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            use cudarc::driver::sys::{cuStreamQuery, CUresult};
            match unsafe { cuStreamQuery(self.stream.cu_stream()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY if t0.elapsed() > self.timeout => {
                    // Comm's drop aborts the communicator, which releases the stuck kernel.
                    bail!(
                        "NCCL {what} did not finish within {:.0} s ($VPMOE_DIST_TIMEOUT): a rank died or stopped",
                        self.timeout.as_secs_f64()
                    )
                }
                CUresult::CUDA_ERROR_NOT_READY => std::thread::sleep(Duration::from_micros(50)),
                e => bail!("NCCL {what}: {e:?}"),
            }
        }
    }
}
