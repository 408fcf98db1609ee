//! How each IR op becomes launches: one module per op (or per family of kernels several ops
//! share), holding its kernel-family declarations, its forward lowering and its VJP lowering, next
//! to the `.cuh` templates they launch. docs/architecture.md ("Adding an op") lists the files.

use crate::launch::{Arg, Family, Launch, Lowered, Scratch};
use vpmoe_ir::{Node, Op, Vjp};

mod add;
mod attention;
mod decode;
mod dense;
mod embed;
pub mod gemm;
mod grape;
mod head_ce;
mod moe;
mod norm;
pub mod optim;
mod qkv;
pub mod reduce;
mod router;
mod seq_aux;
mod tpa;
mod vres;

/// Every kernel family, module by module.
pub fn families() -> impl Iterator<Item = &'static Family> {
    [
        embed::FAMILIES,
        norm::FAMILIES,
        gemm::FAMILIES,
        qkv::FAMILIES,
        tpa::FAMILIES,
        grape::FAMILIES,
        vres::FAMILIES,
        attention::FAMILIES,
        router::FAMILIES,
        moe::FAMILIES,
        seq_aux::FAMILIES,
        head_ce::FAMILIES,
        reduce::FAMILIES,
        add::FAMILIES,
        decode::FAMILIES,
        optim::FAMILIES,
    ]
    .into_iter()
    .flatten()
    .copied()
}

pub fn family(name: &str) -> &'static Family {
    families().find(|f| f.name == name).unwrap_or_else(|| panic!("unknown kernel family {name}"))
}

/// The launches (in order) and scratch buffers of one node.
pub fn lower_node(node: &Node) -> (Vec<Launch>, Vec<Scratch>) {
    let mut l = Lowered::default();
    match node.op {
        Op::Vjp(ref v) => vjp(&VjpIo::new(node, v), v, &mut l),
        ref op => forward(&Ports(node), op, &mut l),
    }
    (l.launches, l.scratch)
}

fn forward(p: &Ports, op: &Op, l: &mut Lowered) {
    match *op {
        Op::Embedding { hidden, .. } => embed::forward(p, hidden, l),
        Op::RmsNorm { dim, eps } => norm::forward(p, dim, eps, l),
        Op::QkNorm { heads, groups, head_dim, eps } => norm::qk_forward(p, heads, groups, head_dim, eps, l),
        Op::QkvProj { hidden, heads, groups, head_dim, bias } => {
            qkv::forward(p, hidden, heads, groups, head_dim, bias, l)
        }
        Op::TpaQkv { .. } => tpa::forward(p, op, l),
        Op::GrapeM { heads, groups, head_dim, log_freq_scale } => {
            grape::forward(p, heads, groups, head_dim, log_freq_scale, l)
        }
        Op::ValueResidual { groups, head_dim } => vres::forward(p, groups, head_dim, l),
        Op::Attention(a) => attention::forward(p, &a, l),
        Op::OutProj { in_dim, hidden, bias } => dense::out_proj(p, in_dim, hidden, bias, l),
        Op::Mlp { hidden, ffn, bias, residual } => dense::mlp(p, hidden, ffn, bias, residual, l),
        Op::Router { .. } => router::forward(p, op, l),
        Op::Dispatch { experts, topk } => moe::dispatch(p, experts, topk, l),
        Op::ExpertFfn { hidden, ffn, experts, topk, bias } => moe::expert_ffn(p, hidden, ffn, experts, topk, bias, l),
        Op::Combine { hidden, topk, shared } => moe::combine(p, hidden, topk, shared, l),
        Op::SeqAuxLoss { experts, topk } => seq_aux::forward(p, experts, topk, l),
        Op::TokenWeight => head_ce::token_weight(p, l),
        Op::SpanLoss => head_ce::span_loss(p, l),
        Op::HeadCe { hidden, vocab } => head_ce::forward(p, hidden, vocab, l),
        Op::Add { n, ref ty } => add::forward(p, n, ty, l),
        Op::GrapeMAt { heads, groups, head_dim, log_freq_scale } => {
            decode::grape_at(p, heads, groups, head_dim, log_freq_scale, l)
        }
        Op::CachedAttention { ref attn, layer } => decode::cached_attention(p, attn, layer, l),
        Op::Logits { hidden, vocab } => decode::logits(p, hidden, vocab, l),
        Op::Vjp(_) => unreachable!(),
    }
}

