//! Finding the GPU and owning device memory. A machine without a driver or device gets a clear
//! error, never a panic (cudarc panics when libcuda is absent, so presence is checked first).

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use std::sync::Arc;

/// The opened device: context, the stream every launch goes to, and what it is.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub cc: (i32, i32),
    pub total_mem: usize,
    /// The host emulator's stand-in driver (`codegen/cuda/host_emu/driver.cpp`), not a GPU:
    /// kernels are loaded as emulator source instead of cubins.
    pub emulated: bool,
}

impl Gpu {
    /// The NVRTC target for this device: the plan's kernels use Hopper-only instructions.
    pub fn arch(&self) -> String {
        format!("sm_{}{}a", self.cc.0, self.cc.1)
    }
}

/// Whether a CUDA driver and at least one device are present (for tests that skip without one).
pub fn gpu_available() -> bool {
    let driver = unsafe { sys::is_culib_present() };
    driver && CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

/// Opens this process's device: 0, or a data-parallel rank's local rank where the node shows it
/// more than one GPU (select others with `CUDA_VISIBLE_DEVICES`).
pub fn open() -> Result<Gpu> {
    if !unsafe { sys::is_culib_present() } {
        bail!(
            "the cuda backend needs an NVIDIA GPU, and this machine has no CUDA driver (libcuda.so.1 was not found); \
             run with --backend cpu to use the cpu reference backend"
        );
    }
    let n = CudaContext::device_count()
        .map_err(|e| anyhow!("the CUDA driver reports no usable GPU ({e}); run with --backend cpu"))?;
    if n == 0 {
        bail!("the CUDA driver sees no GPU (check CUDA_VISIBLE_DEVICES); run with --backend cpu");
    }
    let local = crate::dist::Rank::from_env()?.local_rank;
    let ordinal = if n == 1 { 0 } else { local };
    if ordinal >= n as usize {
        bail!("local rank {local} needs GPU {ordinal}, and this node shows {n} (check CUDA_VISIBLE_DEVICES)");
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("creating a CUDA context on device {ordinal}: {e}"))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let cc = ctx.compute_capability().map_err(|e| anyhow!("{e}"))?;
    if cc != (9, 0) {
        bail!("{name} has compute capability {}.{}; vpmoe's kernels are built for sm_90a (H100/H200) only", cc.0, cc.1);
    }
    let total_mem = ctx.total_mem().map_err(|e| anyhow!("{e}"))?;
    // The legacy default stream: synchronous copies are ordered with every launch.
    let stream = ctx.default_stream();
    let emulated = name == EMULATOR;
    Ok(Gpu { ctx, stream, name, cc, total_mem, emulated })
}

/// The device name the host emulator's driver reports.
pub const EMULATOR: &str = "vpmoe host emulator";

/// A device allocation freed on drop. Transfers are synchronous with respect to the host.
pub struct DevBuf {
    pub ptr: u64,
    pub bytes: usize,
    /// Pinned host memory mapped into the device's address space (`new_mapped`): kernels read
    /// and write it over PCIe, and with unified addressing every copy and memset takes `ptr`.
    /// Holds the host address, which frees it.
    mapped: Option<usize>,
    ctx: Arc<CudaContext>,
}

impl DevBuf {
    pub fn new(gpu: &Gpu, bytes: usize, what: &str) -> Result<DevBuf> {
        gpu.ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        let n = bytes.max(1);
        let ptr = unsafe { result::malloc_sync(n) }.map_err(|e| {
            let (free, total) = gpu.ctx.mem_get_info().unwrap_or((0, 0));
            anyhow!(
                "allocating {what} ({:.2} GiB) on {}: {e} ({:.2} of {:.2} GiB free)",
                n as f64 / GIB,
                gpu.name,
                free as f64 / GIB,
                total as f64 / GIB
            )
        })?;
        Ok(DevBuf { ptr, bytes, mapped: None, ctx: gpu.ctx.clone() })
    }

    /// Pinned host memory that kernels address directly (for state streamed once per step).
    pub fn new_mapped(gpu: &Gpu, bytes: usize, what: &str) -> Result<DevBuf> {
        gpu.ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        let host = unsafe { result::malloc_host(bytes.max(1), sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(|e| anyhow!("pinning {what} ({:.2} GiB) in host memory: {e}", bytes as f64 / GIB))?;
        let mut ptr = 0;
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut ptr, host, 0) }.result();
        if let Err(e) = r {
            let _ = unsafe { result::free_host(host) };
            bail!("mapping {what} into {}'s address space: {e}", gpu.name);
        }
        Ok(DevBuf { ptr, bytes, mapped: Some(host as usize), ctx: gpu.ctx.clone() })
    }

    /// Copies `src` to `self.ptr + offset`.
    pub fn upload_at<T: Copy>(&self, offset: usize, src: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(src);
        if offset + n > self.bytes {
            bail!("upload of {n} bytes at {offset} overruns a {}-byte buffer", self.bytes);
        }
        upload(self.ptr + offset as u64, src)
    }

    pub fn fill(&self, byte: u8) -> Result<()> {
        unsafe { result::memset_d8_sync(self.ptr, byte, self.bytes) }.context("cuMemsetD8")
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = match self.mapped {
            Some(host) => unsafe { result::free_host(host as *mut std::ffi::c_void) },
            None => unsafe { result::free_sync(self.ptr) },
        };
    }
}

pub const GIB: f64 = (1u64 << 30) as f64;

// `cuMemcpy` infers the direction from the addresses (unified addressing), so the same calls
// serve device memory and mapped host memory (`DevBuf::new_mapped`).
pub fn upload<T: Copy>(dst: u64, src: &[T]) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    unsafe { sys::cuMemcpy(dst, src.as_ptr() as u64, std::mem::size_of_val(src)) }
        .result()
        .context("cuMemcpy to the GPU")
}

pub fn download<T: Copy>(src: u64, dst: &mut [T]) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    unsafe { sys::cuMemcpy(dst.as_mut_ptr() as u64, src, std::mem::size_of_val(dst)) }
        .result()
        .context("cuMemcpy from the GPU")
}

/// Copies `bytes` bytes between device addresses (ordered with the launches on the stream).
pub fn copy(dst: u64, src: u64, bytes: u64) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    unsafe { sys::cuMemcpy(dst, src, bytes as usize) }.result().context("cuMemcpy on the GPU")
}
