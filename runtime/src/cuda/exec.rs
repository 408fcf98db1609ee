//! The cuda backend: one device arena per activation arena of the plan (sized for the largest
//! micro-batch), the plan's kernels loaded from its cubins, and launches in plan order. Masters,
//! gradient sums, optimizer state and model copies live on the device ([`super::optim`]): the
//! kernels that finalise a gradient write it straight into the step's sum (storing on the step's
//! first micro-batch, adding after), and the step runs there; only losses, router loads and the
//! norm partials come back to the host.

use super::bind::{Bound, Layout, Param, Region};
use super::device::{download, DevBuf, Gpu, GIB};
use super::kernels::Kernels;
use super::link::Link;
use super::optim::{DeviceOptimizer, Placement};
use super::replay::{self, GraphExec};
use crate::backend::{Backend, Batch, ForwardOut, MicroOut, StepScalars, StepStats};
use crate::state::TrainState;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, CudaStream};
use half::bf16;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use vpmoe_codegen::{lower_node, KernelSpec, Scratch};
use vpmoe_compiler::Plan;
use vpmoe_ir::reference::{Data, Tensor};
use vpmoe_ir::{DType, Graph, OutputName, ParamId, ValueDef, ValueId};

/// Captured micro-batch shapes kept at once (training uses two: a step's first micro-batch and the
/// rest; evaluation a third).
const MAX_CAPTURED: usize = 8;

/// Called after each node with the device synchronised (parity checks read the node's values).
pub type NodeHook<'h, 'g> = &'h mut dyn FnMut(usize, &CudaBackend<'g>, &Layout) -> Result<()>;

/// Launches loaded kernels on the backend's stream, with optional per-kernel timing.
pub struct Launcher {
    kernels: Kernels,
    /// Per-kernel CUDA-event timing of every launch, when on.
    timer: Option<super::timing::Timer>,
    stream: cudarc::driver::sys::CUstream,
    /// `--cublas`: plain dense products go to cuBLAS ([`super::blas`]).
    blas: Option<super::blas::Blas>,
    /// Launches issued as cuBLAS calls so far.
    cublas_calls: u64,
}

impl Launcher {
    pub(super) fn new(kernels: Kernels, stream: cudarc::driver::sys::CUstream) -> Launcher {
        Launcher { kernels, timer: None, stream, blas: None, cublas_calls: 0 }
    }

    /// Launches `spec` after checking `params` against its family's C signature.
    pub fn launch(
        &mut self,
        spec: &KernelSpec,
        node: &str,
        grid: [u32; 3],
        block: u32,
        params: &[Param],
    ) -> Result<()> {
        let name = spec.name();
        let fam = spec.family();
        if fam.params.len() != params.len() {
            bail!("{name}: {} parameters bound, the kernel takes {}", params.len(), fam.params.len());
        }
        for ((cty, pname), p) in fam.params.iter().zip(params) {
            super::bind::check_type(&name, pname, *cty, p)?;
        }
        self.raw(&name, node, grid, block, params).with_context(|| format!("{node}: launching {name}"))
    }

    /// Issues a bound plan launch: as a cuBLAS call when cuBLAS is on and the launch is a plain
    /// product, else as its generated kernel.
    pub(super) fn issue(&mut self, spec: &KernelSpec, b: &Bound, node: &str) -> Result<()> {
        let Some((blas, g)) = self.blas.as_ref().and_then(|blas| Some((blas, super::blas::lower(spec, b)?))) else {
            return self.raw(&b.kernel, node, b.grid, b.block, &b.params);
        };
        let t0 = self.timer.as_mut().map(|t| t.start(self.stream)).transpose()?;
        blas.gemm(&g, self.stream)?;
        self.cublas_calls += 1;
        if let (Some(t), Some(t0)) = (self.timer.as_mut(), t0) {
            t.stop(&format!("cublas:{}", b.kernel), node, t0, self.stream)?;
        }
        Ok(())
    }

    fn raw(&mut self, kernel: &str, node: &str, grid: [u32; 3], block: u32, params: &[Param]) -> Result<()> {
        let f = self.kernels.get(kernel)?;
        let mut slots: Vec<u64> = params.iter().map(|p| p.slot()).collect();
        let mut args: Vec<*mut std::ffi::c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut _).collect();
        let t0 = self.timer.as_mut().map(|t| t.start(self.stream)).transpose()?;
        unsafe { result::launch_kernel(f, (grid[0], grid[1], grid[2]), (block, 1, 1), 0, self.stream, &mut args) }
            .map_err(|e| anyhow!("{e}"))?;
        if let (Some(t), Some(t0)) = (self.timer.as_mut(), t0) {
            t.stop(kernel, node, t0, self.stream)?;
        }
        Ok(())
    }

    /// Sends launches to `stream` from now on; returns the stream they went to.
    pub(super) fn set_stream(&mut self, stream: cudarc::driver::sys::CUstream) -> cudarc::driver::sys::CUstream {
        std::mem::replace(&mut self.stream, stream)
    }

    pub(super) fn stream(&self) -> cudarc::driver::sys::CUstream {
        self.stream
    }

    pub fn sync(&self) -> Result<()> {
        unsafe { result::stream::synchronize(self.stream) }.map_err(|e| anyhow!("{e}")).context("a kernel failed")
    }
}

