//! The cuda backend (H100/H200, sm_90a): executes a compiled plan's kernels in plan order behind
//! the same [`crate::Backend`] trait as the cpu reference. Without a CUDA driver or device,
//! [`CudaBackend::new`] fails with an explanation; nothing falls back to the cpu backend.

pub mod bind;
pub mod blas;
pub mod decode;
pub mod device;
mod exec;
mod kernels;
pub mod link;
pub mod nvtx;
pub mod optim;
mod replay;
pub mod timing;

pub use device::gpu_available;
pub use exec::CudaBackend;
