//! `vpmoe-rt`: the vpmoe runtime CLI.

mod bench;
mod cli;
mod eval;
mod sample;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use cli::{backend, data_source, plan_of, BackendKind, Cli, Cmd, Decay, ImportCmd, ScoreArgs, TeacherCmd, TrainArgs};
use std::path::PathBuf;
use std::time::Instant;
use vpmoe_runtime::train::{self, RunOptions, TrainConfig};
use vpmoe_runtime::{state::TrainState, synthetic_batch};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Stage 3's settings from the flags (defaults follow the run's shape).
fn opd_settings(
    a: &cli::OpdArgs,
    url: String,
    cfg: &TrainConfig,
    steps: u64,
    data: &[(PathBuf, f64)],
) -> Result<(vpmoe_runtime::opd::OpdConfig, vpmoe_runtime::opd::OpdRun)> {
    let ce_anchor = a.ce_anchor.unwrap_or(0.15);
    let max_new_tokens = a.max_new_tokens.unwrap_or((cfg.seq_len / 2).max(1));
    let rows = (cfg.micro_batch * cfg.grad_accum) as u64;
    let capacity = (steps * rows * max_new_tokens as u64) as f64 * (1.0 - ce_anchor.clamp(0.0, 1.0));
    let curriculum = match &a.curriculum {
        Some(p) => vpmoe_runtime::opd::curriculum::Curriculum::load(p)?,
        None => Default::default(),
    };
    let c = vpmoe_runtime::opd::OpdConfig {
        ce_anchor,
        max_lag: a.max_lag.unwrap_or(1),
        ratio_clip: a.opd_clip.unwrap_or(2.0),
        max_new_tokens,
        token_budget: a.opd_tokens.unwrap_or((capacity as u64).max(1)),
        curriculum,
    };
    c.validate()?;
    let teacher = cli::teacher_client(url, a.api.expect("clap requires --api with --opd-teacher"));
    let prompts = a.opd_prompts.clone().unwrap_or_else(|| data[0].0.clone());
    Ok((c, vpmoe_runtime::opd::OpdRun { teacher, prompts }))
}

