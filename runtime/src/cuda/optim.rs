//! The optimizer on the device (MODEL.md §7.1; kernels in `codegen/cuda/optim.cuh`). fp32
//! masters, accumulated gradients and optimizer state stay on the GPU in one set of buffers per
//! group, each laid out member after member: a Normuon shape family is then one contiguous
//! `[matrices, rows, cols]` batch (no gather), and an AdamW class (model dtype × decay) is one
//! element-wise launch. The model copies live in the same order, so every kernel that updates a
//! master also writes its bf16/f32 copy. Frozen parameters (the expert biases) stay on the host,
//! where their sign update is computed exactly as on the cpu backend.
//!
//! A step: sums of squares per group (f64 partials, summed on the host in a fixed order: the
//! global norm and the clip coefficient; a non-finite norm is traced to the first offending
//! parameter by name before anything changes); the expert-bias update; each Normuon family in
//! chunks of at most [`CHUNK_BYTES`] of scratch (momentum, five batched Polar Express
//! iterations, row normalisation, update); AdamW per class. Everything but Polar Express is
//! bitwise the host's.

use super::bind::{Param, Region};
use super::device::{download, DevBuf, Gpu};
use super::exec::Launcher;
use crate::backend::{StepScalars, StepStats};
use crate::state::TrainState;
use anyhow::{bail, Result};
use vpmoe_codegen::optim::{self as ok, Polar};
use vpmoe_compiler::Plan;
use vpmoe_ir::optim::{clip_coefficient, AdamHyper};
use vpmoe_ir::{DType, OptGroup};

/// Scratch for one Polar Express chunk (U/O, two X, A, B): bounds the optimizer's workspace.
pub const CHUNK_BYTES: u64 = 1 << 30;
const NODE: &str = "optimizer";

/// One parameter's place in its group: element offset and count of its master (= gradient,
/// first moment, model copy), and of its second moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub param: usize,
    pub off: u64,
    pub len: u64,
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

