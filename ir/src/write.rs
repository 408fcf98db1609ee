//! The canonical text form: stable, diffable, no addresses, paths or timings.
//!
//! ```text
//! graph NAME
//!   input $NAME: TYPE data|scalar
//!   param @NAME: TYPE init=INIT opt=normuon|adamw|frozen [wd] [role=ROLE]
//!   NODE-NAME: %A[, %B…] = OP(ARG, …) {KEY=VALUE …} -> TYPE[, TYPE…]
//!   output NAME = VALUE
//! ```
//! Inputs are `$name`, parameters `@name`, node outputs `%n` numbered in definition order.
//! [`crate::parse`] reads it back.

use crate::graph::{Graph, Init, OptGroup, Role, ValueDef, ValueId};
use std::fmt::Write;

impl Graph {
    /// How a value is referred to in the text form.
    pub fn value_ref(&self, v: ValueId) -> String {
        match self.value(v).def {
            ValueDef::Input(i) => format!("${}", self.inputs[i as usize].name),
            ValueDef::Param(p) => format!("@{}", self.params[p.0 as usize].name),
            ValueDef::Node(..) => format!("%{}", self.node_output_index(v)),
        }
    }

    fn node_output_index(&self, v: ValueId) -> usize {
        // Node outputs are numbered in definition order, skipping inputs and params.
        self.values[..v.0 as usize].iter().filter(|x| matches!(x.def, ValueDef::Node(..))).count()
    }

    pub fn to_text(&self) -> String {
        let mut refs: Vec<String> = Vec::with_capacity(self.values.len());
        let mut n = 0usize;
        for v in &self.values {
            refs.push(match v.def {
                ValueDef::Input(i) => format!("${}", self.inputs[i as usize].name),
                ValueDef::Param(p) => format!("@{}", self.params[p.0 as usize].name),
                ValueDef::Node(..) => {
                    n += 1;
                    format!("%{}", n - 1)
                }
            });
        }
        let r = |v: &ValueId| refs[v.0 as usize].as_str();
        let mut s = String::new();
        writeln!(s, "graph {}", self.name).unwrap();
        for i in &self.inputs {
            let kind = match i.kind {
                crate::graph::InputKind::Data => "data",
                crate::graph::InputKind::Scalar => "scalar",
            };
            writeln!(s, "  input ${}: {} {kind}", i.name, self.value(i.value).ty).unwrap();
        }
        for p in &self.params {
            let init = match p.init {
                Init::Zeros => "zeros".to_string(),
                Init::Ones => "ones".to_string(),
                Init::Normal { std } => format!("normal({std:?})"),
                Init::Const { value } => format!("const({value:?})"),
                Init::LogFreq { scale, base, head_dim } => format!("log_freq({scale:?},{base:?},{head_dim})"),
            };
            let opt = match p.opt {
                OptGroup::Normuon => "normuon",
                OptGroup::AdamW => "adamw",
                OptGroup::Frozen => "frozen",
            };
            write!(s, "  param @{}: {} init={init} opt={opt}", p.name, p.ty).unwrap();
            if p.weight_decay {
                s.push_str(" wd");
            }
            match p.role {
                Role::Other => {}
                Role::InputEmbedding => s.push_str(" role=input_embedding"),
                Role::OutputHead => s.push_str(" role=output_head"),
                Role::TiedEmbedding => s.push_str(" role=tied_embedding"),
                Role::Experts { experts, topk } => write!(s, " role=experts({topk}/{experts})").unwrap(),
                Role::ExpertBias { layer } => write!(s, " role=expert_bias({layer})").unwrap(),
            }
            s.push('\n');
        }
        for node in &self.nodes {
            let outs: Vec<&str> = node.outputs.iter().map(r).collect();
            let args: Vec<&str> = node.inputs.iter().map(r).collect();
            let attrs: Vec<String> = node.op.attrs().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            let attrs = if attrs.is_empty() { String::new() } else { format!(" {{{}}}", attrs.join(" ")) };
            let tys: Vec<String> = node.outputs.iter().map(|v| self.value(*v).ty.to_string()).collect();
            writeln!(
                s,
                "  {}: {} = {}({}){attrs} -> {}",
                node.name,
                outs.join(", "),
                node.op.name(),
                args.join(", "),
                tys.join(", ")
            )
            .unwrap();
        }
        for (name, v) in &self.outputs {
            writeln!(s, "  output {} = {}", self.output_text(name), r(v)).unwrap();
        }
        s
    }
}
