//! The cpu backend: interprets the plan's graph node by node with the IR reference semantics
//! (forward ops and their `vjp` nodes alike), swapping in a blocked SIMD GEMM (`matrixmultiply`)
//! for every matrix product. It holds the training state on the host and runs the optimizer with
//! [`crate::optim`].

use crate::backend::{Backend, Batch, ForwardOut, MicroOut, StepScalars, StepStats};
use crate::state::TrainState;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::time::Instant;
use vpmoe_compiler::Plan;
use vpmoe_ir::reference::{self, round_bf16, Dims, Gemm, Tensor};
use vpmoe_ir::{DType, Graph, Node, OutputName, ValueDef};

/// Every product of [`Gemm`] through matrixmultiply's strided sgemm: transposes are strides.
pub struct FastGemm;

/// `c[m×n] (+)= A·B` with `A[i][p] = a[i·rsa + p·csa]` and `B[p][j] = b[p·rsb + j·csb]`.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    (a, rsa, csa): (&[f32], usize, usize),
    (b, rsb, csb): (&[f32], usize, usize),
    c: &mut [f32],
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "sgemm operand sizes");
    let beta = if acc { 1.0 } else { 0.0 };
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

impl Gemm for FastGemm {
    fn xwt(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        sgemm(m, k, n, (a, k, 1), (b, 1, k), c, acc); // bᵀ: b is n×k row-major
    }
    fn ab(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        sgemm(m, k, n, (a, k, 1), (b, n, 1), c, acc);
    }
    fn atb(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        sgemm(m, k, n, (a, 1, m), (b, n, 1), c, acc); // aᵀ: a is k×m row-major
    }
}

/// The tensors the graph reads for each parameter: bf16 parameters are their fp32 masters
/// rounded to bf16 (D9).
pub fn model_tensors(plan: &Plan, master: &[Vec<f32>]) -> Vec<Tensor> {
    plan.params.iter().zip(master).map(|(p, w)| Tensor::f32(p.ty.shape(0), model_values(p, w))).collect()
}

/// The model copy of (part of) parameter `p`'s masters `w`: rounded to bf16 where `p` is bf16.
pub fn model_values(p: &vpmoe_compiler::plan::ParamEntry, w: &[f32]) -> Vec<f32> {
    if p.ty.dtype == DType::Bf16 {
        w.iter().map(|&x| round_bf16(x)).collect()
    } else {
        w.to_vec()
    }
}

/// What [`CpuBackend::observe`] calls after each node: the node, its inputs, its outputs.
pub type Observer<'a> = dyn FnMut(&Node, &[&Tensor], &[Tensor]) + 'a;

pub struct CpuBackend<'g> {
    graph: &'g Graph,
    plan: &'g Plan,
    /// Nodes `[..fwd_len]` are the forward graph.
    fwd_len: usize,
    state: TrainState,
    /// Model copies the graph reads: bf16 parameters are their masters rounded to bf16 (D9).
    model: Vec<Tensor>,
    /// fp32 gradient accumulators of the current step, per parameter (empty when frozen).
    grads: Vec<Vec<f32>>,
    loads: BTreeMap<u32, Vec<u64>>,
    pub gemm: Box<dyn Gemm>,
    /// Round bf16 parameters' model copies to bf16 (D9). Off only for finite-difference checks,
    /// where the rounding would swallow the perturbation.
    round_bf16: bool,
    /// The data-parallel job: gradients and loads are summed over its ranks before the update.
    dist: crate::dist::Dist,
    /// ZeRO-1: this rank's part of the optimizer; `state` then keeps only the frozen parameters'
    /// masters (the trainable ones are empty) and the step count.
    sharded: Option<crate::optim::Sharded>,
}

impl<'g> CpuBackend<'g> {
    pub fn new(graph: &'g Graph, plan: &'g Plan, state: TrainState) -> Self {
        let fwd_len = vpmoe_compiler::autodiff::forward_len(graph);
        let grads = plan.params.iter().zip(&state.master).map(|(p, w)| vec![0.0; w.len() * p.trainable() as usize]);
        let grads = grads.collect();
        let mut be = CpuBackend {
            graph,
            plan,
            fwd_len,
            state,
            model: Vec::new(),
            grads,
            loads: BTreeMap::new(),
            gemm: Box::new(FastGemm),
            round_bf16: true,
            dist: crate::dist::Dist::single(),
            sharded: None,
        };
        be.refresh_model();
        be
    }

