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
pub mod rng;
pub mod types;
pub mod verify;

/// Lower-case hex of a byte slice (digests in plans, checkpoints and manifests).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
pub mod write;

pub use graph::{
    Graph, Init, Input, InputKind, InputName, Node, NodeId, OptGroup, OutputName, Param, ParamId, Role, Value,
    ValueDef, ValueId,
};
pub use op::{grad_type, Attn, AttnKind, GroupLimit, Op, Vjp};
pub use parse::{parse_graph, split_graph_text, ParseError};
pub use types::{DType, Dim, TensorType};
pub use verify::verify;
