//! Per-document metadata of a shard: `{shard}_docs.jsonl`, one JSON object per document in
//! dataset order (`{"synth_id": …, "language": …, "exercise": …}`). Subset selection and
//! teacher-scoring reports key documents by `synth_id` through it.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// Metadata of one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMeta {
    pub synth_id: String,
    pub language: Option<String>,
    pub exercise: Option<String>,
}

/// `{base}_docs.jsonl` for a `{base}_tokens` prefix.
pub fn docs_path(tokens_prefix: &Path) -> PathBuf {
    let s = tokens_prefix.to_string_lossy();
    let base = s.strip_suffix("_tokens").unwrap_or(&s);
    PathBuf::from(format!("{base}_docs.jsonl"))
}

/// Serialise documents' metadata as JSON lines.
pub fn encode(docs: &[DocMeta]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in docs {
        serde_json::to_writer(&mut out, d).expect("serialisable");
        out.push(b'\n');
    }
    out
}

/// Read and validate the metadata of a shard with `n` documents.
pub fn read(path: &Path, n: usize) -> Result<Vec<DocMeta>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let docs: Vec<DocMeta> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: invalid document metadata", path.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    ensure!(docs.len() == n, "{}: {} documents, but the shard has {n}", path.display(), docs.len());
    Ok(docs)
}
