//! `vpmoe-rt`: the vpmoe runtime CLI.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;
use vpmoe_runtime::train::{self, RunOptions, TrainConfig};
use vpmoe_runtime::{cpu::CpuBackend, cuda::CudaBackend, load_plan, state::TrainState, synthetic_batch, Backend};

#[derive(Parser)]
#[command(name = "vpmoe-rt", version, about = "Run compiled vpmoe plans: forward, data, training")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum BackendKind {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Decay {
    Constant,
    Linear,
    Cosine,
    Wsd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train (stage 1, span-normalised CE) on a token dataset; with no --data, on the bundled
    /// SYNTH sample, rendered and tokenised into CKPT_DIR/data on first use.
    Train(TrainArgs),
    /// Datasets: render Harmony conversations, build token datasets from SYNTH parquet, inspect.
    #[command(subcommand)]
    Data(vpmoe_data::cli::DataCmd),
    /// Teacher scoring against a served GPT-OSS-120B (vLLM or SGLang) for stage 2.
    #[command(subcommand)]
    Teacher(TeacherCmd),
    /// Time whole training steps on synthetic micro-batches: tokens/s, MFU against the device's
    /// dense bf16 peak, device memory, and (cuda) the share of kernel time in attention, MoE,
    /// LM head + loss and the rest, plus the optimizer's share of the step.
    Bench(BenchArgs),
    /// Run the forward graph of a plan on a seeded synthetic micro-batch and print the
    /// span-normalised loss (at initialisation it should be close to ln(vocab)).
    Forward(SyntheticRun),
}

/// The backend and where its state lives.
#[derive(clap::Args)]
struct BackendArgs {
    /// Which backend executes the plan. Always explicit: nothing falls back silently.
    #[arg(long = "backend", value_enum, value_name = "BACKEND")]
    kind: BackendKind,
    /// cuda: keep the Normuon momenta in pinned host memory, read and written over PCIe once per
    /// step (same results bit for bit). The locked config then fits an 80 GB H100.
    #[arg(long)]
    host_momentum: bool,
    /// cuda: issue the dense GEMMs that are plain products (the LM head's backward, bias-free
    /// projections) as cuBLAS calls instead of generated kernels. Needs libcublas on the loader
    /// path; results differ from the generated kernels by summation order only.
    #[arg(long)]
    cublas: bool,
}

/// A plan run on seeded synthetic micro-batches (`forward`, `bench`).
#[derive(clap::Args)]
struct SyntheticRun {
    /// Plan directory written by `vpmoec compile` (its cubins are used when current).
    #[arg(long, conflicts_with = "arch")]
    plan: Option<PathBuf>,
    /// Or compile this architecture TOML in memory (default: configs/small.toml).
    #[arg(long)]
    arch: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
    /// Tokens per row (default: the architecture's max_sequence_length).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Rows in the micro-batch.
    #[arg(long, default_value_t = 1)]
    micro_batch: usize,
    /// Seed for parameter initialisation and the synthetic tokens.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
}

