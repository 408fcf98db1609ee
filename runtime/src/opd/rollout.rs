//! One OPD step's rollouts: prompts (a build-synth dataset's user messages under the
//! curriculum's reasoning effort), the student's continuations at temperature 1 over the whole
//! vocabulary, the teacher's log-probability of every sampled token in exactly that context, and
//! the micro-batches that train on them.

use super::{OpdConfig, TEACHER_LOGP_FLOOR};
use crate::backend::{Batch, WEIGHT_OPD};
use crate::decode::sample::STOP;
use crate::decode::sampler::{uniform, Sampling};
use crate::decode::{generate_from, DecodeOn, Finish, GenConfig};
use crate::state::TrainState;
use crate::teacher::client::Client;
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;
use std::time::Instant;
use vpmoe_compiler::Plan;
use vpmoe_data::completion;
use vpmoe_data::harmony::{self, Conversation, Message, ReasoningEffort, RenderConfig, Role, SystemContent};
use vpmoe_data::reader::Dataset;
use vpmoe_data::tokenizer::{END, EOD, MESSAGE};
use vpmoe_ir::rng::splitmix64;
use vpmoe_ir::Graph;

/// Draw streams of one step (keys of [`uniform`] besides the step).
const PROMPT_STREAM: u64 = 1;
const EFFORT_STREAM: u64 = 2;
/// Documents tried for one prompt before the dataset is declared too long for `--seq-len`.
const PROMPT_TRIES: u64 = 16;
/// Completion tokens a prompt must leave room for in a row.
const MIN_ANSWER: usize = 16;

/// The prompts: user messages of a build-synth dataset, re-headed with a system message of the
/// chosen reasoning effort. The user message's tokens are copied, never re-tokenised.
pub struct Prompts {
    ds: Dataset,
    /// `<|start|>user` as the renderer writes it.
    user: Vec<u32>,
    /// The system message of each effort, then `<|start|>user`.
    heads: [Vec<u32>; 3],
    /// `<|start|>assistant`.
    assistant: Vec<u32>,
}

impl Prompts {
    pub fn open(path: &Path) -> Result<Prompts> {
        if let Some((name, vocab)) = vpmoe_data::reader::dataset_tokenizer(path)? {
            ensure!(
                vocab == vpmoe_data::tokenizer::VOCAB_SIZE as u64,
                "--opd-prompts {}: built with tokenizer {name} ({vocab} ids); OPD prompts are o200k_harmony",
                path.display()
            );
        }
        let ds = Dataset::open(path).with_context(|| format!("--opd-prompts {}", path.display()))?;
        let render = |effort: ReasoningEffort, next: Role| -> Result<Vec<u32>> {
            let system = SystemContent { reasoning_effort: Some(effort), ..SystemContent::default() };
            let conv = Conversation { messages: vec![Message::system(system)] };
            harmony::render_for_completion(&conv, next, RenderConfig::default())
        };
        let efforts = [ReasoningEffort::Low, ReasoningEffort::Medium, ReasoningEffort::High];
        let heads = efforts.map(|e| render(e, Role::User));
        let [low, medium, high] = heads;
        let (low, medium, high) = (low?, medium?, high?);
        let to_assistant = render(ReasoningEffort::Low, Role::Assistant)?;
        // Both end `<|start|>ROLE` after the same system message.
        let common = low.iter().zip(&to_assistant).take_while(|(a, b)| a == b).count();
        ensure!(common > 0, "internal: the Harmony renderer gives no common system prefix");
        let system_len = common - 1; // the shared `<|start|>` belongs to the role header
        Ok(Prompts {
            ds,
            user: low[system_len..].to_vec(),
            assistant: to_assistant[system_len..].to_vec(),
            heads: [low, medium, high],
        })
    }

