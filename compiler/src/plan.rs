//! The plan: kernels with launch shapes, a liveness-based memory plan, the parameter table, the
//! report and the fingerprint. Every activation scales with `T` (no tensor is `S×S`), so buffers
//! live in two arenas: one sized in bytes per token (offsets valid for any `T`) and one fixed.
//! [`schedule`] is the part that needs only the graph; [`Plan::to_text`] prints the steps with
//! their launch arguments and the memory plan.

use crate::config::Arch;
use crate::optimizer::OptimizerPlan;
use crate::report::Report;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt::Write;
use vpmoe_codegen::{lower_node, Arg, Launch, Scratch};
use vpmoe_ir::{Graph, Init, OptGroup, Role, TensorType, ValueDef, ValueId};

pub const PLAN_FORMAT: u32 = 8;
pub const COMPILER_VERSION: &str = concat!("vpmoec ", env!("CARGO_PKG_VERSION"));

/// Per-token buffer sizes are rounded to this many bytes (so every offset is aligned for any `T`).
const TOK_ALIGN: u64 = 16;
const FIXED_ALIGN: u64 = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamEntry {
    pub name: String,
    pub ty: TensorType,
    pub numel: u64,
    pub init: Init,
    pub opt: OptGroup,
    pub weight_decay: bool,
    pub role: Role,
}

