//! What a step reports: the record written to `metrics.jsonl` and its one-line summary.

use super::source::Drawn;
use super::{Accumulated, TrainConfig};
use crate::backend::{Batch, StepStats};
use crate::health::RouterHealth;
use anyhow::Result;
use serde::Serialize;

/// One optimizer step, as `metrics.jsonl` records it.
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
    pub opd: Option<crate::opd::OpdRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalRecord>,
    pub master_sha256: Option<String>,
}

impl StepRecord {
    /// The record of optimizer step `step` (0-based) that took `seconds`.
    pub(super) fn new(
        step: u64,
        cfg: &TrainConfig,
        drawn: &Drawn,
        acc: &Accumulated,
        stats: &StepStats,
        seconds: f64,
    ) -> StepRecord {
        let layers = crate::health::per_layer(&stats.loads, &acc.aux, &stats.expert_bias);
        let (_, ce_r, ce_f) = span_means(&acc.span_loss, &drawn.counts, cfg.span_weights);
        let tokens = (cfg.grad_accum * cfg.micro_batch * cfg.seq_len) as u64;
        StepRecord {
            step: step + 1,
            lr: cfg.schedule.lr_at(step),
            loss: acc.loss,
            ce_reasoning: ce_r,
            ce_final: ce_f,
            tokens_reasoning: drawn.counts[1],
            tokens_final: drawn.counts[2],
            span_weights: cfg.span_weights,
            grad_norm: stats.grad_norm,
            clip_coef: stats.clip_coef,
            tokens,
            tokens_per_s: tokens as f64 / seconds,
            step_s: seconds,
            optimizer_s: stats.optimizer_seconds,
            router: crate::health::aggregate(&layers),
            router_layers: layers.iter().map(|(l, h)| (format!("blk{l}"), h.clone())).collect(),
            rows_per_dataset: drawn.rows_per_dataset.clone(),
            teacher_tokens: drawn.kd.as_ref().map_or(0, |r| r.1),
            kd: drawn.kd.as_ref().map(|r| r.0.clone()),
            opd: drawn.opd.clone(),
            eval: None,
            master_sha256: None,
        }
    }
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

/// Held-out loss; the losses are `None` (logged as null, printed as n/a) over 0 supervised tokens.
#[derive(Clone, Debug, Serialize)]
pub struct EvalRecord {
    pub loss: Option<f64>,
    pub ce_reasoning: Option<f64>,
    pub ce_final: Option<f64>,
    pub tokens: u64,
    /// With `--canary`: the canary set's loss (token-weighted mean over its documents).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_loss: Option<f64>,
    /// With `--eval-prompts`: the Harmony validity rate of greedy answers to them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub valid_rate: Option<f64>,
}

/// Global per-span means of a set of micro-batches and their token losses.
pub(super) fn span_means(sums: &[f64; 3], counts: &[u64; 3], w: [f32; 2]) -> (f64, f64, f64) {
    let mean = |s: usize| if counts[s] > 0 { sums[s] / counts[s] as f64 } else { 0.0 };
    let (r, f) = (mean(1), mean(2));
    (w[0] as f64 * r + w[1] as f64 * f, r, f)
}

/// Statistics of the step's confidence weights (the same formula as the IR reference).
/// The step's confidence-weight statistics over every rank's micro-batches.
pub(super) fn kd_record(batches: &[Batch], kd: [f32; 5], dist: &crate::dist::Dist) -> Result<Option<(KdRecord, u64)>> {
    let mut sums = kd_sums(batches, kd);
    dist.all_reduce_f64(&mut sums)?;
    let [n, lp_sum, lp_n, w_sum, lo, hi] = sums;
    Ok((n > 0.0).then(|| {
        let r = KdRecord {
            center: kd[0] as f64,
            teacher_logp_mean: if lp_n > 0.0 { lp_sum / lp_n } else { 0.0 },
            weight_mean: w_sum / n,
            clipped_low: lo / n,
            clipped_high: hi / n,
        };
        (r, n as u64)
    }))
}

/// `[positions, Σ log p, finite log p count, Σ weight, clipped low, clipped high]`.
fn kd_sums(batches: &[Batch], kd: [f32; 5]) -> [f64; 6] {
    let (mut n, mut lp_sum, mut lp_n, mut w_sum, mut lo, mut hi) = (0u64, 0f64, 0u64, 0f64, 0u64, 0u64);
    for b in batches {
        for (&lp, &on) in b.teacher_logp.iter().zip(&b.teacher) {
            if on != crate::backend::WEIGHT_CONFIDENCE {
                continue;
            }
            n += 1;
            if lp.is_finite() {
                lp_sum += lp as f64;
                lp_n += 1;
            }
            let w = vpmoe_ir::reference::token_weight(1, 0.0, lp, 0.0, &kd);
            w_sum += w as f64;
            lo += u64::from(w <= kd[2]);
            hi += u64::from(w >= kd[3]);
        }
    }
    [n as f64, lp_sum, lp_n as f64, w_sum, lo as f64, hi as f64]
}

/// The progress line of a step.
pub(super) fn summary(r: &StepRecord) -> String {
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
    if let Some(o) = &r.opd {
        s.push_str(&o.summary());
    }
    if let Some(e) = &r.eval {
        let f = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.4}"));
        s.push_str(&format!(" | eval {} (r {}, f {})", f(e.loss), f(e.ce_reasoning), f(e.ce_final)));
        if let Some(c) = e.canary_loss {
            s.push_str(&format!(" canary {c:.4}"));
        }
        if let Some(v) = e.valid_rate {
            s.push_str(&format!(" valid {:.0}%", 100.0 * v));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held-out evaluation over 0 supervised tokens has no loss: null in metrics.jsonl, n/a on
    /// the progress line.
    #[test]
    fn an_evaluation_without_tokens_has_no_loss() {
        let e = EvalRecord {
            loss: None,
            ce_reasoning: None,
            ce_final: None,
            tokens: 0,
            canary_loss: None,
            valid_rate: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"loss":null,"ce_reasoning":null,"ce_final":null,"tokens":0}"#
        );
        let r = StepRecord {
            step: 1,
            lr: 0.0,
            loss: 1.0,
            ce_reasoning: 0.5,
            ce_final: 0.5,
            tokens_reasoning: 1,
            tokens_final: 1,
            span_weights: [1.0, 1.0],
            grad_norm: 0.0,
            clip_coef: 1.0,
            tokens: 2,
            tokens_per_s: 1.0,
            step_s: 1.0,
            optimizer_s: 0.0,
            router: None,
            router_layers: vec![],
            rows_per_dataset: vec![1],
            teacher_tokens: 0,
            kd: None,
            opd: None,
            eval: Some(e),
            master_sha256: None,
        };
        assert!(summary(&r).ends_with("| eval n/a (r n/a, f n/a)"), "{}", summary(&r));
    }
}
