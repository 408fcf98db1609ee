//! Every IR node (forward ops, every vjp, add) of the locked and small configurations lowers to
//! launches whose families exist, whose template and C argument counts match the family, and
//! whose arguments are well-typed references to the node's own ports or scratch buffers; every
//! output of a node is written by at least one of its launches.

mod common;

use common::{all_nodes, locked, smalls, Cfg};
use std::collections::BTreeSet;
use vpmoe_codegen::lower_node;
use vpmoe_codegen::{family, Arg, CType, LaunchDim};
use vpmoe_ir::{DType, Node, Op};

/// The dtype a pointer parameter points to (None: `void*`, any), and whether it is const; None
/// for a scalar.
fn pointee(ctype: CType) -> Option<(Option<DType>, bool)> {
    ctype.is_pointer().then(|| (ctype.pointee(), !ctype.is_mut()))
}

fn check_node(cfg: &Cfg, node: &Node) -> Vec<String> {
    let mut errs = Vec::new();
    let (ins, outs) = node.op.signature();
    let (launches, scratch) = lower_node(node);
    let ty_of = |v: u32| -> (DType, bool) {
        if let Some(i) = node.inputs.iter().position(|x| x.0 == v) {
            (ins[i].1.dtype, false)
        } else if let Some(o) = node.outputs.iter().position(|x| x.0 == v) {
            (outs[o].1.dtype, true)
        } else {
            panic!("value {v} is not a port")
        }
    };
    let port_ty = |v: u32| {
        let i = node.inputs.iter().position(|x| x.0 == v);
        i.map_or_else(|| outs[node.outputs.iter().position(|x| x.0 == v).unwrap()].1.clone(), |i| ins[i].1.clone())
    };
    let mut written = BTreeSet::new();
    let ctx = format!("[{}] {}", cfg.name, node.name);
    if launches.is_empty() {
        errs.push(format!("{ctx}: no launches"));
    }
    for s in &scratch {
        if (s.per_token == 0) == (s.fixed == 0) {
            errs.push(format!("{ctx}: scratch must be per-token xor fixed: {s:?}"));
        }
    }
    for (li, l) in launches.iter().enumerate() {
        let f = family(&l.kernel.family);
        let lctx = format!("{ctx} launch {li} ({})", l.kernel.name());
        if f.tparams.len() != l.kernel.targs.len() {
            errs.push(format!("{lctx}: {} template args for {} params", l.kernel.targs.len(), f.tparams.len()));
        }
        if l.args.len() != f.params.len() {
            errs.push(format!("{lctx}: {} args for {} params", l.args.len(), f.params.len()));
            continue;
        }
        if l.block == 0 || l.block > 1024 || l.block % 32 != 0 {
            errs.push(format!("{lctx}: block {}", l.block));
        }
        for d in l.grid {
            if d == LaunchDim::Const(0) {
                errs.push(format!("{lctx}: empty grid dimension"));
            }
        }
        for (a, (ctype, pname)) in l.args.iter().zip(f.params) {
            let p = pointee(*ctype);
            let actx = format!("{lctx} param {pname}: {} <- {a:?}", ctype.c());
            match a {
                Arg::Value(v) | Arg::ValueAt { v, .. } => {
                    let Some((want, konst)) = p else {
                        errs.push(format!("{actx}: value passed to a scalar"));
                        continue;
                    };
                    if !node.inputs.contains(v) && !node.outputs.contains(v) {
                        errs.push(format!("{actx}: value is not a port of the node"));
                        continue;
                    }
                    let (dt, is_out) = ty_of(v.0);
                    if let Arg::ValueAt { offset, .. } = a {
                        // Offsets index fixed-size values (parameter rows), never token rows.
                        let (per_tok, fixed) = port_ty(v.0).numel_split();
                        if per_tok != 0 || *offset >= fixed {
                            errs.push(format!("{actx}: offset past a fixed-size value ({per_tok}/token + {fixed})"));
                        }
                    }
                    if want.is_some_and(|w| w != dt) {
                        errs.push(format!("{actx}: dtype {dt:?}"));
                    }
                    if !konst {
                        if is_out {
                            written.insert(v.0);
                        } else {
                            errs.push(format!("{actx}: an input passed as a mutable pointer"));
                        }
                    }
                }
                Arg::Scratch { index, offset } => {
                    let Some((want, _)) = p else {
                        errs.push(format!("{actx}: scratch passed to a scalar"));
                        continue;
                    };
                    let Some(s) = scratch.get(*index as usize) else {
                        errs.push(format!("{actx}: no scratch {index}"));
                        continue;
                    };
                    if want.is_some_and(|w| w != s.dtype) {
                        errs.push(format!("{actx}: scratch dtype {:?}", s.dtype));
                    }
                    let bound = if s.per_token > 0 { s.per_token } else { s.fixed };
                    if *offset >= bound {
                        errs.push(format!("{actx}: offset past the scratch ({bound})"));
                    }
                }
                Arg::Null => {
                    if p.is_none() {
                        errs.push(format!("{actx}: null scalar"));
                    }
                }
                // The decode program's caches: a bf16 buffer, written only by the cache write.
                Arg::Cache { .. } => {
                    let writer = l.kernel.family == "cache_write";
                    if p != Some((Some(DType::Bf16), !writer)) {
                        errs.push(format!("{actx}: a cache as {}", ctype.c()));
                    }
                }
                Arg::BlockTable => {
                    if p != Some((Some(DType::I32), true)) || *pname != "blocks" {
                        errs.push(format!("{actx}: the block table as `{} {pname}`", ctype.c()));
                    }
                }
                Arg::Tokens { .. } | Arg::Seq | Arg::Int(_) | Arg::BlocksPerSlot => {
                    if *ctype != CType::Int {
                        errs.push(format!("{actx}: integer for {}", ctype.c()));
                    }
                }
                Arg::Float(_) | Arg::InvRows => {
                    if *ctype != CType::Float {
                        errs.push(format!("{actx}: float for {}", ctype.c()));
                    }
                }
                // The split reductions' counters: the `int* tickets` parameter, nothing else.
                Arg::Tickets => {
                    if *pname != "tickets" || *ctype != CType::I32Mut {
                        errs.push(format!("{actx}: tickets for `{} {pname}`", ctype.c()));
                    }
                }
                // The flag of the launch writing `v`, an f32 output of the node.
                Arg::Accum(v) => {
                    if *pname != "accum" {
                        errs.push(format!("{actx}: accum flag for another parameter"));
                    }
                    if !node.outputs.contains(v) || ty_of(v.0) != (DType::F32, true) {
                        errs.push(format!("{actx}: not an f32 output of the node"));
                    }
                    if !l.args.iter().any(|a| a.value() == Some(*v)) {
                        errs.push(format!("{actx}: the launch does not write it"));
                    }
                }
            }
        }
    }
    for v in &node.outputs {
        if !written.contains(&v.0) {
            errs.push(format!(
                "{ctx}: output {} ({}) is never written",
                v.0,
                outs[node.outputs.iter().position(|x| x == v).unwrap()].0
            ));
        }
    }
    errs
}

