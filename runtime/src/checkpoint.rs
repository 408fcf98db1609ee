//! Checkpoints: `DIR/step_NNNNNNNN/` holding `state.safetensors` (model-dtype weights, fp32
//! masters, optimizer moments) and `meta.json` (provenance, data cursor, RNG, schedule). A
//! checkpoint is written under a temporary name and renamed into place, older ones beyond
//! `keep` are removed afterwards, so a crash never leaves a partial checkpoint and never costs
//! the last good one.

use crate::state::TrainState;
use anyhow::{bail, ensure, Context, Result};
use half::bf16;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vpmoe_compiler::Plan;
use vpmoe_ir::DType;

pub const FORMAT: u32 = 1;

/// Everything a checkpoint records besides the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub step: u64,
    pub git_sha: String,
    /// SHA-256 of the architecture's canonical JSON.
    pub config_hash: String,
    pub plan_fingerprint: String,
    pub tokenizer_sha256: String,
    pub dataset_manifest_sha256: String,
    /// The run's semantic settings (resume refuses a different one).
    pub train: serde_json::Value,
    pub rng: Rng,
    pub data_cursor: vpmoe_data::reader::Cursor,
    /// Expert biases per MoE layer (also in the tensors; here for reading at a glance).
    pub expert_bias: BTreeMap<String, Vec<f32>>,
    pub lr_schedule: LrState,
    /// Extra trainer state (e.g. running means of later stages), by name.
    #[serde(default)]
    pub scalars: BTreeMap<String, f64>,
    /// SHA-256 of `state.safetensors` and of the fp32 masters (the bitwise model checksum).
    pub state_sha256: String,
    pub master_sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rng {
    pub seed: u64,
    pub state: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrState {
    pub schedule: vpmoe_ir::optim::Schedule,
    /// LR of the last applied update and of the next one.
    pub last_lr: f64,
    pub next_lr: f64,
}

/// The metadata of a step-0 checkpoint made from other weights (`import hf`, `upcycle`): the
/// provenance of this build and `plan`, no data or schedule yet, `train` saying where it came from.
pub fn step0_meta(plan: &Plan, train: serde_json::Value, seed: u64, expert_bias: BTreeMap<String, Vec<f32>>) -> Meta {
    Meta {
        format: FORMAT,
        step: 0,
        git_sha: env!("VPMOE_GIT_SHA").to_string(),
        config_hash: sha256_hex(plan.arch.canonical_json().as_bytes()),
        plan_fingerprint: plan.fingerprint.clone(),
        tokenizer_sha256: vpmoe_data::tokenizer::vocabulary_sha256(),
        dataset_manifest_sha256: String::new(),
        train,
        rng: Rng { seed, state: 0 },
        data_cursor: Default::default(),
        expert_bias,
        lr_schedule: LrState { schedule: vpmoe_ir::optim::Schedule::constant(0.0, 1), last_lr: 0.0, next_lr: 0.0 },
        scalars: Default::default(),
        state_sha256: String::new(),
        master_sha256: String::new(),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    vpmoe_ir::hex(&Sha256::digest(bytes))
}

fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step_{step:08}"))
}

/// Saves `st` with `meta` (whose checksums are filled in here); returns the checkpoint path.
pub fn save(dir: &Path, plan: &Plan, st: &TrainState, mut meta: Meta, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes = encode(plan, st)?;
    meta.state_sha256 = sha256_hex(&bytes);
    meta.master_sha256 = st.checksum();
    let fin = step_dir(dir, meta.step);
    let tmp = dir.join(format!(".step_{:08}.tmp-{}", meta.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let write = || -> Result<()> {
        std::fs::write(tmp.join("state.safetensors"), &bytes)?;
        std::fs::write(tmp.join("meta.json"), serde_json::to_string_pretty(&meta)?)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint into {}", tmp.display())));
    }
    if fin.exists() {
        let old = dir.join(format!(".step_{:08}.old-{}", meta.step, std::process::id()));
        std::fs::rename(&fin, &old)?;
        std::fs::rename(&tmp, &fin)?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &fin).with_context(|| format!("renaming into {}", fin.display()))?;
    }
    let all = list(dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(old).with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(fin)
}

/// Complete checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("step_").and_then(|n| n.parse::<u64>().ok()) {
            if p.join("meta.json").is_file() && p.join("state.safetensors").is_file() {
                out.push((n, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint in `dir`.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// The checkpoint `--resume` continues from: the newest one, which must be complete. A checkpoint
/// is renamed into place only once written, so a `step_N` missing a file was damaged after the
/// fact; resuming from an older one instead would silently drop steps, so it is an error that
/// names both.
pub fn resumable(dir: &Path) -> Result<Option<PathBuf>> {
    let newest = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("step_").and_then(|n| n.parse::<u64>().ok()).map(|n| (n, e.path()))
        })
        .max();
    let complete = latest(dir)?;
    match newest {
        Some((_, p)) if Some(&p) != complete.as_ref() => {
            let missing: Vec<&str> =
                ["meta.json", "state.safetensors"].into_iter().filter(|f| !p.join(f).is_file()).collect();
            let older = complete.map_or("no complete checkpoint is left".to_string(), |c| {
                format!("remove it to resume from {}, the newest complete one", c.display())
            });
            bail!("{} is incomplete (missing {}): {older}", p.display(), missing.join(", "))
        }
        _ => Ok(complete),
    }
}

fn encode(plan: &Plan, st: &TrainState) -> Result<Vec<u8>> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, p) in plan.params.iter().enumerate() {
        let shape = p.ty.shape(0);
        let f32s = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        let model = if p.ty.dtype == DType::Bf16 {
            let b: Vec<u16> = st.master[i].iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
            (Dtype::BF16, bytemuck::cast_slice::<u16, u8>(&b).to_vec())
        } else {
            (Dtype::F32, f32s(&st.master[i]))
        };
        bufs.push((format!("model/{}", p.name), model.0, shape.clone(), model.1));
        bufs.push((format!("master/{}", p.name), Dtype::F32, shape.clone(), f32s(&st.master[i])));
        if !st.m[i].is_empty() {
            bufs.push((format!("opt.m/{}", p.name), Dtype::F32, shape.clone(), f32s(&st.m[i])));
            let vshape = if st.v[i].len() == st.m[i].len() { shape } else { vec![st.v[i].len()] };
            bufs.push((format!("opt.v/{}", p.name), Dtype::F32, vshape, f32s(&st.v[i])));
        }
    }
    let views: Vec<(String, TensorView)> =
        bufs.iter().map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?))).collect::<Result<_>>()?;
    let mut md = std::collections::HashMap::new();
    md.insert("step".to_string(), st.step.to_string());
    Ok(safetensors::serialize(views, Some(md))?)
}

