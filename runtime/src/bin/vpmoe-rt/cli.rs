//! The command line: every subcommand's arguments, and what they select (the plan, the backend,
//! the datasets).

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use vpmoe_runtime::{
    cpu::CpuBackend, cuda::optim::Placement, cuda::CudaBackend, load_plan, state::TrainState, Backend,
};

#[derive(Parser)]
#[command(name = "vpmoe-rt", version, about = "Run compiled vpmoe plans: forward, data, training")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub(crate) enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub(crate) enum Decay {
    Constant,
    Linear,
    Cosine,
    Wsd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Train on token datasets (stage 1 CE; stage 2 confidence-weighted CE on teacher-scored
    /// rows; stage 3 on-policy distillation with --opd-teacher); with no --data, on the bundled
    /// SYNTH sample, rendered and tokenised into CKPT_DIR/data on first use.
    Train(Box<TrainArgs>),
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
    /// Continue Harmony prompts with a trained checkpoint: tokens, log-probabilities, the parsed
    /// messages and a format-validity verdict per prompt, as JSONL, and a summary.
    Sample(SampleArgs),
    /// Talk with a trained checkpoint in the terminal: the analysis channel dimmed, the final
    /// answer plain; /reset starts over, /quit (or end of input) leaves.
    Chat(ChatArgs),
    /// The student's log-probability of every token of given sequences (token ids, text or
    /// Harmony conversations), as JSONL: bitwise the training forward's numbers.
    Score(StudentScoreArgs),
    /// Evaluate a checkpoint: held-out loss per span on datasets' valid splits, the Harmony
    /// format validity of sampled answers, multiple-choice tasks; a table and a JSON report.
    Eval(EvalArgs),
    /// Draw a run's metrics.jsonl: one HTML page of SVG panels (losses with held-out points,
    /// learning rate, gradient norm, throughput, router health and per-layer loads, stage 2 and
    /// stage 3 signals when present).
    Plot(PlotArgs),
    /// Bring in weights from elsewhere: `import hf` reads a Hugging Face Qwen3-family checkpoint
    /// into a vpmoe checkpoint (fresh optimizer state) that `train --init` starts from.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Grow a dense checkpoint into a deeper and/or mixture-of-experts architecture (depth
    /// growth with identity layers, dense MLP → shared expert + routed experts), preserving the
    /// function it computes (docs/rungs.md); writes a step-0 checkpoint for `train --init`.
    Upcycle(UpcycleArgs),
    /// Run a command as N data-parallel ranks on this machine, with the variables torchrun sets
    /// (RANK, WORLD_SIZE, MASTER_ADDR, …): `vpmoe-rt launch --nproc 4 -- train --backend cpu …`.
    /// Under torchrun (`--no-python`) or srun, run `vpmoe-rt train …` directly instead.
    Launch(LaunchArgs),
}

#[derive(clap::Args)]
pub(crate) struct LaunchArgs {
    /// Ranks to start.
    #[arg(long)]
    pub(crate) nproc: usize,
    /// Port rank 0 listens on (default: a free one).
    #[arg(long)]
    pub(crate) master_port: Option<u16>,
    /// The vpmoe-rt command each rank runs, after `--`.
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
}

#[derive(clap::Args)]
pub(crate) struct UpcycleArgs {
    /// The source checkpoint (a step_N directory or a run directory).
    #[arg(long)]
    pub(crate) from: PathBuf,
    /// The architecture the source was trained with.
    #[arg(long)]
    pub(crate) from_arch: PathBuf,
    /// The target architecture (e.g. configs/rungs/vpDense_80.toml, configs/vpmoe.toml).
    #[arg(long)]
    pub(crate) arch: PathBuf,
    /// A new run directory: the checkpoint lands in OUT/step_00000000.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Seed of the router weights and of the noise that tells copied experts apart.
    #[arg(long, default_value_t = 1234)]
    pub(crate) seed: u64,
}

