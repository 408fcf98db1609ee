//! Collectives between processes over TCP, for the cpu backend and for tests: rank 0 is the hub.
//! Each collective, every other rank sends its part to rank 0, which reduces the parts in rank
//! order and sends each rank its answer. Every frame carries the collective's number and kind,
//! so ranks that drift apart are named rather than mixed up; a connection that closes (the rank
//! died) or stays silent past the timeout fails the collective on rank 0, which tells the others
//! which rank it was before failing itself.

use super::{Collective, Rank};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x5650_4d44; // "VPMD"
const ABORT: u8 = 0xff;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AllReduceF32 = 1,
    AllReduceF64,
    AllReduceU64,
    AllMaxF64,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
}

struct Links {
    /// Collectives run so far.
    seq: u64,
    /// Rank 0: the stream of every other rank (index 0 unused). Others: the stream to rank 0.
    peers: Vec<Option<TcpStream>>,
    /// The first failure: every later collective fails with it.
    failed: Option<String>,
}

pub struct TcpCollective {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Links>,
}

fn header(op: u8, seq: u64, len: usize) -> [u8; 21] {
    let mut h = [0u8; 21];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = op;
    h[5..13].copy_from_slice(&seq.to_le_bytes());
    h[13..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

fn send(s: &mut TcpStream, op: u8, seq: u64, payload: &[u8]) -> std::io::Result<()> {
    s.write_all(&header(op, seq, payload.len()))?;
    s.write_all(payload)?;
    s.flush()
}

/// Why a read failed, in words (`who` names the peer).
fn io_why(e: &std::io::Error, who: &str, what: &str, timeout: Duration) -> String {
    match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => {
            format!("{who} exited (its connection closed) before {what} completed")
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("{who} did not reach {what} within {:.0} s ($VPMOE_DIST_TIMEOUT)", timeout.as_secs_f64())
        }
        _ => format!("{who}: {e} during {what}"),
    }
}

/// Reads one frame: `(op, seq, payload)`.
fn recv(s: &mut TcpStream) -> std::io::Result<(u8, u64, Vec<u8>)> {
    let mut h = [0u8; 21];
    s.read_exact(&mut h)?;
    let magic = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("not a vpmoe frame (magic {magic:#x})")));
    }
    let seq = u64::from_le_bytes(h[5..13].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(h[13..].try_into().expect("8 bytes")) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((h[4], seq, payload))
}

