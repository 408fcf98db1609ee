//! The cuda backend: one device arena per activation arena of the plan (sized for the largest
//! micro-batch), one model copy per parameter, the plan's kernels loaded from its cubins, and
//! launches in plan order. Gradients are summed on the host in fp32 and the optimizer step is
//! the host one ([`crate::optim`]), so a step's update is bitwise the cpu backend's given the
//! same gradients; moving both onto the device is the next step for speed.

use super::bind::{Bound, Layout, Param};
use super::device::{download, DevBuf, Gpu, GIB};
use super::kernels::Kernels;
use crate::backend::{Backend, Batch, ForwardOut, MicroOut, StepScalars, StepStats};
use crate::state::TrainState;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::result;
use half::bf16;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use vpmoe_codegen::{lower_node, Scratch};
use vpmoe_compiler::Plan;
use vpmoe_ir::reference::{Data, Tensor};
use vpmoe_ir::{DType, Graph, ValueDef, ValueId};

/// Called after each node with the device synchronised (parity checks read the node's values).
pub type NodeHook<'h, 'g> = &'h mut dyn FnMut(usize, &CudaBackend<'g>, &Layout) -> Result<()>;

pub struct CudaBackend<'g> {
    graph: &'g Graph,
    plan: &'g Plan,
    fwd_len: usize,
    kernels: Kernels,
    /// Scratch buffers of every node (their element types; sizes are in the plan).
    scratch: Vec<Vec<Scratch>>,
    max_tokens: u64,
    tok_arena: DevBuf,
    fixed_arena: DevBuf,
    model: Vec<DevBuf>,
    state: TrainState,
    grads: Vec<Vec<f32>>,
    loads: BTreeMap<String, Vec<u64>>,
    /// Fill both arenas with 0xFF (NaN in every float type) before each run, so a kernel that
    /// leaves part of its output unwritten shows up as NaN instead of a stale right answer.
    pub poison: bool,
    /// Per-kernel CUDA-event timing of every launch, when on.
    timer: Option<super::timing::Timer>,
    gpu: Gpu,
}

impl<'g> CudaBackend<'g> {
    /// Opens the GPU, loads the plan's kernels (from `plan_dir`'s cubins when they are current,
    /// else compiled by NVRTC) and allocates everything for micro-batches of up to `max_tokens`.
    pub fn new(
        graph: &'g Graph,
        plan: &'g Plan,
        state: TrainState,
        plan_dir: Option<&Path>,
        max_tokens: usize,
    ) -> Result<Self> {
        let gpu = super::device::open()?;
        let kernels = Kernels::load(&gpu, plan, plan_dir)?;
        let max_tokens = max_tokens as u64;
        let tok_bytes = plan.tok_arena_bytes_per_token * max_tokens;
        let need = tok_bytes + plan.fixed_arena_bytes + plan.report.memory.weights;
        let free = gpu.ctx.mem_get_info().map(|x| x.0).unwrap_or(usize::MAX) as u64;
        if need > free {
            bail!(
                "{} needs {:.2} GiB on the GPU for micro-batches of {max_tokens} tokens (activations {:.2}, fixed {:.2}, \
                 weights {:.2}); {} has {:.2} GiB free",
                plan.arch.name,
                need as f64 / GIB,
                tok_bytes as f64 / GIB,
                plan.fixed_arena_bytes as f64 / GIB,
                plan.report.memory.weights as f64 / GIB,
                gpu.name,
                free as f64 / GIB
            );
        }
        let tok_arena = DevBuf::new(&gpu, tok_bytes as usize, "the per-token activation arena")?;
        let fixed_arena = DevBuf::new(&gpu, plan.fixed_arena_bytes as usize, "the fixed arena")?;
        let mut model = Vec::with_capacity(plan.params.len());
        for p in &plan.params {
            model.push(DevBuf::new(&gpu, (p.numel * p.ty.dtype.bytes()) as usize, &p.name)?);
        }
        let grads = plan.params.iter().map(|p| vec![0.0; p.numel as usize * p.trainable() as usize]).collect();
        let mut be = CudaBackend {
            graph,
            plan,
            fwd_len: vpmoe_compiler::autodiff::forward_len(graph),
            kernels,
            scratch: graph.nodes.iter().map(|n| lower_node(n).1).collect(),
            max_tokens,
            tok_arena,
            fixed_arena,
            model,
            state,
            grads,
            loads: BTreeMap::new(),
            poison: false,
            timer: None,
            gpu,
        };
        be.upload_model()?;
        Ok(be)
    }

