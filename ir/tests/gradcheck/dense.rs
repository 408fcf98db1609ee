//! Per-op checks of the token-wise dense ops: embedding, rms_norm, mlp.

use vpmoe_ir::reference::Tensor;
use vpmoe_ir::Op;

use crate::decisions::relu_pattern;
use crate::harness::{op_model, run, DecFn, Model};
use crate::helpers::{dims, it, Rng};

#[test]
fn embedding() {
    let mut rng = Rng::new(1);
    let (v, h, t) = (7, 5, 8);
    let toks = it(&[t], vec![3, 0, 3, 6, 2, 3, 0, 5]); // repeats: scatter-add; 1 and 4 unused
    let xs = vec![toks, rng.t(&[v, h], 1.0)];
    run(&op_model("embedding", Op::Embedding { vocab: v as u64, hidden: h as u64 }, dims(t, 4), xs, None, None), 11);
}

#[test]
fn rms_norm() {
    let mut rng = Rng::new(2);
    let (d, t) = (6, 5);
    let xs = vec![rng.t(&[t, d], 1.5), rng.range(&[d], 0.5, 1.5)];
    run(&op_model("rms_norm", Op::RmsNorm { dim: d as u64, eps: 1e-5 }, dims(t, t), xs, None, None), 12);
}

fn mlp_model(rng: &mut Rng, t: usize, h: usize, f: usize, bias: bool, residual: bool) -> Model<'static> {
    let mut xs = vec![rng.t(&[t, h], 1.0), rng.t(&[f, h], 0.6)];
    if bias {
        xs.push(rng.t(&[f], 0.3));
    }
    xs.push(rng.t(&[h, f], 0.6));
    if bias {
        xs.push(rng.t(&[h], 0.3));
    }
    if residual {
        xs.push(rng.t(&[t, h], 1.0));
    }
    let op = Op::Mlp { hidden: h as u64, ffn: f as u64, bias, residual };
    let dec: DecFn =
        Box::new(move |xs: &[Tensor]| relu_pattern(xs[0].f(), xs[1].f(), bias.then(|| xs[2].f()), t, h, f));
    op_model(&format!("mlp bias={bias} residual={residual}"), op, dims(t, t), xs, None, Some(dec))
}

#[test]
fn mlp() {
    for bias in [false, true] {
        for residual in [false, true] {
            let mut rng = Rng::new(10);
            run(&mlp_model(&mut rng, 4, 5, 7, bias, residual), 20);
        }
    }
}