    /// Trains as one rank of `dist`'s job; with `shard_optimizer` and more than one rank, keeps
    /// only this rank's part of the optimizer (ZeRO-1).
    pub fn distribute(&mut self, dist: crate::dist::Dist, shard_optimizer: bool) {
        self.dist = dist;
        self.sharded = None;
        if shard_optimizer && self.dist.world() > 1 {
            self.shard();
        }
    }

    /// Moves the trainable masters and moments into this rank's shard.
    fn shard(&mut self) {
        let sh = crate::optim::Sharded::new(self.plan, &self.dist, &self.state);
        self.keep(sh);
    }

    /// Keeps `sh` as this rank's part of the optimizer; the state keeps the frozen masters.
    fn keep(&mut self, sh: crate::optim::Sharded) {
        for (i, p) in self.plan.params.iter().enumerate() {
            if p.trainable() {
                self.state.master[i] = Vec::new();
                self.state.m[i] = Vec::new();
                self.state.v[i] = Vec::new();
            }
        }
        self.sharded = Some(sh);
    }

    /// Model copies of the parameters whose masters this rank holds (all of them unless sharded).
    fn refresh_frozen(&mut self) {
        for (i, (p, w)) in self.plan.params.iter().zip(&self.state.master).enumerate() {
            if !p.trainable() {
                self.model[i] = Tensor::f32(p.ty.shape(0), model_values(p, w));
            }
        }
    }

    fn refresh_model(&mut self) {
        self.model = if self.round_bf16 {
            model_tensors(self.plan, &self.state.master)
        } else {
            self.plan
                .params
                .iter()
                .zip(&self.state.master)
                .map(|(p, w)| Tensor::f32(p.ty.shape(0), w.clone()))
                .collect()
        };
    }

    /// The current step's accumulated gradients, per parameter in plan order.
    pub fn grads(&self) -> &[Vec<f32>] {
        &self.grads
    }

    /// Model copies in f32 without bf16 rounding (finite-difference checks only).
    pub fn exact_weights(&mut self) {
        self.round_bf16 = false;
        self.refresh_model();
    }

    /// Discards accumulated gradients and loads (a step abandoned without an update).
    pub fn zero_grads(&mut self) {
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
        self.loads.clear();
    }

    /// Runs the forward on `batch`, showing `seen` every node with its inputs and outputs.
    pub fn observe(&self, batch: &Batch, seen: &mut Observer) -> Result<()> {
        let n = vpmoe_compiler::autodiff::forward_len(self.graph);
        self.run_seen(batch, n, Some(seen)).map(drop)
    }

    /// Runs nodes `[..n]`; returns the graph outputs they define.
    fn run(&self, batch: &Batch, n: usize) -> Result<BTreeMap<OutputName, Tensor>> {
        self.run_seen(batch, n, None)
    }

