//! Kernel selection: how each IR op becomes launches of templated CUDA kernel families.
//!
//! A family is one `.cuh` template (`cuda/<family>.cuh`) defining
//! `vp::<family><TEMPLATE ARGS>(PARAMS…)` as a `__device__` function. A [`KernelSpec`] names one
//! instantiation; its deterministic name `vp_<family>_<args>` identifies it across layers, so the
//! kernel set depends on the architecture's shape families, never on the layer count.

use serde::{Deserialize, Serialize};
use vpmoe_ir::{AttnKind, DType, Node, Op, TensorType, ValueId, Vjp};

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
        name: "qk_norm",
        tparams: &["D"],
        params: &[
            (BF, "xq"),
            (BF, "xk"),
            (BF, "wq"),
            (BF, "wk"),
            (BFM, "yq"),
            (BFM, "yk"),
            ("int", "rows_q"),
            ("int", "rows_k"),
            ("float", "eps"),
        ],
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
        name: "tpa_proj",
        tparams: &["HEADS", "GROUPS", "D", "RQ", "R", "H"],
        params: &[
            (BF, "x"),
            (BF, "w_aq"),
            (BF, "w_ak"),
            (BF, "w_av"),
            (BF, "w_bq"),
            (BF, "w_bk"),
            (BF, "w_bv"),
            (BFM, "f"),
            ("int", "T"),
        ],
    },
    Family {
        name: "grape",
        tparams: &["D"],
        params: &[
            (BF, "xq"),
            (BF, "xk"),
            ("const float*", "log_freq"),
            (BFM, "yq"),
            (BFM, "yk"),
            ("int", "heads"),
            ("int", "groups"),
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
        params: &[("const int*", "idx"), ("int*", "offsets"), ("int", "T"), ("int*", "tickets")],
    },
    Family {
        name: "moe_scatter",
        tparams: &["E", "K"],
        params: &[("const int*", "idx"), ("const int*", "offsets"), ("int*", "src"), ("int*", "row"), ("int", "T")],
    },
    Family {
        name: "grouped_gemm",
        tparams: &["N", "KD", "EPI", "E"],
        params: &[
            (BF, "x"),
            ("const int*", "src"),
            ("const int*", "offsets"),
            (BF, "w"),
            (BF, "bias"),
            (BFM, "y"),
            ("int", "rows"),
        ],
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
        params: &[
            ("const float*", "scores"),
            ("float*", "partial"),
            ("int", "S"),
            ("float*", "loss"),
            ("float", "scale"),
            ("int*", "tickets"),
            ("float*", "pp"),
            ("int*", "pc"),
        ],
    },
    Family {
        name: "head_lse",
        tparams: &["V", "H"],
        params: &[
            (BF, "z"),
            (BF, "w"),
            ("const int*", "labels"),
            ("float*", "part"),
            ("float*", "label_logit"),
            ("int", "T"),
        ],
    },
    Family {
        name: "ce_lse",
        tparams: &["V"],
        params: &[
            ("const float*", "part"),
            ("const float*", "label_logit"),
            ("const unsigned char*", "mask"),
            ("const unsigned char*", "span"),
            ("const float*", "scale"),
            ("const float*", "weight"),
            ("float*", "token_loss"),
            ("float*", "lse"),
            ("float*", "weighted"),
            ("int", "T"),
        ],
    },
    Family {
        name: "conf_weight",
        tparams: &[],
        params: &[
            ("const float*", "teacher_logp"),
            ("const unsigned char*", "teacher"),
            ("const float*", "kd"),
            ("float*", "weight"),
            ("int", "T"),
        ],
    },
    Family {
        name: "sum",
        tparams: &[],
        params: &[("const float*", "x"), ("float*", "out"), ("int", "n"), ("float", "scale"), ("int", "accum")],
    },
    // ----- backward families -----
    Family {
        name: "add",
        tparams: &["IN_F32", "OUT_F32", "NI"],
        params: &[
            ("const void*", "x0"),
            ("const void*", "x1"),
            ("const void*", "x2"),
            ("const void*", "x3"),
            ("const float*", "acc"),
            ("void*", "y"),
            ("int", "n"),
            ("int", "accum"),
        ],
    },
    Family {
        name: "gemm_nn",
        tparams: &["N", "KD", "E", "AMODE", "EPI", "OUT"],
        params: &[
            ("const void*", "a"),
            ("const int*", "offsets"),
            (BF, "w"),
            ("const float*", "acc"),
            (BF, "aux"),
            ("void*", "y"),
            ("int", "M"),
            ("int", "lda"),
            ("int", "ldy"),
        ],
    },
    Family {
        name: "gemm_tn",
        tparams: &["N", "K", "E", "AMODE", "BRELU2", "BIAS"],
        params: &[
            ("const void*", "a"),
            (BF, "b"),
            ("const int*", "bsrc"),
            ("const int*", "offsets"),
            ("float*", "y"),
            ("int", "M"),
            ("int", "lda"),
            ("int", "ldb"),
            ("int", "accum"),
            ("float*", "out"),
            ("float*", "db"),
            ("int*", "tickets"),
        ],
    },
    Family {
        name: "colsum",
        tparams: &["N", "IN_F32"],
        params: &[
            ("const void*", "x"),
            ("float*", "out"),
            ("int", "rows"),
            ("int", "accum"),
            ("float*", "parts"),
            ("int*", "tickets"),
        ],
    },
    Family {
        name: "qkv_colsum",
        tparams: &["HEADS", "GROUPS", "D"],
        params: &[
            (BF, "dq"),
            (BF, "dk"),
            (BF, "dv"),
            ("float*", "out"),
            ("int", "rows"),
            ("int", "accum"),
            ("float*", "parts"),
            ("int*", "tickets"),
        ],
    },
    Family {
        name: "qk_norm_bwd",
        tparams: &["D"],
        params: &[
            (BF, "xq"),
            (BF, "xk"),
            (BF, "wq"),
            (BF, "wk"),
            (BF, "dyq"),
            (BF, "dyk"),
            (BFM, "dxq"),
            (BFM, "dxk"),
            ("float*", "partial"),
            ("int", "rows_q"),
            ("int", "rows_k"),
            ("float", "eps"),
            ("float*", "dwq"),
            ("float*", "dwk"),
            ("int*", "tickets"),
            ("int", "accum"),
        ],
    },
    Family {
        name: "rmsnorm_bwd",
        tparams: &["D"],
        params: &[
            (BF, "x"),
            (BF, "w"),
            (BF, "dy"),
            (BF, "acc"),
            (BFM, "dx"),
            ("float*", "partial"),
            ("int", "rows"),
            ("float", "eps"),
            ("float*", "dw"),
            ("int*", "tickets"),
            ("int", "accum"),
        ],
    },
    Family {
        name: "qkv_pack",
        tparams: &["HEADS", "GROUPS", "D"],
        params: &[(BF, "dq"), (BF, "dk"), (BF, "dv"), (BFM, "mixed"), ("int", "T")],
    },
    Family {
        name: "tpa_bwd",
        tparams: &["HEADS", "GROUPS", "D", "RQ", "R"],
        params: &[(BF, "f"), (BF, "dq"), (BF, "dk"), (BF, "dv"), (BFM, "df"), ("int", "T")],
    },
    Family {
        name: "tpa_dgrad",
        tparams: &["HEADS", "GROUPS", "D", "RQ", "R", "H"],
        params: &[
            (BF, "df"),
            (BF, "w_aq"),
            (BF, "w_ak"),
            (BF, "w_av"),
            (BF, "w_bq"),
            (BF, "w_bk"),
            (BF, "w_bv"),
            (BFM, "dx"),
            ("int", "T"),
        ],
    },
    Family {
        name: "tpa_wgrad",
        tparams: &["HEADS", "GROUPS", "D", "RQ", "R", "H"],
        params: &[
            (BF, "df"),
            (BF, "x"),
            ("float*", "part"),
            ("float*", "dw_aq"),
            ("float*", "dw_ak"),
            ("float*", "dw_av"),
            ("float*", "dw_bq"),
            ("float*", "dw_bk"),
            ("float*", "dw_bv"),
            ("int", "T"),
            ("int", "accum"),
            ("int*", "tickets"),
        ],
    },
    Family {
        name: "grape_bwd",
        tparams: &["D"],
        params: &[
            (BF, "xq"),
            (BF, "xk"),
            ("const float*", "log_freq"),
            (BF, "dyq"),
            (BF, "dyk"),
            (BFM, "dxq"),
            (BFM, "dxk"),
            ("float*", "partial"),
            ("int", "heads"),
            ("int", "groups"),
            ("int", "T"),
            ("int", "S"),
            ("float", "scale"),
            ("float*", "dl"),
            ("int*", "tickets"),
            ("int", "accum"),
        ],
    },
    Family {
        name: "vres_bwd",
        tparams: &[],
        params: &[
            (BF, "v"),
            (BF, "v1"),
            ("const float*", "logit"),
            (BF, "dy"),
            (BFM, "dv"),
            (BFM, "dv1"),
            ("float*", "partial"),
            ("int", "n"),
            ("float*", "dl"),
            ("int*", "tickets"),
            ("int", "accum"),
        ],
    },
    Family {
        name: "attn_stats",
        tparams: &["D", "HEADS", "GROUPS", "WINDOW", "ALIBI", "SINKS"],
        params: &[
            (BF, "q"),
            (BF, "k"),
            ("const int*", "doc"),
            ("const float*", "sinks"),
            (BF, "out"),
            (BF, "dout"),
            ("float*", "stats"),
            ("float*", "dsink"),
            ("int", "T"),
            ("int", "S"),
        ],
    },
    Family {
        name: "attn_bwd_dq",
        tparams: &["D", "HEADS", "GROUPS", "WINDOW", "ALIBI"],
        params: &[
            (BF, "q"),
            (BF, "k"),
            (BF, "v"),
            ("const int*", "doc"),
            ("const float*", "stats"),
            (BF, "dout"),
            (BFM, "dq"),
            ("int", "T"),
            ("int", "S"),
        ],
    },
    Family {
        name: "attn_bwd_dkdv",
        tparams: &["D", "HEADS", "GROUPS", "WINDOW", "ALIBI", "HSPLIT"],
        params: &[
            (BF, "q"),
            (BF, "k"),
            (BF, "v"),
            ("const int*", "doc"),
            ("const float*", "stats"),
            (BF, "dout"),
            (BFM, "dk"),
            (BFM, "dv"),
            ("int", "T"),
            ("int", "S"),
            ("float*", "part"),
        ],
    },
    Family {
        name: "attn_dkdv_sum",
        tparams: &["D", "HEADS", "GROUPS"],
        params: &[("const float*", "part"), (BFM, "dk"), (BFM, "dv"), ("int", "T")],
    },
    Family {
        name: "router_bwd",
        tparams: &["E", "K"],
        params: &[
            ("const float*", "scores"),
            ("const int*", "idx"),
            ("const float*", "dgate"),
            ("const float*", "dscores"),
            ("float*", "dl"),
            ("int", "T"),
            ("float", "scale"),
        ],
    },
    Family {
        name: "moe_gather",
        tparams: &["H", "K"],
        params: &[(BF, "dxp"), ("const int*", "row"), (BF, "acc_in"), (BFM, "dx"), ("int", "T")],
    },
    Family {
        name: "combine_bwd",
        tparams: &["H", "K"],
        params: &[
            (BF, "yp"),
            ("const int*", "row"),
            ("const float*", "gate"),
            (BF, "dh"),
            (BFM, "dyp"),
            ("float*", "dgate"),
            ("int", "T"),
        ],
    },
    Family {
        name: "seq_aux_count",
        tparams: &["E", "K"],
        params: &[("const float*", "scores"), ("float*", "counts"), ("int", "S"), ("int*", "pc"), ("int*", "tickets")],
    },
    Family {
        name: "seq_aux_bwd",
        tparams: &["E", "K"],
        params: &[
            ("const float*", "scores"),
            ("const float*", "counts"),
            ("const float*", "daux"),
            ("float*", "dscores"),
            ("int", "T"),
            ("int", "S"),
            ("float", "inv_rows"),
        ],
    },
    Family {
        name: "head_dl",
        tparams: &["V", "H", "C"],
        params: &[
            (BF, "z"),
            (BF, "w"),
            ("const int*", "labels"),
            ("const unsigned char*", "mask"),
            ("const unsigned char*", "span"),
            ("const float*", "scale"),
            ("const float*", "weight"),
            ("const float*", "lse"),
            ("const float*", "dloss"),
            (BFM, "dl"),
            ("int", "T"),
            ("int", "col0"),
        ],
    },
    Family { name: "embed_sort", tparams: &[], params: &[("const int*", "tokens"), ("int*", "sorted"), ("int", "T")] },
    Family {
        name: "embed_bwd",
        tparams: &["H"],
        params: &[
            ("const int*", "sorted"),
            (BF, "dh"),
            ("float*", "dtable"),
            ("int", "T"),
            ("int", "V"),
            ("int", "accum"),
        ],
    },
    // The optimizer step (optim.cuh; launched by the runtime from the plan's optimizer program).
    Family {
        name: "opt_sumsq",
        tparams: &[],
        params: &[("const float*", "g"), ("long long", "n"), ("double*", "partial")],
    },
    Family {
        name: "opt_adamw",
        tparams: &["OUT"],
        params: &[
            ("const float*", "g"),
            ("float*", "m"),
            ("float*", "s"),
            ("float*", "w"),
            ("void*", "model"),
            ("long long", "n"),
            ("float", "coef"),
            ("double", "b1"),
            ("double", "b2"),
            ("double", "eps"),
            ("double", "bc1"),
            ("double", "bc2"),
            ("double", "lr"),
            ("double", "wd"),
        ],
    },
    Family {
        name: "pe_start",
        tparams: &["R", "C"],
        params: &[
            ("const float*", "g"),
            ("float*", "mom"),
            ("float*", "u"),
            (BFM, "x"),
            ("float", "coef"),
            ("double", "mu"),
            ("int", "nesterov"),
            ("double", "safety"),
            ("double", "eps"),
        ],
    },
    Family { name: "pe_gram", tparams: &["M", "NW"], params: &[(BF, "x"), (BFM, "a")] },
    Family {
        name: "pe_poly",
        tparams: &["M"],
        params: &[(BF, "a"), ("float*", "b"), ("float", "ca"), ("float", "cb"), ("float", "cc")],
    },
    Family {
        name: "pe_apply",
        tparams: &["M", "NW", "OUT"],
        params: &[("const float*", "b"), (BF, "x"), ("void*", "y")],
    },
    Family {
        name: "pe_finish",
        tparams: &["R", "C"],
        params: &[
            ("const float*", "o"),
            ("float*", "v"),
            ("float*", "w"),
            (BFM, "model"),
            ("double", "beta2"),
            ("double", "eps"),
            ("double", "lr"),
            ("double", "wd"),
        ],
    },
];

