//! Kernel selection: how each IR op becomes launches of templated CUDA kernel families.
//!
//! A family is one `.cuh` template (`cuda/<family>.cuh`) defining
//! `vp::<family><TEMPLATE ARGS>(PARAMS…)` as a `__device__` function. A [`KernelSpec`] names one
//! instantiation; its deterministic name `vp_<family>_<args>` identifies it across layers, so the
//! kernel set depends on the architecture's shape families, never on the layer count.

use serde::{Deserialize, Serialize};
use vpmoe_ir::{AttnKind, DType, Node, Op, ValueId};

/// A kernel family's C parameter list (type, name) and template parameter names.
pub struct Family {
    pub name: &'static str,
    pub tparams: &'static [&'static str],
    pub params: &'static [(&'static str, &'static str)],
}

const BF: &str = "const __nv_bfloat16*";
const BFM: &str = "__nv_bfloat16*";

pub const FAMILIES: &[Family] = &[
    Family {
        name: "embed",
        tparams: &["H"],
        params: &[("const int*", "tokens"), (BF, "table"), (BFM, "out"), ("int", "T")],
    },
    Family {
        name: "rmsnorm",
        tparams: &["D"],
        params: &[(BF, "x"), (BF, "w"), (BFM, "y"), ("int", "rows"), ("float", "eps")],
    },
    Family {
        name: "gemm",
        tparams: &["N", "KD", "EPI", "OUT"],
        params: &[(BF, "x"), (BF, "w"), (BF, "bias"), (BF, "resid"), ("void*", "y"), ("int", "M"), ("int", "ldy")],
    },
    Family {
        name: "qkv_split",
        tparams: &["HEADS", "GROUPS", "D"],
        params: &[(BF, "mixed"), (BFM, "q"), (BFM, "k"), (BFM, "v"), ("int", "T")],
    },
    Family {
        name: "tpa_combine",
        tparams: &["HEADS", "GROUPS", "D", "RQ", "R"],
        params: &[(BF, "f"), (BF, "bias"), (BFM, "q"), (BFM, "k"), (BFM, "v"), ("int", "T")],
    },
    Family {
        name: "grape",
        tparams: &["D"],
        params: &[
            (BF, "x"),
            ("const float*", "log_freq"),
            (BFM, "y"),
            ("int", "heads"),
            ("int", "T"),
            ("int", "S"),
            ("float", "scale"),
        ],
    },
    Family {
        name: "vres",
        tparams: &[],
        params: &[(BF, "v"), (BF, "v1"), ("const float*", "logit"), (BFM, "y"), ("int", "n")],
    },
    Family {
        name: "attention",
        tparams: &["D", "HEADS", "GROUPS", "WINDOW", "ALIBI", "SINKS"],
        params: &[
            (BF, "q"),
            (BF, "k"),
            (BF, "v"),
            ("const int*", "doc"),
            ("const float*", "sinks"),
            (BFM, "out"),
            ("int", "T"),
            ("int", "S"),
        ],
    },
    Family {
        name: "router",
        tparams: &["E", "K", "GROUPS", "GTOPK", "EBIAS"],
        params: &[
            ("const float*", "logits"),
            ("const float*", "expert_bias"),
            ("int*", "idx"),
            ("float*", "gate"),
            ("float*", "scores"),
            ("int", "T"),
            ("float", "scale"),
        ],
    },
    Family {
        name: "moe_count",
        tparams: &["E", "K"],
        params: &[("const int*", "idx"), ("int*", "offsets"), ("int", "T")],
    },
    Family { name: "moe_scan", tparams: &["E"], params: &[("int*", "offsets")] },
    Family {
        name: "moe_scatter",
        tparams: &["H", "E", "K"],
        params: &[
            (BF, "x"),
            ("const int*", "idx"),
            ("const int*", "offsets"),
            (BFM, "xp"),
            ("int*", "row"),
            ("int", "T"),
        ],
    },
    Family {
        name: "grouped_gemm",
        tparams: &["N", "KD", "EPI", "E"],
        params: &[(BF, "x"), ("const int*", "offsets"), (BF, "w"), (BF, "bias"), (BFM, "y"), ("int", "rows")],
    },
    Family {
        name: "combine",
        tparams: &["H", "K", "SHARED"],
        params: &[
            (BF, "yp"),
            ("const int*", "row"),
            ("const float*", "gate"),
            (BF, "resid"),
            (BF, "shared"),
            (BFM, "out"),
            ("int", "T"),
        ],
    },
    Family {
        name: "seq_aux",
        tparams: &["E", "K"],
        params: &[("const float*", "scores"), ("float*", "partial"), ("int", "S")],
    },
    Family {
        name: "ce_rows",
        tparams: &["V"],
        params: &[
            ("const float*", "logits"),
            ("const int*", "labels"),
            ("const unsigned char*", "mask"),
            ("const unsigned char*", "span"),
            ("const float*", "scale"),
            ("float*", "token_loss"),
            ("float*", "weighted"),
            ("int", "T"),
        ],
    },
    Family {
        name: "sum",
        tparams: &[],
        params: &[("const float*", "x"), ("float*", "out"), ("int", "n"), ("float", "scale")],
    },
];