#[derive(Subcommand)]
pub(crate) enum ImportCmd {
    /// A Hugging Face checkpoint (config.json + *.safetensors, sharded or not) of the Qwen3
    /// family with the o200k vocabulary, mapped tensor by tensor onto the architecture
    /// (docs/rungs.md); every shape is checked before anything is written.
    Hf(ImportHfArgs),
}

#[derive(clap::Args)]
pub(crate) struct ImportHfArgs {
    /// The Hugging Face checkpoint directory.
    #[arg(long)]
    pub(crate) from: PathBuf,
    /// Architecture to import into (e.g. configs/rungs/qwen3-0_6B-o200k.toml).
    #[arg(long, conflicts_with = "plan", required_unless_present = "plan")]
    pub(crate) arch: Option<PathBuf>,
    /// Plan directory to import into (instead of --arch).
    #[arg(long)]
    pub(crate) plan: Option<PathBuf>,
    /// A new run directory: the checkpoint lands in OUT/step_00000000.
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct PlotArgs {
    /// A run directory (the --ckpt-dir of `vpmoe-rt train`).
    pub(crate) run: PathBuf,
    /// The page to write [default: RUN/plot.html].
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Dataset roots whose `valid` split gives the held-out loss (repeatable).
    #[arg(long, value_name = "DIR")]
    pub(crate) data: Vec<PathBuf>,
    /// Micro-batches of the held-out loss (the run's micro-batch size and row length, from the
    /// checkpoint); the default is `train`'s, so the numbers match its last evaluation.
    #[arg(long, default_value_t = 2)]
    pub(crate) eval_batches: usize,
    /// Prompts to sample answers to (the JSONL of `sample`), greedy and sampled.
    #[arg(long)]
    pub(crate) prompts: Option<PathBuf>,
    /// Sampled answers per prompt (temperature 1, the full distribution), besides the greedy one.
    #[arg(long, default_value_t = 4)]
    pub(crate) samples: usize,
    /// Reasoning efforts to sample under (repeatable; default medium).
    #[arg(long, value_enum)]
    pub(crate) reasoning_effort: Vec<vpmoe_data::harmony::ReasoningEffort>,
    /// Tokens per sampled answer at most.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_new_tokens: usize,
    /// Seed of the sampled answers.
    #[arg(long, default_value_t = 1234)]
    pub(crate) seed: u64,
    /// Multiple-choice task files (JSONL; docs/cli.md), repeatable.
    #[arg(long, value_name = "FILE")]
    pub(crate) tasks: Vec<PathBuf>,
    /// Canary set whose per-document loss is reported (JSONL; docs/cli.md) [default: the
    /// built-in data/canary.jsonl, for Harmony models].
    #[arg(long, value_name = "FILE")]
    pub(crate) canary: Option<PathBuf>,
    /// A teacher server (http://HOST:PORT): its mean log-probability of the sampled answers' final
    /// messages is reported (agreement); needs --prompts and --api.
    #[arg(long, value_name = "URL", requires_all = ["api", "prompts"])]
    pub(crate) teacher: Option<String>,
    /// The teacher's API: vLLM /v1/completions (prompt_logprobs) or SGLang /generate.
    #[arg(long, value_enum, requires = "teacher")]
    pub(crate) api: Option<vpmoe_runtime::teacher::wire::Api>,
    /// Write the JSON report here too.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct StudentScoreArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// JSONL, one sequence a line: `{"tokens": [ids]}`, a JSON string (text) or a Harmony
    /// conversation `{"messages": [...]}`.
    #[arg(long)]
    pub(crate) input: PathBuf,
    /// JSONL output, one record a line of the input (written whole at the end).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Also give the K most likely tokens at every position.
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
}

/// The model `sample` and `chat` generate with.
#[derive(clap::Args)]
pub(crate) struct ModelArgs {
    /// A checkpoint (`step_N`) or a run directory (its newest checkpoint).
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// Plan directory the checkpoint was trained with.
    #[arg(long, conflicts_with = "arch")]
    pub(crate) plan: Option<PathBuf>,
    /// Or its architecture TOML (default: the built-in configs/small.toml).
    #[arg(long)]
    pub(crate) arch: Option<PathBuf>,
    /// Which backend generates. Always explicit.
    #[arg(long = "backend", value_enum, value_name = "BACKEND")]
    pub(crate) backend: BackendKind,
}

/// How `sample` and `chat` choose tokens.
#[derive(clap::Args)]
pub(crate) struct SamplingArgs {
    /// Reasoning effort of the system message added to prompts without one.
    #[arg(long, value_enum, default_value_t = vpmoe_data::harmony::ReasoningEffort::Medium)]
    pub(crate) reasoning_effort: vpmoe_data::harmony::ReasoningEffort,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) temperature: f32,
    /// Nucleus: keep the most likely tokens up to this probability (1 keeps all).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f32,
    /// Keep the K most likely tokens (0 keeps all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Tokens per answer at most (the context may end it sooner).
    #[arg(long, default_value_t = 512)]
    pub(crate) max_new_tokens: usize,
    /// Seed of the draws: a prompt's sample depends on it, its index and the position only.
    #[arg(long, default_value_t = 1234)]
    pub(crate) seed: u64,
}