/// The template file defining a family: its own `<family>.cuh`, or `optim.cuh` for the
/// optimizer's families.
pub fn header(family: &str) -> String {
    if family.starts_with("opt_") || family.starts_with("pe_") {
        "optim.cuh".into()
    } else {
        format!("{family}.cuh")
    }
}

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
    pub(crate) fn new(family: &str, targs: &[u64]) -> Self {
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
    /// Device pointer `offset` elements into a value (a slice of rows of a parameter or its
    /// gradient, e.g. one vocabulary chunk of the LM head).
    ValueAt {
        v: ValueId,
        offset: u64,
    },
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
    /// `1/(T/S)`, the reciprocal of the row count.
    InvRows,
    /// The runtime's zeroed `int[TICKETS]` that split reductions count their finished blocks in
    /// (`last_block` in vp_common.cuh); every launch leaves it zeroed again.
    Tickets,
    Int(i64),
    Float(f32),
    /// The `accum` flag of a kernel writing value `v`: 1 where `v` is a parameter gradient that the
    /// runtime places in the step's gradient sum and an earlier micro-batch of the step is already
    /// there (the kernel adds), else 0 (it stores).
    Accum(ValueId),
}

impl Arg {
    /// The value this argument points into, if any.
    pub fn value(&self) -> Option<ValueId> {
        match self {
            Arg::Value(v) | Arg::ValueAt { v, .. } => Some(*v),
            _ => None,
        }
    }
    /// The same buffer `off` elements further in.
    fn at(&self, off: u64) -> Arg {
        match *self {
            Arg::Scratch { index, offset } => Arg::Scratch { index, offset: offset + off },
            Arg::Value(v) => Arg::ValueAt { v, offset: off },
            Arg::ValueAt { v, offset } => Arg::ValueAt { v, offset: offset + off },
            _ => panic!("offset into a non-buffer argument"),
        }
    }
}

