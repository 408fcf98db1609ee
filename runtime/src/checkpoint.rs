//! Checkpoints: `DIR/step_NNNNNNNN/` holding `state.safetensors` (model-dtype weights, fp32
//! masters, optimizer moments) and `meta.json` (provenance, data cursor, RNG, schedule). A
//! checkpoint is written under a temporary name and renamed into place, older ones beyond
//! `keep` are removed afterwards, so a crash never leaves a partial checkpoint and never costs
//! the last good one. In a data-parallel job every rank writes its part of the one file
//! ([`save_part`]).

use crate::dist::zero::{self, Shard};
use crate::dist::Dist;
use crate::state::TrainState;
use anyhow::{bail, ensure, Context, Result};
use half::bf16;
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
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

/// The training state one rank writes into a checkpoint.
pub enum Part<'a> {
    /// A whole state: one process, or one rank of a replicated optimizer, which writes the units
    /// ZeRO-1 would give it (so the ranks share the writing either way).
    Whole(&'a TrainState),
    /// ZeRO-1: this rank's shard; the state holds the replicated frozen masters and the step count.
    Shard(&'a Shard, &'a TrainState),
}

/// Saves a whole state with `meta` from one process; returns the checkpoint path.
pub fn save(dir: &Path, plan: &Plan, st: &TrainState, meta: Meta, keep: usize) -> Result<PathBuf> {
    Ok(save_part(dir, plan, Part::Whole(st), meta, keep, &Dist::single())?.0)
}

/// Every rank of `dist` calls this together: rank 0 lays out `state.safetensors` under a
/// temporary name, each rank writes its part into it, and once all have, rank 0 computes the
/// checksums (into its `meta`), writes `meta.json`, renames the directory into place and removes
/// checkpoints beyond the newest `keep`. Returns the path and the masters' checksum on every
/// rank. The directory must be on a filesystem every rank sees.
pub fn save_part(
    dir: &Path,
    plan: &Plan,
    part: Part,
    meta: Meta,
    keep: usize,
    dist: &Dist,
) -> Result<(PathBuf, String)> {
    let layout = Layout::new(plan, meta.step)?;
    let fin = step_dir(dir, meta.step);
    // Rank 0 creates the temporary directory and tells the others its name ("" if it failed).
    let made = if dist.is_root() { layout.create(dir, meta.step).map(Some) } else { Ok(None) };
    let mut name = match &made {
        Ok(Some(tmp)) => tmp.as_os_str().as_encoded_bytes().to_vec(),
        _ => Vec::new(),
    };
    dist.broadcast(&mut name, 0)?;
    made?;
    ensure!(!name.is_empty(), "rank 0 could not lay out checkpoint {}", fin.display());
    let tmp = PathBuf::from(String::from_utf8(name).context("checkpoint directory name")?);
    let wrote = layout.write_part(plan, &part, &tmp, dist);
    let mut failed = vec![0u64; dist.world()];
    failed[dist.rank.rank] = wrote.is_err() as u64;
    dist.all_reduce_u64(&mut failed)?;
    if failed.iter().any(|&f| f > 0) {
        if dist.is_root() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        wrote.with_context(|| format!("writing this rank's part of checkpoint {}", fin.display()))?;
        let ranks: Vec<String> =
            failed.iter().enumerate().filter(|(_, &f)| f > 0).map(|(r, _)| r.to_string()).collect();
        bail!("rank {} could not write its part of checkpoint {}", ranks.join(", "), fin.display());
    }
    // Rank 0 finishes and tells the others the masters' checksum ("" if it failed).
    let done = if dist.is_root() { finish(dir, plan, &layout, &tmp, &fin, meta, keep) } else { Ok(String::new()) };
    let mut sum = done.as_ref().map_or(Vec::new(), |s| s.as_bytes().to_vec());
    dist.broadcast(&mut sum, 0)?;
    done?;
    ensure!(!sum.is_empty(), "rank 0 could not finish checkpoint {}", fin.display());
    Ok((fin, String::from_utf8(sum).context("checksum")?))
}

