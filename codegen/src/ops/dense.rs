//! The dense layers on the residual stream: attention's output projection and the MLP (ReLU²),
//! each adding the residual in its last GEMM's epilogue. Their backward passes the residual's
//! gradient through (`Op::passthrough`) and recomputes the MLP's pre-activation.

use crate::consts::{EPI_DRELU2, EPI_NONE, EPI_RELU2, EPI_RESID};
use crate::launch::{Arg, Lowered};
use crate::ops::gemm::{nn_grid, Dense, Dgrad, GemmNn, Wgrad};
use crate::ops::{Ports, VjpIo};
use vpmoe_ir::DType;

/// `h' = resid + ctx·Wᵀ (+ b)`.
pub(super) fn out_proj(p: &Ports, in_dim: u64, hidden: u64, bias: bool, l: &mut Lowered) {
    let (x, w, b, resid, y) = (p.x(0), p.x(1), p.x_if(bias, 2), p.last(), p.y(0));
    Dense { n: hidden, kd: in_dim, epi: EPI_RESID, out_f32: false, x, w, bias: b, resid, y }.lower(l);
}

pub(super) fn out_proj_vjp(io: &VjpIo, in_dim: u64, hidden: u64, bias: bool, l: &mut Lowered) {
    // The residual's gradient is dy itself (`Op::passthrough`): nothing to launch.
    let dy = io.dy(0);
    Dgrad {
        n: in_dim,
        kd: hidden,
        a: dy.clone(),
        lda: hidden,
        w: io.x(1),
        acc: Arg::Null,
        y: io.dx(0),
        out_f32: false,
    }
    .lower(l);
    let db = io.dx_if(bias, 2);
    Wgrad {
        n: hidden,
        k: in_dim,
        a: dy,
        lda: hidden,
        b: io.x(0),
        ldb: in_dim,
        dw: io.dx(1),
        db,
        amode: 0,
        brelu2: false,
    }
    .lower(l);
}

/// Input positions of (b1, W2, b2) among x, W1, [b1], W2, [b2], [resid].
fn mlp_inputs(bias: bool) -> (usize, usize, usize) {
    if bias {
        (2, 3, 4)
    } else {
        (0, 2, 0)
    }
}

/// `y = relu(x·W1ᵀ + b1)²·W2ᵀ + b2 (+ resid)`.
pub(super) fn mlp(p: &Ports, hidden: u64, ffn: u64, bias: bool, residual: bool, l: &mut Lowered) {
    let (i_b1, i_w2, i_b2) = mlp_inputs(bias);
    let z = l.scratch_tok(DType::Bf16, ffn);
    let (x, w1, b1) = (p.x(0), p.x(1), p.x_if(bias, i_b1));
    Dense { n: ffn, kd: hidden, epi: EPI_RELU2, out_f32: false, x, w: w1, bias: b1, resid: Arg::Null, y: z.clone() }
        .lower(l);
    let (epi, resid) = if residual { (EPI_RESID, p.last()) } else { (EPI_NONE, Arg::Null) };
    let (w2, b2) = (p.x(i_w2), p.x_if(bias, i_b2));
    Dense { n: hidden, kd: ffn, epi, out_f32: false, x: z, w: w2, bias: b2, resid, y: p.y(0) }.lower(l);
}

pub(super) fn mlp_vjp(io: &VjpIo, hidden: u64, ffn: u64, bias: bool, l: &mut Lowered) {
    let (i_b1, i_w2, i_b2) = mlp_inputs(bias);
    let z = l.scratch_tok(DType::Bf16, ffn);
    let dz = l.scratch_tok(DType::Bf16, ffn);
    // Pre-activation recomputed (bf16), dz = (dy·W₂)·2·max(z, 0) in the GEMM epilogue.
    let (x, w1, b1) = (io.x(0), io.x(1), io.x_if(bias, i_b1));
    Dense { n: ffn, kd: hidden, epi: EPI_NONE, out_f32: false, x, w: w1, bias: b1, resid: Arg::Null, y: z.clone() }
        .lower(l);
    let launch = GemmNn {
        N: ffn,
        KD: hidden,
        E: 0,
        AMODE: 0,
        EPI: EPI_DRELU2,
        OUT: 0,
        a: io.dy(0),
        offsets: Arg::Null,
        w: io.x(i_w2),
        acc: Arg::Null,
        aux: z.clone(),
        y: dz.clone(),
        M: Arg::tokens(1),
        lda: Arg::int(hidden),
        ldy: Arg::int(ffn),
    };
    l.push(launch.launch(nn_grid(ffn, 1, 0)));
    let (dy, x) = (io.dy(0), io.x(0));
    let (dw2, db2) = (io.dx(i_w2), io.dx_if(bias, i_b2));
    Wgrad { n: hidden, k: ffn, a: dy, lda: hidden, b: z, ldb: ffn, dw: dw2, db: db2, amode: 0, brelu2: true }.lower(l);
    let (dw1, db1) = (io.dx(1), io.dx_if(bias, i_b1));
    Wgrad { n: ffn, k: hidden, a: dz.clone(), lda: ffn, b: x, ldb: hidden, dw: dw1, db: db1, amode: 0, brelu2: false }
        .lower(l);
    Dgrad { n: hidden, kd: ffn, a: dz, lda: ffn, w: io.x(1), acc: Arg::Null, y: io.dx(0), out_f32: false }.lower(l);
}
