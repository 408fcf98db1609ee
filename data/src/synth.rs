//! PleIAs/SYNTH rows → Harmony conversations → label-aligned training documents.
//!
//! Mapping (DATA.md §3): every conversation opens with the pinned system message (reasoning
//! effort configurable); `query` → user (for `exercise == "rag"` rows the retrieved sources in
//! `constraints` are appended after a blank line); `synthetic_reasoning` → assistant
//! `analysis` (a null or empty trace gives an analysis message with empty content, so every
//! document has the same analysis-then-final shape); `synthetic_answer` → assistant `final`,
//! ended with `<|return|>`. Rows without `synth_id`, `query` or `synthetic_answer` (null or
//! blank) are invalid and rejected by `synth_id`.
//!
//! A document is the training render followed by EOD (`<|endoftext|>`, 199999). Its masks are
//! label-aligned (D7): stored `mask[t]` is the token mask of `t + 1`, the last entry 0, so the
//! `<|return|>` position (predicting EOD) and the EOD position carry 0.
//!
//! Overlong documents (more than `seq_len + 1` tokens including EOD) get structured truncation
//! (D8): the final message is kept whole, then a suffix of the analysis content, then a suffix
//! of the latest user content (headers always kept); a row whose system + wrappers + final
//! alone do not fit is dropped and counted.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::{Array, LargeStringArray, RecordBatch, StringArray, StringViewArray};
use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};

use crate::harmony::{self, Conversation, Message, MessageTokens, ReasoningEffort, Role, SystemContent};
use crate::tokenizer::{EOD, RETURN};

/// The SYNTH columns vpmoe reads (others are ignored and never decoded); every one must be
/// present but `language`, which is metadata only.
pub const COLUMNS: [&str; 7] =
    ["synth_id", "language", "exercise", "query", "constraints", "synthetic_reasoning", "synthetic_answer"];

/// The fields of one SYNTH row that the mapping uses (all nullable).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SynthRow {
    pub synth_id: Option<String>,
    pub language: Option<String>,
    pub exercise: Option<String>,
    pub query: Option<String>,
    pub constraints: Option<String>,
    pub synthetic_reasoning: Option<String>,
    pub synthetic_answer: Option<String>,
}

/// The pinned system message with the given reasoning effort.
pub fn system_content(effort: ReasoningEffort) -> SystemContent {
    SystemContent { reasoning_effort: Some(effort), ..SystemContent::default() }
}

/// The tokens of the pinned system message (`<|start|>system<|message|>…<|end|>`): every
/// SYNTH document starts with them, so they identify its reasoning effort.
pub fn system_prefix(effort: ReasoningEffort) -> Result<Vec<i32>> {
    let m = harmony::render_message(0, &Message::system(system_content(effort)), false)?;
    Ok(m.header.iter().chain(&m.content).chain([&m.end]).map(|&t| t as i32).collect())
}

/// A SYNTH row borrowed from a record batch (no copies on the build path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowRef<'a> {
    pub synth_id: Option<&'a str>,
    pub language: Option<&'a str>,
    pub exercise: Option<&'a str>,
    pub query: Option<&'a str>,
    pub constraints: Option<&'a str>,
    pub synthetic_reasoning: Option<&'a str>,
    pub synthetic_answer: Option<&'a str>,
}

fn present_ref(s: Option<&str>) -> Option<&str> {
    s.filter(|t| !t.trim().is_empty())
}

/// The validated parts of a row: user text, reasoning, answer.
pub struct RowTexts<'a> {
    pub user: std::borrow::Cow<'a, str>,
    pub reasoning: &'a str,
    pub answer: &'a str,
}

impl<'a> RowRef<'a> {
    /// Validate and pick the texts (the mapping rules of the module docs).
    pub fn texts(&self) -> Result<RowTexts<'a>, String> {
        if present_ref(self.synth_id).is_none() {
            return Err("missing synth_id".into());
        }
        let query = present_ref(self.query).ok_or("missing query")?;
        let answer = present_ref(self.synthetic_answer).ok_or("missing synthetic_answer")?;
        let mut user = std::borrow::Cow::Borrowed(query);
        if self.exercise.map(str::trim) == Some("rag") {
            if let Some(src) = present_ref(self.constraints) {
                user = std::borrow::Cow::Owned(format!("{query}\n\n{src}"));
            }
        }
        Ok(RowTexts { user, reasoning: self.synthetic_reasoning.unwrap_or_default(), answer })
    }
}

