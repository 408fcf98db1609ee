//! Multiple-choice log-likelihood tasks (the CORE-style suite tracked across the rung ladder).
//!
//! A task file is JSONL, one question a line:
//! `{"task": "NAME", "context": "…", "choices": ["…", …], "gold": INDEX, "fewshot": "…"?}`.
//! `fewshot` (optional) is prepended to the context. Each choice is scored as the sum of its
//! tokens' log-probabilities after the context (context and choice encoded separately with the
//! o200k tokenizer, so a choice usually starts with a space). Accuracy is reported as
//! lm-evaluation-harness does: `acc` picks the highest sum, `acc_norm` the highest sum per byte of
//! the choice.

use crate::decode::score::score;
use crate::decode::Decoder;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use vpmoe_data::tokenizer;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Question {
    task: String,
    context: String,
    choices: Vec<String>,
    gold: usize,
    #[serde(default)]
    fewshot: String,
}

/// A question ready to score: the context's tokens and each choice's.
pub struct Item {
    pub task: String,
    pub context: Vec<u32>,
    pub choices: Vec<(Vec<u32>, usize)>,
    pub gold: usize,
}

/// Reads a task file; every bad line is an error naming it.
pub fn read_tasks(path: &Path, max_len: usize) -> Result<Vec<Item>> {
    let mut out = Vec::new();
    for (_, at, line) in crate::jsonl_lines(path, "questions")? {
        let q: Question = serde_json::from_str(&line).with_context(|| {
            format!("{at}: not a task line {{\"task\", \"context\", \"choices\", \"gold\", \"fewshot\"?}}")
        })?;
        ensure!(q.choices.len() >= 2, "{at}: {} choices; a question needs at least 2", q.choices.len());
        ensure!(q.gold < q.choices.len(), "{at}: gold {} is not one of the {} choices", q.gold, q.choices.len());
        let context = tokenizer::encode(&(q.fewshot + &q.context));
        ensure!(!context.is_empty(), "{at}: an empty context");
        let mut choices = Vec::new();
        for (k, c) in q.choices.iter().enumerate() {
            let t = tokenizer::encode(c);
            if t.is_empty() {
                bail!("{at}: choice {k} is empty");
            }
            ensure!(
                context.len() + t.len() <= max_len,
                "{at}: context and choice {k} take {} tokens; the context holds {max_len}",
                context.len() + t.len()
            );
            choices.push((t, c.len()));
        }
        out.push(Item { task: q.task, context, choices, gold: q.gold });
    }
    Ok(out)
}

/// Accuracy of one task.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct TaskScore {
    pub questions: usize,
    pub acc: f64,
    pub acc_norm: f64,
}

/// The log-likelihood of each choice after the context (its tokens' log-probabilities summed).
pub fn choice_logprobs(dec: &mut Decoder, item: &Item) -> Result<Vec<f64>> {
    item.choices
        .iter()
        .map(|(t, _)| {
            let seq: Vec<u32> = item.context.iter().chain(t).copied().collect();
            let s = score(dec, &seq, 0)?;
            Ok(s.logprobs[item.context.len()..].iter().map(|x| x.expect("every token after the first") as f64).sum())
        })
        .collect()
}

/// Scores every question; accuracy per task, in name order.
pub fn run_tasks(dec: &mut Decoder, items: &[Item], mut progress: impl FnMut()) -> Result<BTreeMap<String, TaskScore>> {
    let mut hits: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for item in items {
        let lp = choice_logprobs(dec, item)?;
        let argmax = |f: &dyn Fn(usize) -> f64| (0..lp.len()).fold(0, |b, k| if f(k) > f(b) { k } else { b });
        let plain = argmax(&|k| lp[k]);
        let norm = argmax(&|k| lp[k] / item.choices[k].1.max(1) as f64);
        let h = hits.entry(item.task.clone()).or_default();
        h.0 += 1;
        h.1 += usize::from(plain == item.gold);
        h.2 += usize::from(norm == item.gold);
        progress();
    }
    Ok(hits
        .into_iter()
        .map(|(k, (n, a, b))| (k, TaskScore { questions: n, acc: a as f64 / n as f64, acc_norm: b as f64 / n as f64 }))
        .collect())
}