/// Checksums, `meta.json`, the rename into place and the removal of old checkpoints; returns the
/// masters' checksum.
fn finish(
    dir: &Path,
    plan: &Plan,
    layout: &Layout,
    tmp: &Path,
    fin: &Path,
    mut meta: Meta,
    keep: usize,
) -> Result<String> {
    let sealed = (|| -> Result<()> {
        (meta.state_sha256, meta.master_sha256) = layout.checksums(plan, &tmp.join("state.safetensors"))?;
        std::fs::write(tmp.join("meta.json"), serde_json::to_string_pretty(&meta)?)?;
        Ok(())
    })();
    if let Err(e) = sealed {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e.context(format!("writing checkpoint into {}", tmp.display())));
    }
    if fin.exists() {
        let old = dir.join(format!(".step_{:08}.old-{}", meta.step, std::process::id()));
        std::fs::rename(fin, &old)?;
        std::fs::rename(tmp, fin)?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, fin).with_context(|| format!("renaming into {}", fin.display()))?;
    }
    let all = list(dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(old).with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(meta.master_sha256)
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

/// Where each tensor of `state.safetensors` lies, whoever writes it: per parameter `model/`
/// (bf16 where the parameter is), `master/`, and for trainable ones `opt.m/` and `opt.v/`, in the
/// safetensors crate's order (f32 before bf16, then by name: every tensor aligned).
struct Layout {
    /// The length prefix and the JSON header, padded to 8 bytes.
    header: Vec<u8>,
    /// File offsets of each parameter's tensors.
    slots: Vec<Slots>,
    len: u64,
}

#[derive(Clone, Copy, Default)]
struct Slots {
    model: u64,
    master: u64,
    m: u64,
    v: u64,
}

impl Layout {
    fn new(plan: &Plan, step: u64) -> Result<Layout> {
        // (name, dtype, shape, bytes, parameter, which of its slots)
        let mut ts = Vec::new();
        for (i, p) in plan.params.iter().enumerate() {
            let shape = p.ty.shape(0);
            let (n, nm, nv) = TrainState::sizes(p);
            let (dt, w) = if p.ty.dtype == DType::Bf16 { (Dtype::BF16, 2) } else { (Dtype::F32, 4) };
            ts.push((format!("model/{}", p.name), dt, shape.clone(), n * w, i, 0));
            ts.push((format!("master/{}", p.name), Dtype::F32, shape.clone(), n * 4, i, 1));
            if nm > 0 {
                let vshape = if nv == nm { shape.clone() } else { vec![nv] };
                ts.push((format!("opt.m/{}", p.name), Dtype::F32, shape, nm * 4, i, 2));
                ts.push((format!("opt.v/{}", p.name), Dtype::F32, vshape, nv * 4, i, 3));
            }
        }
        ts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let (mut infos, mut placed, mut at) = (Vec::new(), Vec::new(), 0usize);
        for (name, dtype, shape, bytes, i, slot) in ts {
            infos.push((name, safetensors::tensor::TensorInfo { dtype, shape, data_offsets: (at, at + bytes) }));
            placed.push((i, slot, at as u64));
            at += bytes;
        }
        let md = std::collections::HashMap::from([("step".to_string(), step.to_string())]);
        let mut json = serde_json::to_vec(&safetensors::tensor::Metadata::new(Some(md), infos)?)?;
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut header = (json.len() as u64).to_le_bytes().to_vec();
        header.extend(json);
        let base = header.len() as u64;
        let mut slots = vec![Slots::default(); plan.params.len()];
        for (i, slot, off) in placed {
            let s = &mut slots[i];
            *[&mut s.model, &mut s.master, &mut s.m, &mut s.v][slot] = base + off;
        }
        Ok(Layout { len: base + at as u64, header, slots })
    }

    /// Rank 0: a fresh temporary directory holding `state.safetensors` at its full length with
    /// the header written. Temporary directories an interrupted save left behind (one writer per
    /// directory: training holds its lock) are removed first.
    fn create(&self, dir: &Path, step: u64) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".step_") && (name.contains(".tmp-") || name.contains(".old-")) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let tmp = dir.join(format!(".step_{step:08}.tmp-{}", std::process::id()));
        let made = (|| -> Result<()> {
            std::fs::create_dir_all(&tmp)?;
            let f = std::fs::File::create(tmp.join("state.safetensors"))?;
            f.set_len(self.len)?;
            f.write_all_at(&self.header, 0)?;
            Ok(())
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("creating checkpoint {}", tmp.display())));
        }
        Ok(tmp)
    }

    /// Writes this rank's units (and on rank 0 the frozen parameters) into `tmp`'s file.
    fn write_part(&self, plan: &Plan, part: &Part, tmp: &Path, dist: &Dist) -> Result<()> {
        let path = tmp.join("state.safetensors");
        let f = std::fs::OpenOptions::new().write(true).open(&path).with_context(|| {
            format!("opening {} (the checkpoint directory must be on a filesystem every rank sees)", path.display())
        })?;
        let mut w = RunWriter { f: &f, plan, layout: self, run: None };
        let units = zero::units(plan);
        let st = match part {
            Part::Whole(st) => {
                let owners = zero::owners(&units, dist.world());
                for u in units.iter().zip(&owners).filter(|(_, &o)| o == dist.rank.rank).map(|(u, _)| u) {
                    let (m, v) = (&st.m[u.param][u.lo..u.hi], &st.v[u.param][u.v.0..u.v.1]);
                    w.add(u.param, u.lo, u.v.0, &st.master[u.param][u.lo..u.hi], m, v)?;
                }
                st
            }
            Part::Shard(sh, st) => {
                let (mut a, mut b) = (0, 0);
                for u in sh.units.iter().map(|&k| &units[k]) {
                    let (n, nv) = (u.len(), zero::v_len(u));
                    w.add(u.param, u.lo, u.v.0, &sh.master[a..a + n], &sh.m[a..a + n], &sh.v[b..b + nv])?;
                    (a, b) = (a + n, b + nv);
                }
                st
            }
        };
        if dist.is_root() {
            for i in (0..plan.params.len()).filter(|&i| !plan.params[i].trainable()) {
                w.add(i, 0, 0, &st.master[i], &[], &[])?;
            }
        }
        w.flush().with_context(|| format!("writing {}", path.display()))
    }

    /// SHA-256 of the whole file and of the masters in plan order, read back from `path`.
    fn checksums(&self, plan: &Plan, path: &Path) -> Result<(String, String)> {
        let f = std::fs::File::open(path).with_context(|| format!("reading back {}", path.display()))?;
        let mut whole = Sha256::new();
        hash_range(&f, &mut whole, 0, self.len)?;
        let mut master = Sha256::new();
        for (p, s) in plan.params.iter().zip(&self.slots) {
            hash_range(&f, &mut master, s.master, s.master + 4 * p.numel)?;
        }
        Ok((vpmoe_ir::hex(&whole.finalize()), vpmoe_ir::hex(&master.finalize())))
    }
}