pub struct CudaBackend<'g> {
    graph: &'g Graph,
    plan: &'g Plan,
    fwd_len: usize,
    launcher: Launcher,
    /// Scratch buffers of every node (their element types; sizes are in the plan).
    scratch: Vec<Vec<Scratch>>,
    max_tokens: u64,
    tok_arena: DevBuf,
    fixed_arena: DevBuf,
    /// `Arg::Tickets`: zeroed once; every launch that counts in it leaves it zeroed.
    tickets: DevBuf,
    opt: DeviceOptimizer,
    /// Every parameter's model copy (inside the optimizer's groups).
    model: Vec<Region>,
    /// The step's gradient sum of each gradient value the plan sums in place, by value id.
    sums: Rc<BTreeMap<u32, Region>>,
    loads: BTreeMap<u32, Vec<u64>>,
    /// Fill both arenas with 0xFF (NaN in every float type) before each run, so a kernel that
    /// leaves part of its output unwritten shows up as NaN instead of a stale right answer.
    pub poison: bool,
    /// Replay micro-batches as CUDA graphs (`super::replay`); off, every launch is issued from
    /// the host. Graphs are never used with a node hook or per-kernel timing.
    pub graphs: bool,
    /// Captured micro-batches by (tokens, sequence length, nodes run, first micro-batch of the
    /// step). Declared before `gpu` so they are destroyed while the context lives.
    captured: BTreeMap<(u64, u64, usize, bool), GraphExec>,
    capture_stream: Arc<CudaStream>,
    /// Where the plan's cubins are (for decoders of the same plan).
    plan_dir: Option<PathBuf>,
    /// Data parallel: the job's collectives on device memory (declared before `gpu`: an NCCL
    /// communicator goes while the context lives).
    link: Link,
    gpu: Gpu,
}

impl<'g> CudaBackend<'g> {
    /// Opens the GPU, loads the plan's kernels (from `plan_dir`'s cubins when they are current,
    /// else compiled by NVRTC) and allocates everything for micro-batches of up to `max_tokens`.
    /// `placement` says where the optimizer lives: the Normuon momenta in pinned host memory
    /// (the 80 GB H100 option), and ZeRO-1's share of a data-parallel rank (see
    /// [`DeviceOptimizer::new`]); the rank's [`Backend::distribute`] must then name the same job.
    pub fn new(
        graph: &'g Graph,
        plan: &'g Plan,
        state: TrainState,
        plan_dir: Option<&Path>,
        max_tokens: usize,
        placement: Placement,
    ) -> Result<Self> {
        crate::backend::check_state(plan, &state)?;
        let gpu = super::device::open()?;
        let kernels = Kernels::load(&gpu, plan, plan_dir)?;
        let max_tokens = max_tokens as u64;
        let tok_bytes = plan.tok_arena_bytes_per_token * max_tokens;
        let opt_bytes = super::optim::planned_bytes(plan, placement.host_momentum, placement.shard_of());
        let need = tok_bytes + plan.fixed_arena_bytes + opt_bytes;
        let free = gpu.ctx.mem_get_info().map(|x| x.0).unwrap_or(usize::MAX) as u64;
        if need > free {
            let momentum = super::optim::momentum_bytes(plan, placement.shard_of());
            let hint = if !placement.host_momentum && need - momentum <= free {
                format!(
                    "; --host-momentum keeps the Normuon momenta ({:.2} GiB) in host memory and fits",
                    momentum as f64 / GIB
                )
            } else {
                String::new()
            };
            bail!(
                "{} needs {:.2} GiB on the GPU for micro-batches of {max_tokens} tokens (activations {:.2}, fixed arena \
                 {:.2}, model copies + masters + gradient sums + optimizer state + optimizer scratch {:.2}); {} has \
                 {:.2} GiB free{hint}",
                plan.arch.name,
                need as f64 / GIB,
                tok_bytes as f64 / GIB,
                plan.fixed_arena_bytes as f64 / GIB,
                opt_bytes as f64 / GIB,
                gpu.name,
                free as f64 / GIB
            );
        }
        let tok_arena = DevBuf::new(&gpu, tok_bytes as usize, "the per-token activation arena")?;
        let fixed_arena = DevBuf::new(&gpu, plan.fixed_arena_bytes as usize, "the fixed arena")?;
        let tickets = DevBuf::new(&gpu, vpmoe_codegen::consts::TICKETS as usize * 4, "the split-reduction tickets")?;
        tickets.fill(0)?;
        let opt = DeviceOptimizer::new(&gpu, plan, state, &placement)?;
        let sums = Rc::new(gradient_sums(graph, plan, &opt)?);
        let launcher = Launcher::new(kernels, gpu.stream.cu_stream());
        let capture_stream = gpu.ctx.new_stream().map_err(|e| anyhow!("creating the capture stream: {e}"))?;
        Ok(CudaBackend {
            graph,
            plan,
            fwd_len: vpmoe_compiler::autodiff::forward_len(graph),
            launcher,
            scratch: graph.nodes.iter().map(|n| lower_node(n).1).collect(),
            max_tokens,
            tok_arena,
            fixed_arena,
            tickets,
            model: super::bind::param_regions(plan, &opt.model_ptrs(plan.params.len())),
            sums,
            opt,
            loads: BTreeMap::new(),
            poison: false,
            graphs: true,
            captured: BTreeMap::new(),
            capture_stream,
            plan_dir: plan_dir.map(Path::to_path_buf),
            link: Link::single(),
            gpu,
        })
    }