fn vjp(io: &VjpIo, v: &Vjp, l: &mut Lowered) {
    match v.of {
        Op::Embedding { vocab, hidden } => embed::vjp(io, vocab, hidden, l),
        Op::RmsNorm { dim, eps } => norm::vjp(io, dim, eps, l),
        Op::QkNorm { heads, groups, head_dim, eps } => norm::qk_vjp(io, heads, groups, head_dim, eps, l),
        Op::QkvProj { hidden, heads, groups, head_dim, bias } => qkv::vjp(io, hidden, heads, groups, head_dim, bias, l),
        Op::TpaQkv { .. } => tpa::vjp(io, &v.of, l),
        Op::GrapeM { heads, groups, head_dim, log_freq_scale } => {
            grape::vjp(io, heads, groups, head_dim, log_freq_scale, l)
        }
        Op::ValueResidual { groups, head_dim } => vres::vjp(io, groups, head_dim, l),
        Op::Attention(a) => attention::vjp(io, &a, l),
        Op::OutProj { in_dim, hidden, bias } => dense::out_proj_vjp(io, in_dim, hidden, bias, l),
        Op::Mlp { hidden, ffn, bias, .. } => dense::mlp_vjp(io, hidden, ffn, bias, l),
        Op::Router { .. } => router::vjp(io, &v.of, v.acc, l),
        Op::ExpertFfn { hidden, ffn, experts, topk, bias } => {
            moe::expert_ffn_vjp(io, hidden, ffn, experts, topk, bias, l)
        }
        Op::Combine { hidden, topk, .. } => moe::combine_vjp(io, hidden, topk, l),
        Op::SeqAuxLoss { experts, topk } => seq_aux::vjp(io, experts, topk, l),
        Op::HeadCe { hidden, vocab } => head_ce::vjp(io, hidden, vocab, l),
        Op::SpanLoss => head_ce::span_loss_vjp(io, l),
        Op::TokenWeight
        | Op::Dispatch { .. }
        | Op::Add { .. }
        | Op::GrapeMAt { .. }
        | Op::CachedAttention { .. }
        | Op::Logits { .. }
        | Op::Vjp(_) => {
            panic!("vjp of {} is not lowered (autodiff never emits it)", v.of.name())
        }
    }
}

/// The ports of a forward node.
pub(crate) struct Ports<'a>(&'a Node);

impl Ports<'_> {
    /// Input `k`.
    fn x(&self, k: usize) -> Arg {
        Arg::Value(self.0.inputs[k])
    }
    /// Input `k` where `present`, else a null pointer.
    fn x_if(&self, present: bool, k: usize) -> Arg {
        Arg::or_null(present, || self.x(k))
    }
    /// The last input (a residual).
    fn last(&self) -> Arg {
        self.x(self.0.inputs.len() - 1)
    }
    fn inputs(&self) -> usize {
        self.0.inputs.len()
    }
    /// Output `k`.
    fn y(&self, k: usize) -> Arg {
        Arg::Value(self.0.outputs[k])
    }
}

/// The ports of a vjp node: forward inputs, forward outputs, the seeded upstream gradients and
/// (with `Vjp::acc`) the running gradient of input 0; outputs are the gradients of the
/// differentiable forward inputs that are not passthroughs.
pub(crate) struct VjpIo<'a> {
    node: &'a Node,
    nin: usize,
    nout: usize,
    /// Input position of each output's upstream gradient.
    dy_at: Vec<Option<usize>>,
    /// Output position of each forward input's gradient.
    dx_at: Vec<Option<usize>>,
    /// Input position of the running gradient of input 0 (`Vjp::acc`).
    acc: Option<usize>,
}

impl<'a> VjpIo<'a> {
    fn new(node: &'a Node, v: &Vjp) -> Self {
        let (fi, fo) = v.of.signature();
        let (nin, nout) = (fi.len(), fo.len());
        assert_eq!(v.seeds.len(), nout, "vjp of {}: seeds per output", v.of.name());
        let mut next = nin + nout;
        let dy_at = v
            .seeds
            .iter()
            .map(|&s| {
                s.then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        let mut o = 0;
        let pass = v.of.passthrough();
        let dx_at =
            v.of.grad_ins()
                .iter()
                .enumerate()
                .map(|(i, &g)| {
                    (g && !pass.contains(&i)).then(|| {
                        o += 1;
                        o - 1
                    })
                })
                .collect();
        let acc = v.acc.then_some(next);
        assert_eq!(node.inputs.len(), next + v.acc as usize, "vjp of {}: input count", v.of.name());
        assert_eq!(node.outputs.len(), o, "vjp of {}: output count", v.of.name());
        VjpIo { node, nin, nout, dy_at, dx_at, acc }
    }
    /// Forward input `k`.
    fn x(&self, k: usize) -> Arg {
        assert!(k < self.nin);
        Arg::Value(self.node.inputs[k])
    }
    /// Forward input `k` where `present`, else a null pointer.
    fn x_if(&self, present: bool, k: usize) -> Arg {
        Arg::or_null(present, || self.x(k))
    }
    /// Forward output `k`.
    fn y(&self, k: usize) -> Arg {
        assert!(k < self.nout);
        Arg::Value(self.node.inputs[self.nin + k])
    }
    /// Upstream gradient of forward output `k`, or Null when it is not seeded (zero).
    fn dy(&self, k: usize) -> Arg {
        self.dy_at[k].map(|i| Arg::Value(self.node.inputs[i])).unwrap_or(Arg::Null)
    }
    /// Gradient output of forward input `k`.
    fn dx(&self, k: usize) -> Arg {
        Arg::Value(self.node.outputs[self.dx_at[k].expect("input has no gradient")])
    }
    /// Gradient of forward input `k` where `present`, else a null pointer.
    fn dx_if(&self, present: bool, k: usize) -> Arg {
        Arg::or_null(present, || self.dx(k))
    }
    /// The running gradient that input 0's gradient is added to (`Vjp::acc`), or Null.
    fn acc(&self) -> Arg {
        self.acc.map(|i| Arg::Value(self.node.inputs[i])).unwrap_or(Arg::Null)
    }
}
