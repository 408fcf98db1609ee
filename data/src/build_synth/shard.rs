//! The build of one shard: batches decoded, rendered in parallel and written in input order
//! (overlapped), into per-split IndexedDataset writers.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use arrow_array::RecordBatch;
use indicatif::ProgressBar;
use rayon::prelude::*;

use super::{BuildOptions, Plan, ShardRecord, ShardSplit, Skipped, KINDS, SPLITS};
use crate::canary::Canary;
use crate::docs::DocMeta;
use crate::indexed::{self, IndexedWriter};
use crate::synth::{row_refs, RowOutcome, RowRef, SynthParquet, SynthRenderer, ValidFraction};

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
    /// Write one batch in input order; returns the tokens written. A document that contains a
    /// canary document fails the build.
    fn write(&mut self, batch: Vec<Processed>, strict: bool, file: &str, canary: &Canary) -> Result<u64> {
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
                    let toks: Vec<u32> = doc.tokens.iter().map(|&t| t as u32).collect();
                    if let Some(hit) = canary.found_in(&toks) {
                        bail!(
                            "{file} row {row_no}: synth_id {:?} contains canary document {}:{hit}; the canary set is \
                             never trained on",
                            p.synth_id.as_deref().unwrap_or("<null>"),
                            canary.name
                        );
                    }
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

#[allow(clippy::too_many_arguments)]
pub(super) fn build_shard(
    opts: &BuildOptions,
    plan: &Plan,
    renderer: &SynthRenderer,
    canary: &Canary,
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
                    Some(p) => sink.write(p, opts.strict, &plan.input.name, canary),
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
            result = sink.write(p, opts.strict, &plan.input.name, canary).map(|t| {
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