    fn run_seen(
        &self,
        batch: &Batch,
        n: usize,
        mut seen: Option<&mut Observer>,
    ) -> Result<BTreeMap<OutputName, Tensor>> {
        let g = self.graph;
        batch.validate(self.plan.arch.vocab)?;
        let dims = Dims { tokens: batch.tokens.len(), seq: batch.seq };
        let mut vals: Vec<Option<Tensor>> = vec![None; g.values.len()];
        for inp in &g.inputs {
            vals[inp.value.0 as usize] = Some(batch.input(&inp.name)?);
        }
        let last = g.last_uses();
        let is_output: Vec<bool> = {
            let mut o = vec![false; g.values.len()];
            g.outputs.iter().for_each(|(_, v)| o[v.0 as usize] = true);
            o
        };
        for (ni, node) in g.nodes[..n].iter().enumerate() {
            let ins: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|v| match g.value(*v).def {
                    ValueDef::Param(p) => &self.model[p.0 as usize],
                    _ => vals[v.0 as usize].as_ref().expect("inputs are computed before use"),
                })
                .collect();
            let outs = reference::forward(&node.op, &dims, &ins, self.gemm.as_ref());
            if let Some(f) = seen.as_deref_mut() {
                f(node, &ins, &outs);
            }
            for (v, t) in node.outputs.iter().zip(outs) {
                if let reference::Data::F32(x) = &t.data {
                    if let Some(i) = x.iter().position(|x| !x.is_finite()) {
                        bail!("{}: produced a non-finite value ({} at element {i})", node.name, x[i]);
                    }
                }
                // A value nothing reads (an unneeded gradient) is dropped at once.
                if last[v.0 as usize].is_some() || is_output[v.0 as usize] {
                    vals[v.0 as usize] = Some(t);
                }
            }
            for v in &node.inputs {
                if last[v.0 as usize] == Some(ni) && !is_output[v.0 as usize] {
                    vals[v.0 as usize] = None;
                }
            }
        }
        let mut out = BTreeMap::new();
        for (name, v) in &g.outputs {
            if let Some(t) = vals[v.0 as usize].take() {
                out.insert(name.clone(), t);
            }
        }
        Ok(out)
    }
}

/// Host bytes a micro-batch of `tokens` tokens needs for its activations on the cpu backend:
/// the plan's per-token arena (values live as f32 on the host, at most twice their bf16 size)
/// and its fixed arena.
pub fn activation_bytes(plan: &Plan, tokens: usize) -> u64 {
    (2 * plan.tok_arena_bytes_per_token).saturating_mul(tokens as u64).saturating_add(plan.fixed_arena_bytes)
}

