//! Discrete decisions that must not flip under a finite-difference step: ReLU sign patterns and
//! the aux-loss top-k.

use vpmoe_ir::reference::{gather_rows, topk, Tensor};

/// ReLU sign pattern of `x·W₁ᵀ + b₁` (`m` rows), computed as the forward does.
pub(crate) fn relu_pattern(x: &[f32], w1: &[f32], b1: Option<&[f32]>, m: usize, h: usize, f: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(m * f);
    for r in 0..m {
        for j in 0..f {
            let s: f64 = (0..h).map(|c| x[r * h + c] as f64 * w1[j * h + c] as f64).sum();
            let z = s as f32 + b1.map(|b| b[j]).unwrap_or(0.0);
            out.push((z > 0.0) as i64);
        }
    }
    out
}

/// Per-expert ReLU patterns of an `expert_ffn` (inputs in signature order).
pub(crate) fn expert_pattern(xs: &[Tensor], h: usize, f: usize, e: usize, bias: bool) -> Vec<i64> {
    let (x, src, off, w1) = (xs[0].f(), xs[1].i(), xs[3].i(), xs[4].f());
    let b1 = bias.then(|| xs[5].f());
    let mut out = vec![];
    for ex in 0..e {
        let (r0, r1) = (off[ex] as usize, off[ex + 1] as usize);
        let xe = gather_rows(x, &src[r0..r1], h);
        out.extend(relu_pattern(&xe, &w1[ex * f * h..][..f * h], b1.map(|b| &b[ex * f..][..f]), r1 - r0, h, f));
    }
    out
}

/// Aux-loss top-k of the normalised scores (the counts are constants of the backward).
pub(crate) fn aux_topk(scores: &[f32], e: usize, k: usize) -> Vec<i64> {
    scores
        .chunks(e)
        .flat_map(|row| {
            let u = row.iter().map(|&x| x as f64).sum::<f64>() + 1e-20;
            let norm: Vec<f32> = row.iter().map(|&x| (x as f64 / u) as f32).collect();
            topk(&norm, k).into_iter().map(|i| i as i64).collect::<Vec<_>>()
        })
        .collect()
}
