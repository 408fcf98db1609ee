//! `vpmoe-rt sample`, `vpmoe-rt chat` and `vpmoe-rt score`.

use crate::cli::{decoder, plan_of, ChatArgs, ModelArgs, SampleArgs, SamplingArgs, StudentScoreArgs};
use anyhow::{bail, Result};
use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;
use vpmoe_data::completion;
use vpmoe_data::harmony::{Conversation, Message, Role};
use vpmoe_data::tokenizer;
use vpmoe_runtime::decode::sample::{
    load_checkpoint, read_prompts, render_prompt, require_harmony, sample_to_file, STOP,
};
use vpmoe_runtime::decode::sampler::Sampling;
use vpmoe_runtime::decode::score::{read_inputs, score_to_file};
use vpmoe_runtime::decode::{generate, GenConfig};
use vpmoe_runtime::state::TrainState;

/// The model of a `sample`, `chat` or `score` run: its graph, plan and checkpoint state.
fn load(m: &ModelArgs) -> Result<(vpmoe_ir::Graph, vpmoe_compiler::Plan, std::path::PathBuf, TrainState)> {
    let (graph, plan) = plan_of(m.plan.clone(), m.arch.clone())?;
    let (dir, state) = load_checkpoint(&m.checkpoint, &plan)?;
    Ok((graph, plan, dir, state))
}

pub(crate) fn run_score(a: StudentScoreArgs) -> Result<()> {
    let (graph, plan, dir, state) = load(&a.model)?;
    let inputs = read_inputs(&a.input, plan.arch.vocab, plan.arch.max_seq as usize)?;
    let total: usize = inputs.iter().map(|i| i.tokens.len()).sum();
    println!(
        "score {} sequences ({total} tokens) from {} with {} (step {}) · backend {}",
        inputs.len(),
        a.input.display(),
        dir.display(),
        state.step,
        a.model.backend.name()
    );
    let mut dec = decoder(a.model.backend, &graph, &plan, &state, a.model.plan.as_deref(), 1)?;
    let bar = vpmoe_data::progress_bar(total as u64, "tokens", true);
    let t0 = Instant::now();
    score_to_file(&mut dec, &inputs, a.top_k, &a.out, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    println!("{total} tokens in {secs:.1} s ({:.0} tokens/s) -> {}", total as f64 / secs.max(1e-9), a.out.display());
    Ok(())
}

fn gen_config(s: &SamplingArgs) -> Result<GenConfig> {
    let sampling = Sampling { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p };
    sampling.validate()?;
    Ok(GenConfig { sampling, seed: s.seed, max_new_tokens: s.max_new_tokens, stop: STOP.to_vec() })
}

pub(crate) fn run_sample(a: SampleArgs) -> Result<()> {
    let cfg = gen_config(&a.sampling)?;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let prompts = read_prompts(&a.prompts, a.sampling.reasoning_effort)?;
    let (graph, plan, dir, state) = load(&a.model)?;
    require_harmony(&plan)?;
    let slots = a.batch.min(prompts.len());
    println!(
        "sample {} prompts from {} with {} (step {}) · backend {} · batch {slots}",
        prompts.len(),
        a.prompts.display(),
        dir.display(),
        state.step,
        a.model.backend.name()
    );
    let mut dec = decoder(a.model.backend, &graph, &plan, &state, a.model.plan.as_deref(), slots)?;
    let bar = vpmoe_data::progress_bar((prompts.len() * cfg.max_new_tokens) as u64, "tokens", true);
    let t0 = Instant::now();
    let summary = sample_to_file(&mut dec, &prompts, &cfg, &a.out, || bar.inc(1))?;
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

/// Prints a reply as it is sampled: each message's new text, the analysis channel (and any other
/// but final) dimmed on a terminal.
struct Shown {
    ansi: bool,
    message: usize,
    chars: usize,
}

impl Shown {
    fn update(&mut self, tokens: &[u32], out: &mut impl Write) -> std::io::Result<()> {
        let c = completion::parse(tokens);
        for (i, m) in c.messages.iter().enumerate().skip(self.message) {
            if i > self.message {
                self.end(out)?;
                self.message = i;
                self.chars = 0;
            }
            let dim = m.channel.as_deref() != Some("final");
            if self.chars == 0 {
                if self.ansi && dim {
                    write!(out, "\x1b[2m")?;
                }
                write!(out, "[{}] ", m.channel.as_deref().unwrap_or("?"))?;
            }
            // A character split across tokens shows once it is whole.
            let text = m.content.trim_end_matches('\u{fffd}');
            let new: String = text.chars().skip(self.chars).collect();
            self.chars += new.chars().count();
            write!(out, "{new}")?;
        }
        out.flush()
    }
    fn end(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.ansi {
            write!(out, "\x1b[0m")?;
        }
        writeln!(out)
    }
}

pub(crate) fn run_chat(a: ChatArgs) -> Result<()> {
    let mut cfg = gen_config(&a.sampling)?;
    let (graph, plan, dir, state) = load(&a.model)?;
    require_harmony(&plan)?;
    let mut dec = decoder(a.model.backend, &graph, &plan, &state, a.model.plan.as_deref(), 1)?;
    let ansi = std::io::stdout().is_terminal();
    let interactive = std::io::stdin().is_terminal();
    println!(
        "chat with {} (step {}) · {} tokens of context · /reset starts over, /quit leaves",
        dir.display(),
        state.step,
        dec.max_len()
    );
    let mut conv = Conversation { messages: Vec::new() };
    let mut turn = 0u64;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            print!("> ");
            std::io::stdout().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                conv.messages.clear();
                println!("(a new conversation)");
                continue;
            }
            _ => {}
        }
        conv.messages.push(Message::new(Role::User, text));
        let prompt = render_prompt(conv.clone(), a.sampling.reasoning_effort)?;
        if prompt.len() >= dec.max_len() {
            conv.messages.pop();
            println!(
                "(the conversation is {} tokens; the context holds {}: /reset starts over)",
                prompt.len(),
                dec.max_len()
            );
            continue;
        }
        cfg.seed = a.sampling.seed.wrapping_add(turn);
        turn += 1;
        let mut shown = Shown { ansi, message: 0, chars: 0 };
        let mut tokens = Vec::new();
        let mut stdout = std::io::stdout();
        let g = generate(&mut dec, &[prompt], &cfg, |_, t| {
            tokens.push(t);
            let _ = shown.update(&tokens, &mut stdout);
        })?
        .remove(0);
        shown.end(&mut stdout)?;
        let c = completion::parse(&g.tokens);
        if let Some(why) = &c.verdict.why {
            println!("(not valid Harmony: {why})");
        }
        // Harmony keeps a turn's final answer in the history, not its analysis.
        let answer = c.messages.iter().rev().find(|m| m.channel.as_deref() == Some("final"));
        let content = answer.map_or_else(|| tokenizer::decode(&g.tokens), |m| m.content.clone());
        conv.messages.push(Message::new(Role::Assistant, content).with_channel("final"));
    }
    Ok(())
}
