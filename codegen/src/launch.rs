//! What a lowering produces: launches of kernel families with their arguments, grids and the
//! node's scratch buffers, and the typed family declarations ([`families!`]) they are built from.
//!
//! A family is one `.cuh` template defining `vp::<family><TEMPLATE ARGS>(PARAMS…)` as a
//! `__device__` function. It is declared once, with [`families!`], in the `ops` module of the op
//! that introduces it; from that declaration come its [`Family`] descriptor (the shim's C
//! signature, the runtime's binding check) and a builder struct with one named field per template
//! and C parameter, so a launch cannot miss, reorder or add an argument.

use serde::{Deserialize, Serialize};
use std::fmt;
use vpmoe_ir::{DType, ValueId};

/// The C type of a kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CType {
    Bf,
    BfMut,
    F32,
    F32Mut,
    F64Mut,
    I32,
    I32Mut,
    I64,
    U8,
    Void,
    VoidMut,
    Int,
    LongLong,
    Float,
    Double,
}

impl CType {
    /// The type as written in the shim's C signature.
    pub const fn c(self) -> &'static str {
        match self {
            CType::Bf => "const __nv_bfloat16*",
            CType::BfMut => "__nv_bfloat16*",
            CType::F32 => "const float*",
            CType::F32Mut => "float*",
            CType::F64Mut => "double*",
            CType::I32 => "const int*",
            CType::I32Mut => "int*",
            CType::I64 => "const long long*",
            CType::U8 => "const unsigned char*",
            CType::Void => "const void*",
            CType::VoidMut => "void*",
            CType::Int => "int",
            CType::LongLong => "long long",
            CType::Float => "float",
            CType::Double => "double",
        }
    }
    /// The element type a pointer parameter reads or writes (`None`: `void*`, or not a pointer).
    pub fn pointee(self) -> Option<DType> {
        match self {
            CType::Bf | CType::BfMut => Some(DType::Bf16),
            CType::F32 | CType::F32Mut => Some(DType::F32),
            CType::I32 | CType::I32Mut => Some(DType::I32),
            CType::U8 => Some(DType::U8),
            _ => None,
        }
    }
    pub fn is_pointer(self) -> bool {
        self.c().ends_with('*')
    }
    /// Whether the kernel may write through this parameter.
    pub fn is_mut(self) -> bool {
        self.is_pointer() && !self.c().starts_with("const ")
    }
    /// Whether `arg` can be bound to a parameter of this type.
    fn accepts(self, arg: &Arg) -> bool {
        match arg {
            Arg::Value(_) | Arg::ValueAt { .. } | Arg::Scratch { .. } | Arg::Null => self.is_pointer(),
            Arg::Tickets => self == CType::I32Mut,
            Arg::Cache { .. } => matches!(self, CType::Bf | CType::BfMut),
            Arg::BlockTable => self == CType::I32,
            Arg::Tokens { .. } | Arg::Seq | Arg::Int(_) | Arg::Accum(_) | Arg::BlocksPerSlot => self == CType::Int,
            Arg::InvRows | Arg::Float(_) => self == CType::Float,
        }
    }
}

/// A kernel family: its template file, block size, template and C parameters.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub header: &'static str,
    /// Threads per block of every launch of the family (emitted as `<NAME>_THREADS` into
    /// `vp_consts.cuh`).
    pub threads: u32,
    pub tparams: &'static [&'static str],
    pub params: &'static [(CType, &'static str)],
}

