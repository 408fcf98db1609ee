//! The optimizer step on host memory (MODEL.md §7.1 order): expert-bias sign update, global
//! grad-norm clipping, Normuon on the plan's shape families — each family gathered into one
//! contiguous batch and orthogonalised by one batched Polar Express call (D10) — and AdamW on
//! everything else. The math is `vpmoe_ir::optim`; this module only moves data.

use crate::backend::{StepScalars, StepStats};
use crate::state::TrainState;
use anyhow::{bail, Result};
use vpmoe_compiler::Plan;
use vpmoe_ir::optim::{self, AdamHyper, NormuonHyper, PolarExpress};
use vpmoe_ir::reference::Gemm;
use vpmoe_ir::Role;

/// The first parameter whose gradient holds a NaN or ±Inf, if any.
fn first_non_finite(plan: &Plan, grads: &[Vec<f32>]) -> Option<String> {
    plan.params.iter().zip(grads).find(|(_, g)| g.iter().any(|x| !x.is_finite())).map(|(p, _)| p.name.clone())
}

/// §4.11: `e ← e + rate·sign(mean(n) − n)` per MoE layer, from the step's loads.
pub fn update_expert_bias(plan: &Plan, st: &mut TrainState, loads: &[(u32, Vec<u64>)], rate: f64) {
    if rate == 0.0 {
        return;
    }
    for (layer, n) in loads {
        let Some(i) = expert_bias_param(plan, *layer) else { continue };
        let mean = n.iter().sum::<u64>() as f64 / n.len() as f64;
        for (e, &c) in st.master[i].iter_mut().zip(n) {
            let d = mean - c as f64;
            *e = (*e as f64
                + rate
                    * if d > 0.0 {
                        1.0
                    } else if d < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }) as f32;
        }
    }
}

/// The expert biases of the MoE layers in `loads`, as the step reports them (after its update).
pub fn expert_biases(plan: &Plan, st: &TrainState, loads: &[(u32, Vec<u64>)]) -> Vec<(u32, Vec<f32>)> {
    loads
        .iter()
        .filter_map(|&(layer, _)| expert_bias_param(plan, layer).map(|i| (layer, st.master[i].clone())))
        .collect()
}

/// Parameter index of the expert bias of MoE layer `layer` (1-based, as in `blkN`).
pub fn expert_bias_param(plan: &Plan, layer: u32) -> Option<usize> {
    plan.params.iter().position(|p| p.role == Role::ExpertBias { layer })
}

/// The step after the backward passes (§7.1): expert-bias update from the step's `loads`,
/// clipping, Normuon and AdamW on `st` with the accumulated `grads` (scaled in place by the clip
/// coefficient). Refuses non-finite gradients before touching anything.
pub fn apply(
    plan: &Plan,
    st: &mut TrainState,
    grads: &mut [Vec<f32>],
    loads: Vec<(u32, Vec<u64>)>,
    s: &StepScalars,
    gemm: &dyn Gemm,
) -> Result<StepStats> {
    if let Some(name) = first_non_finite(plan, grads) {
        bail!("gradient of {name} is not finite (NaN or Inf)");
    }
    update_expert_bias(plan, st, &loads, s.bias_rate);
    let sq: f64 = grads.iter().map(|g| optim::sq_norm(g)).sum();
    let coef = optim::clip_coefficient(sq, s.clip);
    if coef < 1.0 {
        grads.iter_mut().for_each(|g| g.iter_mut().for_each(|x| *x *= coef));
    }
    let o = &plan.optimizer;
    let h = NormuonHyper { momentum: o.momentum, beta2: o.beta2, eps: o.eps, nesterov: o.nesterov };
    let pe = PolarExpress { coeffs: o.polar_express.clone(), safety: o.polar_express_safety, eps: o.polar_express_eps };
    for f in &o.families {
        let (r, c) = (f.rows as usize, f.cols as usize);
        let batch = f.matrices() as usize;
        let gather = |src: &[Vec<f32>]| -> Vec<f32> {
            let mut out = Vec::with_capacity(batch * r * c);
            for m in &f.members {
                out.extend_from_slice(&src[m.param as usize]);
            }
            out
        };
        let (mut w, g, mut mom, mut v) = (gather(&st.master), gather(grads), gather(&st.m), gather(&st.v));
        optim::normuon_step_batched(&h, &pe, &mut w, &g, &mut mom, &mut v, batch, r, c, s.lr, s.weight_decay, gemm);
        let (mut ow, mut om, mut ov) = (0, 0, 0);
        for m in &f.members {
            let i = m.param as usize;
            let (n, nv) = (st.master[i].len(), st.v[i].len());
            st.master[i].copy_from_slice(&w[ow..ow + n]);
            st.m[i].copy_from_slice(&mom[om..om + n]);
            st.v[i].copy_from_slice(&v[ov..ov + nv]);
            (ow, om, ov) = (ow + n, om + n, ov + nv);
        }
    }
    let ah = AdamHyper::default();
    let k = st.step + 1;
    for &i in &o.adamw {
        let i = i as usize;
        let wd = if plan.params[i].weight_decay { s.weight_decay } else { 0.0 };
        let (w, m, v) = (&mut st.master[i], &mut st.m[i], &mut st.v[i]);
        optim::adamw_step(&ah, w, &grads[i], m, v, k, s.aux_lr, wd);
    }
    st.step = k;
    let expert_bias = expert_biases(plan, st, &loads);
    Ok(StepStats { grad_norm: sq.sqrt(), clip_coef: coef, loads, expert_bias, ..Default::default() })
}
