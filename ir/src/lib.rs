//! vpmoe IR: pure data. Typed `u32` ids into arenas ([`graph`]), tensor types ([`types`]), the
//! closed set of fused ops ([`op`]), the canonical text form ([`write`]) and its parser
//! ([`parse`]), the verifier ([`verify`]) the reference semantics of every op ([`reference`])
//! and of its vector–Jacobian product ([`backward`]). No I/O, no GPU.

pub mod backward;
pub mod graph;
pub mod op;
pub mod optim;
pub mod parse;
pub mod reference;
pub mod types;
pub mod verify;
pub mod write;

pub use graph::{
    Graph, Init, Input, InputKind, InputName, Node, NodeId, OptGroup, OutputName, Param, ParamId, Role, Value, ValueDef,
    ValueId,
};
pub use op::{grad_type, Attn, AttnKind, GroupLimit, Op, Vjp};
pub use parse::{parse_graph, split_graph_text, ParseError};
pub use types::{DType, Dim, TensorType};
pub use verify::verify;
