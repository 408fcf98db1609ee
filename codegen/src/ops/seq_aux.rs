//! The sequence-level auxiliary load-balancing loss: each sequence spread over SEQ_AUX_SPLIT
//! blocks (chunk sums at the chunk's first token row, added in chunk order by the last block);
//! the backward recounts the per-sequence expert loads the same way.

use crate::consts::SEQ_AUX_SPLIT;
use crate::launch::{families, one, rows_grid, Arg, LaunchDim, Lowered};
use crate::ops::{Ports, VjpIo};
use vpmoe_ir::DType;

families! {
    SeqAux = "seq_aux" in "seq_aux.cuh", 256 <E, K>
        (scores: F32, partial: F32Mut, S: Int, loss: F32Mut, scale: Float, tickets: I32Mut, pp: F32Mut,
         pc: I32Mut);
    SeqAuxCount = "seq_aux_count" in "seq_aux_count.cuh", 256 <E, K>
        (scores: F32, counts: F32Mut, S: Int, pc: I32Mut, tickets: I32Mut);
    SeqAuxBwd = "seq_aux_bwd" in "seq_aux_bwd.cuh", 256 <E, K>
        (scores: F32, counts: F32, daux: F32, dscores: F32Mut, T: Int, S: Int, inv_rows: Float);
}

/// SEQ_AUX_SPLIT chunks of every sequence (row).
fn chunks_by_rows() -> [LaunchDim; 3] {
    [LaunchDim::Const(SEQ_AUX_SPLIT), LaunchDim::Rows, one()]
}

pub(super) fn forward(p: &Ports, experts: u64, topk: u64, l: &mut Lowered) {
    let partial = l.scratch_tok(DType::F32, 1);
    let pp = l.scratch_tok(DType::F32, 2 * experts);
    let pc = l.scratch_tok(DType::I32, experts);
    let launch = SeqAux {
        E: experts,
        K: topk,
        scores: p.x(0),
        partial,
        S: Arg::Seq,
        loss: p.y(0),
        scale: Arg::InvRows,
        tickets: Arg::Tickets,
        pp,
        pc,
    };
    l.push(launch.launch(chunks_by_rows()));
}

pub(super) fn vjp(io: &VjpIo, experts: u64, topk: u64, l: &mut Lowered) {
    // counts [B, E] with B = T/S ≤ T rows, from per-chunk counts as in the forward.
    let counts = l.scratch_tok(DType::F32, experts);
    let pc = l.scratch_tok(DType::I32, experts);
    let count = SeqAuxCount {
        E: experts,
        K: topk,
        scores: io.x(0),
        counts: counts.clone(),
        S: Arg::Seq,
        pc,
        tickets: Arg::Tickets,
    };
    l.push(count.launch(chunks_by_rows()));
    let bwd = SeqAuxBwd {
        E: experts,
        K: topk,
        scores: io.x(0),
        counts,
        daux: io.dy(0),
        dscores: io.dx(0),
        T: Arg::tokens(1),
        S: Arg::Seq,
        inv_rows: Arg::InvRows,
    };
    l.push(bwd.launch(rows_grid(1)));
}