impl ParamEntry {
    pub fn trainable(&self) -> bool {
        self.opt != OptGroup::Frozen
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferKey {
    /// An IR value (graph input or node output), by value id.
    Value(u32),
    /// Scratch `index` of node `node`.
    Scratch { node: u32, index: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arena {
    /// Offset and size are bytes per token.
    Tok,
    Fixed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Buffer {
    pub key: BufferKey,
    pub arena: Arena,
    pub offset: u64,
    pub size: u64,
    /// First and last node index (inclusive) during which it is live.
    pub live: (u32, u32),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub node: String,
    pub launches: Vec<Launch>,
    /// Parameters (plan indices) whose gradient this node finalises. Those gradient values have
    /// no buffer: a backend binds them to the step's gradient sums, and the launch writing each
    /// adds into the sum ([`Arg::Accum`]) from the step's second micro-batch on, so no transient
    /// copy of the model's gradient exists and the sum costs no pass of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grads: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelEntry {
    pub name: String,
    pub family: String,
    pub targs: Vec<u64>,
    pub block: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: u32,
    pub compiler: String,
    pub fingerprint: String,
    pub arch: Arch,
    pub params: Vec<ParamEntry>,
    /// Unique kernels, sorted by name.
    pub kernels: Vec<KernelEntry>,
    /// One step per IR node, in execution order.
    pub steps: Vec<Step>,
    pub buffers: Vec<Buffer>,
    pub tok_arena_bytes_per_token: u64,
    pub fixed_arena_bytes: u64,
    pub optimizer: OptimizerPlan,
    pub report: Report,
}

/// `sha256(plan format ‖ config without its name ‖ IR text without its name line ‖ steps,
/// buffers and optimizer plan ‖ kernel templates)`: plans with one fingerprint run the same
/// graph with the same launches and kernel code, which is what a bitwise resume needs; renaming a
/// config does not change it.
fn fingerprint(arch: &Arch, g: &Graph, steps: &[Step], buffers: &[Buffer], opt: &OptimizerPlan) -> String {
    let mut a = arch.clone();
    a.name = String::new();
    let text = g.to_text();
    let mut h = Sha256::new();
    h.update(PLAN_FORMAT.to_le_bytes());
    h.update(a.canonical_json());
    h.update(text.split_once('\n').map_or("", |(_, body)| body));
    for part in [serde_json::to_vec(steps), serde_json::to_vec(buffers), serde_json::to_vec(opt)] {
        h.update(part.expect("plan parts serialise"));
    }
    h.update(vpmoe_codegen::headers::digest());
    vpmoe_ir::hex(&h.finalize())
}

struct Req {
    key: BufferKey,
    arena: Arena,
    size: u64,
    live: (u32, u32),
}

/// First-fit assignment by increasing start time; buffers whose live ranges overlap never overlap
/// in memory. Returns the arena size.
fn assign(reqs: &[&Req]) -> (Vec<u64>, u64) {
    let mut offsets = vec![0u64; reqs.len()];
    let mut active: Vec<(u64, u64, u32)> = Vec::new(); // (offset, size, end)
    let mut peak = 0;
    for (i, r) in reqs.iter().enumerate() {
        active.retain(|a| a.2 >= r.live.0);
        active.sort_by_key(|a| a.0);
        let mut off = 0;
        for a in &active {
            if off + r.size <= a.0 {
                break;
            }
            off = off.max(a.0 + a.1);
        }
        offsets[i] = off;
        peak = peak.max(off + r.size);
        active.push((off, r.size, r.live.1));
    }
    (offsets, peak)
}

/// Per node: the parameters (graph order) whose gradient output it produces, and each such
/// output's value.
fn finalised_grads(g: &Graph) -> Vec<Vec<(u32, vpmoe_ir::ValueId)>> {
    let mut out = vec![Vec::new(); g.nodes.len()];
    for pi in 0..g.params.len() as u32 {
        if let Some(v) = g.output_named(&vpmoe_ir::OutputName::Grad(vpmoe_ir::ParamId(pi))) {
            if let vpmoe_ir::ValueDef::Node(id, _) = g.value(v).def {
                out[id.0 as usize].push((pi, v));
            }
        }
    }
    out
}

/// A finalised gradient is f32, is one graph output, is read by no node, and is written only by
/// launches that carry an accum flag of a gradient finalised by the same node (the flags of such
/// gradients bind alike: all of them live in the step's sums). A launch with a flag writes no f32
/// output of its node that is not finalised (it would add into a buffer that is not a sum). Then
/// the gradients can live in the step's sums. A lowering that breaks this is a compiler bug,
/// caught when the plan is built.
fn check_summed_in_place(g: &Graph, node: usize, finals: &[vpmoe_ir::ValueId], launches: &[Launch]) {
    let n = &g.nodes[node];
    let name = &n.name;
    for &v in finals {
        assert_eq!(g.value(v).ty.dtype, vpmoe_ir::DType::F32, "{name}: gradient %{} is not f32", v.0);
        assert_eq!(g.outputs.iter().filter(|(_, o)| *o == v).count(), 1, "{name}: gradient %{} is output twice", v.0);
        assert!(!g.nodes.iter().any(|n| n.inputs.contains(&v)), "{name}: gradient %{} is read by a node", v.0);
        assert!(
            launches.iter().any(|l| l.args.iter().any(|a| a.value() == Some(v))),
            "{name}: no launch writes gradient %{}",
            v.0
        );
    }
    for l in launches {
        let flagged = l.args.iter().any(|a| matches!(a, Arg::Accum(u) if finals.contains(u)));
        for a in &l.args {
            let Some(v) = a.value() else { continue };
            if finals.contains(&v) {
                assert!(flagged, "{name}: {} writes gradient %{} without its accum flag", l.kernel.name(), v.0);
            } else if flagged && n.outputs.contains(&v) && g.value(v).ty.dtype == vpmoe_ir::DType::F32 {
                panic!(
                    "{name}: {} has an accum flag and writes %{}, which is not a gradient sum",
                    l.kernel.name(),
                    v.0
                );
            }
        }
    }
}

/// The part of a plan that needs only the graph: one step per node with its launches, the
/// scratch buffers each node's lowering asked for, and the memory plan. Filetests plan
/// hand-written graphs with it.
pub struct Schedule {
    pub steps: Vec<Step>,
    /// Per step, its node's scratch buffers, in the order `Arg::Scratch` indexes them.
    pub scratch: Vec<Vec<Scratch>>,
    pub buffers: Vec<Buffer>,
    pub tok_arena_bytes_per_token: u64,
    pub fixed_arena_bytes: u64,
}

/// Per-token buffer sizes in bytes per token, fixed ones in bytes, each rounded to its arena's
/// alignment.
fn sized(ty: &TensorType) -> (Arena, u64) {
    let (per_tok, fixed) = ty.numel_split();
    if ty.scales_with_tokens() {
        (Arena::Tok, (per_tok * ty.dtype.bytes()).next_multiple_of(TOK_ALIGN))
    } else {
        (Arena::Fixed, (fixed * ty.dtype.bytes()).next_multiple_of(FIXED_ALIGN))
    }
}

/// Lowers every node and assigns every buffer (graph inputs, node outputs that are not
/// finalised gradients, scratch) an arena offset.
pub fn schedule(g: &Graph) -> Schedule {
    let n_nodes = g.nodes.len() as u32;
    let grads = finalised_grads(g);
    let last: Vec<Option<usize>> = g.last_uses();
    let mut reqs = Vec::new();
    for inp in &g.inputs {
        let (arena, size) = sized(&g.value(inp.value).ty);
        reqs.push(Req { key: BufferKey::Value(inp.value.0), arena, size, live: (0, n_nodes) });
    }
    let mut steps = Vec::new();
    let mut scratches = Vec::new();
    for (ni, node) in g.nodes.iter().enumerate() {
        let ni = ni as u32;
        let (launches, scratch) = lower_node(node);
        let finals: Vec<vpmoe_ir::ValueId> = grads[ni as usize].iter().map(|&(_, v)| v).collect();
        check_summed_in_place(g, ni as usize, &finals, &launches);
        for v in &node.outputs {
            if grads[ni as usize].iter().any(|&(_, gv)| gv == *v) {
                continue; // lives in the step's gradient sum
            }
            let (arena, size) = sized(&g.value(*v).ty);
            let end = last[v.0 as usize].map(|x| x as u32).unwrap_or(ni);
            reqs.push(Req { key: BufferKey::Value(v.0), arena, size, live: (ni, end) });
        }
        for (si, s) in scratch.iter().enumerate() {
            let ty = if s.per_token > 0 {
                TensorType::tok(s.dtype, &[s.per_token])
            } else {
                TensorType::fixed(s.dtype, &[s.fixed])
            };
            let (arena, size) = sized(&ty);
            reqs.push(Req { key: BufferKey::Scratch { node: ni, index: si as u32 }, arena, size, live: (ni, ni) });
        }
        steps.push(Step { node: node.name.clone(), launches, grads: grads[ni as usize].iter().map(|g| g.0).collect() });
        scratches.push(scratch);
    }
    let mut buffers = Vec::new();
    let mut sizes = (0, 0);
    for arena in [Arena::Tok, Arena::Fixed] {
        let rs: Vec<&Req> = reqs.iter().filter(|r| r.arena == arena).collect();
        let (offs, peak) = assign(&rs);
        for (r, off) in rs.iter().zip(offs) {
            buffers.push(Buffer { key: r.key.clone(), arena, offset: off, size: r.size, live: r.live });
        }
        match arena {
            Arena::Tok => sizes.0 = peak,
            Arena::Fixed => sizes.1 = peak,
        }
    }
    buffers.sort_by(|a, b| a.key.cmp(&b.key));
    Schedule { steps, scratch: scratches, buffers, tok_arena_bytes_per_token: sizes.0, fixed_arena_bytes: sizes.1 }
}

/// Peak node-private scratch of one micro-batch of `max_seq` tokens (the report's workspace).
fn workspace(buffers: &[Buffer], max_seq: u64) -> u64 {
    let mut per_node: BTreeMap<u32, u64> = BTreeMap::new();
    for b in buffers {
        if let BufferKey::Scratch { node, .. } = b.key {
            *per_node.entry(node).or_default() += if b.arena == Arena::Tok { b.size * max_seq } else { b.size };
        }
    }
    per_node.into_values().max().unwrap_or(0)
}

/// The distinct kernels of `steps`' launches, by name.
pub fn kernel_entries<'a>(steps: impl IntoIterator<Item = &'a Step>) -> BTreeMap<String, KernelEntry> {
    let mut kernels = BTreeMap::new();
    for l in steps.into_iter().flat_map(|s| &s.launches) {
        kernels.entry(l.kernel.name()).or_insert_with(|| KernelEntry {
            name: l.kernel.name(),
            family: l.kernel.family.clone(),
            targs: l.kernel.targs.clone(),
            block: l.block,
        });
    }
    kernels
}

pub fn build(g: &Graph, arch: &Arch) -> Plan {
    let Schedule { steps, buffers, tok_arena_bytes_per_token, fixed_arena_bytes, .. } = schedule(g);
    let mut kernels = kernel_entries(&steps);
    let params: Vec<ParamEntry> = g
        .params
        .iter()
        .map(|p| ParamEntry {
            name: p.name.clone(),
            ty: p.ty.clone(),
            numel: p.numel(),
            init: p.init,
            opt: p.opt,
            weight_decay: p.weight_decay,
            role: p.role,
        })
        .collect();
    let optimizer = crate::optimizer::build(g, arch);
    for (k, block) in optimizer.kernels(&params) {
        kernels.insert(k.name(), KernelEntry { name: k.name(), family: k.family.clone(), targs: k.targs, block });
    }
    let kernels: Vec<KernelEntry> = kernels.into_values().collect();
    let report = crate::report::report(
        g,
        arch,
        &params,
        tok_arena_bytes_per_token,
        fixed_arena_bytes,
        workspace(&buffers, arch.max_seq),
        kernels.len(),
        steps.iter().map(|s| s.launches.len()).sum(),
        &optimizer,
    );
    Plan {
        format: PLAN_FORMAT,
        compiler: COMPILER_VERSION.into(),
        fingerprint: fingerprint(arch, g, &steps, &buffers, &optimizer),
        arch: arch.clone(),
        params,
        kernels,
        steps,
        buffers,
        tok_arena_bytes_per_token,
        fixed_arena_bytes,
        optimizer,
        report,
    }
}

impl Plan {
    /// Adds the kernels of `steps` (the decode program's) to the ones the plan compiles.
    pub fn add_kernels<'a>(&mut self, steps: impl IntoIterator<Item = &'a Step>) {
        let mut all: BTreeMap<String, KernelEntry> =
            std::mem::take(&mut self.kernels).into_iter().map(|k| (k.name.clone(), k)).collect();
        all.extend(kernel_entries(steps));
        self.kernels = all.into_values().collect();
    }

    /// The buffer holding a value, if it has one (parameters live in the parameter store).
    pub fn buffer_of(&self, key: &BufferKey) -> Option<&Buffer> {
        self.buffers.binary_search_by(|b| b.key.cmp(key)).ok().map(|i| &self.buffers[i])
    }

    /// The steps and the memory plan as text (see [`Schedule::steps_text`] and
    /// [`Schedule::memory_text`]). `g` is the graph the plan was built from; the scratch types
    /// come from lowering its nodes again (the plan keeps only their sizes).
    pub fn to_text(&self, g: &Graph) -> String {
        let refs = value_refs(g);
        let scratch: Vec<Vec<Scratch>> = g.nodes.iter().map(|n| lower_node(n).1).collect();
        let (tok, fixed) = (self.tok_arena_bytes_per_token, self.fixed_arena_bytes);
        steps_text(g, &refs, &self.steps, &scratch) + "\n" + &memory_text(g, &refs, &self.buffers, tok, fixed)
    }
}

impl Schedule {
    /// Per step, `INDEX NODE` and, indented, each launch ([`Launch::to_text`]), each scratch
    /// buffer (`s0: f32[4T]`) and the parameters whose gradient it finalises (`grads: @a, @b`).
    pub fn steps_text(&self, g: &Graph) -> String {
        steps_text(g, &value_refs(g), &self.steps, &self.scratch)
    }

    /// The arena sizes, then every buffer: `KEY: ARENA [START, END) live FIRST..=LAST`, in bytes
    /// (per token in the tok arena) and node indices; a scratch buffer's key is `NODE/s0`.
    pub fn memory_text(&self, g: &Graph) -> String {
        memory_text(g, &value_refs(g), &self.buffers, self.tok_arena_bytes_per_token, self.fixed_arena_bytes)
    }
}

/// Every value's reference in the text form ([`Graph::value_ref`], in one pass).
fn value_refs(g: &Graph) -> Vec<String> {
    let mut node_outputs = 0;
    let refs = g.values.iter().enumerate().map(|(i, v)| match v.def {
        ValueDef::Node(..) => {
            node_outputs += 1;
            format!("%{}", node_outputs - 1)
        }
        _ => g.value_ref(ValueId(i as u32)),
    });
    refs.collect()
}

fn steps_text(g: &Graph, refs: &[String], steps: &[Step], scratch: &[Vec<Scratch>]) -> String {
    let value = |v: ValueId| refs[v.0 as usize].clone();
    let mut s = String::new();
    for (i, (st, scratch)) in steps.iter().zip(scratch).enumerate() {
        writeln!(s, "{i} {}", st.node).unwrap();
        for l in &st.launches {
            writeln!(s, "  {}", l.to_text(&value)).unwrap();
        }
        for (k, b) in scratch.iter().enumerate() {
            writeln!(s, "  s{k}: {b}").unwrap();
        }
        if !st.grads.is_empty() {
            let grads: Vec<String> = st.grads.iter().map(|&p| value(g.params[p as usize].value)).collect();
            writeln!(s, "  grads: {}", grads.join(", ")).unwrap();
        }
    }
    s
}

fn memory_text(g: &Graph, refs: &[String], buffers: &[Buffer], tok: u64, fixed: u64) -> String {
    let mut s = format!("tok arena: {tok} B/token\nfixed arena: {fixed} B\n");
    for b in buffers {
        let key = match b.key {
            BufferKey::Value(v) => refs[v as usize].clone(),
            BufferKey::Scratch { node, index } => format!("{}/s{index}", g.nodes[node as usize].name),
        };
        let arena = match b.arena {
            Arena::Tok => "tok",
            Arena::Fixed => "fixed",
        };
        let (start, end) = (b.offset, b.offset + b.size);
        writeln!(s, "  {key}: {arena} [{start}, {end}) live {}..={}", b.live.0, b.live.1).unwrap();
    }
    s
}