impl SyntheticRun {
    /// The plan directory (if any), graph, plan and the checked row length.
    fn plan(&self) -> Result<(Option<PathBuf>, vpmoe_ir::Graph, vpmoe_compiler::Plan, usize)> {
        let (graph, plan) = plan_of(self.plan.clone(), self.arch.clone())?;
        let seq = self.seq_len.unwrap_or(plan.arch.max_seq as usize);
        if seq == 0 || seq as u64 > plan.arch.max_seq {
            bail!("--seq-len {seq} must be in 1..={}", plan.arch.max_seq);
        }
        Ok((self.plan.clone(), graph, plan, seq))
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    run: SyntheticRun,
    /// Untimed steps first (kernel loading, caches, clocks).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Timed training steps.
    #[arg(long, default_value_t = 5)]
    steps: u64,
    /// Micro-batches per step (forward and backward each, then one optimizer step): the
    /// optimizer's share of step time falls as 1/M, so set it to the run's.
    #[arg(long, default_value_t = 1)]
    grad_accum: u64,
}

#[derive(Subcommand)]
enum TeacherCmd {
    /// Score a subset of a build-synth dataset's train split: send each document's exact token
    /// ids, store the teacher's per-token log-probabilities (and top-k) as sidecars aligned
    /// with the labels. Resumable: re-run the same command after a crash or a kill.
    Score(ScoreArgs),
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// Teacher server, http://HOST:PORT.
    #[arg(long)]
    server: String,
    /// Its API: vLLM /v1/completions (prompt_logprobs) or SGLang /generate.
    #[arg(long, value_enum)]
    api: vpmoe_runtime::teacher::wire::Api,
    /// Model to request (default: the one the server serves).
    #[arg(long)]
    model: Option<String>,
    /// Dataset root written by `vpmoe-rt data build-synth`.
    #[arg(long)]
    data: PathBuf,
    /// Output directory of the scored dataset (created; re-running continues it).
    #[arg(long)]
    out: PathBuf,
    /// Which documents: fraction=F,prefer=long-reasoning|random,exercise=a|b,language=x|y,
    /// balance=exercise|language (deterministic by synth_id).
    #[arg(long, default_value = "fraction=1")]
    subset: vpmoe_data::teacher::SubsetRule,
    /// Also store the teacher's top-k candidates per position (vLLM caps k at --max-logprobs, 20).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Pack whole documents into one request up to this many tokens (server logprob memory
    /// grows with it: about 9.2 GiB per 8,192 tokens for the 201k vocabulary).
    #[arg(long, default_value_t = 8192)]
    max_tokens_per_request: usize,
    /// Seconds one request may take, response included.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// Retries of a request after a transport error, 429 or 5xx (exponential backoff from 1 s).
    #[arg(long, default_value_t = 6)]
    retries: u32,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Plan directory written by `vpmoec compile`.
    #[arg(long, conflicts_with = "arch")]
    plan: Option<PathBuf>,
    /// Or compile this architecture TOML in memory (default: configs/small.toml).
    #[arg(long)]
    arch: Option<PathBuf>,
    /// Dataset root (`data build-synth` or `teacher score` output), optionally `DIR:WEIGHT`.
    /// Repeat to blend: e.g. `--data synth:0.3 --data rescored:0.7` draws 70 % of the rows from
    /// the teacher-scored set (confidence-weighted CE) and 30 % from the vanilla one (plain CE).
    /// Held-out loss uses the valid split of the first dataset that has one.
    #[arg(long, value_name = "DIR[:WEIGHT]")]
    data: Vec<String>,
    #[command(flatten)]
    backend: BackendArgs,
    /// Optimizer steps of the whole run (a resumed run continues up to this step).
    #[arg(long, default_value_t = 40)]
    steps: u64,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 2)]
    micro_batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 2)]
    grad_accum: usize,
    /// Tokens per row (default: min(128, max_sequence_length)).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Checkpoints and metrics.jsonl go here (default: runs/<arch name>).
    #[arg(long)]
    ckpt_dir: Option<PathBuf>,
    /// Continue from the newest checkpoint in --ckpt-dir (refused if the run differs).
    #[arg(long)]
    resume: bool,
    /// Held-out evaluation every N steps (0: never).
    #[arg(long, default_value_t = 10)]
    eval_every: u64,
    /// Micro-batches per held-out evaluation.
    #[arg(long, default_value_t = 2)]
    eval_batches: usize,
    /// Save a checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Peak learning rate of the Normuon group.
    #[arg(long, default_value_t = 0.02)]
    lr: f64,
    /// Final learning rate of the decay.
    #[arg(long, default_value_t = 0.002)]
    min_lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 4)]
    warmup: u64,
    #[arg(long, value_enum, default_value_t = Decay::Cosine)]
    decay: Decay,
    /// Length of the final decay of --decay wsd.
    #[arg(long, default_value_t = 0)]
    wsd_decay: u64,
    /// Peak learning rate of the AdamW group (default: the config's, else 0.004).
    #[arg(long)]
    aux_lr: Option<f64>,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Global gradient-norm clipping threshold (0 disables).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Span weights w_r,w_f of the loss.
    #[arg(long, default_value = "1.0,1.0", value_delimiter = ',', num_args = 2)]
    span_weights: Vec<f32>,
    /// Temperature T of the confidence weights exp((teacher_logp − m)/T) (stage 2).
    #[arg(long, default_value_t = 1.0)]
    kd_temperature: f32,
    /// Clip range w_min,w_max of the confidence weights (stage 2).
    #[arg(long, default_value = "0.25,4.0", value_delimiter = ',', num_args = 2)]
    kd_clip: Vec<f32>,
    /// Profile steps A..=B (1-based, cuda backend): a cudaProfiler capture range for
    /// `nsys profile --capture-range=cudaProfilerApi` / `ncu --profile-from-start off`, NVTX
    /// ranges per step and IR node, and a per-kernel timing table (CKPT_DIR/kernel-times.txt).
    #[arg(long, value_name = "A:B", value_parser = parse_steps)]
    profile_steps: Option<(u64, u64)>,
}