/// The `accum` argument of a launch writing `out`: only a node output can be a gradient sum.
fn accum(out: &Arg) -> Arg {
    out.value().map_or(Arg::Int(0), Arg::Accum)
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

/// Grid of gemm.cuh's tile (and of the kernels built on its mainloop): `m_mul·T` rows by `n`
/// columns in 64×64 tiles.
fn tile_grid(n: u64, m_mul: u64) -> [LaunchDim; 3] {
    [tok(m_mul, GEMM_TILE), LaunchDim::Const(n.div_ceil(GEMM_TILE)), one()]
}

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
        tile_grid(n, m_mul),
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
            // One warp per head vector, q rows then k rows, 8 a block.
            let args = vec![
                i(0),
                i(1),
                i(2),
                i(3),
                o(0),
                o(1),
                Arg::Tokens { mul: heads },
                Arg::Tokens { mul: groups },
                Arg::Float(eps),
            ];
            let grid = [tok(heads + groups, 8), one(), one()];
            (vec![launch(KernelSpec::new("qk_norm", &[head_dim]), args, grid, 256)], vec![])
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
            let total: u64 = tpa_widths(heads, groups, head_dim, q_rank, kv_rank).iter().sum();
            let targs = [heads, groups, head_dim, q_rank, kv_rank, hidden];
            let mut launches = vec![tpa_gemm("tpa_proj", targs, i(0), i, s(0, 0), tile_grid(total, 1))];
            launches.push(launch(
                KernelSpec::new("tpa_combine", &[heads, groups, head_dim, q_rank, kv_rank]),
                vec![s(0, 0), opt(bias, 7), o(0), o(1), o(2), Arg::Tokens { mul: 1 }],
                rows_grid(1),
                128,
            ));
            (launches, vec![scratch(DType::Bf16, total)])
        }
        Op::GrapeM { heads, groups, head_dim, log_freq_scale } => {
            let args = vec![
                i(0),
                i(1),
                i(2),
                o(0),
                o(1),
                Arg::Int(heads as i64),
                Arg::Int(groups as i64),
                Arg::Tokens { mul: 1 },
                Arg::Seq,
                Arg::Float(log_freq_scale),
            ];
            (vec![launch(KernelSpec::new("grape", &[head_dim]), args, rows_grid(1), 128)], vec![])
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
        Op::Dispatch { experts, topk } => (
            vec![
                // Counts per expert; the last block turns them into offsets.
                launch(
                    KernelSpec::new("moe_count", &[experts, topk]),
                    vec![i(0), o(2), Arg::Tokens { mul: 1 }, Arg::Tickets],
                    [LaunchDim::Const(experts), one(), one()],
                    256,
                ),
                launch(
                    KernelSpec::new("moe_scatter", &[experts, topk]),
                    vec![i(0), o(2), o(0), o(1), Arg::Tokens { mul: 1 }],
                    [LaunchDim::Const(experts), one(), one()],
                    256,
                ),
            ],
            vec![],
        ),
        Op::ExpertFfn { hidden, ffn, experts, topk, bias } => {
            let (b1, w2, b2) = if bias { (i(5), i(6), i(7)) } else { (Arg::Null, i(5), Arg::Null) };
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
                        vec![i(0), i(1), i(3), i(4), b1, s(0, 0), Arg::Tokens { mul: topk }],
                        grid(ffn),
                        128,
                    ),
                    launch(
                        KernelSpec::new("grouped_gemm", &[hidden, ffn, EPI_NONE, experts]),
                        vec![s(0, 0), Arg::Null, i(3), w2, b2, o(0), Arg::Tokens { mul: topk }],
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
                // SEQ_AUX_SPLIT chunks per sequence (chunk sums at the chunk's first token row of
                // s(1), s(2)); the last block forms each sequence's partial and the loss.
                launch(
                    KernelSpec::new("seq_aux", &[experts, topk]),
                    vec![i(0), s(0, 0), Arg::Seq, o(0), Arg::InvRows, Arg::Tickets, s(1, 0), s(2, 0)],
                    [LaunchDim::Const(SEQ_AUX_SPLIT), LaunchDim::Rows, one()],
                    256,
                ),
            ],
            vec![scratch(DType::F32, 1), scratch(DType::F32, 2 * experts), scratch(DType::I32, experts)],
        ),
        Op::ConfidenceWeight => (
            vec![launch(
                KernelSpec::new("conf_weight", &[]),
                vec![i(0), i(1), i(2), o(0), Arg::Tokens { mul: 1 }],
                [tok(1, 256), one(), one()],
                256,
            )],
            vec![],
        ),
        Op::HeadCe { hidden, vocab } => (
            // Logits never leave the GEMM tile: per-tile logsumexp partials, then one merge per
            // token (head_lse.cuh, ce_lse.cuh), then the loss sum.
            vec![
                launch(
                    KernelSpec::new("head_lse", &[vocab, hidden]),
                    vec![i(0), i(1), i(2), s(0, 0), s(1, 0), Arg::Tokens { mul: 1 }],
                    tile_grid(vocab, 1),
                    128,
                ),
                launch(
                    KernelSpec::new("ce_lse", &[vocab]),
                    vec![s(0, 0), s(1, 0), i(3), i(4), i(5), i(6), o(1), o(2), s(2, 0), Arg::Tokens { mul: 1 }],
                    rows_grid(1),
                    256,
                ),
                launch(
                    KernelSpec::new("sum", &[]),
                    vec![s(2, 0), o(0), Arg::Tokens { mul: 1 }, Arg::Float(1.0), Arg::Int(0)],
                    [one(), one(), one()],
                    1024,
                ),
            ],
            vec![scratch(DType::F32, 2 * vocab.div_ceil(GEMM_TILE)), scratch(DType::F32, 1), scratch(DType::F32, 1)],
        ),
        Op::Add { n, ref ty } => lower_add(node, n, ty),
        Op::Vjp(ref v) => lower_vjp(node, v),
    }
}

