//! `build-synth`: SYNTH parquet shards → per-shard, per-split Megatron IndexedDatasets
//! (`{split}/{shard}_{tokens,lossmask,span}.{bin,idx}`) plus `manifest.json`.
//!
//! * Streaming: each input file is read in record batches of the needed columns only; batch
//!   k+1 is decoded while batch k is rendered in parallel; documents are written in input order,
//!   so the output is byte-identical for any thread count.
//! * Atomicity: every file is written under a `.tmp` name and renamed when complete; a shard's
//!   completion record (`.shards/{shard}.json`) is written after its files, and `manifest.json`
//!   last (and removed first), so an interrupted build never looks complete.
//! * Resumability: a re-run reuses every shard whose completion record matches the input file
//!   (size + SHA-256), the configuration hash and the row limit, and whose files are intact;
//!   everything else is rebuilt.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::docs::DocMeta;
use crate::harmony::ReasoningEffort;
use crate::indexed::{self, IndexedWriter};
use crate::synth::{row_refs, RowOutcome, RowRef, SynthParquet, SynthRenderer, ValidFraction};
use crate::tokenizer;
use arrow_array::RecordBatch;

/// Dataset schema tag in the manifest.
pub const SCHEMA_VERSION: &str = "synth_kd_v1";
/// The two splits, in output order.
pub const SPLITS: [&str; 2] = ["train", "valid"];
/// The three arrays of a shard.
pub const KINDS: [&str; 3] = ["tokens", "lossmask", "span"];

/// Options of one build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Parquet files and/or directories (every `*.parquet` directly inside).
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub valid_fraction: ValidFraction,
    pub seq_len: usize,
    pub max_rows: Option<u64>,
    /// Worker threads (None: all cores).
    pub threads: Option<usize>,
    pub strict: bool,
    pub reasoning_effort: ReasoningEffort,
    /// Rows per parquet record batch.
    pub batch_rows: usize,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

impl BuildOptions {
    pub fn new(inputs: Vec<PathBuf>, out: PathBuf) -> Self {
        BuildOptions {
            inputs,
            out,
            valid_fraction: "0.001".parse().expect("valid literal"),
            seq_len: 2048,
            max_rows: None,
            threads: None,
            strict: false,
            reasoning_effort: ReasoningEffort::Medium,
            batch_rows: 512,
            progress: false,
        }
    }
}

/// An input file as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
    /// Rows according to the parquet footer.
    pub rows: u64,
}

/// One split of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSplit {
    pub name: String,
    pub rows: u64,
    /// Tokens including EOD.
    pub tokens: u64,
    /// Positions with loss mask 1 (label-aligned).
    pub loss_tokens: u64,
    /// Positions per stored span id `"0"`, `"1"`, `"2"` (label-aligned).
    pub span_tokens: BTreeMap<String, u64>,
    /// `tokens_bin`, `tokens_idx`, `lossmask_bin`, … relative to the dataset root.
    pub paths: BTreeMap<String, String>,
    pub bytes: BTreeMap<String, u64>,
}

impl ShardSplit {
    /// Empty statistics of shard `name` (span keys 0, 1, 2 present).
    pub fn new(name: &str) -> Self {
        let mut st = ShardSplit { name: name.to_string(), ..Default::default() };
        for k in ["0", "1", "2"] {
            st.span_tokens.insert(k.to_string(), 0);
        }
        st
    }

    /// Count one document from its label-aligned loss mask and span ids.
    pub fn add_doc(&mut self, lossmask: &[u8], span: &[u8]) {
        self.rows += 1;
        self.tokens += lossmask.len() as u64;
        self.loss_tokens += lossmask.iter().map(|&m| u64::from(m)).sum::<u64>();
        let mut c = [0u64; 3];
        for &s in span {
            c[usize::from(s.min(2))] += 1;
        }
        for (i, n) in c.iter().enumerate() {
            *self.span_tokens.get_mut(&i.to_string()).expect("keys 0..3") += n;
        }
    }

    /// Record a finished file (`key` like `tokens_bin`) at `rel` (relative to the root).
    pub fn record_file(&mut self, key: &str, rel: String, bytes: u64) {
        self.paths.insert(key.to_string(), rel);
        self.bytes.insert(key.to_string(), bytes);
    }
}

