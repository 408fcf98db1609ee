//! `vpmoe-rt sample`.

use crate::cli::{plan_of, BackendKind, SampleArgs};
use anyhow::{bail, Result};
use std::time::Instant;
use vpmoe_runtime::decode::sample::{load_checkpoint, read_prompts, sample_to_file, STOP};
use vpmoe_runtime::decode::sampler::Sampling;
use vpmoe_runtime::decode::{Decoder, GenConfig};

pub(crate) fn run_sample(a: SampleArgs) -> Result<()> {
    if a.backend == BackendKind::Cuda {
        bail!("sample generates on the cpu backend; the cuda decode program is not built yet (use --backend cpu)");
    }
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    sampling.validate()?;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let (graph, plan) = plan_of(a.plan, a.arch)?;
    let prompts = read_prompts(&a.prompts, a.reasoning_effort)?;
    let (dir, state) = load_checkpoint(&a.checkpoint, &plan)?;
    println!(
        "sample {} prompts from {} ({} at step {}) · backend cpu · batch {}",
        prompts.len(),
        a.prompts.display(),
        dir.display(),
        state.step,
        a.batch.min(prompts.len())
    );
    let mut dec = Decoder::new(&graph, &plan, &state, a.batch.min(prompts.len()))?;
    let cfg = GenConfig { sampling, seed: a.seed, max_new_tokens: a.max_new_tokens, stop: STOP.to_vec() };
    let bar = vpmoe_data::progress_bar((prompts.len() * a.max_new_tokens) as u64, "tokens", true);
    let t0 = Instant::now();
    let summary = sample_to_file(&mut dec, &prompts, &cfg, &a.out, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", summary.format());
    println!(
        "{} tokens in {secs:.1} s ({:.1} tokens/s) -> {}",
        summary.tokens,
        summary.tokens as f64 / secs.max(1e-9),
        a.out.display()
    );
    Ok(())
}
