//! Per-op check of the fused LM head and cross-entropy loss (`head_ce`).

use vpmoe_ir::reference::Tensor;
use vpmoe_ir::Op;

use crate::harness::{op_model, run};
use crate::helpers::{dims, it, Rng};

/// Inputs of `head_ce`, with confidence weights drawn from the stage-2 clip range [0.25, 4].
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_ce_inputs(
    rng: &mut Rng,
    t: usize,
    h: usize,
    v: usize,
    mask: Vec<i32>,
    span: Vec<i32>,
    scale: [f32; 3],
) -> Vec<Tensor> {
    let labels = (0..t).map(|_| rng.below(v) as i32).collect();
    vec![
        rng.t(&[t, h], 1.0),
        rng.t(&[v, h], 0.8),
        it(&[t], labels),
        it(&[t], mask),
        it(&[t], span),
        Tensor::f32(vec![3], scale.to_vec()),
        rng.range(&[t], 0.25, 4.0),
    ]
}

pub(crate) fn head_ce(h: usize, v: usize) -> Op {
    Op::HeadCe { hidden: h as u64, vocab: v as u64 }
}

#[test]
fn head_ce_gradients() {
    let mut rng = Rng::new(33);
    let (t, h, v) = (8, 5, 7);
    // Masked positions 2 and 5; span 2 is empty (no token has it); span 0 carries a weight too.
    let mask = vec![1, 1, 0, 1, 1, 0, 1, 1];
    let span = vec![1, 1, 1, 0, 1, 1, 0, 1];
    let xs = head_ce_inputs(&mut rng, t, h, v, mask, span, [0.3, 1.0 / 5.0, 0.5]);
    run(&op_model("head_ce", head_ce(h, v), dims(t, 4), xs, None, None), 34);
}