#[derive(clap::Args)]
pub(crate) struct SampleArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// JSONL, one prompt a line: a JSON string (a user message) or a Harmony conversation
    /// `{"messages": [...]}`.
    #[arg(long)]
    pub(crate) prompts: PathBuf,
    /// JSONL output, one record a prompt (written whole at the end).
    #[arg(long)]
    pub(crate) out: PathBuf,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    /// Sequences generated together (a finished one's slot goes to the next prompt).
    #[arg(long, default_value_t = 8)]
    pub(crate) batch: usize,
}

#[derive(clap::Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
}

/// The backend and where its state lives.
#[derive(clap::Args)]
pub(crate) struct BackendArgs {
    /// Which backend executes the plan. Always explicit: nothing falls back silently.
    #[arg(long = "backend", value_enum, value_name = "BACKEND")]
    pub(crate) kind: BackendKind,
    /// cuda: keep the Normuon momenta in pinned host memory, read and written over PCIe once per
    /// step (same results bit for bit). The locked config then fits an 80 GB H100.
    #[arg(long)]
    pub(crate) host_momentum: bool,
    /// cuda: issue the dense GEMMs that are plain products (the LM head's backward, bias-free
    /// projections) as cuBLAS calls instead of generated kernels. Needs libcublas on the loader
    /// path; results differ from the generated kernels by summation order only.
    #[arg(long)]
    pub(crate) cublas: bool,
}

/// A plan run on seeded synthetic micro-batches (`forward`, `bench`).
#[derive(clap::Args)]
pub(crate) struct SyntheticRun {
    /// Plan directory written by `vpmoec compile` (its cubins are used when current).
    #[arg(long, conflicts_with = "arch")]
    pub(crate) plan: Option<PathBuf>,
    /// Or compile this architecture TOML in memory (default: the built-in configs/small.toml).
    #[arg(long)]
    pub(crate) arch: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    /// Tokens per row (default: the architecture's max_sequence_length).
    #[arg(long)]
    pub(crate) seq_len: Option<usize>,
    /// Rows in the micro-batch.
    #[arg(long, default_value_t = 1)]
    pub(crate) micro_batch: usize,
    /// Seed for parameter initialisation and the synthetic tokens.
    #[arg(long, default_value_t = 1234)]
    pub(crate) seed: u64,
}

