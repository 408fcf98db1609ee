//! The optimizer step on host memory (MODEL.md §7.1 order): expert-bias sign update, global
//! grad-norm clipping, Normuon on the plan's shape families — each family gathered into one
//! contiguous batch and orthogonalised by one batched Polar Express call (D10) — and AdamW on
//! everything else. The math is `vpmoe_ir::optim`; this module only moves data.

use crate::backend::{StepScalars, StepStats};
use crate::dist::zero::{self, Shard, Unit};
use crate::dist::Dist;
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
    // In unit order, as the sharded optimizer adds its ranks' parts.
    let sq: f64 = zero::units(plan).iter().map(|u| optim::sq_norm(&grads[u.param][u.lo..u.hi])).sum();
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

/// The optimizer sharded over data-parallel ranks (ZeRO-1, [`crate::dist::zero`]): the same step
/// as [`apply`], bitwise, with each rank updating only the units it owns.
pub struct Sharded {
    pub units: Vec<Unit>,
    pub owners: Vec<usize>,
    pub shard: Shard,
}

impl Sharded {
    /// This rank's share of `st`.
    pub fn new(plan: &Plan, dist: &Dist, st: &TrainState) -> Sharded {
        let units = zero::units(plan);
        let owners = zero::owners(&units, dist.world());
        let shard = Shard::take(&units, &owners, dist.rank.rank, st);
        Sharded { units, owners, shard }
    }

    /// This rank's share as read from a checkpoint ([`crate::checkpoint::load_share`]); refuses
    /// one of other units or sizes.
    pub fn from_share(plan: &Plan, dist: &Dist, shard: Shard) -> Result<Sharded> {
        let units = zero::units(plan);
        let owners = zero::owners(&units, dist.world());
        let mine: Vec<usize> = (0..units.len()).filter(|&k| owners[k] == dist.rank.rank).collect();
        let n: usize = mine.iter().map(|&k| units[k].len()).sum();
        let nv: usize = mine.iter().map(|&k| zero::v_len(&units[k])).sum();
        if shard.units != mine || (shard.master.len(), shard.m.len(), shard.v.len()) != (n, n, nv) {
            bail!(
                "a share of {} optimizer units ({} elements) for rank {} of {}, which owns {} ({n})",
                shard.units.len(),
                shard.master.len(),
                dist.rank.rank,
                dist.world(),
                mine.len()
            );
        }
        Ok(Sharded { units, owners, shard })
    }

    /// Element counts per rank (masters and first moments).
    fn counts(&self, world: usize) -> Vec<usize> {
        zero::counts(&self.units, &self.owners, world, Unit::len)
    }

    /// Every rank's flat part of `x` (laid out by owner) back into per-parameter tensors.
    fn scatter(&self, world: usize, all: &[f32], v: bool, out: &mut [Vec<f32>]) {
        if v {
            Shard::scatter(&self.units, &self.owners, world, all, zero::v_len, |u| u.v.0, out)
        } else {
            Shard::scatter(&self.units, &self.owners, world, all, Unit::len, |u| u.lo, out)
        }
    }

