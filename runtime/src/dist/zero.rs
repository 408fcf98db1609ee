//! ZeRO-1: which rank owns which part of the optimizer. Normuon orthogonalises whole matrices, so
//! its units are matrices (a stacked `[E, r, c]` expert tensor is E of them), each given to the
//! rank with the least Polar Express work so far; AdamW's units are runs of [`NORM_BLOCK`]
//! elements, split into contiguous equal shares. An owner keeps the fp32 master and optimizer
//! state of its units only; after its update every rank gathers the new model weights.
//!
//! The global gradient norm is a sum of per-unit squared norms taken in unit order, so it is the
//! same number whether one rank or many computed the parts.

use vpmoe_compiler::Plan;
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
pub fn units(plan: &Plan) -> Vec<Unit> {
    let mut family_of = vec![None; plan.params.len()];
    for (f, fam) in plan.optimizer.families.iter().enumerate() {
        let mut at = 0usize;
        for m in &fam.members {
            family_of[m.param as usize] = Some((f, at, fam.rows as usize, fam.cols as usize));
            at += m.matrices as usize;
        }
    }
    let mut out = Vec::new();
    for (i, p) in plan.params.iter().enumerate() {
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

/// One rank's part of the optimizer: the fp32 masters, first and second moments of the units it
/// owns, back to back in unit order.
#[derive(Clone, Debug, Default)]
pub struct Shard {
    /// Indices into the unit list, ascending.
    pub units: Vec<usize>,
    pub master: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// Elements of a unit's second moment (a row per Normuon matrix row; one per AdamW element).
pub fn v_len(u: &Unit) -> usize {
    u.v.1 - u.v.0
}

impl Shard {
    /// `rank`'s units of a full training state.
    pub fn take(units: &[Unit], owners: &[usize], rank: usize, st: &crate::state::TrainState) -> Shard {
        let mut s = Shard::default();
        for (k, u) in units.iter().enumerate().filter(|(k, _)| owners[*k] == rank) {
            s.units.push(k);
            s.master.extend_from_slice(&st.master[u.param][u.lo..u.hi]);
            s.m.extend_from_slice(&st.m[u.param][u.lo..u.hi]);
            s.v.extend_from_slice(&st.v[u.param][u.v.0..u.v.1]);
        }
        s
    }

    /// Writes the values of every rank's units (`all`: each rank's flat part, in rank order, as
    /// [`Shard::take`] lays them out; `len` a unit's element count) into `out[param]`.
    pub fn scatter(
        units: &[Unit],
        owners: &[usize],
        world: usize,
        all: &[f32],
        len: impl Fn(&Unit) -> usize,
        start: impl Fn(&Unit) -> usize,
        out: &mut [Vec<f32>],
    ) {
        let mut at = 0;
        for r in 0..world {
            for u in units.iter().zip(owners).filter(|(_, &o)| o == r).map(|(u, _)| u) {
                let (n, s) = (len(u), start(u));
                out[u.param][s..s + n].copy_from_slice(&all[at..at + n]);
                at += n;
            }
        }
        assert_eq!(at, all.len(), "every gathered element has a place");
    }

    /// Per rank, the elements of its units as `len` counts them.
    pub fn counts(units: &[Unit], owners: &[usize], world: usize, len: impl Fn(&Unit) -> usize) -> Vec<usize> {
        let mut c = vec![0; world];
        units.iter().zip(owners).for_each(|(u, &r)| c[r] += len(u));
        c
    }
}
