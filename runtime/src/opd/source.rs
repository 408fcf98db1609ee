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
//!
//! Data parallel, each rank samples and scores the rollouts of its own micro-batches (the rows
//! one rank would give them, the same draws) and the step's statistics are summed over ranks.

use super::curriculum::Phase;
use super::rollout::{self, Prompts, Rollouts, Sampler};
use super::{OpdConfig, OpdRecord, OpdRun};
use crate::backend::{seed, span_counts, Backend};
use crate::checkpoint::Meta;
use crate::decode::sampler::uniform;
use crate::dist::Dist;
use crate::teacher::client::Client;
use crate::train::{Datasets, Drawn, Source, TrainConfig};
use anyhow::{anyhow, ensure, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use vpmoe_compiler::Plan;
use vpmoe_ir::rng::splitmix64;

/// The draw stream that decides anchor steps.
const ANCHOR_STREAM: u64 = 3;

/// DISTILL.md's policy when the rollout buffer runs dry (the trainer waited for rollouts longer
/// than half the time it spent training the step before): first cap the generation length, by a
/// quarter each time down to a quarter of `--max-new-tokens`, then move the high-effort share to
/// medium, a quarter at a time. Every change is a line in the log and in the step's record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throttle {
    /// Completion tokens per rollout now.
    pub cap: usize,
    /// Share of the curriculum's high-effort prompts sampled at medium effort instead.
    pub high_cut: f64,
}

impl Throttle {
    pub fn new(max_new_tokens: usize) -> Throttle {
        Throttle { cap: max_new_tokens, high_cut: 0.0 }
    }

    /// After a step that waited `stall` seconds for rollouts, `trained` seconds after the one
    /// before: the change it makes, said in words.
    pub fn update(&mut self, stall: f64, trained: f64, max_new_tokens: usize) -> Option<String> {
        if stall <= 0.5 * trained {
            return None;
        }
        let dry = format!("the rollout buffer ran dry (the trainer waited {stall:.1} s, training took {trained:.1} s)");
        let floor = (max_new_tokens / 4).max(1);
        if self.cap > floor {
            self.cap = (self.cap * 3 / 4).max(floor);
            Some(format!("{dry}: generation capped at {} tokens", self.cap))
        } else if self.high_cut < 1.0 {
            self.high_cut = (self.high_cut + 0.25).min(1.0);
            Some(format!("{dry}: {:.0}% of high-effort prompts now sampled at medium effort", 100.0 * self.high_cut))
        } else {
            None
        }
    }
}

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
    pending: Option<(u64, JoinHandle<Result<Rollouts>>)>,
    throttle: Throttle,
    /// When the last draw returned (the trainer has trained since).
    last_draw: Option<Instant>,
    dist: Dist,
}