fn parse_steps(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once(':').unwrap_or((s, s));
    let num = |x: &str| x.trim().parse::<u64>().map_err(|_| format!("{s:?} is not A:B (step numbers from 1)"));
    let (a, b) = (num(a)?, num(b)?);
    if a == 0 || b < a {
        return Err(format!("{s:?}: need 1 <= A <= B"));
    }
    Ok((a, b))
}

/// The backend the user chose; the cuda one fails with an explanation where there is no GPU.
fn backend<'g>(
    args: &BackendArgs,
    graph: &'g vpmoe_ir::Graph,
    plan: &'g vpmoe_compiler::Plan,
    state: TrainState,
    plan_dir: Option<&std::path::Path>,
    max_tokens: usize,
) -> Result<Box<dyn Backend + 'g>> {
    Ok(match args.kind {
        BackendKind::Cpu if args.host_momentum => bail!("--host-momentum places cuda state; it needs --backend cuda"),
        BackendKind::Cpu if args.cublas => bail!("--cublas chooses cuda GEMMs; it needs --backend cuda"),
        BackendKind::Cpu => Box::new(CpuBackend::new(graph, plan, state)),
        BackendKind::Cuda => {
            let mut be = CudaBackend::new(graph, plan, state, plan_dir, max_tokens, args.host_momentum)?;
            if args.cublas {
                be.use_cublas()?;
            }
            let (stored, compiled) = be.kernel_sources();
            eprintln!(
                "cuda backend on {}: {stored} kernels from the plan's cubins, {compiled} compiled by NVRTC{}",
                Backend::device_name(&be),
                if args.cublas { "; plain dense GEMMs on cuBLAS" } else { "" }
            );
            Box::new(be)
        }
    })
}