pub fn family(name: &str) -> &'static Family {
    FAMILIES.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("unknown kernel family {name}"))
}

/// GEMM epilogues (`EPI` template argument).
pub const EPI_NONE: u64 = 0;
pub const EPI_RELU2: u64 = 1;
pub const EPI_RESID: u64 = 2;

/// One instantiation of a family.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KernelSpec {
    pub family: String,
    pub targs: Vec<u64>,
}

impl KernelSpec {
    fn new(family: &str, targs: &[u64]) -> Self {
        assert_eq!(self::family(family).tparams.len(), targs.len(), "template arity of {family}");
        KernelSpec { family: family.to_string(), targs: targs.to_vec() }
    }
    /// Deterministic name: `vp_<family>_<TPARAM><value>…`, e.g. `vp_rmsnorm_D1024`.
    pub fn name(&self) -> String {
        let mut s = format!("vp_{}", self.family);
        for (p, v) in family(&self.family).tparams.iter().zip(&self.targs) {
            s.push_str(&format!("_{p}{v}"));
        }
        s
    }
}

/// A launch dimension: a constant, or `ceil(mul·T/div) + add`, or the row count `T/S`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchDim {
    Const(u64),
    Tok { mul: u64, div: u64, add: u64 },
    Rows,
}

impl LaunchDim {
    pub fn eval(self, tokens: u64, seq: u64) -> u64 {
        match self {
            LaunchDim::Const(n) => n,
            LaunchDim::Tok { mul, div, add } => (mul * tokens).div_ceil(div) + add,
            LaunchDim::Rows => tokens / seq,
        }
    }
}

/// A kernel argument, bound by the runtime at launch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arg {
    /// Device pointer to an IR value (input, parameter or node output).
    Value(ValueId),
    /// Device pointer into the node's scratch buffer `index`, `offset` elements in.
    Scratch {
        index: u32,
        offset: u64,
    },
    Null,
    /// `mul·T`.
    Tokens {
        mul: u64,
    },
    Seq,
    /// The row count `T/S`.
    Rows,
    /// `1/(T/S)`.
    InvRows,
    Int(i64),
    Float(f32),
}

/// Node-private temporary storage: `dtype[per_token·T + fixed]`, live only during the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scratch {
    pub dtype: DType,
    pub per_token: u64,
    pub fixed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub kernel: KernelSpec,
    pub args: Vec<Arg>,
    pub grid: [LaunchDim; 3],
    pub block: u32,
}