impl Opd {
    /// Connects to the teacher and opens the prompts and the anchor's datasets.
    pub fn open(
        plan: &Plan,
        data: &[(PathBuf, f64)],
        cfg: &TrainConfig,
        run: &OpdRun,
        steps: u64,
        dist: &Dist,
    ) -> Result<Opd> {
        let opd = cfg.opd.clone().context("internal: an OPD source without OPD settings")?;
        let max_new_tokens = opd.max_new_tokens;
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
            anchor: Datasets::open(data, cfg, dist)?,
            sampler: Arc::new(sampler),
            blend: data.len(),
            steps,
            opd_tokens: 0,
            opd_steps: 0,
            anchor_steps: 0,
            discarded: 0,
            pending: None,
            throttle: Throttle::new(max_new_tokens),
            last_draw: None,
            dist: dist.clone(),
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

    /// The curriculum's phase now, with the throttle's share of high effort moved to medium.
    fn phase(&self) -> Phase {
        self.cfg().curriculum.at(self.position()).with_high_cut(self.throttle.high_cut)
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
        if let Some((s, handle)) = self.pending.take() {
            let got = handle.join().map_err(|_| anyhow!("the rollout sampler panicked"))?;
            if s == step {
                return Ok((got?, t0.elapsed().as_secs_f64()));
            }
            self.discarded += self.sampler.rows as u64;
        }
        let (phase, cap) = (self.phase(), self.throttle.cap);
        let share = self.dist.share(self.sampler.rows);
        let r = rollout::sample(&self.sampler, &be.decode_on(), &be.weights()?, step, &phase, cap, share)?;
        Ok((r, t0.elapsed().as_secs_f64()))
    }

    /// At `max_lag` 1: samples step `next`'s rollouts in the background from `be`'s weights.
    fn prefetch(&mut self, be: &dyn Backend, next: u64) -> Result<()> {
        if self.cfg().max_lag == 0 || next >= self.steps || self.is_anchor(next) {
            return Ok(());
        }
        let (state, sampler, phase, cap) = (be.weights()?, self.sampler.clone(), self.phase(), self.throttle.cap);
        let (on, share) = (be.decode_on(), self.dist.share(self.sampler.rows));
        let handle = std::thread::Builder::new()
            .name("opd-sampler".into())
            .spawn(move || rollout::sample(&sampler, &on, &state, next, &phase, cap, share))
            .context("starting the rollout sampler")?;
        self.pending = Some((next, handle));
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
            self.last_draw = Some(Instant::now());
            return Ok(d);
        }
        self.opd_steps += 1;
        let mut rec = self.record();
        let trained = self.last_draw.map(|t| t.elapsed().as_secs_f64());
        let (r, stall) = self.rollouts(be, step)?;
        // The slowest rank's times, so every rank throttles alike.
        let mut times = [stall, trained.unwrap_or(0.0), r.sample_seconds, r.score_seconds];
        self.dist.all_max_f64(&mut times)?;
        let [stall, slowest, sample_s, score_s] = times;
        let trained = trained.map(|_| slowest);
        // Only a pipelined step waits on a buffer; a synchronous one samples by design.
        if let (Some(trained), 1) = (trained, r.policy_step.abs_diff(step)) {
            rec.note = self.throttle.update(stall, trained, self.cfg().max_new_tokens);
        }
        let lag = step - r.policy_step;
        ensure!(lag <= self.cfg().max_lag, "internal: rollouts of step {} trained at step {step}", r.policy_step);
        let mut batches = rollout::batches(&r.rows, cfg.seq_len, cfg.micro_batch, self.cfg().ratio_clip);
        // The whole step's sums: span tokens, rollouts and completion tokens per effort, valid
        // rollouts, rollouts, floored teacher values.
        let mut sums = span_counts(&batches).to_vec();
        sums.extend([0u64; 9]);
        for x in &r.rows {
            let m = x.effort as usize; // low, medium, high
            sums[3 + m] += 1;
            sums[6 + m] += x.completion.len() as u64;
        }
        sums[9] = r.rows.iter().filter(|x| x.valid).count() as u64;
        sums[10] = r.rows.len() as u64;
        sums[11] = r.floored;
        self.dist.all_reduce_u64(&mut sums)?;
        let counts = [sums[0], sums[1], sums[2]];
        seed(&mut batches, &plan.arch, cfg.span_weights, &counts, cfg.grad_accum);
        self.opd_tokens += counts[1] + counts[2];
        rec.modes = [sums[3], sums[4], sums[5]];
        rec.length_by_mode =
            [0, 1, 2].map(|m| if sums[3 + m] > 0 { sums[6 + m] as f64 / sums[3 + m] as f64 } else { 0.0 });
        let sampled = (sums[6] + sums[7] + sums[8]) as f64;
        rec.valid_rate = sums[9] as f64 / sums[10].max(1) as f64;
        rec.phase = r.phase.clone();
        rec.opd_tokens = self.opd_tokens;
        rec.lag = lag;
        rec.stall_s = stall;
        rec.sample_tok_s = sampled / sample_s.max(1e-9);
        rec.score_tok_s = sampled / score_s.max(1e-9);
        rec.teacher_floored = sums[11];
        self.prefetch(be, step + 1)?;
        rec.buffer = self.pending.is_some() as usize;
        (rec.cap, rec.high_cut) = (self.throttle.cap, self.throttle.high_cut);
        self.last_draw = Some(Instant::now());
        Ok(Drawn { batches, counts, rows_per_dataset: vec![0; self.blend], kd: None, opd: Some(rec) })
    }

    fn save(&self, meta: &mut Meta) {
        self.anchor.save(meta);
        let in_flight = if self.pending.is_some() { self.sampler.rows as u64 } else { 0 };
        for (k, v) in [
            ("opd_tokens", self.opd_tokens),
            ("opd_steps", self.opd_steps),
            ("opd_anchor_steps", self.anchor_steps),
            ("opd_discarded", self.discarded + in_flight),
            ("opd_cap", self.throttle.cap as u64),
        ] {
            meta.scalars.insert(k.into(), v as f64);
        }
        meta.scalars.insert("opd_high_cut".into(), self.throttle.high_cut);
    }

    fn restore(&mut self, meta: &Meta) -> Result<()> {
        self.anchor.restore(meta)?;
        let get = |k: &str| meta.scalars.get(k).copied().unwrap_or(0.0) as u64;
        self.opd_tokens = get("opd_tokens");
        self.opd_steps = get("opd_steps");
        self.anchor_steps = get("opd_anchor_steps");
        self.discarded = get("opd_discarded");
        self.throttle = Throttle {
            cap: get("opd_cap") as usize,
            high_cut: meta.scalars.get("opd_high_cut").copied().unwrap_or(0.0),
        };
        if self.throttle.cap == 0 {
            self.throttle.cap = self.cfg().max_new_tokens;
        }
        self.pending = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_buffer_caps_generation_then_lowers_the_high_share_and_says_so() {
        let mut t = Throttle::new(100);
        assert_eq!(t.update(1.0, 4.0, 100), None, "a short wait changes nothing");
        let mut notes = Vec::new();
        while let Some(n) = t.update(3.0, 4.0, 100) {
            notes.push(n);
        }
        assert_eq!(notes.len(), 5 + 4, "{notes:#?}");
        assert!(notes[0].contains("waited 3.0 s") && notes[0].ends_with("generation capped at 75 tokens"));
        assert!(notes[4].ends_with("capped at 25 tokens"), "{}", notes[4]);
        assert!(notes[5].ends_with("25% of high-effort prompts now sampled at medium effort"), "{}", notes[5]);
        assert_eq!(t, Throttle { cap: 25, high_cut: 1.0 });
        let p = crate::opd::curriculum::Curriculum::default().phase[3].with_high_cut(0.5);
        assert!((p.medium - 0.6).abs() < 1e-12 && (p.high - 0.3).abs() < 1e-12);
    }
}