impl TcpCollective {
    /// Rank 0 listens on `MASTER_PORT` (every interface) until every other rank has said hello;
    /// the others connect to `MASTER_ADDR:MASTER_PORT`, retrying until rank 0 is up. Either fails
    /// after `timeout`, naming who is missing.
    pub fn connect(r: &Rank, timeout: Duration) -> Result<TcpCollective> {
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..r.world).map(|_| None).collect();
        let port = r.master.rsplit_once(':').map(|(_, p)| p).context("MASTER_ADDR:MASTER_PORT")?;
        if r.rank == 0 {
            let listener = TcpListener::bind(format!("0.0.0.0:{port}"))
                .with_context(|| format!("rank 0: listening on port {port} ($MASTER_PORT) for the other ranks"))?;
            listener.set_nonblocking(true)?;
            let mut joined = 1;
            while joined < r.world {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false)?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        let mut hello = [0u8; 12];
                        s.read_exact(&mut hello).with_context(|| format!("reading the hello of {from}"))?;
                        let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes"));
                        let (magic, rank, world) = (word(0), word(4) as usize, word(8) as usize);
                        if magic != MAGIC {
                            eprintln!("rank 0: ignoring a connection from {from} that is not a vpmoe rank");
                            continue;
                        }
                        if world != r.world {
                            bail!(
                                "rank {rank} (from {from}) says the world has {world} ranks, rank 0 says {}",
                                r.world
                            );
                        }
                        if rank == 0 || rank >= r.world || peers[rank].is_some() {
                            bail!("a second process (from {from}) claims rank {rank} of {}", r.world);
                        }
                        s.set_nodelay(true)?;
                        peers[rank] = Some(s);
                        joined += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> =
                                (1..r.world).filter(|&k| peers[k].is_none()).map(|k| k.to_string()).collect();
                            bail!(
                                "rank 0: ranks {} did not connect to {} within {:.0} s",
                                missing.join(", "),
                                r.master,
                                timeout.as_secs_f64()
                            );
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e).context("rank 0: accepting a rank"),
                }
            }
        } else {
            let addr = r
                .master
                .to_socket_addrs()
                .with_context(|| format!("resolving MASTER_ADDR:MASTER_PORT {}", r.master))?
                .next()
                .with_context(|| format!("{} resolves to no address", r.master))?;
            let mut s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        bail!(
                            "rank {}: could not reach rank 0 at {} within {:.0} s: {e}",
                            r.rank,
                            r.master,
                            timeout.as_secs_f64()
                        )
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let mut hello = Vec::with_capacity(12);
            for w in [MAGIC, r.rank as u32, r.world as u32] {
                hello.extend_from_slice(&w.to_le_bytes());
            }
            s.write_all(&hello).with_context(|| format!("rank {}: greeting rank 0", r.rank))?;
            s.set_nodelay(true)?;
            peers[0] = Some(s);
        }
        Ok(TcpCollective {
            rank: r.rank,
            world: r.world,
            timeout,
            links: Mutex::new(Links { seq: 0, peers, failed: None }),
        })
    }

    /// One collective: every rank's `payload` goes to rank 0, `answer` turns them (in rank
    /// order) into each rank's reply, and this rank's reply comes back.
    fn exchange(
        &self,
        op: Op,
        payload: Vec<u8>,
        answer: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>,
    ) -> Result<Vec<u8>> {
        let mut l = self.links.lock().map_err(|_| anyhow!("collective poisoned by a panic"))?;
        if let Some(f) = &l.failed {
            bail!("{f}");
        }
        l.seq += 1;
        let seq = l.seq;
        let what = format!("collective #{seq} ({op:?})");
        let out = if self.rank == 0 {
            self.hub(&mut l, op, seq, payload, answer, &what)
        } else {
            self.leaf(&mut l, op, seq, payload, &what)
        };
        if let Err(e) = &out {
            l.failed = Some(format!("{e:#}"));
        }
        out
    }

    fn hub(
        &self,
        l: &mut Links,
        op: Op,
        seq: u64,
        payload: Vec<u8>,
        answer: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>,
        what: &str,
    ) -> Result<Vec<u8>> {
        let mut parts = vec![payload];
        let mut fail = None;
        for r in 1..self.world {
            let s = l.peers[r].as_mut().expect("rank 0 holds every rank's stream");
            s.set_read_timeout(Some(self.timeout))?;
            match recv(s) {
                Ok((o, q, p)) if o == op as u8 && q == seq => parts.push(p),
                Ok((o, q, _)) => {
                    fail = Some(format!("rank {r} is at collective #{q} (kind {o}) while rank 0 is at {what}"));
                    break;
                }
                Err(e) => {
                    fail = Some(io_why(&e, &format!("rank {r}"), what, self.timeout));
                    break;
                }
            }
        }
        let replies = match fail {
            None => answer(parts).map_err(|e| format!("{what}: {e:#}")),
            Some(f) => Err(f),
        };
        let replies = match replies {
            Ok(r) => r,
            Err(why) => {
                // Tell every rank still there why the job ends, then end.
                for s in l.peers.iter_mut().flatten() {
                    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                    let _ = send(s, ABORT, seq, why.as_bytes());
                }
                bail!("{why}");
            }
        };
        let mut mine = None;
        for (r, reply) in replies.into_iter().enumerate() {
            if r == 0 {
                mine = Some(reply);
                continue;
            }
            let s = l.peers[r].as_mut().expect("rank 0 holds every rank's stream");
            s.set_write_timeout(Some(self.timeout))?;
            send(s, op as u8, seq, &reply)
                .map_err(|e| anyhow!(io_why(&e, &format!("rank {r}"), what, self.timeout)))?;
        }
        Ok(mine.expect("a reply for rank 0"))
    }

    fn leaf(&self, l: &mut Links, op: Op, seq: u64, payload: Vec<u8>, what: &str) -> Result<Vec<u8>> {
        let s = l.peers[0].as_mut().expect("a rank holds rank 0's stream");
        s.set_write_timeout(Some(self.timeout))?;
        send(s, op as u8, seq, &payload).map_err(|e| anyhow!(io_why(&e, "rank 0", what, self.timeout)))?;
        // Rank 0 waits up to the timeout for the slowest rank, then says why.
        s.set_read_timeout(Some(self.timeout + Duration::from_secs(30)))?;
        match recv(s) {
            Ok((ABORT, _, why)) => bail!("rank {} stops: {}", self.rank, String::from_utf8_lossy(&why)),
            Ok((o, q, p)) if o == op as u8 && q == seq => Ok(p),
            Ok((o, q, _)) => bail!("rank 0 answered collective #{q} (kind {o}) to rank {}'s {what}", self.rank),
            Err(e) => bail!(io_why(&e, "rank 0", what, self.timeout)),
        }
    }

    fn reduce<T: bytemuck::Pod>(&self, op: Op, x: &mut [T], add: fn(T, T) -> Result<T>) -> Result<()> {
        let n = x.len();
        let reply = self.exchange(op, bytemuck::cast_slice(x).to_vec(), |parts| {
            let sum = sum_parts(&parts, n, add)?;
            Ok(vec![bytemuck::cast_slice(&sum).to_vec(); parts.len()])
        })?;
        x.copy_from_slice(&from_bytes::<T>(&reply));
        Ok(())
    }
}

