//! ZeRO-1: which data-parallel rank owns which part of the optimizer. Normuon orthogonalises whole matrices, so
//! its units are matrices (a stacked `[E, r, c]` expert tensor is E of them), each given to the
//! rank with the least Polar Express work so far; AdamW's units are runs of [`NORM_BLOCK`]
//! elements, split into contiguous equal shares. An owner keeps the fp32 master and optimizer
//! state of its units only; after its update every rank gathers the new model weights.
//!
//! The global gradient norm is a sum of per-unit squared norms taken in unit order, so it is the
//! same number whether one rank or many computed the parts.

use crate::optimizer::OptimizerPlan;
use crate::plan::ParamEntry;
use vpmoe_ir::OptGroup;

/// Elements of one AdamW unit (and of one gradient-norm term outside Normuon matrices).
pub const NORM_BLOCK: usize = 4096;

/// A piece of one parameter the optimizer updates as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub param: usize,
    /// Element range of the parameter.
    pub lo: usize,
    pub hi: usize,
    /// Normuon: the shape family and the matrix's place in the family's batch.
    pub family: Option<(usize, usize)>,
    /// Normuon: the range of the per-row second moment `v` (`[matrices, rows]`).
    pub v: (usize, usize),
}

impl Unit {
    pub fn len(&self) -> usize {
        self.hi - self.lo
    }

    pub fn is_empty(&self) -> bool {
        self.hi == self.lo
    }
}

/// Every trainable parameter cut into units, in plan order (a Normuon parameter's matrices in
/// order; an AdamW parameter's blocks in order).
pub fn units(params: &[ParamEntry], opt: &OptimizerPlan) -> Vec<Unit> {
    let mut family_of = vec![None; params.len()];
    for (f, fam) in opt.families.iter().enumerate() {
        let mut at = 0usize;
        for m in &fam.members {
            family_of[m.param as usize] = Some((f, at, fam.rows as usize, fam.cols as usize));
            at += m.matrices as usize;
        }
    }
    let mut out = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let n = p.numel as usize;
        match (p.opt, family_of[i]) {
            (OptGroup::Frozen, _) => {}
            (OptGroup::Normuon, Some((f, first, r, c))) => {
                for j in 0..n / (r * c) {
                    let v = (j * r, (j + 1) * r);
                    out.push(Unit { param: i, lo: j * r * c, hi: (j + 1) * r * c, family: Some((f, first + j)), v });
                }
            }
            (OptGroup::Normuon, None) => panic!("Normuon parameter {} is in no shape family", p.name),
            (OptGroup::AdamW, _) => {
                for lo in (0..n).step_by(NORM_BLOCK) {
                    let hi = (lo + NORM_BLOCK).min(n);
                    out.push(Unit { param: i, lo, hi, family: None, v: (lo, hi) });
                }
            }
        }
    }
    out
}

/// The rank that owns each unit of [`units`] in a world of `world`: Normuon matrices to the
/// least-loaded rank by `rows·cols·min(rows, cols)` (ties to the lower rank), AdamW blocks in
/// `world` contiguous shares of (nearly) equal element counts.
pub fn owners(units: &[Unit], world: usize) -> Vec<usize> {
    let mut load = vec![0u128; world];
    let adam_total: usize = units.iter().filter(|u| u.family.is_none()).map(Unit::len).sum();
    let mut adam_seen = 0usize;
    units
        .iter()
        .map(|u| {
            if u.family.is_some() {
                let (rows, n) = (u.v.1 - u.v.0, u.len());
                let work = n as u128 * rows.min(n / rows.max(1)) as u128;
                let r = (0..world).min_by_key(|&r| (load[r], r)).expect("a rank");
                load[r] += work;
                r
            } else {
                // The share the block's first element falls in.
                let r = (adam_seen * world) / adam_total.max(1);
                adam_seen += u.len();
                r
            }
        })
        .collect()
}

/// Element counts per rank, as `len` counts a unit's elements.
pub fn counts(units: &[Unit], owners: &[usize], world: usize, len: impl Fn(&Unit) -> usize) -> Vec<usize> {
    let mut c = vec![0; world];
    units.iter().zip(owners).for_each(|(u, &r)| c[r] += len(u));
    c
}

/// Elements of a unit's second moment (a row per Normuon matrix row; one per AdamW element).
pub fn v_len(u: &Unit) -> usize {
    u.v.1 - u.v.0
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_matrices_and_element_blocks_are_shared_out_evenly() {
        let (_, plan) = crate::compile_arch(
            &crate::config::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/small.toml"))
                .unwrap(),
        )
        .unwrap();
        let units = units(&plan.params, &plan.optimizer);
        // Every trainable element is in exactly one unit; a Normuon unit is one whole matrix.
        for (i, p) in plan.params.iter().enumerate() {
            let mine: Vec<&Unit> = units.iter().filter(|u| u.param == i).collect();
            let covered: usize = mine.iter().map(|u| u.len()).sum();
            assert_eq!(covered, if p.trainable() { p.numel as usize } else { 0 }, "{}", p.name);
            for w in mine.windows(2) {
                assert_eq!(w[0].hi, w[1].lo, "{}: units are consecutive", p.name);
            }
        }
        for world in [1, 2, 3, 8] {
            let owners = owners(&units, world);
            let counts = counts(&units, &owners, world, Unit::len);
            let adam: Vec<usize> = (0..world)
                .map(|r| {
                    units.iter().zip(&owners).filter(|(u, &o)| o == r && u.family.is_none()).map(|(u, _)| u.len()).sum()
                })
                .collect();
            let adam_total: usize = adam.iter().sum();
            for (r, &a) in adam.iter().enumerate() {
                // Contiguous shares, each within one block of an equal split.
                assert!(a.abs_diff(adam_total / world) <= NORM_BLOCK, "world {world} rank {r}: {a} of {adam_total}");
            }
            assert_eq!(counts.iter().sum::<usize>(), units.iter().map(Unit::len).sum::<usize>());
            if world > 1 {
                assert!(counts.iter().all(|&c| c > 0), "world {world}: every rank owns some of the optimizer");
            }
        }
    }
}
