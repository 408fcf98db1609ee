//! Cases whose gradients must be exactly zero: fully masked loss or attention rows, absent upstream.

use vpmoe_ir::reference::{Dims, Tensor};
use vpmoe_ir::{Attn, AttnKind, Op};

use crate::attention::{attn_case, attn_configs, attn_docs, tpa_case};
use crate::head::{head_ce, head_ce_inputs};
use crate::helpers::{bwd, dims, fwd, Rng};
use crate::moe::{router_inputs, router_op, separated_scores};

#[test]
fn head_ce_all_masked_gives_exactly_zero() {
    let mut rng = Rng::new(35);
    let (t, h, v) = (6, 3, 5);
    let xs = head_ce_inputs(&mut rng, t, h, v, vec![0; t]);
    let op = head_ce(h, v);
    let refs: Vec<&Tensor> = xs.iter().collect();
    let ys = fwd(&op, &dims(t, t), &refs);
    assert!(ys[0].f().iter().chain(ys[1].f()).all(|&x| x == 0.0), "masked token loss and lse are 0");
    let g = bwd(&op, &dims(t, t), &refs, &ys, &[Some(&rng.t(&[t], 1.0)), None]);
    assert!(g.iter().all(|g| g.f().iter().all(|&x| x == 0.0)), "all-masked head_ce must give exactly zero gradients");
}

/// With a window W ≥ 1 every query attends at least itself (j = i is causal, in its own
/// document and at distance 0 < W), so a row whose keys are all masked cannot occur in a real
/// configuration. The degenerate `Window(0)` masks every key of every row, which exercises the
/// D5 guarantee directly: zero output, exactly zero (finite) gradients, sinks included.
#[test]
fn attention_rows_with_every_key_masked_give_zero_gradients() {
    for sinks in [false, true] {
        let a = Attn { heads: 2, groups: 1, head_dim: 3, kind: AttnKind::Window(0), sinks };
        let mut rng = Rng::new(36);
        let xs = attn_case(&mut rng, a, 16, attn_docs());
        let refs: Vec<&Tensor> = xs.iter().collect();
        let op = Op::Attention(a);
        let ys = fwd(&op, &dims(16, 8), &refs);
        assert!(ys[0].f().iter().all(|&x| x == 0.0));
        let dy = rng.t(&ys[0].shape, 1.0);
        let g = bwd(&op, &dims(16, 8), &refs, &ys, &[Some(&dy)]);
        for gi in &g {
            assert!(gi.f().iter().all(|&x| x == 0.0), "all-masked rows must give zero gradients, got {gi:?}");
        }
    }
    // Partially masked: a sink with a very large logit takes (almost) all the mass; the
    // gradients stay finite (checked in `bwd`) and the sink's gradient is tiny, not NaN.
    let a = Attn { heads: 2, groups: 1, head_dim: 3, kind: AttnKind::Window(2), sinks: true };
    let mut rng = Rng::new(37);
    let mut xs = attn_case(&mut rng, a, 16, attn_docs());
    xs[4] = Tensor::f32(vec![2], vec![80.0, -80.0]);
    let refs: Vec<&Tensor> = xs.iter().collect();
    let op = Op::Attention(a);
    let ys = fwd(&op, &dims(16, 8), &refs);
    let dy = rng.t(&ys[0].shape, 1.0);
    let g = bwd(&op, &dims(16, 8), &refs, &ys, &[Some(&dy)]);
    assert!(g[3].f()[0].abs() < 1e-20);
}

/// An unseeded output contributes nothing: with every upstream gradient absent each op returns
/// exactly zero gradients.
#[test]
fn absent_upstream_gradients_are_zero() {
    let mut rng = Rng::new(38);
    let a = attn_configs()[3];
    let (top, tx) = tpa_case(&mut rng, 4, [5, 4, 2, 3, 3, 2], true);
    let cases: Vec<(Op, Dims, Vec<Tensor>)> = vec![
        (Op::Attention(a), dims(16, 8), attn_case(&mut rng, a, 16, attn_docs())),
        (top, dims(4, 4), tx),
        (router_op(4, 8, 2, None, true, true), dims(5, 5), router_inputs(&mut rng, 5, 4, 8, true, true)),
        (Op::SeqAuxLoss { experts: 6, topk: 2 }, dims(4, 4), vec![separated_scores(&mut rng, 4, 6)]),
    ];
    for (op, d, xs) in cases {
        let refs: Vec<&Tensor> = xs.iter().collect();
        let ys = fwd(&op, &d, &refs);
        let none = vec![None; ys.len()];
        for g in bwd(&op, &d, &refs, &ys, &none) {
            assert!(g.f().iter().all(|&x| x == 0.0), "{}: nonzero gradient without upstream", op.name());
        }
    }
}
