//! Data parallel training: who this process is ([`Rank`], from torchrun's or Slurm's variables),
//! the collectives the ranks share ([`Collective`]: [`tcp`] between processes on the host, [`nccl`]
//! between GPUs), how a step's micro-batches are split ([`Dist::mine`]), ZeRO-1 ownership
//! ([`zero`]) and `vpmoe-rt launch` ([`launch`]).
//!
//! Every reduction has a fixed order (rank 0's contribution first, then rank 1's, …), so a run is
//! bitwise reproducible for a given world size; at world size 1 every collective is the identity.

pub mod launch;
pub mod nccl;
pub mod tcp;
pub mod zero;

use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::Duration;

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
    /// Where rank 0 listens for the others (`MASTER_ADDR:MASTER_PORT`).
    pub master: String,
    /// Which launcher's variables described it.
    pub launcher: &'static str,
}

impl Rank {
    pub fn single() -> Rank {
        Rank { rank: 0, world: 1, local_rank: 0, local_world: 1, master: String::new(), launcher: "none" }
    }

    /// The rank description of this process's environment (see [`Rank::from_vars`]).
    pub fn from_env() -> Result<Rank> {
        Rank::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
    /// `MASTER_PORT` (also what `vpmoe-rt launch` sets); else Slurm's `SLURM_PROCID`,
    /// `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`, with `MASTER_ADDR` or the
    /// launching node's address and `MASTER_PORT` or a port derived from the job id; else one rank.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Rank> {
        let num = |k: &str| -> Result<Option<usize>> {
            var(k)
                .map(|v| v.trim().parse::<usize>().with_context(|| format!("${k} = {v:?} is not a number")))
                .transpose()
        };
        let (launcher, rank, world, local_rank, local_world) = if let Some(rank) = num("RANK")? {
            let world = num("WORLD_SIZE")?.context("$RANK is set but $WORLD_SIZE is not")?;
            let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
            ("torchrun", rank, world, local_rank, num("LOCAL_WORLD_SIZE")?.unwrap_or(world))
        } else if let Some(rank) = num("SLURM_PROCID")? {
            let world = num("SLURM_NTASKS")?.context("$SLURM_PROCID is set but $SLURM_NTASKS is not")?;
            let local_rank = num("SLURM_LOCALID")?.unwrap_or(0);
            // "8" or "8(x2)": tasks on each node.
            let per_node = var("SLURM_NTASKS_PER_NODE")
                .and_then(|v| v.split(['(', ',']).next().and_then(|n| n.trim().parse().ok()))
                .unwrap_or(world);
            ("slurm", rank, world, local_rank, per_node)
        } else {
            return Ok(Rank::single());
        };
        if world == 0 || rank >= world {
            bail!("{launcher}: rank {rank} is outside a world of {world}");
        }
        if local_world == 0 || local_rank >= local_world {
            bail!("{launcher}: local rank {local_rank} is outside {local_world} processes per node");
        }
        let master = if world == 1 {
            String::new()
        } else {
            let addr =
                var("MASTER_ADDR").or_else(|| (launcher == "slurm").then(|| var("SLURM_LAUNCH_NODE_IPADDR")).flatten());
            let addr = addr.with_context(|| format!("{launcher}: $MASTER_ADDR is not set (rank 0's host)"))?;
            let port = match num("MASTER_PORT")? {
                Some(p) => p,
                None if launcher == "slurm" => 20000 + num("SLURM_JOB_ID")?.unwrap_or(0) % 20000,
                None => bail!("{launcher}: $MASTER_PORT is not set (the port rank 0 listens on)"),
            };
            if port == 0 || port > 65535 {
                bail!("$MASTER_PORT {port} is not a TCP port");
            }
            format!("{addr}:{port}")
        };
        Ok(Rank { rank, world, local_rank, local_world, master, launcher })
    }
}

/// The collectives of a job. Sums are in rank order; a rank that dies or stops answering makes
/// every other rank's next collective fail within the timeout, naming it.
pub trait Collective: Send + Sync {
    /// Element-wise sum over ranks, in place on every rank.
    fn all_reduce_f32(&self, x: &mut [f32]) -> Result<()>;
    fn all_reduce_f64(&self, x: &mut [f64]) -> Result<()>;
    fn all_reduce_u64(&self, x: &mut [u64]) -> Result<()>;
    /// Element-wise maximum over ranks, in place on every rank.
    fn all_max_f64(&self, x: &mut [f64]) -> Result<()>;
    /// `x` is split into consecutive segments of `counts[r]` elements; rank r gets the sum of
    /// segment r over ranks.
    fn reduce_scatter_f32(&self, x: &[f32], counts: &[usize]) -> Result<Vec<f32>>;
    /// Every rank's `mine` (`counts[r]` elements from rank r), concatenated in rank order.
    fn all_gather_f32(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>>;
    /// `root`'s bytes on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
}

/// One rank's view of the job: where it is and its collectives (cheap to clone).
#[derive(Clone)]
pub struct Dist {
    pub rank: Rank,
    comm: Option<Arc<dyn Collective>>,
}

impl Default for Dist {
    fn default() -> Self {
        Dist::single()
    }
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.rank.rank, self.rank.world)
    }
}

