//! NCCL between GPUs, loaded dynamically through cudarc like the rest of CUDA. The pip wheel
//! (`nvidia-nccl-cu13`, installed by scripts/setup-cuda) ships only `libnccl.so.2`, a name cudarc
//! never tries, so setup-cuda links it as `.cuda/nccl/libnccl.so`; that directory must be on
//! `LD_LIBRARY_PATH` (scripts/test and scripts/gpu-check put it there). Rank 0 makes the unique id
//! and sends it to the others over the job's TCP rendezvous ([`super::Dist`]).

use super::Dist;
use anyhow::{anyhow, bail, Result};
use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys, Id};
use std::sync::Arc;
use std::time::{Duration, Instant};

const F32: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
const SUM: sys::ncclRedOp_t = sys::ncclRedOp_t::ncclSum;

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
    let (rank, world) = (dist.rank.rank, dist.world());
    let mut comm = std::mem::MaybeUninit::uninit();
    let comm = unsafe {
        let id = sys::ncclUniqueId { internal: *id.internal() };
        result::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32)
            .map_err(|e| anyhow!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))?;
        comm.assume_init()
    };
    Ok(Gpus { comm, stream, timeout: super::timeout()? })
}

/// Collectives on device memory, on the backend's stream. Each waits for the stream with the
/// job's timeout and aborts the communicator when it passes, so a dead peer ends the job with an
/// error instead of a hang.
pub struct Gpus {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    timeout: Duration,
}

impl Drop for Gpus {
    fn drop(&mut self) {
        // Abort rather than finalize: a peer may be gone.
        let _ = unsafe { result::comm_abort(self.comm) };
    }
}

impl Gpus {
    /// In-place fp32 sum over ranks of `count` floats at device address `ptr`.
    pub fn all_reduce_f32(&self, ptr: u64, count: usize) -> Result<()> {
        self.run(
            "all-reduce",
            || format!("ncclAllReduce of {count} floats"),
            |comm, stream| unsafe { result::all_reduce(ptr as _, ptr as _, count, F32, SUM, comm, stream) },
        )
    }

    /// The fp32 sum over ranks of `count` floats at `send` (every rank's), into `recv` on `root`
    /// (other ranks' `recv` is not written).
    pub fn reduce_f32(&self, send: u64, recv: u64, count: usize, root: usize) -> Result<()> {
        self.run(
            "reduce",
            || format!("ncclReduce of {count} floats to rank {root}"),
            |comm, stream| unsafe { result::reduce(send as _, recv as _, count, F32, SUM, root as i32, comm, stream) },
        )
    }

    /// `root`'s `bytes` bytes at `ptr` into `ptr` on every rank.
    pub fn broadcast(&self, ptr: u64, bytes: usize, root: usize) -> Result<()> {
        let u8s = sys::ncclDataType_t::ncclUint8;
        self.run(
            "broadcast",
            || format!("ncclBroadcast of {bytes} bytes from rank {root}"),
            |comm, stream| unsafe { result::broadcast(ptr as _, ptr as _, bytes, u8s, root as i32, comm, stream) },
        )
    }

    /// Issues one collective on the backend's stream (`call` gets the communicator and stream)
    /// and waits for it.
    fn run<T>(
        &self,
        what: &str,
        detail: impl Fn() -> String,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<T, result::NcclError>,
    ) -> Result<()> {
        call(self.comm, self.stream.cu_stream() as _).map_err(|e| anyhow!("{}: {e:?}", detail()))?;
        self.wait(what)
    }

    fn wait(&self, what: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            use cudarc::driver::sys::{cuStreamQuery, CUresult};
            match unsafe { cuStreamQuery(self.stream.cu_stream()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY if t0.elapsed() > self.timeout => {
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
