//! TPA (tensor-product attention) projections: six factor GEMMs in one launch (`tpa_proj`), q, k,
//! v as rank-R products of the factors (`tpa_combine`); the backward recomputes the factors,
//! takes their gradients per token (`tpa_bwd`) and runs the input and weight gradients over the
//! six stacked factor weights at once (`tpa_dgrad`, `tpa_wgrad`).

use crate::consts::{GEMM_TILE, TICKETS};
use crate::launch::{families, rows_grid, Arg, Lowered};
use crate::ops::gemm::{nn_grid, tile_grid, tn_grid, wgrad_split};
use crate::ops::{qkv, Ports, VjpIo};
use vpmoe_ir::{DType, Op};

families! {
    /// `f = x·[W_aq; W_ak; W_av; W_bq; W_bk; W_bv]ᵀ`.
    TpaProj = "tpa_proj" in "tpa_proj.cuh", 128 <HEADS, GROUPS, D, RQ, R, H>
        (x: Bf, w_aq: Bf, w_ak: Bf, w_av: Bf, w_bq: Bf, w_bk: Bf, w_bv: Bf, f: BfMut, T: Int);
    TpaCombine = "tpa_combine" in "tpa_combine.cuh", 128 <HEADS, GROUPS, D, RQ, R>
        (f: Bf, bias: Bf, q: BfMut, k: BfMut, v: BfMut, T: Int);
    TpaBwd = "tpa_bwd" in "tpa_bwd.cuh", 128 <HEADS, GROUPS, D, RQ, R>
        (f: Bf, dq: Bf, dk: Bf, dv: Bf, df: BfMut, T: Int);
    /// `dx = df·[W_aq; …; W_bv]`: one f32 accumulation over all factor columns.
    TpaDgrad = "tpa_dgrad" in "tpa_dgrad.cuh", 128 <HEADS, GROUPS, D, RQ, R, H>
        (df: Bf, w_aq: Bf, w_ak: Bf, w_av: Bf, w_bq: Bf, w_bk: Bf, w_bv: Bf, dx: BfMut, T: Int);
    /// `[dW_aq; …; dW_bv] = dfᵀ·x`, each weight's rows into its own gradient.
    TpaWgrad = "tpa_wgrad" in "tpa_wgrad.cuh", 128 <HEADS, GROUPS, D, RQ, R, H>
        (df: Bf, x: Bf, part: F32Mut, dw_aq: F32Mut, dw_ak: F32Mut, dw_av: F32Mut, dw_bq: F32Mut,
         dw_bk: F32Mut, dw_bv: F32Mut, T: Int, accum: Int, tickets: I32Mut);
}

/// The shape of one TPA layer.
struct Tpa {
    hidden: u64,
    heads: u64,
    groups: u64,
    head_dim: u64,
    q_rank: u64,
    kv_rank: u64,
    bias: bool,
}

impl Tpa {
    fn of(op: &Op) -> Tpa {
        let Op::TpaQkv { hidden, heads, groups, head_dim, q_rank, kv_rank, bias } = *op else { unreachable!() };
        Tpa { hidden, heads, groups, head_dim, q_rank, kv_rank, bias }
    }
    /// Columns of the six stacked factors: A_q, A_k, A_v, B_q, B_k, B_v.
    fn factor_cols(&self) -> u64 {
        let (h, g, d, rq, r) = (self.heads, self.groups, self.head_dim, self.q_rank, self.kv_rank);
        h * rq + 2 * g * r + rq * d + 2 * r * d
    }
    /// The six factor products `f = x·Wᵀ` (`w(k)`: the node's input k, weights at 1..=6).
    fn proj(&self, x: Arg, w: impl Fn(usize) -> Arg, f: Arg) -> crate::launch::Launch {
        let Tpa { hidden, heads, groups, head_dim, q_rank, kv_rank, .. } = *self;
        TpaProj {
            HEADS: heads,
            GROUPS: groups,
            D: head_dim,
            RQ: q_rank,
            R: kv_rank,
            H: hidden,
            x,
            w_aq: w(1),
            w_ak: w(2),
            w_av: w(3),
            w_bq: w(4),
            w_bk: w(5),
            w_bv: w(6),
            f,
            T: Arg::tokens(1),
        }
        .launch(tile_grid(self.factor_cols(), 1))
    }
}

pub(super) fn forward(p: &Ports, op: &Op, l: &mut Lowered) {
    let t = Tpa::of(op);
    let f = l.scratch_tok(DType::Bf16, t.factor_cols());
    l.push(t.proj(p.x(0), |k| p.x(k), f.clone()));
    let combine = TpaCombine {
        HEADS: t.heads,
        GROUPS: t.groups,
        D: t.head_dim,
        RQ: t.q_rank,
        R: t.kv_rank,
        f,
        bias: p.x_if(t.bias, 7),
        q: p.y(0),
        k: p.y(1),
        v: p.y(2),
        T: Arg::tokens(1),
    };
    l.push(combine.launch(rows_grid(1)));
}

pub(super) fn vjp(io: &VjpIo, op: &Op, l: &mut Lowered) {
    let t = Tpa::of(op);
    let Tpa { hidden, heads, groups, head_dim, q_rank, kv_rank, bias } = t;
    let total = t.factor_cols();
    // Recompute the six factor products (as the forward), then their gradients per token.
    let f = l.scratch_tok(DType::Bf16, total);
    let df = l.scratch_tok(DType::Bf16, total);
    l.push(t.proj(io.x(0), |k| io.x(k), f.clone()));
    let (dq, dk, dv) = (io.dy(0), io.dy(1), io.dy(2));
    let bwd = TpaBwd {
        HEADS: heads,
        GROUPS: groups,
        D: head_dim,
        RQ: q_rank,
        R: kv_rank,
        f,
        dq,
        dk,
        dv,
        df: df.clone(),
        T: Arg::tokens(1),
    };
    l.push(bwd.launch(rows_grid(1)));
    let dgrad = TpaDgrad {
        HEADS: heads,
        GROUPS: groups,
        D: head_dim,
        RQ: q_rank,
        R: kv_rank,
        H: hidden,
        df: df.clone(),
        w_aq: io.x(1),
        w_ak: io.x(2),
        w_av: io.x(3),
        w_bq: io.x(4),
        w_bk: io.x(5),
        w_bv: io.x(6),
        dx: io.dx(0),
        T: Arg::tokens(1),
    };
    l.push(dgrad.launch(nn_grid(hidden, 1, 0)));
    let split = wgrad_split(total, hidden);
    let (part, tickets) = if split > 1 {
        let tiles = total.div_ceil(GEMM_TILE) * hidden.div_ceil(GEMM_TILE);
        assert!(tiles <= TICKETS, "tpa_wgrad: tiles past TICKETS");
        (l.partials(split * total * hidden), Arg::Tickets)
    } else {
        (Arg::Null, Arg::Null)
    };
    let wgrad = TpaWgrad {
        HEADS: heads,
        GROUPS: groups,
        D: head_dim,
        RQ: q_rank,
        R: kv_rank,
        H: hidden,
        df,
        x: io.x(0),
        part,
        accum: io.dx(1).accum(),
        dw_aq: io.dx(1),
        dw_ak: io.dx(2),
        dw_av: io.dx(3),
        dw_bq: io.dx(4),
        dw_bk: io.dx(5),
        dw_bv: io.dx(6),
        T: Arg::tokens(1),
        tickets,
    };
    l.push(wgrad.launch(tn_grid(total, hidden, split)));
    if bias {
        qkv::bias_grad(io, heads, groups, head_dim, io.dx(7), l);
    }
}