/// Element count of a tensor type as a launch argument and a 1-D grid of `per` elements a block.
fn numel_arg(ty: &TensorType, per: u64) -> (Arg, [LaunchDim; 3]) {
    let (pt, fixed) = ty.numel_split();
    if pt > 0 {
        (Arg::Tokens { mul: pt }, [tok(pt, per), one(), one()])
    } else {
        (Arg::Int(fixed as i64), [LaunchDim::Const(fixed.div_ceil(per).max(1)), one(), one()])
    }
}

/// `add`: up to four inputs in one launch; more are chained through an f32 scratch accumulator
/// (fixed summation order, one rounding at the end).
fn lower_add(node: &Node, n: u64, ty: &TensorType) -> (Vec<Launch>, Vec<Scratch>) {
    let f32in = (ty.dtype == DType::F32) as u64;
    let (cnt, grid) = numel_arg(ty, 256);
    let ins: Vec<Arg> = node.inputs.iter().map(|&v| Arg::Value(v)).collect();
    assert_eq!(ins.len() as u64, n, "add arity");
    let mk = |chunk: &[Arg], acc: Arg, y: Arg, out_f32: u64| {
        let mut args: Vec<Arg> = chunk.to_vec();
        args.resize(4, Arg::Null);
        // Only an f32 value can be a gradient sum.
        let acc_flag = if out_f32 == 1 { accum(&y) } else { Arg::Int(0) };
        args.extend([acc, y, cnt.clone(), acc_flag]);
        // Always the 4-input instantiation (null pointers read as 0), so the kernel set does not
        // depend on how many contributions a value has (which grows with the layer count).
        launch(KernelSpec::new("add", &[f32in, out_f32, 4]), args, grid, 256)
    };
    let out = Arg::Value(node.outputs[0]);
    if ins.len() <= 4 {
        return (vec![mk(&ins, Arg::Null, out, f32in)], vec![]);
    }
    let (pt, fixed) = ty.numel_split();
    let acc = Arg::Scratch { index: 0, offset: 0 };
    let chunks: Vec<&[Arg]> = ins.chunks(4).collect();
    let mut launches = Vec::new();
    for (c, chunk) in chunks.iter().enumerate() {
        let first = c == 0;
        let last = c + 1 == chunks.len();
        let acc_in = if first { Arg::Null } else { acc.clone() };
        let (y, of) = if last { (out.clone(), f32in) } else { (acc.clone(), 1) };
        launches.push(mk(chunk, acc_in, y, of));
    }
    (launches, vec![Scratch { dtype: DType::F32, per_token: pt, fixed }])
}

