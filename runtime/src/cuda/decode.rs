//! The decode program on the GPU: the prefill and step graphs (`vpmoe_compiler::decode`) planned
//! like the training graph (`plan::schedule`: launches and a memory plan each), run over device
//! caches — a window layer's bf16 rings `[slots][W][width]`, a global layer's bf16 block pool
//! `[blocks][KV_BLOCK][width]` with one block table `int[slots][blocks_per_slot]` in device memory
//! (the host allocates the blocks: `decode::cache::Blocks`). A call longer than the arenas'
//! `chunk` tokens runs as consecutive calls, which the caches make the same computation. A step
//! whose every token asks for logits (a decode step of continuous batching) is captured once
//! per token count as a CUDA graph and replayed: positions, slots and tokens go into the same
//! arena buffers and the block table into the same device buffer before each replay.

use super::bind::{Caches, Layout, Region};
use super::device::{download, upload, DevBuf, Gpu, GIB};
use super::exec::Launcher;
use super::kernels::Kernels;
use super::replay::{self, GraphExec};
use crate::decode::cache::{Blocks, BLOCK};
use crate::decode::{input, Bound, Engine, Tok};
use crate::state::TrainState;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::CudaStream;
use half::bf16;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use vpmoe_compiler::decode::lower_decode;
use vpmoe_compiler::plan::{kernel_entries, schedule, KernelEntry, Schedule};
use vpmoe_compiler::Plan;
use vpmoe_ir::{DType, Graph, OutputName};

/// Tokens one call of a graph takes at most (more run as consecutive calls); at least the slots.
const CHUNK: usize = 512;

/// One graph of the decode program, planned, with its parameters' model copies.
struct Program {
    graph: Graph,
    sched: Schedule,
    /// The model copy of each graph parameter.
    params: Vec<Region>,
}

/// The decode program's engine on the cuda backend ([`crate::decode::Decoder::on`]).
pub struct CudaEngine {
    prefill: Program,
    step: Program,
    launcher: Launcher,
    /// Model copies of the parameters the program reads, in plan order (None: unread).
    _model: Vec<Option<DevBuf>>,
    tok_arena: DevBuf,
    fixed_arena: DevBuf,
    chunk: usize,
    _cache_bufs: Vec<DevBuf>,
    table_buf: DevBuf,
    /// `Arg::Tickets` (the MoE dispatch counts in them), zeroed.
    tickets: DevBuf,
    caches: Caches,
    blocks: Blocks,
    vocab: usize,
    max_len: usize,
    /// Captured step calls by token count. Declared before `gpu` so they go while the context lives.
    captured: BTreeMap<u64, GraphExec>,
    capture_stream: Arc<CudaStream>,
    gpu: Gpu,
}

