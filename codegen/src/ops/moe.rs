//! The routed experts: dispatch (the expert-major permutation of the routing slots, counted then
//! scattered), the expert FFN as two grouped GEMMs over each expert's rows, and the gated
//! combine with the residual and the shared expert. The backward sums each token's K permuted
//! input-gradient rows back in `moe_gather`.

use crate::consts::{EPI_DRELU2, EPI_NONE, EPI_RELU2};
use crate::launch::{blocks, families, rows_grid, Arg, Lowered};
use crate::ops::gemm::{nn_grid, rows_cols_grid, tn_grid, GemmNn, GemmTn, GroupedGemm};
use crate::ops::{Ports, VjpIo};
use vpmoe_ir::DType;

families! {
    /// Counts per expert; the last block turns them into offsets.
    MoeCount = "moe_count" in "moe_count.cuh", 256 <E, K> (idx: I32, offsets: I32Mut, T: Int, tickets: I32Mut);
    MoeScatter = "moe_scatter" in "moe_scatter.cuh", 256 <E, K>
        (idx: I32, offsets: I32, src: I32Mut, row: I32Mut, T: Int);
    /// `dx[t] (+ acc_in) = Σ_k dxp[row[t·K + k]]`.
    MoeGather = "moe_gather" in "moe_gather.cuh", 128 <H, K> (dxp: Bf, row: I32, acc_in: Bf, dx: BfMut, T: Int);
    Combine = "combine" in "combine.cuh", 128 <H, K, SHARED>
        (yp: Bf, row: I32, gate: F32, resid: Bf, shared: Bf, out: BfMut, T: Int);
    CombineBwd = "combine_bwd" in "combine_bwd.cuh", 128 <H, K>
        (yp: Bf, row: I32, gate: F32, dh: Bf, dyp: BfMut, dgate: F32Mut, T: Int);
}

pub(super) fn dispatch(p: &Ports, experts: u64, topk: u64, l: &mut Lowered) {
    let count =
        MoeCount { E: experts, K: topk, idx: p.x(0), offsets: p.y(2), T: Arg::tokens(1), tickets: Arg::Tickets };
    l.push(count.launch(blocks(experts)));
    let scatter =
        MoeScatter { E: experts, K: topk, idx: p.x(0), offsets: p.y(2), src: p.y(0), row: p.y(1), T: Arg::tokens(1) };
    l.push(scatter.launch(blocks(experts)));
}

/// Input positions of (b1, fc2, b2) among x, src, row, offsets, fc1, [b1], fc2, [b2].
fn ffn_inputs(bias: bool) -> (usize, usize, usize) {
    if bias {
        (5, 6, 7)
    } else {
        (0, 5, 0)
    }
}

/// One grouped GEMM over the `topk·T` permuted rows.
#[allow(clippy::too_many_arguments)]
fn grouped(
    n: u64,
    kd: u64,
    epi: u64,
    experts: u64,
    topk: u64,
    x: Arg,
    src: Arg,
    offsets: Arg,
    w: Arg,
    bias: Arg,
    y: Arg,
) -> crate::launch::Launch {
    GroupedGemm { N: n, KD: kd, EPI: epi, E: experts, x, src, offsets, w, bias, y, rows: Arg::tokens(topk) }
        .launch(rows_cols_grid(n, topk, experts))
}

pub(super) fn expert_ffn(p: &Ports, hidden: u64, ffn: u64, experts: u64, topk: u64, bias: bool, l: &mut Lowered) {
    let (i_b1, i_w2, i_b2) = ffn_inputs(bias);
    let z = l.scratch_tok(DType::Bf16, topk * ffn);
    let (x, src, offsets) = (p.x(0), p.x(1), p.x(3));
    l.push(grouped(
        ffn,
        hidden,
        EPI_RELU2,
        experts,
        topk,
        x,
        src,
        offsets.clone(),
        p.x(4),
        p.x_if(bias, i_b1),
        z.clone(),
    ));
    l.push(grouped(hidden, ffn, EPI_NONE, experts, topk, z, Arg::Null, offsets, p.x(i_w2), p.x_if(bias, i_b2), p.y(0)));
}

/// Per-expert weight gradients `dW[e] = a_eᵀ·b_e` over each expert's rows (`a` row stride n,
/// `b` row stride k, read through `bsrc` where given), and with `db` the per-expert bias
/// gradients (`db[e]` = the column sums of expert e's rows of `a`).
struct GroupedWgrad {
    n: u64,
    k: u64,
    brelu2: bool,
    a: Arg,
    b: Arg,
    bsrc: Arg,
    dw: Arg,
    db: Arg,
}