/// Normuon families in plan order, then AdamW classes (bf16/f32 model × decay) in table order.
pub fn layout(plan: &Plan) -> Vec<GroupLayout> {
    let mut groups = Vec::new();
    let mut push = |kind, params: Vec<usize>| {
        let (mut len, mut v_len) = (0, 0);
        let mut members = Vec::new();
        for i in params {
            let (n, _, nv) = TrainState::sizes(&plan.params[i]);
            members.push(Member { param: i, off: len, len: n as u64, v_off: v_len, v_len: nv as u64 });
            len += n as u64;
            v_len += nv as u64;
        }
        if !members.is_empty() {
            groups.push(GroupLayout { kind, members, len, v_len });
        }
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

/// Bytes of the Normuon momenta (fp32, one per matrix element): what `host_momentum` moves off
/// the device.
pub fn momentum_bytes(plan: &Plan) -> u64 {
    layout(plan).iter().filter(|g| matches!(g.kind, Kind::Normuon { .. })).map(|g| g.len * 4).sum()
}

/// Device bytes the optimizer allocates for `plan`: model copies, fp32 masters, gradient sums and
/// first moments (the Normuon ones only without `host_momentum`), second moments, frozen
/// parameters, norm partials and Polar Express scratch.
pub fn planned_bytes(plan: &Plan, host_momentum: bool) -> u64 {
    let groups = layout(plan);
    let state: u64 = groups.iter().map(|g| g.len * (12 + g.model_dtype().bytes()) + g.v_len * 4).sum();
    let state = state - if host_momentum { momentum_bytes(plan) } else { 0 };
    let frozen: u64 =
        plan.params.iter().filter(|p| p.opt == OptGroup::Frozen).map(|p| p.numel * p.ty.dtype.bytes()).sum();
    state + frozen + partial_count(plan) as u64 * 8 + scratch_bytes(&groups)
}

/// Norm partials: enough for one `opt_sumsq` launch per trainable parameter (the per-parameter
/// pass that names a non-finite gradient needs more than the per-group one).
fn partial_count(plan: &Plan) -> usize {
    let per_param: usize =
        plan.params.iter().filter(|p| p.trainable()).map(|p| ok::stride_blocks(p.numel) as usize).sum();
    let per_group: usize = layout(plan).iter().map(|g| ok::stride_blocks(g.len) as usize).sum();
    per_param.max(per_group)
}

struct Group {
    lay: GroupLayout,
    master: DevBuf,
    grad: DevBuf,
    m: DevBuf,
    v: DevBuf,
    model: DevBuf,
}

pub struct DeviceOptimizer {
    groups: Vec<Group>,
    /// Host masters of the frozen parameters, their device copies, and the step count.
    host: TrainState,
    frozen: Vec<(usize, DevBuf)>,
    /// Per trainable parameter (plan order): its index, group and member index.
    trainable: Vec<(usize, usize, usize)>,
    /// One f64 per block of every `opt_sumsq` launch.
    partials: DevBuf,
    scratch: DevBuf,
    /// The next micro-batch starts the step's sums (its kernels store instead of adding).
    first: bool,
}

fn ptr(addr: u64, dtype: DType, bytes: u64) -> Param {
    Param::Ptr(addr, Some(Region { addr, bytes, dtype }))
}

impl Group {
    fn at(&self, buf: &DevBuf, elem: u64, dtype: DType) -> Param {
        let off = elem * dtype.bytes();
        ptr(buf.ptr + off, dtype, buf.bytes as u64 - off)
    }
}

impl DeviceOptimizer {
    /// Allocates every group and uploads `st` (the masters, model copies and optimizer state).
    /// With `host_momentum` the Normuon momenta live in pinned host memory that `pe_start`
    /// reads and writes over PCIe (once each per step): the same kernels and arithmetic, so the
    /// same state bit for bit, with ≈ 20 GiB less on the device for the locked config.
    pub fn new(gpu: &Gpu, plan: &Plan, st: TrainState, host_momentum: bool) -> Result<DeviceOptimizer> {
        if let Some(p) = plan.params.iter().find(|p| p.opt == OptGroup::Normuon && p.ty.dtype != DType::Bf16) {
            bail!(
                "Normuon parameter {} is {}; the device optimizer writes bf16 model copies for Normuon",
                p.name,
                p.ty.dtype.name()
            );
        }
        let mut groups = Vec::new();
        for lay in layout(plan) {
            let what = |b: &str| format!("{b} of {:?}", lay.kind);
            let f32b = (lay.len * 4) as usize;
            groups.push(Group {
                master: DevBuf::new(gpu, f32b, &what("fp32 masters"))?,
                grad: DevBuf::new(gpu, f32b, &what("fp32 gradients"))?,
                m: match (host_momentum, &lay.kind) {
                    (true, Kind::Normuon { .. }) => DevBuf::new_mapped(gpu, f32b, &what("momenta"))?,
                    _ => DevBuf::new(gpu, f32b, &what("first moments"))?,
                },
                v: DevBuf::new(gpu, (lay.v_len * 4) as usize, &what("second moments"))?,
                model: DevBuf::new(gpu, (lay.len * lay.model_dtype().bytes()) as usize, &what("model copies"))?,
                lay,
            });
        }
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
            let (g, k) = groups
                .iter()
                .enumerate()
                .find_map(|(g, gr)| gr.lay.members.iter().position(|m| m.param == i).map(|k| (g, k)))
                .ok_or_else(|| anyhow::anyhow!("trainable parameter {} is in no optimizer group", p.name))?;
            trainable.push((i, g, k));
        }
        let lays: Vec<GroupLayout> = groups.iter().map(|g| g.lay.clone()).collect();
        let scratch_bytes = scratch_bytes(&lays);
        let mut o = DeviceOptimizer {
            groups,
            host: st,
            frozen,
            trainable,
            partials: DevBuf::new(gpu, partial_count(plan) * 8, "gradient-norm partials")?,
            scratch: DevBuf::new(gpu, scratch_bytes as usize, "Polar Express scratch")?,
            first: true,
        };
        o.upload()?;
        Ok(o)
    }

    /// Device address of every parameter's model copy, in plan order.
    pub fn model_ptrs(&self, n_params: usize) -> Vec<u64> {
        let mut out = vec![0; n_params];
        for g in &self.groups {
            let b = g.lay.model_dtype().bytes();
            for m in &g.lay.members {
                out[m.param] = g.model.ptr + m.off * b;
            }
        }
        for (i, buf) in &self.frozen {
            out[*i] = buf.ptr;
        }
        out
    }

    /// Uploads the host state, then drops the uploaded tensors from it (the device copy is the
    /// truth; the locked config's would otherwise keep 69 GiB of host memory).
    fn upload(&mut self) -> Result<()> {
        let st = &mut self.host;
        for g in &self.groups {
            for m in &g.lay.members {
                let i = m.param;
                g.master.upload_at(m.off as usize * 4, &st.master[i])?;
                g.m.upload_at(m.off as usize * 4, &st.m[i])?;
                g.v.upload_at(m.v_off as usize * 4, &st.v[i])?;
                match g.lay.model_dtype() {
                    DType::F32 => g.model.upload_at(m.off as usize * 4, &st.master[i])?,
                    _ => {
                        let b: Vec<half::bf16> = st.master[i].iter().map(|&x| half::bf16::from_f32(x)).collect();
                        g.model.upload_at(m.off as usize * 2, &b)?
                    }
                }
                st.master[i] = Vec::new();
                st.m[i] = Vec::new();
                st.v[i] = Vec::new();
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

    /// The training state, downloading the groups: with `moments`, the full state; without,
    /// the masters alone (moments empty).
    pub fn state(&self, moments: bool) -> Result<TrainState> {
        let mut st = self.host.clone();
        for g in &self.groups {
            for m in &g.lay.members {
                let i = m.param;
                st.master[i] = vec![0.0; m.len as usize];
                download(g.master.ptr + m.off * 4, &mut st.master[i])?;
                if moments {
                    st.m[i] = vec![0.0; m.len as usize];
                    st.v[i] = vec![0.0; m.v_len as usize];
                    download(g.m.ptr + m.off * 4, &mut st.m[i])?;
                    download(g.v.ptr + m.v_off * 4, &mut st.v[i])?;
                }
            }
        }
        if !moments {
            st.m.iter_mut().chain(&mut st.v).for_each(Vec::clear);
        }
        Ok(st)
    }

    pub fn step_count(&self) -> u64 {
        self.host.step
    }

    pub fn set_state(&mut self, st: TrainState) -> Result<()> {
        self.host = st;
        self.upload()
    }

    /// The step's fp32 gradient sums as `(device address, elements)`, one buffer per group (what
    /// data-parallel ranks all-reduce).
    pub fn grad_buffers(&self) -> Vec<(u64, usize)> {
        self.groups.iter().map(|g| (g.grad.ptr, g.lay.len as usize)).collect()
    }

    /// The step's gradient sum of every trainable parameter (plan order; `None` for frozen ones).
    /// The kernels that finalise a gradient write it there directly (`Arg::Accum`).
    pub fn grad_sums(&self, n_params: usize) -> Vec<Option<Region>> {
        let mut out = vec![None; n_params];
        for &(i, g, k) in &self.trainable {
            let (gr, m) = (&self.groups[g], &self.groups[g].lay.members[k]);
            out[i] = Some(Region { addr: gr.grad.ptr + m.off * 4, bytes: m.len * 4, dtype: DType::F32 });
        }
        out
    }

    /// Fills the gradient sums with 0xFF (NaN) before a step's first micro-batch, so a gradient
    /// element no kernel writes shows up (parity runs).
    pub fn poison_sums(&self) -> Result<()> {
        self.groups.iter().try_for_each(|g| g.grad.fill(0xFF))
    }

    /// Replaces the step's gradient sums (`grads` in plan order, empty for frozen parameters).
    pub fn set_grad_sums(&mut self, grads: &[Vec<f32>]) -> Result<()> {
        for &(i, g, k) in &self.trainable {
            let gr = &self.groups[g];
            let m = &gr.lay.members[k];
            if grads[i].len() as u64 != m.len {
                bail!("gradient {i} has {} elements, the parameter {}", grads[i].len(), m.len);
            }
            gr.grad.upload_at(m.off as usize * 4, &grads[i])?;
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

    /// The step (§7.1) on the accumulated gradients.
    pub fn step(
        &mut self,
        l: &mut Launcher,
        plan: &Plan,
        loads: Vec<(u32, Vec<u64>)>,
        s: &StepScalars,
    ) -> Result<StepStats> {
        if self.first {
            bail!("optimizer step without accumulated gradients");
        }
        // Global norm: one launch per group (its sums are contiguous).
        let whole: Vec<(Param, u64)> = self.groups.iter().map(|g| (g.at(&g.grad, 0, DType::F32), g.lay.len)).collect();
        let sq: f64 = self.sumsq(l, &whole)?.iter().sum();
        if !sq.is_finite() {
            // Per parameter, only to name the first non-finite gradient.
            let each: Vec<(Param, u64)> = self
                .trainable
                .iter()
                .map(|&(_, g, k)| {
                    let (gr, m) = (&self.groups[g], &self.groups[g].lay.members[k]);
                    (gr.at(&gr.grad, m.off, DType::F32), m.len)
                })
                .collect();
            let per = self.sumsq(l, &each)?;
            let bad = self.trainable.iter().zip(&per).find(|(_, s)| !s.is_finite()).map_or(0, |(t, _)| t.0);
            bail!("gradient of {} is not finite (NaN or Inf)", plan.params[bad].name);
        }
        let coef = clip_coefficient(sq, s.clip);

        crate::optim::update_expert_bias(plan, &mut self.host, &loads, s.bias_rate);
        self.upload_frozen()?;

        let o = &plan.optimizer;
        let k = self.host.step + 1;
        let ah = AdamHyper::default();
        let (bc1, bc2) = ah.bias_corrections(k);
        for g in &self.groups {
            match g.lay.kind {
                Kind::Normuon { rows, cols, matrices } => self.normuon(l, g, rows, cols, matrices, coef, s, o)?,
                Kind::AdamW { f32_model, decay } => {
                    let wd = if decay { s.weight_decay } else { 0.0 };
                    let n = g.lay.len;
                    l.launch(
                        &ok::adamw(f32_model),
                        NODE,
                        [ok::stride_blocks(n), 1, 1],
                        ok::THREADS,
                        &[
                            g.at(&g.grad, 0, DType::F32),
                            g.at(&g.m, 0, DType::F32),
                            g.at(&g.v, 0, DType::F32),
                            g.at(&g.master, 0, DType::F32),
                            g.at(&g.model, 0, g.lay.model_dtype()),
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
        self.host.step = k;
        self.first = true;
        let expert_bias = crate::optim::expert_biases(plan, &self.host, &loads);
        Ok(StepStats { grad_norm: sq.sqrt(), clip_coef: coef, loads, expert_bias, ..Default::default() })
    }

    /// `Σx²` of each `(f32 buffer, length)`: one `opt_sumsq` launch each, whose f64 block partials
    /// are summed here in block order (deterministic).
    fn sumsq(&self, l: &mut Launcher, ranges: &[(Param, u64)]) -> Result<Vec<f64>> {
        let mut starts = Vec::with_capacity(ranges.len() + 1);
        let mut p0 = 0u64;
        for (buf, n) in ranges {
            starts.push(p0 as usize);
            let part = Param::Ptr(self.partials.ptr + p0 * 8, None);
            l.launch(
                &ok::sumsq(),
                NODE,
                [ok::stride_blocks(*n), 1, 1],
                ok::THREADS,
                &[*buf, Param::I64(*n as i64), part],
            )?;
            p0 += ok::stride_blocks(*n) as u64;
        }
        starts.push(p0 as usize);
        l.sync()?;
        let mut partials = vec![0f64; p0 as usize];
        download(self.partials.ptr, &mut partials)?;
        Ok(starts.windows(2).map(|w| partials[w[0]..w[1]].iter().sum()).collect())
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
                    g.at(&g.grad, j0 * size, DType::F32),
                    g.at(&g.m, j0 * size, DType::F32),
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
                    g.at(&g.v, j0 * rows, DType::F32),
                    g.at(&g.master, j0 * size, DType::F32),
                    g.at(&g.model, j0 * size, DType::Bf16),
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
