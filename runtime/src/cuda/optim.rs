//! The optimizer on the device (MODEL.md §7.1; kernels in `codegen/cuda/optim.cuh`). fp32
//! masters, accumulated gradients and optimizer state stay on the GPU in one set of buffers per
//! group, each laid out member after member: a Normuon shape family is then one contiguous
//! `[matrices, rows, cols]` batch (no gather), and an AdamW class (model dtype × decay) is one
//! element-wise launch. The model copies live in the same order, so every kernel that updates a
//! master also writes its bf16/f32 copy. Frozen parameters (the expert biases) stay on the host,
//! where their sign update is computed exactly as on the cpu backend.
//!
//! A step: the sum of squares of every optimizer unit ([`crate::dist::zero`]; f64, added on the
//! host in unit order: the global norm and the clip coefficient; a non-finite one names its
//! parameter before anything changes); the expert-bias update; each Normuon family in chunks of
//! at most [`CHUNK_BYTES`] of scratch (momentum, five batched Polar Express iterations, row
//! normalisation, update); AdamW per class. Everything but Polar Express is bitwise the host's.
//!
//! ZeRO-1 ([`Placement::shard`]): every rank keeps the gradient sums and model copies of the
//! whole model (what the plan's kernels read and write), and the masters and moments of its own
//! units only, in groups of the same order holding just those units. A step reduces each rank's
//! units of the gradient sums to it (packed through a staging buffer, [`chunks`]), the owner
//! updates them with the same kernels — a unit's arithmetic does not depend on where it lies, so
//! the masters are bitwise the replicated optimizer's — and each owner broadcasts its new model
//! copies into every rank's.

use super::bind::{Param, Region};
use super::device::{copy, download, DevBuf, Gpu};
use super::exec::Launcher;
use super::link::Link;
use crate::backend::{StepScalars, StepStats};
use crate::dist::zero::{self, Shard, Unit};
use crate::dist::Dist;
use crate::state::TrainState;
use anyhow::{bail, Result};
use vpmoe_codegen::optim::{self as ok, Polar};
use vpmoe_compiler::Plan;
use vpmoe_ir::optim::{clip_coefficient, AdamHyper};
use vpmoe_ir::{DType, OptGroup};

/// Scratch for one Polar Express chunk (U/O, two X, A, B): bounds the optimizer's workspace.
pub const CHUNK_BYTES: u64 = 1 << 30;
/// ZeRO-1's staging buffer for packing a rank's gradient sums or model copies.
pub const STAGE_BYTES: u64 = 256 << 20;
const NODE: &str = "optimizer";

/// Where a rank's optimizer lives.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    /// The Normuon momenta in pinned host memory (see [`DeviceOptimizer::new`]).
    pub host_momentum: bool,
    /// ZeRO-1 over this job's ranks: this rank holds the masters and moments of its units only.
    pub shard: Option<Dist>,
}

impl Placement {
    /// `(rank, world)` of a sharded optimizer.
    pub fn shard_of(&self) -> Option<(usize, usize)> {
        self.shard.as_ref().map(|d| (d.rank.rank, d.world()))
    }
}

/// One run of a parameter's elements in a group: where it starts in the parameter (`lo`,
/// `v_lo`) and in the group's buffers (`off`, `v_off`), and its length, for the master (=
/// gradient, first moment, model copy) and for the second moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub param: usize,
    pub lo: u64,
    pub off: u64,
    pub len: u64,
    pub v_lo: u64,
    pub v_off: u64,
    pub v_len: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Normuon { rows: u64, cols: u64, matrices: u64 },
    AdamW { f32_model: bool, decay: bool },
}

/// The group layout, computed from the plan alone (tested without a GPU).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupLayout {
    pub kind: Kind,
    pub members: Vec<Member>,
    /// The optimizer units the group holds, in buffer order: they tile it.
    pub units: Vec<usize>,
    pub len: u64,
    pub v_len: u64,
}

impl GroupLayout {
    pub fn model_dtype(&self) -> DType {
        match self.kind {
            Kind::AdamW { f32_model: true, .. } => DType::F32,
            _ => DType::Bf16,
        }
    }
}

