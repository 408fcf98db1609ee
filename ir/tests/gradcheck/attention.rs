//! Per-op checks of the attention sublayer: QKV and TPA projections, qk_norm, GRAPE-M, value
//! residual, attention and out_proj.

use vpmoe_ir::reference::Tensor;
use vpmoe_ir::{Attn, AttnKind, Op};

use crate::harness::{op_model, run, Model};
use crate::helpers::{dims, it, Rng};

#[test]
fn qkv_proj() {
    for bias in [false, true] {
        let mut rng = Rng::new(3);
        let (h, nh, ng, d, t) = (6, 4, 2, 3, 5);
        let n = (nh + 2 * ng) * d;
        let mut xs = vec![rng.t(&[t, h], 1.0), rng.t(&[n, h], 0.5)];
        if bias {
            xs.push(rng.t(&[n], 0.5));
        }
        let op = Op::QkvProj { hidden: h as u64, heads: nh as u64, groups: ng as u64, head_dim: d as u64, bias };
        run(&op_model(&format!("qkv_proj bias={bias}"), op, dims(t, t), xs, None, None), 13);
    }
}

pub(crate) fn tpa_case(rng: &mut Rng, t: usize, a: [usize; 6], bias: bool) -> (Op, Vec<Tensor>) {
    let [h, nh, ng, d, rq, r] = a;
    let mut xs = vec![
        rng.t(&[t, h], 1.0),
        rng.t(&[nh * rq, h], 0.6),
        rng.t(&[ng * r, h], 0.6),
        rng.t(&[ng * r, h], 0.6),
        rng.t(&[rq * d, h], 0.6),
        rng.t(&[r * d, h], 0.6),
        rng.t(&[r * d, h], 0.6),
    ];
    if bias {
        xs.push(rng.t(&[(nh + 2 * ng) * d], 0.5));
    }
    let op = Op::TpaQkv {
        hidden: h as u64,
        heads: nh as u64,
        groups: ng as u64,
        head_dim: d as u64,
        q_rank: rq as u64,
        kv_rank: r as u64,
        bias,
    };
    (op, xs)
}

#[test]
fn tpa_qkv() {
    // GQA with 2 groups (2 query heads each) and with one group; ranks differ for q and k/v.
    for (a, bias) in [([5, 4, 2, 3, 3, 2], true), ([5, 4, 2, 3, 3, 2], false), ([4, 2, 1, 4, 2, 1], true)] {
        let mut rng = Rng::new(4);
        let (op, xs) = tpa_case(&mut rng, 4, a, bias);
        run(&op_model(&format!("tpa_qkv {a:?} bias={bias}"), op, dims(4, 4), xs, None, None), 14);
    }
}

#[test]
fn qk_norm() {
    let mut rng = Rng::new(5);
    let (nh, ng, d, t) = (4, 2, 4, 3);
    let xs =
        vec![rng.t(&[t, nh, d], 1.0), rng.t(&[t, ng, d], 1.0), rng.range(&[d], 0.5, 1.5), rng.range(&[d], 0.5, 1.5)];
    let op = Op::QkNorm { heads: nh as u64, groups: ng as u64, head_dim: d as u64, eps: 1e-5 };
    run(&op_model("qk_norm", op, dims(t, t), xs, None, None), 15);
}

pub(crate) fn grape_case(rng: &mut Rng, t: usize, seq: usize, nh: usize, ng: usize, d: usize) -> Model<'static> {
    // Log-frequencies around the init f_i = 10000^(−2i/d) (ℓ = 16 ln f), jittered.
    let lf: Vec<f32> =
        (0..d / 2).map(|i| (16.0 * (-(2.0 * i as f64 / d as f64) * 10000f64.ln())) as f32 + rng.sym(2.0)).collect();
    let xs = vec![rng.t(&[t, nh, d], 1.0), rng.t(&[t, ng, d], 1.0), Tensor::f32(vec![d / 2], lf)];
    let op = Op::GrapeM { heads: nh as u64, groups: ng as u64, head_dim: d as u64, log_freq_scale: 16.0 };
    // ℓ's scale is its magnitude, not a perturbation size: step 2e-2 in ℓ is 1.25e-3 in ln f.
    op_model(&format!("grape_m t={t} seq={seq} d={d}"), op, dims(t, seq), xs, None, None).with_step(2, 2e-2)
}

#[test]
fn grape_m() {
    let mut rng = Rng::new(6);
    run(&grape_case(&mut rng, 10, 5, 4, 2, 6), 16);
}

