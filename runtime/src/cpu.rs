//! The cpu backend: interprets the plan's graph node by node with the IR reference semantics
//! (forward ops and their `vjp` nodes alike), swapping in a blocked SIMD GEMM (`matrixmultiply`)
//! for every matrix product. It holds the training state on the host and runs the optimizer with
//! [`crate::optim`].

use crate::backend::{Backend, Batch, ForwardOut, MicroOut, StepScalars, StepStats};
use crate::state::TrainState;
use anyhow::{bail, Result};
use half::bf16;
use std::collections::BTreeMap;
use std::time::Instant;
use vpmoe_compiler::Plan;
use vpmoe_ir::reference::{self, Dims, Gemm, Tensor};
use vpmoe_ir::{DType, Graph, ValueDef};

/// `c = a·bᵀ (+ c)` through matrixmultiply's sgemm.
pub struct FastGemm;

impl Gemm for FastGemm {
    fn xwt(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !acc {
                c[..m * n].fill(0.0);
            }
            return;
        }
        let beta = if acc { 1.0 } else { 0.0 };
        // a: m×k row-major (rs=k, cs=1); bᵀ: k×n with b n×k row-major (rs=1, cs=k).
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                b.as_ptr(),
                1,
                k as isize,
                beta,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    }
}

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
    loads: BTreeMap<String, Vec<u64>>,
    pub gemm: Box<dyn Gemm>,
    /// Round bf16 parameters' model copies to bf16 (D9). Off only for finite-difference checks,
    /// where the rounding would swallow the perturbation.
    round_bf16: bool,
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
        };
        be.refresh_model();
        be
    }

    fn refresh_model(&mut self) {
        self.model = self
            .plan
            .params
            .iter()
            .zip(&self.state.master)
            .map(|(p, w)| {
                let v = if p.ty.dtype == DType::Bf16 && self.round_bf16 {
                    w.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
                } else {
                    w.clone()
                };
                Tensor::f32(p.ty.shape(0), v)
            })
            .collect();
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

    /// Runs nodes `[..n]`; returns the graph outputs they define.
    fn run(&self, batch: &Batch, n: usize) -> Result<BTreeMap<String, Tensor>> {
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

impl Backend for CpuBackend<'_> {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn forward(&mut self, batch: &Batch, keep: &[&str]) -> Result<ForwardOut> {
        let all = self.run(batch, self.fwd_len)?;
        let values = all
            .into_iter()
            .filter(|(k, _)| keep.contains(&k.as_str()) || k == "loss" || k == "token_loss" || k.starts_with("aux."))
            .collect();
        Ok(ForwardOut { values })
    }

    fn accumulate(&mut self, batch: &Batch) -> Result<MicroOut> {
        let out = self.run(batch, self.graph.nodes.len())?;
        Ok(crate::backend::fold_micro(self.plan, out, batch, Some(&mut self.grads), &mut self.loads))
    }

    fn step(&mut self, s: &StepScalars) -> Result<StepStats> {
        let t0 = Instant::now();
        let loads = std::mem::take(&mut self.loads).into_iter().collect();
        let mut stats = crate::optim::apply(self.plan, &mut self.state, &mut self.grads, loads, s, self.gemm.as_ref())?;
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
        self.refresh_model();
        stats.optimizer_seconds = t0.elapsed().as_secs_f64();
        Ok(stats)
    }

    fn state(&self) -> Result<TrainState> {
        Ok(self.state.clone())
    }

    fn step_count(&self) -> u64 {
        self.state.step
    }

    fn set_state(&mut self, st: TrainState) -> Result<()> {
        crate::backend::check_state(self.plan, &st)?;
        self.state = st;
        self.refresh_model();
        Ok(())
    }
}