/// Backward lowering of a `vjp` node (inputs: forward inputs, forward outputs, seeded upstream
/// gradients; outputs: gradients of the differentiable forward inputs).
fn lower_vjp(node: &Node, v: &Vjp) -> (Vec<Launch>, Vec<Scratch>) {
    let io = VjpIo::new(node, v);
    let mut b = Bwd::default();
    let x = |k: usize| io.x(k);
    let y = |k: usize| io.y(k);
    let dy = |k: usize| io.dy(k);
    let dx = |k: usize| io.dx(k);
    let t1 = Arg::Tokens { mul: 1 };
    match v.of {
        Op::Embedding { vocab, hidden } => {
            let sorted = b.scratch_tok(DType::I32, 2);
            b.push(
                KernelSpec::new("embed_sort", &[]),
                vec![x(0), sorted.clone(), t1],
                [tok(1, EMBED_SORT_CHUNK), one(), one()],
                1024,
            );
            b.push(
                KernelSpec::new("embed_bwd", &[hidden]),
                vec![sorted, dy(0), dx(1), Arg::Tokens { mul: 1 }, Arg::Int(vocab as i64), accum(&dx(1))],
                [LaunchDim::Const(vocab), one(), one()],
                128,
            );
        }
        Op::RmsNorm { dim, eps } => b.rmsnorm_bwd(dim, eps, 1, x(0), x(1), dy(0), io.acc(), dx(0), dx(1)),
        Op::QkNorm { heads, groups, head_dim, eps } => {
            // One `accum` for both weight gradients: two parameters, so both are sums or neither.
            let part = b.scratch_fixed(DType::F32, 2 * RED_BLOCKS * head_dim);
            b.push(
                KernelSpec::new("qk_norm_bwd", &[head_dim]),
                vec![
                    x(0),
                    x(1),
                    x(2),
                    x(3),
                    dy(0),
                    dy(1),
                    dx(0),
                    dx(1),
                    part,
                    Arg::Tokens { mul: heads },
                    Arg::Tokens { mul: groups },
                    Arg::Float(eps),
                    dx(2),
                    dx(3),
                    Arg::Tickets,
                    accum(&dx(2)),
                ],
                [LaunchDim::Const(RED_BLOCKS), LaunchDim::Const(2), one()],
                256,
            );
        }
        Op::QkvProj { hidden, heads, groups, head_dim, bias } => {
            let n = (heads + 2 * groups) * head_dim;
            let dm = b.scratch_tok(DType::Bf16, n);
            b.qkv_pack(heads, groups, head_dim, [dy(0), dy(1), dy(2)], dm.clone());
            b.dgrad(hidden, n, 1, dm.clone(), n, x(1), Arg::Null, dx(0), false);
            b.wgrad(n, hidden, 1, 0, 0, dm, n, x(0), hidden, dx(1), if bias { dx(2) } else { Arg::Null });
        }
        Op::TpaQkv { hidden, heads, groups, head_dim, q_rank, kv_rank, bias } => {
            let total: u64 = tpa_widths(heads, groups, head_dim, q_rank, kv_rank).iter().sum();
            // Recompute the six factor products (as the forward), then their gradients per token.
            let targs = [heads, groups, head_dim, q_rank, kv_rank, hidden];
            let f = b.scratch_tok(DType::Bf16, total);
            let df = b.scratch_tok(DType::Bf16, total);
            b.launches.push(tpa_gemm("tpa_proj", targs, x(0), x, f.clone(), tile_grid(total, 1)));
            b.push(
                KernelSpec::new("tpa_bwd", &[heads, groups, head_dim, q_rank, kv_rank]),
                vec![f, dy(0), dy(1), dy(2), df.clone(), t1.clone()],
                rows_grid(1),
                128,
            );
            // dx = df·[W_aq; …; W_bv]: one f32 accumulation over all factor columns.
            b.launches.push(tpa_gemm("tpa_dgrad", targs, df.clone(), x, dx(0), nn_grid(hidden, 1, 0)));
            // [dW_aq; …; dW_bv] = dfᵀ·x, each weight's rows into its own gradient.
            let dws: Vec<Arg> = (1..=6).map(dx).collect();
            assert!(dws.iter().all(|d| d.value().is_some()), "TpaQkv vjp: every factor weight needs its gradient");
            let split = wgrad_split(total, hidden);
            let (part, tickets) = if split > 1 {
                assert!(
                    total.div_ceil(GEMM_TILE) * hidden.div_ceil(GEMM_TILE) <= TICKETS,
                    "tpa_wgrad: tiles past TICKETS"
                );
                (b.partials(split * total * hidden), Arg::Tickets)
            } else {
                (Arg::Null, Arg::Null)
            };
            let mut args = vec![df, x(0), part];
            args.extend(dws.iter().cloned());
            args.extend([t1, accum(&dws[0]), tickets]);
            b.push(KernelSpec::new("tpa_wgrad", &targs), args, tn_grid(total, hidden, split), 128);
            if bias {
                // The packed bias's gradient, read straight from dq, dk, dv (no packed copy).
                let n = (heads + 2 * groups) * head_dim;
                let k = KernelSpec::new("qkv_colsum", &[heads, groups, head_dim]);
                b.column_sums(k, vec![dy(0), dy(1), dy(2)], n, 1, dx(7));
            }
        }
        Op::GrapeM { heads, groups, head_dim, log_freq_scale } => {
            let half = head_dim / 2;
            let part = b.scratch_fixed(DType::F32, RED_BLOCKS * half);
            b.push(
                KernelSpec::new("grape_bwd", &[head_dim]),
                vec![
                    x(0),
                    x(1),
                    x(2),
                    dy(0),
                    dy(1),
                    dx(0),
                    dx(1),
                    part.clone(),
                    Arg::Int(heads as i64),
                    Arg::Int(groups as i64),
                    t1,
                    Arg::Seq,
                    Arg::Float(log_freq_scale),
                    dx(2),
                    Arg::Tickets,
                    accum(&dx(2)),
                ],
                [LaunchDim::Const(RED_BLOCKS), one(), one()],
                128,
            );
        }
        Op::ValueResidual { groups, head_dim } => {
            let part = b.scratch_fixed(DType::F32, RED_BLOCKS);
            b.push(
                KernelSpec::new("vres_bwd", &[]),
                vec![
                    x(0),
                    x(1),
                    x(2),
                    dy(0),
                    dx(0),
                    dx(1),
                    part,
                    Arg::Tokens { mul: groups * head_dim },
                    dx(2),
                    Arg::Tickets,
                    accum(&dx(2)),
                ],
                [LaunchDim::Const(RED_BLOCKS), one(), one()],
                256,
            );
        }
        Op::Attention(a) => {
            let (window, alibi) = match a.kind {
                AttnKind::Window(w) => (w, false),
                AttnKind::Global { alibi } => (0, alibi),
            };
            let stats = b.scratch_tok(DType::F32, 2 * a.heads);
            let dsink = if a.sinks { b.scratch_tok(DType::F32, a.heads) } else { Arg::Null };
            let sinks = if a.sinks { x(4) } else { Arg::Null };
            let targs = [a.head_dim, a.heads, a.groups, window, alibi as u64];
            let mut st = targs.to_vec();
            st.push(a.sinks as u64);
            b.push(
                KernelSpec::new("attn_stats", &st),
                vec![x(0), x(1), x(3), sinks, y(0), dy(0), stats.clone(), dsink.clone(), t1.clone(), Arg::Seq],
                [tok(1, 64), LaunchDim::Const(a.heads), one()],
                128,
            );
            b.push(
                KernelSpec::new("attn_bwd_dq", &targs),
                vec![x(0), x(1), x(2), x(3), stats.clone(), dy(0), dx(0), t1.clone(), Arg::Seq],
                [tok(1, 64), LaunchDim::Const(a.heads), one()],
                128,
            );
            // Global layers split the key blocks per head (a causal row's first key tiles are seen
            // by every later query) and sum each group's heads after; windowed ones need not.
            let hsplit = window == 0 && a.heads > a.groups;
            let mut kt = targs.to_vec();
            kt.push(hsplit as u64);
            // With the split, dk and dv come from attn_dkdv_sum over the per-head f32 shares.
            let (part, dk, dv, blocks_y) = if hsplit {
                (b.scratch_tok(DType::F32, a.heads * 2 * a.head_dim), Arg::Null, Arg::Null, a.heads)
            } else {
                (Arg::Null, dx(1), dx(2), a.groups)
            };
            b.push(
                KernelSpec::new("attn_bwd_dkdv", &kt),
                vec![x(0), x(1), x(2), x(3), stats, dy(0), dk, dv, t1.clone(), Arg::Seq, part.clone()],
                [tok(1, 64), LaunchDim::Const(blocks_y), one()],
                128,
            );
            if hsplit {
                b.push(
                    KernelSpec::new("attn_dkdv_sum", &[a.head_dim, a.heads, a.groups]),
                    vec![part, dx(1), dx(2), t1],
                    rows_grid(1),
                    128,
                );
            }
            if a.sinks {
                b.colsum(a.heads, true, 1, dsink, dx(4));
            }
        }
        Op::OutProj { in_dim, hidden, bias } => {
            // The residual's gradient is dy itself (`Op::passthrough`): nothing to launch.
            b.dgrad(in_dim, hidden, 1, dy(0), hidden, x(1), Arg::Null, dx(0), false);
            b.wgrad(hidden, in_dim, 1, 0, 0, dy(0), hidden, x(0), in_dim, dx(1), if bias { dx(2) } else { Arg::Null });
        }
        Op::Mlp { hidden, ffn, bias, .. } => {
            let (i_b1, i_w2, i_b2) = if bias { (2, 3, 4) } else { (0, 2, 0) };
            let b1 = if bias { x(i_b1) } else { Arg::Null };
            let z = b.scratch_tok(DType::Bf16, ffn);
            let dz = b.scratch_tok(DType::Bf16, ffn);
            // Pre-activation recomputed (bf16), dz = (dy·W₂)·2·max(z, 0) in the GEMM epilogue.
            b.launches.push(gemm(ffn, hidden, EPI_NONE, false, 1, x(0), x(1), b1, Arg::Null, z.clone(), ffn));
            b.push(
                KernelSpec::new("gemm_nn", &[ffn, hidden, 0, 0, EPI_DRELU2, 0]),
                vec![
                    dy(0),
                    Arg::Null,
                    x(i_w2),
                    Arg::Null,
                    z.clone(),
                    dz.clone(),
                    t1,
                    Arg::Int(hidden as i64),
                    Arg::Int(ffn as i64),
                ],
                nn_grid(ffn, 1, 0),
                128,
            );
            let db = |i| if bias { dx(i) } else { Arg::Null };
            b.wgrad(hidden, ffn, 1, 0, 1, dy(0), hidden, z, ffn, dx(i_w2), db(i_b2));
            b.wgrad(ffn, hidden, 1, 0, 0, dz.clone(), ffn, x(0), hidden, dx(1), db(i_b1));
            b.dgrad(hidden, ffn, 1, dz, ffn, x(1), Arg::Null, dx(0), false);
        }
        Op::Router { hidden, experts, topk, scale, bias, .. } => {
            let dl = b.scratch_tok(DType::F32, experts);
            b.push(
                KernelSpec::new("router_bwd", &[experts, topk]),
                vec![y(2), y(0), dy(1), dy(2), dl.clone(), t1, Arg::Float(scale)],
                rows_grid(1),
                256,
            );
            // fp32-quality GEMMs: the f32 logit gradient is split into bf16 hi + lo on load. With
            // `acc`, dx adds the running gradient in the epilogue (EPI_RESID, before the rounding).
            let epi = if v.acc { EPI_RESID } else { EPI_NONE };
            b.push(
                KernelSpec::new("gemm_nn", &[hidden, experts, 0, AMODE_SPLIT, epi, 0]),
                vec![
                    dl.clone(),
                    Arg::Null,
                    x(1),
                    Arg::Null,
                    io.acc(),
                    dx(0),
                    Arg::Tokens { mul: 1 },
                    Arg::Int(experts as i64),
                    Arg::Int(hidden as i64),
                ],
                nn_grid(hidden, 1, 0),
                128,
            );
            b.wgrad(experts, hidden, 1, AMODE_SPLIT, 0, dl.clone(), experts, x(0), hidden, dx(1), Arg::Null);
            if bias {
                b.colsum(experts, true, 1, dl, dx(2));
            }
        }
        Op::ExpertFfn { hidden, ffn, experts, topk, bias } => {
            // Inputs: x (token rows), src, row, offsets, fc1, [b1], fc2, [b2]. The first layer
            // reads x through src; its input gradient is computed per permuted row (dxp) and
            // summed back over each token's K rows by moe_gather.
            let (i_b1, i_w2, i_b2) = if bias { (5, 6, 7) } else { (0, 5, 0) };
            let b1 = if bias { x(i_b1) } else { Arg::Null };
            let m = Arg::Tokens { mul: topk };
            let z = b.scratch_tok(DType::Bf16, topk * ffn);
            let dz = b.scratch_tok(DType::Bf16, topk * ffn);
            let dxp = b.scratch_tok(DType::Bf16, topk * hidden);
            b.push(
                KernelSpec::new("grouped_gemm", &[ffn, hidden, EPI_NONE, experts]),
                vec![x(0), x(1), x(3), x(4), b1, z.clone(), m.clone()],
                rows_cols_grid(ffn, topk, experts),
                128,
            );
            b.push(
                KernelSpec::new("gemm_nn", &[ffn, hidden, experts, 0, EPI_DRELU2, 0]),
                vec![
                    dy(0),
                    x(3),
                    x(i_w2),
                    Arg::Null,
                    z.clone(),
                    dz.clone(),
                    m.clone(),
                    Arg::Int(hidden as i64),
                    Arg::Int(ffn as i64),
                ],
                nn_grid(ffn, topk, experts),
                128,
            );
            let db = |i| if bias { dx(i) } else { Arg::Null };
            b.wgrad_grouped(hidden, ffn, experts, topk, 1, dy(0), z, Arg::Null, x(3), dx(i_w2), db(i_b2));
            b.wgrad_grouped(ffn, hidden, experts, topk, 0, dz.clone(), x(0), x(1), x(3), dx(4), db(i_b1));
            b.push(
                KernelSpec::new("gemm_nn", &[hidden, ffn, experts, 0, EPI_NONE, 0]),
                vec![
                    dz,
                    x(3),
                    x(4),
                    Arg::Null,
                    Arg::Null,
                    dxp.clone(),
                    m,
                    Arg::Int(ffn as i64),
                    Arg::Int(hidden as i64),
                ],
                nn_grid(hidden, topk, experts),
                128,
            );
            b.push(
                KernelSpec::new("moe_gather", &[hidden, topk]),
                vec![dxp, x(2), io.acc(), dx(0), t1],
                rows_grid(1),
                128,
            );
        }
        // resid's and shared's gradients are dy itself (`Op::passthrough`): nothing to launch.
        Op::Combine { hidden, topk, .. } => b.push(
            KernelSpec::new("combine_bwd", &[hidden, topk]),
            vec![x(0), x(1), x(2), dy(0), dx(0), dx(2), t1],
            rows_grid(1),
            128,
        ),
        Op::SeqAuxLoss { experts, topk } => {
            // counts [B, E] with B = T/S ≤ T rows, from per-chunk counts as in the forward.
            let counts = b.scratch_tok(DType::F32, experts);
            let pc = b.scratch_tok(DType::I32, experts);
            b.push(
                KernelSpec::new("seq_aux_count", &[experts, topk]),
                vec![x(0), counts.clone(), Arg::Seq, pc, Arg::Tickets],
                [LaunchDim::Const(SEQ_AUX_SPLIT), LaunchDim::Rows, one()],
                256,
            );
            b.push(
                KernelSpec::new("seq_aux_bwd", &[experts, topk]),
                vec![x(0), counts, dy(0), dx(0), t1, Arg::Seq, Arg::InvRows],
                rows_grid(1),
                256,
            );
        }
        Op::HeadCe { hidden, vocab } => {
            // The logits are recomputed tile by tile into the bf16 logit gradient (head_dl.cuh),
            // which the two gradient GEMMs read as their bf16 A operand: one vocabulary chunk at
            // a time, so only [T, chunk] of it is ever resident. dz sums the chunks in f32; each
            // chunk's rows of dW are final.
            let chunk = head_chunk(vocab);
            let dl = b.scratch_tok(DType::Bf16, chunk);
            let dz = if chunk < vocab { b.scratch_tok(DType::F32, hidden) } else { Arg::Null };
            let mut c0 = 0;
            while c0 < vocab {
                let width = chunk.min(vocab - c0);
                let last = c0 + width == vocab;
                b.push(
                    KernelSpec::new("head_dl", &[vocab, hidden, chunk]),
                    vec![
                        x(0),
                        x(1),
                        x(2),
                        x(3),
                        x(4),
                        x(5),
                        x(6),
                        y(2),
                        dy(0),
                        dl.clone(),
                        t1.clone(),
                        Arg::Int(c0 as i64),
                    ],
                    tile_grid(width, 1),
                    128,
                );
                let acc = if c0 > 0 { dz.clone() } else { Arg::Null };
                let (out, out_f32) = if last { (dx(0), false) } else { (dz.clone(), true) };
                b.dgrad(hidden, width, 1, dl.clone(), chunk, x(1).at(c0 * hidden), acc, out, out_f32);
                b.wgrad(width, hidden, 1, 0, 0, dl.clone(), chunk, x(0), hidden, dx(1).at(c0 * hidden), Arg::Null);
                c0 += width;
            }
        }
        Op::ConfidenceWeight | Op::Dispatch { .. } | Op::Add { .. } | Op::Vjp(_) => {
            panic!("vjp of {} is not lowered (autodiff never emits it)", v.of.name())
        }
    }
    (b.launches, b.scratch)
}

