//! `vpmoec compile --report`: parameter counts, FLOPs per token (MODEL.md §9–10) and the memory
//! budget by category, all derived from the graph and plan so they hold for every valid config.

use crate::config::Arch;
use crate::plan::ParamEntry;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use vpmoe_ir::{DType, Graph, OptGroup, Role};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// Model-dtype copies of every parameter and buffer (bf16, f32 where the IR says so).
    pub weights: u64,
    pub masters: u64,
    /// The step's fp32 gradient sums (a micro-batch's gradients are added in as produced).
    pub gradients: u64,
    /// Normuon momentum + row second moment; AdamW first and second moments.
    pub optimizer_state: u64,
    /// Peak of the activation arenas for a training step (forward and backward) of one
    /// micro-batch of `seq_len` tokens (including each parameter gradient until it is added into
    /// its sum), excluding the workspace.
    pub activations: u64,
    /// The largest node-private scratch of one node (kernel temporaries: split-K partials,
    /// softmax statistics, dispatch offsets), at `seq_len` tokens.
    pub workspace: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub arch: String,
    pub seq_len: u64,
    pub layers: u64,
    pub params_total: u64,
    pub params_active: u64,
    pub params_active_excl_embedding_and_head: u64,
    pub forward_flops_per_token: f64,
    pub training_flops_per_token: f64,
    pub kernels: usize,
    pub launches: usize,
    pub activation_bytes_per_token: u64,
    pub fixed_arena_bytes: u64,
    /// Normuon matrices and the batched Polar Express operations that orthogonalise them per
    /// step (one per shape family, D10).
    pub normuon_matrices: u64,
    pub polar_express_launches: usize,
    pub memory: Memory,
    /// Generation: the bf16 K/V one sequence of `seq_len` positions keeps in the decode
    /// program's caches (window layers a ring of their window, global layers every position).
    #[serde(default)]
    pub kv_cache_bytes_per_sequence: u64,
}