/// Normuon families in plan order, then AdamW classes (bf16/f32 model × decay) in table order,
/// each holding the units of `units` that `keep` accepts (all of them: the whole optimizer; a
/// rank's: its ZeRO-1 share). A group holding none of them keeps its place, empty, so the
/// groups of every rank line up.
pub fn layout(plan: &Plan, units: &[Unit], keep: impl Fn(usize) -> bool) -> Vec<GroupLayout> {
    // Each parameter's units are consecutive.
    let mut of_param: Vec<Option<(usize, usize)>> = vec![None; plan.params.len()];
    for (k, u) in units.iter().enumerate() {
        let r = &mut of_param[u.param];
        *r = Some((r.map_or(k, |r| r.0), k + 1));
    }
    let mut groups = Vec::new();
    let mut push = |kind, params: Vec<usize>| {
        if params.is_empty() {
            return;
        }
        let mut g = GroupLayout { kind, members: Vec::new(), units: Vec::new(), len: 0, v_len: 0 };
        for i in params {
            let (lo, hi) = of_param[i].unwrap_or((0, 0));
            for k in (lo..hi).filter(|&k| keep(k)) {
                let u = &units[k];
                let (n, nv) = (u.len() as u64, zero::v_len(u) as u64);
                match g.members.last_mut() {
                    Some(m) if m.param == i && m.lo + m.len == u.lo as u64 => {
                        (m.len, m.v_len) = (m.len + n, m.v_len + nv)
                    }
                    _ => g.members.push(Member {
                        param: i,
                        lo: u.lo as u64,
                        off: g.len,
                        len: n,
                        v_lo: u.v.0 as u64,
                        v_off: g.v_len,
                        v_len: nv,
                    }),
                }
                g.units.push(k);
                g.len += n;
                g.v_len += nv;
            }
        }
        groups.push(g);
    };
    for f in &plan.optimizer.families {
        let kind = Kind::Normuon { rows: f.rows, cols: f.cols, matrices: f.matrices() };
        push(kind, f.members.iter().map(|m| m.param as usize).collect());
    }
    for f32_model in [false, true] {
        for decay in [true, false] {
            let ps = plan.optimizer.adamw.iter().map(|&i| i as usize).filter(|&i| {
                let p = &plan.params[i];
                (p.ty.dtype == DType::F32) == f32_model && p.weight_decay == decay
            });
            push(Kind::AdamW { f32_model, decay }, ps.collect());
        }
    }
    groups
}

/// The whole optimizer's groups.
pub fn whole_layout(plan: &Plan) -> Vec<GroupLayout> {
    layout(plan, &zero::units(plan), |_| true)
}

/// Rank `rank`'s runs of each group's units in the whole layout's buffers, `(element offset,
/// count)`, consecutive runs joined: what it receives of the gradient sums and sends of the
/// model copies.
pub fn runs(whole: &[GroupLayout], mine: &[GroupLayout]) -> Vec<Vec<(u64, u64)>> {
    whole
        .iter()
        .zip(mine)
        .map(|(w, g)| {
            let mut out: Vec<(u64, u64)> = Vec::new();
            for m in &g.members {
                let at = w.members.iter().find(|x| x.param == m.param).expect("a member of the whole group");
                let off = at.off + m.lo;
                match out.last_mut() {
                    Some(r) if r.0 + r.1 == off => r.1 += m.len,
                    _ => out.push((off, m.len)),
                }
            }
            out
        })
        .collect()
}

/// Pieces `(element offset, count)` of a whole group's buffer.
pub type Pieces = Vec<(u64, u64)>;

/// A rank's runs cut for a staging buffer of `cap` elements: each chunk is where it starts in
/// the rank's own group buffer and its pieces of the whole buffer, at most `cap` elements in all.
pub fn chunks(runs: &[(u64, u64)], cap: u64) -> Vec<(u64, Pieces)> {
    let cap = cap.max(1);
    let mut out = Vec::new();
    let (mut pos, mut cur, mut fill) = (0, Pieces::new(), 0);
    for &(mut off, mut n) in runs {
        while n > 0 {
            let take = n.min(cap - fill);
            cur.push((off, take));
            (off, n, fill) = (off + take, n - take, fill + take);
            if fill == cap {
                out.push((pos, std::mem::take(&mut cur)));
                (pos, fill) = (pos + cap, 0);
            }
        }
    }
    if fill > 0 {
        out.push((pos, cur));
    }
    out
}

/// Polar Express chunk scratch: the largest any family needs.
fn scratch_bytes(groups: &[GroupLayout]) -> u64 {
    let per = |g: &GroupLayout| match g.kind {
        Kind::Normuon { rows, cols, matrices } => {
            let p = Polar::new(rows, cols);
            p.chunk(matrices, CHUNK_BYTES) * p.scratch_per_matrix()
        }
        Kind::AdamW { .. } => 0,
    };
    groups.iter().map(per).max().unwrap_or(0)
}

/// A rank's groups: the whole optimizer's, or with ZeRO-1 (`shard`: rank, world) its share.
fn own_layout(plan: &Plan, units: &[Unit], shard: Option<(usize, usize)>) -> Vec<GroupLayout> {
    match shard {
        None => layout(plan, units, |_| true),
        Some((rank, world)) => {
            let owners = zero::owners(units, world);
            layout(plan, units, |k| owners[k] == rank)
        }
    }
}

/// Bytes of the Normuon momenta a rank holds (fp32, one per matrix element; `shard` as in
/// [`planned_bytes`]): what `host_momentum` moves off the device.
pub fn momentum_bytes(plan: &Plan, shard: Option<(usize, usize)>) -> u64 {
    momenta(&own_layout(plan, &zero::units(plan), shard))
}

/// Bytes of the Normuon momenta of `groups`.
fn momenta(groups: &[GroupLayout]) -> u64 {
    groups.iter().filter(|g| matches!(g.kind, Kind::Normuon { .. })).map(|g| g.len * 4).sum()
}