impl SyntheticRun {
    /// The plan directory (if any), graph, plan and the checked row length.
    pub(crate) fn plan(&self) -> Result<(Option<PathBuf>, vpmoe_ir::Graph, vpmoe_compiler::Plan, usize)> {
        let (graph, plan) = plan_of(self.plan.clone(), self.arch.clone())?;
        let seq = self.seq_len.unwrap_or(plan.arch.max_seq as usize);
        if seq == 0 || seq as u64 > plan.arch.max_seq {
            bail!("--seq-len {seq} must be in 1..={}", plan.arch.max_seq);
        }
        Ok((self.plan.clone(), graph, plan, seq))
    }
}

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) run: SyntheticRun,
    /// Untimed steps first (kernel loading, caches, clocks).
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: u64,
    /// Timed training steps.
    #[arg(long, default_value_t = 5)]
    pub(crate) steps: u64,
    /// Micro-batches per step (forward and backward each, then one optimizer step): the
    /// optimizer's share of step time falls as 1/M, so set it to the run's.
    #[arg(long, default_value_t = 1)]
    pub(crate) grad_accum: u64,
    /// Time generation instead (cpu): prefill and decode tokens/s at batch 1 and
    /// --micro-batch for contexts of 128 tokens up to max_sequence_length, beside recomputing
    /// the whole prefix for every token; --steps decode steps per context.
    #[arg(long)]
    pub(crate) decode: bool,
}

#[derive(Subcommand)]
pub(crate) enum TeacherCmd {
    /// Score a subset of a build-synth dataset's train split: send each document's exact token
    /// ids, store the teacher's per-token log-probabilities (and top-k) as sidecars aligned
    /// with the labels. Resumable: re-run the same command after a crash or a kill.
    Score(ScoreArgs),
}