    /// Issues every plan launch that is a plain dense product as a cuBLAS call from now on
    /// (`--cublas`, [`super::blas`]); fails with an explanation when cuBLAS is not installed.
    pub fn use_cublas(&mut self) -> Result<()> {
        if self.launcher.blas.is_none() {
            self.launcher.blas = Some(super::blas::Blas::new(&self.gpu)?);
            self.captured.clear();
        }
        Ok(())
    }

    /// Plan launches issued as cuBLAS calls so far (graph captures count once).
    pub fn cublas_calls(&self) -> u64 {
        self.launcher.cublas_calls
    }

    /// Kernels loaded from the plan directory's cubins, and compiled (or cached) by NVRTC.
    pub fn kernel_sources(&self) -> (usize, usize) {
        (self.launcher.kernels.from_plan, self.launcher.kernels.compiled)
    }

    /// Sets what the next step consumes directly: the gradient sums (plan order, empty for frozen
    /// parameters) and the router loads. For the optimizer's parity test against the host step.
    pub fn set_step_inputs(&mut self, grads: &[Vec<f32>], loads: BTreeMap<u32, Vec<u64>>) -> Result<()> {
        if grads.len() != self.plan.params.len() {
            bail!("{} gradients for {} parameters", grads.len(), self.plan.params.len());
        }
        self.loads = loads;
        self.opt.set_grad_sums(grads)
    }

    /// The step's gradient sums so far (plan order, empty for frozen parameters): what the next
    /// optimizer step consumes. For parity tests of the accumulation across micro-batches.
    pub fn gradient_sums(&self) -> Result<Vec<Vec<f32>>> {
        self.opt
            .grad_sums(self.plan.params.len())
            .into_iter()
            .map(|r| {
                let Some(r) = r else { return Ok(Vec::new()) };
                let mut x = vec![0f32; (r.bytes / 4) as usize];
                download(r.addr, &mut x)?;
                Ok(x)
            })
            .collect()
    }

    /// Starts (or stops and returns) per-kernel timing with CUDA events.
    pub fn time_kernels(&mut self, on: bool) -> Option<super::timing::Timer> {
        let old = self.launcher.timer.take();
        if on {
            self.launcher.timer = Some(super::timing::Timer::default());
        }
        old
    }

    fn layout<'a>(&self, batch: &Batch, params: &'a [Region], sums: &'a BTreeMap<u32, Region>) -> Layout<'a>
    where
        'g: 'a,
    {
        Layout {
            graph: self.graph,
            buffers: &self.plan.buffers,
            tokens: batch.tokens.len() as u64,
            seq: batch.seq as u64,
            tok_base: self.tok_arena.ptr,
            fixed_base: self.fixed_arena.ptr,
            tickets: self.tickets.ptr,
            params,
            sums,
            accumulating: !self.opt.first(),
            caches: None,
        }
    }

