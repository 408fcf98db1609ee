//! Hand-computable cases of the reference semantics (MODEL.md §4).

use vpmoe_ir::reference::*;
use vpmoe_ir::{Attn, AttnKind, GroupLimit, Op};

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn sink_with_every_key_masked_gives_zeros_not_nan() {
    let p = softmax_with_sink(&[f32::NEG_INFINITY; 4], Some(0.3));
    assert_eq!(p, vec![0.0; 4]);
    let p = softmax_with_sink(&[f32::NEG_INFINITY; 4], None);
    assert!(p.iter().all(|x| *x == 0.0));
}

#[test]
fn sink_takes_its_share_of_the_denominator() {
    // exp(0)/(exp(0)+exp(0)+exp(0)) with one sink at 0 and two keys at 0.
    let p = softmax_with_sink(&[0.0, 0.0], Some(0.0));
    assert!(close(p[0], 1.0 / 3.0, 1e-6) && close(p[1], 1.0 / 3.0, 1e-6));
    // A very negative sink is a plain softmax.
    let p = softmax_with_sink(&[1.0, 1.0], Some(-1e4));
    assert!(close(p[0], 0.5, 1e-6));
}

#[test]
fn window_boundary_at_w_minus_1_and_w() {
    let w = AttnKind::Window(4);
    assert!(attends(w, 10, 7, 0, 0), "distance W-1 = 3 is inside the window");
    assert!(!attends(w, 10, 6, 0, 0), "distance W = 4 is outside");
    assert!(!attends(w, 10, 11, 0, 0), "never the future");
    assert!(!attends(AttnKind::Global { alibi: false }, 10, 9, 0, 1), "never across documents");
}

/// One head, d = 1, q = k = 0 so every allowed key gets equal weight; v_j = j tells which keys
/// were averaged.
#[test]
fn window_attention_averages_exactly_the_window() {
    let s = 6;
    let a = Attn { heads: 1, groups: 1, head_dim: 1, kind: AttnKind::Window(3), sinks: false };
    let q = Tensor::f32(vec![s, 1, 1], vec![0.0; s]);
    let k = q.clone();
    let v = Tensor::f32(vec![s, 1, 1], (0..s).map(|j| j as f32).collect());
    let doc = Tensor::i32(vec![s], vec![0, 0, 0, 0, 1, 1]);
    let out = forward(&Op::Attention(a), &Dims { tokens: s, seq: s }, &[&q, &k, &v, &doc], &NaiveGemm);
    let o = out[0].f();
    assert!(close(o[0], 0.0, 1e-6));
    assert!(close(o[2], 1.0, 1e-6)); // keys 0,1,2
    assert!(close(o[3], 2.0, 1e-6)); // keys 1,2,3 (key 0 is at distance W)
    assert!(close(o[4], 4.0, 1e-6)); // new document: only itself
    assert!(close(o[5], 4.5, 1e-6)); // keys 4,5
}

#[test]
fn alibi_slopes_are_powers_of_two() {
    assert_eq!(alibi_slopes(8), vec![0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]);
    assert_eq!(alibi_slopes(4), vec![0.25, 0.0625, 0.015625, 0.00390625]);
    assert_eq!(alibi_slopes(6).len(), 6);
}

#[test]
fn alibi_bias_shifts_attention_toward_recent_keys() {
    // Two keys with equal scores: weights ∝ exp(−m·dist). Head 0 slope 0.5 for 8 heads.
    let a = Attn { heads: 8, groups: 8, head_dim: 1, kind: AttnKind::Global { alibi: true }, sinks: false };
    let q = Tensor::f32(vec![2, 8, 1], vec![0.0; 16]);
    let v = Tensor::f32(vec![2, 8, 1], [vec![0.0; 8], vec![1.0; 8]].concat());
    let doc = Tensor::i32(vec![2], vec![0, 0]);
    let out = forward(&Op::Attention(a), &Dims { tokens: 2, seq: 2 }, &[&q, &q, &v, &doc], &NaiveGemm);
    let want = 1.0 / (1.0 + (-0.5f32).exp()); // weight of the recent key (v=1)
    assert!(close(out[0].f()[8], want, 1e-6));
}

#[test]
fn grape_rotation_at_t0_is_identity_and_preserves_norm() {
    let freqs = grape_freqs(&[0.0, -16.0 * 10f32.ln()], 16.0);
    let orig = vec![1.0, 2.0, 3.0, 4.0];
    let mut u = orig.clone();
    grape_rotate(&mut u, &freqs, 0);
    assert_eq!(u, orig);
    grape_rotate(&mut u, &freqs, 7);
    let n0: f32 = orig.iter().map(|x| x * x).sum();
    let n1: f32 = u.iter().map(|x| x * x).sum();
    assert!(close(n0, n1, 1e-5));
    // f0 = 1: the first pair rotates by 7 radians.
    let (s, c) = 7f32.sin_cos();
    assert!(close(u[0], 1.0 * c - 3.0 * s, 1e-5));
}