/// Writes a rank's units, joining units that continue each other into one write per tensor.
struct RunWriter<'a> {
    f: &'a std::fs::File,
    plan: &'a Plan,
    layout: &'a Layout,
    run: Option<Run>,
}

/// Elements `[lo, lo + master.len())` of one parameter (second moments from `vlo`).
struct Run {
    param: usize,
    lo: usize,
    vlo: usize,
    master: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl RunWriter<'_> {
    /// Elements buffered before a run is written.
    const MAX: usize = 16 << 20;

    fn add(&mut self, param: usize, lo: usize, vlo: usize, master: &[f32], m: &[f32], v: &[f32]) -> Result<()> {
        let joins = self.run.as_ref().is_some_and(|r| {
            r.param == param && r.lo + r.master.len() == lo && r.vlo + r.v.len() == vlo && r.master.len() < Self::MAX
        });
        if !joins {
            self.flush()?;
            self.run = Some(Run { param, lo, vlo, master: Vec::new(), m: Vec::new(), v: Vec::new() });
        }
        let r = self.run.as_mut().expect("a run is open");
        r.master.extend_from_slice(master);
        r.m.extend_from_slice(m);
        r.v.extend_from_slice(v);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let Some(r) = self.run.take() else { return Ok(()) };
        let s = self.layout.slots[r.param];
        let bytes = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        if self.plan.params[r.param].ty.dtype == DType::Bf16 {
            let b: Vec<u16> = r.master.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
            self.f.write_all_at(bytemuck::cast_slice(&b), s.model + 2 * r.lo as u64)?;
        } else {
            self.f.write_all_at(&bytes(&r.master), s.model + 4 * r.lo as u64)?;
        }
        self.f.write_all_at(&bytes(&r.master), s.master + 4 * r.lo as u64)?;
        if !r.m.is_empty() {
            self.f.write_all_at(&bytes(&r.m), s.m + 4 * r.lo as u64)?;
            self.f.write_all_at(&bytes(&r.v), s.v + 4 * r.vlo as u64)?;
        }
        Ok(())
    }
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

/// Loads a checkpoint's metadata and state, validating every tensor against the plan. The file
/// is read piecewise (its checksum streamed, each tensor read into place), so loading holds the
/// state once.
pub fn load(path: &Path, plan: &Plan) -> Result<(Meta, TrainState)> {
    let o = Opened::new(path)?;
    o.verify()?;
    let mut st = o.masters(plan)?;
    for p in &plan.params {
        let (_, nm, nv) = TrainState::sizes(p);
        st.m.push(o.read("opt.m", &p.name, nm, 0, nm)?);
        st.v.push(o.read("opt.v", &p.name, nv, 0, nv)?);
    }
    Ok((o.meta, st))
}

/// ZeRO-1's resume: every parameter's masters (moments empty) and this rank's share of the
/// optimizer ([`Shard::take`]'s layout), reading only those moments. A collective: rank 0 alone
/// streams the file for its checksum and tells the others whether it matched.
pub fn load_share(path: &Path, plan: &Plan, dist: &Dist) -> Result<(Meta, TrainState, Shard)> {
    let o = Opened::new(path)?;
    let checked = if dist.is_root() { o.verify().err() } else { None };
    if dist.any(checked.is_some())? {
        return Err(checked.unwrap_or_else(|| anyhow::anyhow!("{}: rank 0 found it damaged", o.file.display())));
    }
    let mut st = o.masters(plan)?;
    st.m = vec![Vec::new(); plan.params.len()];
    st.v = vec![Vec::new(); plan.params.len()];
    let units = zero::units(plan);
    let owners = zero::owners(&units, dist.world());
    let mut sh = Shard::default();
    let mine: Vec<usize> = (0..units.len()).filter(|&k| owners[k] == dist.rank.rank).collect();
    // Consecutive units of one parameter are read together.
    for run in mine.chunk_by(|&a, &b| b == a + 1 && units[a].param == units[b].param) {
        let (first, last) = (&units[run[0]], &units[run[run.len() - 1]]);
        let p = &plan.params[first.param];
        let (_, nm, nv) = TrainState::sizes(p);
        sh.units.extend_from_slice(run);
        sh.master.extend_from_slice(&st.master[first.param][first.lo..last.hi]);
        sh.m.extend(o.read("opt.m", &p.name, nm, first.lo, last.hi)?);
        sh.v.extend(o.read("opt.v", &p.name, nv, first.v.0, last.v.1)?);
    }
    Ok((o.meta, st, sh))
}

/// An open checkpoint: its metadata and `state.safetensors` with the header parsed.
struct Opened {
    meta: Meta,
    file: std::path::PathBuf,
    f: std::fs::File,
    len: u64,
    /// Where the tensors start, and the header.
    base: u64,
    md: safetensors::tensor::Metadata,
}

impl Opened {
    fn new(path: &Path) -> Result<Opened> {
        let meta = read_meta(path)?;
        let file = path.join("state.safetensors");
        let f = std::fs::File::open(&file).with_context(|| format!("reading {}", file.display()))?;
        let len = f.metadata()?.len();
        let header = (|| -> Result<(u64, safetensors::tensor::Metadata)> {
            let mut n = [0u8; 8];
            f.read_exact_at(&mut n, 0)?;
            let n = u64::from_le_bytes(n);
            ensure!(n < len, "header length {n} beyond the file's {len} bytes");
            let mut json = vec![0u8; n as usize];
            f.read_exact_at(&mut json, 8)?;
            let md: safetensors::tensor::Metadata = serde_json::from_slice(&json)?;
            let end = 8 + n + md.data_len() as u64;
            ensure!(end == len, "tensors end at {end} of {len} bytes");
            Ok((8 + n, md))
        })();
        let (base, md) = header.with_context(|| format!("{}: not safetensors", file.display()))?;
        Ok(Opened { meta, file, f, len, base, md })
    }

