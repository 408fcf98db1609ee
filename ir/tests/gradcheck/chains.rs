//! Hand-composed chains: an MoE layer (router → experts → combine + aux loss) and a dense block
//! through to the LM loss, checked by FD and the adjoint identity.

use vpmoe_ir::reference::Tensor;
use vpmoe_ir::{Attn, AttnKind, GroupLimit, Op};

use crate::decisions::{aux_topk, expert_pattern, relu_pattern};
use crate::harness::{adjoint, run, BwdFn, FwdFn, Model};
use crate::helpers::{bwd, dims, fwd, it, Rng};
use crate::moe::router_op;

/// MoE layer by hand: router → (dispatch → expert_ffn → combine with the gates, a shared
/// expert and a residual) plus the sequence aux loss on the router scores. Inputs:
/// `[x, w_r, b_r, expert_bias, fc1, b1, fc2, b2, s_fc1, s_b1, s_fc2, s_b2, resid]`.
fn moe_chain(rng: &mut Rng, t: usize, seq: usize, h: usize, f: usize, e: usize, k: usize) -> Model<'static> {
    let xs = vec![
        rng.t(&[t, h], 1.0),
        rng.t(&[e, h], 1.0),
        rng.t(&[e], 0.5),
        rng.t(&[e], 0.2),
        rng.t(&[e, f, h], 0.6),
        rng.t(&[e, f], 0.3),
        rng.t(&[e, h, f], 0.6),
        rng.t(&[e, h], 0.3),
        rng.t(&[f, h], 0.6),
        rng.t(&[f], 0.3),
        rng.t(&[h, f], 0.6),
        rng.t(&[h], 0.3),
        rng.t(&[t, h], 1.0),
    ];
    let names = ["x", "w_r", "b_r", "expert_bias", "fc1", "b1", "fc2", "b2", "s_fc1", "s_b1", "s_fc2", "s_b2", "resid"];
    let mut diff = vec![true; xs.len()];
    diff[3] = false;
    let (hu, fu, eu, ku) = (h as u64, f as u64, e as u64, k as u64);
    let router = router_op(h, e, k, Some(GroupLimit { groups: 4, group_topk: 2 }), true, true);
    let disp = Op::Dispatch { experts: eu, topk: ku };
    let ffn = Op::ExpertFfn { hidden: hu, ffn: fu, experts: eu, topk: ku, bias: true };
    let shared = Op::Mlp { hidden: hu, ffn: fu, bias: true, residual: false };
    let comb = Op::Combine { hidden: hu, topk: ku, shared: true };
    let aux = Op::SeqAuxLoss { experts: eu, topk: ku };
    let d = dims(t, seq);
    let ops = (router, disp, ffn, shared, comb, aux);
    // Forward of every node, in order.
    let run_fwd = {
        let ops = ops.clone();
        move |x: &[Tensor]| -> Vec<Vec<Tensor>> {
            let (router, disp, ffn, shared, comb, aux) = &ops;
            let r = fwd(router, &d, &[&x[0], &x[1], &x[2], &x[3]]);
            let dp = fwd(disp, &d, &[&r[0]]);
            let y = fwd(ffn, &d, &[&x[0], &dp[0], &dp[1], &dp[2], &x[4], &x[5], &x[6], &x[7]]);
            let s = fwd(shared, &d, &[&x[0], &x[8], &x[9], &x[10], &x[11]]);
            let c = fwd(comb, &d, &[&y[0], &dp[1], &r[1], &x[12], &s[0]]);
            let a = fwd(aux, &d, &[&r[2]]);
            vec![r, dp, y, s, c, a]
        }
    };
    let f1 = run_fwd.clone();
    let fw: FwdFn = Box::new(move |x: &[Tensor]| {
        let n = f1(x);
        let mut dec: Vec<i64> = n[0][0].i().iter().map(|&v| v as i64).collect();
        dec.extend(aux_topk(n[0][2].f(), e, k));
        let ex = [x[0].clone(), n[1][0].clone(), n[1][1].clone(), n[1][2].clone(), x[4].clone(), x[5].clone()];
        dec.extend(expert_pattern(&ex, h, f, e, true));
        dec.extend(relu_pattern(x[0].f(), x[8].f(), Some(x[9].f()), t, h, f));
        (vec![n[4][0].clone(), n[5][0].clone()], dec)
    });
    let bw: BwdFn = Box::new(move |x: &[Tensor], r: &[Tensor]| {
        let (router, _, ffn, shared, comb, aux) = &ops;
        let n = run_fwd(x);
        let gc = bwd(comb, &d, &[&n[2][0], &n[1][1], &n[0][1], &x[12], &n[3][0]], &n[4], &[Some(&r[0])]);
        let [dyp, dgate, dresid, dshared] = <[Tensor; 4]>::try_from(gc).unwrap();
        let gs = bwd(shared, &d, &[&x[0], &x[8], &x[9], &x[10], &x[11]], &n[3], &[Some(&dshared)]);
        let gy = bwd(ffn, &d, &[&x[0], &n[1][0], &n[1][1], &n[1][2], &x[4], &x[5], &x[6], &x[7]], &n[2], &[Some(&dyp)]);
        let ga = bwd(aux, &d, &[&n[0][2]], &n[5], &[Some(&r[1])]);
        let gr = bwd(router, &d, &[&x[0], &x[1], &x[2], &x[3]], &n[0], &[None, Some(&dgate), Some(&ga[0])]);
        let dx = sum(&[&gr[0], &gy[0], &gs[0]]);
        vec![
            dx,
            gr[1].clone(),
            gr[2].clone(),
            gy[1].clone(),
            gy[2].clone(),
            gy[3].clone(),
            gy[4].clone(),
            gs[1].clone(),
            gs[2].clone(),
            gs[3].clone(),
            gs[4].clone(),
            dresid,
        ]
    });
    Model::new(
        &format!("moe chain t={t} h={h} f={f} e={e} k={k}"),
        xs,
        names.iter().map(|s| s.to_string()).collect(),
        diff,
        fw,
        bw,
    )
}

