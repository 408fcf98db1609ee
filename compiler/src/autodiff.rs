//! `autodiff`: appends the backward graph to the forward graph as explicit nodes.
//!
//! Walking the forward nodes in reverse, every node that a gradient reaches and whose inputs need
//! one gets a `vjp` node (`<node>.bwd`) reading the node's inputs, outputs and the upstream
//! gradients of its seeded outputs. A value read by several nodes receives one gradient
//! contribution per reader; they are summed by an `add` node (`<node>.bwd.sum<port>`) in a fixed
//! order, so the graph (and every backend executing it) is deterministic. The vjp of an op that
//! accumulates (`Op::accumulates`) takes the one earlier contribution to its input 0's gradient as
//! a running sum (`Vjp::acc`) instead, and a residual input's contribution is the upstream
//! gradient itself (`Op::passthrough`).
//!
//! Seeds are runtime scalars: `loss_grad` (1 for a plain step) for the span-normalised loss, whose
//! span scales already carry D6's global `w/N` normalisation, and `aux_grad` (`α/M`, MODEL.md
//! §4.10) for every sequence aux loss. The graph then outputs `grad.<param>` (f32) for every
//! trainable parameter; a trainable parameter that no gradient reaches is a compile error.

use anyhow::{bail, Result};
use std::collections::HashMap;
use vpmoe_ir::{DType, Graph, InputKind, InputName, Op, OutputName, ParamId, TensorType, ValueId, Vjp};

pub fn autodiff(g: &mut Graph) -> Result<()> {
    let n_fwd = g.nodes.len();
    let Some(loss) = g.output_named(&OutputName::Loss) else { bail!("the graph has no loss output to differentiate") };
    let loss_grad = g.input(InputName::LossGrad, InputKind::Scalar, TensorType::scalar(DType::F32));
    let aux: Vec<ValueId> =
        g.outputs.iter().filter(|(n, _)| matches!(n, OutputName::AuxLoss { .. })).map(|(_, v)| *v).collect();
    let aux_grad =
        (!aux.is_empty()).then(|| g.input(InputName::AuxGrad, InputKind::Scalar, TensorType::scalar(DType::F32)));

    // Which values depend on a trainable parameter through differentiable ports.
    let mut needs = vec![false; g.values.len()];
    for p in &g.params {
        needs[p.value.0 as usize] = p.trainable();
    }
    for node in &g.nodes[..n_fwd] {
        let reach = node.inputs.iter().zip(node.op.grad_ins()).any(|(v, d)| d && needs[v.0 as usize]);
        for (v, d) in node.outputs.iter().zip(node.op.grad_outs()) {
            needs[v.0 as usize] = reach && d;
        }
    }

    let mut contrib: HashMap<ValueId, Vec<ValueId>> = HashMap::new();
    contrib.entry(loss).or_default().push(loss_grad);
    for a in aux {
        contrib.entry(a).or_default().push(aux_grad.expect("aux outputs imply aux_grad"));
    }

    // A parameter's gradient is final once its first reader's vjp has run: its sum is emitted
    // there, so the contributions (and the gradient itself, see `plan`) do not live to the end.
    let mut first_reader: HashMap<ValueId, usize> = HashMap::new();
    for (ni, node) in g.nodes[..n_fwd].iter().enumerate().rev() {
        for v in &node.inputs {
            first_reader.insert(*v, ni);
        }
    }
    let params: HashMap<ValueId, String> =
        g.params.iter().filter(|p| p.trainable()).map(|p| (p.value, p.name.clone())).collect();
    let mut done: HashMap<ValueId, ValueId> = HashMap::new();

    for ni in (0..n_fwd).rev() {
        let node = g.nodes[ni].clone();
        let outs = node.op.grad_outs();
        let seeds: Vec<bool> = node.outputs.iter().zip(&outs).map(|(v, d)| *d && contrib.contains_key(v)).collect();
        let grad_ins = node.op.grad_ins();
        let wanted = node.inputs.iter().zip(&grad_ins).any(|(v, d)| *d && needs[v.0 as usize]);
        if !wanted || !seeds.iter().any(|s| *s) {
            continue;
        }
        let mut ins = node.inputs.clone();
        ins.extend(&node.outputs);
        let mut upstream = vec![None; seeds.len()];
        for (port, (v, s)) in node.outputs.iter().zip(&seeds).enumerate() {
            if *s {
                let d = total(g, &mut contrib, *v, &format!("{}.bwd.sum{port}", node.name));
                upstream[port] = Some(d);
                ins.push(d);
            }
        }
        // Fold the one earlier gradient contribution of input 0 into this vjp (`Vjp::acc`)
        // rather than summing the two with an `add` node later: one launch and one [T, d]
        // round trip fewer per residual-stream sum.
        let x0 = node.inputs[0];
        let acc = node.op.accumulates()
            && grad_ins[0]
            && needs[x0.0 as usize]
            && contrib.get(&x0).is_some_and(|c| c.len() == 1);
        if acc {
            ins.push(contrib.remove(&x0).expect("checked")[0]);
        }
        let vjp = Op::Vjp(Box::new(Vjp { of: node.op.clone(), seeds, acc }));
        let grads = g.node(format!("{}.bwd", node.name), vjp, ins);
        let pass = node.op.passthrough();
        let targets = node
            .inputs
            .iter()
            .zip(&grad_ins)
            .enumerate()
            .filter(|&(i, (_, d))| *d && !pass.contains(&i))
            .map(|(_, (v, _))| *v);
        for (x, dx) in targets.zip(grads) {
            if needs[x.0 as usize] {
                contrib.entry(x).or_default().push(dx);
            }
        }
        // A residual's gradient is the upstream gradient itself (`Op::passthrough`).
        for p in pass {
            let x = node.inputs[p];
            if needs[x.0 as usize] {
                contrib.entry(x).or_default().push(upstream[0].expect("a passthrough op's output is seeded"));
            }
        }
        for x in &node.inputs {
            if let Some(name) = params.get(x) {
                if first_reader[x] == ni && contrib.contains_key(x) {
                    let d = total(g, &mut contrib, *x, &format!("grad.{name}.sum"));
                    done.insert(*x, d);
                }
            }
        }
    }

    for pi in 0..g.params.len() {
        let p = g.params[pi].clone();
        if !p.trainable() {
            continue;
        }
        let d = match done.get(&p.value) {
            Some(d) => *d,
            None if contrib.contains_key(&p.value) => total(g, &mut contrib, p.value, &format!("grad.{}.sum", p.name)),
            None => bail!("trainable parameter {} receives no gradient from the loss", p.name),
        };
        g.output(OutputName::Grad(ParamId(pi as u32)), d);
    }
    Ok(())
}

/// The summed gradient of `v` (its single contribution, or an `add` node over all of them).
fn total(g: &mut Graph, contrib: &mut HashMap<ValueId, Vec<ValueId>>, v: ValueId, name: &str) -> ValueId {
    let parts = contrib.remove(&v).expect("value has gradient contributions");
    if parts.len() == 1 {
        return parts[0];
    }
    let ty = g.value(parts[0]).ty.clone();
    debug_assert!(parts.iter().all(|p| g.value(*p).ty == ty));
    g.node(name.to_string(), Op::Add { n: parts.len() as u64, ty }, parts)[0]
}

/// Index of the first backward node (the forward graph is `nodes[..forward_len]`).
pub fn forward_len(g: &Graph) -> usize {
    g.nodes.iter().position(|n| matches!(n.op, Op::Vjp(_) | Op::Add { .. })).unwrap_or(g.nodes.len())
}