#[allow(clippy::too_many_arguments)]
pub fn report(
    g: &Graph,
    arch: &Arch,
    params: &[ParamEntry],
    tok_bytes: u64,
    fixed_bytes: u64,
    workspace: u64,
    kernels: usize,
    launches: usize,
    opt: &crate::optimizer::OptimizerPlan,
) -> Report {
    let trainable = params.iter().filter(|p| p.opt != OptGroup::Frozen);
    let (mut total, mut active, mut core) = (0u64, 0u64, 0u64);
    for p in trainable {
        total += p.numel;
        let a = match p.role {
            Role::Experts { experts, topk } => p.numel / experts * topk,
            _ => p.numel,
        };
        active += a;
        if !matches!(p.role, Role::InputEmbedding | Role::OutputHead | Role::TiedEmbedding) {
            core += a;
        }
    }
    let s = arch.max_seq;
    let fwd: u128 = g.nodes[..crate::autodiff::forward_len(g)].iter().map(|n| n.op.flops_per_sequence(s)).sum();
    let fwd_tok = fwd as f64 / s as f64;

    let mut mem = Memory {
        weights: 0,
        masters: 0,
        gradients: 0,
        optimizer_state: 0,
        activations: tok_bytes * s + fixed_bytes,
        workspace,
    };
    for p in params {
        mem.weights += p.numel * p.ty.dtype.bytes();
        if p.opt == OptGroup::Frozen {
            continue;
        }
        mem.masters += p.numel * DType::F32.bytes();
        mem.gradients += p.numel * DType::F32.bytes();
        mem.optimizer_state += match p.opt {
            OptGroup::Normuon => {
                let rows: u64 = p.ty.numel(0) / p.ty.dims.last().map(|d| d.eval(0)).unwrap_or(1);
                (p.numel + rows) * 4
            }
            _ => 2 * p.numel * 4,
        };
    }
    // The arenas also hold the workspace, counted apart. `gradients` are the step's sums, held
    // beside the masters; a node's gradient output occupies the arena only until it is added in.
    mem.activations = mem.activations.saturating_sub(mem.workspace);
    Report {
        arch: arch.name.clone(),
        seq_len: s,
        layers: arch.layers,
        params_total: total,
        params_active: active,
        params_active_excl_embedding_and_head: core,
        forward_flops_per_token: fwd_tok,
        training_flops_per_token: 3.0 * fwd_tok,
        kernels,
        launches,
        activation_bytes_per_token: tok_bytes,
        fixed_arena_bytes: fixed_bytes,
        normuon_matrices: opt.families.iter().map(|f| f.matrices()).sum(),
        polar_express_launches: opt.families.len(),
        memory: mem,
        kv_cache_bytes_per_sequence: 0,
    }
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl Report {
    pub fn human(&self) -> String {
        let mut s = String::new();
        let m = &self.memory;
        writeln!(s, "{} ({} layers, seq {})", self.arch, self.layers, self.seq_len).unwrap();
        writeln!(s, "  parameters, total                          {:>16}", group(self.params_total)).unwrap();
        writeln!(s, "  parameters, active per token               {:>16}", group(self.params_active)).unwrap();
        writeln!(
            s,
            "  active, excluding embedding and head       {:>16}",
            group(self.params_active_excl_embedding_and_head)
        )
        .unwrap();
        writeln!(s, "  forward FLOPs per token                    {:>16.4e}", self.forward_flops_per_token).unwrap();
        writeln!(s, "  training FLOPs per token (3x forward)      {:>16.4e}", self.training_flops_per_token).unwrap();
        writeln!(s, "  kernels / launches per training step       {:>9} / {}", self.kernels, self.launches).unwrap();
        writeln!(
            s,
            "  Normuon matrices / Polar Express launches  {:>9} / {}",
            group(self.normuon_matrices),
            self.polar_express_launches
        )
        .unwrap();
        writeln!(
            s,
            "  memory: weights {}, fp32 masters {}, fp32 gradients {}, optimizer state {}, activations (1×{}) {}, \
             workspace {}",
            gib(m.weights),
            gib(m.masters),
            gib(m.gradients),
            gib(m.optimizer_state),
            self.seq_len,
            gib(m.activations),
            gib(m.workspace)
        )
        .unwrap();
        writeln!(
            s,
            "  generation: K/V cache per sequence of {}     {:>12.1} MiB",
            self.seq_len,
            self.kv_cache_bytes_per_sequence as f64 / (1u64 << 20) as f64
        )
        .unwrap();
        s
    }
}

/// The resource table of a compiled plan (`vpmoec resources`): one Markdown row per kernel of
/// `kernels/resources.json` (registers, shared memory, stack and spills as ptxas reports them),
/// headed by the GPU architecture and NVRTC version they were compiled with.
pub fn resources_table(resources_json: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    #[derive(Deserialize)]
    struct Meta {
        arch: String,
        nvrtc: String,
        kernels: std::collections::BTreeMap<String, vpmoe_codegen::nvrtc::Resources>,
    }
    let m: Meta = serde_json::from_str(resources_json).context("resources.json: not a vpmoec resource table")?;
    let mut s = format!("{} kernels, {}, NVRTC {}\n\n", m.kernels.len(), m.arch, m.nvrtc);
    s.push_str("| kernel | regs | smem (B) | stack (B) | spill st/ld (B) |\n|---|---:|---:|---:|---:|\n");
    for (name, r) in &m.kernels {
        let spills = format!("{}/{}", r.spill_stores, r.spill_loads);
        writeln!(s, "| {name} | {} | {} | {} | {spills} |", r.registers, r.smem_bytes, r.stack_bytes).unwrap();
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_resource_table_has_a_row_per_kernel() {
        let json = r#"{"arch": "sm_90a", "nvrtc": "13.0", "headers_sha256": "x", "kernels": {
            "vp_sum": {"registers": 31, "spill_stores": 0, "spill_loads": 0, "smem_bytes": 256, "stack_bytes": 0},
            "vp_add": {"registers": 16, "spill_stores": 8, "spill_loads": 4, "smem_bytes": 0, "stack_bytes": 8}}}"#;
        let t = super::resources_table(json).unwrap();
        assert!(t.starts_with("2 kernels, sm_90a, NVRTC 13.0\n"), "{t}");
        assert!(t.contains("| vp_add | 16 | 0 | 8 | 8/4 |\n| vp_sum | 31 | 256 | 0 | 0/0 |\n"), "{t}");
        assert!(super::resources_table("{}").unwrap_err().to_string().contains("resources.json"));
    }
}