fn run_train(a: TrainArgs) -> Result<()> {
    // Every rank of a data-parallel job meets rank 0 here, before any work.
    let dist = vpmoe_runtime::dist::Dist::from_env()?;
    let root = dist.is_root();
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
    let mut cfg = TrainConfig {
        micro_batch: a.micro_batch,
        grad_accum: a.grad_accum,
        seq_len,
        seed: a.seed,
        schedule,
        aux_lr: a.aux_lr.or(plan.arch.optimizer.aux_lr).unwrap_or(a.lr),
        aux_min_lr: a.aux_min_lr.or(plan.arch.optimizer.aux_min_lr).unwrap_or(a.min_lr),
        weight_decay: a.weight_decay,
        clip: a.clip,
        span_weights: a.span_weights,
        kd: train::KdConfig { temperature: a.kd_temperature, w_min: a.kd_clip[0], w_max: a.kd_clip[1] },
        init_sha256: None,
        opd: None,
    };
    let state = match &a.init {
        Some(p) => {
            let (dir, st) = vpmoe_runtime::decode::sample::load_checkpoint(p, &plan).context("--init")?;
            let st = st.restart();
            let sum = st.checksum();
            if root {
                println!("initialised from {} (masters sha256 {}…)", dir.display(), &sum[..16]);
            }
            cfg.init_sha256 = Some(sum);
            st
        }
        None => TrainState::init(&plan, cfg.seed),
    };
    // Open the device before any data work: a missing GPU is reported at once.
    let shard = (!a.replicated_optimizer && dist.world() > 1).then(|| dist.clone());
    let tokens = cfg.micro_batch * cfg.seq_len;
    let mut be = backend(&a.backend, &graph, &plan, state, plan_dir.as_deref(), tokens, shard)?;
    let ckpt_dir = a.ckpt_dir.unwrap_or_else(|| PathBuf::from("runs").join(&plan.arch.name));
    let data: Vec<(PathBuf, f64)> = if a.data.is_empty() {
        // Rank 0 builds it; the others read it once it is there.
        let dir = ckpt_dir.join("data");
        if root {
            vpmoe_runtime::bundled_sample_dataset(&dir, plan.arch.max_seq as usize)?;
        }
        dist.barrier()?;
        vec![(dir, 1.0)]
    } else {
        a.data.iter().map(|s| data_source(s)).collect()
    };
    let mut opts = RunOptions {
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
        opd: None,
        canary: a.canary.clone(),
        eval_prompts: a.eval_prompts.clone(),
        dist: dist.clone(),
        shard_optimizer: !a.replicated_optimizer,
    };
    if let Some(url) = a.opd.opd_teacher.clone() {
        let (c, run) = opd_settings(&a.opd, url, &cfg, a.steps, &data)?;
        if root {
            println!(
                "stage 3: on-policy distillation against {} ({}), prompts {}, CE anchor {:.0}%, max lag {}, ratio clip {}, \
                 ≤ {} new tokens, budget {} OPD tokens",
                run.teacher.url,
                run.teacher.api.as_str(),
                run.prompts.display(),
                100.0 * c.ce_anchor,
                c.max_lag,
                c.ratio_clip,
                c.max_new_tokens,
                c.token_budget
            );
        }
        (cfg.opd, opts.opd) = (Some(c), Some(run));
    }
    if dist.world() > 1 && root {
        let r = &dist.rank;
        println!(
            "data parallel: {} ranks ({} per node, from {}), {} micro-batches each per step, optimizer {}",
            r.world,
            r.local_world,
            r.launcher,
            cfg.grad_accum / r.world.max(1),
            if opts.shard_optimizer { "sharded by rank (ZeRO-1)" } else { "replicated" }
        );
    }
    if !root {
        if train::train(be.as_mut(), &plan, &data, &cfg, &opts)?.interrupted {
            std::process::exit(130);
        }
        return Ok(());
    }
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
    let source = |flag: Option<f64>, key: Option<f64>, key_name: &str, normuon: &str| match (flag, key) {
        (Some(_), _) => "flag".to_string(),
        (None, Some(_)) => format!("config optimizer.{key_name}"),
        (None, None) => format!("= {normuon}, MODEL.md §7.4"),
    };
    println!(
        "learning rates: Normuon {:.3e} -> {:.3e}; AdamW {:.3e} ({}) -> {:.3e} ({})",
        cfg.schedule.lr,
        cfg.schedule.min_lr,
        cfg.aux_lr,
        source(a.aux_lr, plan.arch.optimizer.aux_lr, "normuon_aux_lr", "--lr"),
        cfg.aux_min_lr,
        source(a.aux_min_lr, plan.arch.optimizer.aux_min_lr, "normuon_aux_min_lr", "--min-lr"),
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
    // The model just trained answers a question (greedy, on the training backend).
    if plan.arch.vocab == vpmoe_data::tokenizer::VOCAB_SIZE as u64 {
        const QUESTION: &str = "What is 2 + 2?";
        let state = be.weights()?;
        drop(be);
        let mut dec = crate::cli::decoder(a.backend.kind, &graph, &plan, &state, plan_dir.as_deref(), 1)?;
        let (text, verdict) = vpmoe_runtime::decode::sample::answer(&mut dec, QUESTION, 48)?;
        let judged = verdict.why.map_or("valid Harmony".to_string(), |w| format!("not valid Harmony: {w}"));
        println!("sample (greedy, ≤ 48 tokens) {QUESTION:?} -> {text:?} ({judged})");
    }
    Ok(())
}

fn run_score(a: ScoreArgs) -> Result<()> {
    use vpmoe_runtime::teacher::{client::ClientConfig, score};
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    // Finished documents are journalled as their responses arrive: an interrupt loses only the
    // requests in flight.
    let journal = a.out.join(".journal");
    let _ = ctrlc::set_handler(move || {
        eprintln!(
            "\ninterrupted: every document scored so far is kept in {}; re-run the same command to continue",
            journal.display()
        );
        std::process::exit(130);
    });
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
        Cmd::Train(a) => run_train(*a),
        Cmd::Plot(a) => {
            let out = a.out.unwrap_or_else(|| a.run.join("plot.html"));
            let n = vpmoe_runtime::plot::plot(&a.run, &out)?;
            println!("{n} panels -> {} (open it in a browser)", out.display());
            Ok(())
        }
        Cmd::Bench(a) => bench::run_bench(a),
        Cmd::Launch(a) => vpmoe_runtime::dist::launch::launch(a.nproc, a.master_port, &a.command),
        Cmd::Sample(a) => sample::run_sample(a),
        Cmd::Chat(a) => sample::run_chat(a),
        Cmd::Score(a) => sample::run_score(a),
        Cmd::Eval(a) => eval::run_eval(a),
        Cmd::Upcycle(a) => {
            let (_, src) = plan_of(None, Some(a.from_arch))?;
            let (_, plan) = plan_of(None, Some(a.arch))?;
            println!(
                "upcycle {} ({}, {} layers) into {} ({} layers, {} parameters)",
                a.from.display(),
                src.arch.name,
                src.arch.layers,
                plan.arch.name,
                plan.arch.layers,
                plan.report.params_total
            );
            let (path, up) = vpmoe_runtime::upcycle::upcycle_to(&a.from, &src, &plan, &a.out, a.seed)?;
            let new = up.layers.iter().filter(|l| l.1).count();
            let placed: Vec<String> = up
                .layers
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.1)
                .map(|(t, l)| format!("{}→{}", l.0 + 1, t + 1))
                .collect();
            println!("  source layers placed: {}; {new} new identity layers", placed.join(" "));
            println!("  {} parameters made rather than copied (all listed in its meta.json):", up.made.len());
            for (n, how) in up.made.iter().take(8) {
                println!("    {n}: {how}");
            }
            println!("wrote {} (start from it with train --init {})", path.display(), a.out.display());
            Ok(())
        }
        Cmd::Import(ImportCmd::Hf(a)) => {
            let (_, plan) = plan_of(a.plan, a.arch)?;
            println!("import {} into {} ({} parameters)", a.from.display(), plan.arch.name, plan.report.params_total);
            let (path, imported) = vpmoe_runtime::import::import_to(&a.from, &plan, &a.out)?;
            for (n, why) in &imported.dropped {
                println!("  dropped {n}: {why}");
            }
            for (n, how) in &imported.derived {
                println!("  {n}: {how}");
            }
            println!("wrote {} (start from it with train --init {})", path.display(), a.out.display());
            Ok(())
        }
        Cmd::Forward(run) => {
            let (micro_batch, seed) = (run.micro_batch, run.seed);
            let (plan_dir, graph, plan, seq) = run.plan()?;
            let a = &plan.arch;
            let batch = synthetic_batch(a.vocab, seq, micro_batch, seed);
            batch.validate(a.vocab)?;
            let t0 = Instant::now();
            let mut be = backend(
                &run.backend,
                &graph,
                &plan,
                TrainState::init(&plan, seed),
                plan_dir.as_deref(),
                seq * micro_batch,
                None,
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
