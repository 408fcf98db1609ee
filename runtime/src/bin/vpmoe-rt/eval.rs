//! `vpmoe-rt eval`.

use crate::cli::{backend, decoder, plan_of, BackendArgs, EvalArgs};
use anyhow::{bail, Context, Result};
use vpmoe_runtime::checkpoint;
use vpmoe_runtime::decode::sample::{load_checkpoint, read_prompts, require_harmony};
use vpmoe_runtime::eval::{sample_stats, tasks, HeldOut, Report};
use vpmoe_runtime::train::{eval_split, evaluate, TrainConfig};

pub(crate) fn run_eval(a: EvalArgs) -> Result<()> {
    if a.data.is_empty() && a.prompts.is_none() && a.tasks.is_empty() && a.canary.is_none() {
        bail!("nothing to evaluate: give --data (held-out loss), --prompts (sampled answers), --tasks or --canary");
    }
    let generates = a.prompts.is_some() || !a.tasks.is_empty() || a.canary.is_some();
    let (graph, plan) = plan_of(a.model.plan.clone(), a.model.arch.clone())?;
    let (dir, state) = load_checkpoint(&a.model.checkpoint, &plan)?;
    let meta = checkpoint::read_meta(&dir)?;
    let cfg: TrainConfig = serde_json::from_value(meta.train.clone())
        .with_context(|| format!("{}: meta.json has no readable run settings", dir.display()))?;
    let mut report = Report {
        checkpoint: dir.display().to_string(),
        step: state.step,
        config_hash: meta.config_hash.clone(),
        ..Default::default()
    };
    if !a.data.is_empty() {
        if a.eval_batches == 0 {
            bail!("--eval-batches must be at least 1");
        }
        let args = BackendArgs { kind: a.model.backend, host_momentum: false, cublas: false };
        let mut be =
            backend(&args, &graph, &plan, state.clone(), a.model.plan.as_deref(), cfg.micro_batch * cfg.seq_len, None)?;
        for d in &a.data {
            let valid = eval_split(d).with_context(|| format!("{}: no valid split (DIR/valid)", d.display()))?;
            vpmoe_data::reader::check_vocabulary(d, plan.arch.vocab)?;
            let record = evaluate(be.as_mut(), &valid, &cfg, a.eval_batches)?;
            report.held_out.push(HeldOut { data: d.display().to_string(), record });
        }
    }
    if generates {
        require_harmony(&plan)?;
    }
    if let Some(path) = &a.prompts {
        let efforts = if a.reasoning_effort.is_empty() { vec![Default::default()] } else { a.reasoning_effort.clone() };
        let mut dec = decoder(a.model.backend, &graph, &plan, &state, a.model.plan.as_deref(), 8)?;
        let teacher = match &a.teacher {
            Some(url) => {
                let api = a.api.expect("clap requires --api with --teacher");
                Some(
                    vpmoe_runtime::teacher::client::Client::connect(crate::cli::teacher_client(url.clone(), api))
                        .context("--teacher")?,
                )
            }
            None => None,
        };
        for effort in efforts {
            let prompts = read_prompts(path, effort)?;
            let name = effort.as_str();
            for greedy in [true, false] {
                let s = sample_stats(
                    &mut dec,
                    &prompts,
                    name,
                    greedy,
                    a.samples,
                    a.max_new_tokens,
                    a.seed,
                    teacher.as_ref(),
                )?;
                report.samples.push(s);
            }
        }
    }
    if !a.tasks.is_empty() {
        let mut items = Vec::new();
        for t in &a.tasks {
            items.extend(tasks::read_tasks(t, plan.arch.max_seq as usize)?);
        }
        let mut dec = decoder(a.model.backend, &graph, &plan, &state, a.model.plan.as_deref(), 1)?;
        let bar = vpmoe_data::progress_bar(items.len() as u64, "questions", true);
        report.tasks = tasks::run_tasks(&mut dec, &items, || bar.inc(1))?;
        bar.finish_and_clear();
    }
    // The canary loss: the given set, or the built-in one for a Harmony model.
    if a.canary.is_some() || plan.arch.vocab == vpmoe_data::tokenizer::VOCAB_SIZE as u64 {
        require_harmony(&plan)?;
        let canary = vpmoe_data::canary::Canary::load(a.canary.as_deref())?;
        let mut dec = decoder(a.model.backend, &graph, &plan, &state, a.model.plan.as_deref(), 1)?;
        report.canary = Some(vpmoe_runtime::eval::canary_loss(&mut dec, &canary)?);
    }
    print!("{}", report.table());
    if let Some(out) = &a.out {
        let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
        println!("report {}", out.display());
    }
    Ok(())
}