#[test]
fn router_ties_go_to_the_lower_index() {
    assert_eq!(topk(&[0.5, 0.7, 0.7, 0.1, 0.7], 2), vec![1, 2]);
    assert_eq!(select_experts(&[0.3; 8], 3, None), vec![0, 1, 2]);
}

#[test]
fn group_limited_differs_from_plain_topk() {
    // 4 groups of 2 experts.
    let sel = [0.9, 0.8, 0.85, 0.0, 0.84, 0.83, 0.1, 0.1];
    assert_eq!(select_experts(&sel, 2, None), vec![0, 2]);
    // topk 2, group_topk 1: group score = sum of top-2 in each group:
    // g0 = 1.7, g1 = 0.85, g2 = 1.67, g3 = 0.2 → only group 0 eligible → experts {0, 1}.
    let gl = GroupLimit { groups: 4, group_topk: 1 };
    assert_eq!(select_experts(&sel, 2, Some(gl)), vec![0, 1]);
    // The locked config's rule (group score = top-1, group_topk = K) equals plain top-K.
    let gl = GroupLimit { groups: 4, group_topk: 2 };
    assert_eq!(select_experts(&sel, 2, Some(gl)), select_experts(&sel, 2, None));
}

#[test]
fn gates_sum_to_the_scaling_factor_and_use_unbiased_scores() {
    let (t, h, e, k) = (3, 2, 4, 2);
    let op = Op::Router {
        hidden: h as u64,
        experts: e as u64,
        topk: k as u64,
        group_limit: None,
        scale: 2.5,
        expert_bias: true,
        bias: false,
    };
    let x = Tensor::f32(vec![t, h], vec![0.1, -0.2, 0.5, 0.3, -1.0, 2.0]);
    let w = Tensor::f32(vec![e, h], vec![1.0, 0.0, 0.0, 1.0, -1.0, 0.5, 0.3, 0.3]);
    // A large bias on expert 3 forces its selection without changing its gate's score.
    let eb = Tensor::f32(vec![e], vec![0.0, 0.0, 0.0, 10.0]);
    let out = forward(&op, &Dims { tokens: t, seq: t }, &[&x, &w, &eb], &NaiveGemm);
    let (idx, gate, scores) = (out[0].i(), out[1].f(), out[2].f());
    for ti in 0..t {
        assert_eq!(idx[ti * k], 3);
        let s: f32 = gate[ti * k..(ti + 1) * k].iter().sum();
        assert!(close(s, 2.5, 1e-6), "gate sum {s}");
        let (a, b) = (idx[ti * k] as usize, idx[ti * k + 1] as usize);
        let (sa, sb) = (scores[ti * e + a], scores[ti * e + b]);
        assert!(close(gate[ti * k], 2.5 * sa / (sa + sb), 1e-6));
    }
}

#[test]
fn dispatch_is_expert_major_and_combine_inverts_it() {
    let (t, h, e, k) = (3usize, 2usize, 3usize, 2usize);
    let x = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0];
    let idx = Tensor::i32(vec![t, k], vec![2, 0, 0, 1, 2, 0]);
    let d =
        forward(&Op::Dispatch { experts: e as u64, topk: k as u64 }, &Dims { tokens: t, seq: t }, &[&idx], &NaiveGemm);
    assert_eq!(d[2].i(), &[0, 3, 4, 6]); // expert 0 has 3 rows, 1 has 1, 2 has 2
                                         // row of (t,k): expert 0 rows 0..3 hold slots 1,2,5; expert 1 row 3 slot 3; expert 2 rows 4,5 slots 0,4.
    assert_eq!(d[1].i(), &[4, 0, 1, 3, 5, 2]);
    // The token each row reads.
    assert_eq!(d[0].i(), &[0, 1, 2, 1, 0, 2]);
    // Identity experts: row r holds x[src[r]].
    let yp = gather_rows(&x, d[0].i(), h);
    let gate = Tensor::f32(vec![t, k], vec![1.0; t * k]);
    let resid = Tensor::f32(vec![t, h], vec![0.0; t * h]);
    let c = forward(
        &Op::Combine { hidden: h as u64, topk: k as u64, shared: false },
        &Dims { tokens: t, seq: t },
        &[&Tensor::f32(vec![t * k, h], yp), &d[1], &gate, &resid],
        &NaiveGemm,
    );
    // Each token gets k copies of itself.
    assert_eq!(c[0].f(), &[2.0, 2.0, 4.0, 4.0, 6.0, 6.0]);
}

