//! RMSNorm and the per-head QK-norm: a row-wise forward, and a backward whose weight gradient
//! is summed in RED_BLOCKS per-block partials finished by the last block.

use crate::consts::RED_BLOCKS;
use crate::launch::{blocks, families, one, rows_grid, tok, Arg, LaunchDim, Lowered};
use crate::ops::{Ports, VjpIo};
use vpmoe_ir::DType;

families! {
    Rmsnorm = "rmsnorm" in "rmsnorm.cuh", 256 <D> (x: Bf, w: Bf, y: BfMut, rows: Int, eps: Float);
    /// `dx (+ acc)` and the weight gradient `dw` of an RMSNorm over `rows` rows.
    RmsnormBwd = "rmsnorm_bwd" in "rmsnorm_bwd.cuh", 256 <D>
        (x: Bf, w: Bf, dy: Bf, acc: Bf, dx: BfMut, partial: F32Mut, rows: Int, eps: Float, dw: F32Mut,
         tickets: I32Mut, accum: Int);
    /// RMSNorm of every q and k head vector (a warp each), q rows then k rows.
    QkNorm = "qk_norm" in "qk_norm.cuh", 256 <D>
        (xq: Bf, xk: Bf, wq: Bf, wk: Bf, yq: BfMut, yk: BfMut, rows_q: Int, rows_k: Int, eps: Float);
    /// rmsnorm_bwd's body for q (`blockIdx.y = 0`) and k (1).
    QkNormBwd = "qk_norm_bwd" in "qk_norm_bwd.cuh", 256 <D>
        (xq: Bf, xk: Bf, wq: Bf, wk: Bf, dyq: Bf, dyk: Bf, dxq: BfMut, dxk: BfMut, partial: F32Mut,
         rows_q: Int, rows_k: Int, eps: Float, dwq: F32Mut, dwk: F32Mut, tickets: I32Mut, accum: Int);
}

pub(super) fn forward(p: &Ports, dim: u64, eps: f32, l: &mut Lowered) {
    let launch = Rmsnorm { D: dim, x: p.x(0), w: p.x(1), y: p.y(0), rows: Arg::tokens(1), eps: Arg::Float(eps) };
    l.push(launch.launch(rows_grid(1)));
}

pub(super) fn vjp(io: &VjpIo, dim: u64, eps: f32, l: &mut Lowered) {
    let partial = l.scratch_fixed(DType::F32, RED_BLOCKS * dim);
    let dw = io.dx(1);
    let launch = RmsnormBwd {
        D: dim,
        x: io.x(0),
        w: io.x(1),
        dy: io.dy(0),
        acc: io.acc(),
        dx: io.dx(0),
        partial,
        rows: Arg::tokens(1),
        eps: Arg::Float(eps),
        accum: dw.accum(),
        dw,
        tickets: Arg::Tickets,
    };
    l.push(launch.launch(blocks(RED_BLOCKS)));
}

pub(super) fn qk_forward(p: &Ports, heads: u64, groups: u64, head_dim: u64, eps: f32, l: &mut Lowered) {
    let warps = (QkNorm::FAMILY.threads / 32) as u64;
    let launch = QkNorm {
        D: head_dim,
        xq: p.x(0),
        xk: p.x(1),
        wq: p.x(2),
        wk: p.x(3),
        yq: p.y(0),
        yk: p.y(1),
        rows_q: Arg::tokens(heads),
        rows_k: Arg::tokens(groups),
        eps: Arg::Float(eps),
    };
    l.push(launch.launch([tok(heads + groups, warps), one(), one()]));
}

pub(super) fn qk_vjp(io: &VjpIo, heads: u64, groups: u64, head_dim: u64, eps: f32, l: &mut Lowered) {
    let partial = l.scratch_fixed(DType::F32, 2 * RED_BLOCKS * head_dim);
    let launch = QkNormBwd {
        D: head_dim,
        xq: io.x(0),
        xk: io.x(1),
        wq: io.x(2),
        wk: io.x(3),
        dyq: io.dy(0),
        dyk: io.dy(1),
        dxq: io.dx(0),
        dxk: io.dx(1),
        partial,
        rows_q: Arg::tokens(heads),
        rows_k: Arg::tokens(groups),
        eps: Arg::Float(eps),
        // One `accum` for both weight gradients: two parameters, so both are sums or neither.
        accum: io.dx(2).accum(),
        dwq: io.dx(2),
        dwk: io.dx(3),
        tickets: Arg::Tickets,
    };
    l.push(launch.launch([LaunchDim::Const(RED_BLOCKS), LaunchDim::Const(2), one()]));
}
