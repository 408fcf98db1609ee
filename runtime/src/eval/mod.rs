//! `vpmoe-rt eval`: a checkpoint's held-out loss per span on datasets' valid splits, the Harmony
//! format validity of its sampled answers, and multiple-choice tasks ([`tasks`]), as a table and
//! one JSON report.

pub mod tasks;

use crate::decode::sample::{Prompt, Summary, STOP};
use crate::decode::sampler::Sampling;
use crate::decode::{generate, Decoder, GenConfig};
use crate::train::EvalRecord;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use tasks::TaskScore;
use vpmoe_data::completion;

/// The held-out loss of one dataset (global span means, as training reports them).
#[derive(Debug, Serialize)]
pub struct HeldOut {
    pub data: String,
    #[serde(flatten)]
    pub record: EvalRecord,
}

/// Sampled answers to the prompt set under one reasoning effort and one way of choosing tokens.
#[derive(Debug, Default, Serialize)]
pub struct SampleStats {
    pub effort: String,
    /// `greedy`, or `sampled` (temperature 1, the full distribution).
    pub mode: String,
    pub samples: usize,
    pub valid: usize,
    pub valid_rate: f64,
    /// Count of each first violation, by kind.
    pub violations: BTreeMap<String, usize>,
    /// Share of answers cut by the token budget or the context.
    pub budget_share: f64,
    pub mean_analysis_tokens: f64,
    pub mean_final_tokens: f64,
    /// With `--teacher`: the teacher's mean log-probability of the answers' final-message tokens
    /// (a cheap agreement score), and how many tokens it covers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_final_logp: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_final_tokens: Option<u64>,
}

/// Everything `eval` measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub checkpoint: String,
    pub step: u64,
    pub config_hash: String,
    pub held_out: Vec<HeldOut>,
    pub samples: Vec<SampleStats>,
    pub tasks: BTreeMap<String, TaskScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryLoss>,
}

/// The loss on the canary set: per document, and their token-weighted mean.
#[derive(Debug, Serialize)]
pub struct CanaryLoss {
    pub set: String,
    pub sha256: String,
    pub loss: f64,
    pub tokens: u64,
    pub docs: Vec<CanaryDoc>,
}

#[derive(Debug, Serialize)]
pub struct CanaryDoc {
    pub line: usize,
    pub kind: &'static str,
    pub tokens: u64,
    pub loss: f64,
}

/// Each canary document's mean `−log p` over its scored tokens (texts: all but the first;
/// conversations: the training render's loss mask), through `score`.
pub fn canary_loss(dec: &mut Decoder, canary: &vpmoe_data::canary::Canary) -> Result<CanaryLoss> {
    let (mut total, mut n, mut docs) = (0f64, 0u64, Vec::new());
    for d in &canary.docs {
        let s =
            crate::decode::score::score(dec, &d.tokens, 0).with_context(|| format!("{}:{}", canary.name, d.line))?;
        let (mut sum, mut k) = (0f64, 0u64);
        for (lp, &m) in s.logprobs.iter().zip(&d.scored) {
            if let (Some(lp), 1) = (lp, m) {
                sum -= *lp as f64;
                k += 1;
            }
        }
        docs.push(CanaryDoc { line: d.line, kind: d.kind, tokens: k, loss: sum / k.max(1) as f64 });
        (total, n) = (total + sum, n + k);
    }
    Ok(CanaryLoss {
        set: canary.name.clone(),
        sha256: canary.sha256.clone(),
        loss: total / n.max(1) as f64,
        tokens: n,
        docs,
    })
}

