//! The training loop, as a sequence of named steps. One optimizer step: [`Source::draw`] the
//! step's micro-batches (their span scales `w_span/N_span` over the whole step, D6, so the
//! objective and gradient do not depend on how the step is split), [`accumulate`] their forward
//! and backward passes, [`update`] (the optimizer step, §7.1), then profile, evaluate, checkpoint
//! and log what is due. Stages 1 and 2 draw from token datasets ([`source::Datasets`]); stage 3
//! from on-policy rollouts (`crate::opd::Opd`).

mod eval;
mod provenance;
mod records;
mod source;

pub use eval::{eval_split, evaluate, Sampled};
use provenance::Checkpoints;
pub use provenance::Provenance;
pub use records::{EvalRecord, KdRecord, StepRecord};
pub use source::{Datasets, Drawn, KdCenter, Source};

use crate::backend::{Backend, StepScalars, StepStats};
use crate::checkpoint::Rng;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vpmoe_compiler::Plan;
use vpmoe_ir::optim::Schedule;

/// The run's semantic settings: recorded in every checkpoint; `--resume` refuses a difference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// The Normuon group's schedule; the AdamW group's has the same shape from `aux_lr` to
    /// `aux_min_lr` (MODEL.md §7.4: both default to the Normuon group's).
    pub schedule: Schedule,
    pub aux_lr: f64,
    pub aux_min_lr: f64,
    pub weight_decay: f64,
    pub clip: f64,
    /// Span weights `w_r`, `w_f`.
    pub span_weights: [f32; 2],
    /// Stage 2 confidence weights (used on rows that carry teacher log-probabilities).
    pub kd: KdConfig,
    /// The checksum of the weights the run started from when not its own initialisation
    /// (`--init`, the previous stage's checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_sha256: Option<String>,
    /// Stage 3 (on-policy distillation) when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opd: Option<crate::opd::OpdConfig>,
}

/// `w_t = clip(exp((teacher_logp − m)/T), w_min, w_max)`; m is the running mean of every
/// teacher log-probability trained on so far (this step's included), kept in checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KdConfig {
    pub temperature: f32,
    pub w_min: f32,
    pub w_max: f32,
}

impl Default for KdConfig {
    fn default() -> Self {
        KdConfig { temperature: 1.0, w_min: 0.25, w_max: 4.0 }
    }
}

/// Where and how often (not part of the run's semantics).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub steps: u64,
    pub ckpt_dir: PathBuf,
    pub resume: bool,
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Save every N steps (0: only at the end and on interrupt).
    pub save_every: u64,
    pub keep: usize,
    pub progress: bool,
    /// Print a summary line every N steps (0: never).
    pub print_every: u64,
    /// Steps `A..=B` (1-based) to profile: capture range, NVTX step ranges and a per-kernel
    /// timing table written to `CKPT_DIR/kernel-times.txt`.
    pub profile_steps: Option<(u64, u64)>,
    /// Stage 3's teacher and prompts (with `TrainConfig::opd`).
    pub opd: Option<crate::opd::OpdRun>,
    /// The canary set no dataset may contain (`None`: the built-in one); given, its loss is also
    /// part of every evaluation.
    pub canary: Option<PathBuf>,
    /// Prompts whose greedy answers' Harmony validity is part of every evaluation.
    pub eval_prompts: Option<PathBuf>,
    /// The data-parallel job this process is a rank of (one rank by default). Every rank runs
    /// `train` with the same arguments; rank 0 alone prints, logs and writes checkpoints.
    pub dist: crate::dist::Dist,
    /// With more than one rank: each keeps only its part of the optimizer (ZeRO-1) rather than
    /// all of it (the same numbers either way).
    pub shard_optimizer: bool,
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub records: Vec<StepRecord>,
    pub interrupted: bool,
    pub checkpoint: Option<PathBuf>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the SIGINT handler once: the loop saves a checkpoint at the next step boundary.
fn install_sigint() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without saving");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: saving a checkpoint at the next step boundary (Ctrl-C again to abort)");
        });
    });
}