/// Device bytes the optimizer allocates for `plan` on one rank (`shard`: ZeRO-1's rank and
/// world): gradient sums and model copies of the whole model; fp32 masters, first moments (the
/// Normuon ones only without `host_momentum`) and second moments of the rank's groups (with
/// ZeRO-1 also their gradient sums, model copies and the staging buffer); frozen parameters,
/// unit sums and tables, and Polar Express scratch.
pub fn planned_bytes(plan: &Plan, host_momentum: bool, shard: Option<(usize, usize)>) -> u64 {
    let units = zero::units(plan);
    let whole = layout(plan, &units, |_| true);
    let own = own_layout(plan, &units, shard);
    let shared: u64 = whole.iter().map(|g| g.len * (4 + g.model_dtype().bytes())).sum();
    let mut state: u64 = own.iter().map(|g| g.len * 8 + g.v_len * 4).sum();
    if shard.is_some() {
        state += own.iter().map(|g| g.len * (4 + g.model_dtype().bytes())).sum::<u64>() + stage_bytes(&whole);
    }
    let state = state - if host_momentum { momenta(&own) } else { 0 };
    let frozen: u64 =
        plan.params.iter().filter(|p| p.opt == OptGroup::Frozen).map(|p| p.numel * p.ty.dtype.bytes()).sum();
    let tables = (units.len() + own.len()) as u64 * 8 + units.len() as u64 * 8;
    shared + state + frozen + tables + scratch_bytes(&own)
}

/// The staging buffer: [`STAGE_BYTES`], or less where the largest group is smaller.
fn stage_bytes(whole: &[GroupLayout]) -> u64 {
    whole.iter().map(|g| g.len * 4).max().unwrap_or(0).min(STAGE_BYTES)
}

/// Each unit a rank's groups hold, in unit order: `(unit, group, element offset, second-moment
/// offset)` in the group's buffers.
fn places(units: &[Unit], groups: &[Group]) -> Vec<(usize, usize, u64, u64)> {
    let mut out = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let (mut off, mut v_off) = (0u64, 0u64);
        for &k in &g.lay.units {
            out.push((k, gi, off, v_off));
            off += units[k].len() as u64;
            v_off += zero::v_len(&units[k]) as u64;
        }
    }
    out.sort_unstable();
    out
}

/// A view of device memory: an allocation or part of one.
#[derive(Clone, Copy, Debug)]
struct View {
    ptr: u64,
    bytes: u64,
}

impl From<&DevBuf> for View {
    fn from(b: &DevBuf) -> View {
        View { ptr: b.ptr, bytes: b.bytes as u64 }
    }
}

fn ptr(addr: u64, dtype: DType, bytes: u64) -> Param {
    Param::Ptr(addr, Some(Region { addr, bytes, dtype }))
}

/// `buf` from element `elem` on.
fn at(buf: View, elem: u64, dtype: DType) -> Param {
    let off = elem * dtype.bytes();
    ptr(buf.ptr + off, dtype, buf.bytes - off)
}

/// The gradient sums and model copies of a whole group: what the plan's kernels use.
struct Whole {
    lay: GroupLayout,
    grad: DevBuf,
    model: DevBuf,
}

/// A group this rank updates: the whole group's buffers (replicated), or its share's own.
struct Group {
    lay: GroupLayout,
    master: DevBuf,
    m: DevBuf,
    v: DevBuf,
    grad: View,
    model: View,
    /// Where its unit boundaries (`opt_sumsq`'s `starts`) are.
    starts: u64,
}

/// ZeRO-1's bookkeeping on one rank.
struct Zero {
    dist: Dist,
    owners: Vec<usize>,
    /// Per group, per rank: that rank's runs of the whole group ([`runs`]).
    runs: Vec<Vec<Vec<(u64, u64)>>>,
    stage: DevBuf,
    /// This rank's gradient sums and model copies of its groups.
    _own: Vec<DevBuf>,
}

pub struct DeviceOptimizer {
    units: Vec<Unit>,
    whole: Vec<Whole>,
    groups: Vec<Group>,
    zero: Option<Zero>,
    /// Host masters of the frozen parameters, their device copies, and the step count.
    host: TrainState,
    frozen: Vec<(usize, DevBuf)>,
    /// Per trainable parameter (plan order): its index, whole group and member index.
    trainable: Vec<(usize, usize, usize)>,
    /// Every group's unit boundaries (i64; the groups point into it), and one f64 sum per unit.
    _tables: DevBuf,
    sums: DevBuf,
    scratch: DevBuf,
    /// The next micro-batch starts the step's sums (its kernels store instead of adding).
    first: bool,
}