impl CudaEngine {
    /// Opens the GPU and sets up the decode program of `graph` (of `plan`) with `state`'s weights
    /// for `slots` sequences of up to `max_sequence_length` positions. The kernels come from
    /// `plan_dir`'s cubins where current, else NVRTC.
    pub fn new(
        graph: &Graph,
        plan: &Plan,
        state: &TrainState,
        slots: usize,
        plan_dir: Option<&Path>,
    ) -> Result<CudaEngine> {
        ensure!(slots > 0, "at least one sequence slot");
        crate::backend::check_weights(plan, state)?;
        let program = lower_decode(graph)?;
        let gpu = super::device::open()?;
        let max_len = plan.arch.max_seq as usize;
        let chunk = CHUNK.max(slots);
        // Model copies of what either graph reads, as the training step's (bf16 masters rounded).
        let (prefill, step) = (Bound::new(program.prefill, plan)?, Bound::new(program.step, plan)?);
        let mut model: Vec<Option<DevBuf>> = (0..plan.params.len()).map(|_| None).collect();
        for &pi in prefill.params.iter().chain(&step.params) {
            if model[pi].is_some() {
                continue;
            }
            let (e, w) = (&plan.params[pi], &state.master[pi]);
            let buf = DevBuf::new(&gpu, (e.numel * e.ty.dtype.bytes()) as usize, &e.name)?;
            match e.ty.dtype {
                DType::Bf16 => buf.upload_at(0, &w.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())?,
                DType::F32 => buf.upload_at(0, w)?,
                d => bail!("parameter {} of dtype {} has no model copy", e.name, d.name()),
            }
            model[pi] = Some(buf);
        }
        let program_of = |b: Bound| -> Program {
            let params = b
                .params
                .iter()
                .map(|&pi| {
                    let (e, buf) = (&plan.params[pi], model[pi].as_ref().expect("uploaded above"));
                    Region { addr: buf.ptr, bytes: buf.bytes as u64, dtype: e.ty.dtype }
                })
                .collect();
            Program { sched: schedule(&b.graph), graph: b.graph, params }
        };
        let (prefill, step) = (program_of(prefill), program_of(step));
        // One pair of arenas serves both graphs (they run one after the other).
        let per_token = prefill.sched.tok_arena_bytes_per_token.max(step.sched.tok_arena_bytes_per_token);
        let fixed = prefill.sched.fixed_arena_bytes.max(step.sched.fixed_arena_bytes);
        ensure!(
            program.caches.iter().all(|c| c.window.is_none_or(|w| w as usize <= max_len)),
            "a window longer than the context of {max_len} tokens"
        );
        let blocks = Blocks::new(slots, max_len, program.caches.iter().any(|c| c.window.is_none()));
        // Bytes of each layer's K (and of its V): slots × window rows, or the whole block pool.
        let layer_bytes: Vec<usize> = program
            .caches
            .iter()
            .map(|c| c.window.map_or(blocks.total() * BLOCK, |w| slots * w as usize) * c.width as usize * 2)
            .collect();
        let cache_bytes = 2 * layer_bytes.iter().sum::<usize>() as u64;
        let need = per_token * chunk as u64 + fixed + cache_bytes;
        let free = gpu.ctx.mem_get_info().map(|x| x.0).unwrap_or(usize::MAX) as u64;
        if need > free {
            bail!(
                "generating {slots} sequences of up to {max_len} tokens with {} needs {:.2} GiB on the GPU (key/value caches \
                 {:.2}, activations {:.2}) beside the weights; {} has {:.2} GiB free: use fewer slots (--batch)",
                plan.arch.name,
                need as f64 / GIB,
                cache_bytes as f64 / GIB,
                (need - cache_bytes) as f64 / GIB,
                gpu.name,
                free as f64 / GIB
            );
        }
        let tok_arena = DevBuf::new(&gpu, (per_token * chunk as u64) as usize, "the decode activation arena")?;
        let fixed_arena = DevBuf::new(&gpu, fixed.max(1) as usize, "the decode fixed arena")?;
        let mut cache_bufs = Vec::new();
        let mut layers = Vec::new();
        for (c, &bytes) in program.caches.iter().zip(&layer_bytes) {
            let mut pair = [Region { addr: 0, bytes: 0, dtype: DType::Bf16 }; 2];
            for (r, what) in pair.iter_mut().zip(["keys", "values"]) {
                let buf = DevBuf::new(&gpu, bytes, &format!("the {what} cache of {}", c.node))?;
                buf.fill(0)?;
                *r = Region { addr: buf.ptr, bytes: bytes as u64, dtype: DType::Bf16 };
                cache_bufs.push(buf);
            }
            layers.push(pair);
        }
        let table_len = slots * blocks.per_slot();
        let table_buf = DevBuf::new(&gpu, table_len.max(1) * 4, "the block table")?;
        table_buf.fill(0)?;
        let table = Region { addr: table_buf.ptr, bytes: table_len as u64 * 4, dtype: DType::I32 };
        let caches = Caches { layers, table, per_slot: blocks.per_slot() as u64 };
        let entries: Vec<KernelEntry> =
            kernel_entries(prefill.sched.steps.iter().chain(&step.sched.steps)).into_values().collect();
        let kernels = Kernels::load_entries(&gpu, &entries, plan_dir)?;
        let tickets = DevBuf::new(&gpu, vpmoe_codegen::consts::TICKETS as usize * 4, "the split-reduction tickets")?;
        tickets.fill(0)?;
        let capture_stream = gpu.ctx.new_stream().map_err(|e| anyhow!("creating the capture stream: {e}"))?;
        Ok(CudaEngine {
            launcher: Launcher::new(kernels, gpu.stream.cu_stream()),
            prefill,
            step,
            _model: model,
            tok_arena,
            fixed_arena,
            chunk,
            _cache_bufs: cache_bufs,
            table_buf,
            tickets,
            caches,
            blocks,
            vocab: plan.arch.vocab as usize,
            max_len,
            captured: BTreeMap::new(),
            capture_stream,
            gpu,
        })
    }