/// Declares kernel families. For each `Name = "family" in "header.cuh", THREADS <TPARAMS>
/// (param: CType, …);` it defines a builder `pub struct Name` (one `u64` field per template
/// parameter, one [`Arg`] field per C parameter), `Name::FAMILY` and `Name::launch(grid)`, and
/// the module's `FAMILIES` list.
macro_rules! families {
    ($(
        $(#[doc = $doc:literal])*
        $ty:ident = $name:literal in $hdr:literal, $threads:literal <$($tp:ident),*> ($($p:ident: $ct:ident),* $(,)?);
    )*) => {
        $(
            $(#[doc = $doc])*
            #[allow(non_snake_case)]
            pub struct $ty {
                $(pub $tp: u64,)*
                $(pub $p: $crate::launch::Arg,)*
            }
            impl $ty {
                pub const FAMILY: $crate::launch::Family = $crate::launch::Family {
                    name: $name,
                    header: $hdr,
                    threads: $threads,
                    tparams: &[$(stringify!($tp)),*],
                    params: &[$(($crate::launch::CType::$ct, stringify!($p))),*],
                };
                pub fn launch(self, grid: [$crate::launch::LaunchDim; 3]) -> $crate::launch::Launch {
                    $crate::launch::Launch::of(&Self::FAMILY, &[$(self.$tp),*], vec![$(self.$p),*], grid)
                }
            }
        )*
        /// The families this module declares.
        pub const FAMILIES: &[&$crate::launch::Family] = &[$(&$ty::FAMILY),*];
    };
}
pub(crate) use families;

/// One instantiation of a family.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KernelSpec {
    pub family: String,
    pub targs: Vec<u64>,
}

impl KernelSpec {
    pub fn new(f: &Family, targs: &[u64]) -> Self {
        assert_eq!(f.tparams.len(), targs.len(), "template arity of {}", f.name);
        KernelSpec { family: f.name.to_string(), targs: targs.to_vec() }
    }
    pub fn family(&self) -> &'static Family {
        crate::ops::family(&self.family)
    }
    /// Deterministic name: `vp_<family>_<TPARAM><value>…`, e.g. `vp_rmsnorm_D1024`.
    pub fn name(&self) -> String {
        let mut s = format!("vp_{}", self.family);
        for (p, v) in self.family().tparams.iter().zip(&self.targs) {
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

/// `mul·T` as text: `T`, `4T`.
fn tokens_text(mul: u64) -> String {
    if mul == 1 {
        "T".into()
    } else {
        format!("{mul}T")
    }
}

/// `n`, `T`, `4T`, `⌈2T/64⌉`, `⌈T/64⌉+8` or `T/S`.
impl fmt::Display for LaunchDim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LaunchDim::Const(n) => write!(f, "{n}"),
            LaunchDim::Tok { mul, div, add } => {
                let t = tokens_text(mul);
                match div {
                    1 => write!(f, "{t}")?,
                    _ => write!(f, "⌈{t}/{div}⌉")?,
                }
                match add {
                    0 => Ok(()),
                    _ => write!(f, "+{add}"),
                }
            }
            LaunchDim::Rows => write!(f, "T/S"),
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
    /// The decode program's key (`value` false) or value cache of attention layer `layer`, bf16:
    /// a window layer's rings `[slots][window][width]`, a global layer's block pool
    /// `[blocks][KV_BLOCK][width]`.
    Cache {
        layer: u32,
        value: bool,
    },
    /// The global layers' block table, `int[slots][BlocksPerSlot]`: each slot's pool blocks in
    /// position order.
    BlockTable,
    /// Entries per slot of the block table (`ceil(max_sequence_length / KV_BLOCK)`).
    BlocksPerSlot,
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
    pub(crate) fn at(&self, off: u64) -> Arg {
        match *self {
            Arg::Scratch { index, offset } => Arg::Scratch { index, offset: offset + off },
            Arg::Value(v) => Arg::ValueAt { v, offset: off },
            Arg::ValueAt { v, offset } => Arg::ValueAt { v, offset: offset + off },
            _ => panic!("offset into a non-buffer argument"),
        }
    }
    /// `mul·T` as an `int`.
    pub(crate) fn tokens(mul: u64) -> Arg {
        Arg::Tokens { mul }
    }
    /// A size or count known at compile time, as an `int`.
    pub(crate) fn int(n: u64) -> Arg {
        Arg::Int(n as i64)
    }
    /// `arg` where `present`, else a null pointer.
    pub(crate) fn or_null(present: bool, arg: impl FnOnce() -> Arg) -> Arg {
        if present {
            arg()
        } else {
            Arg::Null
        }
    }
    /// The `accum` argument of a launch writing this buffer: only a node output can be a
    /// gradient sum.
    pub(crate) fn accum(&self) -> Arg {
        self.value().map_or(Arg::Int(0), Arg::Accum)
    }
    /// The argument as text, values written by `value` (e.g. [`vpmoe_ir::Graph::value_ref`]):
    /// `%3`, `@w+512`, `s0+64` (offsets in elements), `null`, `4T`, `S`, `S/T`, `tickets`, `8`,
    /// `1e-5`, `accum(%3)`, `kcache2`, `vcache2`, `blocks`, `blocks_per_slot`.
    pub fn to_text(&self, value: &dyn Fn(ValueId) -> String) -> String {
        let at = |base: String, offset: u64| if offset == 0 { base } else { format!("{base}+{offset}") };
        match *self {
            Arg::Value(v) => value(v),
            Arg::ValueAt { v, offset } => at(value(v), offset),
            Arg::Scratch { index, offset } => at(format!("s{index}"), offset),
            Arg::Null => "null".into(),
            Arg::Tokens { mul } => tokens_text(mul),
            Arg::Seq => "S".into(),
            Arg::InvRows => "S/T".into(),
            Arg::Tickets => "tickets".into(),
            Arg::Int(n) => n.to_string(),
            Arg::Float(x) => format!("{x:?}"),
            Arg::Accum(v) => format!("accum({})", value(v)),
            Arg::Cache { layer, value: false } => format!("kcache{layer}"),
            Arg::Cache { layer, value: true } => format!("vcache{layer}"),
            Arg::BlockTable => "blocks".into(),
            Arg::BlocksPerSlot => "blocks_per_slot".into(),
        }
    }
}

/// Node-private temporary storage: `dtype[per_token·T + fixed]`, live only during the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scratch {
    pub dtype: DType,
    pub per_token: u64,
    pub fixed: u64,
}

/// The buffer as a type: `f32[4T]`, `f32[256]`.
impl fmt::Display for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = match (self.per_token, self.fixed) {
            (0, n) => n.to_string(),
            (k, 0) => tokens_text(k),
            (k, n) => format!("{}+{n}", tokens_text(k)),
        };
        write!(f, "{}[{size}]", self.dtype.name())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub kernel: KernelSpec,
    pub args: Vec<Arg>,
    pub grid: [LaunchDim; 3],
    pub block: u32,
}