fn validate(cfg: &TrainConfig, plan: &Plan, dist: &crate::dist::Dist) -> Result<()> {
    ensure!(cfg.micro_batch >= 1, "--micro-batch must be at least 1");
    ensure!(cfg.grad_accum >= 1, "--grad-accum must be at least 1");
    dist.check_micro_batches(cfg.grad_accum)?;
    ensure!(
        cfg.seq_len >= 1 && cfg.seq_len as u64 <= plan.arch.max_seq,
        "--seq-len {} must be in 1..={} (the architecture's max_sequence_length)",
        cfg.seq_len,
        plan.arch.max_seq
    );
    cfg.schedule.check().map_err(|e| {
        anyhow::anyhow!("learning-rate schedule (--lr, --min-lr, --warmup, --steps, --decay, --wsd-decay): {e}")
    })?;
    cfg.aux_schedule()
        .check()
        .map_err(|e| anyhow::anyhow!("AdamW learning-rate schedule (--aux-lr, --aux-min-lr): {e}"))?;
    ensure!(cfg.weight_decay.is_finite() && cfg.weight_decay >= 0.0, "--weight-decay must be non-negative");
    ensure!(cfg.clip.is_finite() && cfg.clip >= 0.0, "--clip must be non-negative (0 disables clipping)");
    for w in cfg.span_weights {
        ensure!(w.is_finite() && w >= 0.0, "span weights must be non-negative, got {w}");
    }
    let k = &cfg.kd;
    ensure!(k.temperature.is_finite() && k.temperature > 0.0, "--kd-temperature must be positive");
    ensure!(
        k.w_min.is_finite() && k.w_max.is_finite() && 0.0 <= k.w_min && k.w_min <= k.w_max,
        "--kd-clip w_min,w_max needs 0 ≤ w_min ≤ w_max, got {},{}",
        k.w_min,
        k.w_max
    );
    if let Some(o) = &cfg.opd {
        o.validate()?;
    }
    Ok(())
}

impl TrainConfig {
    /// The AdamW group's schedule: the Normuon group's shape from `aux_lr` to `aux_min_lr`.
    pub fn aux_schedule(&self) -> Schedule {
        Schedule { lr: self.aux_lr, min_lr: self.aux_min_lr, ..self.schedule.clone() }
    }
}

