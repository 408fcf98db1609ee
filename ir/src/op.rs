//! The closed set of fused ops. Attributes fully determine every input and output type, so the
//! verifier checks a node by comparing the graph's types with [`Op::signature`].
//! Semantics (MODEL.md §4) live in [`crate::reference`].

use crate::types::{DType, TensorType};
use serde::{Deserialize, Serialize};

/// Attention mask family. Both families also mask across documents (D5) and are causal.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum AttnKind {
    /// Sliding window of `W` keys including the query itself (`i − j < W`).
    Window(u64),
    /// Full causal attention, optionally with ALiBi (GRAPE-A) slopes `2^-(h+1)`.
    Global { alibi: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attn {
    pub heads: u64,
    pub groups: u64,
    pub head_dim: u64,
    pub kind: AttnKind,
    /// Learnable per-head sink logit (`softmax_type = "learnable"`).
    pub sinks: bool,
}

/// Group-limited routing: experts split into `groups` contiguous groups; the `group_topk` groups
/// with the largest sum of their top `topk/group_topk` biased scores stay eligible.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupLimit {
    pub groups: u64,
    pub group_topk: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// `h[t] = table[tokens[t]]`.
    Embedding { vocab: u64, hidden: u64 },
    /// `y = x / sqrt(mean(x²) + eps) ⊙ w` over the last dim.
    RmsNorm { dim: u64, eps: f32 },
    /// Plain QKV linear into the group-interleaved layout, split into q, k, v.
    QkvProj { hidden: u64, heads: u64, groups: u64, head_dim: u64, bias: bool },
    /// Tensor-product attention QKV (six bias-free factor linears, bias on the packed result).
    TpaQkv { hidden: u64, heads: u64, groups: u64, head_dim: u64, q_rank: u64, kv_rank: u64, bias: bool },
    /// Per-head RMSNorm of q and k with one weight each shared by all heads.
    QkNorm { heads: u64, groups: u64, head_dim: u64, eps: f32 },
    /// GRAPE-M rotation (rotate-half) of q and k with learnable log-frequencies `f = exp(l/scale)`.
    GrapeM { heads: u64, groups: u64, head_dim: u64, log_freq_scale: f32 },
    /// `v ← λ·v + (1−λ)·v₁`, `λ = sigmoid(logit)` in f32 (D2).
    ValueResidual { groups: u64, head_dim: u64 },
    /// Causal attention with document masking, optional window/ALiBi/sinks.
    Attention(Attn),
    /// `h' = resid + ctx·Wᵀ + b`.
    OutProj { in_dim: u64, hidden: u64, bias: bool },
    /// `out = [resid +] ReLU²(m·W₁ᵀ + b₁)·W₂ᵀ + b₂` (dense FFN and shared expert).
    Mlp { hidden: u64, ffn: u64, bias: bool, residual: bool },
    /// Sigmoid router: selection on `σ + expert_bias` (group-limited), gates `scale·σ/Σσ`.
    Router {
        hidden: u64,
        experts: u64,
        topk: u64,
        group_limit: Option<GroupLimit>,
        scale: f32,
        expert_bias: bool,
        bias: bool,
    },
    /// The expert-major permutation of the routing slots (ascending token order within an
    /// expert): `src[r]` is the token of permuted row r, `row[t·K+k]` the permuted row of token
    /// t's k-th choice, `offsets` the per-expert row ranges. Tokens are not copied.
    Dispatch { experts: u64, topk: u64 },
    /// Grouped expert GEMMs on ragged per-expert row ranges, reading token rows through the
    /// permutation: `yp[r] = ReLU²(x[src[r]]·W₁ₑᵀ + b₁ₑ)·W₂ₑᵀ + b₂ₑ`; its x-gradient sums each
    /// token's K rows (`row`).
    ExpertFfn { hidden: u64, ffn: u64, experts: u64, topk: u64, bias: bool },
    /// `h' = resid + Σ_k gate[t,k]·yp[row[t·K+k]] [+ shared]`.
    Combine { hidden: u64, topk: u64, shared: bool },
    /// Sequence-level load-balancing loss (MODEL.md §4.10) without its coefficient.
    SeqAuxLoss { experts: u64, topk: u64 },
    /// LM head fused with the per-token cross-entropy: with `logits_t = z_t·Wᵀ` (f32, never
    /// stored), `token_loss_t = (lse_t − logits_t[label_t])·mask_t` and `lse_t` (0 where masked),
    /// which the backward reads to recompute the softmax instead of keeping `[T, vocab]` logits.
    HeadCe { hidden: u64, vocab: u64 },
    /// The weight of each token's loss in the objective, by `teacher_t`:
    /// 0 → 1 (plain CE);
    /// 1 → `clip(exp((teacher_logp_t − m)/T), w_min, w_max)` (stage 2's confidence, DISTILL.md 2B);
    /// 2 → `min(exp(lp_t − sampler_logp_t), c)·(teacher_logp_t − lp_t)` with the student's
    ///     `lp_t = −token_loss_t` at the current weights (stage 3's OPD advantage with its
    ///     truncated importance ratio).
    /// `kd = [m, T, w_min, w_max, c]` are runtime scalars. A stop-gradient: nothing is
    /// differentiated through it, `token_loss` included.
    TokenWeight,
    /// The span-normalised objective (D6): `loss = Σ_t token_loss_t·scale[span_t]·weight_t`.
    SpanLoss,
    /// Sum of `n` gradient contributions of one type (fan-in of a value read by several nodes).
    Add { n: u64, ty: TensorType },
    /// Decode: GRAPE-M rotation of each token by its position in its sequence (`pos`), the
    /// rotation of [`Op::GrapeM`].
    GrapeMAt { heads: u64, groups: u64, head_dim: u64, log_freq_scale: f32 },
    /// Decode: attention over cache `layer`. Each token's K and V are written to the cache at
    /// (`slot`, `pos`) in token order, then the token attends over the keys of its sequence it
    /// may see, as [`Op::Attention`] does within a document; tokens of one slot come in
    /// ascending positions that continue what the slot holds. The cache persists across calls.
    CachedAttention { attn: Attn, layer: u32 },
    /// Decode: `logits_t = z_t·Wᵀ` in f32, the product [`Op::HeadCe`] never stores.
    Logits { hidden: u64, vocab: u64 },
    /// Vector–Jacobian product of a forward op, emitted by autodiff (semantics:
    /// `crate::backward`). Inputs: the forward op's inputs, its outputs, then the upstream
    /// gradient of each seeded output; outputs: the gradient of each differentiable input.
    Vjp(Box<Vjp>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vjp {
    pub of: Op,
    /// Per forward output: whether an upstream gradient is supplied (absent ones are zero).
    pub seeds: Vec<bool>,
    /// A running gradient of forward input 0 is supplied as the last input, and the node's
    /// first output is that plus this op's contribution (summed in f32, rounded once). Autodiff
    /// folds a value's earlier gradient contribution in this way instead of an `add` node; only
    /// ops with [`Op::accumulates`] take it.
    pub acc: bool,
}

/// A gradient's type: activation gradients keep the activation dtype; parameter and scalar
/// gradients are f32 (D9: gradients accumulate in fp32).
pub fn grad_type(ty: &TensorType) -> TensorType {
    if ty.scales_with_tokens() {
        ty.clone()
    } else {
        TensorType { dtype: DType::F32, dims: ty.dims.clone() }
    }
}

/// Named, typed input or output of an op.
pub type Port = (&'static str, TensorType);

fn act(rest: &[u64]) -> TensorType {
    TensorType::tok(DType::Bf16, rest)
}
fn w(dims: &[u64]) -> TensorType {
    TensorType::fixed(DType::Bf16, dims)
}

impl Op {
    /// Op name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embedding { .. } => "embedding",
            Op::RmsNorm { .. } => "rms_norm",
            Op::QkvProj { .. } => "qkv_proj",
            Op::TpaQkv { .. } => "tpa_qkv",
            Op::QkNorm { .. } => "qk_norm",
            Op::GrapeM { .. } => "grape_m",
            Op::ValueResidual { .. } => "value_residual",
            Op::Attention(a) => match a.kind {
                AttnKind::Window(_) => "window_attention",
                AttnKind::Global { .. } => "global_attention",
            },
            Op::OutProj { .. } => "out_proj",
            Op::Mlp { .. } => "mlp",
            Op::Router { .. } => "router",
            Op::Dispatch { .. } => "dispatch",
            Op::ExpertFfn { .. } => "expert_ffn",
            Op::Combine { .. } => "combine",
            Op::SeqAuxLoss { .. } => "seq_aux_loss",
            Op::HeadCe { .. } => "head_ce",
            Op::TokenWeight => "token_weight",
            Op::SpanLoss => "span_loss",
            Op::Add { .. } => "add",
            Op::GrapeMAt { .. } => "grape_m_at",
            Op::CachedAttention { attn, .. } => match attn.kind {
                AttnKind::Window(_) => "cached_window_attention",
                AttnKind::Global { .. } => "cached_global_attention",
            },
            Op::Logits { .. } => "logits",
            Op::Vjp(_) => "vjp",
        }
    }

    /// The input ports whose gradient is exactly output 0's upstream gradient (residuals added
    /// to the output). The op's vjp does not output them: autodiff passes the upstream gradient
    /// itself on as each one's gradient contribution, so no kernel copies it.
    pub fn passthrough(&self) -> Vec<usize> {
        match *self {
            Op::OutProj { .. } | Op::Mlp { residual: true, .. } => vec![self.signature().0.len() - 1],
            // resid, and the shared expert's output when there is one.
            Op::Combine { shared, .. } => (3..4 + shared as usize).collect(),
            _ => vec![],
        }
    }

    /// Whether the op's vjp can add its input-0 gradient into a supplied running gradient
    /// ([`Vjp::acc`]): the ops whose last input-gradient kernel writes it row by row from an f32
    /// value (rmsnorm_bwd; expert_ffn's moe_gather; the router's gemm_nn epilogue).
    pub fn accumulates(&self) -> bool {
        matches!(self, Op::RmsNorm { .. } | Op::Router { .. } | Op::ExpertFfn { .. })
    }

    /// Per input port: whether the op is differentiable in it (float data that is not a routing
    /// decision, a mask or a loss weight).
    pub fn grad_ins(&self) -> Vec<bool> {
        let (ins, _) = self.signature();
        let mut g: Vec<bool> = ins.iter().map(|(_, ty)| matches!(ty.dtype, DType::F32 | DType::Bf16)).collect();
        match *self {
            Op::Router { expert_bias: true, .. } => *g.last_mut().unwrap() = false,
            Op::SpanLoss => (g[2], g[3]) = (false, false),
            Op::TokenWeight | Op::Vjp(_) => g.iter_mut().for_each(|x| *x = false),
            _ if self.decode_only() => g.iter_mut().for_each(|x| *x = false),
            _ => {}
        }
        g
    }

    /// The ops of the decode program only (`compiler::decode`): never differentiated.
    pub fn decode_only(&self) -> bool {
        matches!(self, Op::GrapeMAt { .. } | Op::CachedAttention { .. } | Op::Logits { .. })
    }

    /// Whether the op has an effect beyond its outputs (cached attention writes its cache), so
    /// it runs even when its outputs are not read.
    pub fn writes_cache(&self) -> bool {
        matches!(self, Op::CachedAttention { .. })
    }

    /// Per output port: whether a gradient can flow back through it (`lse` is the backward's
    /// saved statistic).
    pub fn grad_outs(&self) -> Vec<bool> {
        let (_, outs) = self.signature();
        let mut g: Vec<bool> = outs.iter().map(|(_, ty)| matches!(ty.dtype, DType::F32 | DType::Bf16)).collect();
        match *self {
            Op::HeadCe { .. } => g[1] = false,
            Op::TokenWeight | Op::Vjp(_) => g.iter_mut().for_each(|x| *x = false),
            _ if self.decode_only() => g.iter_mut().for_each(|x| *x = false),
            _ => {}
        }
        g
    }

    /// Attributes in print order.
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        let b = |v: &bool| v.to_string();
        match self {
            Op::Embedding { vocab, hidden } => vec![("vocab", vocab.to_string()), ("hidden", hidden.to_string())],
            Op::RmsNorm { dim, eps } => vec![("dim", dim.to_string()), ("eps", format!("{eps:?}"))],
            Op::QkvProj { hidden, heads, groups, head_dim, bias } => vec![
                ("hidden", hidden.to_string()),
                ("heads", heads.to_string()),
                ("groups", groups.to_string()),
                ("head_dim", head_dim.to_string()),
                ("bias", b(bias)),
            ],
            Op::TpaQkv { hidden, heads, groups, head_dim, q_rank, kv_rank, bias } => vec![
                ("hidden", hidden.to_string()),
                ("heads", heads.to_string()),
                ("groups", groups.to_string()),
                ("head_dim", head_dim.to_string()),
                ("q_rank", q_rank.to_string()),
                ("kv_rank", kv_rank.to_string()),
                ("bias", b(bias)),
            ],
            Op::QkNorm { heads, groups, head_dim, eps } => vec![
                ("heads", heads.to_string()),
                ("groups", groups.to_string()),
                ("head_dim", head_dim.to_string()),
                ("eps", format!("{eps:?}")),
            ],
            Op::GrapeM { heads, groups, head_dim, log_freq_scale }
            | Op::GrapeMAt { heads, groups, head_dim, log_freq_scale } => vec![
                ("heads", heads.to_string()),
                ("groups", groups.to_string()),
                ("head_dim", head_dim.to_string()),
                ("log_freq_scale", format!("{log_freq_scale:?}")),
            ],
            Op::ValueResidual { groups, head_dim } => {
                vec![("groups", groups.to_string()), ("head_dim", head_dim.to_string())]
            }
            Op::Attention(a) => attn_attrs(a),
            Op::CachedAttention { attn, layer } => {
                let mut v = vec![("layer", layer.to_string())];
                v.extend(attn_attrs(attn));
                v
            }
            Op::OutProj { in_dim, hidden, bias } => {
                vec![("in", in_dim.to_string()), ("hidden", hidden.to_string()), ("bias", b(bias))]
            }
            Op::Mlp { hidden, ffn, bias, residual } => vec![
                ("hidden", hidden.to_string()),
                ("ffn", ffn.to_string()),
                ("bias", b(bias)),
                ("residual", b(residual)),
            ],
            Op::Router { hidden, experts, topk, group_limit, scale, expert_bias, bias } => {
                let mut v =
                    vec![("hidden", hidden.to_string()), ("experts", experts.to_string()), ("topk", topk.to_string())];
                if let Some(g) = group_limit {
                    v.push(("groups", g.groups.to_string()));
                    v.push(("group_topk", g.group_topk.to_string()));
                }
                v.push(("scale", format!("{scale:?}")));
                v.push(("expert_bias", b(expert_bias)));
                v.push(("bias", b(bias)));
                v
            }
            Op::Dispatch { experts, topk } => vec![("experts", experts.to_string()), ("topk", topk.to_string())],
            Op::ExpertFfn { hidden, ffn, experts, topk, bias } => vec![
                ("hidden", hidden.to_string()),
                ("ffn", ffn.to_string()),
                ("experts", experts.to_string()),
                ("topk", topk.to_string()),
                ("bias", b(bias)),
            ],
            Op::Combine { hidden, topk, shared } => {
                vec![("hidden", hidden.to_string()), ("topk", topk.to_string()), ("shared", b(shared))]
            }
            Op::SeqAuxLoss { experts, topk } => {
                vec![("experts", experts.to_string()), ("topk", topk.to_string())]
            }
            Op::HeadCe { hidden, vocab } | Op::Logits { hidden, vocab } => {
                vec![("hidden", hidden.to_string()), ("vocab", vocab.to_string())]
            }
            Op::TokenWeight | Op::SpanLoss => vec![],
            Op::Add { n, ref ty } => vec![("n", n.to_string()), ("ty", ty.to_string())],
            Op::Vjp(ref v) => {
                let mut a = vec![("of", v.of.name().to_string())];
                a.extend(v.of.attrs());
                a.push(("seeds", v.seeds.iter().map(|&s| if s { '1' } else { '0' }).collect()));
                if v.acc {
                    a.push(("acc", b(&true)));
                }
                a
            }
        }
    }

    /// Input and output ports. Optional inputs (biases, residuals) appear only when the
    /// attributes ask for them, in the order listed here.
    pub fn signature(&self) -> (Vec<Port>, Vec<Port>) {
        use DType::*;
        match *self {
            Op::Embedding { vocab, hidden } => (
                vec![("tokens", TensorType::tok(I32, &[])), ("table", w(&[vocab, hidden]))],
                vec![("h", act(&[hidden]))],
            ),
            Op::RmsNorm { dim, .. } => (vec![("x", act(&[dim])), ("weight", w(&[dim]))], vec![("y", act(&[dim]))]),
            Op::QkvProj { hidden, heads, groups, head_dim, bias } => {
                let n = (heads + 2 * groups) * head_dim;
                let mut ins = vec![("x", act(&[hidden])), ("weight", w(&[n, hidden]))];
                if bias {
                    ins.push(("bias", w(&[n])));
                }
                (ins, qkv_outs(heads, groups, head_dim))
            }
            Op::TpaQkv { hidden, heads, groups, head_dim, q_rank, kv_rank, bias } => {
                let n = (heads + 2 * groups) * head_dim;
                let mut ins = vec![
                    ("x", act(&[hidden])),
                    ("a_q", w(&[heads * q_rank, hidden])),
                    ("a_k", w(&[groups * kv_rank, hidden])),
                    ("a_v", w(&[groups * kv_rank, hidden])),
                    ("b_q", w(&[q_rank * head_dim, hidden])),
                    ("b_k", w(&[kv_rank * head_dim, hidden])),
                    ("b_v", w(&[kv_rank * head_dim, hidden])),
                ];
                if bias {
                    ins.push(("bias", w(&[n])));
                }
                (ins, qkv_outs(heads, groups, head_dim))
            }
            Op::QkNorm { heads, groups, head_dim, .. } => (
                vec![
                    ("q", act(&[heads, head_dim])),
                    ("k", act(&[groups, head_dim])),
                    ("q_weight", w(&[head_dim])),
                    ("k_weight", w(&[head_dim])),
                ],
                vec![("q", act(&[heads, head_dim])), ("k", act(&[groups, head_dim]))],
            ),
            Op::GrapeM { heads, groups, head_dim, .. } => (
                vec![
                    ("q", act(&[heads, head_dim])),
                    ("k", act(&[groups, head_dim])),
                    ("log_freq", TensorType::fixed(F32, &[head_dim / 2])),
                ],
                vec![("q", act(&[heads, head_dim])), ("k", act(&[groups, head_dim]))],
            ),
            Op::GrapeMAt { heads, groups, head_dim, .. } => (
                vec![
                    ("q", act(&[heads, head_dim])),
                    ("k", act(&[groups, head_dim])),
                    ("log_freq", TensorType::fixed(F32, &[head_dim / 2])),
                    ("pos", TensorType::tok(I32, &[])),
                ],
                vec![("q", act(&[heads, head_dim])), ("k", act(&[groups, head_dim]))],
            ),
            Op::CachedAttention { attn: a, .. } => {
                let mut ins = vec![
                    ("q", act(&[a.heads, a.head_dim])),
                    ("k", act(&[a.groups, a.head_dim])),
                    ("v", act(&[a.groups, a.head_dim])),
                    ("pos", TensorType::tok(I32, &[])),
                    ("slot", TensorType::tok(I32, &[])),
                ];
                if a.sinks {
                    ins.push(("sinks", TensorType::fixed(F32, &[a.heads])));
                }
                (ins, vec![("ctx", act(&[a.heads * a.head_dim]))])
            }
            Op::Logits { hidden, vocab } => (
                vec![("z", act(&[hidden])), ("head", w(&[vocab, hidden]))],
                vec![("logits", TensorType::tok(F32, &[vocab]))],
            ),
            Op::ValueResidual { groups, head_dim } => (
                vec![
                    ("v", act(&[groups, head_dim])),
                    ("v1", act(&[groups, head_dim])),
                    ("logit", TensorType::scalar(F32)),
                ],
                vec![("v", act(&[groups, head_dim]))],
            ),
            Op::Attention(a) => {
                let mut ins = vec![
                    ("q", act(&[a.heads, a.head_dim])),
                    ("k", act(&[a.groups, a.head_dim])),
                    ("v", act(&[a.groups, a.head_dim])),
                    ("doc", TensorType::tok(I32, &[])),
                ];
                if a.sinks {
                    ins.push(("sinks", TensorType::fixed(F32, &[a.heads])));
                }
                (ins, vec![("ctx", act(&[a.heads * a.head_dim]))])
            }
            Op::OutProj { in_dim, hidden, bias } => {
                let mut ins = vec![("ctx", act(&[in_dim])), ("weight", w(&[hidden, in_dim]))];
                if bias {
                    ins.push(("bias", w(&[hidden])));
                }
                ins.push(("resid", act(&[hidden])));
                (ins, vec![("h", act(&[hidden]))])
            }
            Op::Mlp { hidden, ffn, bias, residual } => {
                let mut ins = vec![("x", act(&[hidden])), ("fc1", w(&[ffn, hidden]))];
                if bias {
                    ins.push(("fc1_bias", w(&[ffn])));
                }
                ins.push(("fc2", w(&[hidden, ffn])));
                if bias {
                    ins.push(("fc2_bias", w(&[hidden])));
                }
                if residual {
                    ins.push(("resid", act(&[hidden])));
                }
                (ins, vec![("y", act(&[hidden]))])
            }
            Op::Router { hidden, experts, topk, expert_bias, bias, .. } => {
                let mut ins = vec![("x", act(&[hidden])), ("weight", w(&[experts, hidden]))];
                if bias {
                    ins.push(("bias", w(&[experts])));
                }
                if expert_bias {
                    ins.push(("expert_bias", TensorType::fixed(F32, &[experts])));
                }
                (
                    ins,
                    vec![
                        ("idx", TensorType::tok(I32, &[topk])),
                        ("gate", TensorType::tok(F32, &[topk])),
                        ("scores", TensorType::tok(F32, &[experts])),
                    ],
                )
            }
            Op::Dispatch { experts, topk } => (
                vec![("idx", TensorType::tok(I32, &[topk]))],
                vec![
                    ("src", TensorType::tok_k(I32, topk, &[])),
                    ("row", TensorType::tok_k(I32, topk, &[])),
                    ("offsets", TensorType::fixed(I32, &[experts + 1])),
                ],
            ),
            Op::ExpertFfn { hidden, ffn, experts, topk, bias } => {
                let mut ins = vec![
                    ("x", act(&[hidden])),
                    ("src", TensorType::tok_k(I32, topk, &[])),
                    ("row", TensorType::tok_k(I32, topk, &[])),
                    ("offsets", TensorType::fixed(I32, &[experts + 1])),
                    ("fc1", w(&[experts, ffn, hidden])),
                ];
                if bias {
                    ins.push(("fc1_bias", w(&[experts, ffn])));
                }
                ins.push(("fc2", w(&[experts, hidden, ffn])));
                if bias {
                    ins.push(("fc2_bias", w(&[experts, hidden])));
                }
                (ins, vec![("yp", TensorType::tok_k(Bf16, topk, &[hidden]))])
            }
            Op::Combine { hidden, topk, shared } => {
                let mut ins = vec![
                    ("yp", TensorType::tok_k(Bf16, topk, &[hidden])),
                    ("row", TensorType::tok_k(I32, topk, &[])),
                    ("gate", TensorType::tok(F32, &[topk])),
                    ("resid", act(&[hidden])),
                ];
                if shared {
                    ins.push(("shared", act(&[hidden])));
                }
                (ins, vec![("h", act(&[hidden]))])
            }
            Op::SeqAuxLoss { experts, .. } => {
                (vec![("scores", TensorType::tok(F32, &[experts]))], vec![("aux", TensorType::scalar(F32))])
            }
            Op::HeadCe { hidden, vocab } => (
                vec![
                    ("z", act(&[hidden])),
                    ("head", w(&[vocab, hidden])),
                    ("labels", TensorType::tok(I32, &[])),
                    ("loss_mask", TensorType::tok(U8, &[])),
                ],
                vec![("token_loss", TensorType::tok(F32, &[])), ("lse", TensorType::tok(F32, &[]))],
            ),
            Op::TokenWeight => (
                vec![
                    ("token_loss", TensorType::tok(F32, &[])),
                    ("teacher_logp", TensorType::tok(F32, &[])),
                    ("sampler_logp", TensorType::tok(F32, &[])),
                    ("teacher", TensorType::tok(U8, &[])),
                    ("kd", TensorType::fixed(F32, &[5])),
                ],
                vec![("weight", TensorType::tok(F32, &[]))],
            ),
            Op::SpanLoss => (
                vec![
                    ("token_loss", TensorType::tok(F32, &[])),
                    ("span", TensorType::tok(U8, &[])),
                    ("span_scale", TensorType::fixed(F32, &[3])),
                    ("weight", TensorType::tok(F32, &[])),
                ],
                vec![("loss", TensorType::scalar(F32))],
            ),
            Op::Add { n, ref ty } => (vec![("x", ty.clone()); n as usize], vec![("sum", ty.clone())]),
            Op::Vjp(ref v) => {
                let (fi, fo) = v.of.signature();
                let mut ins = fi.clone();
                ins.extend(fo.iter().cloned());
                for (p, s) in fo.iter().zip(&v.seeds) {
                    if *s {
                        ins.push((p.0, grad_type(&p.1)));
                    }
                }
                if v.acc {
                    assert!(v.of.accumulates(), "vjp of {}: acc on an op that cannot accumulate", v.of.name());
                    ins.push(("acc", grad_type(&fi[0].1)));
                }
                let pass = v.of.passthrough();
                let outs = fi
                    .iter()
                    .zip(v.of.grad_ins())
                    .enumerate()
                    .filter(|&(i, (_, g))| g && !pass.contains(&i))
                    .map(|(_, (p, _))| (p.0, grad_type(&p.1)));
                (ins, outs.collect())
            }
        }
    }

    /// Forward FLOPs for one sequence of `seq` tokens (GEMMs `2mkn`, attention `4·heads·d` per
    /// query–key pair with exact causal/window counting; elementwise work is not counted),
    /// following MODEL.md §10.
    pub fn flops_per_sequence(&self, seq: u64) -> u128 {
        let s = seq as u128;
        let gemm = |k: u64, n: u64| 2 * k as u128 * n as u128 * s;
        match *self {
            Op::QkvProj { hidden, heads, groups, head_dim, .. } => gemm(hidden, (heads + 2 * groups) * head_dim),
            Op::TpaQkv { hidden, heads, groups, head_dim, q_rank, kv_rank, .. } => {
                let factors = heads * q_rank + 2 * groups * kv_rank + (q_rank + 2 * kv_rank) * head_dim;
                let products = heads * q_rank * head_dim + 2 * groups * kv_rank * head_dim;
                gemm(hidden, factors) + 2 * products as u128 * s
            }
            Op::Attention(a) => {
                let pairs: u128 = match a.kind {
                    AttnKind::Window(wnd) => (0..seq).map(|i| (i + 1).min(wnd) as u128).sum(),
                    AttnKind::Global { .. } => s * (s + 1) / 2,
                };
                4 * (a.heads * a.head_dim) as u128 * pairs
            }
            Op::OutProj { in_dim, hidden, .. } => gemm(in_dim, hidden),
            Op::Mlp { hidden, ffn, .. } => 2 * gemm(hidden, ffn),
            Op::Router { hidden, experts, .. } => gemm(hidden, experts),
            Op::ExpertFfn { hidden, ffn, topk, .. } => topk as u128 * 2 * gemm(hidden, ffn),
            Op::HeadCe { hidden, vocab } => gemm(hidden, vocab),
            // A backward pass is two GEMMs per forward GEMM (input and weight gradients). Model
            // FLOPs: head_ce's backward also recomputes its logits, which MFU does not count.
            Op::Vjp(ref v) => 2 * v.of.flops_per_sequence(seq),
            _ => 0,
        }
    }
}

fn attn_attrs(a: &Attn) -> Vec<(&'static str, String)> {
    let mut v =
        vec![("heads", a.heads.to_string()), ("groups", a.groups.to_string()), ("head_dim", a.head_dim.to_string())];
    match a.kind {
        AttnKind::Window(wnd) => v.push(("window", wnd.to_string())),
        AttnKind::Global { alibi } => v.push(("alibi", alibi.to_string())),
    }
    v.push(("sinks", a.sinks.to_string()));
    v
}

fn qkv_outs(heads: u64, groups: u64, head_dim: u64) -> Vec<Port> {
    vec![("q", act(&[heads, head_dim])), ("k", act(&[groups, head_dim])), ("v", act(&[groups, head_dim]))]
}