impl Launch {
    /// A launch of `f`, its arguments in the family's parameter order (the builders' path).
    /// Panics where an argument cannot bind to its parameter's C type: a lowering bug.
    pub fn of(f: &Family, targs: &[u64], args: Vec<Arg>, grid: [LaunchDim; 3]) -> Launch {
        for (a, (ct, p)) in args.iter().zip(f.params) {
            assert!(ct.accepts(a), "{}: parameter {p} is `{}`, given {a:?}", f.name, ct.c());
        }
        Launch { kernel: KernelSpec::new(f, targs), args, grid, block: f.threads }
    }

    /// One line: `vp_rmsnorm_D8 <<<T, 1, 1 | 256>>> (x=$x, w=@w, y=%0, rows=T, eps=1e-5)`, the
    /// grid, the block size and each argument named by its parameter.
    pub fn to_text(&self, value: &dyn Fn(ValueId) -> String) -> String {
        let [x, y, z] = self.grid;
        let params = self.kernel.family().params;
        let args: Vec<String> =
            params.iter().zip(&self.args).map(|((_, name), a)| format!("{name}={}", a.to_text(value))).collect();
        format!("{} <<<{x}, {y}, {z} | {}>>> ({})", self.kernel.name(), self.block, args.join(", "))
    }
}

/// `ceil(mul·T/div)` blocks.
pub(crate) fn tok(mul: u64, div: u64) -> LaunchDim {
    LaunchDim::Tok { mul, div, add: 0 }
}
pub(crate) fn one() -> LaunchDim {
    LaunchDim::Const(1)
}
/// One block per row of `mul·T` rows.
pub(crate) fn rows_grid(mul: u64) -> [LaunchDim; 3] {
    [tok(mul, 1), one(), one()]
}
/// `n` blocks.
pub(crate) fn blocks(n: u64) -> [LaunchDim; 3] {
    [LaunchDim::Const(n), one(), one()]
}

