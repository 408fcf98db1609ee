//! The canary set (DISTILL.md quality control): plain-text documents and natural prompts with
//! their answers that are evaluated and never trained on.
//!
//! A canary file is JSONL, one document a line: `{"text": "…"}` (a plain-text document) or
//! `{"messages": [...]}` (a Harmony conversation). `data/canary.jsonl`, written for this
//! repository, is the built-in set. Each text, and each message's content, is fingerprinted
//! twice: by its tokens (the o200k tokenizer) and by its normalised words (lowercase runs of
//! letters and digits; case, spacing, line breaks and punctuation ignored), the first and last of
//! each dropped so that the text's neighbours in a longer document cannot change them. A document
//! contains a canary document when its tokens contain a token fingerprint or its decoded text's
//! normalised words contain a word fingerprint. The set's hash is the SHA-256 of its file.

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
/// Symbols (tokens, or words) of the lookup key; a word fingerprint needs this many words after
/// its ends are dropped.
const KEY: usize = 6;

/// One canary document: its tokens and which of them are scored (`1`: its log-probability
/// counts, as the training render's loss mask; all of a text's after the first).
#[derive(Debug, Clone)]
pub struct Document {
    pub line: usize,
    pub kind: &'static str,
    pub tokens: Vec<u32>,
    pub scored: Vec<u8>,
}

/// How a document was found to contain a canary document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Its tokens contain the canary text's tokens.
    Exact,
    /// Its text contains the canary text up to case, spacing and punctuation.
    Normalised,
}

/// A canary document found in a dataset document: the canary file's line and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub line: usize,
    pub how: Match,
}

impl std::fmt::Display for Hit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.how {
            Match::Exact => write!(f, "{} (its exact tokens)", self.line),
            Match::Normalised => write!(f, "{} (its text up to case, spacing and punctuation)", self.line),
        }
    }
}

/// Fingerprints of one kind (token ids or word hashes), looked up by their first `KEY` symbols.
#[derive(Debug, Clone, Default)]
struct Prints {
    /// (canary line, the fingerprint).
    prints: Vec<(usize, Vec<u64>)>,
    index: HashMap<Vec<u64>, Vec<usize>>,
}

impl Prints {
    /// Adds `seq` less its first and last symbol; false when too short to recognise.
    fn add(&mut self, line: usize, seq: &[u64], min_len: usize) -> bool {
        if seq.len() < min_len.max(KEY + 2) {
            return false;
        }
        let f = seq[1..seq.len() - 1].to_vec();
        self.index.entry(f[..KEY].to_vec()).or_default().push(self.prints.len());
        self.prints.push((line, f));
        true
    }

    /// The line of the first fingerprint `seq` contains.
    fn found_in(&self, seq: &[u64]) -> Option<usize> {
        (0..seq.len().saturating_sub(KEY - 1)).find_map(|start| {
            let hits = self.index.get(&seq[start..start + KEY])?;
            hits.iter().map(|&i| &self.prints[i]).find(|(_, f)| seq[start..].starts_with(f)).map(|(line, _)| *line)
        })
    }
}

/// A text's normalised words: lowercase runs of letters and digits, each as a 64-bit FNV-1a hash.
pub fn words(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut h: Option<u64> = None;
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            let mut buf = [0u8; 4];
            let mut x = h.unwrap_or(0xcbf2_9ce4_8422_2325);
            for &b in c.encode_utf8(&mut buf).as_bytes() {
                x = (x ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
            h = Some(x);
        } else if let Some(x) = h.take() {
            out.push(x);
        }
    }
    out.extend(h);
    out
}

/// How [`Canary::check_dataset_remembered`] knew a dataset was clean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    Scanned,
    /// An earlier scan of the same files against the same set.
    Remembered,
}

