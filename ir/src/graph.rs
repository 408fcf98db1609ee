//! The graph: typed `u32` ids into arenas. Values are defined once, by a graph input, a parameter
//! or a node output; nodes are stored in execution order.

use crate::op::Op;
use crate::types::TensorType;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId(pub u32);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u32);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ParamId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueDef {
    Input(u32),
    Param(ParamId),
    Node(NodeId, u32),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Value {
    pub ty: TensorType,
    pub def: ValueDef,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique, hierarchical name (`blk12.attn.core`); also the NVTX range name.
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// Per-token data from the dataset.
    Data,
    /// A runtime scalar (never baked into kernels).
    Scalar,
}

/// A graph input: a batch field or a step scalar, each of which the runtime supplies by kind.
/// Text: `$tokens`, `$loss_grad`, …
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputName {
    Tokens,
    Doc,
    Labels,
    LossMask,
    Span,
    SpanScale,
    TeacherLogp,
    /// The sampler's log-probability of each sampled token (stage 3's importance ratio).
    SamplerLogp,
    Teacher,
    Kd,
    /// The seed of the loss gradient (1 for a plain step).
    LossGrad,
    /// The seed of every sequence aux loss's gradient, `α/M` (MODEL.md §4.10).
    AuxGrad,
    /// Decode: each token's position in its sequence.
    Pos,
    /// Decode: each token's sequence slot (which cache rows it writes and reads).
    Slot,
    /// Any other input (hand-written graphs); the runtime supplies none.
    Other(String),
}

impl InputName {
    const NAMED: [(InputName, &'static str); 14] = [
        (InputName::Tokens, "tokens"),
        (InputName::Doc, "doc"),
        (InputName::Labels, "labels"),
        (InputName::LossMask, "loss_mask"),
        (InputName::Span, "span"),
        (InputName::SpanScale, "span_scale"),
        (InputName::TeacherLogp, "teacher_logp"),
        (InputName::SamplerLogp, "sampler_logp"),
        (InputName::Teacher, "teacher"),
        (InputName::Kd, "kd"),
        (InputName::LossGrad, "loss_grad"),
        (InputName::AuxGrad, "aux_grad"),
        (InputName::Pos, "pos"),
        (InputName::Slot, "slot"),
    ];
    pub fn parse(name: &str) -> InputName {
        Self::NAMED
            .iter()
            .find(|(_, n)| *n == name)
            .map_or_else(|| InputName::Other(name.to_string()), |(i, _)| i.clone())
    }
}

impl std::fmt::Display for InputName {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            InputName::Other(s) => f.write_str(s),
            i => f.write_str(Self::NAMED.iter().find(|(n, _)| n == i).expect("every named input has its text").1),
        }
    }
}

/// A graph output, by what the runtime does with it. Text: `loss`, `token_loss`, `aux.blkN`,
/// `load.blkN` (N the 1-based layer number), `grad.<parameter name>`, `logits`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputName {
    /// The span-normalised step objective (seeded by `loss_grad`).
    Loss,
    /// Per-token cross-entropy (per-span means, held-out loss).
    TokenLoss,
    /// A MoE layer's sequence aux loss without α (seeded by `aux_grad`).
    AuxLoss { layer: u32 },
    /// A MoE layer's per-expert row offsets: the router loads.
    RouterLoad { layer: u32 },
    /// The f32 gradient of a trainable parameter.
    Grad(ParamId),
    /// Decode: the LM head's logits of every token.
    Logits,
    /// Any other output (hand-written graphs); the runtime gives it no meaning.
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub name: InputName,
    pub kind: InputKind,
    pub value: ValueId,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    Zeros,
    Ones,
    Normal {
        std: f32,
    },
    Const {
        value: f32,
    },
    /// GRAPE-M log-frequencies `l_i = scale·ln(base^(−2i/head_dim))`.
    LogFreq {
        scale: f32,
        base: f32,
        head_dim: u64,
    },
}

/// Which optimizer updates a parameter (MODEL.md §3: Normuon iff 2-D and not embedding/head; a
/// stacked `[E, r, c]` expert tensor is E separate Normuon matrices).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptGroup {
    Normuon,
    AdamW,
    /// Not trained by the optimizer (expert bias, fixed frequencies).
    Frozen,
}

/// What a parameter is, for counting active parameters and for the runtime's special cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    InputEmbedding,
    OutputHead,
    /// Tied embeddings: one table is both.
    TiedEmbedding,
    /// Routed-expert tensor stacked over `experts`, of which `topk` are active per token.
    Experts {
        experts: u64,
        topk: u64,
    },
    /// A MoE layer's router expert bias (§4.11: updated from the loads, not by the optimizer);
    /// `layer` is the 1-based layer number.
    ExpertBias {
        layer: u32,
    },
    Other,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Param {
    /// Megatron state-dict name (0-indexed layers), except stacked experts.
    pub name: String,
    pub ty: TensorType,
    pub init: Init,
    pub opt: OptGroup,
    /// Decoupled weight decay applies (multiplier 1) or not (0).
    pub weight_decay: bool,
    pub role: Role,
    pub value: ValueId,
}