/// A row that did not become a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// `rejected` (invalid input) or `dropped` (cannot fit `seq_len`).
    pub kind: String,
    pub synth_id: Option<String>,
    pub file: String,
    pub row: u64,
    pub reason: String,
}

/// Completion record of one shard (`.shards/{name}.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub name: String,
    pub input: InputFile,
    pub config_hash: String,
    /// Rows read from the input (the row limit applied to this shard).
    pub rows_read: u64,
    pub rows_truncated: u64,
    pub splits: BTreeMap<String, ShardSplit>,
    pub skipped: Vec<Skipped>,
}

/// Summary returned by [`build_synth`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    pub shards_built: usize,
    pub shards_reused: usize,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_rejected: u64,
    pub rows_dropped: u64,
    pub rows_truncated: u64,
    pub tokens: u64,
    pub manifest: PathBuf,
}

/// Expand inputs to a sorted list of parquet files with unique stems.
pub fn discover_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in inputs {
        let meta = fs::metadata(p).with_context(|| format!("input {}", p.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            for e in fs::read_dir(p).with_context(|| format!("listing {}", p.display()))? {
                let path = e?.path();
                if path.is_file() && path.extension().is_some_and(|x| x == "parquet") {
                    found.push(path);
                }
            }
            ensure!(!found.is_empty(), "no *.parquet files in {}", p.display());
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    ensure!(!files.is_empty(), "no input files given");
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()).then(a.cmp(b)));
    let mut stems = BTreeSet::new();
    for f in &files {
        let s = shard_name(f)?;
        ensure!(stems.insert(s.clone()), "two input files share the shard name {s:?} ({})", f.display());
    }
    Ok(files)
}

/// Shard name of an input file: its file stem.
pub fn shard_name(path: &Path) -> Result<String> {
    let s = path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("input {} has no usable file name", path.display()))?;
    ensure!(
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')),
        "input file name {s:?} must be ASCII letters, digits, '_', '-' or '.'"
    );
    Ok(s.to_string())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(vpmoe_ir::hex(&h.finalize()))
}

