//! GRAPE-M: q and k rotated in one launch from one angle table (position × `exp(l/scale)` of the
//! learned log-frequencies `l`); the backward also sums the log-frequency gradient in
//! RED_BLOCKS partials.

use crate::consts::RED_BLOCKS;
use crate::launch::{blocks, families, rows_grid, Arg, Lowered};
use crate::ops::{Ports, VjpIo};
use vpmoe_ir::DType;

families! {
    Grape = "grape" in "grape.cuh", 128 <D>
        (xq: Bf, xk: Bf, log_freq: F32, yq: BfMut, yk: BfMut, heads: Int, groups: Int, T: Int, S: Int,
         scale: Float);
    GrapeBwd = "grape_bwd" in "grape_bwd.cuh", 128 <D>
        (xq: Bf, xk: Bf, log_freq: F32, dyq: Bf, dyk: Bf, dxq: BfMut, dxk: BfMut, partial: F32Mut,
         heads: Int, groups: Int, T: Int, S: Int, scale: Float, dl: F32Mut, tickets: I32Mut, accum: Int);
}

pub(super) fn forward(p: &Ports, heads: u64, groups: u64, head_dim: u64, scale: f32, l: &mut Lowered) {
    let launch = Grape {
        D: head_dim,
        xq: p.x(0),
        xk: p.x(1),
        log_freq: p.x(2),
        yq: p.y(0),
        yk: p.y(1),
        heads: Arg::int(heads),
        groups: Arg::int(groups),
        T: Arg::tokens(1),
        S: Arg::Seq,
        scale: Arg::Float(scale),
    };
    l.push(launch.launch(rows_grid(1)));
}

pub(super) fn vjp(io: &VjpIo, heads: u64, groups: u64, head_dim: u64, scale: f32, l: &mut Lowered) {
    let partial = l.scratch_fixed(DType::F32, RED_BLOCKS * head_dim / 2);
    let launch = GrapeBwd {
        D: head_dim,
        xq: io.x(0),
        xk: io.x(1),
        log_freq: io.x(2),
        dyq: io.dy(0),
        dyk: io.dy(1),
        dxq: io.dx(0),
        dxk: io.dx(1),
        partial,
        heads: Arg::int(heads),
        groups: Arg::int(groups),
        T: Arg::tokens(1),
        S: Arg::Seq,
        scale: Arg::Float(scale),
        accum: io.dx(2).accum(),
        dl: io.dx(2),
        tickets: Arg::Tickets,
    };
    l.push(launch.launch(blocks(RED_BLOCKS)));
}