impl DeviceOptimizer {
    /// Allocates every group and uploads `st` (the masters, model copies and optimizer state;
    /// with ZeRO-1 only this rank's units of the masters and moments). With
    /// `placement.host_momentum` the Normuon momenta live in pinned host memory that `pe_start`
    /// reads and writes over PCIe (once each per step): the same kernels and arithmetic, so the
    /// same state bit for bit, with ≈ 20 GiB less on the device for the locked config.
    pub fn new(gpu: &Gpu, plan: &Plan, st: TrainState, placement: &Placement) -> Result<DeviceOptimizer> {
        if let Some(p) = plan.params.iter().find(|p| p.opt == OptGroup::Normuon && p.ty.dtype != DType::Bf16) {
            bail!(
                "Normuon parameter {} is {}; the device optimizer writes bf16 model copies for Normuon",
                p.name,
                p.ty.dtype.name()
            );
        }
        let units = zero::units(plan);
        let mut whole = Vec::new();
        for lay in layout(plan, &units, |_| true) {
            let what = |b: &str| format!("{b} of {:?}", lay.kind);
            whole.push(Whole {
                grad: DevBuf::new(gpu, (lay.len * 4) as usize, &what("fp32 gradients"))?,
                model: DevBuf::new(gpu, (lay.len * lay.model_dtype().bytes()) as usize, &what("model copies"))?,
                lay,
            });
        }
        let own = own_layout(plan, &units, placement.shard_of());
        // Unit boundaries of every group, back to back.
        let mut table: Vec<i64> = Vec::new();
        let mut starts_at = Vec::new();
        for g in &own {
            starts_at.push(table.len() as u64 * 8);
            let mut s = 0i64;
            table.push(0);
            for &k in &g.units {
                s += units[k].len() as i64;
                table.push(s);
            }
        }
        let tables = DevBuf::new(gpu, table.len() * 8, "optimizer unit boundaries")?;
        tables.upload_at(0, &table)?;
        let mut own_bufs = Vec::new();
        let mut groups = Vec::new();
        for ((lay, w), s) in own.into_iter().zip(&whole).zip(starts_at) {
            let what = |b: &str| format!("{b} of {:?}", lay.kind);
            let f32b = (lay.len * 4) as usize;
            let (grad, model) = match placement.shard {
                None => (View::from(&w.grad), View::from(&w.model)),
                Some(_) => {
                    own_bufs.push(DevBuf::new(gpu, f32b, &what("this rank's fp32 gradients"))?);
                    let g = View::from(own_bufs.last().expect("pushed"));
                    let mb = (lay.len * lay.model_dtype().bytes()) as usize;
                    own_bufs.push(DevBuf::new(gpu, mb, &what("this rank's model copies"))?);
                    (g, View::from(own_bufs.last().expect("pushed")))
                }
            };
            groups.push(Group {
                master: DevBuf::new(gpu, f32b, &what("fp32 masters"))?,
                m: match (placement.host_momentum, &lay.kind) {
                    (true, Kind::Normuon { .. }) => DevBuf::new_mapped(gpu, f32b, &what("momenta"))?,
                    _ => DevBuf::new(gpu, f32b, &what("first moments"))?,
                },
                v: DevBuf::new(gpu, (lay.v_len * 4) as usize, &what("second moments"))?,
                grad,
                model,
                starts: tables.ptr + s,
                lay,
            });
        }
        let zero = match &placement.shard {
            None => None,
            Some(dist) => {
                let world = dist.world();
                let owners = zero::owners(&units, world);
                let lays: Vec<GroupLayout> = whole.iter().map(|w| w.lay.clone()).collect();
                let per_rank: Vec<Vec<Vec<(u64, u64)>>> =
                    (0..world).map(|r| runs(&lays, &layout(plan, &units, |k| owners[k] == r))).collect();
                let runs = (0..lays.len()).map(|g| per_rank.iter().map(|r| r[g].clone()).collect()).collect();
                let stage = DevBuf::new(gpu, stage_bytes(&lays) as usize, "the ZeRO-1 staging buffer")?;
                Some(Zero { dist: dist.clone(), owners, runs, stage, _own: own_bufs })
            }
        };
        let mut frozen = Vec::new();
        for (i, p) in plan.params.iter().enumerate() {
            if p.opt == OptGroup::Frozen {
                frozen.push((i, DevBuf::new(gpu, (p.numel * p.ty.dtype.bytes()) as usize, &p.name)?));
            }
        }
        let mut trainable = Vec::new();
        for (i, p) in plan.params.iter().enumerate() {
            if !p.trainable() {
                continue;
            }
            let (g, k) = whole
                .iter()
                .enumerate()
                .find_map(|(g, w)| w.lay.members.iter().position(|m| m.param == i).map(|k| (g, k)))
                .ok_or_else(|| anyhow::anyhow!("trainable parameter {} is in no optimizer group", p.name))?;
            trainable.push((i, g, k));
        }
        let lays: Vec<GroupLayout> = groups.iter().map(|g| g.lay.clone()).collect();
        let mut o = DeviceOptimizer {
            sums: DevBuf::new(gpu, units.len() * 8, "optimizer unit sums of squares")?,
            units,
            whole,
            groups,
            zero,
            host: st,
            frozen,
            trainable,
            _tables: tables,
            scratch: DevBuf::new(gpu, scratch_bytes(&lays) as usize, "Polar Express scratch")?,
            first: true,
        };
        o.upload(None)?;
        Ok(o)
    }