#[derive(clap::Args)]
pub(crate) struct ScoreArgs {
    /// Teacher server, http://HOST:PORT.
    #[arg(long)]
    pub(crate) server: String,
    /// Its API: vLLM /v1/completions (prompt_logprobs) or SGLang /generate.
    #[arg(long, value_enum)]
    pub(crate) api: vpmoe_runtime::teacher::wire::Api,
    /// Model to request (default: the one the server serves).
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Dataset root written by `vpmoe-rt data build-synth`.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Output directory of the scored dataset (created; re-running continues it).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Which documents: fraction=F,prefer=long-reasoning|random,exercise=a|b,language=x|y,
    /// balance=exercise|language (deterministic by synth_id).
    #[arg(long, default_value = "fraction=1")]
    pub(crate) subset: vpmoe_data::teacher::SubsetRule,
    /// Also store the teacher's top-k candidates per position (vLLM caps k at --max-logprobs, 20).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub(crate) concurrency: usize,
    /// Pack whole documents into one request up to this many tokens (server logprob memory
    /// grows with it: about 9.2 GiB per 8,192 tokens for the 201k vocabulary).
    #[arg(long, default_value_t = 8192)]
    pub(crate) max_tokens_per_request: usize,
    /// Seconds one request may take, response included.
    #[arg(long, default_value_t = 600.0)]
    pub(crate) timeout: f64,
    /// Retries of a request after a transport error, 429 or 5xx (exponential backoff from 1 s).
    #[arg(long, default_value_t = 6)]
    pub(crate) retries: u32,
}

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// Plan directory written by `vpmoec compile`.
    #[arg(long, conflicts_with = "arch")]
    pub(crate) plan: Option<PathBuf>,
    /// Or compile this architecture TOML in memory (default: the built-in configs/small.toml).
    #[arg(long)]
    pub(crate) arch: Option<PathBuf>,
    /// Dataset root (`data build-synth` or `teacher score` output), optionally `DIR:WEIGHT`.
    /// Repeat to blend: e.g. `--data synth:0.3 --data rescored:0.7` draws 70 % of the rows from
    /// the teacher-scored set (confidence-weighted CE) and 30 % from the vanilla one (plain CE).
    /// Held-out loss uses the valid split of the first dataset that has one.
    #[arg(long, value_name = "DIR[:WEIGHT]")]
    pub(crate) data: Vec<String>,
    #[command(flatten)]
    pub(crate) backend: BackendArgs,
    /// Optimizer steps of the whole run (a resumed run continues up to this step).
    #[arg(long, default_value_t = 40)]
    pub(crate) steps: u64,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 2)]
    pub(crate) micro_batch: usize,
    /// Micro-batches per optimizer step, over all data-parallel ranks (a multiple of the world
    /// size; each rank runs its share), so a run's batch does not depend on how many ranks run it.
    #[arg(long, default_value_t = 2)]
    pub(crate) grad_accum: usize,
    /// Tokens per row (default: min(128, max_sequence_length)).
    #[arg(long)]
    pub(crate) seq_len: Option<usize>,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 1234)]
    pub(crate) seed: u64,
    /// Checkpoints and metrics.jsonl go here (default: runs/<arch name>).
    #[arg(long)]
    pub(crate) ckpt_dir: Option<PathBuf>,
    /// Continue from the newest checkpoint in --ckpt-dir (refused if the run differs); any world
    /// size resumes any checkpoint.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Data parallel: every rank keeps the whole optimizer state instead of its share (ZeRO-1).
    /// The same numbers; the unsharded reference.
    #[arg(long)]
    pub(crate) replicated_optimizer: bool,
    /// Canary set no training dataset may contain (JSONL; docs/cli.md) [default: the built-in
    /// data/canary.jsonl].
    #[arg(long, value_name = "FILE")]
    pub(crate) canary: Option<PathBuf>,
    /// Prompts (the JSONL of `sample`) whose greedy answers' Harmony validity every evaluation
    /// reports (with --eval-every; the canary set's loss is reported when --canary is given).
    #[arg(long, value_name = "FILE")]
    pub(crate) eval_prompts: Option<PathBuf>,
    /// Start from the weights of this checkpoint (a step_N directory, or a run directory's
    /// newest), with fresh optimizer state and schedule: the previous stage of the recipe.
    #[arg(long, value_name = "CHECKPOINT")]
    pub(crate) init: Option<PathBuf>,
    /// Held-out evaluation every N steps (0: never).
    #[arg(long, default_value_t = 10)]
    pub(crate) eval_every: u64,
    /// Micro-batches per held-out evaluation.
    #[arg(long, default_value_t = 2)]
    pub(crate) eval_batches: usize,
    /// Save a checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub(crate) save_every: u64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    pub(crate) keep: usize,
    /// Peak learning rate of the Normuon group.
    #[arg(long, default_value_t = 0.02)]
    pub(crate) lr: f64,
    /// Final learning rate of the decay.
    #[arg(long, default_value_t = 0.002)]
    pub(crate) min_lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 4)]
    pub(crate) warmup: u64,
    #[arg(long, value_enum, default_value_t = Decay::Cosine)]
    pub(crate) decay: Decay,
    /// Length of the final decay of --decay wsd.
    #[arg(long, default_value_t = 0)]
    pub(crate) wsd_decay: u64,
    /// Peak learning rate of the AdamW group (default: the config's `normuon_aux_lr`, else
    /// --lr, as MODEL.md §7.4 says).
    #[arg(long)]
    pub(crate) aux_lr: Option<f64>,
    /// Final learning rate of the AdamW group (default: the config's `normuon_aux_min_lr`, else
    /// --min-lr).
    #[arg(long)]
    pub(crate) aux_min_lr: Option<f64>,
    #[arg(long, default_value_t = 0.01)]
    pub(crate) weight_decay: f64,
    /// Global gradient-norm clipping threshold (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) clip: f64,
    /// Span weights w_r,w_f of the loss.
    #[arg(long, value_name = "W_R,W_F", default_value = "1.0,1.0", value_parser = pair)]
    pub(crate) span_weights: [f32; 2],
    /// Temperature T of the confidence weights exp((teacher_logp − m)/T) (stage 2).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) kd_temperature: f32,
    /// Clip range w_min,w_max of the confidence weights (stage 2).
    #[arg(long, value_name = "W_MIN,W_MAX", default_value = "0.25,4.0", value_parser = pair)]
    pub(crate) kd_clip: [f32; 2],
    /// Profile steps A..=B (1-based, cuda backend): a cudaProfiler capture range for
    /// `nsys profile --capture-range=cudaProfilerApi` / `ncu --profile-from-start off`, NVTX
    /// ranges per step and IR node, and a per-kernel timing table (CKPT_DIR/kernel-times.txt).
    #[arg(long, value_name = "A:B", value_parser = parse_steps)]
    pub(crate) profile_steps: Option<(u64, u64)>,
    #[command(flatten)]
    pub(crate) opd: OpdArgs,
}

