//! Stage 3: on-policy distillation (DISTILL.md, docs/training.md). The student samples answers
//! to SYNTH prompts ([`rollout`]), the teacher scores exactly the sampled ids in their context,
//! and the trainer minimises, per sampled assistant token,
//! `min(exp(lp − lp_sampler), c)·(teacher_logp − lp)·(−lp)` with the weight a stop-gradient,
//! `lp` the student's log-probability at the current weights (`Op::TokenWeight` mode 2), span-
//! normalised like every objective (D6). A configurable share of steps are plain CE on SYNTH
//! traces (the anchor); a [`curriculum`] sets the reasoning-effort mix and rollouts per prompt by
//! the fraction of the OPD token budget trained on. [`source::Opd`] is the training loop's
//! [`crate::train::Source`]: synchronous at `max_lag` 0, and at `max_lag` 1 it samples the next
//! step's rollouts in the background while the trainer trains the current step.

pub mod curriculum;
pub mod rollout;
pub mod source;

use crate::backend::{Batch, WEIGHT_OPD};
use crate::teacher::client::ClientConfig;
use anyhow::{ensure, Result};
use curriculum::Curriculum;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use source::Opd;

/// Teacher log-probabilities below this are raised to it (vLLM and SGLang send −inf as −9999):
/// e^−30 ≈ 1e−13 is already "never" for the advantage, and a finite value keeps the step finite.
pub const TEACHER_LOGP_FLOOR: f32 = -30.0;

/// Stage 3's semantic settings (part of the run's [`crate::train::TrainConfig`]; `--resume`
/// refuses a change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpdConfig {
    /// Share of steps that are plain span-normalised CE on SYNTH traces.
    pub ce_anchor: f64,
    /// Optimizer steps a rollout's weights may lag the trainer's (0: synchronous).
    pub max_lag: u64,
    /// Truncation `c` of the importance ratio `min(exp(lp − lp_sampler), c)`.
    pub ratio_clip: f32,
    /// Completion tokens per rollout (a row also cuts it at `--seq-len`).
    pub max_new_tokens: usize,
    /// OPD tokens the curriculum's fractions refer to.
    pub token_budget: u64,
    pub curriculum: Curriculum,
}

impl OpdConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.ce_anchor.is_finite() && (0.0..1.0).contains(&self.ce_anchor),
            "--ce-anchor {} must be in [0, 1)",
            self.ce_anchor
        );
        ensure!(self.max_lag <= 1, "--max-lag {} is not supported: 0 (synchronous) or 1", self.max_lag);
        ensure!(self.ratio_clip.is_finite() && self.ratio_clip >= 1.0, "--opd-clip {} must be ≥ 1", self.ratio_clip);
        ensure!(self.max_new_tokens >= 1, "--max-new-tokens must be at least 1");
        ensure!(self.token_budget >= 1, "--opd-tokens must be at least 1");
        self.curriculum.validate()
    }
}

/// Where stage 3's inputs come from (not part of the run's semantics).
#[derive(Clone, Debug)]
pub struct OpdRun {
    pub teacher: ClientConfig,
    /// A build-synth dataset whose user messages are the prompts.
    pub prompts: PathBuf,
}

/// One step of stage 3 in `metrics.jsonl`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OpdRecord {
    /// This step was plain CE on SYNTH traces.
    pub anchor: bool,
    /// Anchor steps so far over all stage-3 steps.
    pub anchor_share: f64,
    pub phase: String,
    /// Fraction of the OPD token budget trained on before this step.
    pub position: f64,
    /// OPD tokens trained on, this step included.
    pub opd_tokens: u64,
    /// Rollouts per reasoning effort (low, medium, high) and their mean completion lengths.
    pub modes: [u64; 3],
    pub length_by_mode: [f64; 3],
    /// Share of rollouts that are valid Harmony answers.
    pub valid_rate: f64,
    /// Optimizer steps between the weights that sampled and the weights that train.
    pub lag: u64,
    /// Seconds the trainer waited for rollouts; rollouts in flight after the draw.
    pub stall_s: f64,
    pub buffer: usize,
    pub sample_tok_s: f64,
    pub score_tok_s: f64,
    /// Teacher log-probabilities raised to [`TEACHER_LOGP_FLOOR`].
    pub teacher_floored: u64,
    /// Mean `teacher_logp − lp` over reasoning and final tokens, at the trained weights.
    pub advantage_reasoning: f64,
    pub advantage_final: f64,
    /// `|lp − lp_sampler|`: mean and largest; share of tokens whose ratio the clip cut.
    pub mismatch_mean: f64,
    pub mismatch_max: f64,
    pub clipped: f64,
    /// Rollouts sampled but never trained on (in flight when a checkpoint was resumed).
    pub discarded: u64,
    /// The generation cap and the share of high effort moved to medium (`source::Throttle`).
    pub cap: usize,
    pub high_cut: f64,
    /// What the throttle changed this step, in words (also printed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl OpdRecord {
    /// The statistics of the trained tokens: `token_loss[k]` is micro-batch k's per-token loss at
    /// the weights the step trained (`lp = −token_loss`).
    /// With more than one rank, over every rank's micro-batches.
    pub fn add_trained(
        &mut self,
        batches: &[Batch],
        token_loss: &[Vec<f32>],
        clip: f32,
        dist: &crate::dist::Dist,
    ) -> anyhow::Result<()> {
        let (mut adv, mut n) = ([0f64; 3], [0u64; 3]);
        let (mut mis, mut mis_max, mut cut, mut all) = (0f64, 0f64, 0u64, 0u64);
        for (b, tl) in batches.iter().zip(token_loss) {
            for i in (0..b.teacher.len()).filter(|&i| b.teacher[i] == WEIGHT_OPD && b.loss_mask[i] != 0) {
                let lp = -(tl[i] as f64);
                let s = b.span[i] as usize;
                adv[s] += b.teacher_logp[i] as f64 - lp;
                n[s] += 1;
                let d = lp - b.sampler_logp[i] as f64;
                mis += d.abs();
                mis_max = mis_max.max(d.abs());
                cut += u64::from(d.exp() > clip as f64);
                all += 1;
            }
        }
        let mut sums = [adv[1], adv[2], n[1] as f64, n[2] as f64, mis, cut as f64, all as f64];
        dist.all_reduce_f64(&mut sums)?;
        let mut max = [mis_max];
        dist.all_max_f64(&mut max)?;
        let [adv_r, adv_f, n_r, n_f, mis, cut, all] = sums;
        let mean = |x: f64, n: f64| if n > 0.0 { x / n } else { 0.0 };
        self.advantage_reasoning = mean(adv_r, n_r);
        self.advantage_final = mean(adv_f, n_f);
        self.mismatch_mean = mean(mis, all);
        self.mismatch_max = max[0];
        self.clipped = mean(cut, all);
        Ok(())
    }

    /// The progress line's part.
    pub fn summary(&self) -> String {
        if self.anchor {
            return format!(" | opd anchor (CE) · {:.0}% anchors", 100.0 * self.anchor_share);
        }
        format!(
            " | opd {} {:.0}% · adv r {:+.3} f {:+.3} · valid {:.0}% · lag {} · Δlp {:.1e} clip {:.1}% · modes {}/{}/{}",
            self.phase,
            100.0 * self.position,
            self.advantage_reasoning,
            self.advantage_final,
            100.0 * self.valid_rate,
            self.lag,
            self.mismatch_mean,
            100.0 * self.clipped,
            self.modes[0],
            self.modes[1],
            self.modes[2]
        )
    }
}