    /// Kernels loaded from the plan directory's cubins, and compiled (or cached) by NVRTC.
    pub fn kernel_sources(&self) -> (usize, usize) {
        (self.kernels.from_plan, self.kernels.compiled)
    }

    /// Starts (or stops and returns) per-kernel timing with CUDA events.
    pub fn time_kernels(&mut self, on: bool) -> Option<super::timing::Timer> {
        let old = self.timer.take();
        if on {
            self.timer = Some(super::timing::Timer::default());
        }
        old
    }

    /// Model copies from the masters: bf16 parameters rounded to nearest even (D9).
    fn upload_model(&mut self) -> Result<()> {
        for ((p, w), buf) in self.plan.params.iter().zip(&self.state.master).zip(&self.model) {
            match p.ty.dtype {
                DType::Bf16 => buf.upload_at(0, &w.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())?,
                DType::F32 => buf.upload_at(0, w)?,
                d => bail!("parameter {} has dtype {}", p.name, d.name()),
            }
        }
        Ok(())
    }

    fn layout<'a>(&self, batch: &Batch, params: &'a [u64]) -> Layout<'a>
    where
        'g: 'a,
    {
        Layout {
            plan: self.plan,
            graph: self.graph,
            tokens: batch.tokens.len() as u64,
            seq: batch.seq as u64,
            tok_base: self.tok_arena.ptr,
            fixed_base: self.fixed_arena.ptr,
            params,
        }
    }

    fn sync(&self) -> Result<()> {
        self.gpu.stream.synchronize().map_err(|e| anyhow!("{e}")).context("a kernel failed")
    }

    /// Reads value `v` of the current run into a reference tensor (bf16 widened to f32, u8 to i32).
    pub fn read_value(&self, lay: &Layout, v: ValueId) -> Result<Tensor> {
        let ty = &self.graph.value(v).ty;
        let r = lay.value(v)?;
        let n = ty.numel(lay.tokens) as usize;
        let shape = ty.shape(lay.tokens);
        Ok(match ty.dtype {
            DType::F32 => {
                let mut x = vec![0f32; n];
                download(r.addr, &mut x)?;
                Tensor::f32(shape, x)
            }
            DType::Bf16 => {
                let mut x = vec![bf16::ZERO; n];
                download(r.addr, &mut x)?;
                Tensor::f32(shape, x.iter().map(|v| v.to_f32()).collect())
            }
            DType::I32 => {
                let mut x = vec![0i32; n];
                download(r.addr, &mut x)?;
                Tensor::i32(shape, x)
            }
            DType::U8 => {
                let mut x = vec![0u8; n];
                download(r.addr, &mut x)?;
                Tensor::i32(shape, x.iter().map(|&b| b as i32).collect())
            }
        })
    }

    /// Writes a reference tensor into value `v`'s buffer in the value's dtype.
    fn write_value(&self, lay: &Layout, v: ValueId, t: &Tensor) -> Result<()> {
        let ty = &self.graph.value(v).ty;
        let r = lay.value(v)?;
        let n = ty.numel(lay.tokens) as usize;
        if t.numel() != n {
            bail!("input %{} has {} elements, its type {ty} needs {n}", v.0, t.numel());
        }
        match (ty.dtype, &t.data) {
            (DType::F32, Data::F32(x)) => super::device::upload(r.addr, x),
            (DType::Bf16, Data::F32(x)) => {
                super::device::upload(r.addr, &x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
            }
            (DType::I32, Data::I32(x)) => super::device::upload(r.addr, x),
            (DType::U8, Data::I32(x)) => super::device::upload(r.addr, &x.iter().map(|&v| v as u8).collect::<Vec<_>>()),
            (d, _) => bail!("input %{} of dtype {} given the wrong kind of data", v.0, d.name()),
        }
    }

    /// Runs nodes `[..n]` on `batch`. `each(node, layout)` is called after every node, with the
    /// device synchronised, when given (parity checks read the node's values there).
    pub fn run_nodes(
        &mut self,
        batch: &Batch,
        n: usize,
        mut each: Option<NodeHook<'_, 'g>>,
    ) -> Result<BTreeMap<String, Tensor>> {
        batch.validate(self.plan.arch.vocab)?;
        let t = batch.tokens.len() as u64;
        if t > self.max_tokens {
            bail!("micro-batch of {t} tokens; this cuda backend was sized for {}", self.max_tokens);
        }
        if self.poison {
            self.tok_arena.fill(0xFF)?;
            self.fixed_arena.fill(0xFF)?;
        }
        let ptrs: Vec<u64> = self.model.iter().map(|b| b.ptr).collect();
        let lay = self.layout(batch, &ptrs);
        let plan = self.plan;
        for inp in &self.graph.inputs {
            self.write_value(&lay, inp.value, &batch.input(&inp.name)?)?;
        }
        let mut slots: Vec<u64> = Vec::new();
        for (ni, node) in self.graph.nodes[..n].iter().enumerate() {
            let _range = super::nvtx::range(&node.name);
            for l in &plan.steps[ni].launches {
                let b = lay.bind(ni, l, &self.scratch[ni]).with_context(|| format!("binding {}", node.name))?;
                self.launch(&b, &node.name, &mut slots)
                    .with_context(|| format!("{}: launching {}", node.name, b.kernel))?;
            }
            if let Some(f) = each.as_deref_mut() {
                self.sync().with_context(|| format!("in node {}", node.name))?;
                f(ni, self, &lay)?;
            }
        }
        self.sync()?;
        if let Some(t) = self.timer.as_mut() {
            t.collect()?;
        }
        let mut out = BTreeMap::new();
        for (name, v) in &self.graph.outputs {
            let ready = match self.graph.value(*v).def {
                ValueDef::Node(id, _) => (id.0 as usize) < n,
                _ => true,
            };
            if ready {
                out.insert(name.clone(), self.read_value(&lay, *v)?);
            }
        }
        Ok(out)
    }

    fn launch(&mut self, b: &Bound, node: &str, slots: &mut Vec<u64>) -> Result<()> {
        let f = self.kernels.get(&b.kernel)?;
        slots.clear();
        slots.extend(b.params.iter().map(|p: &Param| p.slot()));
        let mut args: Vec<*mut std::ffi::c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut _).collect();
        let stream = self.gpu.stream.cu_stream();
        let t0 = self.timer.as_mut().map(|t| t.start(stream)).transpose()?;
        unsafe { result::launch_kernel(f, (b.grid[0], b.grid[1], b.grid[2]), (b.block, 1, 1), 0, stream, &mut args) }
            .map_err(|e| anyhow!("{e}"))?;
        if let (Some(t), Some(t0)) = (self.timer.as_mut(), t0) {
            t.stop(&b.kernel, node, t0, stream)?;
        }
        Ok(())
    }
}