/// Vocabulary chunks of the LM head's backward: its bf16 logit gradient is `[T, V/8]` at a time.
pub const HEAD_CHUNKS: u64 = 8;

/// Columns per LM-head backward chunk: a whole number of 64-wide tiles, `HEAD_CHUNKS` chunks
/// (fewer when the vocabulary has fewer tiles).
pub fn head_chunk(vocab: u64) -> u64 {
    vocab.div_ceil(GEMM_TILE).div_ceil(HEAD_CHUNKS) * GEMM_TILE
}

/// Tickets the runtime provides (`Arg::Tickets`): the most groups one split-reduction launch has.
pub const TICKETS: u64 = 256;
/// Fixed block count of the per-block-partial reductions (rmsnorm_bwd, grape_bwd, vres_bwd).
pub const RED_BLOCKS: u64 = 256;
/// Partial rows of a dense column sum (colsum's split).
pub const COLSUM_PARTS: u64 = 64;
/// Blocks per sequence of the sequence aux loss (seq_aux, seq_aux_count): one sequence's S tokens
/// in chunks of ceil(S/64), so the loss no longer runs on one SM per sequence.
pub const SEQ_AUX_SPLIT: u64 = 64;
/// Tokens per embed_sort chunk.
pub const EMBED_SORT_CHUNK: u64 = 2048;
/// `AMODE` of gemm_nn / gemm_tn for an f32 A split into bf16 hi + lo (the router's gradient GEMMs).
pub const AMODE_SPLIT: u64 = 1;
/// gemm_nn epilogue: multiply by ReLU²'(aux) = 2·max(aux, 0).
pub const EPI_DRELU2: u64 = 3;