/// Memory per GPU and communication per optimizer step of data-parallel training at `world`
/// ranks with the optimizer sharded by rank (ZeRO-1, [`crate::shard`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataParallel {
    pub world: u64,
    /// Per GPU: the model copies, the step's fp32 gradient sums, the activations and workspace
    /// of one micro-batch are whole on every rank; masters and optimizer state are the largest
    /// rank's share.
    pub memory: Memory,
    pub total: u64,
    /// Bytes each GPU sends per step (ring algorithms, `(W−1)/W` of the buffer): reduce-scatter
    /// of the fp32 gradients to their owners, all-gather of the updated model weights.
    pub reduce_scatter_bytes: u64,
    pub all_gather_bytes: u64,
    /// What an all-reduce of the gradients (the replicated optimizer) would send instead.
    pub all_reduce_bytes: u64,
}

pub fn data_parallel(plan: &crate::Plan, world: usize) -> DataParallel {
    let units = crate::shard::units(&plan.params, &plan.optimizer);
    let owners = crate::shard::owners(&units, world);
    let masters = crate::shard::counts(&units, &owners, world, |u| 4 * u.len());
    let state = crate::shard::counts(&units, &owners, world, |u| 4 * (u.len() + crate::shard::v_len(u)));
    let m = &plan.report.memory;
    let memory = Memory {
        masters: masters.iter().copied().max().unwrap_or(0) as u64,
        optimizer_state: state.iter().copied().max().unwrap_or(0) as u64,
        ..m.clone()
    };
    let total = memory.weights
        + memory.masters
        + memory.gradients
        + memory.optimizer_state
        + memory.activations
        + memory.workspace;
    let ring = |bytes: u64| bytes / world as u64 * (world as u64 - 1);
    let trained_weights: u64 =
        plan.params.iter().filter(|p| p.opt != OptGroup::Frozen).map(|p| p.numel * p.ty.dtype.bytes()).sum();
    DataParallel {
        world: world as u64,
        total,
        reduce_scatter_bytes: ring(m.gradients),
        all_gather_bytes: ring(trained_weights),
        all_reduce_bytes: 2 * ring(m.gradients),
        memory,
    }
}

impl DataParallel {
    pub fn human(&self) -> String {
        let m = &self.memory;
        let mut s = String::new();
        writeln!(s, "  data parallel at {} GPUs, optimizer sharded (ZeRO-1), per GPU:", self.world).unwrap();
        writeln!(
            s,
            "    memory {}: weights {}, fp32 gradients {}, fp32 masters {} and optimizer state {} (largest share), \
             activations {}, workspace {}",
            gib(self.total),
            gib(m.weights),
            gib(m.gradients),
            gib(m.masters),
            gib(m.optimizer_state),
            gib(m.activations),
            gib(m.workspace)
        )
        .unwrap();
        writeln!(
            s,
            "    sent per step: gradient reduce-scatter {}, weight all-gather {} (an all-reduce would send {})",
            gib(self.reduce_scatter_bytes),
            gib(self.all_gather_bytes),
            gib(self.all_reduce_bytes)
        )
        .unwrap();
        s
    }
}
