//! Token embedding: a table lookup forward; the backward sorts the tokens and sums each used
//! row's gradients in token order (no atomics).

use crate::consts::EMBED_SORT_CHUNK;
use crate::launch::{blocks, families, one, rows_grid, tok, Arg, Lowered};
use crate::ops::{Ports, VjpIo};
use vpmoe_ir::DType;

families! {
    Embed = "embed" in "embed.cuh", 128 <H> (tokens: I32, table: Bf, out: BfMut, T: Int);
    EmbedSort = "embed_sort" in "embed_sort.cuh", 1024 <> (tokens: I32, sorted: I32Mut, T: Int);
    EmbedBwd = "embed_bwd" in "embed_bwd.cuh", 128 <H>
        (sorted: I32, dh: Bf, dtable: F32Mut, T: Int, V: Int, accum: Int);
}

pub(super) fn forward(p: &Ports, hidden: u64, l: &mut Lowered) {
    l.push(Embed { H: hidden, tokens: p.x(0), table: p.x(1), out: p.y(0), T: Arg::tokens(1) }.launch(rows_grid(1)));
}

pub(super) fn vjp(io: &VjpIo, vocab: u64, hidden: u64, l: &mut Lowered) {
    let sorted = l.scratch_tok(DType::I32, 2);
    l.push(EmbedSort { tokens: io.x(0), sorted: sorted.clone(), T: Arg::tokens(1) }.launch([
        tok(1, EMBED_SORT_CHUNK),
        one(),
        one(),
    ]));
    let dtable = io.dx(1);
    l.push(
        EmbedBwd {
            H: hidden,
            sorted,
            dh: io.dy(0),
            accum: dtable.accum(),
            dtable,
            T: Arg::tokens(1),
            V: Arg::int(vocab),
        }
        .launch(blocks(vocab)),
    );
}
