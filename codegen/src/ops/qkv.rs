//! Full attention's packed QKV projection: one GEMM into a `[T, (heads + 2·groups)·d]` scratch,
//! split into q, k, v; the backward packs dq, dk, dv back for its two GEMMs.

use crate::consts::EPI_NONE;
use crate::launch::{families, rows_grid, Arg, Lowered};
use crate::ops::gemm::{Dense, Dgrad, Wgrad};
use crate::ops::reduce::ColumnSums;
use crate::ops::{Ports, VjpIo};
use vpmoe_ir::DType;

families! {
    QkvSplit = "qkv_split" in "qkv_split.cuh", 128 <HEADS, GROUPS, D>
        (mixed: Bf, q: BfMut, k: BfMut, v: BfMut, T: Int);
    QkvPack = "qkv_pack" in "qkv_pack.cuh", 128 <HEADS, GROUPS, D>
        (dq: Bf, dk: Bf, dv: Bf, mixed: BfMut, T: Int);
    /// The packed bias's gradient, column sums read straight from dq, dk, dv (colsum.cuh's body).
    QkvColsum = "qkv_colsum" in "qkv_colsum.cuh", 256 <HEADS, GROUPS, D>
        (dq: Bf, dk: Bf, dv: Bf, out: F32Mut, rows: Int, accum: Int, parts: F32Mut, tickets: I32Mut);
}

pub(super) fn forward(p: &Ports, hidden: u64, heads: u64, groups: u64, head_dim: u64, bias: bool, l: &mut Lowered) {
    let n = (heads + 2 * groups) * head_dim;
    let mixed = l.scratch_tok(DType::Bf16, n);
    let y = mixed.clone();
    Dense {
        n,
        kd: hidden,
        epi: EPI_NONE,
        out_f32: false,
        x: p.x(0),
        w: p.x(1),
        bias: p.x_if(bias, 2),
        resid: Arg::Null,
        y,
    }
    .lower(l);
    let split = QkvSplit {
        HEADS: heads,
        GROUPS: groups,
        D: head_dim,
        mixed,
        q: p.y(0),
        k: p.y(1),
        v: p.y(2),
        T: Arg::tokens(1),
    };
    l.push(split.launch(rows_grid(1)));
}

pub(super) fn vjp(io: &VjpIo, hidden: u64, heads: u64, groups: u64, head_dim: u64, bias: bool, l: &mut Lowered) {
    let n = (heads + 2 * groups) * head_dim;
    let dm = l.scratch_tok(DType::Bf16, n);
    let pack = QkvPack {
        HEADS: heads,
        GROUPS: groups,
        D: head_dim,
        dq: io.dy(0),
        dk: io.dy(1),
        dv: io.dy(2),
        mixed: dm.clone(),
        T: Arg::tokens(1),
    };
    l.push(pack.launch(rows_grid(1)));
    Dgrad { n: hidden, kd: n, a: dm.clone(), lda: n, w: io.x(1), acc: Arg::Null, y: io.dx(0), out_f32: false }.lower(l);
    let db = io.dx_if(bias, 2);
    Wgrad { n, k: hidden, a: dm, lda: n, b: io.x(0), ldb: hidden, dw: io.dx(1), db, amode: 0, brelu2: false }.lower(l);
}

/// The gradient of a packed QKV bias `[(heads + 2·groups)·d]` from dq, dk, dv.
pub(crate) fn bias_grad(io: &VjpIo, heads: u64, groups: u64, head_dim: u64, out: Arg, l: &mut Lowered) {
    let c = ColumnSums::new(l, "qkv_colsum", (heads + 2 * groups) * head_dim);
    let launch = QkvColsum {
        HEADS: heads,
        GROUPS: groups,
        D: head_dim,
        dq: io.dy(0),
        dk: io.dy(1),
        dv: io.dy(2),
        accum: out.accum(),
        out,
        rows: Arg::tokens(1),
        parts: c.parts,
        tickets: Arg::Tickets,
    };
    l.push(launch.launch(c.grid));
}