fn tok(mul: u64, div: u64) -> LaunchDim {
    LaunchDim::Tok { mul, div, add: 0 }
}
fn one() -> LaunchDim {
    LaunchDim::Const(1)
}
fn launch(kernel: KernelSpec, args: Vec<Arg>, grid: [LaunchDim; 3], block: u32) -> Launch {
    Launch { kernel, args, grid, block }
}
fn rows_grid(mul: u64) -> [LaunchDim; 3] {
    [tok(mul, 1), one(), one()]
}

/// Tile sizes of the GEMM templates (rows × cols per block).
pub const GEMM_TILE: u64 = 64;

#[allow(clippy::too_many_arguments)]
fn gemm(
    n: u64,
    kd: u64,
    epi: u64,
    out_f32: bool,
    m_mul: u64,
    x: Arg,
    w: Arg,
    bias: Arg,
    resid: Arg,
    y: Arg,
    ldy: u64,
) -> Launch {
    launch(
        KernelSpec::new("gemm", &[n, kd, epi, out_f32 as u64]),
        vec![x, w, bias, resid, y, Arg::Tokens { mul: m_mul }, Arg::Int(ldy as i64)],
        [tok(m_mul, GEMM_TILE), LaunchDim::Const(n.div_ceil(GEMM_TILE)), one()],
        128,
    )
}

