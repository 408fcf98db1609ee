//! The cpu backend's forward on the small configs.

use std::path::Path;
use vpmoe_ir::reference::{forward, select_experts, Dims, NaiveGemm};
use vpmoe_ir::Op;
use vpmoe_runtime::{cpu::CpuBackend, params::Params, state::TrainState, synthetic_batch, Backend};

fn compile(rel: &str) -> (vpmoe_ir::Graph, vpmoe_compiler::Plan) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    vpmoe_compiler::compile_arch(&vpmoe_compiler::config::load(&root.join(rel)).unwrap()).unwrap()
}

#[test]
fn loss_at_init_is_near_ln_vocab_for_every_small_config() {
    for name in ["tiny_moe", "tiny_tied", "tiny_dense", "tiny_noshared"] {
        let (g, plan) = compile(&format!("tests/configs/{name}.toml"));
        let batch = synthetic_batch(plan.arch.vocab, 32, 2, 7);
        batch.validate(plan.arch.vocab).unwrap();
        let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, 7));
        let out = be.forward(&batch, &[]).unwrap();
        let ln_v = (plan.arch.vocab as f32).ln();
        // w_r = w_f = 1: the loss is the sum of two span means, each ≈ ln V at init.
        assert!((out.loss() - 2.0 * ln_v).abs() < 0.1, "{name}: loss {} vs 2·ln V {}", out.loss(), 2.0 * ln_v);
        let tl = out.token_loss();
        for (i, &l) in tl.iter().enumerate() {
            if batch.loss_mask[i] != 0 {
                assert!((l - ln_v).abs() < 0.5, "{name}: token {i} CE {l}");
            } else {
                assert_eq!(l, 0.0);
            }
        }
    }
}

#[test]
fn fast_gemm_matches_the_naive_reference() {
    let (g, plan) = compile("tests/configs/tiny_moe.toml");
    let batch = synthetic_batch(plan.arch.vocab, 16, 2, 3);
    let mut fast = CpuBackend::new(&g, &plan, TrainState::init(&plan, 3));
    let mut naive = CpuBackend::new(&g, &plan, TrainState::init(&plan, 3));
    naive.gemm = Box::new(NaiveGemm);
    let a = fast.forward(&batch, &[]).unwrap();
    let b = naive.forward(&batch, &[]).unwrap();
    let (la, lb) = (a.token_loss(), b.token_loss());
    let max = la.iter().zip(lb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max < 1e-4, "max |fast − naive| = {max}");
    assert!((a.loss() - b.loss()).abs() < 1e-4);
}

#[test]
fn forward_is_deterministic() {
    let (g, plan) = compile("tests/configs/tiny_moe.toml");
    let batch = synthetic_batch(plan.arch.vocab, 16, 2, 5);
    let run = || CpuBackend::new(&g, &plan, TrainState::init(&plan, 5)).forward(&batch, &[]).unwrap().loss();
    assert_eq!(run().to_bits(), run().to_bits());
}

/// D4: tiny_moe's group limit (1 of 4 groups, group score = sum of its top 2) changes which
/// experts some tokens get, on real router scores from a forward pass.
#[test]
fn group_limited_routing_changes_the_selection_in_tiny_moe() {
    let (g, plan) = compile("tests/configs/tiny_moe.toml");
    let node = g.nodes.iter().find(|n| n.name == "blk2.moe.router").unwrap();
    let Op::Router { experts, topk, group_limit, .. } = node.op else { panic!() };
    assert!(group_limit.is_some());
    // Router input: random hidden states through the real router parameters.
    let params = Params::init(&plan.params, 11);
    let t = 64;
    let x: Vec<f32> = (0..t * 32).map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0).collect();
    let x = vpmoe_ir::reference::Tensor::f32(vec![t, 32], x);
    let ins: Vec<&vpmoe_ir::reference::Tensor> = std::iter::once(&x)
        .chain(node.inputs[1..].iter().map(|v| {
            &params.tensors[g.param_of(*v).map(|p| plan.params.iter().position(|q| q.name == p.name).unwrap()).unwrap()]
        }))
        .collect();
    let out = forward(&node.op, &Dims { tokens: t, seq: t }, &ins, &NaiveGemm);
    let (idx, scores) = (out[0].i(), out[2].f());
    let e = experts as usize;
    let differs = (0..t).filter(|&ti| {
        let plain = select_experts(&scores[ti * e..(ti + 1) * e], topk as usize, None);
        let got: Vec<usize> = idx[ti * topk as usize..(ti + 1) * topk as usize].iter().map(|&x| x as usize).collect();
        plain != got
    });
    assert!(differs.count() > 0, "group limiting never changed the selection");
}

#[test]
fn bad_batches_are_rejected_with_the_position() {
    let (_, plan) = compile("tests/configs/tiny_dense.toml");
    let mut b = synthetic_batch(plan.arch.vocab, 8, 1, 1);
    b.tokens[3] = 512;
    let e = b.validate(plan.arch.vocab).unwrap_err().to_string();
    assert!(e.contains("position 3"), "{e}");
}
