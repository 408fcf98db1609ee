//! Ops without a backward, and `vjp` nodes executed through the reference forward.

use vpmoe_ir::backward::backward;
use vpmoe_ir::reference::{NaiveGemm, Tensor};
use vpmoe_ir::{Op, Vjp};

use crate::head::head_ce;
use crate::helpers::{bwd, dims, fwd, Rng};
use crate::moe::{router_inputs, router_op};

#[test]
#[should_panic(expected = "backward of add")]
fn add_has_no_backward() {
    let x = Tensor::f32(vec![1], vec![1.0]);
    let op = Op::Add { n: 2, ty: vpmoe_ir::TensorType::tok(vpmoe_ir::DType::F32, &[]) };
    backward(&op, &dims(1, 1), &[&x, &x], &[&x], &[Some(&x)], &NaiveGemm);
}

#[test]
#[should_panic(expected = "backward of vjp")]
fn vjp_has_no_backward() {
    let op = Op::Vjp(Box::new(Vjp { of: head_ce(1, 1), seeds: vec![true, false], acc: false }));
    backward(&op, &dims(1, 1), &[], &[], &[], &NaiveGemm);
}

/// A `vjp` node executed through `reference::forward` is `backward` with its seeds.
#[test]
fn vjp_node_executes_backward() {
    let mut rng = Rng::new(39);
    let op = router_op(4, 8, 2, None, true, true);
    let xs = router_inputs(&mut rng, 5, 4, 8, true, true);
    let refs: Vec<&Tensor> = xs.iter().collect();
    let ys = fwd(&op, &dims(5, 5), &refs);
    let dgate = rng.t(&ys[1].shape, 1.0);
    let direct = bwd(&op, &dims(5, 5), &refs, &ys, &[None, Some(&dgate), None]);
    let node = Op::Vjp(Box::new(Vjp { of: op, seeds: vec![false, true, false], acc: false }));
    let mut ins = refs.clone();
    ins.extend(ys.iter());
    ins.push(&dgate);
    assert_eq!(fwd(&node, &dims(5, 5), &ins), direct);
}

/// With `acc`, the node's input-0 gradient is the running gradient plus the plain one; the
/// weight gradient is unchanged.
#[test]
fn vjp_acc_adds_the_running_gradient() {
    let mut rng = Rng::new(41);
    let op = Op::RmsNorm { dim: 16, eps: 1e-5 };
    let (x, w) = (rng.t(&[5, 16], 1.0), rng.t(&[16], 1.0));
    let ys = fwd(&op, &dims(5, 5), &[&x, &w]);
    let (dy, run) = (rng.t(&[5, 16], 1.0), rng.t(&[5, 16], 1.0));
    let plain = bwd(&op, &dims(5, 5), &[&x, &w], &ys, &[Some(&dy)]);
    let node = Op::Vjp(Box::new(Vjp { of: op, seeds: vec![true], acc: true }));
    assert_eq!(node.signature().0.len(), 5, "x, weight, y, dy, acc");
    let got = fwd(&node, &dims(5, 5), &[&x, &w, &ys[0], &dy, &run]);
    let want: Vec<f32> = plain[0].f().iter().zip(run.f()).map(|(g, a)| g + a).collect();
    assert_eq!(got[0].f(), &want[..]);
    assert_eq!(got[1], plain[1]);
}