    /// ZeRO-1: `(rank, world)` of this rank's share.
    pub fn shard_of(&self) -> Option<(usize, usize)> {
        self.zero.as_ref().map(|z| (z.dist.rank.rank, z.dist.world()))
    }

    /// Device address of every parameter's model copy, in plan order.
    pub fn model_ptrs(&self, n_params: usize) -> Vec<u64> {
        let mut out = vec![0; n_params];
        for w in &self.whole {
            let b = w.lay.model_dtype().bytes();
            for m in &w.lay.members {
                out[m.param] = w.model.ptr + m.off * b;
            }
        }
        for (i, buf) in &self.frozen {
            out[*i] = buf.ptr;
        }
        out
    }

    /// Uploads the host state — the model copies of every parameter, the masters and moments of
    /// this rank's groups (with ZeRO-1 from `share` when given: the host state then has no
    /// moments) — then drops the uploaded tensors from it (the device copy is the truth; the
    /// locked config's would otherwise keep 69 GiB of host memory).
    fn upload(&mut self, share: Option<Shard>) -> Result<()> {
        let st = &mut self.host;
        for w in &self.whole {
            for m in &w.lay.members {
                let x = &st.master[m.param];
                match w.lay.model_dtype() {
                    DType::F32 => w.model.upload_at(m.off as usize * 4, x)?,
                    _ => {
                        let b: Vec<half::bf16> = x.iter().map(|&x| half::bf16::from_f32(x)).collect();
                        w.model.upload_at(m.off as usize * 2, &b)?
                    }
                }
            }
        }
        match &self.zero {
            None => {
                for g in &self.groups {
                    for m in &g.lay.members {
                        let (i, e, v) = (m.param, m.lo as usize..(m.lo + m.len) as usize, m.v_lo as usize..);
                        g.master.upload_at(m.off as usize * 4, &st.master[i][e.clone()])?;
                        g.m.upload_at(m.off as usize * 4, &st.m[i][e])?;
                        g.v.upload_at(m.v_off as usize * 4, &st.v[i][v][..m.v_len as usize])?;
                    }
                }
            }
            Some(z) => {
                let sh = match share {
                    Some(sh) => sh,
                    None => Shard::take(&self.units, &z.owners, z.dist.rank.rank, st),
                };
                let (mut a, mut b) = (0, 0);
                for (k, gi, off, v_off) in places(&self.units, &self.groups) {
                    let (g, n, nv) = (&self.groups[gi], self.units[k].len(), zero::v_len(&self.units[k]));
                    g.master.upload_at(off as usize * 4, &sh.master[a..a + n])?;
                    g.m.upload_at(off as usize * 4, &sh.m[a..a + n])?;
                    g.v.upload_at(v_off as usize * 4, &sh.v[b..b + nv])?;
                    (a, b) = (a + n, b + nv);
                }
            }
        }
        for w in &self.whole {
            for m in &w.lay.members {
                st.master[m.param] = Vec::new();
                st.m[m.param] = Vec::new();
                st.v[m.param] = Vec::new();
            }
        }
        self.upload_frozen()?;
        self.first = true;
        Ok(())
    }

    /// The frozen parameters' device copies from their host masters, in their dtype.
    fn upload_frozen(&self) -> Result<()> {
        for (i, buf) in &self.frozen {
            let w = &self.host.master[*i];
            if buf.bytes == w.len() * 4 {
                buf.upload_at(0, w)?;
            } else {
                buf.upload_at(0, &w.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>())?;
            }
        }
        Ok(())
    }

    /// The training state: masters and moments. With ZeRO-1 a collective: every rank's share is
    /// gathered.
    pub fn state(&self, plan: &Plan) -> Result<TrainState> {
        if let Some(z) = &self.zero {
            let sh =
                crate::optim::Sharded { units: self.units.clone(), owners: z.owners.clone(), shard: self.shard()? };
            return sh.full_state(plan, &z.dist, &self.host);
        }
        let mut st = self.host.clone();
        for g in &self.groups {
            for m in &g.lay.members {
                let i = m.param;
                st.master[i] = vec![0.0; m.len as usize];
                st.m[i] = vec![0.0; m.len as usize];
                st.v[i] = vec![0.0; m.v_len as usize];
                download(g.master.ptr + m.off * 4, &mut st.master[i])?;
                download(g.m.ptr + m.off * 4, &mut st.m[i])?;
                download(g.v.ptr + m.v_off * 4, &mut st.v[i])?;
            }
        }
        Ok(st)
    }