    pub fn len(&self) -> u64 {
        self.ds.n_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Document `doc`'s first user message rendered for the assistant's turn, or `None` when it
    /// has none.
    pub fn prompt(&self, doc: u64, effort: ReasoningEffort) -> Option<Vec<u32>> {
        let (shard, local) = self.ds.locate(doc);
        let tokens: Vec<u32> = self.ds.shards[shard].tokens.get::<i32>(local).into_iter().map(|t| t as u32).collect();
        let mut header = self.user.clone();
        header.push(MESSAGE);
        let at = tokens.windows(header.len()).position(|w| w == header.as_slice())?;
        let body = at + self.user.len();
        let end = body + tokens[body..].iter().position(|&t| t == END)?;
        let head = &self.heads[effort as usize];
        Some([head.as_slice(), &tokens[body..=end], &self.assistant].concat())
    }
}

/// One sampled sequence and everything its training needs.
#[derive(Clone, Debug)]
pub struct Rollout {
    pub prompt: Vec<u32>,
    pub effort: ReasoningEffort,
    pub completion: Vec<u32>,
    /// Per completion token: the sampler's log-probability (full vocabulary, temperature 1),
    /// the teacher's (floored at [`TEACHER_LOGP_FLOOR`]) and the Harmony span (1 analysis,
    /// 2 final, 0 elsewhere).
    pub sampler_logp: Vec<f32>,
    pub teacher_logp: Vec<f32>,
    pub span: Vec<u8>,
    pub valid: bool,
    pub finish: Finish,
}

/// The rollouts of one step, sampled with the weights after `policy_step` optimizer steps.
pub struct Rollouts {
    pub rows: Vec<Rollout>,
    pub policy_step: u64,
    pub phase: String,
    pub sample_seconds: f64,
    pub score_seconds: f64,
    /// Teacher log-probabilities raised to the floor.
    pub floored: u64,
}

/// What sampling a step needs, shared with a background sampler.
pub struct Sampler {
    pub graph: Graph,
    pub plan: Plan,
    pub prompts: Prompts,
    pub teacher: Client,
    pub cfg: OpdConfig,
    pub seed: u64,
    pub seq_len: usize,
    /// Rows of a step (micro-batch × grad-accum).
    pub rows: usize,
}

/// Which prompts step `step` samples, and with which effort: a function of the seed, the step
/// and the curriculum phase only, so a resumed run draws the same ones.
pub fn plan_prompts(
    s: &Sampler,
    step: u64,
    phase: &super::curriculum::Phase,
) -> Result<Vec<(Vec<u32>, ReasoningEffort)>> {
    let n = s.rows.div_ceil(phase.rollouts);
    let key = splitmix64(s.seed ^ 0x6f70_645f_7374_6570) ^ step;
    let mut out = Vec::with_capacity(s.rows);
    for j in 0..n as u64 {
        let effort = phase.effort(uniform(key, j, EFFORT_STREAM));
        let mut found = None;
        for attempt in 0..PROMPT_TRIES {
            let doc = (uniform(key, j * PROMPT_TRIES + attempt, PROMPT_STREAM) * s.prompts.len() as f64) as u64;
            if let Some(p) = s.prompts.prompt(doc.min(s.prompts.len() - 1), effort) {
                if p.len() + MIN_ANSWER <= s.seq_len {
                    found = Some(p);
                    break;
                }
            }
        }
        let Some(p) = found else {
            bail!(
                "no prompt of --opd-prompts fits --seq-len {} with room for {MIN_ANSWER} answer tokens after {PROMPT_TRIES} \
                 documents (or the documents have no user message)",
                s.seq_len
            )
        };
        for _ in 0..phase.rollouts {
            out.push((p.clone(), effort));
        }
    }
    out.truncate(s.rows);
    Ok(out)
}

/// Samples (on `on`) and scores rows `share` of step `step`'s rollouts (a data-parallel rank's;
/// the same rollouts as when one rank samples them all) with the weights in `state`, at most
/// `cap` completion tokens each.
pub fn sample(
    s: &Sampler,
    on: &DecodeOn,
    state: &TrainState,
    step: u64,
    phase: &super::curriculum::Phase,
    cap: usize,
    share: std::ops::Range<usize>,
) -> Result<Rollouts> {
    let planned: Vec<_> = plan_prompts(s, step, phase)?.drain(share.clone()).collect();
    let t0 = Instant::now();
    let mut dec = on.decoder(&s.graph, &s.plan, state, planned.len())?;
    let gen = GenConfig {
        sampling: Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 },
        seed: splitmix64(s.seed ^ 0x726f_6c6c_6f75_7473) ^ step,
        max_new_tokens: cap,
        stop: STOP.to_vec(),
    };
    let prompts: Vec<Vec<u32>> = planned.iter().map(|p| p.0.clone()).collect();
    let generated =
        generate_from(&mut dec, &prompts, share.start as u64, &gen, |_, _| {}).context("sampling rollouts")?;
    drop(dec);
    let sample_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut rows = Vec::with_capacity(planned.len());
    for ((prompt, effort), mut g) in planned.into_iter().zip(generated) {
        // A row holds the prompt and the completion: a longer one is cut at the row's end.
        let room = s.seq_len - prompt.len();
        if g.tokens.len() > room {
            g.tokens.truncate(room);
            g.logprobs.truncate(room);
            g.finish = Finish::Length;
        }
        let parsed = completion::parse(&g.tokens);
        rows.push(Rollout {
            prompt,
            effort,
            sampler_logp: g.logprobs,
            teacher_logp: Vec::new(),
            span: parsed.span_id,
            valid: parsed.verdict.valid,
            finish: g.finish,
            completion: g.tokens,
        });
    }
    let floored = score(&s.teacher, &mut rows)?;
    Ok(Rollouts {
        rows,
        policy_step: state.step,
        phase: phase.name.clone(),
        sample_seconds,
        score_seconds: t1.elapsed().as_secs_f64(),
        floored,
    })
}