/// The launches (in order) and scratch buffers of one node.
pub fn lower_node(node: &Node) -> (Vec<Launch>, Vec<Scratch>) {
    let i = |k: usize| Arg::Value(node.inputs[k]);
    let o = |k: usize| Arg::Value(node.outputs[k]);
    let opt = |present: bool, k: usize| if present { Arg::Value(node.inputs[k]) } else { Arg::Null };
    let s = |index: u32, offset: u64| Arg::Scratch { index, offset };
    let scratch = |dtype, per_token| Scratch { dtype, per_token, fixed: 0 };
    match node.op {
        Op::Embedding { hidden, .. } => (
            vec![launch(
                KernelSpec::new("embed", &[hidden]),
                vec![i(0), i(1), o(0), Arg::Tokens { mul: 1 }],
                rows_grid(1),
                128,
            )],
            vec![],
        ),
        Op::RmsNorm { dim, eps } => (
            vec![launch(
                KernelSpec::new("rmsnorm", &[dim]),
                vec![i(0), i(1), o(0), Arg::Tokens { mul: 1 }, Arg::Float(eps)],
                rows_grid(1),
                256,
            )],
            vec![],
        ),
        Op::QkNorm { heads, groups, head_dim, eps } => {
            let k = KernelSpec::new("rmsnorm", &[head_dim]);
            let l = |x, w, y, n| {
                launch(k.clone(), vec![x, w, y, Arg::Tokens { mul: n }, Arg::Float(eps)], rows_grid(n), 256)
            };
            (vec![l(i(0), i(2), o(0), heads), l(i(1), i(3), o(1), groups)], vec![])
        }
        Op::QkvProj { hidden, heads, groups, head_dim, bias } => {
            let n = (heads + 2 * groups) * head_dim;
            (
                vec![
                    gemm(n, hidden, EPI_NONE, false, 1, i(0), i(1), opt(bias, 2), Arg::Null, s(0, 0), n),
                    launch(
                        KernelSpec::new("qkv_split", &[heads, groups, head_dim]),
                        vec![s(0, 0), o(0), o(1), o(2), Arg::Tokens { mul: 1 }],
                        rows_grid(1),
                        128,
                    ),
                ],
                vec![scratch(DType::Bf16, n)],
            )
        }
        Op::TpaQkv { hidden, heads, groups, head_dim, q_rank, kv_rank, bias } => {
            let widths = [
                heads * q_rank,
                groups * kv_rank,
                groups * kv_rank,
                q_rank * head_dim,
                kv_rank * head_dim,
                kv_rank * head_dim,
            ];
            let total: u64 = widths.iter().sum();
            let mut launches = Vec::new();
            let mut off = 0;
            for (f, &wd) in widths.iter().enumerate() {
                launches.push(gemm(
                    wd,
                    hidden,
                    EPI_NONE,
                    false,
                    1,
                    i(0),
                    i(1 + f),
                    Arg::Null,
                    Arg::Null,
                    s(0, off),
                    total,
                ));
                off += wd;
            }
            launches.push(launch(
                KernelSpec::new("tpa_combine", &[heads, groups, head_dim, q_rank, kv_rank]),
                vec![s(0, 0), opt(bias, 7), o(0), o(1), o(2), Arg::Tokens { mul: 1 }],
                rows_grid(1),
                128,
            ));
            (launches, vec![scratch(DType::Bf16, total)])
        }
        Op::GrapeM { heads, groups, head_dim, log_freq_scale } => {
            let k = KernelSpec::new("grape", &[head_dim]);
            let l = |x, y, h| {
                launch(
                    k.clone(),
                    vec![x, i(2), y, Arg::Int(h as i64), Arg::Tokens { mul: 1 }, Arg::Seq, Arg::Float(log_freq_scale)],
                    rows_grid(1),
                    128,
                )
            };
            (vec![l(i(0), o(0), heads), l(i(1), o(1), groups)], vec![])
        }
        Op::ValueResidual { groups, head_dim } => (
            vec![launch(
                KernelSpec::new("vres", &[]),
                vec![i(0), i(1), i(2), o(0), Arg::Tokens { mul: groups * head_dim }],
                [tok(groups * head_dim, 256), one(), one()],
                256,
            )],
            vec![],
        ),
        Op::Attention(a) => {
            let (window, alibi) = match a.kind {
                AttnKind::Window(w) => (w, false),
                AttnKind::Global { alibi } => (0, alibi),
            };
            let k =
                KernelSpec::new("attention", &[a.head_dim, a.heads, a.groups, window, alibi as u64, a.sinks as u64]);
            (
                vec![launch(
                    k,
                    vec![i(0), i(1), i(2), i(3), opt(a.sinks, 4), o(0), Arg::Tokens { mul: 1 }, Arg::Seq],
                    [tok(1, 64), LaunchDim::Const(a.heads), one()],
                    128,
                )],
                vec![],
            )
        }
        Op::OutProj { in_dim, hidden, bias } => {
            let resid = node.inputs.len() - 1;
            (vec![gemm(hidden, in_dim, EPI_RESID, false, 1, i(0), i(1), opt(bias, 2), i(resid), o(0), hidden)], vec![])
        }
        Op::Mlp { hidden, ffn, bias, residual } => {
            let (b1, w2, b2) = if bias { (i(2), i(3), i(4)) } else { (Arg::Null, i(2), Arg::Null) };
            let (epi, resid) = if residual { (EPI_RESID, i(node.inputs.len() - 1)) } else { (EPI_NONE, Arg::Null) };
            (
                vec![
                    gemm(ffn, hidden, EPI_RELU2, false, 1, i(0), i(1), b1, Arg::Null, s(0, 0), ffn),
                    gemm(hidden, ffn, epi, false, 1, s(0, 0), w2, b2, resid, o(0), hidden),
                ],
                vec![scratch(DType::Bf16, ffn)],
            )
        }
        Op::Router { hidden, experts, topk, group_limit, scale, expert_bias, bias } => {
            let (groups, gtopk) = group_limit.map(|g| (g.groups, g.group_topk)).unwrap_or((0, 0));
            (
                vec![
                    gemm(experts, hidden, EPI_NONE, true, 1, i(0), i(1), opt(bias, 2), Arg::Null, s(0, 0), experts),
                    launch(
                        KernelSpec::new("router", &[experts, topk, groups, gtopk, expert_bias as u64]),
                        vec![
                            s(0, 0),
                            opt(expert_bias, 2 + bias as usize),
                            o(0),
                            o(1),
                            o(2),
                            Arg::Tokens { mul: 1 },
                            Arg::Float(scale),
                        ],
                        rows_grid(1),
                        256,
                    ),
                ],
                vec![scratch(DType::F32, experts)],
            )
        }
        Op::Dispatch { hidden, experts, topk } => (
            vec![
                launch(
                    KernelSpec::new("moe_count", &[experts, topk]),
                    vec![i(1), o(2), Arg::Tokens { mul: 1 }],
                    [LaunchDim::Const(experts), one(), one()],
                    256,
                ),
                launch(KernelSpec::new("moe_scan", &[experts]), vec![o(2)], [one(), one(), one()], 1024),
                launch(
                    KernelSpec::new("moe_scatter", &[hidden, experts, topk]),
                    vec![i(0), i(1), o(2), o(0), o(1), Arg::Tokens { mul: 1 }],
                    [LaunchDim::Const(experts), one(), one()],
                    256,
                ),
            ],
            vec![],
        ),
        Op::ExpertFfn { hidden, ffn, experts, topk, bias } => {
            let (b1, w2, b2) = if bias { (i(3), i(4), i(5)) } else { (Arg::Null, i(3), Arg::Null) };
            let grid = |n: u64| {
                [
                    LaunchDim::Tok { mul: topk, div: GEMM_TILE, add: experts },
                    LaunchDim::Const(n.div_ceil(GEMM_TILE)),
                    one(),
                ]
            };
            (
                vec![
                    launch(
                        KernelSpec::new("grouped_gemm", &[ffn, hidden, EPI_RELU2, experts]),
                        vec![i(0), i(1), i(2), b1, s(0, 0), Arg::Tokens { mul: topk }],
                        grid(ffn),
                        128,
                    ),
                    launch(
                        KernelSpec::new("grouped_gemm", &[hidden, ffn, EPI_NONE, experts]),
                        vec![s(0, 0), i(1), w2, b2, o(0), Arg::Tokens { mul: topk }],
                        grid(hidden),
                        128,
                    ),
                ],
                vec![scratch(DType::Bf16, topk * ffn)],
            )
        }
        Op::Combine { hidden, topk, shared } => (
            vec![launch(
                KernelSpec::new("combine", &[hidden, topk, shared as u64]),
                vec![i(0), i(1), i(2), i(3), opt(shared, 4), o(0), Arg::Tokens { mul: 1 }],
                rows_grid(1),
                128,
            )],
            vec![],
        ),
        Op::SeqAuxLoss { experts, topk } => (
            vec![
                launch(
                    KernelSpec::new("seq_aux", &[experts, topk]),
                    vec![i(0), s(0, 0), Arg::Seq],
                    [LaunchDim::Rows, one(), one()],
                    256,
                ),
                launch(
                    KernelSpec::new("sum", &[]),
                    vec![s(0, 0), o(0), Arg::Rows, Arg::InvRows],
                    [one(), one(), one()],
                    1024,
                ),
            ],
            vec![scratch(DType::F32, 1)],
        ),
        Op::LmHead { hidden, vocab } => {
            (vec![gemm(vocab, hidden, EPI_NONE, true, 1, i(0), i(1), Arg::Null, Arg::Null, o(0), vocab)], vec![])
        }
        Op::SpanCe { vocab } => (
            vec![
                launch(
                    KernelSpec::new("ce_rows", &[vocab]),
                    vec![i(0), i(1), i(2), i(3), i(4), o(1), s(0, 0), Arg::Tokens { mul: 1 }],
                    rows_grid(1),
                    256,
                ),
                launch(
                    KernelSpec::new("sum", &[]),
                    vec![s(0, 0), o(0), Arg::Tokens { mul: 1 }, Arg::Float(1.0)],
                    [one(), one(), one()],
                    1024,
                ),
            ],
            vec![scratch(DType::F32, 1)],
        ),
    }
}