/// Stage 3, on-policy distillation (docs/training.md): given --opd-teacher, the student samples
/// answers to SYNTH prompts and trains on the teacher's log-probabilities of its own tokens.
#[derive(clap::Args)]
pub(crate) struct OpdArgs {
    /// Teacher server for stage 3, http://HOST:PORT (GPT-OSS-120B behind vLLM or SGLang).
    #[arg(long, value_name = "URL", requires = "api")]
    pub(crate) opd_teacher: Option<String>,
    /// The teacher's API: vLLM /v1/completions (prompt_logprobs) or SGLang /generate.
    #[arg(long, value_enum, requires = "opd_teacher")]
    pub(crate) api: Option<vpmoe_runtime::teacher::wire::Api>,
    /// Build-synth dataset whose user messages are the prompts [default: the first --data].
    #[arg(long, value_name = "DIR", requires = "opd_teacher")]
    pub(crate) opd_prompts: Option<PathBuf>,
    /// Share of steps that are plain CE on the --data SYNTH traces [default: 0.15].
    #[arg(long, requires = "opd_teacher")]
    pub(crate) ce_anchor: Option<f64>,
    /// Optimizer steps a rollout's weights may lag the trainer's: 0 samples, scores and trains in
    /// order (bitwise reproducible); 1 samples the next step while this one trains [default: 1].
    #[arg(long, requires = "opd_teacher")]
    pub(crate) max_lag: Option<u64>,
    /// Truncation c of the importance ratio min(exp(lp − lp_sampler), c) [default: 2].
    #[arg(long, requires = "opd_teacher")]
    pub(crate) opd_clip: Option<f32>,
    /// Completion tokens per rollout [default: --seq-len / 2].
    #[arg(long, requires = "opd_teacher")]
    pub(crate) max_new_tokens: Option<usize>,
    /// OPD tokens the curriculum's fractions refer to (the stage's budget; DISTILL.md: about 8B)
    /// [default: the run's capacity, steps × rows × max-new-tokens × (1 − ce-anchor)].
    #[arg(long, requires = "opd_teacher")]
    pub(crate) opd_tokens: Option<u64>,
    /// Curriculum of reasoning efforts and rollouts per prompt (TOML) [default: DISTILL.md's
    /// 3a/3b/3c].
    #[arg(long, value_name = "FILE", requires = "opd_teacher")]
    pub(crate) curriculum: Option<PathBuf>,
}

/// Two numbers written `A,B`.
pub(crate) fn pair(s: &str) -> Result<[f32; 2], String> {
    let bad = || format!("{s:?} is not two numbers written A,B");
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    let num = |x: &str| x.trim().parse::<f32>().map_err(|_| bad());
    Ok([num(a)?, num(b)?])
}

pub(crate) fn parse_steps(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once(':').unwrap_or((s, s));
    let num = |x: &str| x.trim().parse::<u64>().map_err(|_| format!("{s:?} is not A:B (step numbers from 1)"));
    let (a, b) = (num(a)?, num(b)?);
    if a == 0 || b < a {
        return Err(format!("{s:?}: need 1 <= A <= B"));
    }
    Ok((a, b))
}

/// The client settings of a teacher server the run depends on (stage 3, `eval --teacher`).
pub(crate) fn teacher_client(
    url: String,
    api: vpmoe_runtime::teacher::wire::Api,
) -> vpmoe_runtime::teacher::client::ClientConfig {
    vpmoe_runtime::teacher::client::ClientConfig {
        url,
        api,
        model: None,
        timeout: std::time::Duration::from_secs(600),
        retries: 6,
        backoff: std::time::Duration::from_secs(1),
        vocab: vpmoe_data::tokenizer::VOCAB_SIZE as usize,
    }
}

