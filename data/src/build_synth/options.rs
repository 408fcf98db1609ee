//! Options of a build and the summary it returns.

use std::path::PathBuf;

use crate::harmony::ReasoningEffort;
use crate::synth::ValidFraction;

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
    /// The canary set no document may contain (`None`: the built-in one).
    pub canary: Option<PathBuf>,
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
            canary: None,
        }
    }
}

/// Summary returned by [`build_synth`](super::build_synth).
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
