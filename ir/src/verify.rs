//! The verifier. Invariants, checked after every pass in tests and debug builds:
//!
//! 1. Every value id in the graph is in range, and each value is defined exactly once, by the
//!    input, parameter or node output that its `def` names.
//! 2. Nodes are in execution order: every node input is a graph input, a parameter, or an
//!    output of an earlier node.
//! 3. Each node's input count and types equal its op's signature, and so do its output types.
//! 4. Node names, parameter names, input names and output names are unique and non-empty.
//! 5. Every node has at least one output that is used by a later node or is a graph output
//!    (no dead nodes) or writes a cache, and every parameter is read by some node.
//! 6. Graph outputs name existing values.

use crate::graph::{Graph, ValueDef, ValueId};
use std::collections::HashSet;

/// Checks every invariant, returning all violations (empty = valid).
pub fn verify(g: &Graph) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    let nv = g.values.len() as u32;
    let ok = |v: &ValueId| v.0 < nv;

    // 1. definitions agree with their owners
    for (i, inp) in g.inputs.iter().enumerate() {
        if !ok(&inp.value) || g.value(inp.value).def != ValueDef::Input(i as u32) {
            errs.push(format!("input ${} does not own its value", inp.name));
        }
    }
    for (i, p) in g.params.iter().enumerate() {
        if !ok(&p.value) || !matches!(g.value(p.value).def, ValueDef::Param(q) if q.0 as usize == i) {
            errs.push(format!("param @{} does not own its value", p.name));
        } else if g.value(p.value).ty != p.ty {
            errs.push(format!("param @{} type differs from its value's", p.name));
        }
    }
    let mut defined = vec![false; g.values.len()];
    for i in &g.inputs {
        if ok(&i.value) {
            defined[i.value.0 as usize] = true;
        }
    }
    for p in &g.params {
        if ok(&p.value) {
            defined[p.value.0 as usize] = true;
        }
    }

    let mut used = vec![false; g.values.len()];
    for (_, v) in &g.outputs {
        if ok(v) {
            used[v.0 as usize] = true;
        }
    }
    for n in &g.nodes {
        for v in n.inputs.iter().filter(|v| ok(v)) {
            used[v.0 as usize] = true;
        }
    }

    for (ni, n) in g.nodes.iter().enumerate() {
        let (ins, outs) = n.op.signature();
        // 2. + 3. inputs
        if n.inputs.len() != ins.len() {
            errs.push(format!(
                "{}: {} takes {} inputs ({}), got {}",
                n.name,
                n.op.name(),
                ins.len(),
                ins.iter().map(|p| p.0).collect::<Vec<_>>().join(", "),
                n.inputs.len()
            ));
        }
        for (v, (port, want)) in n.inputs.iter().zip(&ins) {
            if !ok(v) {
                errs.push(format!("{}: input {port} refers to missing value {}", n.name, v.0));
                continue;
            }
            if !defined[v.0 as usize] {
                errs.push(format!("{}: input {port} ({}) is used before it is defined", n.name, g.value_ref(*v)));
            }
            let got = &g.value(*v).ty;
            if got != want {
                errs.push(format!("{}: input {port} ({}) has type {got}, expected {want}", n.name, g.value_ref(*v)));
            }
        }
        // 1. + 3. outputs
        if n.outputs.len() != outs.len() {
            errs.push(format!("{}: {} has {} outputs, got {}", n.name, n.op.name(), outs.len(), n.outputs.len()));
        }
        for (oi, (v, (port, want))) in n.outputs.iter().zip(&outs).enumerate() {
            if !ok(v) {
                errs.push(format!("{}: output {port} refers to missing value {}", n.name, v.0));
                continue;
            }
            if g.value(*v).def != ValueDef::Node(crate::graph::NodeId(ni as u32), oi as u32) {
                errs.push(format!("{}: output {port} is not owned by this node", n.name));
            }
            if defined[v.0 as usize] {
                errs.push(format!("{}: output {port} is defined twice", n.name));
            }
            defined[v.0 as usize] = true;
            if &g.value(*v).ty != want {
                errs.push(format!("{}: output {port} has type {}, expected {want}", n.name, g.value(*v).ty));
            }
        }
        // 5. no dead nodes
        if !n.op.writes_cache() && !n.outputs.iter().any(|v| ok(v) && used[v.0 as usize]) {
            errs.push(format!("{}: no output of this node is used", n.name));
        }
    }
    for (i, v) in g.values.iter().enumerate() {
        if !defined[i] {
            errs.push(format!("value {i} ({}) is never defined", v.ty));
        }
    }
    for p in &g.params {
        if ok(&p.value) && !used[p.value.0 as usize] {
            errs.push(format!("param @{} is never read", p.name));
        }
    }
    // 4. unique names
    let mut dup = |kind: &str, names: Vec<String>| {
        let mut seen = HashSet::new();
        for n in names {
            if n.is_empty() {
                errs.push(format!("empty {kind} name"));
            } else if !seen.insert(n.clone()) {
                errs.push(format!("duplicate {kind} name {n}"));
            }
        }
    };
    dup("node", g.nodes.iter().map(|n| n.name.clone()).collect());
    dup("param", g.params.iter().map(|p| p.name.clone()).collect());
    dup("input", g.inputs.iter().map(|i| i.name.to_string()).collect());
    dup("output", g.outputs.iter().map(|o| g.output_text(&o.0)).collect());
    // 6.
    for (name, v) in &g.outputs {
        if !ok(v) {
            errs.push(format!("output {} refers to missing value {}", g.output_text(name), v.0));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}