#[test]
fn head_ce_gives_each_token_its_cross_entropy() {
    let (h, v) = (2, 4);
    // z = 0: every logit is 0, so lse = ln 4 and ce = ln 4 on every unmasked token.
    let z = Tensor::f32(vec![3, h], vec![0.0; 6]);
    let head = Tensor::f32(vec![v, h], (0..8).map(|i| i as f32).collect());
    let labels = Tensor::i32(vec![3], vec![1, 2, -1]);
    let mask = Tensor::i32(vec![3], vec![1, 1, 0]);
    let d = Dims { tokens: 3, seq: 3 };
    let out = forward(&Op::HeadCe { hidden: h as u64, vocab: v as u64 }, &d, &[&z, &head, &labels, &mask], &NaiveGemm);
    let l = 4f32.ln();
    assert_eq!(out[0].f(), &[l, l, 0.0], "token loss, 0 where masked");
    assert_eq!(out[1].f(), &[l, l, 0.0], "lse per token, 0 where masked");
}

#[test]
fn span_loss_weights_each_span() {
    let tok = Tensor::f32(vec![3], vec![2.0, 3.0, 0.0]);
    let span = Tensor::i32(vec![3], vec![1, 2, 0]);
    let scale = Tensor::f32(vec![3], vec![0.0, 1.0, 0.5]);
    let weight = Tensor::f32(vec![3], vec![1.0, 2.0, 3.0]);
    let out = forward(&Op::SpanLoss, &Dims { tokens: 3, seq: 3 }, &[&tok, &span, &scale, &weight], &NaiveGemm);
    // 2·1·1 + 3·0.5·2.
    assert_eq!(out[0].f(), &[5.0]);
}

fn token_weights(tok: &[f32], tlp: &[f32], slp: &[f32], teacher: &[i32]) -> Vec<f32> {
    let n = tok.len();
    let t = |v: &[f32]| Tensor::f32(vec![n], v.to_vec());
    let kd = Tensor::f32(vec![5], vec![-1.0, 0.5, 0.25, 4.0, 2.0]);
    let ins = [&t(tok), &t(tlp), &t(slp), &Tensor::i32(vec![n], teacher.to_vec()), &kd];
    forward(&Op::TokenWeight, &Dims { tokens: n, seq: n }, &ins, &NaiveGemm)[0].f().to_vec()
}

#[test]
fn confidence_weight_centres_scales_and_clips() {
    let lp = [-1.0, -1.0 - 2f32.ln(), f32::NEG_INFINITY, 0.0, -7.0];
    let w = token_weights(&[0.0; 5], &lp, &[0.0; 5], &[1, 1, 1, 1, 0]);
    // m: weight 1; ln 2 below m at T = ½: e^(−2 ln 2) = ¼; −inf: w_min; 0: e² clipped to 4;
    // no teacher value: 1.
    assert!(close(w[0], 1.0, 1e-7));
    assert!(close(w[1], 0.25, 1e-6));
    assert_eq!(&w[2..], &[0.25, 4.0, 1.0]);
    assert!(Op::TokenWeight.grad_ins().iter().all(|g| !g));
}

#[test]
fn opd_weight_is_the_advantage_times_the_truncated_ratio() {
    // Student lp = −token_loss: −1, −1, −3, −0.5.
    let tok = [1.0, 1.0, 3.0, 0.5];
    let tlp = [-0.5, -2.0, -1.0, -0.5];
    // Sampler lp: equal (ratio 1), ln 2 likelier (ratio ½), far less likely (ratio e⁴, clipped
    // to c = 2), and equal with a zero advantage.
    let slp = [-1.0, -1.0 + 2f32.ln(), -7.0, -0.5];
    let w = token_weights(&tok, &tlp, &slp, &[2; 4]);
    assert!(close(w[0], 0.5, 1e-6), "{w:?}");
    assert!(close(w[1], -0.5, 1e-6), "{w:?}");
    assert!(close(w[2], 4.0, 1e-6), "{w:?}");
    assert_eq!(w[3], 0.0);
}

#[test]
fn seq_aux_loss_is_one_under_perfect_balance() {
    // 2 experts, top-1, 2 tokens each preferring a different expert with symmetric scores.
    let scores = Tensor::f32(vec![2, 2], vec![0.6, 0.4, 0.4, 0.6]);
    let out = forward(&Op::SeqAuxLoss { experts: 2, topk: 1 }, &Dims { tokens: 2, seq: 2 }, &[&scores], &NaiveGemm);
    // E/(K·S²)·Σ_e P_e·c_e = 2/4·(1.0·1 + 1.0·1) = 1.
    assert!(close(out[0].f()[0], 1.0, 1e-6));
}

