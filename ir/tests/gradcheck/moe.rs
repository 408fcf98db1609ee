//! Per-op checks of the MoE ops: router, expert_ffn, combine and the sequence aux loss.

use vpmoe_ir::reference::Tensor;
use vpmoe_ir::{GroupLimit, Op};

use crate::decisions::{aux_topk, expert_pattern};
use crate::harness::{op_model, run, DecFn};
use crate::helpers::{dims, fwd, it, Rng};

pub(crate) fn router_op(h: usize, e: usize, k: usize, gl: Option<GroupLimit>, expert_bias: bool, bias: bool) -> Op {
    Op::Router { hidden: h as u64, experts: e as u64, topk: k as u64, group_limit: gl, scale: 2.5, expert_bias, bias }
}

pub(crate) fn router_inputs(rng: &mut Rng, t: usize, h: usize, e: usize, expert_bias: bool, bias: bool) -> Vec<Tensor> {
    let mut xs = vec![rng.t(&[t, h], 1.0), rng.t(&[e, h], 0.8)];
    if bias {
        xs.push(rng.t(&[e], 0.5));
    }
    if expert_bias {
        xs.push(rng.t(&[e], 0.3));
    }
    xs
}

#[test]
fn router() {
    let gl = |groups, group_topk| Some(GroupLimit { groups, group_topk });
    // (topk, group limit, expert_bias, bias, seeds over [idx, gate, scores])
    let cases = [
        (2, None, true, true, None),
        (2, None, false, false, None),
        (4, gl(4, 2), true, true, None),
        (2, gl(4, 1), true, false, None),
        (3, None, true, true, Some(vec![false, true, false])),
        (3, None, true, true, Some(vec![false, false, true])),
    ];
    for (k, g, eb, b, seeds) in cases {
        let mut rng = Rng::new(21);
        let (t, h, e) = (5, 4, 8);
        let xs = router_inputs(&mut rng, t, h, e, eb, b);
        let name = format!("router k={k} {g:?} eb={eb} b={b} seeds={seeds:?}");
        run(&op_model(&name, router_op(h, e, k, g, eb, b), dims(t, t), xs, seeds, None), 22);
    }
}

/// Token choices with an empty expert (3) and an expert (0) receiving every token.
fn moe_idx(t: usize) -> Vec<i32> {
    (0..t).flat_map(|ti| if ti % 3 == 2 { [2 - (ti % 2) as i32, 0] } else { [0, 1 + (ti % 2) as i32] }).collect()
}

/// Expert inputs `[x, src, row, offsets, fc1, (b1), fc2, (b2)]`; x's gradient sums each token's
/// K rows, so a token routed to two experts checks the gather-sum.
fn expert_inputs(rng: &mut Rng, t: usize, h: usize, f: usize, e: usize, k: usize, bias: bool) -> Vec<Tensor> {
    let d = fwd(&Op::Dispatch { experts: e as u64, topk: k as u64 }, &dims(t, t), &[&it(&[t, k], moe_idx(t))]);
    let off = d[2].i();
    assert!(off[4] == off[3] && off[1] - off[0] == t as i32, "expert 3 empty, expert 0 gets every token");
    let mut xs = vec![rng.t(&[t, h], 1.0), d[0].clone(), d[1].clone(), d[2].clone(), rng.t(&[e, f, h], 0.6)];
    if bias {
        xs.push(rng.t(&[e, f], 0.3));
    }
    xs.push(rng.t(&[e, h, f], 0.6));
    if bias {
        xs.push(rng.t(&[e, h], 0.3));
    }
    xs
}

#[test]
fn expert_ffn() {
    for bias in [false, true] {
        let mut rng = Rng::new(25);
        let (t, h, f, e, k) = (6, 3, 4, 4, 2);
        let xs = expert_inputs(&mut rng, t, h, f, e, k, bias);
        let op = Op::ExpertFfn { hidden: h as u64, ffn: f as u64, experts: e as u64, topk: k as u64, bias };
        let dec: DecFn = Box::new(move |xs: &[Tensor]| expert_pattern(xs, h, f, e, bias));
        let g = run(&op_model(&format!("expert_ffn bias={bias}"), op, dims(t, t), xs, None, Some(dec)), 26);
        assert!(!g.is_empty());
    }
}

#[test]
fn combine() {
    let (t, h, k) = (5, 3, 2);
    // From a dispatch (a permutation) and a hand-made row map where rows 1 and 7 are never
    // referenced and rows 0 and 4 are referenced twice (their gradients accumulate).
    let perm = fwd(&Op::Dispatch { experts: 4, topk: k as u64 }, &dims(t, t), &[&it(&[t, k], moe_idx(t))])[1].clone();
    let odd = it(&[t * k], vec![0, 2, 3, 4, 4, 5, 6, 0, 8, 9]);
    for (rows, shared) in [(&perm, false), (&perm, true), (&odd, true)] {
        let mut rng = Rng::new(27);
        let mut xs = vec![rng.t(&[t * k, h], 1.0), rows.clone(), rng.range(&[t, k], 0.1, 1.5), rng.t(&[t, h], 1.0)];
        if shared {
            xs.push(rng.t(&[t, h], 1.0));
        }
        let op = Op::Combine { hidden: h as u64, topk: k as u64, shared };
        let m = op_model(&format!("combine shared={shared} rows={:?}", rows.i()), op, dims(t, t), xs, None, None);
        run(&m, 28);
        if rows == &odd {
            // Unreferenced rows get exactly zero gradient.
            let mut r = Rng::new(1);
            let g = (m.bwd)(&m.xs, &[r.t(&[t, h], 1.0)]);
            assert!(g[0].f()[h..2 * h].iter().chain(&g[0].f()[7 * h..8 * h]).all(|&v| v == 0.0));
        }
    }
}

/// Sigmoid-like scores whose rows are shuffled, evenly spaced levels (gaps ≥ 0.11 before
/// normalisation), so no ±h step can reorder the aux-loss top-k.
pub(crate) fn separated_scores(rng: &mut Rng, t: usize, e: usize) -> Tensor {
    let mut v = Vec::with_capacity(t * e);
    for _ in 0..t {
        let mut row: Vec<f32> = (0..e).map(|j| 0.1 + 0.8 * j as f32 / (e - 1) as f32 + rng.sym(0.02)).collect();
        for i in (1..e).rev() {
            row.swap(i, rng.below(i + 1));
        }
        v.extend(row);
    }
    Tensor::f32(vec![t, e], v)
}

#[test]
fn seq_aux_loss() {
    let mut rng = Rng::new(29);
    let (e, k, s, b) = (6, 2, 4, 2);
    let xs = vec![separated_scores(&mut rng, s * b, e)];
    let op = Op::SeqAuxLoss { experts: e as u64, topk: k as u64 };
    let dec: DecFn = Box::new(move |xs: &[Tensor]| aux_topk(xs[0].f(), e, k));
    run(&op_model("seq_aux_loss", op, dims(s * b, s), xs, None, Some(dec)), 30);
}