/// One GEMM over TPA's six stacked factor weights: `tpa_proj` (`y = a·[W_aq; …; W_bv]ᵀ`) or
/// `tpa_dgrad` (`y = a·[W_aq; …; W_bv]`). `targs`: heads, groups, head_dim, q_rank, kv_rank,
/// hidden; `w(k)` is the node's input k (weights at 1..=6).
fn tpa_gemm(family: &str, targs: [u64; 6], a: Arg, w: impl Fn(usize) -> Arg, y: Arg, grid: [LaunchDim; 3]) -> Launch {
    let mut args = vec![a];
    args.extend((1..=6).map(w));
    args.extend([y, Arg::Tokens { mul: 1 }]);
    launch(KernelSpec::new(family, &targs), args, grid, 128)
}

fn tpa_widths(heads: u64, groups: u64, head_dim: u64, q_rank: u64, kv_rank: u64) -> [u64; 6] {
    [heads * q_rank, groups * kv_rank, groups * kv_rank, q_rank * head_dim, kv_rank * head_dim, kv_rank * head_dim]
}

/// Grid of grouped_gemm over `m_mul·T` rows and `n` columns (row tiles on x).
fn rows_cols_grid(n: u64, m_mul: u64, experts: u64) -> [LaunchDim; 3] {
    [LaunchDim::Tok { mul: m_mul, div: GEMM_TILE, add: experts }, LaunchDim::Const(n.div_ceil(GEMM_TILE)), one()]
}

/// Grid of gemm_nn over `m_mul·T` rows and `n` columns: column tiles on x (the fastest axis, so
/// the blocks reading one slab of A run together), row tiles (+ one per expert) on y.
fn nn_grid(n: u64, m_mul: u64, experts: u64) -> [LaunchDim; 3] {
    [LaunchDim::Const(n.div_ceil(GEMM_TILE)), LaunchDim::Tok { mul: m_mul, div: GEMM_TILE, add: experts }, one()]
}

/// Grid of gemm_tn for a `[n, k]` output: k tiles on x, n tiles on y, row slices (or experts) on z.
fn tn_grid(n: u64, k: u64, z: u64) -> [LaunchDim; 3] {
    [LaunchDim::Const(k.div_ceil(GEMM_TILE)), LaunchDim::Const(n.div_ceil(GEMM_TILE)), LaunchDim::Const(z)]
}

/// Row-range split of a dense gemm_tn: enough slices that the grid has about 256 blocks (at
/// most 32 slices, 1 when the output alone has 256 tiles).
pub fn wgrad_split(n: u64, k: u64) -> u64 {
    let tiles = n.div_ceil(GEMM_TILE) * k.div_ceil(GEMM_TILE);
    256u64.div_ceil(tiles).clamp(1, 32)
}

/// The ports of a vjp node.
struct VjpIo<'a> {
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
    fn x(&self, k: usize) -> Arg {
        assert!(k < self.nin);
        Arg::Value(self.node.inputs[k])
    }
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
    /// The running gradient that input 0's gradient is added to (`Vjp::acc`), or Null.
    fn acc(&self) -> Arg {
        self.acc.map(|i| Arg::Value(self.node.inputs[i])).unwrap_or(Arg::Null)
    }
}

/// Launch and scratch collector of one backward node, with the recurring launch patterns.
#[derive(Default)]
struct Bwd {
    launches: Vec<Launch>,
    scratch: Vec<Scratch>,
    /// The f32 row-range partials of a split `wgrad`, shared by every split wgrad of the node:
    /// each launch's last blocks consume them before the next launch writes them.
    parts: Option<Arg>,
}

