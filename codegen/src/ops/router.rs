//! The MoE router: f32 logits from a GEMM, then per token the (group-limited) top-k choice with
//! the expert biases, gates and scores (`router`); the backward forms the logit gradient
//! (`router_bwd`) and runs fp32-quality GEMMs on it (split into bf16 hi + lo on load).

use crate::consts::{AMODE_SPLIT, EPI_NONE, EPI_RESID};
use crate::launch::{families, rows_grid, Arg, Lowered};
use crate::ops::gemm::{nn_grid, Dense, GemmNn, Wgrad};
use crate::ops::{reduce, Ports, VjpIo};
use vpmoe_ir::{DType, Op};

families! {
    Router = "router" in "router.cuh", 256 <E, K, GROUPS, GTOPK, EBIAS>
        (logits: F32, expert_bias: F32, idx: I32Mut, gate: F32Mut, scores: F32Mut, T: Int, scale: Float);
    RouterBwd = "router_bwd" in "router_bwd.cuh", 256 <E, K>
        (scores: F32, idx: I32, dgate: F32, dscores: F32, dl: F32Mut, T: Int, scale: Float);
}

pub(super) fn forward(p: &Ports, op: &Op, l: &mut Lowered) {
    let Op::Router { hidden, experts, topk, group_limit, scale, expert_bias, bias } = *op else { unreachable!() };
    let (groups, gtopk) = group_limit.map(|g| (g.groups, g.group_topk)).unwrap_or((0, 0));
    let logits = l.scratch_tok(DType::F32, experts);
    let y = logits.clone();
    Dense {
        n: experts,
        kd: hidden,
        epi: EPI_NONE,
        out_f32: true,
        x: p.x(0),
        w: p.x(1),
        bias: p.x_if(bias, 2),
        resid: Arg::Null,
        y,
    }
    .lower(l);
    let launch = Router {
        E: experts,
        K: topk,
        GROUPS: groups,
        GTOPK: gtopk,
        EBIAS: expert_bias as u64,
        logits,
        expert_bias: p.x_if(expert_bias, 2 + bias as usize),
        idx: p.y(0),
        gate: p.y(1),
        scores: p.y(2),
        T: Arg::tokens(1),
        scale: Arg::Float(scale),
    };
    l.push(launch.launch(rows_grid(1)));
}

/// `acc`: dx adds the running gradient in the epilogue (EPI_RESID, before the rounding).
pub(super) fn vjp(io: &VjpIo, op: &Op, acc: bool, l: &mut Lowered) {
    let Op::Router { hidden, experts, topk, scale, bias, .. } = *op else { unreachable!() };
    let dl = l.scratch_tok(DType::F32, experts);
    let launch = RouterBwd {
        E: experts,
        K: topk,
        scores: io.y(2),
        idx: io.y(0),
        dgate: io.dy(1),
        dscores: io.dy(2),
        dl: dl.clone(),
        T: Arg::tokens(1),
        scale: Arg::Float(scale),
    };
    l.push(launch.launch(rows_grid(1)));
    let launch = GemmNn {
        N: hidden,
        KD: experts,
        E: 0,
        AMODE: AMODE_SPLIT,
        EPI: if acc { EPI_RESID } else { EPI_NONE },
        OUT: 0,
        a: dl.clone(),
        offsets: Arg::Null,
        w: io.x(1),
        acc: Arg::Null,
        aux: io.acc(),
        y: io.dx(0),
        M: Arg::tokens(1),
        lda: Arg::int(experts),
        ldy: Arg::int(hidden),
    };
    l.push(launch.launch(nn_grid(hidden, 1, 0)));
    let (a, b) = (dl.clone(), io.x(0));
    Wgrad {
        n: experts,
        k: hidden,
        a,
        lda: experts,
        b,
        ldb: hidden,
        dw: io.dx(1),
        db: Arg::Null,
        amode: AMODE_SPLIT,
        brelu2: false,
    }
    .lower(l);
    if bias {
        reduce::colsum(l, experts, true, dl, io.dx(2));
    }
}
