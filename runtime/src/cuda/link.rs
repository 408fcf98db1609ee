//! Collectives on device memory for a data-parallel rank: NCCL between GPUs, or — where there is
//! no NCCL (the host emulator) — the job's host collective through copies to and from the host,
//! so everything around NCCL runs without a GPU. Sums are fp32 in rank order on the host path.

use super::device::{download, upload};
use crate::dist::nccl::Gpus;
use crate::dist::Dist;
use anyhow::Result;

pub struct Link {
    pub dist: Dist,
    nccl: Option<Gpus>,
}

impl Link {
    pub fn single() -> Link {
        Link { dist: Dist::single(), nccl: None }
    }

    /// `dist`'s ranks over NCCL (`Some`) or over the host collective.
    pub fn new(dist: Dist, nccl: Option<Gpus>) -> Link {
        Link { dist, nccl }
    }

    pub fn world(&self) -> usize {
        self.dist.world()
    }

    pub fn rank(&self) -> usize {
        self.dist.rank.rank
    }

    /// In-place fp32 sum over ranks of `count` floats at `ptr`.
    pub fn all_reduce_f32(&self, ptr: u64, count: usize) -> Result<()> {
        if let Some(n) = &self.nccl {
            return n.all_reduce_f32(ptr, count);
        }
        let mut x = vec![0f32; count];
        download(ptr, &mut x)?;
        self.dist.all_reduce_f32(&mut x)?;
        upload(ptr, &x)
    }

    /// The fp32 sum over ranks of `count` floats at `send`, into `recv` on `root` (`recv` is
    /// only read on `root`).
    pub fn reduce_f32(&self, send: u64, recv: u64, count: usize, root: usize) -> Result<()> {
        if let Some(n) = &self.nccl {
            return n.reduce_f32(send, recv, count, root);
        }
        let mut x = vec![0f32; count];
        download(send, &mut x)?;
        let mut counts = vec![0; self.world()];
        counts[root] = count;
        let sum = self.dist.reduce_scatter_f32(&x, &counts)?;
        if self.rank() == root {
            upload(recv, &sum)?;
        }
        Ok(())
    }

    /// `root`'s `bytes` bytes at `ptr`, into `ptr` on every rank.
    pub fn broadcast(&self, ptr: u64, bytes: usize, root: usize) -> Result<()> {
        if let Some(n) = &self.nccl {
            return n.broadcast(ptr, bytes, root);
        }
        let mut x = vec![0u8; if self.rank() == root { bytes } else { 0 }];
        download(ptr, &mut x)?;
        self.dist.broadcast(&mut x, root)?;
        if x.len() != bytes {
            anyhow::bail!("broadcast from rank {root}: {} bytes arrived, {bytes} expected", x.len());
        }
        upload(ptr, &x)
    }
}