/// A checkpoint's metadata.
pub fn read_meta(path: &Path) -> Result<Meta> {
    let mp = path.join("meta.json");
    let text = std::fs::read_to_string(&mp).with_context(|| format!("reading {}", mp.display()))?;
    let meta: Meta =
        serde_json::from_str(&text).with_context(|| format!("{}: not a vpmoe checkpoint", mp.display()))?;
    ensure!(meta.format == FORMAT, "{}: checkpoint format {} (this build reads {FORMAT})", mp.display(), meta.format);
    Ok(meta)
}

/// Loads a checkpoint's metadata and state, validating every tensor against the plan.
pub fn load(path: &Path, plan: &Plan) -> Result<(Meta, TrainState)> {
    let meta = read_meta(path)?;
    let sp = path.join("state.safetensors");
    let bytes = std::fs::read(&sp).with_context(|| format!("reading {}", sp.display()))?;
    if sha256_hex(&bytes) != meta.state_sha256 {
        bail!("{}: contents do not match the checksum in meta.json (damaged or replaced)", sp.display());
    }
    let t =
        safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not safetensors", sp.display()))?;
    let mut st = TrainState { step: meta.step, master: Vec::new(), m: Vec::new(), v: Vec::new() };
    for p in &plan.params {
        let (n, nm, nv) = TrainState::sizes(p);
        let get = |kind: &str, want: usize| -> Result<Vec<f32>> {
            if want == 0 {
                return Ok(Vec::new());
            }
            let name = format!("{kind}/{}", p.name);
            let v = t.tensor(&name).with_context(|| format!("{}: missing tensor {name}", sp.display()))?;
            ensure!(v.dtype() == Dtype::F32, "{}: {name} is {:?}, expected F32", sp.display(), v.dtype());
            let data: Vec<f32> =
                v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            ensure!(data.len() == want, "{}: {name} has {} elements, the plan needs {want}", sp.display(), data.len());
            Ok(data)
        };
        st.master.push(get("master", n)?);
        st.m.push(get("opt.m", nm)?);
        st.v.push(get("opt.v", nv)?);
    }
    if st.checksum() != meta.master_sha256 {
        bail!("{}: master weights do not match the checksum in meta.json", sp.display());
    }
    Ok((meta, st))
}