    /// What a decoder reads: the model copies of every parameter (bf16 ones widened to f32: the
    /// masters rounded as a decoder rounds them), moments empty. Every rank holds them whole, so
    /// this is no collective even with ZeRO-1, and half the bytes of the masters.
    pub fn weights(&self) -> Result<TrainState> {
        let mut st = self.host.clone();
        for w in &self.whole {
            for m in &w.lay.members {
                let n = m.len as usize;
                st.master[m.param] = match w.lay.model_dtype() {
                    DType::F32 => {
                        let mut x = vec![0f32; n];
                        download(w.model.ptr + m.off * 4, &mut x)?;
                        x
                    }
                    _ => {
                        let mut x = vec![half::bf16::ZERO; n];
                        download(w.model.ptr + m.off * 2, &mut x)?;
                        x.into_iter().map(half::bf16::to_f32).collect()
                    }
                };
            }
        }
        st.m.iter_mut().chain(&mut st.v).for_each(Vec::clear);
        Ok(st)
    }

    /// ZeRO-1: this rank's share of the masters and moments, as [`Shard::take`] lays it out.
    pub fn shard(&self) -> Result<Shard> {
        let host = |b: &DevBuf, n: u64| -> Result<Vec<f32>> {
            let mut x = vec![0f32; n as usize];
            download(b.ptr, &mut x)?;
            Ok(x)
        };
        let mut got = Vec::new();
        for g in &self.groups {
            got.push((host(&g.master, g.lay.len)?, host(&g.m, g.lay.len)?, host(&g.v, g.lay.v_len)?));
        }
        let mut sh = Shard::default();
        for (k, gi, off, v_off) in places(&self.units, &self.groups) {
            let u = &self.units[k];
            let (e, v) = (off as usize..off as usize + u.len(), v_off as usize..v_off as usize + zero::v_len(u));
            sh.units.push(k);
            sh.master.extend_from_slice(&got[gi].0[e.clone()]);
            sh.m.extend_from_slice(&got[gi].1[e]);
            sh.v.extend_from_slice(&got[gi].2[v]);
        }
        Ok(sh)
    }

    /// ZeRO-1: the state besides the shard (frozen masters, step count).
    pub fn sharded_rest(&self) -> Option<&TrainState> {
        self.zero.as_ref().map(|_| &self.host)
    }

    pub fn step_count(&self) -> u64 {
        self.host.step
    }

    /// Replaces the state: a whole one, or with ZeRO-1's `share` every parameter's masters
    /// (moments empty) and this rank's share.
    pub fn set_state(&mut self, plan: &Plan, st: TrainState, share: Option<Shard>) -> Result<()> {
        let share = match (&self.zero, share) {
            (_, None) => None,
            (None, Some(_)) => bail!("a share of the optimizer for a rank that keeps all of it"),
            (Some(z), Some(sh)) => Some(crate::optim::Sharded::from_share(plan, &z.dist, sh)?.shard),
        };
        self.host = st;
        self.upload(share)
    }

    /// The step's fp32 gradient sums as `(device address, elements)`, one buffer per group (what
    /// the replicated optimizer's ranks all-reduce).
    pub fn grad_buffers(&self) -> Vec<(u64, usize)> {
        self.whole.iter().map(|w| (w.grad.ptr, w.lay.len as usize)).collect()
    }

    /// Whether ranks share the optimizer (ZeRO-1): the step then reduces the gradients itself.
    pub fn sharded(&self) -> bool {
        self.zero.is_some()
    }

    /// The step's gradient sum of every trainable parameter (plan order; `None` for frozen ones).
    /// The kernels that finalise a gradient write it there directly (`Arg::Accum`).
    pub fn grad_sums(&self, n_params: usize) -> Vec<Option<Region>> {
        let mut out = vec![None; n_params];
        for &(i, g, k) in &self.trainable {
            let (w, m) = (&self.whole[g], &self.whole[g].lay.members[k]);
            out[i] = Some(Region { addr: w.grad.ptr + m.off * 4, bytes: m.len * 4, dtype: DType::F32 });
        }
        out
    }

    /// Fills the gradient sums with 0xFF (NaN) before a step's first micro-batch, so a gradient
    /// element no kernel writes shows up (parity runs).
    pub fn poison_sums(&self) -> Result<()> {
        self.whole.iter().try_for_each(|w| w.grad.fill(0xFF))
    }

    /// Replaces the step's gradient sums (`grads` in plan order, empty for frozen parameters).
    pub fn set_grad_sums(&mut self, grads: &[Vec<f32>]) -> Result<()> {
        for &(i, g, k) in &self.trainable {
            let w = &self.whole[g];
            let m = &w.lay.members[k];
            if grads[i].len() as u64 != m.len {
                bail!("gradient {i} has {} elements, the parameter {}", grads[i].len(), m.len);
            }
            w.grad.upload_at(m.off as usize * 4, &grads[i])?;
        }
        self.first = false;
        Ok(())
    }

    /// Whether the next micro-batch starts the step's sums (its kernels store instead of adding).
    pub fn first(&self) -> bool {
        self.first
    }

    /// Marks the gradient sums as started (after a successful accumulation).
    pub fn accumulated(&mut self) {
        self.first = false;
    }

