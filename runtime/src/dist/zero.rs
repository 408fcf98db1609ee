//! ZeRO-1 on the host: the partition of the optimizer into units and their owners is the
//! compiler's ([`vpmoe_compiler::shard`]); a rank's [`Shard`] holds the state of its units.

pub use vpmoe_compiler::shard::{counts, owners, v_len, Unit, NORM_BLOCK};

/// Every trainable parameter of `plan` cut into units, in plan order.
pub fn units(plan: &vpmoe_compiler::Plan) -> Vec<Unit> {
    vpmoe_compiler::shard::units(&plan.params, &plan.optimizer)
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
}
