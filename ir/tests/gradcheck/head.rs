//! Per-op checks of the fused LM head and cross-entropy (`head_ce`), the span-normalised
//! objective (`span_loss`) and stage 3's OPD objective through `token_weight`.

use vpmoe_ir::reference::Tensor;
use vpmoe_ir::Op;

use crate::harness::{gradcheck, op_model, run, BwdFn, FwdFn, Model};
use crate::helpers::{bwd, dims, fwd, it, Rng};

/// Inputs of `head_ce`: hidden states, head, labels and the mask.
pub(crate) fn head_ce_inputs(rng: &mut Rng, t: usize, h: usize, v: usize, mask: Vec<i32>) -> Vec<Tensor> {
    let labels = (0..t).map(|_| rng.below(v) as i32).collect();
    vec![rng.t(&[t, h], 1.0), rng.t(&[v, h], 0.8), it(&[t], labels), it(&[t], mask)]
}

pub(crate) fn head_ce(h: usize, v: usize) -> Op {
    Op::HeadCe { hidden: h as u64, vocab: v as u64 }
}

#[test]
fn head_ce_gradients() {
    let mut rng = Rng::new(33);
    let (t, h, v) = (8, 5, 7);
    // Masked positions 2 and 5.
    let xs = head_ce_inputs(&mut rng, t, h, v, vec![1, 1, 0, 1, 1, 0, 1, 1]);
    run(&op_model("head_ce", head_ce(h, v), dims(t, 4), xs, None, None), 34);
}

#[test]
fn span_loss_gradients() {
    let mut rng = Rng::new(40);
    let t = 8;
    // Span 2 is empty (no token has it); span 0 carries a weight too; weights from stage 2's
    // clip range and of either sign (OPD advantages).
    let xs = vec![
        rng.range(&[t], 0.0, 5.0),
        it(&[t], vec![1, 1, 1, 0, 1, 1, 0, 1]),
        Tensor::f32(vec![3], vec![0.3, 0.2, 0.5]),
        rng.range(&[t], -4.0, 4.0),
    ];
    run(&op_model("span_loss", Op::SpanLoss, dims(t, 4), xs, None, None), 41);
}

/// Stage 3's objective `Σ_t min(exp(lp_t − sampler_t), c)·(teacher_t − lp_t)·scale·ce_t` with
/// the weight a stop-gradient: its gradient is that of the surrogate whose weights are frozen at
/// the point of evaluation. The forward below freezes them at the base point; the backward is
/// what the compiled graph runs (head_ce → token_weight → span_loss, autodiff through head_ce
/// and span_loss only), recomputing the weights from the inputs it is given. Sampler
/// log-probabilities put some ratios above the clip c = 2 and some below.
#[test]
fn opd_objective_gradient_is_the_stop_gradient_one() {
    let mut rng = Rng::new(42);
    let (t, h, v) = (10, 4, 9);
    let d = dims(t, 5);
    let xs = head_ce_inputs(&mut rng, t, h, v, vec![1, 1, 1, 0, 1, 1, 1, 1, 0, 1]);
    let span = it(&[t], (0..t).map(|i| 1 + (i >= 6) as i32).collect());
    let scale = Tensor::f32(vec![3], vec![0.0, 1.0 / 6.0, 0.5]);
    let teacher = it(&[t], vec![2; t]);
    let kd = Tensor::f32(vec![5], vec![0.0, 1.0, 0.25, 4.0, 2.0]);
    let tlp = rng.range(&[t], -6.0, -0.1);
    let tok0 = fwd(&head_ce(h, v), &d, &xs.iter().collect::<Vec<_>>())[0].clone();
    // Half the tokens sampled far less likely than now (ratio clipped at 2), half close.
    let slp: Vec<f32> = tok0.f().iter().enumerate().map(|(i, &ce)| -ce - if i % 2 == 0 { 1.5 } else { -0.3 }).collect();
    let slp = Tensor::f32(vec![t], slp);
    let weight = |tok: &Tensor| fwd(&Op::TokenWeight, &d, &[tok, &tlp, &slp, &teacher, &kd])[0].clone();
    let w0 = weight(&tok0);
    assert!(w0.f().iter().any(|&w| w < 0.0) && w0.f().iter().any(|&w| w > 0.0), "advantages of both signs");
    let (sp, sc) = (span.clone(), scale.clone());
    let frozen = w0.clone();
    let f: FwdFn = Box::new(move |x: &[Tensor]| {
        let tok = fwd(&head_ce(h, v), &d, &x.iter().collect::<Vec<_>>());
        (fwd(&Op::SpanLoss, &d, &[&tok[0], &sp, &sc, &frozen]), vec![])
    });
    let b: BwdFn = Box::new(move |x: &[Tensor], r: &[Tensor]| {
        let refs: Vec<&Tensor> = x.iter().collect();
        let ce = fwd(&head_ce(h, v), &d, &refs);
        let w = weight(&ce[0]);
        let ins = [&ce[0], &span, &scale, &w];
        let loss = fwd(&Op::SpanLoss, &d, &ins);
        let dtok = bwd(&Op::SpanLoss, &d, &ins, &loss, &[Some(&r[0])]);
        bwd(&head_ce(h, v), &d, &refs, &ce, &[Some(&dtok[0]), None])
    });
    let names = ["z", "head", "labels", "mask"].map(String::from).to_vec();
    let m = Model::new("opd objective", xs, names, vec![true, true, false, false], f, b);
    gradcheck(&m, 43);
}
