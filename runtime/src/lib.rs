//! vpmoe-rt: runs compiled plans. Backends share one interface ([`backend`]); the cpu backend
//! ([`cpu`]) interprets the graph with the IR reference semantics and a fast GEMM.

pub mod backend;
pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod decode;
pub mod dist;
pub mod eval;
pub mod health;
pub mod import;
pub mod opd;
pub mod optim;
pub mod params;
pub mod parity;
pub mod plot;
pub use vpmoe_ir::rng;
pub mod state;
pub mod teacher;
pub mod train;
pub mod upcycle;

use anyhow::{bail, Context, Result};
use std::path::Path;
use vpmoe_compiler::{compile_arch, Plan};
use vpmoe_ir::Graph;

pub use backend::{Backend, Batch, ForwardOut};

/// Loads `DIR/plan.json` and rebuilds its graph, refusing a plan whose fingerprint this build
/// would not produce (edited, or compiled by another vpmoec version).
pub fn load_plan(dir: &Path) -> Result<(Graph, Plan)> {
    let path = dir.join("plan.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let plan: Plan = serde_json::from_str(&text).with_context(|| format!("{}: not a vpmoe plan", path.display()))?;
    if plan.format != vpmoe_compiler::plan::PLAN_FORMAT {
        bail!(
            "{}: plan format {} (this build reads {})",
            path.display(),
            plan.format,
            vpmoe_compiler::plan::PLAN_FORMAT
        );
    }
    let (graph, rebuilt) = compile_arch(&plan.arch)?;
    if plan.fingerprint != rebuilt.fingerprint {
        bail!(
            "{}: fingerprint {} does not match {} (its architecture under {}); recompile it with this vpmoec",
            path.display(),
            &plan.fingerprint[..16.min(plan.fingerprint.len())],
            &rebuilt.fingerprint[..16],
            vpmoe_compiler::plan::COMPILER_VERSION
        );
    }
    if rebuilt.params != plan.params {
        bail!("{}: parameter table differs from its architecture's", path.display());
    }
    Ok((graph, plan))
}

/// A seeded synthetic micro-batch: `rows` rows of `seq` random tokens, two documents per row,
/// every position supervised except each document's last, spans alternating reasoning/final.
pub fn synthetic_batch(vocab: u64, seq: usize, rows: usize, seed: u64) -> Batch {
    let mut rng = rng::Rng::new(seed);
    let t = seq * rows;
    let tokens: Vec<i32> = (0..t).map(|_| rng.below(vocab) as i32).collect();
    let doc: Vec<i32> = (0..t).map(|i| ((i % seq) >= seq / 2) as i32).collect();
    let mut b = Batch { seq, tokens, doc, loss_grad: 1.0, ..Default::default() };
    for i in 0..t {
        let next_same_doc = (i + 1) % seq != 0 && b.doc[i + 1] == b.doc[i];
        b.labels.push(if next_same_doc { b.tokens[i + 1] } else { -1 });
        b.loss_mask.push(next_same_doc as u8);
        b.span.push(if next_same_doc { 1 + ((i % seq) >= seq / 4) as u8 } else { 0 });
    }
    b.single_step_scale(1.0, 1.0);
    b
}

/// The bundled SYNTH sample (9 rows), rendered with the real o200k Harmony tokenizer into a token
/// dataset at `out` (train and valid splits) unless one is already there. `seq_len` is the
/// structured-truncation budget (D8): the architecture's maximum, so no document is dropped.
pub fn bundled_sample_dataset(out: &Path, seq_len: usize) -> Result<std::path::PathBuf> {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tests/fixtures/synth_sample.parquet");
    let mut o = vpmoe_data::build_synth::BuildOptions::new(vec![sample], out.to_path_buf());
    o.seq_len = seq_len;
    o.valid_fraction = SAMPLE_VALID_FRACTION.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    if !out.join("manifest.json").is_file() {
        eprintln!("building the bundled SYNTH sample into {}", out.display());
    }
    // Re-run every time: an up-to-date build is reused as it is (build-synth is resumable),
    // one from an older layout is rebuilt.
    vpmoe_data::build_synth::build_synth(&o)?;
    Ok(out.to_path_buf())
}

/// Puts 2 of the sample's 9 rows into the held-out split (the split hashes `synth_id`).
const SAMPLE_VALID_FRACTION: &str = "0.25";

/// The non-blank lines of a JSONL input file with their 1-based numbers and a `FILE:LINE` label
/// for errors; an input without any is an error saying `what` it lacks.
pub fn jsonl_lines(path: &Path, what: &str) -> Result<Vec<(usize, String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<(usize, String, String)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, format!("{}:{}", path.display(), i + 1), l.to_string()))
        .collect();
    if lines.is_empty() {
        bail!("{}: no {what}", path.display());
    }
    Ok(lines)
}
