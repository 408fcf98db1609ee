//! The backend-independent training state: fp32 master copies of every parameter (buffers such as
//! the expert biases included), the optimizer state and the step count. Checkpoints store exactly
//! this, so a state saved by one backend resumes on another.

use crate::params::Params;
use vpmoe_compiler::plan::ParamEntry;
use vpmoe_compiler::Plan;
use vpmoe_ir::OptGroup;

#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// Optimizer updates applied so far.
    pub step: u64,
    /// fp32 master of every parameter, in plan order.
    pub master: Vec<Vec<f32>>,
    /// Normuon momentum / AdamW first moment (empty for frozen parameters).
    pub m: Vec<Vec<f32>>,
    /// Normuon per-row second moment (`[matrices, rows]`) / AdamW second moment.
    pub v: Vec<Vec<f32>>,
}

impl TrainState {
    /// Fresh state: seeded initialisation (bf16 parameters start at bf16-representable values, so
    /// every backend starts from the same model) and zero optimizer state.
    pub fn init(plan: &Plan, seed: u64) -> TrainState {
        let p = Params::init(&plan.params, seed);
        let master: Vec<Vec<f32>> = p
            .tensors
            .into_iter()
            .map(|t| match t.data {
                vpmoe_ir::reference::Data::F32(v) => v, // moved, not copied: 24 GB for the locked config
                vpmoe_ir::reference::Data::I32(_) => unreachable!("parameters are f32 tensors"),
            })
            .collect();
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for e in &plan.params {
            let (_, mm, vv) = Self::sizes(e);
            m.push(vec![0.0; mm]);
            v.push(vec![0.0; vv]);
        }
        TrainState { step: 0, master, m, v }
    }

    /// A new run from trained weights (the next stage of the recipe): `self`'s masters, step 0,
    /// zero optimizer state.
    pub fn restart(self) -> TrainState {
        let zero = |v: Vec<Vec<f32>>| v.into_iter().map(|x| vec![0.0; x.len()]).collect();
        TrainState { step: 0, master: self.master, m: zero(self.m), v: zero(self.v) }
    }

    /// Element counts of (master, first moment, second moment) of one parameter.
    pub fn sizes(e: &ParamEntry) -> (usize, usize, usize) {
        let n = e.numel as usize;
        match e.opt {
            OptGroup::Frozen => (n, 0, 0),
            OptGroup::AdamW => (n, n, n),
            OptGroup::Normuon => (n, n, n / *e.ty.shape(0).last().expect("Normuon parameters are matrices")),
        }
    }

    /// SHA-256 over every master weight's bytes, in plan order: a bitwise fingerprint of the model.
    pub fn checksum(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for w in &self.master {
            h.update(bytemuck::cast_slice::<f32, u8>(w));
        }
        vpmoe_ir::hex(&h.finalize())
    }
}
