//! Adjoint identities `⟨J u, v⟩ = ⟨u, Jᵀ v⟩` of the fused ops on shapes too large for per-element FD.

use vpmoe_ir::{Attn, AttnKind, GroupLimit, Op};

use crate::attention::{attn_case, grape_case, tpa_case};
use crate::harness::{adjoint, op_model};
use crate::head::{head_ce, head_ce_inputs};
use crate::helpers::{dims, it, Rng};
use crate::moe::{router_inputs, router_op};

#[test]
fn adjoint_attention() {
    let (s, b) = (24, 2);
    let mut doc: Vec<i32> = (0..s).map(|i| (i >= 9) as i32).collect();
    doc.extend((0..s).map(|i| 2 + (i >= 4) as i32 + (i >= 17) as i32));
    for a in [
        Attn { heads: 4, groups: 2, head_dim: 8, kind: AttnKind::Window(5), sinks: true },
        Attn { heads: 4, groups: 2, head_dim: 8, kind: AttnKind::Global { alibi: true }, sinks: true },
        Attn { heads: 4, groups: 2, head_dim: 8, kind: AttnKind::Global { alibi: true }, sinks: false },
    ] {
        let mut rng = Rng::new(40);
        let xs = attn_case(&mut rng, a, s * b, it(&[s * b], doc.clone()));
        let m = op_model(
            &format!("attention {:?} sinks={}", a.kind, a.sinks),
            Op::Attention(a),
            dims(s * b, s),
            xs,
            None,
            None,
        );
        adjoint(&m, 41);
    }
}

#[test]
fn adjoint_tpa_qkv() {
    let mut rng = Rng::new(42);
    let (op, xs) = tpa_case(&mut rng, 12, [16, 4, 2, 8, 4, 2], true);
    adjoint(&op_model("tpa_qkv 16/4/2/8 r4/2", op, dims(12, 6), xs, None, None), 43);
}

#[test]
fn adjoint_router() {
    let mut rng = Rng::new(44);
    let (t, h, e) = (16, 12, 16);
    let xs = router_inputs(&mut rng, t, h, e, true, true);
    let op = router_op(h, e, 4, Some(GroupLimit { groups: 4, group_topk: 2 }), true, true);
    adjoint(&op_model("router 16 experts top-4 groups 4/2", op, dims(t, 8), xs, None, None), 45);
}

#[test]
fn adjoint_grape_m() {
    let mut rng = Rng::new(46);
    adjoint(&grape_case(&mut rng, 64, 32, 4, 2, 16), 47);
}

#[test]
fn adjoint_head_ce() {
    let mut rng = Rng::new(48);
    let (t, h, v) = (32, 6, 50);
    let mask = (0..t).map(|i| (i % 5 != 3) as i32).collect();
    let xs = head_ce_inputs(&mut rng, t, h, v, mask);
    adjoint(&op_model("head_ce v=50", head_ce(h, v), dims(t, 16), xs, None, None), 49);
}

/// A vocabulary large enough that the reference walks the tokens in several logit chunks
/// (32, 32 and 6 rows): the chunk seams must not show in the loss or its gradients.
#[test]
fn adjoint_head_ce_across_logit_chunks() {
    let mut rng = Rng::new(57);
    let (t, h, v) = (70, 2, 1 << 19);
    let mask = (0..t).map(|i| (i % 7 != 2) as i32).collect();
    let xs = head_ce_inputs(&mut rng, t, h, v, mask);
    adjoint(&op_model("head_ce 3 chunks", head_ce(h, v), dims(t, t), xs, None, None), 58);
}

/// Shapes above the 32-wide transpose tiles of the backward's GEMM operands (the other cases
/// are all below one tile); linear ops, so the FD is exact up to rounding.
#[test]
fn adjoint_linear_ops_across_transpose_tiles() {
    let mut rng = Rng::new(54);
    let (t, h, v) = (37, 40, 70);
    let xs = head_ce_inputs(&mut rng, t, h, v, vec![1; t]);
    adjoint(&op_model("head_ce 37x40x70", head_ce(h, v), dims(t, t), xs, None, None), 55);
    let (k, n) = (65, 33);
    let xs = vec![rng.t(&[t, k], 1.0), rng.t(&[n, k], 0.5), rng.t(&[n], 0.5), rng.t(&[t, n], 1.0)];
    let op = Op::OutProj { in_dim: k as u64, hidden: n as u64, bias: true };
    adjoint(&op_model("out_proj 37x65x33", op, dims(t, t), xs, None, None), 56);
}
