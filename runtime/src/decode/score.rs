//! `vpmoe-rt score`: the student's log-probability of every token of given sequences (and,
//! optionally, its top-k alternatives), the student's analogue of a teacher server's prompt
//! log-probabilities. A sequence is prefilled through the decoder in chunks, asking for the
//! logits after every token, so the numbers are the training forward's bit for bit.
//!
//! An input line is `{"tokens": [ids]}`, a JSON string (plain text, encoded with the o200k
//! tokenizer) or a Harmony conversation `{"messages": [...]}` (rendered as for training, so a
//! trailing final answer ends `<|return|>`; its span ids come with the scores).

use super::sampler::ranked;
use super::{Decoder, Tok};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use vpmoe_data::harmony::{self, RenderConfig};
use vpmoe_data::tokenizer::{self, VOCAB_SIZE};
use vpmoe_ir::reference::row_lse;

/// One sequence to score.
pub struct Input {
    pub line: usize,
    pub tokens: Vec<u32>,
    /// Span ids (1 reasoning, 2 final) of a rendered conversation.
    pub span_id: Option<Vec<u8>>,
}

/// Reads an input file (JSONL); every bad line is an error naming it. Text and conversations
/// need the o200k vocabulary; token ids must fit `vocab` and the sequence the context.
pub fn read_inputs(path: &Path, vocab: u64, max_len: usize) -> Result<Vec<Input>> {
    let mut out = Vec::new();
    for (line_no, at, line) in crate::jsonl_lines(path, "sequences to score")? {
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("{at}: not JSON"))?;
        let harmony_vocab = || {
            ensure!(
                vocab == VOCAB_SIZE as u64,
                "{at}: text is encoded with the o200k_harmony tokenizer ({VOCAB_SIZE} ids); the model's vocabulary has {vocab}"
            );
            Ok(())
        };
        let (tokens, span_id) = match &v {
            serde_json::Value::String(s) => {
                harmony_vocab()?;
                (tokenizer::encode(s), None)
            }
            serde_json::Value::Object(o) if o.contains_key("tokens") => {
                let ids = o["tokens"].as_array().with_context(|| format!("{at}: \"tokens\" is not an array"))?;
                let tokens = ids
                    .iter()
                    .enumerate()
                    .map(|(k, x)| match x.as_u64() {
                        Some(t) if t < vocab => Ok(t as u32),
                        _ => bail!("{at}: token {k} ({x}) is not an id below the vocabulary size {vocab}"),
                    })
                    .collect::<Result<Vec<u32>>>()?;
                (tokens, None)
            }
            serde_json::Value::Object(_) => {
                harmony_vocab()?;
                let conv = harmony::parse_conversation(&line)
                    .with_context(|| format!("{at}: not {{\"tokens\": [...]}} nor a Harmony conversation"))?;
                let r = harmony::render_for_training(&conv, RenderConfig::default()).with_context(|| at.clone())?;
                (r.token_ids, Some(r.span_id))
            }
            _ => {
                bail!("{at}: a line is {{\"tokens\": [...]}}, a JSON string or a {{\"messages\": [...]}} conversation")
            }
        };
        ensure!(!tokens.is_empty(), "{at}: no tokens");
        ensure!(tokens.len() <= max_len, "{at}: {} tokens; the context holds {max_len}", tokens.len());
        out.push(Input { line: line_no, tokens, span_id });
    }
    Ok(out)
}

/// The scores of one sequence: `logprobs[t]` is `log p(tokens[t] | tokens[..t])` (none for the
/// first token), `top[t]` the `k` most likely tokens at position `t` with theirs.
#[derive(Debug, Serialize)]
pub struct Scored {
    pub logprobs: Vec<Option<f32>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<Vec<(u32, f32)>>,
}

/// Scores `tokens` in slot 0 of `dec` (which is then released), at most 64 Mi logits a step.
pub fn score(dec: &mut Decoder, tokens: &[u32], top_k: usize) -> Result<Scored> {
    let chunk = ((1usize << 26) / dec.vocab()).max(1);
    score_in_chunks(dec, tokens, top_k, chunk)
}

/// [`score`], prefilling `chunk` tokens a step.
pub fn score_in_chunks(dec: &mut Decoder, tokens: &[u32], top_k: usize, chunk: usize) -> Result<Scored> {
    ensure!(chunk > 0, "a chunk of at least one token");
    let v = dec.vocab();
    let mut logprobs = vec![None];
    let mut top = if top_k > 0 { vec![Vec::new()] } else { Vec::new() }; // nothing predicts token 0
    for (c, part) in tokens.chunks(chunk).enumerate() {
        let toks: Vec<Tok> = part
            .iter()
            .enumerate()
            .map(|(i, &token)| {
                let pos = c * chunk + i;
                Tok { slot: 0, pos, token, logits: pos + 1 < tokens.len() }
            })
            .collect();
        if !toks.iter().any(|t| t.logits) {
            break; // a last chunk of one token predicts nothing
        }
        let logits = match dec.step(&toks) {
            Ok(l) => l,
            Err(e) => {
                dec.release(0);
                return Err(e);
            }
        };
        // Row r follows token c·chunk + r and predicts the next one.
        for (r, row) in logits.chunks(v).enumerate() {
            let next = tokens[c * chunk + r + 1];
            let lse = row_lse(row);
            logprobs.push(Some((row[next as usize] as f64 - lse) as f32));
            if top_k > 0 {
                top.push(top_tokens(row, top_k, lse));
            }
        }
    }
    dec.release(0);
    Ok(Scored { logprobs, top })
}

/// The `k` most likely tokens of a row, with their log-probabilities.
fn top_tokens(row: &[f32], k: usize, lse: f64) -> Vec<(u32, f32)> {
    ranked(row, k).into_iter().map(|t| (t as u32, (row[t] as f64 - lse) as f32)).collect()
}

/// Scores every input and writes JSONL to `out` (through a temporary file).
pub fn score_to_file(
    dec: &mut Decoder,
    inputs: &[Input],
    top_k: usize,
    out: &Path,
    mut progress: impl FnMut(usize),
) -> Result<usize> {
    #[derive(Serialize)]
    struct Record<'a> {
        line: usize,
        tokens: &'a [u32],
        #[serde(skip_serializing_if = "Option::is_none")]
        span_id: Option<&'a [u8]>,
        #[serde(flatten)]
        scored: Scored,
    }
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let mut total = 0;
    {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        for inp in inputs {
            let scored = score(dec, &inp.tokens, top_k).with_context(|| format!("line {}", inp.line))?;
            total += inp.tokens.len();
            let rec = Record { line: inp.line, tokens: &inp.tokens, span_id: inp.span_id.as_deref(), scored };
            serde_json::to_writer(&mut w, &rec)?;
            w.write_all(b"\n")?;
            progress(inp.tokens.len());
        }
        w.flush()?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(total)
}
