//! The canary set (DISTILL.md quality control): plain-text documents and natural prompts with
//! their answers that are evaluated and never trained on.
//!
//! A canary file is JSONL, one document a line: `{"text": "…"}` (a plain-text document) or
//! `{"messages": [...]}` (a Harmony conversation). `data/canary.jsonl`, written for this
//! repository, is the built-in set. Each text, and each message's content, is fingerprinted by
//! its tokens (the o200k tokenizer), the first and last dropped so that the text's neighbours in a
//! longer document cannot change them; a token sequence that contains a fingerprint contains that
//! canary document. The set's hash is the SHA-256 of its file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use crate::harmony::{self, RenderConfig};
use crate::tokenizer;

/// The built-in set.
pub const BUILT_IN: &str = include_str!("../canary.jsonl");
/// Fingerprints need this many tokens (the content's own, before the ends are dropped).
pub const MIN_TOKENS: usize = 10;
/// Tokens of the lookup key.
const KEY: usize = 8;

/// One canary document: its tokens, which of them are scored (`1`: its log-probability counts,
/// as the training render's loss mask; all of a text's after the first), and its fingerprints.
#[derive(Debug, Clone)]
pub struct Document {
    pub line: usize,
    pub kind: &'static str,
    pub tokens: Vec<u32>,
    pub scored: Vec<u8>,
    fingerprints: Vec<Vec<u32>>,
}

#[derive(Debug, Clone)]
pub struct Canary {
    /// Where it came from (a path, or the built-in set).
    pub name: String,
    pub sha256: String,
    pub docs: Vec<Document>,
    /// First `KEY` tokens of a fingerprint → (document, fingerprint).
    index: HashMap<Vec<u32>, Vec<(usize, usize)>>,
}