impl Param {
    pub fn numel(&self) -> u64 {
        self.ty.numel(0)
    }
    pub fn trainable(&self) -> bool {
        self.opt != OptGroup::Frozen
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    pub params: Vec<Param>,
    pub inputs: Vec<Input>,
    pub outputs: Vec<(OutputName, ValueId)>,
}

impl Graph {
    pub fn new(name: &str) -> Self {
        Graph { name: name.to_string(), ..Default::default() }
    }

    fn new_value(&mut self, ty: TensorType, def: ValueDef) -> ValueId {
        self.values.push(Value { ty, def });
        ValueId(self.values.len() as u32 - 1)
    }

    pub fn input(&mut self, name: InputName, kind: InputKind, ty: TensorType) -> ValueId {
        let v = self.new_value(ty, ValueDef::Input(self.inputs.len() as u32));
        self.inputs.push(Input { name, kind, value: v });
        v
    }

    pub fn param(
        &mut self,
        name: String,
        ty: TensorType,
        init: Init,
        opt: OptGroup,
        weight_decay: bool,
        role: Role,
    ) -> ValueId {
        let id = ParamId(self.params.len() as u32);
        let v = self.new_value(ty.clone(), ValueDef::Param(id));
        self.params.push(Param { name, ty, init, opt, weight_decay, role, value: v });
        v
    }

    /// Appends a node; output types come from the op's signature.
    pub fn node(&mut self, name: String, op: Op, inputs: Vec<ValueId>) -> Vec<ValueId> {
        let id = NodeId(self.nodes.len() as u32);
        let outs: Vec<ValueId> = op
            .signature()
            .1
            .into_iter()
            .enumerate()
            .map(|(i, (_, ty))| self.new_value(ty, ValueDef::Node(id, i as u32)))
            .collect();
        self.nodes.push(Node { name, op, inputs, outputs: outs.clone() });
        outs
    }

    pub fn output(&mut self, name: OutputName, v: ValueId) {
        self.outputs.push((name, v));
    }

    pub fn value(&self, v: ValueId) -> &Value {
        &self.values[v.0 as usize]
    }

    pub fn param_of(&self, v: ValueId) -> Option<&Param> {
        match self.value(v).def {
            ValueDef::Param(p) => Some(&self.params[p.0 as usize]),
            _ => None,
        }
    }

    pub fn input_named(&self, name: &InputName) -> Option<&Input> {
        self.inputs.iter().find(|i| i.name == *name)
    }

    pub fn output_named(&self, name: &OutputName) -> Option<ValueId> {
        self.outputs.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// An output's name in the text form.
    pub fn output_text(&self, name: &OutputName) -> String {
        match name {
            OutputName::Loss => "loss".into(),
            OutputName::TokenLoss => "token_loss".into(),
            OutputName::AuxLoss { layer } => format!("aux.blk{layer}"),
            OutputName::RouterLoad { layer } => format!("load.blk{layer}"),
            OutputName::Grad(p) => format!("grad.{}", self.params[p.0 as usize].name),
            OutputName::Logits => "logits".into(),
            OutputName::Other(s) => s.clone(),
        }
    }

    /// The output a text-form name denotes (`grad.<name>` of a parameter of this graph).
    pub fn parse_output_name(&self, s: &str) -> OutputName {
        let layer = |prefix: &str| s.strip_prefix(prefix).and_then(|n| n.parse::<u32>().ok());
        if let Some(layer) = layer("aux.blk") {
            return OutputName::AuxLoss { layer };
        }
        if let Some(layer) = layer("load.blk") {
            return OutputName::RouterLoad { layer };
        }
        if let Some(p) = s.strip_prefix("grad.").and_then(|n| self.params.iter().position(|p| p.name == n)) {
            return OutputName::Grad(ParamId(p as u32));
        }
        match s {
            "loss" => OutputName::Loss,
            "token_loss" => OutputName::TokenLoss,
            "logits" => OutputName::Logits,
            _ => OutputName::Other(s.to_string()),
        }
    }

    /// Index of the last node reading each value (graph outputs live to the end).
    pub fn last_uses(&self) -> Vec<Option<usize>> {
        let mut last = vec![None; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for v in &n.inputs {
                last[v.0 as usize] = Some(i);
            }
        }
        for (_, v) in &self.outputs {
            last[v.0 as usize] = Some(self.nodes.len());
        }
        last
    }
}
