//! Seeded random draws, tensor constructors and checked calls into the reference forward/backward.

use vpmoe_ir::backward::backward;
use vpmoe_ir::reference::{forward, Dims, NaiveGemm, Tensor};
use vpmoe_ir::Op;

/// The project's SplitMix64 with the test's draws on top.
pub(crate) struct Rng(vpmoe_ir::rng::Rng);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(vpmoe_ir::rng::Rng::new(seed))
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub(crate) fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `[-s, s]`.
    pub(crate) fn sym(&mut self, s: f64) -> f32 {
        ((2.0 * self.unif() - 1.0) * s) as f32
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub(crate) fn vec(&mut self, n: usize, s: f64) -> Vec<f32> {
        (0..n).map(|_| self.sym(s)).collect()
    }
    /// A random f32 tensor with entries uniform in `[-s, s]`.
    pub(crate) fn t(&mut self, shape: &[usize], s: f64) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(shape.to_vec(), self.vec(n, s))
    }
    /// Uniform in `[lo, hi]`.
    pub(crate) fn range(&mut self, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(shape.to_vec(), (0..n).map(|_| (lo + (hi - lo) * self.unif()) as f32).collect())
    }
}

pub(crate) fn it(shape: &[usize], v: Vec<i32>) -> Tensor {
    Tensor::i32(shape.to_vec(), v)
}

pub(crate) fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

pub(crate) fn dims(tokens: usize, seq: usize) -> Dims {
    Dims { tokens, seq }
}

pub(crate) fn fwd(op: &Op, d: &Dims, ins: &[&Tensor]) -> Vec<Tensor> {
    forward(op, d, ins, &NaiveGemm)
}

pub(crate) fn bwd(op: &Op, d: &Dims, ins: &[&Tensor], ys: &[Tensor], dys: &[Option<&Tensor>]) -> Vec<Tensor> {
    let yr: Vec<&Tensor> = ys.iter().collect();
    let g = backward(op, d, ins, &yr, dys, &NaiveGemm);
    let want: Vec<&&Tensor> = ins.iter().zip(op.grad_ins()).filter(|(_, g)| *g).map(|(x, _)| x).collect();
    assert_eq!(g.len(), want.len(), "{}: number of gradients", op.name());
    for (gi, x) in g.iter().zip(want) {
        assert_eq!(gi.shape, x.shape, "{}: gradient shape", op.name());
        assert!(gi.f().iter().all(|v| v.is_finite()), "{}: non-finite gradient", op.name());
    }
    g
}
