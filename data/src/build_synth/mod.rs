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
//! * Failure: a build that writes no document is an error (its skipped rows counted by reason);
//!   a failed build removes the directories it created and left empty, nothing else.

mod inputs;
mod manifest;
mod options;
mod record;
mod resume;
mod shard;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

pub use inputs::{discover_inputs, shard_name};
pub use manifest::canonical_json;
pub use options::{BuildOptions, BuildReport};
pub use record::{InputFile, ShardRecord, ShardSplit, Skipped};

use crate::indexed;
use crate::synth::{SynthParquet, SynthRenderer};
use crate::tokenizer;
use inputs::sha256_file;
use manifest::{config_json, manifest_json};
use resume::{remove_stale_shards, remove_tmp_files, reusable};
use shard::build_shard;

/// Dataset schema tag in the manifest.
pub const SCHEMA_VERSION: &str = "synth_kd_v1";
/// The two splits, in output order.
pub const SPLITS: [&str; 2] = ["train", "valid"];
/// The three arrays of a shard.
pub const KINDS: [&str; 3] = ["tokens", "lossmask", "span"];

/// One shard of this build: its input file, name, inventory entry and row limit.
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
    crate::lock::check_output_dir(out, ".shards", "build-synth output directory")?;
    // What this run creates, so that a failed run can take it away again (and nothing else).
    let fresh_out = !out.exists();
    let fresh_lock = !out.join(crate::lock::LOCK_FILE).exists();
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let _lock = match crate::lock::DirLock::acquire(out, "vpmoe-rt data build-synth") {
        Ok(lock) => lock,
        Err(e) => {
            if fresh_out {
                let _ = fs::remove_dir(out);
            }
            return Err(e);
        }
    };
    let fresh_dirs: Vec<PathBuf> =
        [".shards", "train", "valid"].iter().map(|d| out.join(d)).filter(|d| !d.exists()).collect();
    let result = build_locked(opts, files);
    if result.is_err() {
        // Only empty directories go (`remove_dir` refuses others): shards finished before the
        // failure, in this run or an earlier one, stay for the next run to reuse.
        for d in &fresh_dirs {
            let _ = fs::remove_dir(d);
        }
        let only_lock = |mut es: fs::ReadDir| es.all(|e| e.is_ok_and(|e| e.file_name() == crate::lock::LOCK_FILE));
        if fresh_lock && fs::read_dir(out).is_ok_and(only_lock) {
            let _ = fs::remove_file(out.join(crate::lock::LOCK_FILE));
        }
        if fresh_out {
            let _ = fs::remove_dir(out);
        }
    }
    result
}

/// The build proper, in a locked output directory.
fn build_locked(opts: &BuildOptions, files: &[PathBuf]) -> Result<BuildReport> {
    let out = &opts.out;
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
    let canary = crate::canary::Canary::load(opts.canary.as_deref())?;
    let total_rows: u64 = plans.iter().map(|p| p.limit).sum();
    let pb = crate::progress_bar(total_rows, "rows", opts.progress);
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
        let rec = build_shard(opts, plan, &renderer, &canary, &config_hash, &pb, started, &mut tokens_done)?;
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
    if report.rows_written == 0 {
        bail!("{}", no_documents(opts, &records, report.rows_read));
    }
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

/// Why a build wrote no documents: its skipped rows, counted by reason.
fn no_documents(opts: &BuildOptions, records: &[ShardRecord], rows_read: u64) -> String {
    let out = opts.out.display();
    if rows_read == 0 {
        return format!("{out}: no documents written: the inputs have no rows");
    }
    let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
    let mut dropped = 0u64;
    for s in records.iter().flat_map(|r| &r.skipped) {
        if s.kind == "dropped" {
            dropped += 1;
        } else {
            *reasons.entry(&s.reason).or_default() += 1;
        }
    }
    let mut counts: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    if dropped > 0 {
        counts.push(format!("{dropped} dropped (too long for --seq-len {} even after truncation)", opts.seq_len));
    }
    format!(
        "{out}: no documents written: all {rows_read} rows read were skipped ({}); each is listed in {out}/rejected.jsonl",
        counts.join(", ")
    )
}
