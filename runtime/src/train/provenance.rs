//! A run's identity: what its checkpoints record (provenance, the settings, the RNG, the data
//! stream, the schedule) and what `--resume` refuses to continue across.

use super::source::Source;
use super::TrainConfig;
use crate::backend::Backend;
use crate::checkpoint::{self, LrState, Meta, Part, Rng};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use vpmoe_compiler::Plan;

/// Identity of the inputs of a run, for provenance and resume checks.
pub struct Provenance {
    pub config_hash: String,
    pub dataset_manifest_sha256: String,
}

impl Provenance {
    /// One dataset: the SHA-256 of its manifest; a blend: of its manifests' hashes and weights.
    pub fn new(plan: &Plan, data: &[(PathBuf, f64)]) -> Result<Provenance> {
        let mut hashes = Vec::new();
        for (d, w) in data {
            let manifest = d.join("manifest.json");
            let bytes = std::fs::read(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
            hashes.push((checkpoint::sha256_hex(&bytes), *w));
        }
        let dataset_manifest_sha256 = match hashes.as_slice() {
            [(h, _)] => h.clone(),
            _ => {
                let text: Vec<String> = hashes.iter().map(|(h, w)| format!("{h}:{w}")).collect();
                checkpoint::sha256_hex(text.join("\n").as_bytes())
            }
        };
        Ok(Provenance {
            config_hash: checkpoint::sha256_hex(plan.arch.canonical_json().as_bytes()),
            dataset_manifest_sha256,
        })
    }
}

/// Lists what differs between a checkpoint's run and this one.
pub(super) fn differences(meta: &Meta, plan: &Plan, cfg: &TrainConfig, prov: &Provenance) -> Vec<String> {
    let mut d = Vec::new();
    let short = |s: &str| s.chars().take(16).collect::<String>();
    if meta.plan_fingerprint != plan.fingerprint {
        d.push(format!(
            "plan fingerprint: checkpoint {} vs this plan {}",
            short(&meta.plan_fingerprint),
            short(&plan.fingerprint)
        ));
    }
    if meta.config_hash != prov.config_hash {
        d.push(format!(
            "architecture config hash: checkpoint {} vs {}",
            short(&meta.config_hash),
            short(&prov.config_hash)
        ));
    }
    if meta.tokenizer_sha256 != vpmoe_data::tokenizer::vocabulary_sha256() {
        d.push("tokenizer vocabulary".into());
    }
    if meta.dataset_manifest_sha256 != prov.dataset_manifest_sha256 {
        d.push(format!(
            "dataset manifest: checkpoint {} vs {}",
            short(&meta.dataset_manifest_sha256),
            short(&prov.dataset_manifest_sha256)
        ));
    }
    let now = serde_json::to_value(cfg).expect("serialisable");
    if let (Some(a), Some(b)) = (meta.train.as_object(), now.as_object()) {
        for (k, v) in b {
            if a.get(k) != Some(v) {
                d.push(format!(
                    "{k}: checkpoint {} vs {v}",
                    a.get(k).map(|x| x.to_string()).unwrap_or("absent".into())
                ));
            }
        }
    }
    d
}

/// The checkpoints of one run: where they go, how many are kept, and what they record.
pub(super) struct Checkpoints<'a> {
    pub plan: &'a Plan,
    pub cfg: &'a TrainConfig,
    pub prov: Provenance,
    pub dir: &'a Path,
    pub keep: usize,
    /// The data-parallel job; its rank 0 finishes each checkpoint and reports.
    pub dist: &'a crate::dist::Dist,
}

impl Checkpoints<'_> {
    /// Saves `be` and the stream `source` (keeping the newest `keep`); returns the checkpoint's
    /// path and the masters' checksum. A collective: each rank writes its part
    /// ([`checkpoint::save_part`]).
    pub(super) fn save(&self, be: &dyn Backend, source: &dyn Source, rng: &Rng) -> Result<(PathBuf, String)> {
        let (plan, cfg) = (self.plan, self.cfg);
        let whole;
        let shard = be.shard()?;
        let (part, st) = match &shard {
            Some((sh, st)) => (Part::Shard(sh, st), *st),
            None => {
                whole = be.state()?;
                (Part::Whole(&whole), &whole)
            }
        };
        let lr = |s: u64| cfg.schedule.lr_at(s);
        let mut meta = Meta {
            format: checkpoint::FORMAT,
            step: st.step,
            git_sha: env!("VPMOE_GIT_SHA").to_string(),
            config_hash: self.prov.config_hash.clone(),
            plan_fingerprint: plan.fingerprint.clone(),
            tokenizer_sha256: vpmoe_data::tokenizer::vocabulary_sha256(),
            dataset_manifest_sha256: self.prov.dataset_manifest_sha256.clone(),
            train: serde_json::to_value(cfg)?,
            rng: rng.clone(),
            data_cursor: Default::default(),
            expert_bias: plan
                .params
                .iter()
                .zip(&st.master)
                .filter(|(p, _)| matches!(p.role, vpmoe_ir::Role::ExpertBias { .. }))
                .map(|(p, w)| (p.name.clone(), w.clone()))
                .collect(),
            lr_schedule: LrState {
                schedule: cfg.schedule.clone(),
                last_lr: if st.step > 0 { lr(st.step - 1) } else { 0.0 },
                next_lr: lr(st.step),
            },
            scalars: Default::default(),
            state_sha256: String::new(),
            master_sha256: String::new(),
        };
        source.save(&mut meta);
        checkpoint::save_part(self.dir, plan, part, meta, self.keep, self.dist)
    }

    /// Continues the run of the newest checkpoint: the backend's state, the stream and the RNG;
    /// refuses a checkpoint of a different run, naming every difference.
    pub(super) fn resume(&self, be: &mut dyn Backend, source: &mut dyn Source) -> Result<Rng> {
        let Some(p) = checkpoint::resumable(self.dir).context("--resume")? else {
            bail!("--resume: no checkpoint in {}", self.dir.display())
        };
        let diff = differences(&checkpoint::read_meta(&p)?, self.plan, self.cfg, &self.prov);
        if !diff.is_empty() {
            bail!("--resume: {} belongs to a different run:\n  {}", p.display(), diff.join("\n  "));
        }
        let (meta, st, shard) = match be.shares_optimizer() {
            true => checkpoint::load_share(&p, self.plan, self.dist).map(|(m, st, sh)| (m, st, Some(sh)))?,
            false => checkpoint::load(&p, self.plan).map(|(m, st)| (m, st, None))?,
        };
        source.restore(&meta).with_context(|| format!("resuming from {}", p.display()))?;
        match shard {
            Some(sh) => be.set_share(st, sh)?,
            None => be.set_state(st)?,
        }
        if self.dist.is_root() {
            eprintln!("resumed from {} (step {})", p.display(), meta.step);
        }
        Ok(meta.rng)
    }
}