/// How long a collective waits for the slowest rank: `$VPMOE_DIST_TIMEOUT` seconds, else 600.
pub fn timeout() -> Result<Duration> {
    let Ok(v) = std::env::var("VPMOE_DIST_TIMEOUT") else { return Ok(Duration::from_secs(600)) };
    match v.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
        _ => bail!("$VPMOE_DIST_TIMEOUT = {v:?} is not a positive number of seconds"),
    }
}

impl Dist {
    pub fn single() -> Dist {
        Dist { rank: Rank::single(), comm: None }
    }

    pub fn new(rank: Rank, comm: Arc<dyn Collective>) -> Dist {
        Dist { rank, comm: Some(comm) }
    }

    /// The job this process belongs to (one rank without launcher variables); ranks of more
    /// than one connect through rank 0's TCP rendezvous.
    pub fn from_env() -> Result<Dist> {
        let rank = Rank::from_env()?;
        if rank.world == 1 {
            return Ok(Dist { rank, comm: None });
        }
        let comm = tcp::TcpCollective::connect(&rank, timeout()?)?;
        Ok(Dist::new(rank, Arc::new(comm)))
    }

    pub fn world(&self) -> usize {
        self.rank.world
    }

    pub fn is_root(&self) -> bool {
        self.rank.rank == 0
    }

    /// Whether micro-batch `k` of a step's `m` belongs to this rank: rank r trains the r-th of
    /// `world` consecutive equal blocks.
    pub fn mine(&self, k: usize, m: usize) -> bool {
        k / (m / self.world()).max(1) == self.rank.rank
    }

    /// Refuses a step of `m` micro-batches that the ranks cannot share equally.
    pub fn check_micro_batches(&self, m: usize) -> Result<()> {
        if !m.is_multiple_of(self.world()) {
            bail!(
                "--grad-accum {m} (micro-batches per step over all ranks) must be a multiple of the world size {}",
                self.world()
            );
        }
        Ok(())
    }

    fn comm(&self) -> Option<&dyn Collective> {
        self.comm.as_deref()
    }

    pub fn all_reduce_f32(&self, x: &mut [f32]) -> Result<()> {
        self.comm().map_or(Ok(()), |c| c.all_reduce_f32(x))
    }
    pub fn all_reduce_f64(&self, x: &mut [f64]) -> Result<()> {
        self.comm().map_or(Ok(()), |c| c.all_reduce_f64(x))
    }
    pub fn all_reduce_u64(&self, x: &mut [u64]) -> Result<()> {
        self.comm().map_or(Ok(()), |c| c.all_reduce_u64(x))
    }
    pub fn all_max_f64(&self, x: &mut [f64]) -> Result<()> {
        self.comm().map_or(Ok(()), |c| c.all_max_f64(x))
    }

    /// Rows `lo..hi` of a step's `rows` that this rank handles (its micro-batches' rows).
    pub fn share(&self, rows: usize) -> std::ops::Range<usize> {
        let (r, w) = (self.rank.rank, self.world());
        r * rows / w..(r + 1) * rows / w
    }
    pub fn reduce_scatter_f32(&self, x: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        match self.comm() {
            Some(c) => c.reduce_scatter_f32(x, counts),
            None => Ok(x.to_vec()),
        }
    }
    pub fn all_gather_f32(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        match self.comm() {
            Some(c) => c.all_gather_f32(mine, counts),
            None => Ok(mine.to_vec()),
        }
    }
    pub fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        self.comm().map_or(Ok(()), |c| c.broadcast(bytes, root))
    }
    pub fn barrier(&self) -> Result<()> {
        self.comm().map_or(Ok(()), |c| c.barrier())
    }

    /// Whether any rank says yes (an interrupt seen by one rank stops them all at one step).
    pub fn any(&self, yes: bool) -> Result<bool> {
        let mut x = [yes as u64];
        self.all_reduce_u64(&mut x)?;
        Ok(x[0] > 0)
    }
}

/// The step's router loads per MoE layer, summed over ranks (each rank's expert-bias update then
/// sees the whole step's loads).
pub fn all_reduce_loads(dist: &Dist, loads: &mut [(u32, Vec<u64>)]) -> Result<()> {
    if dist.world() == 1 {
        return Ok(());
    }
    let mut parts: Vec<&mut [u64]> = loads.iter_mut().map(|(_, n)| n.as_mut_slice()).collect();
    reduce_parts(&mut parts, BUCKET, |x| dist.all_reduce_u64(x))
}

