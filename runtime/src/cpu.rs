//! The cpu backend: interprets the plan's graph node by node with the IR reference semantics,
//! swapping in a blocked SIMD GEMM (`matrixmultiply`) for every matrix product.

use crate::backend::{Backend, Batch, ForwardOut};
use crate::params::Params;
use anyhow::{bail, Result};
use vpmoe_ir::reference::{self, Dims, Gemm, Tensor};
use vpmoe_ir::{Graph, ValueDef};

/// `c = a·bᵀ (+ c)` through matrixmultiply's sgemm.
pub struct FastGemm;

impl Gemm for FastGemm {
    fn xwt(&self, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
        if m == 0 || n == 0 {
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
    pub graph: &'g Graph,
    pub params: Params,
    pub gemm: Box<dyn Gemm>,
}

impl<'g> CpuBackend<'g> {
    pub fn new(graph: &'g Graph, params: Params) -> Self {
        CpuBackend { graph, params, gemm: Box::new(FastGemm) }
    }
}

impl Backend for CpuBackend<'_> {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn forward(&mut self, batch: &Batch, keep: &[&str]) -> Result<ForwardOut> {
        let g = self.graph;
        let dims = Dims { tokens: batch.tokens.len(), seq: batch.seq };
        let mut vals: Vec<Option<Tensor>> = vec![None; g.values.len()];
        for inp in &g.inputs {
            vals[inp.value.0 as usize] = Some(batch.input(&inp.name)?);
        }
        let last = g.last_uses();
        for (ni, node) in g.nodes.iter().enumerate() {
            let ins: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|v| match g.value(*v).def {
                    ValueDef::Param(p) => &self.params.tensors[p.0 as usize],
                    _ => vals[v.0 as usize].as_ref().expect("inputs are computed before use"),
                })
                .collect();
            let outs = reference::forward(&node.op, &dims, &ins, self.gemm.as_ref());
            for (v, t) in node.outputs.iter().zip(outs) {
                if t.data_has_non_finite() {
                    bail!("{}: produced a non-finite value (NaN or Inf)", node.name);
                }
                vals[v.0 as usize] = Some(t);
            }
            // Free what no later node reads (graph outputs live to the end).
            for v in &node.inputs {
                if last[v.0 as usize] == Some(ni) {
                    vals[v.0 as usize] = None;
                }
            }
        }
        let mut out = ForwardOut::default();
        for (name, v) in &g.outputs {
            if keep.contains(&name.as_str()) || name == "loss" || name.starts_with("aux.") {
                out.values.insert(name.clone(), vals[v.0 as usize].take().expect("outputs live to the end"));
            }
        }
        Ok(out)
    }
}

trait NonFinite {
    fn data_has_non_finite(&self) -> bool;
}
impl NonFinite for Tensor {
    fn data_has_non_finite(&self) -> bool {
        match &self.data {
            reference::Data::F32(v) => v.iter().any(|x| !x.is_finite()),
            reference::Data::I32(_) => false,
        }
    }
}
