//! vpmoe IR: pure data. Typed `u32` ids into arenas ([`graph`]), tensor types ([`types`]), the
//! closed set of fused ops ([`op`]), the canonical text form ([`write`]), the verifier
//! ([`verify`]) and the reference semantics of every op ([`reference`]). No I/O, no GPU.

pub mod graph;
pub mod op;
pub mod reference;
pub mod types;
pub mod verify;
pub mod write;

pub use graph::{
    Graph, Init, Input, InputKind, Node, NodeId, OptGroup, Param, ParamId, Role, Value, ValueDef, ValueId,
};
pub use op::{Attn, AttnKind, GroupLimit, Op};
pub use types::{DType, Dim, TensorType};
pub use verify::verify;