#[test]
fn every_node_lowers_to_valid_launches() {
    let mut errs = Vec::new();
    let mut cfgs = vec![locked()];
    cfgs.extend(smalls());
    for cfg in &cfgs {
        let nodes = all_nodes(cfg);
        // Every forward op kind with a differentiable output has a vjp among the nodes.
        let covered: BTreeSet<&str> = nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Vjp(v) => Some(v.of.name()),
                _ => None,
            })
            .collect();
        for op in common::forward_ops(cfg).iter().filter(|op| op.grad_outs().contains(&true)) {
            assert!(covered.contains(op.name()), "no vjp of {}", op.name());
        }
        for node in &nodes {
            errs.extend(check_node(cfg, node));
        }
    }
    assert!(errs.is_empty(), "{} problems:\n{}", errs.len(), errs.join("\n"));
}

#[test]
fn kernel_names_are_deterministic_and_unique_per_instantiation() {
    let mut seen = std::collections::BTreeMap::new();
    let mut cfgs = vec![locked()];
    cfgs.extend(smalls());
    for cfg in &cfgs {
        for node in all_nodes(cfg) {
            let (a, _) = lower_node(&node);
            let (b, _) = lower_node(&node);
            assert_eq!(a, b, "{}: lowering is not deterministic", node.name);
            for l in a {
                let prev = seen.insert(l.kernel.name(), l.kernel.clone());
                assert!(prev.is_none_or(|p| p == l.kernel), "name collision {}", l.kernel.name());
            }
        }
    }
}