impl SynthRow {
    /// Borrow as a [`RowRef`].
    pub fn as_ref(&self) -> RowRef<'_> {
        RowRef {
            synth_id: self.synth_id.as_deref(),
            language: self.language.as_deref(),
            exercise: self.exercise.as_deref(),
            query: self.query.as_deref(),
            constraints: self.constraints.as_deref(),
            synthetic_reasoning: self.synthetic_reasoning.as_deref(),
            synthetic_answer: self.synthetic_answer.as_deref(),
        }
    }

    /// Validate and map to a conversation. The error is the rejection reason.
    pub fn to_conversation(&self, effort: ReasoningEffort) -> Result<Conversation, String> {
        let msgs = self.messages()?;
        let mut messages = vec![Message::system(system_content(effort))];
        messages.extend(msgs);
        Ok(Conversation { messages })
    }

    /// The user, analysis and final messages (without the system message).
    pub fn messages(&self) -> Result<[Message; 3], String> {
        let t = self.as_ref().texts()?;
        Ok([
            Message::new(Role::User, t.user.into_owned()),
            Message::new(Role::Assistant, t.reasoning).with_channel("analysis"),
            Message::new(Role::Assistant, t.answer).with_channel("final"),
        ])
    }
}

/// A label-aligned training document (tokens end with EOD).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Document {
    pub tokens: Vec<i32>,
    pub lossmask: Vec<u8>,
    pub span: Vec<u8>,
}

impl Document {
    /// Concatenate rendered messages, append EOD and shift the masks to label alignment.
    pub fn from_messages(msgs: &[MessageTokens]) -> Document {
        let n: usize = msgs.iter().map(MessageTokens::len).sum::<usize>() + 1;
        let mut d =
            Document { tokens: Vec::with_capacity(n), lossmask: Vec::with_capacity(n), span: Vec::with_capacity(n) };
        for m in msgs {
            d.tokens.extend(m.header.iter().map(|&t| t as i32));
            d.tokens.extend(m.content.iter().map(|&t| t as i32));
            d.tokens.push(m.end as i32);
            let len = d.tokens.len();
            d.lossmask.resize(len, m.loss());
            d.span.resize(len, m.span());
        }
        d.tokens.push(EOD as i32);
        // Label alignment: stored[t] = token_mask[t + 1]; the EOD's own token mask is 0, and
        // the last stored entry is padded with 0.
        if !d.lossmask.is_empty() {
            d.lossmask.remove(0);
            d.span.remove(0);
        }
        d.lossmask.extend([0, 0]);
        d.span.extend([0, 0]);
        d.lossmask.truncate(n);
        d.span.truncate(n);
        d
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Result of fitting rendered messages into a token budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    /// Unchanged.
    Whole,
    /// Structured truncation applied.
    Truncated,
    /// Cannot fit; the reason.
    Dropped(String),
}

/// Structured truncation (D8) of a rendered training conversation to at most `budget` tokens
/// (EOD not included). Keeps leading system/developer messages, the latest user message, the
/// analysis right before the trailing final, and the final; content is cut from the left,
/// analysis before user.
pub fn fit(msgs: &mut Vec<MessageTokens>, budget: usize) -> Fit {
    let total: usize = msgs.iter().map(MessageTokens::len).sum();
    if total <= budget {
        return Fit::Whole;
    }
    let Some(f) = msgs.iter().rposition(|m| m.role == Role::Assistant && m.channel.as_deref() == Some("final")) else {
        return Fit::Dropped("overlong and has no final message".into());
    };
    let a = (f > 0 && msgs[f - 1].role == Role::Assistant && msgs[f - 1].channel.as_deref() == Some("analysis"))
        .then(|| f - 1);
    let before = a.unwrap_or(f);
    let u = msgs[..before].iter().rposition(|m| m.role == Role::User);
    let prefix_end = msgs
        .iter()
        .position(|m| !matches!(m.role, Role::System | Role::Developer))
        .unwrap_or(msgs.len())
        .min(u.unwrap_or(before));
    let mut keep: Vec<usize> = (0..prefix_end).collect();
    keep.extend(u);
    keep.extend(a);
    keep.push(f);
    let wrapper = |m: &MessageTokens| m.header.len() + 1;
    let fixed: usize = (0..prefix_end).map(|i| msgs[i].len()).sum::<usize>()
        + u.map_or(0, |i| wrapper(&msgs[i]))
        + a.map_or(0, |i| wrapper(&msgs[i]))
        + msgs[f].len();
    if fixed > budget {
        return Fit::Dropped(format!("final message and wrappers need {fixed} tokens, more than the budget {budget}"));
    }
    let mut room = budget - fixed;
    for i in a.into_iter().chain(u) {
        let c = &mut msgs[i].content;
        let k = c.len().min(room);
        c.drain(..c.len() - k);
        room -= k;
    }
    let mut kept: Vec<MessageTokens> = Vec::with_capacity(keep.len());
    for (i, m) in std::mem::take(msgs).into_iter().enumerate() {
        if keep.contains(&i) {
            kept.push(m);
        }
    }
    *msgs = kept;
    Fit::Truncated
}

/// Renders SYNTH rows; the system message is rendered once.
#[derive(Debug, Clone)]
pub struct SynthRenderer {
    system: MessageTokens,
    /// Maximum document length in tokens, EOD included (`seq_len + 1`).
    max_doc_tokens: usize,
}

/// What became of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    Doc {
        doc: Document,
        truncated: bool,
    },
    /// Invalid input row (reason).
    Rejected(String),
    /// Valid but cannot fit the sequence length (reason).
    Dropped(String),
}

