//! `vpmoe-rt sample`: Harmony prompts from JSONL → the student's continuations, parsed and
//! judged (`vpmoe_data::completion`), as JSONL, with a summary.
//!
//! A prompt line is a JSON string (one user message) or a Harmony conversation
//! (`{"messages": [...]}`). A conversation without a system message gets the pinned one with
//! the requested reasoning effort. The prompt is rendered for completion, so it ends
//! `<|start|>assistant` and the model writes the channel.

use super::{generate, Decoder, Finish, GenConfig, Generated};
use crate::checkpoint;
use crate::state::TrainState;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use vpmoe_compiler::Plan;
use vpmoe_data::completion::{self, SampledMessage, Verdict};
use vpmoe_data::harmony::{self, Conversation, Message, ReasoningEffort, RenderConfig, Role, SystemContent};
use vpmoe_data::tokenizer::{self, CALL, RETURN, VOCAB_SIZE};

/// Harmony's assistant stop tokens: `<|return|>` ends an answer, `<|call|>` a tool call.
/// `<|end|>` closes the analysis message and never stops a sequence.
pub const STOP: [u32; 2] = [RETURN, CALL];

/// A prompt as given, and its rendered tokens.
pub struct Prompt {
    pub line: usize,
    pub source: serde_json::Value,
    pub tokens: Vec<u32>,
}

/// A conversation ready for the assistant's turn: the pinned system message (with `effort`)
/// first unless it has one.
pub fn render_prompt(mut conv: Conversation, effort: ReasoningEffort) -> Result<Vec<u32>> {
    if !conv.messages.iter().any(|m| m.role == Role::System) {
        let system = SystemContent { reasoning_effort: Some(effort), ..SystemContent::default() };
        conv.messages.insert(0, Message::system(system));
    }
    harmony::render_for_completion(&conv, Role::Assistant, RenderConfig::default())
}

/// Reads a prompts file (JSONL); every bad line is an error naming it.
pub fn read_prompts(path: &Path, effort: ReasoningEffort) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    for (line, at, text) in crate::jsonl_lines(path, "prompts")? {
        let source: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{at}: not JSON"))?;
        let conv = match &source {
            serde_json::Value::String(s) => {
                ensure!(!s.trim().is_empty(), "{at}: an empty prompt");
                Conversation { messages: vec![Message::new(Role::User, s.clone())] }
            }
            serde_json::Value::Object(_) => harmony::parse_conversation(&text)
                .with_context(|| format!("{at}: not a Harmony conversation ({{\"messages\": [...]}})"))?,
            _ => bail!("{at}: a prompt is a JSON string or a {{\"messages\": [...]}} conversation"),
        };
        let tokens = render_prompt(conv, effort).with_context(|| at.clone())?;
        out.push(Prompt { line, source, tokens });
    }
    Ok(out)
}

/// The checkpoint `path` names (one `step_N` directory, or a run directory's newest), loaded
/// and checked against `plan`'s architecture.
pub fn load_checkpoint(path: &Path, plan: &Plan) -> Result<(PathBuf, TrainState)> {
    let dir = if path.join("meta.json").is_file() {
        path.to_path_buf()
    } else {
        checkpoint::latest(path)?
            .with_context(|| format!("{}: no checkpoint (a step_N directory or a run directory)", path.display()))?
    };
    let meta = checkpoint::read_meta(&dir)?;
    let hash = checkpoint::sha256_hex(plan.arch.canonical_json().as_bytes());
    ensure!(
        meta.config_hash == hash,
        "{} was trained with another architecture (config hash {}…, this one is {}…): pass the --arch or --plan it was trained with",
        dir.display(),
        &meta.config_hash[..12.min(meta.config_hash.len())],
        &hash[..12]
    );
    let (_, state) = checkpoint::load(&dir, plan)?;
    Ok((dir, state))
}

/// Refuses an architecture that cannot speak Harmony (its vocabulary is not o200k_harmony's).
pub fn require_harmony(plan: &Plan) -> Result<()> {
    ensure!(
        plan.arch.vocab == VOCAB_SIZE as u64,
        "generation renders Harmony with the o200k_harmony tokenizer ({VOCAB_SIZE} ids); {} has a vocabulary of {}",
        plan.arch.name,
        plan.arch.vocab
    );
    Ok(())
}

