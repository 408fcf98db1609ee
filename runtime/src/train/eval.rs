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
    Ok(EvalRecord { loss: some(loss), ce_reasoning: some(r_), ce_final: some(f), tokens })
}

/// The held-out split of a dataset root, if it has one.
pub fn eval_split(data: &Path) -> Option<PathBuf> {
    let v = data.join("valid");
    v.is_dir().then_some(v)
}