#[test]
fn value_residual_at_init_is_almost_identity_in_f32() {
    let v = Tensor::f32(vec![1, 1, 1], vec![1.0]);
    let v1 = Tensor::f32(vec![1, 1, 1], vec![0.0]);
    let logit = Tensor::scalar(9999f32.ln());
    let out = forward(
        &Op::ValueResidual { groups: 1, head_dim: 1 },
        &Dims { tokens: 1, seq: 1 },
        &[&v, &v1, &logit],
        &NaiveGemm,
    );
    let lam = out[0].f()[0];
    assert!(lam < 1.0 && close(lam, 0.9999, 1e-6), "D2: λ stays below 1 in f32, got {lam}");
}

#[test]
fn bf16_rounding_is_to_nearest_even() {
    let ulp = 2f32.powi(-7); // bf16 spacing in [1, 2)
    assert_eq!(round_bf16(1.0 + ulp / 2.0), 1.0, "a tie goes to the even neighbour");
    assert_eq!(round_bf16(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp, "a tie goes to the even neighbour");
    assert_eq!(round_bf16(1.0 + 0.6 * ulp), 1.0 + ulp);
    assert_eq!(round_bf16(f32::MIN), f32::NEG_INFINITY, "beyond bf16's largest finite value");
    assert!(round_bf16(f32::NAN).is_nan());
    assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
}

/// `TensorCore` rounds the hidden activation (as the kernels pack it for the second GEMM); the
/// plain GEMMs keep the exact semantics.
#[test]
fn tensor_core_model_rounds_only_the_kept_intermediates() {
    let a = 1.0 + 2f32.powi(-7); // bf16; a² = 1 + 2⁻⁶ + 2⁻¹⁴ is not
    let op = Op::Mlp { hidden: 1, ffn: 1, bias: false, residual: false };
    let (x, w1, w2) =
        (Tensor::f32(vec![1, 1], vec![1.0]), Tensor::f32(vec![1, 1], vec![a]), Tensor::f32(vec![1, 1], vec![1.0]));
    let dims = Dims { tokens: 1, seq: 1 };
    let exact = forward(&op, &dims, &[&x, &w1, &w2], &NaiveGemm);
    let model = forward(&op, &dims, &[&x, &w1, &w2], &TensorCore(&NaiveGemm));
    assert_eq!(exact[0].f()[0], a * a);
    assert_eq!(model[0].f()[0], 1.0 + 2f32.powi(-6));
    let mut v = vec![a * a];
    kept(&NaiveGemm, &mut v);
    assert_eq!(v, [a * a]);
}

/// Under `TensorCore` attention rounds each P̃ numerator as the kernel does: relative to the
/// running max after its 64-key tile, rescaled exactly when a later tile raises the max. Query 64
/// sees keys 0..63 (tile 0, score c) and key 64 (tile 1, score c + δ): tile 0's numerators are
/// exp(0) = 1, exact in bf16, where rounding against the final max would keep bf16(e^−δ).
#[test]
fn tensor_core_attention_rounds_against_the_running_max() {
    let (s, c, delta) = (65usize, 0.5f32, 0.3f32);
    let a = Attn { heads: 1, groups: 1, head_dim: 1, kind: AttnKind::Global { alibi: false }, sinks: false };
    let mut q = vec![0.0; s];
    q[64] = 1.0;
    let mut k = vec![c; s];
    k[64] = c + delta;
    let mut v = vec![1.0; s];
    v[64] = 0.0;
    let (q, k, v) = (Tensor::f32(vec![s, 1, 1], q), Tensor::f32(vec![s, 1, 1], k), Tensor::f32(vec![s, 1, 1], v));
    let doc = Tensor::i32(vec![s], vec![0; s]);
    let out = forward(&Op::Attention(a), &Dims { tokens: s, seq: s }, &[&q, &k, &v, &doc], &TensorCore(&NaiveGemm));
    let e = (-(delta as f64)).exp();
    let running = 64.0 * e / (64.0 * e + 1.0);
    assert!(close(out[0].f()[64], running as f32, 1e-6), "{} vs {running}", out[0].f()[64]);
    let final_max = 64.0 * round_bf16(e as f32) as f64 / (64.0 * e + 1.0);
    assert!(!close(out[0].f()[64], final_max as f32, 1e-4), "the final-max model is distinguishable here");
}