    /// The step (§7.1) on the accumulated gradients (with ZeRO-1 a collective over `link`:
    /// the gradients are reduced to their owners first, the model copies shared after).
    pub fn step(
        &mut self,
        l: &mut Launcher,
        plan: &Plan,
        loads: Vec<(u32, Vec<u64>)>,
        s: &StepScalars,
        link: &Link,
    ) -> Result<StepStats> {
        if self.first {
            bail!("optimizer step without accumulated gradients");
        }
        if let Some(z) = &self.zero {
            self.reduce_gradients(z, link)?;
        }
        let mut per_unit = self.unit_sumsq(l)?;
        if let Some(z) = &self.zero {
            // Each unit has one owner, so the sum over ranks is exact.
            z.dist.all_reduce_f64(&mut per_unit)?;
        }
        if let Some(k) = per_unit.iter().position(|x| !x.is_finite()) {
            bail!("gradient of {} is not finite (NaN or Inf)", plan.params[self.units[k].param].name);
        }
        let sq: f64 = per_unit.iter().sum();
        let coef = clip_coefficient(sq, s.clip);

        crate::optim::update_expert_bias(plan, &mut self.host, &loads, s.bias_rate);
        self.upload_frozen()?;

        let o = &plan.optimizer;
        let k = self.host.step + 1;
        let ah = AdamHyper::default();
        let (bc1, bc2) = ah.bias_corrections(k);
        for g in self.groups.iter().filter(|g| g.lay.len > 0) {
            match g.lay.kind {
                Kind::Normuon { rows, cols, .. } => {
                    let matrices = g.lay.len / (rows * cols);
                    self.normuon(l, g, rows, cols, matrices, coef, s, o)?
                }
                Kind::AdamW { f32_model, decay } => {
                    let wd = if decay { s.weight_decay } else { 0.0 };
                    let n = g.lay.len;
                    l.launch(
                        &ok::adamw(f32_model),
                        NODE,
                        [ok::stride_blocks(n), 1, 1],
                        ok::THREADS,
                        &[
                            at(g.grad, 0, DType::F32),
                            at((&g.m).into(), 0, DType::F32),
                            at((&g.v).into(), 0, DType::F32),
                            at((&g.master).into(), 0, DType::F32),
                            at(g.model, 0, g.lay.model_dtype()),
                            Param::I64(n as i64),
                            Param::F32(coef),
                            Param::F64(ah.beta1),
                            Param::F64(ah.beta2),
                            Param::F64(ah.eps),
                            Param::F64(bc1),
                            Param::F64(bc2),
                            Param::F64(s.aux_lr),
                            Param::F64(wd),
                        ],
                    )?;
                }
            }
        }
        l.sync()?;
        if let Some(z) = &self.zero {
            self.share_models(z, link)?;
        }
        self.host.step = k;
        self.first = true;
        let expert_bias = crate::optim::expert_biases(plan, &self.host, &loads);
        Ok(StepStats { grad_norm: sq.sqrt(), clip_coef: coef, loads, expert_bias, ..Default::default() })
    }

    /// `Σx²` of every unit this rank's groups hold (one `opt_sumsq` launch per group), indexed
    /// by unit; 0 for the units of other ranks.
    fn unit_sumsq(&self, l: &mut Launcher) -> Result<Vec<f64>> {
        let mut at_unit = 0u64;
        for g in self.groups.iter().filter(|g| !g.lay.units.is_empty()) {
            let n = g.lay.units.len() as u64;
            let out = Param::Ptr(self.sums.ptr + at_unit * 8, None);
            let starts = Param::Ptr(g.starts, None);
            l.launch(
                &ok::sumsq(),
                NODE,
                [grid([n, 1, 1])?[0], 1, 1],
                ok::THREADS,
                &[at(g.grad, 0, DType::F32), starts, out],
            )?;
            at_unit += n;
        }
        l.sync()?;
        let mut got = vec![0f64; at_unit as usize];
        download(self.sums.ptr, &mut got)?;
        let mut per_unit = vec![0f64; self.units.len()];
        for (&k, x) in self.groups.iter().flat_map(|g| &g.lay.units).zip(got) {
            per_unit[k] = x;
        }
        Ok(per_unit)
    }

    /// ZeRO-1: each rank's units of the whole gradient sums, summed over ranks into its own
    /// groups' gradient buffers (packed into the staging buffer chunk by chunk).
    fn reduce_gradients(&self, z: &Zero, link: &Link) -> Result<()> {
        let cap = z.stage.bytes as u64 / 4;
        for ((w, g), runs) in self.whole.iter().zip(&self.groups).zip(&z.runs) {
            for (r, runs) in runs.iter().enumerate() {
                for (pos, pieces) in chunks(runs, cap) {
                    let mut n = 0;
                    for (off, k) in pieces {
                        copy(z.stage.ptr + n * 4, w.grad.ptr + off * 4, k * 4)?;
                        n += k;
                    }
                    // Only the root's destination is written.
                    let dst = if r == link.rank() { g.grad.ptr + pos * 4 } else { z.stage.ptr };
                    link.reduce_f32(z.stage.ptr, dst, n as usize, r)?;
                }
            }
        }
        Ok(())
    }