/// Refuses, before anything is allocated, a micro-batch whose activations do not fit the host's
/// available memory (`MemAvailable`), saying how many tokens do.
pub fn check_host_memory(plan: &Plan, tokens: usize) -> Result<()> {
    let Some(avail) = available_memory() else { return Ok(()) };
    let need = activation_bytes(plan, tokens);
    if need > avail {
        let per = 2 * plan.tok_arena_bytes_per_token;
        let fit = avail.saturating_sub(plan.fixed_arena_bytes) / per.max(1);
        bail!(
            "a micro-batch of {tokens} tokens needs about {:.1} GiB of host memory for its activations on the cpu \
             backend; {:.1} GiB are available, enough for about {fit} tokens (--micro-batch × --seq-len)",
            need as f64 / GIB,
            avail as f64 / GIB
        );
    }
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

/// `MemAvailable` of /proc/meminfo in bytes (None where there is no such file).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

impl Backend for CpuBackend<'_> {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn forward(&mut self, batch: &Batch, keep: &[OutputName]) -> Result<ForwardOut> {
        Ok(ForwardOut::keep(self.run(batch, self.fwd_len)?, keep))
    }

    fn accumulate(&mut self, batch: &Batch) -> Result<MicroOut> {
        let out = self.run(batch, self.graph.nodes.len())?;
        Ok(crate::backend::fold_micro(self.plan, out, batch, Some(&mut self.grads), &mut self.loads))
    }

    fn step(&mut self, s: &StepScalars) -> Result<StepStats> {
        let t0 = Instant::now();
        let mut loads: Vec<(u32, Vec<u64>)> = std::mem::take(&mut self.loads).into_iter().collect();
        crate::dist::all_reduce_loads(&self.dist, &mut loads)?;
        let mut stats = match self.sharded.as_mut() {
            Some(sh) => {
                let mut model: Vec<Vec<f32>> = self
                    .model
                    .iter_mut()
                    .map(|t| match &mut t.data {
                        reference::Data::F32(v) => std::mem::take(v),
                        reference::Data::I32(_) => unreachable!("parameters are f32 tensors"),
                    })
                    .collect();
                let out = sh.apply(
                    self.plan,
                    &self.dist,
                    &mut self.state,
                    &self.grads,
                    loads,
                    s,
                    self.gemm.as_ref(),
                    &mut model,
                );
                for (t, v) in self.model.iter_mut().zip(model) {
                    t.data = reference::Data::F32(v);
                }
                let stats = out?;
                self.refresh_frozen();
                stats
            }
            None => {
                crate::dist::all_reduce_tensors(&self.dist, &mut self.grads)?;
                let st = &mut self.state;
                let stats = crate::optim::apply(self.plan, st, &mut self.grads, loads, s, self.gemm.as_ref())?;
                self.refresh_model();
                stats
            }
        };
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
        stats.optimizer_seconds = t0.elapsed().as_secs_f64();
        Ok(stats)
    }

    fn state(&self) -> Result<TrainState> {
        match &self.sharded {
            Some(sh) => sh.full_state(self.plan, &self.dist, &self.state),
            None => Ok(self.state.clone()),
        }
    }

    fn weights(&self) -> Result<TrainState> {
        let mut st =
            TrainState { step: self.state.step, master: self.state.master.clone(), m: Vec::new(), v: Vec::new() };
        if let Some(sh) = &self.sharded {
            sh.gather_masters(self.plan, &self.dist, &mut st.master)?;
        }
        (st.m, st.v) = (vec![Vec::new(); st.master.len()], vec![Vec::new(); st.master.len()]);
        Ok(st)
    }

    fn shard(&self) -> Result<Option<(std::borrow::Cow<'_, crate::dist::zero::Shard>, &TrainState)>> {
        Ok(self.sharded.as_ref().map(|s| (std::borrow::Cow::Borrowed(&s.shard), &self.state)))
    }

    fn distribute(&mut self, dist: crate::dist::Dist, shard_optimizer: bool) -> Result<()> {
        CpuBackend::distribute(self, dist, shard_optimizer);
        Ok(())
    }

    fn step_count(&self) -> u64 {
        self.state.step
    }

    fn set_state(&mut self, st: TrainState) -> Result<()> {
        crate::backend::check_state(self.plan, &st)?;
        self.state = st;
        self.refresh_model();
        if self.sharded.is_some() {
            self.shard();
        }
        Ok(())
    }

    fn shares_optimizer(&self) -> bool {
        self.sharded.is_some()
    }

    fn set_share(&mut self, st: TrainState, shard: crate::dist::zero::Shard) -> Result<()> {
        crate::backend::check_weights(self.plan, &st)?;
        if self.sharded.is_none() {
            bail!("a share of the optimizer for a rank that keeps all of it");
        }
        let sh = crate::optim::Sharded::from_share(self.plan, &self.dist, shard)?;
        self.state = st;
        self.refresh_model();
        self.keep(sh);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpmoe_ir::reference::NaiveGemm;

    /// The strided products against the reference's transposing defaults, overwriting and
    /// accumulating, on shapes that are neither square nor tile multiples.
    #[test]
    fn strided_products_match_the_reference() {
        let (m, k, n) = (7, 13, 5);
        let fill = |len: usize, s: f32| (0..len).map(|i| ((i * 37 + 11) % 23) as f32 * s - 1.0).collect::<Vec<f32>>();
        type Product = fn(&dyn Gemm, usize, usize, usize, &[f32], &[f32], &mut [f32], bool);
        let products: [(&str, Product, usize, usize); 3] = [
            ("xwt", |g, m, k, n, a, b, c, acc| g.xwt(m, k, n, a, b, c, acc), m * k, n * k),
            ("ab", |g, m, k, n, a, b, c, acc| g.ab(m, k, n, a, b, c, acc), m * k, k * n),
            ("atb", |g, m, k, n, a, b, c, acc| g.atb(m, k, n, a, b, c, acc), k * m, k * n),
        ];
        for (name, f, la, lb) in products {
            let (a, b) = (fill(la, 0.1), fill(lb, 0.07));
            for acc in [false, true] {
                let (mut want, mut got) = (fill(m * n, 0.01), fill(m * n, 0.01));
                f(&NaiveGemm, m, k, n, &a, &b, &mut want, acc);
                f(&FastGemm, m, k, n, &a, &b, &mut got, acc);
                for (x, y) in got.iter().zip(&want) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{name} acc={acc}: {got:?} vs {want:?}");
                }
            }
        }
    }
}
