//! Output-directory housekeeping for resumable builds: leftover temporaries, shards outside the
//! build, and the check that a shard's completion record still matches its inputs and files.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::{Plan, ShardRecord, KINDS, SPLITS};

pub(super) fn remove_tmp_files(out: &Path) -> Result<()> {
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
pub(super) fn remove_stale_shards(out: &Path, plans: &[Plan]) -> Result<()> {
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

pub(super) fn reusable(out: &Path, record_path: &Path, plan: &Plan, config_hash: &str) -> Option<ShardRecord> {
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