    /// The whole file against the checksum in meta.json (streamed).
    fn verify(&self) -> Result<()> {
        let mut whole = Sha256::new();
        hash_range(&self.f, &mut whole, 0, self.len).with_context(|| format!("reading {}", self.file.display()))?;
        if vpmoe_ir::hex(&whole.finalize()) != self.meta.state_sha256 {
            bail!("{}: contents do not match the checksum in meta.json (damaged or replaced)", self.file.display());
        }
        Ok(())
    }

    /// Every parameter's masters (moments empty), checked against meta.json's checksum.
    fn masters(&self, plan: &Plan) -> Result<TrainState> {
        let mut st = TrainState { step: self.meta.step, master: Vec::new(), m: Vec::new(), v: Vec::new() };
        for p in &plan.params {
            let (n, _, _) = TrainState::sizes(p);
            st.master.push(self.read("master", &p.name, n, 0, n)?);
        }
        if st.checksum() != self.meta.master_sha256 {
            bail!("{}: master weights do not match the checksum in meta.json", self.file.display());
        }
        Ok(st)
    }

    /// Elements `lo..hi` of the f32 tensor `kind/name`, which the plan says has `want`.
    fn read(&self, kind: &str, name: &str, want: usize, lo: usize, hi: usize) -> Result<Vec<f32>> {
        if want == 0 {
            return Ok(Vec::new());
        }
        let (sp, name) = (self.file.display(), format!("{kind}/{name}"));
        let t = self.md.info(&name).with_context(|| format!("{sp}: missing tensor {name}"))?;
        ensure!(t.dtype == Dtype::F32, "{sp}: {name} is {:?}, expected F32", t.dtype);
        let got = (t.data_offsets.1 - t.data_offsets.0) / 4;
        ensure!(got == want, "{sp}: {name} has {got} elements, the plan needs {want}");
        let mut data = vec![0f32; hi - lo];
        let at = self.base + (t.data_offsets.0 + lo * 4) as u64;
        self.f.read_exact_at(bytemuck::cast_slice_mut(&mut data), at).with_context(|| format!("reading {sp}"))?;
        Ok(data)
    }
}

/// Adds bytes `[at, end)` of `f` to `h`.
fn hash_range(f: &std::fs::File, h: &mut Sha256, mut at: u64, end: u64) -> Result<()> {
    let mut buf = vec![0u8; (16 << 20).min(end.saturating_sub(at)) as usize];
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(())
}