    /// The device name.
    pub fn device_name(&self) -> &str {
        &self.gpu.name
    }

    /// Runs one call of at most `chunk` tokens.
    fn call(&mut self, step: bool, toks: &[Tok]) -> Result<Option<Vec<f32>>> {
        // The kernels trust these (`Decoder::step` checks them too): no token outside its slot's
        // reserved blocks or the context.
        for t in toks {
            ensure!(
                t.slot < self.blocks.slots() && t.pos < self.max_len,
                "token at slot {} position {}",
                t.slot,
                t.pos
            );
            ensure!(
                !self.blocks.paged() || self.blocks.table(t.slot).len() * BLOCK > t.pos,
                "slot {} has no block reserved for position {}",
                t.slot,
                t.pos
            );
        }
        let p = if step { &self.step } else { &self.prefill };
        let n = toks.len() as u64;
        let lay = Layout {
            graph: &p.graph,
            buffers: &p.sched.buffers,
            tokens: n,
            seq: n,
            tok_base: self.tok_arena.ptr,
            fixed_base: self.fixed_arena.ptr,
            params: &p.params,
            sums: &BTreeMap::new(),
            accumulating: false,
            tickets: self.tickets.ptr,
            caches: Some(&self.caches),
        };
        for inp in &p.graph.inputs {
            upload(lay.value(inp.value)?.addr, &input(&inp.name, toks))?;
        }
        let mut table = vec![0i32; self.caches.table.bytes as usize / 4];
        for (s, row) in table.chunks_mut(self.blocks.per_slot().max(1)).enumerate().take(self.blocks.slots()) {
            for (x, &b) in row.iter_mut().zip(self.blocks.table(s)) {
                *x = b as i32;
            }
        }
        if !table.is_empty() {
            self.table_buf.upload_at(0, &table)?;
        }
        let issue = |launcher: &mut Launcher| -> Result<()> {
            for (ni, node) in p.graph.nodes.iter().enumerate() {
                for l in &p.sched.steps[ni].launches {
                    let b = lay.bind(ni, l, &p.sched.scratch[ni]).with_context(|| format!("binding {}", node.name))?;
                    launcher.issue(&l.kernel, &b, &node.name)?;
                }
            }
            Ok(())
        };
        if step && toks.iter().all(|t| t.logits) {
            if !self.captured.contains_key(&n) {
                let side = self.capture_stream.cu_stream();
                let launcher = &mut self.launcher;
                let exec = replay::capture(&self.gpu.ctx, side, || {
                    let main = launcher.set_stream(side);
                    let issued = issue(launcher);
                    launcher.set_stream(main);
                    issued
                })?;
                self.captured.insert(n, exec);
            }
            self.captured[&n].launch(self.launcher.stream())?;
        } else {
            issue(&mut self.launcher)?;
        }
        self.launcher.sync()?;
        let Some(out) = p.graph.output_named(&OutputName::Logits) else { return Ok(None) };
        let mut logits = vec![0f32; toks.len() * self.vocab];
        download(lay.value(out)?.addr, &mut logits)?;
        Ok(Some(logits))
    }
}

impl Engine for CudaEngine {
    fn slots(&self) -> usize {
        self.blocks.slots()
    }
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn max_len(&self) -> usize {
        self.max_len
    }
    fn reserve(&mut self, slot: usize, len: usize) -> Result<()> {
        self.blocks.reserve(slot, len)
    }
    fn release(&mut self, slot: usize) {
        self.blocks.release(slot);
    }

    fn run(&mut self, step: bool, toks: &[Tok]) -> Result<Option<Vec<f32>>> {
        let mut out: Option<Vec<f32>> = None;
        for part in toks.chunks(self.chunk) {
            if let Some(l) = self.call(step, part)? {
                out.get_or_insert_with(Vec::new).extend(l);
            }
        }
        Ok(out)
    }
}
