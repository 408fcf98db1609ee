//! A shard's completion record (`.shards/{shard}.json`) and its parts, also listed in the manifest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