impl Bwd {
    fn push(&mut self, k: KernelSpec, args: Vec<Arg>, grid: [LaunchDim; 3], block: u32) {
        self.launches.push(launch(k, args, grid, block));
    }
    fn scratch_tok(&mut self, dtype: DType, per_token: u64) -> Arg {
        self.scratch.push(Scratch { dtype, per_token, fixed: 0 });
        Arg::Scratch { index: self.scratch.len() as u32 - 1, offset: 0 }
    }
    fn scratch_fixed(&mut self, dtype: DType, n: u64) -> Arg {
        self.scratch.push(Scratch { dtype, per_token: 0, fixed: n });
        Arg::Scratch { index: self.scratch.len() as u32 - 1, offset: 0 }
    }
    /// The node's shared wgrad partials, grown to at least `n` f32 values.
    fn partials(&mut self, n: u64) -> Arg {
        match self.parts.clone() {
            Some(Arg::Scratch { index, .. }) => {
                let s = &mut self.scratch[index as usize];
                s.fixed = s.fixed.max(n);
                Arg::Scratch { index, offset: 0 }
            }
            _ => {
                let a = self.scratch_fixed(DType::F32, n);
                self.parts = Some(a.clone());
                a
            }
        }
    }
    /// RMSNorm backward over `rows_mul·T` rows of `d`; `acc` (or Null): a bf16 running gradient
    /// that dx is added to before its one rounding.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(&mut self, d: u64, eps: f32, rows_mul: u64, x: Arg, w: Arg, dy: Arg, acc: Arg, dx: Arg, dw: Arg) {
        let part = self.scratch_fixed(DType::F32, RED_BLOCKS * d);
        self.push(
            KernelSpec::new("rmsnorm_bwd", &[d]),
            vec![
                x,
                w,
                dy,
                acc,
                dx,
                part,
                Arg::Tokens { mul: rows_mul },
                Arg::Float(eps),
                dw.clone(),
                Arg::Tickets,
                accum(&dw),
            ],
            [LaunchDim::Const(RED_BLOCKS), one(), one()],
            256,
        );
    }
    fn qkv_pack(&mut self, heads: u64, groups: u64, d: u64, g: [Arg; 3], out: Arg) {
        let [gq, gk, gv] = g;
        self.push(
            KernelSpec::new("qkv_pack", &[heads, groups, d]),
            vec![gq, gk, gv, out, Arg::Tokens { mul: 1 }],
            rows_grid(1),
            128,
        );
    }
    /// Input gradient `y = a·W (+ acc)` of a dense linear (`W` the `[kd, n]` forward weight, `a`
    /// with row stride `lda`; `acc` an f32 accumulator with the row stride of `y`, or Null).
    #[allow(clippy::too_many_arguments)]
    fn dgrad(&mut self, n: u64, kd: u64, m_mul: u64, a: Arg, lda: u64, w: Arg, acc: Arg, y: Arg, out_f32: bool) {
        self.push(
            KernelSpec::new("gemm_nn", &[n, kd, 0, 0, EPI_NONE, out_f32 as u64]),
            vec![
                a,
                Arg::Null,
                w,
                acc,
                Arg::Null,
                y,
                Arg::Tokens { mul: m_mul },
                Arg::Int(lda as i64),
                Arg::Int(n as i64),
            ],
            nn_grid(n, m_mul, 0),
            128,
        );
    }
    /// Weight gradient `dW[n, k] = aᵀ·b` over `m_mul·T` rows (f32), split over row ranges into
    /// partials (added by each tile's last block) when the output alone has too few tiles. With
    /// `db` (bf16 `a` only) the same launch writes the bias gradient `db[n] = Σ_m a[m, n]`.
    #[allow(clippy::too_many_arguments)]
    fn wgrad(
        &mut self,
        n: u64,
        k: u64,
        m_mul: u64,
        amode: u64,
        brelu2: u64,
        a: Arg,
        lda: u64,
        b: Arg,
        ldb: u64,
        dw: Arg,
        db: Arg,
    ) {
        let bias = db != Arg::Null;
        assert!(!bias || amode == 0, "wgrad {n}x{k}: a fused bias gradient needs a bf16 A");
        let split = wgrad_split(n, k);
        let (y, out, tickets) = if split > 1 {
            assert!(n.div_ceil(GEMM_TILE) * k.div_ceil(GEMM_TILE) <= TICKETS, "wgrad {n}x{k}: tiles past TICKETS");
            // The bias partial rows [split, n] follow the weight partials.
            (self.partials(split * n * k + bias as u64 * split * n), dw.clone(), Arg::Tickets)
        } else {
            (dw.clone(), Arg::Null, Arg::Null)
        };
        self.push(
            KernelSpec::new("gemm_tn", &[n, k, 0, amode, brelu2, bias as u64]),
            vec![
                a,
                b,
                Arg::Null,
                Arg::Null,
                y,
                Arg::Tokens { mul: m_mul },
                Arg::Int(lda as i64),
                Arg::Int(ldb as i64),
                accum(&dw),
                out,
                db,
                tickets,
            ],
            tn_grid(n, k, split),
            128,
        );
    }
    /// Per-expert weight gradients `dW[e] = a_eᵀ·b_e` over each expert's rows (`a` row stride n,
    /// `b` row stride k), and with `db` the per-expert bias gradients (`db[e]` = the column sums
    /// of expert e's rows of `a`).
    #[allow(clippy::too_many_arguments)]
    fn wgrad_grouped(
        &mut self,
        n: u64,
        k: u64,
        experts: u64,
        topk: u64,
        brelu2: u64,
        a: Arg,
        b: Arg,
        bsrc: Arg,
        offsets: Arg,
        dw: Arg,
        db: Arg,
    ) {
        let bias = (db != Arg::Null) as u64;
        self.push(
            KernelSpec::new("gemm_tn", &[n, k, experts, 0, brelu2, bias]),
            vec![
                a,
                b,
                bsrc,
                offsets,
                dw.clone(),
                Arg::Tokens { mul: topk },
                Arg::Int(n as i64),
                Arg::Int(k as i64),
                accum(&dw),
                Arg::Null,
                db,
                Arg::Null,
            ],
            tn_grid(n, k, experts),
            128,
        );
    }
    /// Column sums of `x` ([m_mul·T, n]) into `out` [n]: COLSUM_PARTS partial rows, added by
    /// each column block's last block.
    fn colsum(&mut self, n: u64, in_f32: bool, m_mul: u64, x: Arg, out: Arg) {
        self.column_sums(KernelSpec::new("colsum", &[n, in_f32 as u64]), vec![x], n, m_mul, out);
    }
    /// A launch of colsum.cuh's body (`colsum`, `qkv_colsum`) reading `inputs` as `n` columns of
    /// `m_mul·T` rows.
    fn column_sums(&mut self, kernel: KernelSpec, mut inputs: Vec<Arg>, n: u64, m_mul: u64, out: Arg) {
        assert!(n.div_ceil(256) <= TICKETS, "{} of {n} columns: column blocks past TICKETS", kernel.family);
        let parts = self.scratch_fixed(DType::F32, COLSUM_PARTS * n);
        inputs.extend([out.clone(), Arg::Tokens { mul: m_mul }, accum(&out), parts, Arg::Tickets]);
        self.push(kernel, inputs, [LaunchDim::Const(COLSUM_PARTS), LaunchDim::Const(n.div_ceil(256)), one()], 256);
    }
}
