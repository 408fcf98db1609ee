//! The training loop (stage 1 span-normalised CE; stage 2 confidence-weighted CE on rows from
//! teacher-scored datasets blended with vanilla ones, DISTILL.md 2B). One step = `grad_accum` micro-batches of
//! `micro_batch` rows: the step's span token counts are known from the data before any forward
//! pass, so every micro-batch is weighted by `w_span/N_span` (D6) and the step's objective and
//! gradient do not depend on how it is split. Then the optimizer step (§7.1), metrics, held-out
//! evaluation and checkpoints.

use crate::backend::{seed_step, Backend, Batch, StepScalars};
use crate::checkpoint::{self, LrState, Meta, Rng};
use crate::health::RouterHealth;
use crate::state::TrainState;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vpmoe_compiler::Plan;
use vpmoe_data::reader::Reader;
use vpmoe_ir::optim::Schedule;

/// The run's semantic settings: recorded in every checkpoint; `--resume` refuses a difference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// The Normuon group's schedule; the AdamW group uses the same shape scaled to `aux_lr`.
    pub schedule: Schedule,
    pub aux_lr: f64,
    pub weight_decay: f64,
    pub clip: f64,
    /// Span weights `w_r`, `w_f`.
    pub span_weights: [f32; 2],
    /// Stage 2 confidence weights (used on rows that carry teacher log-probabilities).
    pub kd: KdConfig,
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

/// The running mean m of teacher log-probabilities (finite ones; −inf would make it −inf).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KdCenter {
    pub sum: f64,
    pub count: u64,
}

impl KdCenter {
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
    /// Fold in the teacher positions of a micro-batch.
    pub fn add(&mut self, b: &Batch) {
        for (&lp, &on) in b.teacher_logp.iter().zip(&b.teacher) {
            if on != 0 && lp.is_finite() {
                self.sum += lp as f64;
                self.count += 1;
            }
        }
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
}

#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub ce_reasoning: f64,
    pub ce_final: f64,
    pub tokens_reasoning: u64,
    pub tokens_final: u64,
    pub span_weights: [f32; 2],
    pub grad_norm: f64,
    pub clip_coef: f32,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub optimizer_s: f64,
    pub router: Option<RouterHealth>,
    pub router_layers: Vec<(String, RouterHealth)>,
    /// Rows drawn from each dataset of the blend (in `--data` order).
    pub rows_per_dataset: Vec<u64>,
    /// Stage 2: positions with teacher values this step, and their statistics.
    pub teacher_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kd: Option<KdRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalRecord>,
    pub master_sha256: Option<String>,
}