impl Canary {
    /// The set in `path`, or the built-in one.
    pub fn load(path: Option<&Path>) -> Result<Canary> {
        match path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("reading the canary set {}", p.display()))?;
                Canary::parse(&p.display().to_string(), &text)
            }
            None => Canary::parse("the built-in canary set (data/canary.jsonl)", BUILT_IN),
        }
    }

    /// Parses a canary file; a bad line is an error naming it.
    pub fn parse(name: &str, text: &str) -> Result<Canary> {
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let at = format!("{name}:{}", i + 1);
            let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{at}: not JSON"))?;
            let doc = match (&v["text"], &v["messages"]) {
                (serde_json::Value::String(t), serde_json::Value::Null) => {
                    let tokens = tokenizer::encode(t);
                    let scored = (0..tokens.len()).map(|k| u8::from(k > 0)).collect();
                    Document { line: i + 1, kind: "text", fingerprints: vec![tokens.clone()], tokens, scored }
                }
                (serde_json::Value::Null, serde_json::Value::Array(_)) => {
                    let conv = harmony::parse_conversation(line)
                        .with_context(|| format!("{at}: not a Harmony conversation"))?;
                    let r = harmony::render_for_training(&conv, RenderConfig::default()).with_context(|| at.clone())?;
                    let fingerprints = conv
                        .messages
                        .iter()
                        .flat_map(|m| &m.content)
                        .filter_map(|c| match c {
                            harmony::Content::Text(t) => Some(tokenizer::encode(&t.text)),
                            _ => None,
                        })
                        .collect();
                    Document {
                        line: i + 1,
                        kind: "conversation",
                        tokens: r.token_ids,
                        scored: r.loss_mask,
                        fingerprints,
                    }
                }
                _ => bail!("{at}: a canary document is {{\"text\": \"…\"}} or {{\"messages\": [...]}}"),
            };
            ensure!(
                doc.fingerprints.iter().any(|f| f.len() >= MIN_TOKENS),
                "{at}: too short to recognise in a dataset (a text or message of at least {MIN_TOKENS} tokens)"
            );
            docs.push(doc);
        }
        ensure!(!docs.is_empty(), "{name}: no canary documents");
        let mut index: HashMap<Vec<u32>, Vec<(usize, usize)>> = HashMap::new();
        for (d, doc) in docs.iter_mut().enumerate() {
            doc.fingerprints.retain(|f| f.len() >= MIN_TOKENS);
            for f in &mut doc.fingerprints {
                *f = f[1..f.len() - 1].to_vec();
            }
            for (k, f) in doc.fingerprints.iter().enumerate() {
                index.entry(f[..KEY].to_vec()).or_default().push((d, k));
            }
        }
        let sha256 = format!("{:x}", Sha256::digest(text.as_bytes()));
        Ok(Canary { name: name.into(), sha256, docs, index })
    }

    /// The line of the first canary document that `tokens` contains.
    pub fn found_in(&self, tokens: &[u32]) -> Option<usize> {
        for start in 0..tokens.len().saturating_sub(KEY - 1) {
            if let Some(hits) = self.index.get(&tokens[start..start + KEY]) {
                for &(d, k) in hits {
                    let f = &self.docs[d].fingerprints[k];
                    if tokens[start..].starts_with(f) {
                        return Some(self.docs[d].line);
                    }
                }
            }
        }
        None
    }

    /// Refuses a token dataset (anything `reader::Dataset::open` takes) that contains a canary
    /// document, naming the document of each.
    pub fn check_dataset(&self, path: &Path) -> Result<()> {
        let ds = crate::reader::Dataset::open(path)?;
        for doc in 0..ds.n_docs() {
            let (shard, local) = ds.locate(doc);
            let tokens: Vec<u32> = ds.shards[shard].tokens.get::<i32>(local).into_iter().map(|t| t as u32).collect();
            if let Some(line) = self.found_in(&tokens) {
                bail!(
                    "{}: document {doc} ({} document {local}) contains canary document {}:{line}; \
                     the canary set is never trained on",
                    path.display(),
                    ds.shards[shard].tokens.prefix().display(),
                    self.name
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_set_parses_and_is_found_inside_longer_text() {
        let c = Canary::load(None).unwrap();
        assert_eq!(c.docs.len(), 8);
        assert!(c.docs.iter().any(|d| d.kind == "conversation") && c.docs.iter().any(|d| d.kind == "text"));
        // A canary text quoted inside a longer document is found; the rest of the set is not.
        let quoted = "Notes from the archive. The lighthouse keeper of Vessel Point kept two logbooks. In the first he wrote the weather, the ships and the hours the lamp burned; in the second, which nobody read until his granddaughter found it in a biscuit tin, he wrote down every bird that struck the glass, its species when he could tell, and a small drawing of its wings. End of notes.";
        assert_eq!(c.found_in(&tokenizer::encode(quoted)), Some(1));
        // An answer of the set inside a rendered conversation.
        let answer = "Probably not dead: yeast slows down a great deal in the cold. Move the dough somewhere warm, about 25 °C, and give it two or three hours. If it still does not rise, the yeast was old or the water too hot when you mixed it.";
        let mut toks = vec![tokenizer::START];
        toks.extend(tokenizer::encode(answer));
        toks.push(tokenizer::END);
        assert_eq!(c.found_in(&toks), Some(7));
        assert_eq!(
            c.found_in(&tokenizer::encode("The lighthouse keeper of a different point kept one logbook.")),
            None
        );
    }

    #[test]
    fn bad_canary_files_are_refused_by_line() {
        let bad = |text: &str, want: &str| {
            let e = format!("{:#}", Canary::parse("c.jsonl", text).unwrap_err());
            assert!(e.contains(want), "{e}");
        };
        bad("{\"text\": \"a b\"}\n", "c.jsonl:1: too short");
        bad("\n{oops\n", "c.jsonl:2: not JSON");
        bad("{\"prompt\": \"x\"}\n", "c.jsonl:1: a canary document is");
        bad("", "no canary documents");
    }
}