    /// One step (§7.1): `grads` are this rank's own accumulators, `loads` the all-reduced
    /// router loads; `st` holds the replicated frozen parameters (expert biases) and the step
    /// count. The gradients are reduce-scattered to their owners, each owner updates its units,
    /// and the new model weights (bf16-rounded where the parameter is bf16) are gathered into
    /// `model` on every rank.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        plan: &Plan,
        dist: &Dist,
        st: &mut TrainState,
        grads: &[Vec<f32>],
        loads: Vec<(u32, Vec<u64>)>,
        s: &StepScalars,
        gemm: &dyn Gemm,
        model: &mut [Vec<f32>],
    ) -> Result<StepStats> {
        let world = dist.world();
        let counts = self.counts(world);
        let mut send = Vec::with_capacity(counts.iter().sum());
        for r in 0..world {
            for u in self.units.iter().zip(&self.owners).filter(|(_, &o)| o == r).map(|(u, _)| u) {
                send.extend_from_slice(&grads[u.param][u.lo..u.hi]);
            }
        }
        let mut g = dist.reduce_scatter_f32(&send, &counts)?;
        drop(send);
        // The first parameter with a non-finite gradient, agreed by all ranks.
        let mut bad = vec![0u64; plan.params.len()];
        let mut at = 0;
        for &k in &self.shard.units {
            let u = &self.units[k];
            if g[at..at + u.len()].iter().any(|x| !x.is_finite()) {
                bad[u.param] = 1;
            }
            at += u.len();
        }
        dist.all_reduce_u64(&mut bad)?;
        if let Some(i) = bad.iter().position(|&b| b > 0) {
            bail!("gradient of {} is not finite (NaN or Inf)", plan.params[i].name);
        }
        update_expert_bias(plan, st, &loads, s.bias_rate);
        let mut sq_units = vec![0f64; self.units.len()];
        let mut at = 0;
        for &k in &self.shard.units {
            let n = self.units[k].len();
            sq_units[k] = optim::sq_norm(&g[at..at + n]);
            at += n;
        }
        // Each unit has one contributor, so the sum over ranks is exact.
        dist.all_reduce_f64(&mut sq_units)?;
        let sq: f64 = sq_units.iter().sum();
        let coef = optim::clip_coefficient(sq, s.clip);
        if coef < 1.0 {
            g.iter_mut().for_each(|x| *x *= coef);
        }
        self.update(plan, st.step + 1, &g, s, gemm);
        st.step += 1;
        // The new model weights, gathered.
        let mine: Vec<f32> = {
            let (mut out, mut at) = (Vec::with_capacity(self.shard.master.len()), 0);
            for &k in &self.shard.units {
                let u = &self.units[k];
                out.extend(crate::cpu::model_values(&plan.params[u.param], &self.shard.master[at..at + u.len()]));
                at += u.len();
            }
            out
        };
        let all = dist.all_gather_f32(&mine, &counts)?;
        self.scatter(world, &all, false, model);
        let expert_bias = expert_biases(plan, st, &loads);
        Ok(StepStats { grad_norm: sq.sqrt(), clip_coef: coef, loads, expert_bias, ..Default::default() })
    }

    /// Normuon on the owned matrices, family by family, and AdamW on the owned blocks.
    fn update(&mut self, plan: &Plan, k: u64, g: &[f32], s: &StepScalars, gemm: &dyn Gemm) {
        let o = &plan.optimizer;
        let h = NormuonHyper { momentum: o.momentum, beta2: o.beta2, eps: o.eps, nesterov: o.nesterov };
        let pe =
            PolarExpress { coeffs: o.polar_express.clone(), safety: o.polar_express_safety, eps: o.polar_express_eps };
        // (element offset, second-moment offset) of each owned unit in the shard.
        let mut offs = Vec::with_capacity(self.shard.units.len());
        let (mut a, mut b) = (0, 0);
        for &k in &self.shard.units {
            offs.push((a, b));
            a += self.units[k].len();
            b += zero::v_len(&self.units[k]);
        }
        let sh = &mut self.shard;
        for (f, fam) in o.families.iter().enumerate() {
            let (r, c) = (fam.rows as usize, fam.cols as usize);
            let mine: Vec<usize> = (0..sh.units.len())
                .filter(|&j| self.units[sh.units[j]].family.is_some_and(|(ff, _)| ff == f))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let gather = |src: &[f32], v: bool| -> Vec<f32> {
                let n = if v { r } else { r * c };
                mine.iter().flat_map(|&j| src[if v { offs[j].1 } else { offs[j].0 }..][..n].iter().copied()).collect()
            };
            let (mut w, gg, mut mom, mut v) =
                (gather(&sh.master, false), gather(g, false), gather(&sh.m, false), gather(&sh.v, true));
            optim::normuon_step_batched(
                &h,
                &pe,
                &mut w,
                &gg,
                &mut mom,
                &mut v,
                mine.len(),
                r,
                c,
                s.lr,
                s.weight_decay,
                gemm,
            );
            for (i, &j) in mine.iter().enumerate() {
                let (eo, vo) = offs[j];
                sh.master[eo..eo + r * c].copy_from_slice(&w[i * r * c..(i + 1) * r * c]);
                sh.m[eo..eo + r * c].copy_from_slice(&mom[i * r * c..(i + 1) * r * c]);
                sh.v[vo..vo + r].copy_from_slice(&v[i * r..(i + 1) * r]);
            }
        }
        let ah = AdamHyper::default();
        for (j, &u) in sh.units.iter().enumerate() {
            let u = &self.units[u];
            if u.family.is_some() {
                continue;
            }
            let wd = if plan.params[u.param].weight_decay { s.weight_decay } else { 0.0 };
            let ((eo, vo), n) = (offs[j], u.len());
            let (w, m, v) = (&mut sh.master[eo..eo + n], &mut sh.m[eo..eo + n], &mut sh.v[vo..vo + n]);
            optim::adamw_step(&ah, w, &g[eo..eo + n], m, v, k, s.aux_lr, wd);
        }
    }

    /// Every rank's trainable masters, gathered into `master` (per parameter, in plan order).
    pub fn gather_masters(&self, plan: &Plan, dist: &Dist, master: &mut [Vec<f32>]) -> Result<()> {
        for (w, p) in master.iter_mut().zip(&plan.params).filter(|(_, p)| p.trainable()) {
            w.resize(p.numel as usize, 0.0);
        }
        let all = dist.all_gather_f32(&self.shard.master, &self.counts(dist.world()))?;
        self.scatter(dist.world(), &all, false, master);
        Ok(())
    }

    /// The whole training state, gathered from every rank (`st`: the replicated frozen masters
    /// and the step count).
    pub fn full_state(&self, plan: &Plan, dist: &Dist, st: &TrainState) -> Result<TrainState> {
        let world = dist.world();
        let (counts, vcounts) = (self.counts(world), zero::counts(&self.units, &self.owners, world, zero::v_len));
        let mut full = TrainState { step: st.step, master: Vec::new(), m: Vec::new(), v: Vec::new() };
        for (i, p) in plan.params.iter().enumerate() {
            let (_, m, v) = TrainState::sizes(p);
            full.master.push(if p.trainable() { Vec::new() } else { st.master[i].clone() });
            full.m.push(vec![0.0; m]);
            full.v.push(vec![0.0; v]);
        }
        self.gather_masters(plan, dist, &mut full.master)?;
        self.scatter(world, &dist.all_gather_f32(&self.shard.m, &counts)?, false, &mut full.m);
        self.scatter(world, &dist.all_gather_f32(&self.shard.v, &vcounts)?, true, &mut full.v);
        Ok(full)
    }
}
