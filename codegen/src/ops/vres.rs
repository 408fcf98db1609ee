//! Value residual: `v ← λ·v + (1−λ)·v₁`, `λ = sigmoid(logit)` (v₁ the source layer's values); the
//! backward sums the logit's gradient in RED_BLOCKS partials.

use crate::consts::RED_BLOCKS;
use crate::launch::{blocks, families, one, tok, Arg, Lowered};
use crate::ops::{Ports, VjpIo};
use vpmoe_ir::DType;

families! {
    Vres = "vres" in "vres.cuh", 256 <> (v: Bf, v1: Bf, logit: F32, y: BfMut, n: Int);
    VresBwd = "vres_bwd" in "vres_bwd.cuh", 256 <>
        (v: Bf, v1: Bf, logit: F32, dy: Bf, dv: BfMut, dv1: BfMut, partial: F32Mut, n: Int, dl: F32Mut,
         tickets: I32Mut, accum: Int);
}

pub(super) fn forward(p: &Ports, groups: u64, head_dim: u64, l: &mut Lowered) {
    let n = groups * head_dim;
    let launch = Vres { v: p.x(0), v1: p.x(1), logit: p.x(2), y: p.y(0), n: Arg::tokens(n) };
    l.push(launch.launch([tok(n, Vres::FAMILY.threads as u64), one(), one()]));
}

pub(super) fn vjp(io: &VjpIo, groups: u64, head_dim: u64, l: &mut Lowered) {
    let partial = l.scratch_fixed(DType::F32, RED_BLOCKS);
    let launch = VresBwd {
        v: io.x(0),
        v1: io.x(1),
        logit: io.x(2),
        dy: io.dy(0),
        dv: io.dx(0),
        dv1: io.dx(1),
        partial,
        n: Arg::tokens(groups * head_dim),
        accum: io.dx(2).accum(),
        dl: io.dx(2),
        tickets: Arg::Tickets,
    };
    l.push(launch.launch(blocks(RED_BLOCKS)));
}
