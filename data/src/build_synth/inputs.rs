//! Input discovery: parquet files, their shard names and content hashes.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

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

pub(super) fn sha256_file(path: &Path) -> Result<String> {
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