pub(super) fn expert_ffn_vjp(io: &VjpIo, hidden: u64, ffn: u64, experts: u64, topk: u64, bias: bool, l: &mut Lowered) {
    // The first layer reads x through src; its input gradient is computed per permuted row (dxp)
    // and summed back over each token's K rows by moe_gather.
    let (i_b1, i_w2, i_b2) = ffn_inputs(bias);
    let z = l.scratch_tok(DType::Bf16, topk * ffn);
    let dz = l.scratch_tok(DType::Bf16, topk * ffn);
    let dxp = l.scratch_tok(DType::Bf16, topk * hidden);
    let offsets = io.x(3);
    l.push(grouped(
        ffn,
        hidden,
        EPI_NONE,
        experts,
        topk,
        io.x(0),
        io.x(1),
        offsets.clone(),
        io.x(4),
        io.x_if(bias, i_b1),
        z.clone(),
    ));
    let nn = |n: u64, kd: u64, epi: u64, a: Arg, w: Arg, aux: Arg, y: Arg| {
        GemmNn {
            N: n,
            KD: kd,
            E: experts,
            AMODE: 0,
            EPI: epi,
            OUT: 0,
            a,
            offsets: offsets.clone(),
            w,
            acc: Arg::Null,
            aux,
            y,
            M: Arg::tokens(topk),
            lda: Arg::int(kd),
            ldy: Arg::int(n),
        }
        .launch(nn_grid(n, topk, experts))
    };
    l.push(nn(ffn, hidden, EPI_DRELU2, io.dy(0), io.x(i_w2), z.clone(), dz.clone()));
    let wgrads = [
        GroupedWgrad {
            n: hidden,
            k: ffn,
            brelu2: true,
            a: io.dy(0),
            b: z,
            bsrc: Arg::Null,
            dw: io.dx(i_w2),
            db: io.dx_if(bias, i_b2),
        },
        GroupedWgrad {
            n: ffn,
            k: hidden,
            brelu2: false,
            a: dz.clone(),
            b: io.x(0),
            bsrc: io.x(1),
            dw: io.dx(4),
            db: io.dx_if(bias, i_b1),
        },
    ];
    for GroupedWgrad { n, k, brelu2, a, b, bsrc, dw, db } in wgrads {
        let launch = GemmTn {
            N: n,
            K: k,
            E: experts,
            AMODE: 0,
            BRELU2: brelu2 as u64,
            BIAS: (db != Arg::Null) as u64,
            a,
            b,
            bsrc,
            offsets: offsets.clone(),
            accum: dw.accum(),
            y: dw,
            M: Arg::tokens(topk),
            lda: Arg::int(n),
            ldb: Arg::int(k),
            out: Arg::Null,
            db,
            tickets: Arg::Null,
        };
        l.push(launch.launch(tn_grid(n, k, experts)));
    }
    l.push(nn(hidden, ffn, EPI_NONE, dz, io.x(4), Arg::Null, dxp.clone()));
    let gather = MoeGather { H: hidden, K: topk, dxp, row: io.x(2), acc_in: io.acc(), dx: io.dx(0), T: Arg::tokens(1) };
    l.push(gather.launch(rows_grid(1)));
}

pub(super) fn combine(p: &Ports, hidden: u64, topk: u64, shared: bool, l: &mut Lowered) {
    let launch = Combine {
        H: hidden,
        K: topk,
        SHARED: shared as u64,
        yp: p.x(0),
        row: p.x(1),
        gate: p.x(2),
        resid: p.x(3),
        shared: p.x_if(shared, 4),
        out: p.y(0),
        T: Arg::tokens(1),
    };
    l.push(launch.launch(rows_grid(1)));
}

/// resid's and shared's gradients are dy itself (`Op::passthrough`): nothing to launch for them.
pub(super) fn combine_vjp(io: &VjpIo, hidden: u64, topk: u64, l: &mut Lowered) {
    let launch = CombineBwd {
        H: hidden,
        K: topk,
        yp: io.x(0),
        row: io.x(1),
        gate: io.x(2),
        dh: io.dy(0),
        dyp: io.dx(0),
        dgate: io.dx(2),
        T: Arg::tokens(1),
    };
    l.push(launch.launch(rows_grid(1)));
}
