//! The decode program's ops (compiler/src/decode.rs): `grape_m_at` (GRAPE at given positions),
//! `cached_*_attention` (attention over a layer's key/value cache, then the write of the call's
//! keys and values) and `logits` (the LM head's product into f32).

use crate::consts::EPI_NONE;
use crate::launch::{families, one, rows_grid, tok, Arg, LaunchDim, Lowered};
use crate::ops::gemm::Dense;
use crate::ops::Ports;
use vpmoe_ir::Attn;

families! {
    GrapeAt = "grape_at" in "grape.cuh", 128 <D>
        (xq: Bf, xk: Bf, log_freq: F32, pos: I32, yq: BfMut, yk: BfMut, heads: Int, groups: Int, T: Int,
         scale: Float);
    CachedAttention = "cached_attention" in "cached_attention.cuh", 128 <D, HEADS, GROUPS, WINDOW, ALIBI, SINKS>
        (q: Bf, k: Bf, v: Bf, pos: I32, slot: I32, sinks: F32, kcache: Bf, vcache: Bf, blocks: I32,
         blocks_per_slot: Int, out: BfMut, T: Int);
    CacheWrite = "cache_write" in "cached_attention.cuh", 128 <WIDTH, WINDOW>
        (k: Bf, v: Bf, pos: I32, slot: I32, blocks: I32, blocks_per_slot: Int, kcache: BfMut, vcache: BfMut,
         T: Int);
}

pub(super) fn grape_at(p: &Ports, heads: u64, groups: u64, head_dim: u64, scale: f32, l: &mut Lowered) {
    let launch = GrapeAt {
        D: head_dim,
        xq: p.x(0),
        xk: p.x(1),
        log_freq: p.x(2),
        pos: p.x(3),
        yq: p.y(0),
        yk: p.y(1),
        heads: Arg::int(heads),
        groups: Arg::int(groups),
        T: Arg::tokens(1),
        scale: Arg::Float(scale),
    };
    l.push(launch.launch(rows_grid(1)));
}

pub(super) fn cached_attention(p: &Ports, a: &Attn, layer: u32, l: &mut Lowered) {
    let (window, alibi) = super::attention::kind(a);
    let (kcache, vcache) = (Arg::Cache { layer, value: false }, Arg::Cache { layer, value: true });
    let blocks = || Arg::or_null(window == 0, || Arg::BlockTable);
    let attend = CachedAttention {
        D: a.head_dim,
        HEADS: a.heads,
        GROUPS: a.groups,
        WINDOW: window,
        ALIBI: alibi,
        SINKS: a.sinks as u64,
        q: p.x(0),
        k: p.x(1),
        v: p.x(2),
        pos: p.x(3),
        slot: p.x(4),
        sinks: p.x_if(a.sinks, 5),
        kcache: kcache.clone(),
        vcache: vcache.clone(),
        blocks: blocks(),
        blocks_per_slot: Arg::BlocksPerSlot,
        out: p.y(0),
        T: Arg::tokens(1),
    };
    l.push(attend.launch([tok(1, 1), LaunchDim::Const(a.heads), one()]));
    let write = CacheWrite {
        WIDTH: a.groups * a.head_dim,
        WINDOW: window,
        k: p.x(1),
        v: p.x(2),
        pos: p.x(3),
        slot: p.x(4),
        blocks: blocks(),
        blocks_per_slot: Arg::BlocksPerSlot,
        kcache,
        vcache,
        T: Arg::tokens(1),
    };
    l.push(write.launch(rows_grid(1)));
}

pub(super) fn logits(p: &Ports, hidden: u64, vocab: u64, l: &mut Lowered) {
    let dense = Dense {
        n: vocab,
        kd: hidden,
        epi: EPI_NONE,
        out_f32: true,
        x: p.x(0),
        w: p.x(1),
        bias: Arg::Null,
        resid: Arg::Null,
        y: p.y(0),
    };
    dense.lower(l);
}