/// The backend the user chose; the cuda one fails with an explanation where there is no GPU.
/// `shard`: the data-parallel job whose ranks share the optimizer (ZeRO-1), which the cuda
/// backend places when it allocates (the cpu one shards when it joins the job).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backend<'g>(
    args: &BackendArgs,
    graph: &'g vpmoe_ir::Graph,
    plan: &'g vpmoe_compiler::Plan,
    state: TrainState,
    plan_dir: Option<&std::path::Path>,
    max_tokens: usize,
    shard: Option<vpmoe_runtime::dist::Dist>,
) -> Result<Box<dyn Backend + 'g>> {
    Ok(match args.kind {
        BackendKind::Cpu if args.host_momentum => bail!("--host-momentum places cuda state; it needs --backend cuda"),
        BackendKind::Cpu if args.cublas => bail!("--cublas chooses cuda GEMMs; it needs --backend cuda"),
        BackendKind::Cpu => {
            vpmoe_runtime::cpu::check_host_memory(plan, max_tokens)?;
            Box::new(CpuBackend::new(graph, plan, state))
        }
        BackendKind::Cuda => {
            let placement = Placement { host_momentum: args.host_momentum, shard };
            let mut be = CudaBackend::new(graph, plan, state, plan_dir, max_tokens, placement)?;
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

/// The decode program on the chosen backend for `slots` sequences; the cuda one fails with an
/// explanation where there is no GPU. Its kernels come from `plan_dir`'s cubins where current.
pub(crate) fn decoder(
    kind: BackendKind,
    graph: &vpmoe_ir::Graph,
    plan: &vpmoe_compiler::Plan,
    state: &TrainState,
    plan_dir: Option<&std::path::Path>,
    slots: usize,
) -> Result<vpmoe_runtime::decode::Decoder> {
    use vpmoe_runtime::decode::DecodeOn;
    let on = match kind {
        BackendKind::Cpu => DecodeOn::Cpu,
        BackendKind::Cuda => DecodeOn::Cuda(plan_dir.map(std::path::Path::to_path_buf)),
    };
    on.decoder(graph, plan, state, slots)
}

/// `DIR` or `DIR:WEIGHT` (a suffix that is not a number is part of the path).
pub(crate) fn data_source(s: &str) -> (PathBuf, f64) {
    match s.rsplit_once(':') {
        Some((p, w)) if !p.is_empty() => match w.parse::<f64>() {
            Ok(w) => (PathBuf::from(p), w),
            Err(_) => (PathBuf::from(s), 1.0),
        },
        _ => (PathBuf::from(s), 1.0),
    }
}

/// The built-in architecture of the main job (`configs/small.toml`, embedded: it does not depend on
/// the working directory).
const SMALL: &str = include_str!("../../../../configs/small.toml");

/// The plan of `--plan DIR`, or of `--arch TOML` compiled in memory (default: the built-in small
/// config).
pub(crate) fn plan_of(plan: Option<PathBuf>, arch: Option<PathBuf>) -> Result<(vpmoe_ir::Graph, vpmoe_compiler::Plan)> {
    let arch = match (plan, arch) {
        (Some(dir), _) => return load_plan(&dir),
        (None, Some(path)) => vpmoe_compiler::config::load(&path)?,
        (None, None) => vpmoe_compiler::config::parse(SMALL, "small", std::path::Path::new("."))?,
    };
    vpmoe_compiler::compile_arch(&arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pair flags take the form `--help` and docs/cli.md write: `A,B`.
    #[test]
    fn pair_flags_take_the_documented_form() {
        let cli = Cli::try_parse_from([
            "vpmoe-rt",
            "train",
            "--backend",
            "cpu",
            "--span-weights",
            "1.0,0.5",
            "--kd-clip",
            "0.5,2",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Cmd::Train(a) = cli.cmd else { panic!("not train") };
        assert_eq!((a.span_weights, a.kd_clip), ([1.0, 0.5], [0.5, 2.0]));
        let e = Cli::try_parse_from(["vpmoe-rt", "train", "--backend", "cpu", "--span-weights", "1.0"]).err().unwrap();
        assert!(e.to_string().contains("is not two numbers written A,B"), "{e}");
    }
}
