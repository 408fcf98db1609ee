//! Causal attention with document masking, a window or ALiBi, and optional sinks, flash-style
//! (nothing is S×S). The backward: per-row statistics (`attn_stats`), dq per query tile
//! (`attn_bwd_dq`), dk and dv per key tile (`attn_bwd_dkdv`; global layers split it per head
//! and sum each group's heads in `attn_dkdv_sum`), and the sink gradient as a column sum.

use crate::consts::ATTN_TILE as TILE;
use crate::launch::{families, one, rows_grid, tok, Arg, LaunchDim, Lowered};
use crate::ops::{reduce, Ports, VjpIo};
use vpmoe_ir::{Attn, AttnKind, DType};

families! {
    Attention = "attention" in "attention.cuh", 128 <D, HEADS, GROUPS, WINDOW, ALIBI, SINKS>
        (q: Bf, k: Bf, v: Bf, doc: I32, sinks: F32, out: BfMut, T: Int, S: Int);
    /// Per query row and head: the softmax statistics and `Σ dout·out`, and each row's sink share.
    AttnStats = "attn_stats" in "attn_stats.cuh", 128 <D, HEADS, GROUPS, WINDOW, ALIBI, SINKS>
        (q: Bf, k: Bf, doc: I32, sinks: F32, out: Bf, dout: Bf, stats: F32Mut, dsink: F32Mut, T: Int, S: Int);
    AttnBwdDq = "attn_bwd_dq" in "attn_bwd_dq.cuh", 128 <D, HEADS, GROUPS, WINDOW, ALIBI>
        (q: Bf, k: Bf, v: Bf, doc: I32, stats: F32, dout: Bf, dq: BfMut, T: Int, S: Int);
    AttnBwdDkdv = "attn_bwd_dkdv" in "attn_bwd_dkdv.cuh", 128 <D, HEADS, GROUPS, WINDOW, ALIBI, HSPLIT>
        (q: Bf, k: Bf, v: Bf, doc: I32, stats: F32, dout: Bf, dk: BfMut, dv: BfMut, T: Int, S: Int,
         part: F32Mut);
    AttnDkdvSum = "attn_dkdv_sum" in "attn_dkdv_sum.cuh", 128 <D, HEADS, GROUPS>
        (part: F32, dk: BfMut, dv: BfMut, T: Int);
}

/// The `WINDOW` (0: global) and `ALIBI` template arguments.
pub(super) fn kind(a: &Attn) -> (u64, u64) {
    match a.kind {
        AttnKind::Window(w) => (w, 0),
        AttnKind::Global { alibi } => (0, alibi as u64),
    }
}

/// Query (or key) tiles by heads.
fn tiles_by(y: u64) -> [LaunchDim; 3] {
    [tok(1, TILE), LaunchDim::Const(y), one()]
}

pub(super) fn forward(p: &Ports, a: &Attn, l: &mut Lowered) {
    let (window, alibi) = kind(a);
    let launch = Attention {
        D: a.head_dim,
        HEADS: a.heads,
        GROUPS: a.groups,
        WINDOW: window,
        ALIBI: alibi,
        SINKS: a.sinks as u64,
        q: p.x(0),
        k: p.x(1),
        v: p.x(2),
        doc: p.x(3),
        sinks: p.x_if(a.sinks, 4),
        out: p.y(0),
        T: Arg::tokens(1),
        S: Arg::Seq,
    };
    l.push(launch.launch(tiles_by(a.heads)));
}

pub(super) fn vjp(io: &VjpIo, a: &Attn, l: &mut Lowered) {
    let (window, alibi) = kind(a);
    let (d, heads, groups) = (a.head_dim, a.heads, a.groups);
    let stats = l.scratch_tok(DType::F32, 2 * heads);
    let dsink = if a.sinks { l.scratch_tok(DType::F32, heads) } else { Arg::Null };
    let launch = AttnStats {
        D: d,
        HEADS: heads,
        GROUPS: groups,
        WINDOW: window,
        ALIBI: alibi,
        SINKS: a.sinks as u64,
        q: io.x(0),
        k: io.x(1),
        doc: io.x(3),
        sinks: io.x_if(a.sinks, 4),
        out: io.y(0),
        dout: io.dy(0),
        stats: stats.clone(),
        dsink: dsink.clone(),
        T: Arg::tokens(1),
        S: Arg::Seq,
    };
    l.push(launch.launch(tiles_by(heads)));
    let launch = AttnBwdDq {
        D: d,
        HEADS: heads,
        GROUPS: groups,
        WINDOW: window,
        ALIBI: alibi,
        q: io.x(0),
        k: io.x(1),
        v: io.x(2),
        doc: io.x(3),
        stats: stats.clone(),
        dout: io.dy(0),
        dq: io.dx(0),
        T: Arg::tokens(1),
        S: Arg::Seq,
    };
    l.push(launch.launch(tiles_by(heads)));
    // Global layers split the key blocks per head (a causal row's first key tiles are seen by
    // every later query) and sum each group's heads after; windowed ones need not.
    let hsplit = window == 0 && heads > groups;
    let (part, dk, dv, blocks_y) = if hsplit {
        (l.scratch_tok(DType::F32, heads * 2 * d), Arg::Null, Arg::Null, heads)
    } else {
        (Arg::Null, io.dx(1), io.dx(2), groups)
    };
    let launch = AttnBwdDkdv {
        D: d,
        HEADS: heads,
        GROUPS: groups,
        WINDOW: window,
        ALIBI: alibi,
        HSPLIT: hsplit as u64,
        q: io.x(0),
        k: io.x(1),
        v: io.x(2),
        doc: io.x(3),
        stats,
        dout: io.dy(0),
        dk,
        dv,
        T: Arg::tokens(1),
        S: Arg::Seq,
        part: part.clone(),
    };
    l.push(launch.launch(tiles_by(blocks_y)));
    if hsplit {
        let sum =
            AttnDkdvSum { D: d, HEADS: heads, GROUPS: groups, part, dk: io.dx(1), dv: io.dx(2), T: Arg::tokens(1) };
        l.push(sum.launch(rows_grid(1)));
    }
    if a.sinks {
        reduce::colsum(l, heads, true, dsink, io.dx(4));
    }
}