    fn sync(&self) -> Result<()> {
        self.launcher.sync()
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

    /// Issues the launches of nodes `[..n]`.
    fn launch_nodes(&mut self, lay: &Layout, n: usize, mut each: Option<NodeHook<'_, 'g>>) -> Result<()> {
        let plan = self.plan;
        for (ni, node) in self.graph.nodes[..n].iter().enumerate() {
            let _range = super::nvtx::range(&node.name);
            for l in &plan.steps[ni].launches {
                let b: Bound = lay.bind(ni, l, &self.scratch[ni]).with_context(|| format!("binding {}", node.name))?;
                self.launcher
                    .issue(&l.kernel, &b, &node.name)
                    .with_context(|| format!("{}: launching {}", node.name, b.kernel))?;
            }
            if let Some(f) = each.as_deref_mut() {
                self.sync().with_context(|| format!("in node {}", node.name))?;
                f(ni, self, lay)?;
            }
        }
        Ok(())
    }

    /// Runs nodes `[..n]` on `batch`. `each(node, layout)` is called after every node, with the
    /// device synchronised, when given (parity checks read the node's values there).
    pub fn run_nodes(
        &mut self,
        batch: &Batch,
        n: usize,
        each: Option<NodeHook<'_, 'g>>,
    ) -> Result<BTreeMap<OutputName, Tensor>> {
        batch.validate(self.plan.arch.vocab)?;
        let t = batch.tokens.len() as u64;
        if t > self.max_tokens {
            bail!("micro-batch of {t} tokens; this cuda backend was sized for {}", self.max_tokens);
        }
        if self.poison {
            self.tok_arena.fill(0xFF)?;
            self.fixed_arena.fill(0xFF)?;
            if self.opt.first() {
                self.opt.poison_sums()?;
            }
        }
        // The layout borrows these while the launches borrow the backend mutably.
        let (ptrs, sums) = (self.model.clone(), Rc::clone(&self.sums));
        let lay = self.layout(batch, &ptrs, &sums);
        for inp in &self.graph.inputs {
            self.write_value(&lay, inp.value, &batch.input(&inp.name)?)?;
        }
        if each.is_none() && self.launcher.timer.is_none() && self.graphs {
            let key = (t, batch.seq as u64, n, self.opt.first());
            if !self.captured.contains_key(&key) {
                if self.captured.len() >= MAX_CAPTURED {
                    self.captured.clear();
                }
                let (ctx, side) = (self.gpu.ctx.clone(), self.capture_stream.cu_stream());
                let exec = replay::capture(&ctx, side, || {
                    let main = std::mem::replace(&mut self.launcher.stream, side);
                    let issued = self.launch_nodes(&lay, n, None);
                    self.launcher.stream = main;
                    issued
                })?;
                self.captured.insert(key, exec);
            }
            let _range = super::nvtx::range("micro-batch (graph)");
            self.captured[&key].launch(self.launcher.stream)?;
        } else {
            self.launch_nodes(&lay, n, each)?;
        }
        self.sync()?;
        if let Some(t) = self.launcher.timer.as_mut() {
            t.collect()?;
        }
        // Everything but the gradients (which stay on the device) comes back.
        let mut out = BTreeMap::new();
        for (name, v) in &self.graph.outputs {
            let ready = match self.graph.value(*v).def {
                ValueDef::Node(id, _) => (id.0 as usize) < n,
                _ => true,
            };
            if ready && !matches!(name, OutputName::Grad(_)) {
                out.insert(name.clone(), self.read_value(&lay, *v)?);
            }
        }
        Ok(out)
    }
}

/// Where each gradient value the plan sums in place lives: its parameter's sum in the device
/// optimizer. Every trainable parameter must have one (its kernels write nowhere else).
fn gradient_sums(graph: &Graph, plan: &Plan, opt: &DeviceOptimizer) -> Result<BTreeMap<u32, Region>> {
    let regions = opt.grad_sums(plan.params.len());
    let mut sums = BTreeMap::new();
    let mut finalised = vec![false; plan.params.len()];
    for &pi in plan.steps.iter().flat_map(|st| &st.grads) {
        let p = &plan.params[pi as usize];
        let v = graph
            .output_named(&OutputName::Grad(ParamId(pi)))
            .ok_or_else(|| anyhow!("the graph has no gradient output for {}", p.name))?;
        let r = regions[pi as usize].ok_or_else(|| anyhow!("{} has a gradient but no gradient sum", p.name))?;
        sums.insert(v.0, r);
        finalised[pi as usize] = true;
    }
    if let Some((p, _)) = plan.params.iter().zip(&finalised).find(|(p, f)| p.trainable() && !**f) {
        bail!("the plan finalises no gradient for {}", p.name);
    }
    Ok(sums)
}

impl Backend for CudaBackend<'_> {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn forward(&mut self, batch: &Batch, keep: &[OutputName]) -> Result<ForwardOut> {
        Ok(ForwardOut::keep(self.run_nodes(batch, self.fwd_len, None)?, keep))
    }

    fn accumulate(&mut self, batch: &Batch) -> Result<MicroOut> {
        // Every node runs, adding each gradient into the step's sums as soon as it is final.
        let out = self.run_nodes(batch, self.graph.nodes.len(), None)?;
        self.opt.accumulated();
        let m = crate::backend::fold_micro(self.plan, out, batch, None, &mut self.loads);
        if !m.loss.is_finite() {
            bail!("the loss is not finite ({})", m.loss);
        }
        Ok(m)
    }

    fn step(&mut self, s: &StepScalars) -> Result<StepStats> {
        let t0 = Instant::now();
        let mut loads: Vec<(u32, Vec<u64>)> = std::mem::take(&mut self.loads).into_iter().collect();
        if self.link.world() > 1 {
            if !self.opt.sharded() {
                for (ptr, count) in self.opt.grad_buffers() {
                    self.link.all_reduce_f32(ptr, count)?;
                }
            }
            crate::dist::all_reduce_loads(&self.link.dist, &mut loads)?;
        }
        let mut stats = self.opt.step(&mut self.launcher, self.plan, loads, s, &self.link)?;
        stats.optimizer_seconds = t0.elapsed().as_secs_f64();
        Ok(stats)
    }

    fn state(&self) -> Result<TrainState> {
        self.opt.state(self.plan).context("downloading the training state from the GPU")
    }

    fn weights(&self) -> Result<TrainState> {
        self.opt.weights().context("downloading the weights from the GPU")
    }

    fn step_count(&self) -> u64 {
        self.opt.step_count()
    }

    fn set_state(&mut self, st: TrainState) -> Result<()> {
        crate::backend::check_state(self.plan, &st)?;
        self.loads.clear();
        self.captured.clear();
        self.opt.set_state(self.plan, st, None)
    }

    fn shares_optimizer(&self) -> bool {
        self.opt.sharded()
    }

    fn set_share(&mut self, st: TrainState, shard: crate::dist::zero::Shard) -> Result<()> {
        crate::backend::check_weights(self.plan, &st)?;
        self.loads.clear();
        self.captured.clear();
        self.opt.set_state(self.plan, st, Some(shard))
    }

    fn device_name(&self) -> String {
        self.gpu.name.clone()
    }

    /// Joins `dist`'s job: gradient sums all-reduced over NCCL for the replicated optimizer, or
    /// reduced to their owners and the model copies shared for ZeRO-1, whose share the backend
    /// was created with ([`Placement::shard`]). The host emulator has no NCCL: its ranks move
    /// device buffers through the job's host collective, so everything around NCCL runs without
    /// a GPU.
    fn distribute(&mut self, dist: crate::dist::Dist, shard_optimizer: bool) -> Result<()> {
        let want = (shard_optimizer && dist.world() > 1).then(|| (dist.rank.rank, dist.world()));
        let have = self.opt.shard_of();
        if want != have {
            bail!(
                "the cuda backend was created with its optimizer {} and is asked to train {} as rank {} of {}: \
                 create it with the placement of its job",
                have.map_or("whole".to_string(), |(r, w)| format!("sharded as rank {r} of {w}")),
                if shard_optimizer { "with a sharded optimizer" } else { "with a replicated optimizer" },
                dist.rank.rank,
                dist.world()
            );
        }
        if dist.world() == 1 {
            return Ok(());
        }
        let nccl = match self.gpu.emulated {
            true => None,
            false => {
                crate::dist::nccl::check_loadable()?;
                Some(crate::dist::nccl::communicator(&dist, self.gpu.stream.clone())?)
            }
        };
        self.link = Link::new(dist, nccl);
        Ok(())
    }

    fn shard(&self) -> Result<Option<(std::borrow::Cow<'_, crate::dist::zero::Shard>, &TrainState)>> {
        let Some(rest) = self.opt.sharded_rest() else { return Ok(None) };
        let shard = self.opt.shard().context("downloading this rank's optimizer share from the GPU")?;
        Ok(Some((std::borrow::Cow::Owned(shard), rest)))
    }

    fn decode_on(&self) -> crate::decode::DecodeOn {
        crate::decode::DecodeOn::Cuda(self.plan_dir.clone())
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
        // The step's launches (gradient sums, optimizer) come after the last run's collection.
        let mut timer = self.time_kernels(false);
        timer.as_mut().map(|t| t.collect()).transpose()?;
        Ok(timer.map(|t| t.table()))
    }
}
