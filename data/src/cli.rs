//! `vpmoe-rt data …` subcommands. The runtime binary embeds [`DataCmd`] and calls [`run`].

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::build_synth::{build_synth, BuildOptions};
use crate::harmony::{self, Conversation, ReasoningEffort, RenderConfig};
use crate::synth::ValidFraction;

/// Data pipeline commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DataCmd {
    /// Render Harmony conversations (JSON lines) to token ids, loss mask and span ids.
    Render(RenderArgs),
    /// Build training datasets (Megatron IndexedDataset) from SYNTH parquet shards.
    BuildSynth(BuildSynthArgs),
    /// Show counts, token/span statistics, a length histogram and a decoded sample.
    Inspect(InspectArgs),
}

/// `data render`.
#[derive(Debug, Clone, clap::Args)]
pub struct RenderArgs {
    /// JSON-lines file with one conversation per line in the official harmony JSON form
    /// (`{"messages": [...]}`), or `-` for standard input. Each output line has `token_ids`,
    /// `loss_mask`, `span_id` and `text` of the training render.
    #[arg(long, value_name = "FILE|-", default_value = "-")]
    pub input: String,
}

/// `data build-synth`.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildSynthArgs {
    /// SYNTH parquet files, or directories whose `*.parquet` files are all used (one output
    /// shard per input file, named after its file stem).
    #[arg(long, value_name = "PARQUET_FILES_OR_DIR", required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Output dataset directory (created; `train/`, `valid/`, `manifest.json`). Re-running
    /// into the same directory reuses finished shards and rebuilds the rest.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Fraction of rows that go to `valid/`, by the stable blake2b-8 hash of `synth_id`.
    #[arg(long, value_name = "F", default_value = "0.001")]
    pub valid_fraction: ValidFraction,
    /// Training sequence length; documents longer than seq-len + 1 tokens (EOD included)
    /// are truncated structurally or dropped.
    #[arg(long, value_name = "N", default_value_t = 2048)]
    pub seq_len: usize,
    /// Stop after reading this many rows in total (inputs in file-name order).
    #[arg(long, value_name = "N")]
    pub max_rows: Option<u64>,
    /// Worker threads (default: all cores). The output does not depend on it.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Fail on the first invalid row instead of skipping and reporting it.
    #[arg(long)]
    pub strict: bool,
    /// Reasoning effort written in every system message (recorded in the manifest).
    #[arg(long, value_enum, value_name = "E", default_value_t = ReasoningEffort::Medium)]
    pub reasoning_effort: ReasoningEffort,
    /// Canary set no document may contain: a row that does fails the build, named
    /// [default: the built-in data/canary.jsonl].
    #[arg(long, value_name = "FILE")]
    pub canary: Option<PathBuf>,
}

/// `data inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// Dataset directory written by build-synth (or one of its split directories, or a
    /// `…_tokens` prefix). The sample shown is the first document of the first shard.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// Run a data command.
pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Render(a) => render_cmd(&a),
        DataCmd::BuildSynth(a) => build_synth_cmd(&a),
        DataCmd::Inspect(a) => crate::inspect::run(&a),
    }
}

#[derive(Serialize)]
struct RenderLine<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    token_ids: &'a [u32],
    loss_mask: &'a [u8],
    span_id: &'a [u8],
    text: String,
}

/// Parse one input line: a conversation, or a golden-file style object with `conversation`.
fn parse_line(line: &str) -> Result<(Option<String>, Conversation, RenderConfig)> {
    let v: serde_json::Value = serde_json::from_str(line).context("invalid JSON")?;
    if v.get("messages").is_some() {
        return Ok((None, harmony::parse_conversation(line).context("invalid conversation")?, RenderConfig::default()));
    }
    let Some(conv) = v.get("conversation") else {
        bail!("expected an object with \"messages\" (or \"conversation\")");
    };
    let conv = harmony::parse_conversation(&conv.to_string()).context("invalid conversation")?;
    let cfg = match v.get("render_config") {
        Some(c) => serde_json::from_value(c.clone()).context("invalid render_config")?,
        None => RenderConfig::default(),
    };
    let id = v.get("id").and_then(|x| x.as_str()).map(str::to_string);
    Ok((id, conv, cfg))
}

/// Render every line of `input` to `out`; returns (lines rendered, errors as (line, message)).
pub fn render_stream(mut input: impl BufRead, mut out: impl Write) -> Result<(usize, Vec<(usize, String)>)> {
    let mut ok = 0;
    let mut errors = Vec::new();
    let mut buf = Vec::new();
    for line_no in 1.. {
        buf.clear();
        if input.read_until(b'\n', &mut buf).with_context(|| format!("reading line {line_no}"))? == 0 {
            break;
        }
        let bytes = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        // A line that is not UTF-8 is one bad line, reported like the others.
        let line = match std::str::from_utf8(bytes) {
            Ok(line) => line,
            Err(e) => {
                errors.push((line_no, format!("not UTF-8 (byte {} of the line)", e.valid_up_to() + 1)));
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let result = parse_line(line).and_then(|(id, conv, cfg)| {
            let r = harmony::render_for_training(&conv, cfg)?;
            let rec = RenderLine {
                id: id.as_deref(),
                token_ids: &r.token_ids,
                loss_mask: &r.loss_mask,
                span_id: &r.span_id,
                text: r.text(),
            };
            Ok(serde_json::to_string(&rec)?)
        });
        match result {
            Ok(json) => {
                writeln!(out, "{json}")?;
                ok += 1;
            }
            Err(e) => errors.push((line_no, format!("{e:#}"))),
        }
    }
    out.flush()?;
    Ok((ok, errors))
}

fn render_cmd(a: &RenderArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let out = BufWriter::new(stdout.lock());
    let (ok, errors) = if a.input == "-" {
        render_stream(std::io::stdin().lock(), out)
    } else {
        let f = std::fs::File::open(&a.input).with_context(|| format!("opening {}", a.input))?;
        render_stream(BufReader::new(f), out)
    }
    .with_context(|| a.input.clone())?;
    for (line, msg) in &errors {
        eprintln!("{}: line {line}: {msg}", a.input);
    }
    if !errors.is_empty() {
        bail!(
            "{} of {} conversations failed (first: line {}); nothing was written for them",
            errors.len(),
            errors.len() + ok,
            errors[0].0
        );
    }
    Ok(())
}

fn build_synth_cmd(a: &BuildSynthArgs) -> Result<()> {
    let mut opts = BuildOptions::new(a.input.clone(), a.out.clone());
    opts.valid_fraction = a.valid_fraction.clone();
    opts.seq_len = a.seq_len;
    opts.max_rows = a.max_rows;
    opts.threads = a.threads;
    opts.strict = a.strict;
    opts.reasoning_effort = a.reasoning_effort;
    opts.canary = a.canary.clone();
    opts.progress = true;
    let r = build_synth(&opts)?;
    println!(
        "build-synth: {} rows read, {} documents written ({} tokens), {} truncated, {} rejected, {} dropped (overlong)",
        r.rows_read, r.rows_written, r.tokens, r.rows_truncated, r.rows_rejected, r.rows_dropped
    );
    println!("shards: {} built, {} reused; manifest {}", r.shards_built, r.shards_reused, r.manifest.display());
    if r.rows_rejected + r.rows_dropped > 0 {
        eprintln!("skipped rows are listed with their synth_id in {}", a.out.join("rejected.jsonl").display());
    }
    Ok(())
}
