//! Reference vector–Jacobian products of every forward op (MODEL.md §5): plain loops, f32
//! tensors with f64 accumulation, recomputing whatever forward intermediates they need. This is
//! the living definition that the autodiff pass's `vjp` nodes execute on the cpu backend and
//! that backward kernels are tested against.

use crate::op::{Op, Vjp};
use crate::reference::{Dims, Gemm, Tensor};

/// Executes a `vjp` node: `ins` are the forward inputs, the forward outputs and the supplied
/// upstream gradients (in [`Op::signature`] order of the `vjp` op).
pub fn vjp(v: &Vjp, dims: &Dims, ins: &[&Tensor], gemm: &dyn Gemm) -> Vec<Tensor> {
    let (fi, fo) = v.of.signature();
    let (xs, rest) = ins.split_at(fi.len());
    let (ys, gs) = rest.split_at(fo.len());
    let mut gs = gs.iter();
    let dys: Vec<Option<&Tensor>> = v.seeds.iter().map(|&s| if s { Some(*gs.next().unwrap()) } else { None }).collect();
    let grads = backward(&v.of, dims, xs, ys, &dys, gemm);
    let mask = v.of.grad_ins();
    assert_eq!(grads.len(), mask.iter().filter(|&&m| m).count(), "{}: gradient count", v.of.name());
    grads
}

/// Gradients of the forward op's differentiable inputs ([`Op::grad_ins`]), in input order.
/// `xs`: forward inputs; `ys`: forward outputs; `dys[i]`: upstream gradient of output `i`
/// (`None` = zero).
pub fn backward(
    op: &Op,
    dims: &Dims,
    xs: &[&Tensor],
    ys: &[&Tensor],
    dys: &[Option<&Tensor>],
    gemm: &dyn Gemm,
) -> Vec<Tensor> {
    let _ = (dims, xs, ys, dys, gemm);
    unimplemented!("backward of {}", op.name())
}
