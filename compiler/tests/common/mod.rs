//! What several compiler test files share.

use std::path::{Path, PathBuf};

/// Every shipped config: `configs/`, `configs/rungs/`, `tests/configs/`, sorted.
pub fn configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut paths: Vec<PathBuf> = ["configs", "configs/rungs", "tests/configs"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths
}
