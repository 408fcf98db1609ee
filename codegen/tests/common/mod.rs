//! Hand-built IR nodes for the codegen tests: every forward op of a configuration, its `vjp`
//! (all differentiable outputs seeded, and each multi-output op also with one seed at a time)
//! and `add` nodes, with fresh value ids (inputs first, then outputs).
#![allow(dead_code)]

use vpmoe_ir::{Attn, AttnKind, DType, GroupLimit, Node, Op, TensorType, ValueId, Vjp};

pub struct Cfg {
    pub name: &'static str,
    pub vocab: u64,
    pub hidden: u64,
    pub heads: u64,
    pub groups: u64,
    pub head_dim: u64,
    pub q_rank: u64,
    pub kv_rank: u64,
    pub ffn: u64,
    pub shared: u64,
    pub experts: u64,
    pub topk: u64,
    pub window: u64,
    pub group_limit: Option<GroupLimit>,
    pub bias: bool,
}

/// A shipped architecture's shapes, read from its TOML (the reference schema's keys).
pub fn shipped(name: &'static str, rel: &str) -> Cfg {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    let doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let get = |sec: &str, key: &str| doc[sec][key].clone();
    let int = |sec: &str, key: &str| get(sec, key).as_integer().unwrap_or_else(|| panic!("{rel}: {sec}.{key}")) as u64;
    let groups = int("moe", "router_num_groups");
    Cfg {
        name,
        vocab: int("tokenizer", "vocab_size"),
        hidden: int("model", "hidden_size"),
        heads: int("model", "num_attention_heads"),
        groups: int("model", "num_query_groups"),
        head_dim: int("model", "head_dim"),
        q_rank: int("tpa", "tpa_q_rank"),
        kv_rank: int("tpa", "tpa_rank"),
        ffn: int("model", "ffn_hidden_size"),
        shared: int("moe", "shared_expert_size"),
        experts: int("moe", "num_experts"),
        topk: int("moe", "topk"),
        window: int("attention", "window_size"),
        group_limit: (groups > 1).then(|| GroupLimit { groups, group_topk: int("moe", "router_group_topk") }),
        bias: get("model", "add_bias_linear").as_bool().unwrap(),
    }
}

/// The locked configuration (configs/vpmoe.toml).
pub fn locked() -> Cfg {
    shipped("locked", "configs/vpmoe.toml")
}

/// Small configurations: vocab 512, hidden 32, head_dim 16, 4..8 experts, top-2 (one with
/// biases and group limiting, one without either), and configs/small.toml's
/// shapes.
pub fn smalls() -> Vec<Cfg> {
    vec![
        Cfg {
            name: "small-a",
            vocab: 512,
            hidden: 32,
            heads: 4,
            groups: 2,
            head_dim: 16,
            q_rank: 4,
            kv_rank: 2,
            ffn: 32,
            shared: 64,
            experts: 8,
            topk: 2,
            window: 32,
            group_limit: Some(GroupLimit { groups: 4, group_topk: 1 }),
            bias: true,
        },
        Cfg {
            name: "small-b",
            vocab: 512,
            hidden: 32,
            heads: 2,
            groups: 1,
            head_dim: 16,
            q_rank: 2,
            kv_rank: 1,
            ffn: 16,
            shared: 48,
            experts: 4,
            topk: 2,
            window: 8,
            group_limit: None,
            bias: false,
        },
        shipped("small.toml", "configs/small.toml"),
    ]
}