/// Trains `be` from its current state (or the latest checkpoint with `resume`) on a blend of
/// datasets `(root, weight)`; held-out loss comes from the first one with a valid split.
pub fn train(
    be: &mut dyn Backend,
    plan: &Plan,
    data: &[(PathBuf, f64)],
    cfg: &TrainConfig,
    opts: &RunOptions,
) -> Result<Outcome> {
    let dist = &opts.dist;
    validate(cfg, plan, dist)?;
    ensure!(!data.is_empty(), "no training data given");
    for (d, _) in data {
        vpmoe_data::reader::check_vocabulary(d, plan.arch.vocab)?;
    }
    // Stage 3's prompts are an input of the run like its datasets.
    let mut inputs = data.to_vec();
    if let Some(run) = opts.opd.as_ref().filter(|r| !data.iter().any(|(d, _)| *d == r.prompts)) {
        inputs.push((run.prompts.clone(), 0.0));
    }
    let canary = vpmoe_data::canary::Canary::load(opts.canary.as_deref())?;
    let remembered = canary_cache();
    for (d, _) in &inputs {
        canary.check_dataset_remembered(d, remembered.as_deref())?;
    }
    // The canary loss needs the o200k vocabulary; the datasets are checked against the set anyway.
    let harmony = plan.arch.vocab == vpmoe_data::tokenizer::VOCAB_SIZE as u64;
    let sampled = if opts.eval_every > 0 {
        Sampled::new(plan, (opts.canary.is_some() && harmony).then(|| canary.clone()), opts.eval_prompts.as_deref())?
    } else {
        None
    };
    let ckpts =
        Checkpoints { plan, cfg, prov: Provenance::new(plan, &inputs)?, dir: &opts.ckpt_dir, keep: opts.keep, dist };
    let mut source: Box<dyn Source> = match (&cfg.opd, &opts.opd) {
        (None, None) => Box::new(Datasets::open(data, cfg, dist)?),
        (Some(_), Some(run)) => Box::new(crate::opd::Opd::open(plan, data, cfg, run, opts.steps, dist)?),
        _ => bail!("internal: stage 3 needs both its settings and its teacher"),
    };
    let eval_data = data.iter().find_map(|(d, _)| eval_split(d));
    if opts.eval_every > 0 && eval_data.is_none() {
        bail!(
            "{}: no valid split for --eval-every (rebuild with a validation fraction, or pass --eval-every 0)",
            data[0].0.display()
        );
    }
    std::fs::create_dir_all(&opts.ckpt_dir).with_context(|| format!("creating {}", opts.ckpt_dir.display()))?;
    // Rank 0 writes the directory; it holds the lock for the job.
    let _lock = match dist.is_root() {
        true => Some(vpmoe_data::lock::DirLock::acquire(&opts.ckpt_dir, "vpmoe-rt train")?),
        false => None,
    };
    be.distribute(dist.clone(), opts.shard_optimizer)?;
    if !opts.resume && be.step_count() == 0 {
        if let Some(p) = crate::checkpoint::latest(&opts.ckpt_dir)? {
            bail!(
                "{} holds the checkpoints of a run (newest {}): --resume continues it, or choose another \
                 --ckpt-dir",
                opts.ckpt_dir.display(),
                p.display()
            );
        }
    }
    // No op draws random numbers (dropout is 0, D1); the state is recorded for when one does.
    let mut rng = Rng { seed: cfg.seed, state: cfg.seed };
    if opts.resume {
        rng = ckpts.resume(be, source.as_mut())?;
    }
    install_sigint();
    INTERRUPTED.store(false, Ordering::SeqCst);
    let mut log = Log::open(opts, be.step_count(), dist.is_root())?;
    let (mut records, mut interrupted, mut checkpoint) = (Vec::new(), false, None);
    for step in be.step_count()..opts.steps {
        let _range = crate::cuda::nvtx::range(&format!("step {}", step + 1));
        profile(be, opts, step, true, &log)?;
        let t0 = Instant::now();
        let mut drawn = source.draw(plan, cfg, &*be)?;
        let acc = accumulate(be, &drawn, cfg.grad_accum, dist, step)?;
        if let (Some(r), Some(o)) = (drawn.opd.as_mut(), &cfg.opd) {
            r.add_trained(&drawn.batches, &acc.token_loss, o.ratio_clip, dist)?;
        }
        let stats = update(be, plan, cfg, step)?;
        let mut rec = StepRecord::new(step, cfg, &drawn, &acc, &stats, t0.elapsed().as_secs_f64());
        profile(be, opts, step, false, &log)?;
        if let (Some(ev), true) = (&eval_data, opts.eval_every > 0 && (step + 1) % opts.eval_every == 0) {
            let mut e = evaluate(be, ev, cfg, opts.eval_batches)?;
            if let Some(s) = &sampled {
                s.add(plan, &*be, &mut e)?;
            }
            rec.eval = Some(e);
        }
        interrupted = dist.any(INTERRUPTED.load(Ordering::SeqCst))?;
        let last = step + 1 == opts.steps;
        if last || interrupted || (opts.save_every > 0 && (step + 1) % opts.save_every == 0) {
            let (p, sum) = ckpts.save(be, source.as_ref(), &rng)?;
            rec.master_sha256 = Some(sum);
            checkpoint = Some(p);
        }
        log.write(&rec, last)?;
        if let Some(note) = rec.opd.as_ref().and_then(|o| o.note.as_ref()) {
            log.println(format!("step {}: {note}", rec.step));
        }
        records.push(rec);
        if interrupted {
            break;
        }
    }
    log.finish();
    Ok(Outcome { records, interrupted, checkpoint })
}

/// What the forward and backward passes of a step's micro-batches report, summed.
pub struct Accumulated {
    /// The step objective `Σ ℓ·scale[span]`.
    pub loss: f64,
    /// `Σ ℓ` per span over supervised tokens.
    pub span_loss: [f64; 3],
    /// Each MoE layer's sequence aux loss, averaged over the micro-batches.
    pub aux: Vec<(u32, f64)>,
    /// Each micro-batch's per-token losses.
    pub token_loss: Vec<Vec<f32>>,
}

/// Forward and backward of this rank's micro-batches of the step's `m`; gradients accumulate in
/// the backend, the reported sums are over every rank's.
fn accumulate(
    be: &mut dyn Backend,
    drawn: &Drawn,
    m: usize,
    dist: &crate::dist::Dist,
    step: u64,
) -> Result<Accumulated> {
    let m = m as f64;
    let mut acc = Accumulated { loss: 0.0, span_loss: [0.0; 3], aux: Vec::new(), token_loss: Vec::new() };
    for b in &drawn.batches {
        let micro = be.accumulate(b).with_context(|| format!("step {}", step + 1))?;
        acc.loss += micro.loss;
        acc.token_loss.push(micro.token_loss);
        (0..3).for_each(|i| acc.span_loss[i] += micro.span_loss[i]);
        for (k, (layer, a)) in micro.aux.into_iter().enumerate() {
            match acc.aux.get_mut(k) {
                Some(x) => x.1 += a as f64 / m,
                None => acc.aux.push((layer, a as f64 / m)),
            }
        }
    }
    if dist.world() > 1 {
        let mut sums = vec![acc.loss, acc.span_loss[0], acc.span_loss[1], acc.span_loss[2]];
        sums.extend(acc.aux.iter().map(|a| a.1));
        dist.all_reduce_f64(&mut sums)?;
        acc.loss = sums[0];
        acc.span_loss.copy_from_slice(&sums[1..4]);
        acc.aux.iter_mut().zip(&sums[4..]).for_each(|(a, s)| a.1 = *s);
    }
    if !acc.loss.is_finite() {
        bail!("step {}: the loss is not finite ({})", step + 1, acc.loss);
    }
    Ok(acc)
}

