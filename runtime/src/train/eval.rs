//! Held-out evaluation: the span losses over the first micro-batches of a dataset's valid split.

use super::records::{span_means, EvalRecord};
use super::TrainConfig;
use crate::backend::{Backend, Batch};
use anyhow::Result;
use std::path::{Path, PathBuf};
use vpmoe_data::reader::Reader;

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
    let tokens = counts[1] + counts[2];
    let some = |x: f64| (tokens > 0).then_some(x);
    Ok(EvalRecord {
        loss: some(loss),
        ce_reasoning: some(r_),
        ce_final: some(f),
        tokens,
        canary_loss: None,
        valid_rate: None,
    })
}

/// The sampled parts of a training-time evaluation, on the cpu decoder from the current weights:
/// the canary set's loss (`--canary`) and the Harmony validity of greedy answers (`--eval-prompts`).
pub struct Sampled {
    graph: vpmoe_ir::Graph,
    canary: Option<vpmoe_data::canary::Canary>,
    prompts: Vec<crate::decode::sample::Prompt>,
}

/// Completion tokens of a training-time validity sample.
const VALIDITY_TOKENS: usize = 64;

impl Sampled {
    /// `None` when neither is asked for; a model that cannot speak Harmony is refused.
    pub fn new(
        plan: &vpmoe_compiler::Plan,
        canary: Option<vpmoe_data::canary::Canary>,
        prompts: Option<&Path>,
    ) -> Result<Option<Sampled>> {
        if canary.is_none() && prompts.is_none() {
            return Ok(None);
        }
        crate::decode::sample::require_harmony(plan)?;
        let prompts = match prompts {
            Some(p) => crate::decode::sample::read_prompts(p, Default::default())?,
            None => Vec::new(),
        };
        Ok(Some(Sampled { graph: vpmoe_compiler::lower::lower(&plan.arch), canary, prompts }))
    }

    /// Adds the canary loss and the validity rate at `be`'s weights to `e`.
    pub fn add(&self, plan: &vpmoe_compiler::Plan, be: &dyn Backend, e: &mut EvalRecord) -> Result<()> {
        let state = be.weights()?;
        // Continuous batching over a few slots: the caches stay small whatever the prompt count.
        let mut dec = be.decode_on().decoder(&self.graph, plan, &state, self.prompts.len().clamp(1, 8))?;
        if let Some(c) = &self.canary {
            e.canary_loss = Some(crate::eval::canary_loss(&mut dec, c)?.loss);
        }
        if !self.prompts.is_empty() {
            let s = crate::eval::sample_stats(&mut dec, &self.prompts, "medium", true, 1, VALIDITY_TOKENS, 0, None)?;
            e.valid_rate = Some(s.valid_rate);
        }
        Ok(())
    }
}

/// The held-out split of a dataset root, if it has one.
pub fn eval_split(data: &Path) -> Option<PathBuf> {
    let v = data.join("valid");
    v.is_dir().then_some(v)
}