impl SynthRenderer {
    pub fn new(effort: ReasoningEffort, seq_len: usize) -> Result<Self> {
        let system = harmony::render_message(0, &Message::system(system_content(effort)), false)?;
        Ok(SynthRenderer { system, max_doc_tokens: seq_len + 1 })
    }

    /// Map, validate, render, truncate and label-align one row.
    pub fn process(&self, row: &SynthRow) -> RowOutcome {
        self.process_ref(&row.as_ref())
    }

    /// [`SynthRenderer::process`] on a borrowed row. Renders the user/analysis/final messages
    /// directly from the texts (the same tokens as [`harmony::render_message`], checked by
    /// tests) without building [`Message`] values.
    pub fn process_ref(&self, row: &RowRef<'_>) -> RowOutcome {
        let t = match row.texts() {
            Ok(t) => t,
            Err(e) => return RowOutcome::Rejected(e),
        };
        let mut rendered = Vec::with_capacity(4);
        rendered.push(self.system.clone());
        rendered.push(text_message(1, Role::User, None, &t.user));
        rendered.push(text_message(2, Role::Assistant, Some("analysis"), t.reasoning));
        let mut fin = text_message(3, Role::Assistant, Some("final"), t.answer);
        fin.end = RETURN;
        rendered.push(fin);
        let truncated = match fit(&mut rendered, self.max_doc_tokens - 1) {
            Fit::Whole => false,
            Fit::Truncated => true,
            Fit::Dropped(why) => return RowOutcome::Dropped(why),
        };
        RowOutcome::Doc { doc: Document::from_messages(&rendered), truncated }
    }
}

/// A message with one text item, no name/recipient/content type (the SYNTH shapes).
fn text_message(index: usize, role: Role, channel: Option<&str>, text: &str) -> MessageTokens {
    let mut header = Vec::with_capacity(6);
    header.push(crate::tokenizer::START);
    crate::tokenizer::encode_into(role.as_str(), &mut header);
    if let Some(ch) = channel {
        header.push(crate::tokenizer::CHANNEL);
        crate::tokenizer::encode_into(ch, &mut header);
    }
    header.push(crate::tokenizer::MESSAGE);
    let mut content = Vec::new();
    crate::tokenizer::encode_into(text, &mut content);
    MessageTokens {
        index,
        role,
        channel: channel.map(str::to_string),
        recipient: None,
        content_type: None,
        header,
        content,
        end: crate::tokenizer::END,
    }
}