impl Backend for CudaBackend<'_> {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn forward(&mut self, batch: &Batch, keep: &[&str]) -> Result<ForwardOut> {
        let all = self.run_nodes(batch, self.fwd_len, None)?;
        let values = all
            .into_iter()
            .filter(|(k, _)| keep.contains(&k.as_str()) || k == "loss" || k == "token_loss" || k.starts_with("aux."))
            .collect();
        Ok(ForwardOut { values })
    }

    fn accumulate(&mut self, batch: &Batch) -> Result<MicroOut> {
        let out = self.run_nodes(batch, self.graph.nodes.len(), None)?;
        let m = crate::backend::fold_micro(self.plan, out, batch, &mut self.grads, &mut self.loads);
        if !m.loss.is_finite() {
            bail!("the loss is not finite ({})", m.loss);
        }
        Ok(m)
    }

    fn step(&mut self, s: &StepScalars) -> Result<StepStats> {
        let t0 = Instant::now();
        let loads = std::mem::take(&mut self.loads).into_iter().collect();
        let gemm = crate::cpu::FastGemm;
        let mut stats = crate::optim::apply(self.plan, &mut self.state, &mut self.grads, loads, s, &gemm)?;
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
        self.upload_model()?;
        stats.optimizer_seconds = t0.elapsed().as_secs_f64();
        Ok(stats)
    }

    fn state(&self) -> TrainState {
        self.state.clone()
    }

    fn set_state(&mut self, st: TrainState) -> Result<()> {
        crate::backend::check_state(self.plan, &st)?;
        self.state = st;
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
        self.loads.clear();
        self.upload_model()
    }

    fn device_name(&self) -> String {
        self.gpu.name.clone()
    }

    fn device_memory(&self) -> Option<(u64, u64)> {
        let (free, total) = self.gpu.ctx.mem_get_info().ok()?;
        Some(((total - free) as u64, total as u64))
    }

    fn profile(&mut self, on: bool) -> Result<Option<String>> {
        self.sync()?;
        if on {
            unsafe { cudarc::driver::sys::cuProfilerStart() }.result().map_err(|e| anyhow!("cuProfilerStart: {e}"))?;
            self.time_kernels(true);
            return Ok(None);
        }
        unsafe { cudarc::driver::sys::cuProfilerStop() }.result().map_err(|e| anyhow!("cuProfilerStop: {e}"))?;
        Ok(self.time_kernels(false).map(|t| t.table()))
    }
}