/// Bytes (any alignment) as elements.
fn from_bytes<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
    let n = b.len() / std::mem::size_of::<T>();
    let mut v = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&b[..n * std::mem::size_of::<T>()]);
    v
}

/// The parts (each `n` elements as bytes) summed in rank order.
fn sum_parts<T: bytemuck::Pod>(parts: &[Vec<u8>], n: usize, add: fn(T, T) -> Result<T>) -> Result<Vec<T>> {
    let mut sum: Vec<T> = from_bytes(&parts[0]);
    for (r, p) in parts.iter().enumerate().skip(1) {
        let p: Vec<T> = from_bytes(p);
        if p.len() != n {
            bail!("rank {r} contributed {} elements, rank 0 {n}", p.len());
        }
        for (a, b) in sum.iter_mut().zip(p) {
            *a = add(*a, b)?;
        }
    }
    Ok(sum)
}

fn check_counts(counts: &[usize], world: usize, what: &str) -> Result<()> {
    if counts.len() != world {
        bail!("{what}: {} counts for {world} ranks", counts.len());
    }
    Ok(())
}

impl Collective for TcpCollective {
    fn all_reduce_f32(&self, x: &mut [f32]) -> Result<()> {
        self.reduce(Op::AllReduceF32, x, |a, b| Ok(a + b))
    }

    fn all_reduce_f64(&self, x: &mut [f64]) -> Result<()> {
        self.reduce(Op::AllReduceF64, x, |a, b| Ok(a + b))
    }

    fn all_reduce_u64(&self, x: &mut [u64]) -> Result<()> {
        self.reduce(Op::AllReduceU64, x, |a, b| a.checked_add(b).context("u64 sum overflows"))
    }

    fn all_max_f64(&self, x: &mut [f64]) -> Result<()> {
        self.reduce(Op::AllMaxF64, x, |a, b| Ok(a.max(b)))
    }

    fn reduce_scatter_f32(&self, x: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        check_counts(counts, self.world, "reduce-scatter")?;
        let n = x.len();
        if counts.iter().sum::<usize>() != n {
            bail!("reduce-scatter: counts add up to {}, the buffer has {n}", counts.iter().sum::<usize>());
        }
        let counts = counts.to_vec();
        let reply = self.exchange(Op::ReduceScatter, bytemuck::cast_slice(x).to_vec(), move |parts| {
            let sum = sum_parts::<f32>(&parts, n, |a, b| Ok(a + b))?;
            let mut at = 0;
            Ok(counts
                .iter()
                .map(|&c| {
                    at += c;
                    bytemuck::cast_slice(&sum[at - c..at]).to_vec()
                })
                .collect())
        })?;
        Ok(from_bytes(&reply))
    }

    fn all_gather_f32(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        check_counts(counts, self.world, "all-gather")?;
        if mine.len() != counts[self.rank] {
            bail!("all-gather: rank {} has {} elements, {} expected", self.rank, mine.len(), counts[self.rank]);
        }
        let counts = counts.to_vec();
        let reply = self.exchange(Op::AllGather, bytemuck::cast_slice(mine).to_vec(), move |parts| {
            let mut all = Vec::new();
            for (r, p) in parts.iter().enumerate() {
                if p.len() != 4 * counts[r] {
                    bail!("rank {r} contributed {} elements, {} expected", p.len() / 4, counts[r]);
                }
                all.extend_from_slice(p);
            }
            Ok(vec![all; parts.len()])
        })?;
        Ok(from_bytes(&reply))
    }

    fn broadcast(&self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        if root >= self.world {
            bail!("broadcast from rank {root} of {}", self.world);
        }
        let mine = if self.rank == root { std::mem::take(bytes) } else { Vec::new() };
        *bytes = self.exchange(Op::Broadcast, mine, move |parts| Ok(vec![parts[root].clone(); parts.len()]))?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(Op::Barrier, Vec::new(), |parts| Ok(vec![Vec::new(); parts.len()])).map(drop)
    }
}