/// Split rule: `valid` iff the big-endian u64 of blake2b-8(synth_id) is below the threshold.
pub fn blake2b8(synth_id: &str) -> u64 {
    let mut h = Blake2bVar::new(8).expect("8 is a valid blake2b output size");
    h.update(synth_id.as_bytes());
    let mut out = [0u8; 8];
    h.finalize_variable(&mut out).expect("8-byte buffer");
    u64::from_be_bytes(out)
}

/// A validation fraction, kept as its decimal text so the threshold is exact
/// (`⌊fraction · 2⁶⁴⌋`, as Python's `Decimal` computes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidFraction {
    pub text: String,
    pub threshold: u128,
}

impl std::str::FromStr for ValidFraction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || format!("valid fraction must be a decimal number in [0, 1], got {s:?}");
        let (int, frac) = t.split_once('.').unwrap_or((t, ""));
        if int.is_empty() && frac.is_empty()
            || !int.chars().all(|c| c.is_ascii_digit())
            || !frac.chars().all(|c| c.is_ascii_digit())
        {
            return Err(bad());
        }
        let frac = frac.trim_end_matches('0');
        if frac.len() > 18 {
            return Err(format!("valid fraction {s:?} has more than 18 decimals"));
        }
        let int: u128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
        let scale = 10u128.pow(frac.len() as u32);
        let num = int * scale + if frac.is_empty() { 0 } else { frac.parse::<u128>().map_err(|_| bad())? };
        if num > scale {
            return Err(bad());
        }
        Ok(ValidFraction { text: t.to_string(), threshold: (num << 64) / scale })
    }
}

impl ValidFraction {
    pub fn is_valid(&self, synth_id: &str) -> bool {
        u128::from(blake2b8(synth_id)) < self.threshold
    }
}

/// Column accessor over the string array types parquet may decode to.
enum StrCol<'a> {
    Utf8(&'a StringArray),
    Large(&'a LargeStringArray),
    View(&'a StringViewArray),
    /// A dictionary-encoded column (what pyarrow writes for categorical data, with any key
    /// type): row i is `values[keys[i]]`, null where the key is.
    Dict {
        array: &'a dyn Array,
        keys: Vec<usize>,
        values: Box<StrCol<'a>>,
    },
    Missing,
}

impl<'a> StrCol<'a> {
    fn of(batch: &'a RecordBatch, name: &str) -> Result<Self> {
        let Some(col) = batch.column_by_name(name) else {
            return Ok(StrCol::Missing);
        };
        Self::array(col.as_ref()).with_context(|| {
            format!("column {name:?} has type {}, expected a string or a dictionary of strings", col.data_type())
        })
    }
    fn array(col: &'a dyn Array) -> Option<Self> {
        let any = col.as_any();
        if let Some(a) = any.downcast_ref::<StringArray>() {
            Some(StrCol::Utf8(a))
        } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
            Some(StrCol::Large(a))
        } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
            Some(StrCol::View(a))
        } else if let Some(d) = col.as_any_dictionary_opt() {
            let values = Box::new(Self::array(d.values().as_ref())?);
            // `normalized_keys` panics on an empty dictionary, whose keys are all null.
            let keys = if d.values().is_empty() { Vec::new() } else { d.normalized_keys() };
            Some(StrCol::Dict { array: col, keys, values })
        } else {
            None
        }
    }
    fn get_ref(&self, i: usize) -> Option<&'a str> {
        match self {
            StrCol::Utf8(a) => (!a.is_null(i)).then(|| a.value(i)),
            StrCol::Large(a) => (!a.is_null(i)).then(|| a.value(i)),
            StrCol::View(a) => (!a.is_null(i)).then(|| a.value(i)),
            StrCol::Dict { array, keys, values } => {
                if array.is_null(i) {
                    None
                } else {
                    keys.get(i).and_then(|&k| values.get_ref(k))
                }
            }
            StrCol::Missing => None,
        }
    }
    fn get(&self, i: usize) -> Option<String> {
        self.get_ref(i).map(str::to_string)
    }
}