/// Samples `per_prompt` answers to every prompt (greedy: one) and counts their validity; with a
/// teacher, also its mean log-probability of the final messages' tokens.
#[allow(clippy::too_many_arguments)]
pub fn sample_stats(
    dec: &mut Decoder,
    prompts: &[Prompt],
    effort: &str,
    greedy: bool,
    per_prompt: usize,
    max_new_tokens: usize,
    seed: u64,
    teacher: Option<&crate::teacher::client::Client>,
) -> Result<SampleStats> {
    let n = if greedy { 1 } else { per_prompt.max(1) };
    let toks: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.tokens.clone(), n)).collect();
    let sampling = if greedy { Sampling::greedy() } else { Sampling::default() };
    let cfg = GenConfig { sampling, seed, max_new_tokens, stop: STOP.to_vec() };
    let gens = generate(dec, &toks, &cfg, |_, _| {})?;
    let mut sum = Summary::default();
    let mut spans = Vec::with_capacity(gens.len());
    for g in &gens {
        let c = completion::parse(&g.tokens);
        sum.add(g, &c);
        spans.push(c.span_id);
    }
    let agreement = match teacher {
        Some(t) => {
            let seqs: Vec<(&[u32], &[u32])> =
                toks.iter().zip(&gens).map(|(p, g)| (p.as_slice(), g.tokens.as_slice())).collect();
            let lps = t.completion_logprobs(&seqs).context("teacher agreement")?;
            let (mut total, mut n) = (0f64, 0u64);
            for (lp, span) in lps.iter().zip(&spans) {
                for (&x, _) in lp.iter().zip(span).filter(|(_, &s)| s == 2) {
                    total += x as f64;
                    n += 1;
                }
            }
            Some(((n > 0).then(|| total / n as f64), n))
        }
        None => None,
    };
    let k = sum.samples.max(1) as f64;
    let s = SampleStats {
        effort: effort.to_string(),
        mode: if greedy { "greedy" } else { "sampled" }.into(),
        samples: sum.samples,
        valid: sum.valid,
        valid_rate: sum.valid as f64 / k,
        budget_share: (sum.samples - sum.stopped) as f64 / k,
        mean_analysis_tokens: sum.analysis_tokens as f64 / k,
        mean_final_tokens: sum.final_tokens as f64 / k,
        violations: sum.violations,
        teacher_final_logp: agreement.and_then(|a| a.0),
        teacher_final_tokens: agreement.map(|a| a.1),
    };
    Ok(s)
}

impl Report {
    /// The report as the table `eval` prints.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let opt = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.4}"));
        let _ = writeln!(t, "eval of {} (step {})", self.checkpoint, self.step);
        if !self.held_out.is_empty() {
            let _ = writeln!(t, "\nheld-out loss      loss   reasoning      final    tokens  data");
            for h in &self.held_out {
                let r = &h.record;
                let _ = writeln!(
                    t,
                    "{:>22} {:>11} {:>10} {:>9}  {}",
                    opt(r.loss),
                    opt(r.ce_reasoning),
                    opt(r.ce_final),
                    r.tokens,
                    h.data
                );
            }
        }
        if !self.samples.is_empty() {
            let _ = writeln!(t, "\nsamples  effort  mode      n  valid  budget  analysis  final  teacher  violations");
            for s in &self.samples {
                let v: Vec<String> = s.violations.iter().map(|(k, n)| format!("{k} {n}")).collect();
                let teacher = match (s.teacher_final_logp, s.teacher_final_tokens) {
                    (Some(lp), _) => format!("{lp:>7.3}"),
                    (None, Some(_)) => "    n/a".into(),
                    (None, None) => "      -".into(),
                };
                let _ = writeln!(
                    t,
                    "         {:<7} {:<7} {:>3} {:>5.0}% {:>6.0}% {:>9.1} {:>6.1}  {teacher}  {}",
                    s.effort,
                    s.mode,
                    s.samples,
                    100.0 * s.valid_rate,
                    100.0 * s.budget_share,
                    s.mean_analysis_tokens,
                    s.mean_final_tokens,
                    v.join(", ")
                );
            }
        }
        if let Some(c) = &self.canary {
            let _ = writeln!(
                t,
                "\ncanary loss {:.4} over {} tokens ({}, sha256 {}…)",
                c.loss,
                c.tokens,
                c.set,
                &c.sha256[..16]
            );
            for d in &c.docs {
                let _ = writeln!(t, "  line {:>3}  {:<12} {:>5} tokens  {:.4}", d.line, d.kind, d.tokens, d.loss);
            }
        }
        if !self.tasks.is_empty() {
            let _ = writeln!(t, "\ntask                      questions     acc  acc_norm");
            for (name, s) in &self.tasks {
                let _ = writeln!(t, "{name:<25} {:>9} {:>7.3} {:>9.3}", s.questions, s.acc, s.acc_norm);
            }
        }
        t
    }
}