/// Each tensor summed over ranks in rank order (fp32 gradient sums).
pub fn all_reduce_tensors(dist: &Dist, tensors: &mut [Vec<f32>]) -> Result<()> {
    if dist.world() == 1 {
        return Ok(());
    }
    let mut parts: Vec<&mut [f32]> = tensors.iter_mut().map(|t| t.as_mut_slice()).collect();
    reduce_parts(&mut parts, BUCKET, |x| dist.all_reduce_f32(x))
}

/// Elements per collective when many tensors are reduced: the staging copy is one bucket, not
/// all of them.
const BUCKET: usize = 1 << 24;

/// Runs `reduce` over consecutive pieces of `parts` packed into buckets of `bucket` elements (a
/// larger tensor is split). Sums are element-wise, so the bucketing changes no bit.
fn reduce_parts<T: Copy + Default>(
    parts: &mut [&mut [T]],
    bucket: usize,
    mut reduce: impl FnMut(&mut [T]) -> Result<()>,
) -> Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if total == 0 {
        return Ok(());
    }
    let mut buf = vec![T::default(); total.min(bucket)];
    let (mut part, mut off) = (0, 0);
    while part < parts.len() {
        // (part, offset, length) of each piece in the bucket.
        let (mut pieces, mut n) = (Vec::new(), 0);
        while part < parts.len() && n < buf.len() {
            let k = (parts[part].len() - off).min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&parts[part][off..off + k]);
            pieces.push((part, off, k));
            (n, off) = (n + k, off + k);
            if off == parts[part].len() {
                (part, off) = (part + 1, 0);
            }
        }
        if n == 0 {
            continue;
        }
        reduce(&mut buf[..n])?;
        let mut at = 0;
        for (p, o, k) in pieces {
            parts[p][o..o + k].copy_from_slice(&buf[at..at + k]);
            at += k;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_reduced_in_full_buckets_each_element_once() {
        let mut t: Vec<Vec<u64>> = [0, 5, 3, 0, 10, 1].iter().map(|&n| (0..n).map(|i| 100 * n + i).collect()).collect();
        let want: Vec<Vec<u64>> = t.iter().map(|v| v.iter().map(|x| x + 1).collect()).collect();
        let mut sizes = Vec::new();
        let mut parts: Vec<&mut [u64]> = t.iter_mut().map(|v| v.as_mut_slice()).collect();
        reduce_parts(&mut parts, 4, |x| {
            sizes.push(x.len());
            x.iter_mut().for_each(|v| *v += 1);
            Ok(())
        })
        .unwrap();
        assert_eq!(t, want);
        assert_eq!(sizes, [4, 4, 4, 4, 3]);
    }

    fn vars(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> =
            kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_slurm_and_nothing_describe_a_rank() {
        let t = Rank::from_vars(vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("SLURM_PROCID", "3"),
        ]))
        .unwrap();
        assert_eq!((t.rank, t.world, t.local_rank, t.local_world, t.launcher), (5, 16, 1, 8, "torchrun"));
        assert_eq!(t.master, "node0:29500");
        let s = Rank::from_vars(vars(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "8(x2)"),
            ("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap();
        assert_eq!((s.rank, s.world, s.local_rank, s.local_world, s.launcher), (9, 16, 1, 8, "slurm"));
        assert_eq!(s.master, format!("10.0.0.7:{}", 20000 + 123456 % 20000));
        assert_eq!(Rank::from_vars(vars(&[])).unwrap(), Rank::single());
        // One task of an allocation is one rank, with no rendezvous.
        let one = Rank::from_vars(vars(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")])).unwrap();
        assert_eq!((one.world, one.master.as_str()), (1, ""));
    }

    #[test]
    fn bad_launcher_variables_are_named() {
        let e = |kv: &[(&str, &str)]| format!("{:#}", Rank::from_vars(vars(kv)).unwrap_err());
        assert!(e(&[("RANK", "0")]).contains("$WORLD_SIZE is not"));
        assert!(e(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("$RANK = \"x\" is not a number"));
        assert!(e(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("rank 2 is outside a world of 2"));
        assert!(e(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("$MASTER_ADDR is not set"));
        assert!(e(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]).contains("$MASTER_PORT is not set"));
        assert!(e(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")])
            .contains("not a TCP port"));
    }

    #[test]
    fn ranks_take_equal_consecutive_blocks_of_micro_batches() {
        let mine = |rank: usize, world: usize, m: usize| -> Vec<usize> {
            let d = Dist { rank: Rank { rank, world, ..Rank::single() }, comm: None };
            (0..m).filter(|&k| d.mine(k, m)).collect()
        };
        assert_eq!(mine(0, 1, 3), [0, 1, 2]);
        assert_eq!(mine(1, 2, 4), [2, 3]);
        assert_eq!(mine(3, 4, 8), [6, 7]);
        let d = Dist { rank: Rank { rank: 0, world: 4, ..Rank::single() }, comm: None };
        assert!(d.check_micro_batches(8).is_ok());
        assert!(format!("{}", d.check_micro_batches(6).unwrap_err()).contains("multiple of the world size 4"));
    }
}