/// The optimizer step at this step's learning rates (each group on its own schedule).
fn update(be: &mut dyn Backend, plan: &Plan, cfg: &TrainConfig, step: u64) -> Result<StepStats> {
    let lr = cfg.schedule.lr_at(step);
    let aux_lr = cfg.aux_schedule().lr_at(step);
    let bias_rate = plan.arch.moe.as_ref().and_then(|m| m.expert_bias_rate).unwrap_or(0.0);
    let sc = StepScalars { lr, aux_lr, weight_decay: cfg.weight_decay, clip: cfg.clip, bias_rate };
    be.step(&sc).with_context(|| format!("step {}", step + 1))
}

/// Starts (`on`) or ends the profiled steps `--profile-steps A:B` when `step` is their first or
/// last; the end writes the per-kernel table to `CKPT_DIR/kernel-times.txt`.
fn profile(be: &mut dyn Backend, opts: &RunOptions, step: u64, on: bool, log: &Log) -> Result<()> {
    let Some((a, b)) = opts.profile_steps else { return Ok(()) };
    if on && a == step + 1 {
        be.profile(true)?;
    } else if !on && b == step + 1 {
        let table = be.profile(false)?.unwrap_or_default();
        let path = opts.ckpt_dir.join("kernel-times.txt");
        std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
        log.println(format!("kernel times of steps {a}..={b} ({}):\n{table}", path.display()));
    }
    Ok(())
}

/// Keeps the records of steps `..=step` in the log at `path`, replacing it atomically if any go.
fn cut_back(path: &std::path::Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let step_of = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64());
    let kept: Vec<&str> = text.lines().filter(|l| step_of(l).is_some_and(|s| s <= step)).collect();
    let dropped = text.lines().count() - kept.len();
    if dropped > 0 {
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept.iter().map(|l| format!("{l}\n")).collect::<String>())
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("cutting {} back to step {step}", path.display()))?;
        eprintln!("{}: dropped {dropped} records after step {step} (logged after the checkpoint)", path.display());
    }
    Ok(())
}

/// `metrics.jsonl` (one record per step, appended) and the progress bar with its summary lines.
struct Log {
    /// Rank 0's; other ranks log nothing.
    metrics: Option<std::fs::File>,
    bar: indicatif::ProgressBar,
    print_every: u64,
}

impl Log {
    /// Opens `metrics.jsonl` for appending after step `start`, first cutting it back to the steps
    /// up to `start`: records logged after the checkpoint a run resumes from (by a process that died
    /// before its next checkpoint) belong to no run any more.
    fn open(opts: &RunOptions, start: u64, writer: bool) -> Result<Log> {
        if !writer {
            let bar = indicatif::ProgressBar::hidden();
            return Ok(Log { metrics: None, bar, print_every: 0 });
        }
        let path = opts.ckpt_dir.join("metrics.jsonl");
        cut_back(&path, start)?;
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let bar =
            if opts.progress { indicatif::ProgressBar::new(opts.steps) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} step {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(start);
        Ok(Log { metrics: Some(metrics), bar, print_every: opts.print_every })
    }

    fn write(&mut self, rec: &StepRecord, last: bool) -> Result<()> {
        let Some(metrics) = self.metrics.as_mut() else { return Ok(()) };
        writeln!(metrics, "{}", serde_json::to_string(rec)?)?;
        let msg = records::summary(rec);
        self.bar.set_message(msg.clone());
        self.bar.inc(1);
        if self.print_every > 0 && (rec.step.is_multiple_of(self.print_every) || last || rec.eval.is_some()) {
            self.println(format!("step {:>5}  {msg}", rec.step));
        }
        Ok(())
    }

    fn println(&self, line: String) {
        if self.metrics.is_none() {
            return;
        }
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// Where clean canary checks are remembered: `$VPMOE_CANARY_CACHE`, else
/// `$XDG_CACHE_HOME/vpmoe/canary`, else `~/.cache/vpmoe/canary` (none without a home).
fn canary_cache() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("VPMOE_CANARY_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("vpmoe/canary")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/vpmoe/canary")))
}