/// One output line.
#[derive(Serialize)]
pub struct Record<'a> {
    pub line: usize,
    pub prompt: &'a serde_json::Value,
    pub prompt_tokens: usize,
    pub tokens: &'a [u32],
    pub logprobs: &'a [f32],
    pub finish: Finish,
    pub messages: &'a [SampledMessage],
    pub verdict: &'a Verdict,
}

/// Validity and lengths over a set of samples.
#[derive(Debug, Default)]
pub struct Summary {
    pub samples: usize,
    pub valid: usize,
    pub stopped: usize,
    pub tokens: usize,
    /// Tokens inside analysis / final messages.
    pub analysis_tokens: usize,
    pub final_tokens: usize,
    /// Count of each first violation, by kind.
    pub violations: BTreeMap<String, usize>,
}

impl Summary {
    /// Counts one sample and its parse.
    pub fn add(&mut self, g: &Generated, c: &completion::Completion) {
        self.samples += 1;
        self.valid += usize::from(c.verdict.valid);
        self.stopped += usize::from(g.finish == Finish::Stop);
        self.tokens += g.tokens.len();
        self.analysis_tokens += c.span_id.iter().filter(|&&s| s == 1).count();
        self.final_tokens += c.span_id.iter().filter(|&&s| s == 2).count();
        if let Some(v) = &c.verdict.violation {
            *self.violations.entry(v.kind().to_string()).or_default() += 1;
        }
    }

    pub fn format(&self) -> String {
        let n = self.samples.max(1) as f64;
        format!(
            "{} samples: {} valid Harmony ({:.0} %), {} stopped, {} hit the budget; mean tokens {:.1} (analysis {:.1}, final {:.1})",
            self.samples,
            self.valid,
            100.0 * self.valid as f64 / n,
            self.stopped,
            self.samples - self.stopped,
            self.tokens as f64 / n,
            self.analysis_tokens as f64 / n,
            self.final_tokens as f64 / n
        )
    }
}

/// Samples every prompt and writes the records to `out` (through a temporary file, so a failed
/// run leaves an existing `out` as it was). `progress` hears every sampled token.
pub fn sample_to_file(
    dec: &mut Decoder,
    prompts: &[Prompt],
    cfg: &GenConfig,
    out: &Path,
    mut progress: impl FnMut(),
) -> Result<Summary> {
    for p in prompts {
        ensure!(
            p.tokens.len() < dec.max_len(),
            "the prompt on line {} renders to {} tokens; the context holds {} (and the answer needs one more)",
            p.line,
            p.tokens.len(),
            dec.max_len()
        );
    }
    let toks: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let gens = generate(dec, &toks, cfg, |_, _| progress())?;
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let mut summary = Summary::default();
    {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        for (p, g) in prompts.iter().zip(&gens) {
            let c = completion::parse(&g.tokens);
            summary.add(g, &c);
            let rec = Record {
                line: p.line,
                prompt: &p.source,
                prompt_tokens: p.tokens.len(),
                tokens: &g.tokens,
                logprobs: &g.logprobs,
                finish: g.finish,
                messages: &c.messages,
                verdict: &c.verdict,
            };
            serde_json::to_writer(&mut w, &rec)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(summary)
}

/// A short greedy answer to `question`, as text with the analysis and final channels named
/// (the end of the README's main job).
pub fn answer(dec: &mut Decoder, question: &str, max_new_tokens: usize) -> Result<(String, Verdict)> {
    let conv = Conversation { messages: vec![Message::new(Role::User, question)] };
    let prompt = render_prompt(conv, ReasoningEffort::Low)?;
    let cfg = GenConfig { sampling: super::sampler::Sampling::greedy(), seed: 0, max_new_tokens, stop: STOP.to_vec() };
    let g = generate(dec, &[prompt], &cfg, |_, _| {})?.remove(0);
    let c = completion::parse(&g.tokens);
    let text = if c.messages.iter().any(|m| m.channel.is_some()) {
        c.messages
            .iter()
            .map(|m| format!("[{}] {}", m.channel.as_deref().unwrap_or("?"), m.content))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        tokenizer::decode(&g.tokens)
    };
    Ok((text, c.verdict))
}
