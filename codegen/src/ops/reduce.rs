//! Column sums (bias and sink gradients that no GEMM produces) and the f32 vector sum.

use crate::consts::{COLSUM_PARTS, TICKETS};
use crate::launch::{families, one, Arg, LaunchDim, Lowered};
use vpmoe_ir::DType;

families! {
    /// `out[n] (+)= Σ_rows x[row, n]` in COLSUM_PARTS partial rows, added by each column block's
    /// last block.
    Colsum = "colsum" in "colsum.cuh", 256 <N, IN_F32>
        (x: Void, out: F32Mut, rows: Int, accum: Int, parts: F32Mut, tickets: I32Mut);
    /// `out (+)= scale·Σ x[0..n]` in one block.
    Sum = "sum" in "sum.cuh", 1024 <> (x: F32, out: F32Mut, n: Int, scale: Float, accum: Int);
}

/// The launch shape of colsum.cuh's body (`colsum`, `qkv_colsum`) over `n` columns: the partial
/// rows (node scratch) and the grid, COLSUM_PARTS row slices by column blocks.
pub(crate) struct ColumnSums {
    pub parts: Arg,
    pub grid: [LaunchDim; 3],
}

impl ColumnSums {
    pub(crate) fn new(l: &mut Lowered, family: &str, n: u64) -> ColumnSums {
        let cols = n.div_ceil(Colsum::FAMILY.threads as u64);
        assert!(cols <= TICKETS, "{family} of {n} columns: column blocks past TICKETS");
        let parts = l.scratch_fixed(DType::F32, COLSUM_PARTS * n);
        ColumnSums { parts, grid: [LaunchDim::Const(COLSUM_PARTS), LaunchDim::Const(cols), one()] }
    }
}

/// Column sums of `x` (`[T, n]`, f32 or bf16) into the f32 `out[n]`.
pub(crate) fn colsum(l: &mut Lowered, n: u64, in_f32: bool, x: Arg, out: Arg) {
    let c = ColumnSums::new(l, "colsum", n);
    let launch = Colsum {
        N: n,
        IN_F32: in_f32 as u64,
        x,
        accum: out.accum(),
        out,
        rows: Arg::tokens(1),
        parts: c.parts,
        tickets: Arg::Tickets,
    };
    l.push(launch.launch(c.grid));
}
