//! Stage 3 as the training loop's [`Source`]: each step is either a CE-anchor step (rows of the
//! SYNTH datasets, the stage-1 objective) or an OPD step (one rollout per row). Which one is a
//! function of the seed and the step, and so are a step's prompts and samples, so a synchronous
//! run (`max_lag` 0) is bitwise reproducible and resumes bitwise.
//!
//! At `max_lag` 1 the source is a two-stage pipeline with a buffer of one step: drawing step k
//! hands a snapshot of the weights step k trains from to a background sampler, which samples
//! and scores step k + 1's rollouts while the trainer trains step k. Step k + 1 then trains, at
//! lag 1, on rollouts whose sampler log-probabilities come from the weights before step k's
//! update; `Op::TokenWeight` recomputes the student's at the current weights and truncates the
//! ratio. The snapshot is the weight-sync point (a dedicated sampler device would receive it
//! there). Rollouts never wait longer: a step's rollouts come from the weights of its own step
//! or the one before. Rollouts in flight when a checkpoint is written are discarded by a resume
//! and counted.

use super::curriculum::Phase;
use super::rollout::{self, Prompts, Rollouts, Sampler};
use super::{OpdConfig, OpdRecord, OpdRun};
use crate::backend::{seed_step, Backend};
use crate::checkpoint::Meta;
use crate::decode::sampler::uniform;
use crate::teacher::client::Client;
use crate::train::{Datasets, Drawn, Source, TrainConfig};
use anyhow::{anyhow, ensure, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use vpmoe_compiler::Plan;
use vpmoe_data::harmony::ReasoningEffort;
use vpmoe_ir::rng::splitmix64;

/// The draw stream that decides anchor steps.
const ANCHOR_STREAM: u64 = 3;

pub struct Opd {
    anchor: Datasets,
    sampler: Arc<Sampler>,
    blend: usize,
    /// The run's last step: nothing is sampled beyond it.
    steps: u64,
    opd_tokens: u64,
    opd_steps: u64,
    anchor_steps: u64,
    discarded: u64,
    /// At `max_lag` 1: the next step's rollouts in flight, and that step.
    pending: Option<(u64, usize, JoinHandle<Result<Rollouts>>)>,
}

impl Opd {
    /// Connects to the teacher and opens the prompts and the anchor's datasets.
    pub fn open(plan: &Plan, data: &[(PathBuf, f64)], cfg: &TrainConfig, run: &OpdRun, steps: u64) -> Result<Opd> {
        let opd = cfg.opd.clone().context("internal: an OPD source without OPD settings")?;
        crate::decode::sample::require_harmony(plan)?;
        let prompts = Prompts::open(&run.prompts)?;
        ensure!(!prompts.is_empty(), "--opd-prompts {}: no documents", run.prompts.display());
        let teacher = Client::connect(run.teacher.clone()).context("--opd-teacher")?;
        let sampler = Sampler {
            graph: vpmoe_compiler::lower::lower(&plan.arch),
            plan: plan.clone(),
            prompts,
            teacher,
            cfg: opd,
            seed: cfg.seed,
            seq_len: cfg.seq_len,
            rows: cfg.micro_batch * cfg.grad_accum,
        };
        Ok(Opd {
            anchor: Datasets::open(data, cfg)?,
            sampler: Arc::new(sampler),
            blend: data.len(),
            steps,
            opd_tokens: 0,
            opd_steps: 0,
            anchor_steps: 0,
            discarded: 0,
            pending: None,
        })
    }

    fn cfg(&self) -> &OpdConfig {
        &self.sampler.cfg
    }

    fn is_anchor(&self, step: u64) -> bool {
        uniform(splitmix64(self.sampler.seed ^ 0x616e_6368_6f72), step, ANCHOR_STREAM) < self.cfg().ce_anchor
    }

    /// Fraction of the token budget trained on so far.
    fn position(&self) -> f64 {
        self.opd_tokens as f64 / self.cfg().token_budget as f64
    }

    fn phase(&self) -> Phase {
        self.cfg().curriculum.at(self.position()).clone()
    }

    fn record(&self) -> OpdRecord {
        let all = (self.opd_steps + self.anchor_steps).max(1);
        OpdRecord {
            anchor_share: self.anchor_steps as f64 / all as f64,
            phase: self.phase().name,
            position: self.position(),
            opd_tokens: self.opd_tokens,
            discarded: self.discarded,
            ..OpdRecord::default()
        }
    }

    /// Step `step`'s rollouts: the ones sampled in the background if they are that step's,
    /// else sampled now from the current weights. Returns them and the seconds waited.
    fn rollouts(&mut self, be: &dyn Backend, step: u64) -> Result<(Rollouts, f64)> {
        let t0 = Instant::now();
        if let Some((s, rows, handle)) = self.pending.take() {
            let got = handle.join().map_err(|_| anyhow!("the rollout sampler panicked"))?;
            if s == step {
                return Ok((got?, t0.elapsed().as_secs_f64()));
            }
            self.discarded += rows as u64;
        }
        let phase = self.phase();
        let r = rollout::sample(&self.sampler, &be.state()?, step, &phase)?;
        Ok((r, t0.elapsed().as_secs_f64()))
    }

    /// At `max_lag` 1: samples step `next`'s rollouts in the background from `be`'s weights.
    fn prefetch(&mut self, be: &dyn Backend, next: u64) -> Result<()> {
        if self.cfg().max_lag == 0 || next >= self.steps || self.is_anchor(next) {
            return Ok(());
        }
        let (state, sampler, phase) = (be.state()?, self.sampler.clone(), self.phase());
        let handle = std::thread::Builder::new()
            .name("opd-sampler".into())
            .spawn(move || rollout::sample(&sampler, &state, next, &phase))
            .context("starting the rollout sampler")?;
        self.pending = Some((next, self.sampler.rows, handle));
        Ok(())
    }
}

impl Source for Opd {
    fn draw(&mut self, plan: &Plan, cfg: &TrainConfig, be: &dyn Backend) -> Result<Drawn> {
        let step = be.step_count();
        if self.is_anchor(step) {
            self.anchor_steps += 1;
            let mut d = self.anchor.draw(plan, cfg, be)?;
            d.opd = Some(OpdRecord { anchor: true, buffer: self.pending.is_some() as usize, ..self.record() });
            return Ok(d);
        }
        self.opd_steps += 1;
        let mut rec = self.record();
        let (r, stall) = self.rollouts(be, step)?;
        let lag = step - r.policy_step;
        ensure!(lag <= self.cfg().max_lag, "internal: rollouts of step {} trained at step {step}", r.policy_step);
        let mut batches = rollout::batches(&r.rows, cfg.seq_len, cfg.micro_batch, self.cfg().ratio_clip);
        let counts = seed_step(&mut batches, &plan.arch, cfg.span_weights);
        self.opd_tokens += counts[1] + counts[2];
        let (mut len, sampled) = ([0u64; 3], r.rows.iter().map(|x| x.completion.len()).sum::<usize>() as f64);
        for x in &r.rows {
            let m = match x.effort {
                ReasoningEffort::Low => 0,
                ReasoningEffort::Medium => 1,
                ReasoningEffort::High => 2,
            };
            rec.modes[m] += 1;
            len[m] += x.completion.len() as u64;
        }
        rec.length_by_mode =
            [0, 1, 2].map(|m| if rec.modes[m] > 0 { len[m] as f64 / rec.modes[m] as f64 } else { 0.0 });
        rec.valid_rate = r.rows.iter().filter(|x| x.valid).count() as f64 / r.rows.len().max(1) as f64;
        rec.phase = r.phase.clone();
        rec.opd_tokens = self.opd_tokens;
        rec.lag = lag;
        rec.stall_s = stall;
        rec.sample_tok_s = sampled / r.sample_seconds.max(1e-9);
        rec.score_tok_s = sampled / r.score_seconds.max(1e-9);
        rec.teacher_floored = r.floored;
        self.prefetch(be, step + 1)?;
        rec.buffer = self.pending.is_some() as usize;
        Ok(Drawn { batches, counts, rows_per_dataset: vec![0; self.blend], kd: None, opd: Some(rec) })
    }

    fn save(&self, meta: &mut Meta) {
        self.anchor.save(meta);
        let in_flight = self.pending.as_ref().map_or(0, |p| p.1 as u64);
        for (k, v) in [
            ("opd_tokens", self.opd_tokens),
            ("opd_steps", self.opd_steps),
            ("opd_anchor_steps", self.anchor_steps),
            ("opd_discarded", self.discarded + in_flight),
        ] {
            meta.scalars.insert(k.into(), v as f64);
        }
    }

    fn restore(&mut self, meta: &Meta) -> Result<()> {
        self.anchor.restore(meta)?;
        let get = |k: &str| meta.scalars.get(k).copied().unwrap_or(0.0) as u64;
        self.opd_tokens = get("opd_tokens");
        self.opd_steps = get("opd_steps");
        self.anchor_steps = get("opd_anchor_steps");
        self.discarded = get("opd_discarded");
        self.pending = None;
        Ok(())
    }
}