    /// ZeRO-1: each rank's new model copies broadcast into every rank's whole model copies.
    fn share_models(&self, z: &Zero, link: &Link) -> Result<()> {
        for ((w, g), runs) in self.whole.iter().zip(&self.groups).zip(&z.runs) {
            let b = w.lay.model_dtype().bytes();
            for (r, runs) in runs.iter().enumerate() {
                for (pos, pieces) in chunks(runs, z.stage.bytes as u64 / b) {
                    let n: u64 = pieces.iter().map(|p| p.1).sum();
                    if r == link.rank() {
                        copy(z.stage.ptr, g.model.ptr + pos * b, n * b)?;
                    }
                    link.broadcast(z.stage.ptr, (n * b) as usize, r)?;
                    let mut at = 0;
                    for (off, k) in pieces {
                        copy(w.model.ptr + off * b, z.stage.ptr + at * b, k * b)?;
                        at += k;
                    }
                }
            }
        }
        Ok(())
    }

    /// One Normuon family, chunk by chunk (§7.2; batching per D10).
    #[allow(clippy::too_many_arguments)]
    fn normuon(
        &self,
        l: &mut Launcher,
        g: &Group,
        rows: u64,
        cols: u64,
        matrices: u64,
        coef: f32,
        s: &StepScalars,
        o: &vpmoe_compiler::optimizer::OptimizerPlan,
    ) -> Result<()> {
        if o.polar_express.is_empty() {
            bail!("Polar Express needs at least one iteration");
        }
        let p = Polar::new(rows, cols);
        let mm = ok::wide(rows, cols).0;
        let size = rows * cols;
        let chunk = p.chunk(matrices, CHUNK_BYTES);
        // Scratch: U/O f32 [chunk, size], X0, X1 bf16 [chunk, size], A bf16 [chunk, m, m], B f32.
        let base = self.scratch.ptr;
        let (u, x0) = (base, base + chunk * size * 4);
        let x1 = x0 + chunk * size * 2;
        let a = x1 + chunk * size * 2;
        let b = a + chunk * mm * mm * 2;
        let sp = |addr: u64, dtype: DType| ptr(addr, dtype, self.scratch.bytes as u64 - (addr - base));
        let mut j0 = 0;
        while j0 < matrices {
            let c = chunk.min(matrices - j0);
            let (gemm_grid, apply_grid) = p.grids(c);
            let (g32, a32) = (grid(gemm_grid)?, grid(apply_grid)?);
            l.launch(
                &p.start,
                NODE,
                [c as u32, 1, 1],
                ok::THREADS,
                &[
                    at(g.grad, j0 * size, DType::F32),
                    at((&g.m).into(), j0 * size, DType::F32),
                    sp(u, DType::F32),
                    sp(x0, DType::Bf16),
                    Param::F32(coef),
                    Param::F64(o.momentum),
                    Param::I32(o.nesterov as i32),
                    Param::F64(o.polar_express_safety),
                    Param::F64(o.polar_express_eps),
                ],
            )?;
            let xs = [x0, x1];
            let iters = o.polar_express.len();
            for (it, &[ca, cb, cc]) in o.polar_express.iter().enumerate() {
                let x = xs[it % 2];
                l.launch(&p.gram, NODE, g32, ok::GEMM_THREADS, &[sp(x, DType::Bf16), sp(a, DType::Bf16)])?;
                l.launch(
                    &p.poly,
                    NODE,
                    g32,
                    ok::GEMM_THREADS,
                    &[
                        sp(a, DType::Bf16),
                        sp(b, DType::F32),
                        Param::F32(ca as f32),
                        Param::F32(cb as f32),
                        Param::F32(cc as f32),
                    ],
                )?;
                let last = it + 1 == iters;
                let (k, y) = if last {
                    (&p.apply_last, sp(u, DType::F32))
                } else {
                    (&p.apply, sp(xs[(it + 1) % 2], DType::Bf16))
                };
                l.launch(k, NODE, a32, ok::GEMM_THREADS, &[sp(b, DType::F32), sp(x, DType::Bf16), y])?;
            }
            l.launch(
                &p.finish,
                NODE,
                [c as u32, 1, 1],
                ok::THREADS,
                &[
                    sp(u, DType::F32),
                    at((&g.v).into(), j0 * rows, DType::F32),
                    at((&g.master).into(), j0 * size, DType::F32),
                    at(g.model, j0 * size, DType::Bf16),
                    Param::F64(o.beta2),
                    Param::F64(o.eps),
                    Param::F64(s.lr),
                    Param::F64(s.weight_decay),
                ],
            )?;
            j0 += c;
        }
        Ok(())
    }
}

fn grid(g: [u64; 3]) -> Result<[u32; 3]> {
    if g[0] > i32::MAX as u64 || g[1] > 65_535 || g[2] > 65_535 {
        bail!("optimizer grid {g:?} is outside the device limits");
    }
    Ok([g[0] as u32, g[1] as u32, g[2] as u32])
}