/// `DIR` or `DIR:WEIGHT` (a suffix that is not a number is part of the path).
fn data_source(s: &str) -> (PathBuf, f64) {
    match s.rsplit_once(':') {
        Some((p, w)) if !p.is_empty() => match w.parse::<f64>() {
            Ok(w) => (PathBuf::from(p), w),
            Err(_) => (PathBuf::from(s), 1.0),
        },
        _ => (PathBuf::from(s), 1.0),
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The plan of `--plan DIR`, or of `--arch TOML` compiled in memory (default: the small config).
fn plan_of(plan: Option<PathBuf>, arch: Option<PathBuf>) -> Result<(vpmoe_ir::Graph, vpmoe_compiler::Plan)> {
    match plan {
        Some(dir) => load_plan(&dir),
        None => {
            let path = arch.unwrap_or_else(|| PathBuf::from("configs/small.toml"));
            vpmoe_compiler::compile_arch(&vpmoe_compiler::config::load(&path)?)
        }
    }
}

fn run_train(a: TrainArgs) -> Result<()> {
    let plan_dir = a.plan.clone();
    let (graph, plan) = plan_of(a.plan, a.arch)?;
    if a.profile_steps.is_some() && a.backend.kind != BackendKind::Cuda {
        bail!("--profile-steps profiles GPU kernels; it needs --backend cuda");
    }
    let seq_len = a.seq_len.unwrap_or(plan.arch.max_seq.min(128) as usize);
    let decay = match a.decay {
        Decay::Constant => vpmoe_ir::optim::DecayStyle::Constant,
        Decay::Linear => vpmoe_ir::optim::DecayStyle::Linear,
        Decay::Cosine => vpmoe_ir::optim::DecayStyle::Cosine,
        Decay::Wsd => vpmoe_ir::optim::DecayStyle::Wsd,
    };
    let schedule = vpmoe_ir::optim::Schedule {
        lr: a.lr,
        min_lr: a.min_lr,
        warmup: a.warmup,
        total: a.steps,
        decay,
        wsd_decay: a.wsd_decay,
    };
    let cfg = TrainConfig {
        micro_batch: a.micro_batch,
        grad_accum: a.grad_accum,
        seq_len,
        seed: a.seed,
        schedule,
        aux_lr: a.aux_lr.or(plan.arch.optimizer.aux_lr).unwrap_or(0.004),
        weight_decay: a.weight_decay,
        clip: a.clip,
        span_weights: [a.span_weights[0], a.span_weights[1]],
        kd: train::KdConfig { temperature: a.kd_temperature, w_min: a.kd_clip[0], w_max: a.kd_clip[1] },
    };
    // Open the device before any data work: a missing GPU is reported at once.
    let state = TrainState::init(&plan, cfg.seed);
    let mut be = backend(&a.backend, &graph, &plan, state, plan_dir.as_deref(), cfg.micro_batch * cfg.seq_len)?;
    let ckpt_dir = a.ckpt_dir.unwrap_or_else(|| PathBuf::from("runs").join(&plan.arch.name));
    let data: Vec<(PathBuf, f64)> = if a.data.is_empty() {
        vec![(vpmoe_runtime::bundled_sample_dataset(&ckpt_dir.join("data"), plan.arch.max_seq as usize)?, 1.0)]
    } else {
        a.data.iter().map(|s| data_source(s)).collect()
    };
    let opts = RunOptions {
        steps: a.steps,
        ckpt_dir,
        resume: a.resume,
        eval_every: a.eval_every,
        eval_batches: a.eval_batches,
        save_every: a.save_every,
        keep: a.keep,
        progress: true,
        print_every: (a.steps / 20).max(1),
        profile_steps: a.profile_steps,
    };
    println!(
        "train {} ({} params, fingerprint {}) on {} · backend {} · {} x {} x {} tokens per step",
        plan.arch.name,
        plan.report.params_total,
        &plan.fingerprint[..16],
        data.iter().map(|(d, w)| format!("{}:{w}", d.display())).collect::<Vec<_>>().join(" + "),
        a.backend.kind.to_possible_value().expect("named").get_name(),
        cfg.grad_accum,
        cfg.micro_batch,
        cfg.seq_len
    );
    let out = train::train(be.as_mut(), &plan, &data, &cfg, &opts)?;
    if let (Some(first), Some(last)) = (out.records.first(), out.records.last()) {
        println!("loss {:.4} -> {:.4} over steps {}..{}", first.loss, last.loss, first.step, last.step);
    }
    if let Some(p) = &out.checkpoint {
        println!("checkpoint {}", p.display());
    }
    println!("metrics {}", opts.ckpt_dir.join("metrics.jsonl").display());
    if out.interrupted {
        println!("interrupted: the checkpoint above resumes the run with --resume");
        std::process::exit(130);
    }
    Ok(())
}

/// Dense bf16 tensor-core peak (FLOP/s) of the GPUs vpmoe targets: the MFU baseline.
fn peak_flops(device: &str) -> Option<f64> {
    (device.contains("H100") || device.contains("H200")).then_some(989.4e12)
}

fn run_bench(args: BenchArgs) -> Result<()> {
    let BenchArgs { run: a, warmup, steps, grad_accum } = args;
    let (plan_dir, graph, plan, seq) = a.plan()?;
    if steps == 0 || grad_accum == 0 {
        bail!("--steps and --grad-accum must be at least 1");
    }
    let tokens = seq * a.micro_batch;
    let mut be = backend(&a.backend, &graph, &plan, TrainState::init(&plan, a.seed), plan_dir.as_deref(), tokens)?;
    let device = match a.backend.kind {
        BackendKind::Cpu => "cpu".to_string(),
        BackendKind::Cuda => be.device_name(),
    };
    let scalars = vpmoe_runtime::backend::StepScalars {
        lr: 1e-3,
        aux_lr: 1e-3,
        weight_decay: 0.01,
        clip: 1.0,
        bias_rate: plan.arch.moe.as_ref().and_then(|m| m.expert_bias_rate).unwrap_or(0.0),
    };
    let one_step = |be: &mut dyn Backend, i: u64| -> Result<(f64, f64)> {
        let mut batches: Vec<_> = (0..grad_accum)
            .map(|j| synthetic_batch(plan.arch.vocab, seq, a.micro_batch, a.seed + i * grad_accum + j))
            .collect();
        vpmoe_runtime::backend::seed_step(&mut batches, &plan.arch, [1.0, 1.0]);
        let t0 = Instant::now();
        for b in &batches {
            be.accumulate(b)?;
        }
        let st = be.step(&scalars)?;
        Ok((t0.elapsed().as_secs_f64(), st.optimizer_seconds))
    };
    let pb = indicatif::ProgressBar::new(warmup + steps + (a.backend.kind == BackendKind::Cuda) as u64);
    for i in 0..warmup {
        one_step(be.as_mut(), i)?;
        pb.inc(1);
    }
    let (mut wall, mut opt) = (Vec::new(), 0.0);
    for i in 0..steps {
        let (w, o) = one_step(be.as_mut(), warmup + i)?;
        wall.push(w);
        opt += o;
        pb.inc(1);
    }
    // One more step with per-kernel events, kept out of the timed ones (events cost time).
    let table = if a.backend.kind == BackendKind::Cuda {
        be.profile(true)?;
        one_step(be.as_mut(), warmup + steps)?;
        pb.inc(1);
        be.profile(false)?
    } else {
        None
    };
    pb.finish_and_clear();
    wall.sort_by(f64::total_cmp);
    let median = wall[wall.len() / 2];
    let tps = (tokens as u64 * grad_accum) as f64 / median;
    let flops = plan.report.training_flops_per_token;
    let gemms = if a.backend.cublas { ", cuBLAS GEMMs" } else { "" };
    println!("{}{gemms}", bench_header(&plan.arch.name, &device, grad_accum, a.micro_batch, seq, steps));
    println!("step          {:.3} s median (min {:.3}, max {:.3})", median, wall[0], wall[wall.len() - 1]);
    println!("tokens/s      {tps:.0}");
    match peak_flops(&device) {
        Some(p) => println!(
            "MFU           {:.2} % ({:.3e} FLOP per token x tokens/s over the {:.1} TFLOP/s dense bf16 peak)",
            100.0 * tps * flops / p,
            flops,
            p / 1e12
        ),
        None => println!("MFU           n/a (no known peak for {device}); {:.3e} FLOP/s achieved", tps * flops),
    }
    // The optimizer's cost is per step, the rest per micro-batch: from both, the step size at
    // which the optimizer falls under 10 % (the bar depends on the global batch).
    let opt_step = opt / steps as f64;
    let per_micro = (median - opt_step) / grad_accum as f64;
    print!("optimizer     {:.3} s per step, {:.1} % of step time", opt_step, 100.0 * opt / wall.iter().sum::<f64>());
    match micro_batches_for_share(opt_step, per_micro, 0.10) {
        Some(k) => println!("; under 10 % from {k} micro-batches ({} tokens) per step", k * tokens as u64),
        None => println!(),
    }
    if let Some((used, total)) = be.device_memory() {
        println!("device memory {:.2} of {:.2} GiB in use", used as f64 / GIB, total as f64 / GIB);
    }
    if let Some(t) = table {
        println!("\n{KERNEL_TABLE}\n{t}");
    }
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

/// The first line of a bench report (scripts/cublas-baseline reads the micro-batch size from it).
fn bench_header(arch: &str, device: &str, grad_accum: u64, micro_batch: usize, seq: usize, steps: u64) -> String {
    format!("bench {arch} on {device} ({grad_accum} x {micro_batch} x {seq} tokens per step, {steps} timed steps)")
}

/// The line before the per-kernel table of a bench report.
const KERNEL_TABLE: &str = "kernel time of one profiled step:";

/// The fewest micro-batches per step for which a fixed per-step optimizer time `opt` is at most
/// `share` of the step, each micro-batch taking `per_micro` seconds.
fn micro_batches_for_share(opt: f64, per_micro: f64, share: f64) -> Option<u64> {
    if !(per_micro > 0.0 && opt >= 0.0 && share > 0.0 && share < 1.0) {
        return None;
    }
    Some(((opt * (1.0 - share) / (share * per_micro) - 1e-9).ceil() as u64).max(1))
}

fn run_score(a: ScoreArgs) -> Result<()> {
    use vpmoe_runtime::teacher::{client::ClientConfig, score};
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let opts = score::ScoreOptions {
        client: ClientConfig {
            url: a.server,
            api: a.api,
            model: a.model,
            timeout: std::time::Duration::from_secs_f64(a.timeout),
            retries: a.retries,
            backoff: std::time::Duration::from_secs(1),
            vocab: vpmoe_data::tokenizer::VOCAB_SIZE as usize,
        },
        data: a.data,
        out: a.out,
        subset: a.subset,
        top_k: a.top_k,
        concurrency: a.concurrency,
        max_tokens_per_request: a.max_tokens_per_request,
        progress: true,
    };
    let r = score::score(&opts)?;
    println!(
        "scored {} documents ({} tokens): {} now, {} from earlier runs; {:.0} tokens/s",
        r.documents,
        r.tokens,
        r.scored_now,
        r.resumed,
        r.tokens_now as f64 / r.seconds.max(1e-9)
    );
    print!("{}", r.stats.format());
    println!("manifest {}", r.manifest.display());
    Ok(())
}

fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Data(cmd) => vpmoe_data::cli::run(cmd),
        Cmd::Teacher(TeacherCmd::Score(a)) => run_score(a),
        Cmd::Train(a) => run_train(a),
        Cmd::Bench(a) => run_bench(a),
        Cmd::Forward(run) => {
            let (micro_batch, seed) = (run.micro_batch, run.seed);
            let (plan_dir, graph, plan, seq) = run.plan()?;
            let a = &plan.arch;
            let batch = synthetic_batch(a.vocab, seq, micro_batch, seed);
            batch.validate(a.vocab)?;
            let t0 = Instant::now();
            let mut be = self::backend(
                &run.backend,
                &graph,
                &plan,
                TrainState::init(&plan, seed),
                plan_dir.as_deref(),
                seq * micro_batch,
            )?;
            let init_s = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let out = be.forward(&batch, &[])?;
            let fwd_s = t1.elapsed().as_secs_f64();
            let tl = out.token_loss();
            let span_mean = |s: u8| {
                let (sum, n) = tl
                    .iter()
                    .zip(&batch.span)
                    .zip(&batch.loss_mask)
                    .filter(|((_, sp), m)| **sp == s && **m != 0)
                    .fold((0f64, 0usize), |(a, n), ((l, _), _)| (a + *l as f64, n + 1));
                if n > 0 {
                    sum / n as f64
                } else {
                    0.0
                }
            };
            let aux: Vec<f32> = out.aux().into_iter().map(|(_, a)| a).collect();
            println!(
                "arch          {} ({} params, fingerprint {})",
                a.name,
                plan.report.params_total,
                &plan.fingerprint[..16]
            );
            println!("backend       {}", be.name());
            println!("batch         {micro_batch} x {seq} tokens (seed {seed})");
            println!(
                "loss          {:.6}   (w_r·CE_r + w_f·CE_f; ln(vocab) = {:.6})",
                out.loss(),
                (a.vocab as f64).ln()
            );
            println!("span losses   reasoning {:.6}, final {:.6}", span_mean(1), span_mean(2));
            if !aux.is_empty() {
                println!(
                    "seq aux loss  {:.6} (mean over {} MoE layers; 1.0 = balanced)",
                    aux.iter().sum::<f32>() / aux.len() as f32,
                    aux.len()
                );
            }
            println!(
                "time          init {init_s:.2} s, forward {fwd_s:.3} s ({:.0} tokens/s)",
                batch.tokens.len() as f64 / fwd_s
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{bench_header, micro_batches_for_share, KERNEL_TABLE};
    use vpmoe_runtime::cuda::timing::Timer;

    /// scripts/cublas-baseline reads what `bench` prints: the header's micro-batch size and the
    /// per-kernel table's dense GEMM rows (grouped expert GEMMs and other kernels are skipped).
    #[test]
    fn cublas_baseline_reads_the_bench_report() {
        let mut t = Timer::default();
        for (k, ms) in [
            ("vp_gemm_N1536_KD1024_EPI0_OUT0", 0.05),
            ("vp_gemm_nn_N1024_KD256_E0_AMODE1_EPI0_OUT0", 0.02),
            ("vp_gemm_tn_N25152_K1024_E0_AMODE0_BRELU20_BIAS0", 1.4),
            ("vp_gemm_tn_N1024_K512_E0_AMODE0_BRELU20_BIAS1", 0.03),
            ("vp_gemm_tn_N128_K1024_E256_AMODE0_BRELU20_BIAS1", 0.02),
            ("vp_attention_D128_HEADS8_GROUPS2_WINDOW0_ALIBI1_SINKS1", 0.06),
        ] {
            t.add(k, "other", ms);
        }
        let log =
            format!("{}\nstep 1.0 s\n\n{KERNEL_TABLE}\n{}", bench_header("vpmoe", "H100", 8, 2, 2048, 5), t.table());
        let dir = std::env::temp_dir().join(format!("vpmoe-cublas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bench.log"), log).unwrap();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cublas-baseline");
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg("--shapes")
            .arg(dir.join("bench.log"))
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("M = 4096"), "{text}");
        assert!(text.contains("nt 4096,1536,1024"), "{text}");
        assert!(text.contains("nn 4096,1024,256 x2"), "{text}");
        assert!(text.contains("tn 4096,25152,1024"), "{text}");
        assert!(text.contains("tn 4096,1024,512 +b"), "{text}");
        assert!(!text.contains("E256") && !text.contains("attention"), "{text}");
    }

    #[test]
    fn optimizer_share_crossover() {
        // 0.1 s of optimizer against 0.1 s micro-batches: 9 of them make it exactly 10 %.
        assert_eq!(micro_batches_for_share(0.1, 0.1, 0.1), Some(9));
        assert_eq!(micro_batches_for_share(0.1, 0.09, 0.1), Some(10));
        assert_eq!(micro_batches_for_share(0.0, 0.1, 0.1), Some(1));
        assert_eq!(micro_batches_for_share(0.1, 0.0, 0.1), None);
        assert_eq!(micro_batches_for_share(0.1, -1.0, 0.1), None);
    }
}