/// Convert a record batch of SYNTH columns to rows.
pub fn rows_from_batch(batch: &RecordBatch) -> Result<Vec<SynthRow>> {
    let c: Vec<StrCol> = COLUMNS.iter().map(|n| StrCol::of(batch, n)).collect::<Result<_>>()?;
    Ok((0..batch.num_rows())
        .map(|i| SynthRow {
            synth_id: c[0].get(i),
            language: c[1].get(i),
            exercise: c[2].get(i),
            query: c[3].get(i),
            constraints: c[4].get(i),
            synthetic_reasoning: c[5].get(i),
            synthetic_answer: c[6].get(i),
        })
        .collect())
}

/// Borrow the rows of a record batch of SYNTH columns.
pub fn row_refs(batch: &RecordBatch) -> Result<Vec<RowRef<'_>>> {
    let c = |n: &str| StrCol::of(batch, n);
    let (id, lang, ex, q, cons, r, a) = (
        c("synth_id")?,
        c("language")?,
        c("exercise")?,
        c("query")?,
        c("constraints")?,
        c("synthetic_reasoning")?,
        c("synthetic_answer")?,
    );
    Ok((0..batch.num_rows())
        .map(|i| RowRef {
            synth_id: id.get_ref(i),
            language: lang.get_ref(i),
            exercise: ex.get_ref(i),
            query: q.get_ref(i),
            constraints: cons.get_ref(i),
            synthetic_reasoning: r.get_ref(i),
            synthetic_answer: a.get_ref(i),
        })
        .collect())
}

/// Streaming reader of one SYNTH parquet file: record batches of `batch_rows` rows, only the
/// needed columns, pages decoded as they are consumed (a row group is never loaded whole).
pub struct SynthParquet {
    path: std::path::PathBuf,
    reader: ParquetRecordBatchReader,
    /// Rows in the file according to its footer.
    pub num_rows: u64,
}