#[derive(Debug, Clone)]
pub struct Canary {
    /// Where it came from (a path, or the built-in set).
    pub name: String,
    pub sha256: String,
    pub docs: Vec<Document>,
    tokens: Prints,
    words: Prints,
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
        let (mut docs, mut tokens, mut words) = (Vec::new(), Prints::default(), Prints::default());
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let at = format!("{name}:{}", i + 1);
            let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{at}: not JSON"))?;
            let (doc, texts) = match (&v["text"], &v["messages"]) {
                (serde_json::Value::String(t), serde_json::Value::Null) => {
                    let toks = tokenizer::encode(t);
                    let scored = (0..toks.len()).map(|k| u8::from(k > 0)).collect();
                    (Document { line: i + 1, kind: "text", tokens: toks, scored }, vec![t.clone()])
                }
                (serde_json::Value::Null, serde_json::Value::Array(_)) => {
                    let conv = harmony::parse_conversation(line)
                        .with_context(|| format!("{at}: not a Harmony conversation"))?;
                    let r = harmony::render_for_training(&conv, RenderConfig::default()).with_context(|| at.clone())?;
                    let texts = conv
                        .messages
                        .iter()
                        .flat_map(|m| &m.content)
                        .filter_map(|c| match c {
                            harmony::Content::Text(t) => Some(t.text.clone()),
                            _ => None,
                        })
                        .collect();
                    let doc = Document { line: i + 1, kind: "conversation", tokens: r.token_ids, scored: r.loss_mask };
                    (doc, texts)
                }
                _ => bail!("{at}: a canary document is {{\"text\": \"…\"}} or {{\"messages\": [...]}}"),
            };
            let mut recognisable = false;
            for t in &texts {
                let toks: Vec<u64> = tokenizer::encode(t).into_iter().map(u64::from).collect();
                if tokens.add(i + 1, &toks, MIN_TOKENS) {
                    words.add(i + 1, &self::words(t), 0);
                    recognisable = true;
                }
            }
            ensure!(
                recognisable,
                "{at}: too short to recognise in a dataset (a text or message of at least {MIN_TOKENS} tokens)"
            );
            docs.push(doc);
        }
        ensure!(!docs.is_empty(), "{name}: no canary documents");
        let sha256 = format!("{:x}", Sha256::digest(text.as_bytes()));
        Ok(Canary { name: name.into(), sha256, docs, tokens, words })
    }

    /// The first canary document that `tokens` contains: by its tokens, else by the normalised
    /// words of the decoded text.
    pub fn found_in(&self, tokens: &[u32]) -> Option<Hit> {
        let ids: Vec<u64> = tokens.iter().map(|&t| u64::from(t)).collect();
        if let Some(line) = self.tokens.found_in(&ids) {
            return Some(Hit { line, how: Match::Exact });
        }
        let line = self.words.found_in(&words(&tokenizer::decode(tokens)))?;
        Some(Hit { line, how: Match::Normalised })
    }

    /// Refuses a token dataset (anything `reader::Dataset::open` takes) that contains a canary
    /// document, naming the document of each.
    pub fn check_dataset(&self, path: &Path) -> Result<()> {
        self.check_dataset_remembered(path, None).map(drop)
    }

    /// [`Canary::check_dataset`], remembered under `cache`: a dataset found clean is not scanned
    /// again while this set and the dataset's token files (paths, sizes, modification times)
    /// are unchanged. A dataset with a canary document is scanned (and refused) every time.
    pub fn check_dataset_remembered(&self, path: &Path, cache: Option<&Path>) -> Result<Checked> {
        let stamp = match cache {
            Some(c) => Some(c.join(format!("{}.clean", self.dataset_key(path)?))),
            None => None,
        };
        if stamp.as_ref().is_some_and(|s| s.is_file()) {
            return Ok(Checked::Remembered);
        }
        self.scan_dataset(path)?;
        if let Some(s) = stamp {
            // A cache that cannot be written costs a rescan next time, nothing else.
            let _ = std::fs::create_dir_all(s.parent().expect("a file in the cache"))
                .and_then(|_| std::fs::write(&s, format!("{}\n{}\n", path.display(), self.name)));
        }
        Ok(Checked::Scanned)
    }

    /// This set and the dataset's token files, as one hash.
    fn dataset_key(&self, path: &Path) -> Result<String> {
        let ds = crate::reader::Dataset::open(path)?;
        let mut h = Sha256::new();
        // The detector: a new build may find what an older one missed.
        h.update(concat!("vpmoe-data ", env!("CARGO_PKG_VERSION")).as_bytes());
        h.update(format!("key {KEY}\0").as_bytes());
        h.update(self.sha256.as_bytes());
        for shard in &ds.shards {
            let prefix = shard.tokens.prefix();
            for f in [crate::indexed::bin_path(prefix), crate::indexed::idx_path(prefix)] {
                let m = std::fs::metadata(&f).with_context(|| format!("{}", f.display()))?;
                let when = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                // The inode and change time too: a copy that keeps modification times (cp -p,
                // rsync -t) or a file rebuilt in place to the same size is a new file here.
                use std::os::unix::fs::MetadataExt;
                let (ino, dev, ctime) = (m.ino(), m.dev(), (m.ctime(), m.ctime_nsec()));
                let abs = std::fs::canonicalize(&f).unwrap_or(f);
                h.update(format!("{}\0{}\0{when:?}\0{ino} {dev} {ctime:?}\0", abs.display(), m.len()).as_bytes());
            }
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    fn scan_dataset(&self, path: &Path) -> Result<()> {
        let ds = crate::reader::Dataset::open(path)?;
        for doc in 0..ds.n_docs() {
            let (shard, local) = ds.locate(doc);
            let tokens: Vec<u32> = ds.shards[shard].tokens.get::<i32>(local).into_iter().map(|t| t as u32).collect();
            if let Some(hit) = self.found_in(&tokens) {
                bail!(
                    "{}: document {doc} ({} document {local}) contains canary document {}:{hit}; \
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
        let exact = |line| Some(Hit { line, how: Match::Exact });
        assert_eq!(c.found_in(&tokenizer::encode(quoted)), exact(1));
        // An answer of the set inside a rendered conversation.
        let answer = "Probably not dead: yeast slows down a great deal in the cold. Move the dough somewhere warm, about 25 °C, and give it two or three hours. If it still does not rise, the yeast was old or the water too hot when you mixed it.";
        let mut toks = vec![tokenizer::START];
        toks.extend(tokenizer::encode(answer));
        toks.push(tokenizer::END);
        assert_eq!(c.found_in(&toks), exact(7));
        assert_eq!(
            c.found_in(&tokenizer::encode("The lighthouse keeper of a different point kept one logbook.")),
            None
        );
    }

    #[test]
    fn a_canary_text_retyped_with_other_case_spacing_and_punctuation_is_found() {
        let c = Canary::load(None).unwrap();
        // Document 1 rewrapped, recased and with typographic punctuation: no token sequence in
        // common long enough, the same words.
        let retyped = "Quoted: the LIGHTHOUSE keeper of Vessel Point   kept two logbooks —\nin the first he wrote the weather, the ships, and the hours the lamp burned… in the second (which nobody read until his granddaughter found it in a biscuit-tin) he wrote down every bird that struck the glass; its species when he could tell and a small drawing of its wings!";
        let toks = tokenizer::encode(retyped);
        assert_eq!(c.tokens.found_in(&toks.iter().map(|&t| u64::from(t)).collect::<Vec<_>>()), None);
        assert_eq!(c.found_in(&toks), Some(Hit { line: 1, how: Match::Normalised }));
        // The same words in another order, or a few of them, are not the document.
        assert_eq!(c.found_in(&tokenizer::encode("The lighthouse keeper kept two logbooks of Vessel Point.")), None);
        assert_eq!(words("Biscuit-TIN,  it's"), words("biscuit tin it s"));
        assert_ne!(words("biscuit tin"), words("biscuittin"));
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