/// The teacher's log-probability of every completion token, in its context; returns how many
/// were raised to the floor.
fn score(teacher: &Client, rows: &mut [Rollout]) -> Result<u64> {
    let seqs: Vec<(&[u32], &[u32])> = rows.iter().map(|r| (r.prompt.as_slice(), r.completion.as_slice())).collect();
    let scores = teacher.completion_logprobs(&seqs).context("teacher scoring of rollouts")?;
    let mut floored = 0;
    for (r, lps) in rows.iter_mut().zip(scores) {
        floored += lps.iter().filter(|&&lp| lp < TEACHER_LOGP_FLOOR).count() as u64;
        r.teacher_logp = lps.into_iter().map(|lp| lp.max(TEACHER_LOGP_FLOOR)).collect();
    }
    Ok(floored)
}

/// The step's micro-batches: one rollout per row, the prompt then the completion, padded with
/// EOD (a document of its own); every completion token inside an analysis or final message is
/// supervised with the OPD weight (mode 2), the prompt and the padding are not.
pub fn batches(rows: &[Rollout], seq_len: usize, micro_batch: usize, clip: f32) -> Vec<Batch> {
    rows.chunks(micro_batch)
        .map(|chunk| {
            let t = chunk.len() * seq_len;
            let mut b = Batch {
                seq: seq_len,
                tokens: vec![EOD as i32; t],
                doc: vec![1; t],
                labels: vec![0; t],
                loss_mask: vec![0; t],
                span: vec![0; t],
                teacher_logp: vec![0.0; t],
                teacher: vec![0; t],
                sampler_logp: vec![0.0; t],
                kd: [0.0, 1.0, 1.0, 1.0, clip],
                ..Batch::default()
            };
            for (i, r) in chunk.iter().enumerate() {
                let row = i * seq_len;
                let seq: Vec<u32> = r.prompt.iter().chain(&r.completion).copied().collect();
                for (p, &tok) in seq.iter().enumerate() {
                    b.tokens[row + p] = tok as i32;
                    b.doc[row + p] = 0;
                    if let Some(&next) = seq.get(p + 1) {
                        b.labels[row + p] = next as i32;
                    }
                }
                // Position prompt_len − 1 + c predicts completion token c.
                for c in 0..r.completion.len() {
                    let at = row + r.prompt.len() - 1 + c;
                    if r.span[c] != 0 {
                        b.loss_mask[at] = 1;
                        b.span[at] = r.span[c];
                        b.teacher[at] = WEIGHT_OPD;
                        b.teacher_logp[at] = r.teacher_logp[c];
                        b.sampler_logp[at] = r.sampler_logp[c];
                    }
                }
            }
            b
        })
        .collect()
}