#[test]
fn value_residual() {
    // λ well inside (0,1) and at the init logit ln 9999 (D2: λ < 1 in f32, live gradient ≈ 1e-4·dλ).
    for logit in [0.7f32, 9999f32.ln()] {
        let mut rng = Rng::new(7);
        let (ng, d, t) = (2, 3, 4);
        // At λ ≈ 0.9999 the outputs barely move with the logit; a small v with an O(1) v₁ keeps
        // the outputs small so their f32 rounding does not swamp the 1e-4-sized derivative.
        let vs = if logit > 5.0 { 1e-3 } else { 1.0 };
        let xs = vec![rng.t(&[t, ng, d], vs), rng.t(&[t, ng, d], 1.0), Tensor::scalar(logit)];
        let op = Op::ValueResidual { groups: ng as u64, head_dim: d as u64 };
        // The op is linear in v and v₁, so a unit step is exact there and keeps the f32 output
        // rounding (≈ 6e-8) small against dv₁ = (1−λ)·g ≈ 1e-4·g at the init logit.
        let m = op_model(&format!("value_residual logit={logit}"), op, dims(t, t), xs, None, None)
            .with_step(0, 1.0)
            .with_step(1, 1.0);
        // At the init logit λ itself is quantised to 2⁻²⁴ in f32, i.e. 6e-4 of λ(1−λ): a 1e-2 step
        // would see 3% noise. Step 0.5 with Richardson: truncation ≈ 1.3e-4 (λ' ∝ e^(−x) there)
        // and rounding ≤ 1.8e-3 worst case, inside RTOL + ATOL = 3e-3 for this scalar.
        let m = if logit > 5.0 { m.with_step(2, 0.5).with_richardson() } else { m.with_step(2, 1e-2) };
        run(&m, 17);
    }
}

/// Two rows of 8: row 0 holds two documents (the second starts at position 3, whose first query
/// attends only itself), row 1 three documents; position 0 of each row attends only itself.
pub(crate) fn attn_docs() -> Tensor {
    it(&[16], vec![0, 0, 0, 1, 1, 1, 1, 1, 5, 5, 6, 6, 6, 6, 7, 7])
}

pub(crate) fn attn_case(rng: &mut Rng, a: Attn, t: usize, doc: Tensor) -> Vec<Tensor> {
    let (nh, ng, d) = (a.heads as usize, a.groups as usize, a.head_dim as usize);
    let mut xs = vec![rng.t(&[t, nh, d], 1.5), rng.t(&[t, ng, d], 1.5), rng.t(&[t, ng, d], 1.0), doc];
    if a.sinks {
        xs.push(rng.t(&[nh], 1.0));
    }
    xs
}

pub(crate) fn attn_configs() -> Vec<Attn> {
    let mut v = vec![];
    for sinks in [false, true] {
        v.push(Attn { heads: 4, groups: 2, head_dim: 4, kind: AttnKind::Window(3), sinks });
        v.push(Attn { heads: 4, groups: 2, head_dim: 4, kind: AttnKind::Global { alibi: true }, sinks });
    }
    v.push(Attn { heads: 2, groups: 2, head_dim: 3, kind: AttnKind::Global { alibi: false }, sinks: true });
    v.push(Attn { heads: 4, groups: 1, head_dim: 2, kind: AttnKind::Window(1), sinks: true });
    v
}

#[test]
fn attention() {
    for a in attn_configs() {
        let mut rng = Rng::new(8);
        let xs = attn_case(&mut rng, a, 16, attn_docs());
        run(
            &op_model(
                &format!("attention {:?} sinks={}", a.kind, a.sinks),
                Op::Attention(a),
                dims(16, 8),
                xs,
                None,
                None,
            ),
            18,
        );
    }
}

#[test]
fn out_proj() {
    for bias in [false, true] {
        let mut rng = Rng::new(9);
        let (k, n, t) = (6, 5, 4);
        let mut xs = vec![rng.t(&[t, k], 1.0), rng.t(&[n, k], 0.5)];
        if bias {
            xs.push(rng.t(&[n], 0.5));
        }
        xs.push(rng.t(&[t, n], 1.0));
        let op = Op::OutProj { in_dim: k as u64, hidden: n as u64, bias };
        run(&op_model(&format!("out_proj bias={bias}"), op, dims(t, t), xs, None, None), 19);
    }
}
