//! The build configuration (hashed into `config_hash`), `manifest.json` and canonical JSON.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{BuildOptions, InputFile, ShardRecord, ShardSplit, Skipped, SCHEMA_VERSION, SPLITS};
use crate::tokenizer;

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
pub(super) fn config_json(opts: &BuildOptions, tokenizer_sha: &str) -> Value {
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

/// How many skipped rows the manifest lists inline (all of them are in `rejected.jsonl`).
const MANIFEST_SKIPPED_LIMIT: usize = 100;

pub(super) fn manifest_json(
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