/// Every forward op kind of a configuration (both attention kinds, dense and shared MLPs).
pub fn forward_ops(c: &Cfg) -> Vec<Op> {
    let attn = |kind, sinks| Attn { heads: c.heads, groups: c.groups, head_dim: c.head_dim, kind, sinks };
    vec![
        Op::Embedding { vocab: c.vocab, hidden: c.hidden },
        Op::RmsNorm { dim: c.hidden, eps: 1e-5 },
        Op::QkvProj { hidden: c.hidden, heads: c.heads, groups: c.groups, head_dim: c.head_dim, bias: c.bias },
        Op::TpaQkv {
            hidden: c.hidden,
            heads: c.heads,
            groups: c.groups,
            head_dim: c.head_dim,
            q_rank: c.q_rank,
            kv_rank: c.kv_rank,
            bias: c.bias,
        },
        Op::QkNorm { heads: c.heads, groups: c.groups, head_dim: c.head_dim, eps: 1e-5 },
        Op::GrapeM { heads: c.heads, groups: c.groups, head_dim: c.head_dim, log_freq_scale: 16.0 },
        Op::ValueResidual { groups: c.groups, head_dim: c.head_dim },
        Op::Attention(attn(AttnKind::Window(c.window), true)),
        Op::Attention(attn(AttnKind::Global { alibi: true }, true)),
        Op::Attention(attn(AttnKind::Global { alibi: false }, false)),
        Op::OutProj { in_dim: c.heads * c.head_dim, hidden: c.hidden, bias: c.bias },
        Op::Mlp { hidden: c.hidden, ffn: c.ffn, bias: c.bias, residual: true },
        Op::Mlp { hidden: c.hidden, ffn: c.shared, bias: c.bias, residual: false },
        Op::Router {
            hidden: c.hidden,
            experts: c.experts,
            topk: c.topk,
            group_limit: c.group_limit,
            scale: 2.5,
            expert_bias: true,
            bias: c.bias,
        },
        Op::Router {
            hidden: c.hidden,
            experts: c.experts,
            topk: c.topk,
            group_limit: None,
            scale: 1.0,
            expert_bias: false,
            bias: !c.bias,
        },
        Op::Dispatch { experts: c.experts, topk: c.topk },
        Op::ExpertFfn { hidden: c.hidden, ffn: c.ffn, experts: c.experts, topk: c.topk, bias: c.bias },
        Op::Combine { hidden: c.hidden, topk: c.topk, shared: true },
        Op::Combine { hidden: c.hidden, topk: c.topk, shared: false },
        Op::SeqAuxLoss { experts: c.experts, topk: c.topk },
        Op::HeadCe { hidden: c.hidden, vocab: c.vocab },
        Op::TokenWeight,
        Op::SpanLoss,
        // The decode program's ops.
        Op::GrapeMAt { heads: c.heads, groups: c.groups, head_dim: c.head_dim, log_freq_scale: 16.0 },
        Op::CachedAttention { attn: attn(AttnKind::Window(c.window), true), layer: 0 },
        Op::CachedAttention { attn: attn(AttnKind::Global { alibi: true }, true), layer: 1 },
        Op::CachedAttention { attn: attn(AttnKind::Global { alibi: false }, false), layer: 2 },
        Op::Logits { hidden: c.hidden, vocab: c.vocab },
    ]
}

/// A node of `op` with fresh value ids: inputs 0.., then outputs.
pub fn node_of(name: String, op: Op) -> Node {
    let (ins, outs) = op.signature();
    let n = ins.len() as u32;
    Node { name, op, inputs: (0..n).map(ValueId).collect(), outputs: (n..n + outs.len() as u32).map(ValueId).collect() }
}

/// The vjp nodes of a forward op: all differentiable outputs seeded, plus (for ops with several
/// differentiable outputs) each one alone, plus (ops that accumulate) all seeded with a running
/// input gradient (`Vjp::acc`). None for ops nothing is differentiated through.
pub fn vjps_of(op: &Op) -> Vec<Node> {
    let g = op.grad_outs();
    if !g.iter().any(|&x| x) {
        return vec![];
    }
    let mut seeds = vec![g.clone()];
    if g.iter().filter(|&&x| x).count() > 1 {
        for (i, &d) in g.iter().enumerate() {
            if d {
                seeds.push((0..g.len()).map(|j| j == i).collect());
            }
        }
    }
    let mut cases: Vec<(Vec<bool>, bool)> = seeds.into_iter().map(|s| (s, false)).collect();
    if op.accumulates() {
        cases.push((g.clone(), true));
    }
    cases
        .into_iter()
        .map(|(s, acc)| {
            let tag: String = s.iter().map(|&b| if b { '1' } else { '0' }).collect();
            let tag = if acc { format!("{tag} acc") } else { tag };
            node_of(format!("{}.bwd[{tag}]", op.name()), Op::Vjp(Box::new(Vjp { of: op.clone(), seeds: s, acc })))
        })
        .collect()
}

/// `add` nodes over the gradient types that fan in (bf16 activations, f32 parameters), with
/// 1..=9 inputs (chunks of four chain through the f32 scratch).
pub fn add_nodes(c: &Cfg) -> Vec<Node> {
    let tys = [
        TensorType::tok(DType::Bf16, &[c.hidden]),
        TensorType::tok(DType::Bf16, &[c.groups, c.head_dim]),
        TensorType::fixed(DType::F32, &[c.hidden, c.hidden]),
        TensorType::fixed(DType::F32, &[c.head_dim / 2]),
        TensorType::scalar(DType::F32),
        TensorType::tok(DType::F32, &[c.experts]),
    ];
    let mut v = Vec::new();
    for ty in tys {
        for n in [1u64, 2, 4, 5, 9] {
            v.push(node_of(format!("add{n} {ty}"), Op::Add { n, ty: ty.clone() }));
        }
    }
    v
}

/// Every node the tests lower for a configuration: forward ops, their vjps, adds.
pub fn all_nodes(c: &Cfg) -> Vec<Node> {
    let mut v = Vec::new();
    for op in forward_ops(c) {
        v.push(node_of(op.name().to_string(), op.clone()));
        v.extend(vjps_of(&op));
    }
    v.extend(add_nodes(c));
    v
}