/// Confidence weighting of one step (DISTILL: effective weights, teacher logp).
#[derive(Clone, Debug, Serialize)]
pub struct KdRecord {
    /// The centre m used this step.
    pub center: f64,
    pub teacher_logp_mean: f64,
    pub weight_mean: f64,
    /// Shares of teacher positions clipped to w_min and to w_max.
    pub clipped_low: f64,
    pub clipped_high: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalRecord {
    pub loss: f64,
    pub ce_reasoning: f64,
    pub ce_final: f64,
    pub tokens: u64,
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub records: Vec<StepRecord>,
    pub interrupted: bool,
    pub checkpoint: Option<PathBuf>,
    pub state: TrainState,
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

/// Identity of the inputs of a run, for provenance and resume checks.
pub struct Provenance {
    pub config_hash: String,
    pub dataset_manifest_sha256: String,
}

impl Provenance {
    /// One dataset: the SHA-256 of its manifest; a blend: of its manifests' hashes and weights.
    pub fn new(plan: &Plan, data: &[(PathBuf, f64)]) -> Result<Provenance> {
        let mut hashes = Vec::new();
        for (d, w) in data {
            let manifest = d.join("manifest.json");
            let bytes = std::fs::read(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
            hashes.push((checkpoint::sha256_hex(&bytes), *w));
        }
        let dataset_manifest_sha256 = match hashes.as_slice() {
            [(h, _)] => h.clone(),
            _ => {
                let text: Vec<String> = hashes.iter().map(|(h, w)| format!("{h}:{w}")).collect();
                checkpoint::sha256_hex(text.join("\n").as_bytes())
            }
        };
        Ok(Provenance {
            config_hash: checkpoint::sha256_hex(plan.arch.canonical_json().as_bytes()),
            dataset_manifest_sha256,
        })
    }
}

fn validate(cfg: &TrainConfig, plan: &Plan) -> Result<()> {
    ensure!(cfg.micro_batch >= 1, "--micro-batch must be at least 1");
    ensure!(cfg.grad_accum >= 1, "--grad-accum must be at least 1");
    ensure!(
        cfg.seq_len >= 1 && cfg.seq_len as u64 <= plan.arch.max_seq,
        "--seq-len {} must be in 1..={} (the architecture's max_sequence_length)",
        cfg.seq_len,
        plan.arch.max_seq
    );
    cfg.schedule.check().map_err(|e| anyhow::anyhow!("learning-rate schedule: {e}"))?;
    ensure!(cfg.aux_lr.is_finite() && cfg.aux_lr >= 0.0, "--aux-lr must be a non-negative number");
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
    Ok(())
}

/// Lists what differs between a checkpoint's run and this one.
fn differences(meta: &Meta, plan: &Plan, cfg: &TrainConfig, prov: &Provenance) -> Vec<String> {
    let mut d = Vec::new();
    let short = |s: &str| s.chars().take(16).collect::<String>();
    if meta.plan_fingerprint != plan.fingerprint {
        d.push(format!(
            "plan fingerprint: checkpoint {} vs this plan {}",
            short(&meta.plan_fingerprint),
            short(&plan.fingerprint)
        ));
    }
    if meta.config_hash != prov.config_hash {
        d.push(format!(
            "architecture config hash: checkpoint {} vs {}",
            short(&meta.config_hash),
            short(&prov.config_hash)
        ));
    }
    if meta.tokenizer_sha256 != vpmoe_data::tokenizer::vocabulary_sha256() {
        d.push("tokenizer vocabulary".into());
    }
    if meta.dataset_manifest_sha256 != prov.dataset_manifest_sha256 {
        d.push(format!(
            "dataset manifest: checkpoint {} vs {}",
            short(&meta.dataset_manifest_sha256),
            short(&prov.dataset_manifest_sha256)
        ));
    }
    let now = serde_json::to_value(cfg).expect("serialisable");
    if let (Some(a), Some(b)) = (meta.train.as_object(), now.as_object()) {
        for (k, v) in b {
            if a.get(k) != Some(v) {
                d.push(format!(
                    "{k}: checkpoint {} vs {v}",
                    a.get(k).map(|x| x.to_string()).unwrap_or("absent".into())
                ));
            }
        }
    }
    d
}

/// Global per-span means of a set of micro-batches and their token losses.
fn span_means(sums: &[f64; 3], counts: &[u64; 3], w: [f32; 2]) -> (f64, f64, f64) {
    let mean = |s: usize| if counts[s] > 0 { sums[s] / counts[s] as f64 } else { 0.0 };
    let (r, f) = (mean(1), mean(2));
    (w[0] as f64 * r + w[1] as f64 * f, r, f)
}

/// Held-out loss over the first `batches` micro-batches of the evaluation split (same every time).
pub fn evaluate(be: &mut dyn Backend, data: &Path, cfg: &TrainConfig, batches: usize) -> Result<EvalRecord> {
    let mut r = Reader::open(&[(data, 1.0)], cfg.seq_len, cfg.seed)?;
    let (mut sums, mut counts) = ([0f64; 3], [0u64; 3]);
    for _ in 0..batches {
        let mut b = Batch::from_reader(r.next_batch(cfg.micro_batch));
        b.span_scale = [0.0, 1.0, 1.0];
        let n = b.span_counts();
        let out = be.forward(&b, &[])?;
        for ((l, m), s) in out.token_loss().iter().zip(&b.loss_mask).zip(&b.span) {
            if *m != 0 {
                sums[*s as usize] += *l as f64;
            }
        }
        (0..3).for_each(|i| counts[i] += n[i]);
    }
    let (loss, r_, f) = span_means(&sums, &counts, cfg.span_weights);
    Ok(EvalRecord { loss, ce_reasoning: r_, ce_final: f, tokens: counts[1] + counts[2] })
}

/// The held-out split of a dataset root, if it has one.
pub fn eval_split(data: &Path) -> Option<PathBuf> {
    let v = data.join("valid");
    v.is_dir().then_some(v)
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
    validate(cfg, plan)?;
    ensure!(!data.is_empty(), "no training data given");
    let prov = Provenance::new(plan, data)?;
    let mut reader = Reader::open(data, cfg.seq_len, cfg.seed)?;
    let eval_data = data.iter().find_map(|(d, _)| eval_split(d));
    if opts.eval_every > 0 && eval_data.is_none() {
        bail!(
            "{}: no valid split for --eval-every (rebuild with a validation fraction, or pass --eval-every 0)",
            data[0].0.display()
        );
    }
    let mut center = KdCenter::default();
    // No op draws random numbers yet (dropout is 0, D1); the state is recorded for when one does.
    let mut rng = Rng { seed: cfg.seed, state: cfg.seed };
    if opts.resume {
        match checkpoint::latest(&opts.ckpt_dir)? {
            None => bail!("--resume: no checkpoint in {}", opts.ckpt_dir.display()),
            Some(p) => {
                let diff = differences(&checkpoint::read_meta(&p)?, plan, cfg, &prov);
                if !diff.is_empty() {
                    bail!("--resume: {} belongs to a different run:\n  {}", p.display(), diff.join("\n  "));
                }
                let (meta, st) = checkpoint::load(&p, plan)?;
                reader
                    .restore(meta.data_cursor.clone())
                    .with_context(|| format!("restoring the data cursor of {}", p.display()))?;
                rng = meta.rng.clone();
                center = KdCenter {
                    sum: meta.scalars.get("kd_logp_sum").copied().unwrap_or(0.0),
                    count: meta.scalars.get("kd_logp_count").copied().unwrap_or(0.0) as u64,
                };
                be.set_state(st)?;
                eprintln!("resumed from {} (step {})", p.display(), meta.step);
            }
        }
    }
    install_sigint();
    INTERRUPTED.store(false, Ordering::SeqCst);
    std::fs::create_dir_all(&opts.ckpt_dir).with_context(|| format!("creating {}", opts.ckpt_dir.display()))?;
    let metrics_path = opts.ckpt_dir.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    let start = be.step_count();
    let pb = if opts.progress { indicatif::ProgressBar::new(opts.steps) } else { indicatif::ProgressBar::hidden() };
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} step {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    );
    pb.set_position(start);
    let bias_rate = plan.arch.moe.as_ref().and_then(|m| m.expert_bias_rate).unwrap_or(0.0);
    let mut records = Vec::new();
    let mut last_ckpt = None;
    let mut interrupted = false;
    // Returns the checkpoint path and the masters' checksum.
    let save = |be: &dyn Backend, reader: &Reader, rng: &Rng, center: &KdCenter| -> Result<(PathBuf, String)> {
        let st = be.state()?;
        let lr = |s: u64| cfg.schedule.lr_at(s);
        let meta = Meta {
            format: checkpoint::FORMAT,
            step: st.step,
            git_sha: env!("VPMOE_GIT_SHA").to_string(),
            config_hash: prov.config_hash.clone(),
            plan_fingerprint: plan.fingerprint.clone(),
            tokenizer_sha256: vpmoe_data::tokenizer::vocabulary_sha256(),
            dataset_manifest_sha256: prov.dataset_manifest_sha256.clone(),
            train: serde_json::to_value(cfg)?,
            rng: rng.clone(),
            data_cursor: reader.cursor(),
            expert_bias: plan
                .params
                .iter()
                .zip(&st.master)
                .filter(|(p, _)| matches!(p.role, vpmoe_ir::Role::ExpertBias { .. }))
                .map(|(p, w)| (p.name.clone(), w.clone()))
                .collect(),
            lr_schedule: LrState {
                schedule: cfg.schedule.clone(),
                last_lr: if st.step > 0 { lr(st.step - 1) } else { 0.0 },
                next_lr: lr(st.step),
            },
            scalars: [("kd_logp_sum".to_string(), center.sum), ("kd_logp_count".to_string(), center.count as f64)]
                .into_iter()
                .collect(),
            state_sha256: String::new(),
            master_sha256: String::new(),
        };
        Ok((checkpoint::save(&opts.ckpt_dir, plan, &st, meta, opts.keep)?, st.checksum()))
    };

    for step in start..opts.steps {
        let _range = crate::cuda::nvtx::range(&format!("step {}", step + 1));
        if opts.profile_steps.is_some_and(|(a, _)| a == step + 1) {
            be.profile(true)?;
        }
        let t0 = Instant::now();
        let raw: Vec<_> = (0..cfg.grad_accum).map(|_| reader.next_batch(cfg.micro_batch)).collect();
        let mut rows_per_dataset = vec![0u64; data.len()];
        for b in &raw {
            b.source.iter().for_each(|&s| rows_per_dataset[s as usize] += 1);
        }
        let mut batches: Vec<Batch> = raw.into_iter().map(Batch::from_reader).collect();
        let counts = seed_step(&mut batches, &plan.arch, cfg.span_weights);
        // Confidence weights: fold this step's teacher values into m, then weight with it.
        for b in &batches {
            center.add(b);
        }
        let kd = [center.mean() as f32, cfg.kd.temperature, cfg.kd.w_min, cfg.kd.w_max];
        let kd_rec = kd_record(&batches, kd);
        let (mut loss, mut sums) = (0f64, [0f64; 3]);
        let mut aux: Vec<(u32, f64)> = Vec::new();
        for b in &mut batches {
            b.kd = kd;
            let m = be.accumulate(b).with_context(|| format!("step {}", step + 1))?;
            loss += m.loss;
            (0..3).for_each(|i| sums[i] += m.span_loss[i]);
            for (k, (name, a)) in m.aux.into_iter().enumerate() {
                match aux.get_mut(k) {
                    Some(x) => x.1 += a as f64 / cfg.grad_accum as f64,
                    None => aux.push((name, a as f64 / cfg.grad_accum as f64)),
                }
            }
        }
        if !loss.is_finite() {
            bail!("step {}: the loss is not finite ({loss})", step + 1);
        }
        let lr = cfg.schedule.lr_at(step);
        let aux_lr = if cfg.schedule.lr > 0.0 { lr * cfg.aux_lr / cfg.schedule.lr } else { 0.0 };
        let sc = StepScalars { lr, aux_lr, weight_decay: cfg.weight_decay, clip: cfg.clip, bias_rate };
        let stats = be.step(&sc).with_context(|| format!("step {}", step + 1))?;
        let layers = crate::health::per_layer(&stats.loads, &aux, &stats.expert_bias);
        let (_, ce_r, ce_f) = span_means(&sums, &counts, cfg.span_weights);
        let tokens = (cfg.grad_accum * cfg.micro_batch * cfg.seq_len) as u64;
        let dt = t0.elapsed().as_secs_f64();
        let mut rec = StepRecord {
            step: step + 1,
            lr,
            loss,
            ce_reasoning: ce_r,
            ce_final: ce_f,
            tokens_reasoning: counts[1],
            tokens_final: counts[2],
            span_weights: cfg.span_weights,
            grad_norm: stats.grad_norm,
            clip_coef: stats.clip_coef,
            tokens,
            tokens_per_s: tokens as f64 / dt,
            step_s: dt,
            optimizer_s: stats.optimizer_seconds,
            router: crate::health::aggregate(&layers),
            router_layers: layers.iter().map(|(l, h)| (format!("blk{l}"), h.clone())).collect(),
            rows_per_dataset,
            teacher_tokens: kd_rec.as_ref().map_or(0, |r| r.1),
            kd: kd_rec.map(|r| r.0),
            eval: None,
            master_sha256: None,
        };
        if let Some(table) = opts.profile_steps.filter(|p| p.1 == step + 1).map(|_| be.profile(false)).transpose()? {
            let path = opts.ckpt_dir.join("kernel-times.txt");
            let table = table.unwrap_or_default();
            std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
            pb.println(format!(
                "kernel times of steps {:?} ({}):\n{table}",
                opts.profile_steps.unwrap(),
                path.display()
            ));
        }
        if let (Some(ev), true) = (&eval_data, opts.eval_every > 0 && (step + 1) % opts.eval_every == 0) {
            rec.eval = Some(evaluate(be, ev, cfg, opts.eval_batches)?);
        }
        let done = step + 1 == opts.steps;
        interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if done || interrupted || (opts.save_every > 0 && (step + 1) % opts.save_every == 0) {
            let (p, sum) = save(be, &reader, &rng, &center)?;
            rec.master_sha256 = Some(sum);
            last_ckpt = Some(p);
        }
        writeln!(metrics, "{}", serde_json::to_string(&rec)?)?;
        let msg = summary(&rec);
        pb.set_message(msg.clone());
        pb.inc(1);
        if opts.print_every > 0 && ((step + 1) % opts.print_every == 0 || done || rec.eval.is_some()) {
            let line = format!("step {:>5}  {msg}", step + 1);
            if pb.is_hidden() {
                println!("{line}");
            } else {
                pb.println(line);
            }
        }
        records.push(rec);
        if interrupted {
            break;
        }
    }
    pb.finish_and_clear();
    Ok(Outcome { records, interrupted, checkpoint: last_ckpt, state: be.state()? })
}

/// Statistics of the step's confidence weights (the same formula as the IR reference).
fn kd_record(batches: &[Batch], kd: [f32; 4]) -> Option<(KdRecord, u64)> {
    let (mut n, mut lp_sum, mut lp_n, mut w_sum, mut lo, mut hi) = (0u64, 0f64, 0u64, 0f64, 0u64, 0u64);
    for b in batches {
        for (&lp, &on) in b.teacher_logp.iter().zip(&b.teacher) {
            if on == 0 {
                continue;
            }
            n += 1;
            if lp.is_finite() {
                lp_sum += lp as f64;
                lp_n += 1;
            }
            let w = vpmoe_ir::reference::confidence_weight(lp, &kd);
            w_sum += w as f64;
            lo += u64::from(w <= kd[2]);
            hi += u64::from(w >= kd[3]);
        }
    }
    (n > 0).then(|| {
        let r = KdRecord {
            center: kd[0] as f64,
            teacher_logp_mean: if lp_n > 0 { lp_sum / lp_n as f64 } else { 0.0 },
            weight_mean: w_sum / n as f64,
            clipped_low: lo as f64 / n as f64,
            clipped_high: hi as f64 / n as f64,
        };
        (r, n)
    })
}

fn summary(r: &StepRecord) -> String {
    let mut s = format!(
        "loss {:.4} (reasoning {:.4} on {}, final {:.4} on {}) |g| {:.3} lr {:.2e} {:.0} tok/s",
        r.loss, r.ce_reasoning, r.tokens_reasoning, r.ce_final, r.tokens_final, r.grad_norm, r.lr, r.tokens_per_s
    );
    if let Some(h) = &r.router {
        s.push_str(&format!(
            " | router aux {:.3} max {:.1}% cv {:.2} dead {} H {:.2} bias±{:.3}",
            h.aux, h.max_load_pct, h.cv, h.dead, h.entropy, h.bias_range
        ));
    }
    if let Some(k) = &r.kd {
        s.push_str(&format!(
            " | kd {} tok, m {:.3}, w̄ {:.3} (clip {:.0}%/{:.0}%)",
            r.teacher_tokens,
            k.center,
            k.weight_mean,
            100.0 * k.clipped_low,
            100.0 * k.clipped_high
        ));
    }
    if let Some(e) = &r.eval {
        s.push_str(&format!(" | eval {:.4} (r {:.4}, f {:.4})", e.loss, e.ce_reasoning, e.ce_final));
    }
    s
}