impl SynthParquet {
    pub fn open(path: &Path, batch_rows: usize) -> Result<Self> {
        let ctx = || format!("{}: not a readable SYNTH parquet file", path.display());
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f).with_context(ctx)?;
        let num_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
        let schema = Arc::clone(builder.schema());
        let mut roots = Vec::new();
        for name in COLUMNS {
            match schema.index_of(name) {
                Ok(i) => roots.push(i),
                // Metadata only (kept in `_docs.jsonl` for subset selection): without the
                // column every row's language is null.
                Err(_) if name == "language" => {}
                Err(_) => bail!(
                    "{}: missing SYNTH column {name:?} (columns: {})",
                    path.display(),
                    schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let reader = builder.with_projection(mask).with_batch_size(batch_rows.max(1)).build().with_context(ctx)?;
        Ok(SynthParquet { path: path.to_path_buf(), reader, num_rows })
    }

    /// The next record batch (only the SYNTH columns), `None` at the end. Decoding errors
    /// name the file; so do column type errors (checked here).
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        match self.reader.next() {
            None => Ok(None),
            Some(Err(e)) => {
                Err(anyhow!(e)).with_context(|| format!("{}: corrupt or truncated parquet data", self.path.display()))
            }
            Some(Ok(batch)) => {
                for name in COLUMNS {
                    StrCol::of(&batch, name).with_context(|| format!("{}", self.path.display()))?;
                }
                Ok(Some(batch))
            }
        }
    }

    /// The next batch of rows as owned values, `None` at the end.
    pub fn next_rows(&mut self) -> Result<Option<Vec<SynthRow>>> {
        match self.next_batch()? {
            None => Ok(None),
            Some(batch) => rows_from_batch(&batch).map(Some).with_context(|| format!("{}", self.path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harmony::RenderConfig;

    fn row(q: &str, r: Option<&str>, a: &str) -> SynthRow {
        SynthRow {
            synth_id: Some("s1".into()),
            query: Some(q.into()),
            synthetic_reasoning: r.map(Into::into),
            synthetic_answer: Some(a.into()),
            ..Default::default()
        }
    }

    #[test]
    fn fast_path_equals_generic_render() {
        let r = SynthRenderer::new(ReasoningEffort::Medium, 2048).unwrap();
        let row = row("What is 2 + 2?", Some("Simple."), "4.");
        let RowOutcome::Doc { doc, truncated } = r.process(&row) else { panic!() };
        assert!(!truncated);
        let conv = row.to_conversation(ReasoningEffort::Medium).unwrap();
        let g = harmony::render_for_training(&conv, RenderConfig::default()).unwrap();
        let n = g.token_ids.len();
        assert_eq!(doc.len(), n + 1);
        assert_eq!(&doc.tokens[..n], &g.token_ids.iter().map(|&t| t as i32).collect::<Vec<_>>()[..]);
        assert_eq!(doc.tokens[n], EOD as i32);
        assert_eq!(&doc.lossmask[..n - 1], &g.loss_mask[1..]);
        assert_eq!(&doc.span[..n - 1], &g.span_id[1..]);
        assert_eq!((doc.lossmask[n - 1], doc.lossmask[n]), (0, 0));
        assert_eq!((doc.span[n - 1], doc.span[n]), (0, 0));
    }

    #[test]
    fn rejects_missing_fields() {
        let r = SynthRenderer::new(ReasoningEffort::Medium, 2048).unwrap();
        let mut x = row("q", None, "a");
        x.query = Some("  ".into());
        assert_eq!(r.process(&x), RowOutcome::Rejected("missing query".into()));
        let mut x = row("q", None, "a");
        x.synthetic_answer = None;
        assert_eq!(r.process(&x), RowOutcome::Rejected("missing synthetic_answer".into()));
        let mut x = row("q", None, "a");
        x.synth_id = None;
        assert_eq!(r.process(&x), RowOutcome::Rejected("missing synth_id".into()));
    }

    #[test]
    fn truncation_keeps_final_then_analysis_suffix() {
        let long = "word ".repeat(400);
        let r = SynthRenderer::new(ReasoningEffort::Medium, 256).unwrap();
        let RowOutcome::Doc { doc, truncated } = r.process(&row(&long, Some(&long), "Done.")) else { panic!() };
        assert!(truncated);
        assert_eq!(doc.len(), 257);
        // Ends with the whole final message + <|return|> + EOD.
        let tail: Vec<i32> = doc.tokens[doc.len() - 3..].to_vec();
        assert_eq!(tail[1], RETURN as i32);
        assert_eq!(tail[2], EOD as i32);
        // The user content was emptied before the analysis content was cut.
        let toks: Vec<u32> = doc.tokens.iter().map(|&t| t as u32).collect();
        let user_hdr = [200006u32, 1428, 200008, 200007];
        assert!(toks.windows(4).any(|w| w == user_hdr));
        let small = SynthRenderer::new(ReasoningEffort::Medium, 60).unwrap();
        assert!(matches!(small.process(&row("q", None, &long)), RowOutcome::Dropped(_)));
    }

    #[test]
    fn valid_fraction_threshold() {
        let v: ValidFraction = "0.001".parse().unwrap();
        assert_eq!(v.threshold, 18446744073709551u128);
        assert_eq!("1".parse::<ValidFraction>().unwrap().threshold, 1u128 << 64);
        assert_eq!("0".parse::<ValidFraction>().unwrap().threshold, 0);
        assert!("1.5".parse::<ValidFraction>().is_err());
        assert!("-0.1".parse::<ValidFraction>().is_err());
        assert!("abc".parse::<ValidFraction>().is_err());
    }

    #[test]
    fn blake2b_digest_size_8() {
        // hashlib.blake2b(b"", digest_size=8).hexdigest() == "e4a6a0577479b2b4"
        assert_eq!(blake2b8(""), 0xe4a6a0577479b2b4);
        assert_eq!(blake2b8("synth_00000001"), 0x95661e8a5edcf705);
    }

    #[test]
    fn rag_sources_are_appended() {
        let mut x = row("Q?", Some("r"), "A");
        x.exercise = Some("rag".into());
        x.constraints = Some("<source_1>S</source_1>".into());
        let c = x.to_conversation(ReasoningEffort::Medium).unwrap();
        assert_eq!(c.messages[1].content, vec![harmony::Content::text("Q?\n\n<source_1>S</source_1>")]);
        x.exercise = Some("math exercise".into());
        x.constraints = Some("result:4".into());
        let c = x.to_conversation(ReasoningEffort::Medium).unwrap();
        assert_eq!(c.messages[1].content, vec![harmony::Content::text("Q?")]);
    }
}