/// Canonical JSON: sorted keys, no spaces, non-ASCII escaped (Python's
/// `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`).
pub fn canonical_json(v: &Value) -> String {
    fn go(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                out.push('{');
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    go(&Value::String((*k).clone()), out);
                    out.push(':');
                    go(&m[k.as_str()], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    go(x, out);
                }
                out.push(']');
            }
            Value::String(s) => {
                let j = serde_json::to_string(s).expect("string serialises");
                for c in j.chars() {
                    if c.is_ascii() {
                        out.push(c);
                    } else {
                        let mut b = [0u16; 2];
                        for u in c.encode_utf16(&mut b) {
                            out.push_str(&format!("\\u{u:04x}"));
                        }
                    }
                }
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::new();
    go(v, &mut s);
    s
}

fn git_sha() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// The build configuration that determines the output bytes (hashed into `config_hash`).
fn config_json(opts: &BuildOptions, tokenizer_sha: &str) -> Value {
    json!({
        "valid_fraction": opts.valid_fraction.text,
        "hash": "blake2b-8",
        "split_rule": "valid iff uint64_be(blake2b(synth_id, digest_size=8)) < floor(valid_fraction * 2^64)",
        "seq_len": opts.seq_len,
        "max_doc_tokens": opts.seq_len + 1,
        "max_rows": opts.max_rows,
        "truncation": "structured (D8): final kept whole, then analysis suffix, then user suffix; else dropped",
        "loss_mask_alignment": "labels_shifted_with_pad",
        "eod_token_id": tokenizer::EOD,
        "roles_preserved": ["system", "user", "assistant"],
        "assistant_channels": ["analysis", "final"],
        "span_ids": {"0": "ignore", "1": "analysis", "2": "final"},
        "reasoning_effort": opts.reasoning_effort.as_str(),
        "doc_metadata": "{shard}_docs.jsonl: synth_id, language, exercise per document, in dataset order",
        "system_message": "harmony default (identity, knowledge cutoff 2024-06, no date, channels analysis/commentary/final required)",
        "rag_sources": "exercise == rag: user = query + \"\\n\\n\" + constraints",
        "empty_reasoning": "null or empty synthetic_reasoning renders an analysis message with empty content",
        "tokenizer_sha256": tokenizer_sha,
        "renderer": "vpmoe-data harmony (openai-harmony 0.0.8 parity)",
        "schema_version": SCHEMA_VERSION,
    })
}

struct Plan {
    path: PathBuf,
    name: String,
    input: InputFile,
    limit: u64,
}

/// Build the dataset. See the module docs.
pub fn build_synth(opts: &BuildOptions) -> Result<BuildReport> {
    ensure!(opts.seq_len >= 16, "--seq-len must be at least 16");
    ensure!(opts.threads != Some(0), "--threads must be at least 1");
    ensure!(opts.max_rows != Some(0), "--max-rows must be at least 1");
    let files = discover_inputs(&opts.inputs)?;
    match opts.threads {
        // The global pool: its threads (and their tokenizers) outlive one build.
        None => rayon::scope(|_| build_in_pool(opts, &files)),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .context("starting the worker pool")?
            .install(|| build_in_pool(opts, &files)),
    }
}

fn build_in_pool(opts: &BuildOptions, files: &[PathBuf]) -> Result<BuildReport> {
    let out = &opts.out;
    if out.is_dir()
        && !out.join(".shards").is_dir()
        && fs::read_dir(out).with_context(|| format!("listing {}", out.display()))?.next().is_some()
    {
        bail!(
            "{} is not empty and is not a build-synth output directory (no .shards/); refusing to write into it",
            out.display()
        );
    }
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let manifest_path = out.join("manifest.json");
    if manifest_path.exists() {
        fs::remove_file(&manifest_path).with_context(|| format!("removing stale {}", manifest_path.display()))?;
    }
    for split in SPLITS {
        fs::create_dir_all(out.join(split))?;
    }
    let records_dir = out.join(".shards");
    fs::create_dir_all(&records_dir)?;
    remove_tmp_files(out)?;

    // The vocabulary linked into this binary; `tokenizer::tests` recomputes it from the loaded
    // tokenizer (`vocabulary_sha256`), so the constant cannot drift from the code.
    let tokenizer_sha = tokenizer::O200K_BASE_SHA256.to_string();
    let config = config_json(opts, &tokenizer_sha);
    let config_hash = vpmoe_ir::hex(&Sha256::digest(canonical_json(&config).as_bytes()));

    // Inventory: sizes, hashes (in parallel) and footer row counts.
    let inputs: Vec<InputFile> = files
        .par_iter()
        .map(|f| -> Result<InputFile> {
            let bytes = fs::metadata(f)?.len();
            let sha256 = sha256_file(f)?;
            let rows = SynthParquet::open(f, 1)?.num_rows;
            Ok(InputFile { name: f.file_name().unwrap().to_string_lossy().into_owned(), bytes, sha256, rows })
        })
        .collect::<Result<_>>()?;
    let mut remaining = opts.max_rows.unwrap_or(u64::MAX);
    let mut plans = Vec::new();
    for (f, input) in files.iter().zip(inputs.iter()) {
        if remaining == 0 {
            break;
        }
        let limit = input.rows.min(remaining);
        remaining -= limit;
        plans.push(Plan { path: f.clone(), name: shard_name(f)?, input: input.clone(), limit });
    }
    remove_stale_shards(out, &plans)?;

    let renderer = SynthRenderer::new(opts.reasoning_effort, opts.seq_len)?;
    let total_rows: u64 = plans.iter().map(|p| p.limit).sum();
    let pb = if opts.progress { ProgressBar::new(total_rows) } else { ProgressBar::hidden() };
    if opts.progress {
        pb.set_draw_target(ProgressDrawTarget::stderr());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {human_pos}/{human_len} rows ({per_sec}) {msg} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut tokens_done = 0u64;
    let mut records = Vec::new();
    let (mut built, mut reused) = (0, 0);
    for plan in &plans {
        let record_path = records_dir.join(format!("{}.json", plan.name));
        if let Some(rec) = reusable(out, &record_path, plan, &config_hash) {
            pb.inc(rec.rows_read);
            tokens_done += rec.splits.values().map(|s| s.tokens).sum::<u64>();
            records.push(rec);
            reused += 1;
            continue;
        }
        if record_path.exists() {
            fs::remove_file(&record_path)?;
        }
        let rec = build_shard(opts, plan, &renderer, &config_hash, &pb, started, &mut tokens_done)?;
        let text = serde_json::to_string_pretty(&rec)? + "\n";
        indexed::write_atomic(&record_path, text.as_bytes())?;
        records.push(rec);
        built += 1;
    }
    pb.finish_and_clear();

    // Rejection report and manifest (last).
    let mut rejected = String::new();
    for r in &records {
        for s in &r.skipped {
            rejected.push_str(&serde_json::to_string(s)?);
            rejected.push('\n');
        }
    }
    indexed::write_atomic(&out.join("rejected.jsonl"), rejected.as_bytes())?;
    let report = summarise(&records, built, reused, manifest_path.clone());
    let manifest = manifest_json(opts, &config, &config_hash, &tokenizer_sha, &inputs, &records);
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    indexed::write_atomic(&manifest_path, text.as_bytes())?;
    Ok(report)
}

fn summarise(records: &[ShardRecord], built: usize, reused: usize, manifest: PathBuf) -> BuildReport {
    let count = |k: &str| -> u64 { records.iter().flat_map(|r| &r.skipped).filter(|s| s.kind == k).count() as u64 };
    BuildReport {
        shards_built: built,
        shards_reused: reused,
        rows_read: records.iter().map(|r| r.rows_read).sum(),
        rows_written: records.iter().flat_map(|r| r.splits.values()).map(|s| s.rows).sum(),
        rows_rejected: count("rejected"),
        rows_dropped: count("dropped"),
        rows_truncated: records.iter().map(|r| r.rows_truncated).sum(),
        tokens: records.iter().flat_map(|r| r.splits.values()).map(|s| s.tokens).sum(),
        manifest,
    }
}

fn remove_tmp_files(out: &Path) -> Result<()> {
    for dir in [out.to_path_buf(), out.join("train"), out.join("valid"), out.join(".shards")] {
        if !dir.is_dir() {
            continue;
        }
        for e in fs::read_dir(&dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    Ok(())
}

/// Remove shard files and records of shards that are not part of this build.
fn remove_stale_shards(out: &Path, plans: &[Plan]) -> Result<()> {
    let keep: BTreeSet<&str> = plans.iter().map(|p| p.name.as_str()).collect();
    let rec_dir = out.join(".shards");
    for e in fs::read_dir(&rec_dir)? {
        let p = e?.path();
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if p.extension().is_some_and(|x| x == "json") && !keep.contains(stem) {
            fs::remove_file(&p)?;
        }
    }
    for split in SPLITS {
        for e in fs::read_dir(out.join(split))? {
            let p = e?.path();
            let Some(fname) = p.file_name().and_then(|s| s.to_str()) else {
                continue;
            };
            if let Some(shard) = fname.strip_suffix("_docs.jsonl") {
                if !keep.contains(shard) {
                    fs::remove_file(&p)?;
                }
                continue;
            }
            let Some(base) = fname.strip_suffix(".bin").or_else(|| fname.strip_suffix(".idx")) else {
                continue;
            };
            let shard = KINDS.iter().find_map(|k| base.strip_suffix(&format!("_{k}")));
            if let Some(shard) = shard {
                if !keep.contains(shard) {
                    fs::remove_file(&p)?;
                }
            }
        }
    }
    Ok(())
}

fn reusable(out: &Path, record_path: &Path, plan: &Plan, config_hash: &str) -> Option<ShardRecord> {
    let text = fs::read_to_string(record_path).ok()?;
    let rec: ShardRecord = serde_json::from_str(&text).ok()?;
    if rec.name != plan.name || rec.input != plan.input || rec.config_hash != config_hash || rec.rows_read != plan.limit
    {
        return None;
    }
    for (split, s) in &rec.splits {
        for kind in KINDS {
            for ext in ["bin", "idx"] {
                let key = format!("{kind}_{ext}");
                let rel = s.paths.get(&key)?;
                let want = *s.bytes.get(&key)?;
                if !rel.starts_with(&format!("{split}/")) {
                    return None;
                }
                if fs::metadata(out.join(rel)).ok()?.len() != want {
                    return None;
                }
            }
        }
    }
    for (split, s) in &rec.splits {
        let rel = s.paths.get("docs_jsonl")?;
        if !rel.starts_with(&format!("{split}/"))
            || fs::metadata(out.join(rel)).ok()?.len() != *s.bytes.get("docs_jsonl")?
        {
            return None;
        }
    }
    // Every split file that the record does not list must be absent (empty splits).
    for split in SPLITS {
        if !rec.splits.contains_key(split) {
            let p = out.join(split).join(format!("{}_tokens.idx", plan.name));
            if p.exists() {
                return None;
            }
        }
    }
    Some(rec)
}

struct SplitWriter {
    tokens: IndexedWriter<i32>,
    lossmask: IndexedWriter<u8>,
    span: IndexedWriter<u8>,
    docs: Vec<DocMeta>,
    stats: ShardSplit,
}

impl SplitWriter {
    fn create(out: &Path, split: &str, shard: &str) -> Result<Self> {
        let p = |k: &str| out.join(split).join(format!("{shard}_{k}"));
        let stats = ShardSplit::new(shard);
        Ok(SplitWriter {
            tokens: IndexedWriter::create(&p("tokens"))?,
            lossmask: IndexedWriter::create(&p("lossmask"))?,
            span: IndexedWriter::create(&p("span"))?,
            docs: Vec::new(),
            stats,
        })
    }

    fn add(&mut self, doc: &crate::synth::Document, meta: DocMeta) -> Result<()> {
        self.docs.push(meta);
        self.tokens.add(&doc.tokens)?;
        self.lossmask.add(&doc.lossmask)?;
        self.span.add(&doc.span)?;
        self.stats.add_doc(&doc.lossmask, &doc.span);
        Ok(())
    }

    /// Finish (or discard, if empty) and return the stats.
    fn finish(self, out: &Path, split: &str, shard: &str) -> Result<Option<ShardSplit>> {
        if self.stats.rows == 0 {
            self.tokens.abandon();
            self.lossmask.abandon();
            self.span.abandon();
            return Ok(None);
        }
        let mut stats = self.stats;
        let sizes =
            [("tokens", self.tokens.finish()?), ("lossmask", self.lossmask.finish()?), ("span", self.span.finish()?)];
        for (kind, (bin, idx)) in sizes {
            for (ext, n) in [("bin", bin), ("idx", idx)] {
                stats.record_file(&format!("{kind}_{ext}"), format!("{split}/{shard}_{kind}.{ext}"), n);
            }
        }
        let rel = format!("{split}/{shard}_docs.jsonl");
        let bytes = crate::docs::encode(&self.docs);
        indexed::write_atomic(&out.join(&rel), &bytes)?;
        stats.record_file("docs_jsonl", rel, bytes.len() as u64);
        Ok(Some(stats))
    }
}

/// One rendered row, ready to be written in order.
struct Processed {
    synth_id: Option<String>,
    /// Metadata of a document (None for skipped rows).
    meta: Option<DocMeta>,
    /// Goes to `valid/`.
    valid: bool,
    outcome: RowOutcome,
}

impl Processed {
    fn new(row: &RowRef<'_>, outcome: RowOutcome, vf: &ValidFraction) -> Self {
        let doc = matches!(outcome, RowOutcome::Doc { .. });
        Processed {
            // Only needed for reports (skipped rows).
            synth_id: if doc { None } else { row.synth_id.map(str::to_string) },
            meta: doc.then(|| DocMeta {
                synth_id: row.synth_id.unwrap_or_default().to_string(),
                language: row.language.map(str::to_string),
                exercise: row.exercise.map(str::to_string),
            }),
            valid: doc && vf.is_valid(row.synth_id.unwrap_or_default()),
            outcome,
        }
    }
}

/// The in-order writing side of a shard build.
struct ShardSink {
    writers: [SplitWriter; 2],
    skipped: Vec<Skipped>,
    truncated: u64,
    /// Rows consumed so far (the row number of the next row).
    rows_written_through: u64,
}

impl ShardSink {
    /// Write one batch in input order; returns the tokens written.
    fn write(&mut self, batch: Vec<Processed>, strict: bool, file: &str) -> Result<u64> {
        let mut tokens = 0u64;
        for p in batch {
            let row_no = self.rows_written_through;
            self.rows_written_through += 1;
            let skip = |kind: &str, reason: String, id: Option<String>| Skipped {
                kind: kind.to_string(),
                synth_id: id,
                file: file.to_string(),
                row: row_no,
                reason,
            };
            match p.outcome {
                RowOutcome::Doc { doc, truncated } => {
                    self.writers[usize::from(p.valid)].add(&doc, p.meta.expect("documents carry metadata"))?;
                    self.truncated += u64::from(truncated);
                    tokens += doc.len() as u64;
                }
                RowOutcome::Rejected(reason) => {
                    if strict {
                        bail!(
                            "{file} row {row_no}: synth_id {:?} rejected: {reason} (--strict)",
                            p.synth_id.as_deref().unwrap_or("<null>")
                        );
                    }
                    self.skipped.push(skip("rejected", reason, p.synth_id));
                }
                RowOutcome::Dropped(reason) => self.skipped.push(skip("dropped", reason, p.synth_id)),
            }
        }
        Ok(tokens)
    }
}

fn build_shard(
    opts: &BuildOptions,
    plan: &Plan,
    renderer: &SynthRenderer,
    config_hash: &str,
    pb: &ProgressBar,
    started: Instant,
    tokens_done: &mut u64,
) -> Result<ShardRecord> {
    // Remove any earlier output of this shard first: nothing stale may survive a rebuild.
    for split in SPLITS {
        let p = opts.out.join(split).join(format!("{}_docs.jsonl", plan.name));
        if p.exists() {
            fs::remove_file(&p)?;
        }
        for kind in KINDS {
            for ext in ["bin", "idx"] {
                let p = opts.out.join(split).join(format!("{}_{kind}.{ext}", plan.name));
                if p.exists() {
                    fs::remove_file(&p)?;
                }
            }
        }
    }
    let mut reader = SynthParquet::open(&plan.path, opts.batch_rows)?;
    let mut sink = ShardSink {
        writers: [
            SplitWriter::create(&opts.out, "train", &plan.name)?,
            SplitWriter::create(&opts.out, "valid", &plan.name)?,
        ],
        skipped: Vec::new(),
        truncated: 0,
        rows_written_through: 0,
    };
    let take = |batch: Option<RecordBatch>, rows_read: u64| -> Option<RecordBatch> {
        let batch = batch?;
        let left = plan.limit.saturating_sub(rows_read);
        let batch = if batch.num_rows() as u64 > left { batch.slice(0, left as usize) } else { batch };
        (batch.num_rows() > 0).then_some(batch)
    };
    // Three stages overlap: batch k is rendered in parallel while batch k-1 is written (in
    // order) and batch k+1 is decoded.
    let mut rows_read = 0u64;
    let mut pending: Option<Vec<Processed>> = None;
    let mut next = take(reader.next_batch()?, 0);
    let mut result: Result<()> = Ok(());
    while let Some(batch) = next {
        let rows = row_refs(&batch)?;
        let after = rows_read + rows.len() as u64;
        let (processed, (written, upcoming)) = rayon::join(
            || {
                rows.par_iter()
                    .map(|r| Processed::new(r, renderer.process_ref(r), &opts.valid_fraction))
                    .collect::<Vec<Processed>>()
            },
            || {
                let written = match pending.take() {
                    Some(p) => sink.write(p, opts.strict, &plan.input.name),
                    None => Ok(0),
                };
                let upcoming = if after < plan.limit && written.is_ok() { reader.next_batch() } else { Ok(None) };
                (written, upcoming)
            },
        );
        match written {
            Ok(tokens) => *tokens_done += tokens,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        pending = Some(processed);
        rows_read = after;
        pb.inc(rows.len() as u64);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!("{:.0} tok/s", *tokens_done as f64 / secs));
        next = take(upcoming?, rows_read);
    }
    if result.is_ok() {
        if let Some(p) = pending.take() {
            result = sink.write(p, opts.strict, &plan.input.name).map(|t| {
                *tokens_done += t;
            });
        }
    }
    if let Err(e) = result {
        for w in sink.writers {
            w.tokens.abandon();
            w.lossmask.abandon();
            w.span.abandon();
        }
        return Err(e);
    }
    let ShardSink { writers, skipped, truncated, .. } = sink;
    ensure!(
        rows_read == plan.limit,
        "{}: read {rows_read} rows but the footer says {}",
        plan.path.display(),
        plan.limit
    );
    let mut splits = BTreeMap::new();
    let [train, valid] = writers;
    for (split, w) in [("train", train), ("valid", valid)] {
        if let Some(s) = w.finish(&opts.out, split, &plan.name)? {
            splits.insert(split.to_string(), s);
        }
    }
    Ok(ShardRecord {
        name: plan.name.clone(),
        input: plan.input.clone(),
        config_hash: config_hash.to_string(),
        rows_read,
        rows_truncated: truncated,
        splits,
        skipped,
    })
}

/// How many skipped rows the manifest lists inline (all of them are in `rejected.jsonl`).
const MANIFEST_SKIPPED_LIMIT: usize = 100;

fn manifest_json(
    opts: &BuildOptions,
    config: &Value,
    config_hash: &str,
    tokenizer_sha: &str,
    inputs: &[InputFile],
    records: &[ShardRecord],
) -> Value {
    let mut splits = serde_json::Map::new();
    for split in SPLITS {
        let shards: Vec<&ShardSplit> = records.iter().filter_map(|r| r.splits.get(split)).collect();
        let mut span = BTreeMap::new();
        for s in &shards {
            for (k, v) in &s.span_tokens {
                *span.entry(k.clone()).or_insert(0u64) += v;
            }
        }
        splits.insert(
            split.to_string(),
            json!({
                "rows": shards.iter().map(|s| s.rows).sum::<u64>(),
                "tokens": shards.iter().map(|s| s.tokens).sum::<u64>(),
                "loss_tokens": shards.iter().map(|s| s.loss_tokens).sum::<u64>(),
                "span_tokens": span,
                "shards": shards,
            }),
        );
    }
    let skipped: Vec<&Skipped> = records.iter().flat_map(|r| &r.skipped).collect();
    let count = |k: &str| skipped.iter().filter(|s| s.kind == k).count();
    json!({
        "schema_version": SCHEMA_VERSION,
        "git_sha": git_sha(),
        "producer": {"crate": "vpmoe-data", "version": env!("CARGO_PKG_VERSION")},
        "config_hash": config_hash,
        "config": config,
        "input": {
            "files": inputs,
            "shards_used": records.iter().map(|r| &r.name).collect::<Vec<_>>(),
        },
        "renderer": {
            "library": "vpmoe-data harmony",
            "parity": "openai-harmony 0.0.8 render_conversation_for_training",
            "auto_drop_analysis": false,
            "reasoning_effort": opts.reasoning_effort.as_str(),
        },
        "tokenizer": {
            "type": "O200kHarmonyTokenizer",
            "library": "tiktoken-rs 0.12 o200k_harmony",
            "model_sha256": tokenizer_sha,
            "vocab_size": tokenizer::VOCAB_SIZE,
        },
        "rows": {
            "read": records.iter().map(|r| r.rows_read).sum::<u64>(),
            "written": records.iter().flat_map(|r| r.splits.values()).map(|s| s.rows).sum::<u64>(),
            "rejected": count("rejected"),
            "dropped_overlong": count("dropped"),
            "truncated": records.iter().map(|r| r.rows_truncated).sum::<u64>(),
        },
        "skipped": {
            "report": "rejected.jsonl",
            "first": skipped.iter().take(MANIFEST_SKIPPED_LIMIT).collect::<Vec<_>>(),
        },
        "splits": splits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_and_escapes() {
        let v = json!({"b": 1, "a": ["é", null, true]});
        assert_eq!(canonical_json(&v), r#"{"a":["\u00e9",null,true],"b":1}"#);
    }
}