/// The launches and scratch buffers of one node, collected in order.
#[derive(Default)]
pub struct Lowered {
    pub launches: Vec<Launch>,
    pub scratch: Vec<Scratch>,
    /// The f32 row-range partials of a split weight gradient, shared by every split gemm_tn of the
    /// node: each launch's last blocks consume them before the next launch writes them.
    parts: Option<u32>,
}

impl Lowered {
    pub(crate) fn push(&mut self, l: Launch) {
        self.launches.push(l);
    }
    /// A scratch buffer of `per_token·T` elements.
    pub(crate) fn scratch_tok(&mut self, dtype: DType, per_token: u64) -> Arg {
        self.scratch.push(Scratch { dtype, per_token, fixed: 0 });
        Arg::Scratch { index: self.scratch.len() as u32 - 1, offset: 0 }
    }
    /// A scratch buffer of `n` elements, whatever the token count.
    pub(crate) fn scratch_fixed(&mut self, dtype: DType, n: u64) -> Arg {
        self.scratch.push(Scratch { dtype, per_token: 0, fixed: n });
        Arg::Scratch { index: self.scratch.len() as u32 - 1, offset: 0 }
    }
    /// The node's shared weight-gradient partials, grown to at least `n` f32 values.
    pub(crate) fn partials(&mut self, n: u64) -> Arg {
        match self.parts {
            Some(index) => {
                let s = &mut self.scratch[index as usize];
                s.fixed = s.fixed.max(n);
                Arg::Scratch { index, offset: 0 }
            }
            None => {
                let a = self.scratch_fixed(DType::F32, n);
                self.parts = Some(self.scratch.len() as u32 - 1);
                a
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpmoe_ir::{Node, Op};

    #[test]
    fn launch_dims() {
        let t = |mul, div, add| LaunchDim::Tok { mul, div, add }.to_string();
        assert_eq!(LaunchDim::Const(7).to_string(), "7");
        assert_eq!(LaunchDim::Rows.to_string(), "T/S");
        assert_eq!([t(1, 1, 0), t(4, 1, 0), t(1, 64, 0), t(2, 64, 8)], ["T", "4T", "⌈T/64⌉", "⌈2T/64⌉+8"]);
    }

    #[test]
    fn args_and_scratch() {
        let value = |v: ValueId| format!("%{}", v.0);
        let args = [
            Arg::Value(ValueId(3)),
            Arg::ValueAt { v: ValueId(3), offset: 512 },
            Arg::Scratch { index: 0, offset: 0 },
            Arg::Scratch { index: 1, offset: 64 },
            Arg::Null,
            Arg::Tokens { mul: 1 },
            Arg::Tokens { mul: 4 },
            Arg::Seq,
            Arg::InvRows,
            Arg::Tickets,
            Arg::Int(-2),
            Arg::Float(1e-5),
            Arg::Accum(ValueId(3)),
        ];
        let text: Vec<String> = args.iter().map(|a| a.to_text(&value)).collect();
        let want = ["%3", "%3+512", "s0", "s1+64", "null", "T", "4T", "S", "S/T", "tickets", "-2", "1e-5", "accum(%3)"];
        assert_eq!(text, want);
        let scratch = |per_token, fixed| Scratch { dtype: DType::F32, per_token, fixed }.to_string();
        assert_eq!([scratch(4, 0), scratch(0, 256), scratch(1, 8)], ["f32[4T]", "f32[256]", "f32[T+8]"]);
    }

    #[test]
    fn launch_text_names_each_argument() {
        let ids = |r: std::ops::Range<u32>| r.map(ValueId).collect();
        let node =
            Node { name: "norm".into(), op: Op::RmsNorm { dim: 8, eps: 1e-5 }, inputs: ids(0..2), outputs: ids(2..3) };
        let (launches, scratch) = crate::lower_node(&node);
        let names = ["$x", "@w", "%0"];
        let text = launches[0].to_text(&|v| names[v.0 as usize].to_string());
        assert_eq!(text, "vp_rmsnorm_D8 <<<T, 1, 1 | 256>>> (x=$x, w=@w, y=%0, rows=T, eps=1e-5)");
        assert_eq!((launches.len(), scratch.len()), (1, 0));
    }
}