fn sum(ts: &[&Tensor]) -> Tensor {
    let mut acc = vec![0f64; ts[0].numel()];
    for t in ts {
        acc.iter_mut().zip(t.f()).for_each(|(a, &b)| *a += b as f64);
    }
    Tensor::f32(ts[0].shape.clone(), acc.into_iter().map(|x| x as f32).collect())
}

#[test]
fn moe_chain_gradcheck() {
    let mut rng = Rng::new(50);
    run(&moe_chain(&mut rng, 6, 3, 4, 3, 8, 2), 51);
}

#[test]
fn adjoint_moe_chain() {
    let mut rng = Rng::new(52);
    adjoint(&moe_chain(&mut rng, 24, 12, 12, 8, 16, 4), 53);
}

/// Dense block by hand: embedding → rms_norm → qkv_proj → qk_norm → grape_m → value_residual
/// (with v₁ = the raw k, so k fans out to qk_norm and the value residual) → attention (window, sinks, documents) → out_proj (residual = the
/// embedding) → rms_norm → head_ce → span_loss. Inputs: `[tokens, table, w_in, w_qkv, b_qkv, w_q,
/// w_k, log_freq, vr_logit, sinks, doc, w_o, b_o, w_f, w_lm, labels, mask, span, span_scale, weight]`.
fn dense_chain(rng: &mut Rng, kind: AttnKind) -> Model<'static> {
    let (s, b, vocab, hid, nh, ng, hd) = (6, 2, 9, 8, 4, 2, 4);
    let t = s * b;
    let n = (nh + 2 * ng) * hd;
    let (hu, nhu, ngu, hdu) = (hid as u64, nh as u64, ng as u64, hd as u64);
    let lf: Vec<f32> = (0..hd / 2).map(|i| -(16.0 * i as f32 * 2.0) + rng.sym(1.0)).collect();
    let xs = vec![
        it(&[t], (0..t).map(|_| rng.below(vocab) as i32).collect()),
        rng.t(&[vocab, hid], 1.0),
        rng.range(&[hid], 0.5, 1.5),
        rng.t(&[n, hid], 0.5),
        rng.t(&[n], 0.3),
        rng.range(&[hd], 0.5, 1.5),
        rng.range(&[hd], 0.5, 1.5),
        Tensor::f32(vec![hd / 2], lf),
        Tensor::scalar(0.4),
        rng.t(&[nh], 1.0),
        it(&[t], vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3]),
        rng.t(&[hid, nh * hd], 0.5),
        rng.t(&[hid], 0.3),
        rng.range(&[hid], 0.5, 1.5),
        rng.t(&[vocab, hid], 0.7),
        it(&[t], (0..t).map(|_| rng.below(vocab) as i32).collect()),
        it(&[t], (0..t).map(|i| (i % 4 != 2) as i32).collect()),
        it(&[t], (0..t).map(|i| 1 + (i % 3 == 0) as i32).collect()),
        Tensor::f32(vec![3], vec![0.0, 0.2, 0.25]),
        rng.range(&[t], 0.25, 4.0),
    ];
    let names = [
        "tokens",
        "table",
        "w_in",
        "w_qkv",
        "b_qkv",
        "w_q",
        "w_k",
        "log_freq",
        "vr_logit",
        "sinks",
        "doc",
        "w_o",
        "b_o",
        "w_f",
        "w_lm",
        "labels",
        "mask",
        "span",
        "span_scale",
        "weight",
    ];
    let diff: Vec<bool> = names
        .iter()
        .map(|nm| !matches!(*nm, "tokens" | "doc" | "labels" | "mask" | "span" | "span_scale" | "weight"))
        .collect();
    let ops = vec![
        Op::Embedding { vocab: vocab as u64, hidden: hu },
        Op::RmsNorm { dim: hu, eps: 1e-5 },
        Op::QkvProj { hidden: hu, heads: nhu, groups: ngu, head_dim: hdu, bias: true },
        Op::QkNorm { heads: nhu, groups: ngu, head_dim: hdu, eps: 1e-5 },
        Op::GrapeM { heads: nhu, groups: ngu, head_dim: hdu, log_freq_scale: 16.0 },
        Op::ValueResidual { groups: ngu, head_dim: hdu },
        Op::Attention(Attn { heads: nhu, groups: ngu, head_dim: hdu, kind, sinks: true }),
        Op::OutProj { in_dim: nhu * hdu, hidden: hu, bias: true },
        Op::RmsNorm { dim: hu, eps: 1e-5 },
        Op::HeadCe { hidden: hu, vocab: vocab as u64 },
        Op::SpanLoss,
    ];
    let d = dims(t, s);
    let run_fwd = {
        let ops = ops.clone();
        move |x: &[Tensor]| -> Vec<Vec<Tensor>> {
            let o = &ops;
            let e = fwd(&o[0], &d, &[&x[0], &x[1]]);
            let a = fwd(&o[1], &d, &[&e[0], &x[2]]);
            let q = fwd(&o[2], &d, &[&a[0], &x[3], &x[4]]);
            let qn = fwd(&o[3], &d, &[&q[0], &q[1], &x[5], &x[6]]);
            let r = fwd(&o[4], &d, &[&qn[0], &qn[1], &x[7]]);
            let vr = fwd(&o[5], &d, &[&q[2], &q[1], &x[8]]);
            let at = fwd(&o[6], &d, &[&r[0], &r[1], &vr[0], &x[10], &x[9]]);
            let op = fwd(&o[7], &d, &[&at[0], &x[11], &x[12], &e[0]]);
            let z = fwd(&o[8], &d, &[&op[0], &x[13]]);
            let l = fwd(&o[9], &d, &[&z[0], &x[14], &x[15], &x[16]]);
            let sl = fwd(&o[10], &d, &[&l[0], &x[17], &x[18], &x[19]]);
            vec![e, a, q, qn, r, vr, at, op, z, l, sl]
        }
    };
    let f1 = run_fwd.clone();
    let fw: FwdFn = Box::new(move |x: &[Tensor]| (vec![f1(x)[10][0].clone()], vec![]));
    let bw: BwdFn = Box::new(move |x: &[Tensor], r: &[Tensor]| {
        let o = &ops;
        let n = run_fwd(x);
        let [e, a, q, qn, rot, vr, at, op, z, l, sl] = <[Vec<Tensor>; 11]>::try_from(n).unwrap();
        let g_tok = bwd(&o[10], &d, &[&l[0], &x[17], &x[18], &x[19]], &sl, &[Some(&r[0])]);
        let g_l = bwd(&o[9], &d, &[&z[0], &x[14], &x[15], &x[16]], &l, &[Some(&g_tok[0]), None]);
        let g_z = bwd(&o[8], &d, &[&op[0], &x[13]], &z, &[Some(&g_l[0])]);
        let g_op = bwd(&o[7], &d, &[&at[0], &x[11], &x[12], &e[0]], &op, &[Some(&g_z[0])]);
        let g_at = bwd(&o[6], &d, &[&rot[0], &rot[1], &vr[0], &x[10], &x[9]], &at, &[Some(&g_op[0])]);
        let g_vr = bwd(&o[5], &d, &[&q[2], &q[1], &x[8]], &vr, &[Some(&g_at[2])]);
        let g_rot = bwd(&o[4], &d, &[&qn[0], &qn[1], &x[7]], &rot, &[Some(&g_at[0]), Some(&g_at[1])]);
        let g_qn = bwd(&o[3], &d, &[&q[0], &q[1], &x[5], &x[6]], &qn, &[Some(&g_rot[0]), Some(&g_rot[1])]);
        let dk = sum(&[&g_qn[1], &g_vr[1]]);
        let g_q = bwd(&o[2], &d, &[&a[0], &x[3], &x[4]], &q, &[Some(&g_qn[0]), Some(&dk), Some(&g_vr[0])]);
        let g_a = bwd(&o[1], &d, &[&e[0], &x[2]], &a, &[Some(&g_q[0])]);
        let de = sum(&[&g_a[0], &g_op[3]]);
        let g_e = bwd(&o[0], &d, &[&x[0], &x[1]], &e, &[Some(&de)]);
        vec![
            g_e[0].clone(),
            g_a[1].clone(),
            g_q[1].clone(),
            g_q[2].clone(),
            g_qn[2].clone(),
            g_qn[3].clone(),
            g_rot[2].clone(),
            g_vr[2].clone(),
            g_at[3].clone(),
            g_op[1].clone(),
            g_op[2].clone(),
            g_z[1].clone(),
            g_l[1].clone(),
        ]
    });
    let m =
        Model::new(&format!("dense chain {kind:?}"), xs, names.iter().map(|s| s.to_string()).collect(), diff, fw, bw);
    // The objective is one f32 scalar (rounding ≈ 1.2e-7 at |loss| ≈ 2), so FD noise is
    // ≈ 1.2e-7/h: tensors with small rms or small gradients get larger absolute steps (QKV weight
    // 5e-3 and bias 1e-2, log-frequencies 0.2 = 1.25% in f, value-residual logit and sinks 2e-2).
    m.with_step(3, 5e-3).with_step(4, 1e-2).with_step(7, 0.2).with_step(8, 2e-2).with_step(9, 2e-2)
}

#[test]
fn dense_chain_gradcheck() {
    for kind in [AttnKind::Window(3), AttnKind::Global { alibi: true }] {
        let mut rng = Rng::new(60);
        let m = dense_chain(&mut rng, kind);
        run(&m, 61);
        adjoint(&m, 62);
    }
}
