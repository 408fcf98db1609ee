//! The optimizer program (MODEL.md §7, D10): which parameters Normuon and AdamW update, and the
//! Normuon matrices grouped into shape families so that each family is orthogonalised by one
//! batched Polar Express operation per step (a stacked `[E, r, c]` expert tensor is E matrices).
//! It is part of the plan and printed after the graph in `ir.txt`.

use crate::config::Arch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use vpmoe_ir::{Graph, OptGroup};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Index into the plan's parameter table.
    pub param: u32,
    /// Matrices this parameter contributes (1, or E for stacked experts).
    pub matrices: u64,
}

/// Same-shaped Normuon matrices, orthogonalised together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Family {
    pub rows: u64,
    pub cols: u64,
    pub members: Vec<Member>,
}

impl Family {
    pub fn matrices(&self) -> u64 {
        self.members.iter().map(|m| m.matrices).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerPlan {
    pub momentum: f64,
    pub beta2: f64,
    pub eps: f64,
    pub nesterov: bool,
    pub polar_express: Vec<[f64; 3]>,
    pub polar_express_safety: f64,
    pub polar_express_eps: f64,
    /// Normuon shape families, sorted by `(rows, cols)`.
    pub families: Vec<Family>,
    /// Parameters updated by AdamW, in table order.
    pub adamw: Vec<u32>,
}

pub fn build(g: &Graph, arch: &Arch) -> OptimizerPlan {
    let mut fams: BTreeMap<(u64, u64), Vec<Member>> = BTreeMap::new();
    let mut adamw = Vec::new();
    for (i, p) in g.params.iter().enumerate() {
        let shape = p.ty.shape(0);
        match p.opt {
            OptGroup::Normuon => {
                let (r, c) = (shape[shape.len() - 2] as u64, shape[shape.len() - 1] as u64);
                let n = shape[..shape.len() - 2].iter().product::<usize>() as u64;
                fams.entry((r, c)).or_default().push(Member { param: i as u32, matrices: n });
            }
            OptGroup::AdamW => adamw.push(i as u32),
            OptGroup::Frozen => {}
        }
    }
    let o = &arch.optimizer;
    OptimizerPlan {
        momentum: o.momentum,
        beta2: o.beta2,
        eps: o.eps,
        nesterov: true,
        polar_express: o.polar_express.clone(),
        polar_express_safety: o.polar_express_safety,
        polar_express_eps: 1e-6,
        families: fams.into_iter().map(|((rows, cols), members)| Family { rows, cols, members }).collect(),
        adamw,
    }
}

impl OptimizerPlan {
    /// The kernels the device optimizer launches for this program (`vpmoe_codegen::optim`).
    pub fn kernels(&self, params: &[crate::plan::ParamEntry]) -> Vec<(vpmoe_codegen::KernelSpec, u32)> {
        let shapes: Vec<(u64, u64)> = self.families.iter().map(|f| (f.rows, f.cols)).collect();
        let mut f32_models: Vec<bool> =
            self.adamw.iter().map(|&i| params[i as usize].ty.dtype == vpmoe_ir::DType::F32).collect();
        f32_models.sort();
        f32_models.dedup();
        vpmoe_codegen::optim::kernels(&shapes, &f32_models)
    }

    /// The text form appended to `ir.txt`.
    pub fn to_text(&self, g: &Graph) -> String {
        let mut s = String::new();
        let name = |i: u32| g.params[i as usize].name.as_str();
        writeln!(
            s,
            "optimizer normuon momentum={:?} beta2={:?} eps={:?} nesterov={}",
            self.momentum, self.beta2, self.eps, self.nesterov
        )
        .unwrap();
        writeln!(s, "  polar_express safety={:?} eps={:?}", self.polar_express_safety, self.polar_express_eps).unwrap();
        for (i, [a, b, c]) in self.polar_express.iter().enumerate() {
            writeln!(s, "    iter {}: a={a:?} b={b:?} c={c:?}", i + 1).unwrap();
        }
        for f in &self.families {
            writeln!(s, "  family [{}, {}] x{}", f.rows, f.cols, f.matrices()).unwrap();
            for m in &f.members {
                writeln!(s, "    @{} x{}", name(m.param), m.matrices).unwrap();
            }
        }
        writeln!(s, "optimizer adamw").unwrap();
        for &p in &self.adamw {
            writeln!(s, "  @{}", name(p)).unwrap();
        }
        s
    }
}
