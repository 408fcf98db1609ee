//! Where a step's micro-batches come from. Stages 1 and 2 draw rows from a blend of token
//! datasets ([`Datasets`]); stage 3 draws on-policy rollouts (`crate::opd::Opd`).

use super::records::{kd_record, KdRecord};
use super::TrainConfig;
use crate::backend::{seed, span_counts, Backend, Batch};
use crate::checkpoint::Meta;
use crate::dist::Dist;
use anyhow::{Context, Result};
use std::path::PathBuf;
use vpmoe_compiler::Plan;
use vpmoe_data::reader::Reader;

/// The micro-batches of one step, with their span scales, seeds and loss inputs set.
pub struct Drawn {
    pub batches: Vec<Batch>,
    /// Supervised tokens per span over the whole step.
    pub counts: [u64; 3],
    /// Rows drawn from each dataset of the blend (in `--data` order).
    pub rows_per_dataset: Vec<u64>,
    /// Stage 2: the step's confidence-weight statistics and teacher positions.
    pub kd: Option<(KdRecord, u64)>,
    /// Stage 3: the step's rollouts and pipeline (the trained tokens' statistics are added
    /// after the forward).
    pub opd: Option<crate::opd::OpdRecord>,
}

/// A stream of training steps that a checkpoint can continue.
pub trait Source {
    /// The next step's micro-batches (`be` holds the weights that step trains from).
    fn draw(&mut self, plan: &Plan, cfg: &TrainConfig, be: &dyn Backend) -> Result<Drawn>;
    /// Records in `meta` what continues this stream.
    fn save(&self, meta: &mut Meta);
    /// Continues the stream a checkpoint recorded.
    fn restore(&mut self, meta: &Meta) -> Result<()>;
}

/// The running mean m of teacher log-probabilities (finite ones; −inf would make it −inf).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KdCenter {
    pub sum: f64,
    pub count: u64,
}

impl KdCenter {
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
    /// Fold in the teacher positions of a micro-batch.
    pub fn add(&mut self, b: &Batch) {
        for (&lp, &on) in b.teacher_logp.iter().zip(&b.teacher) {
            if on == crate::backend::WEIGHT_CONFIDENCE && lp.is_finite() {
                self.sum += lp as f64;
                self.count += 1;
            }
        }
    }
}

/// Rows from a weighted blend of token datasets (stage 1 CE; stage 2 confidence-weighted CE on
/// the rows that carry teacher log-probabilities, DISTILL.md 2B). A data-parallel rank reads only
/// its own micro-batches of each step (`Dist::mine`) and skips the others' rows, so every rank's
/// cursor stays where a one-rank reader's is; the step's span counts, rows per dataset and
/// teacher statistics are summed over the ranks before anything uses them.
pub struct Datasets {
    reader: Reader,
    blend: usize,
    center: KdCenter,
    dist: Dist,
}

impl Datasets {
    pub fn open(data: &[(PathBuf, f64)], cfg: &TrainConfig, dist: &Dist) -> Result<Datasets> {
        Ok(Datasets {
            reader: Reader::open(data, cfg.seq_len, cfg.seed)?,
            blend: data.len(),
            center: KdCenter::default(),
            dist: dist.clone(),
        })
    }
}

impl Source for Datasets {
    fn draw(&mut self, plan: &Plan, cfg: &TrainConfig, _be: &dyn Backend) -> Result<Drawn> {
        let m = cfg.grad_accum;
        let mut raw = Vec::new();
        for k in 0..m {
            if self.dist.mine(k, m) {
                raw.push(self.reader.next_batch(cfg.micro_batch));
            } else {
                self.reader.skip_batch(cfg.micro_batch);
            }
        }
        let mut rows_per_dataset = vec![0u64; self.blend];
        for b in &raw {
            b.source.iter().for_each(|&s| rows_per_dataset[s as usize] += 1);
        }
        let mut batches: Vec<Batch> = raw.into_iter().map(Batch::from_reader).collect();
        // The whole step's sums: [span 0, span 1, span 2, rows per dataset…].
        let mut sums: Vec<u64> = span_counts(&batches).to_vec();
        sums.extend_from_slice(&rows_per_dataset);
        self.dist.all_reduce_u64(&mut sums)?;
        let counts = [sums[0], sums[1], sums[2]];
        rows_per_dataset.copy_from_slice(&sums[3..]);
        seed(&mut batches, &plan.arch, cfg.span_weights, &counts, m);
        // Confidence weights: fold this step's teacher values into m, then weight with it.
        let mut step = KdCenter::default();
        batches.iter().for_each(|b| step.add(b));
        let mut s = [step.sum, step.count as f64];
        self.dist.all_reduce_f64(&mut s)?;
        self.center.sum += s[0];
        self.center.count += s[1] as u64;
        let kd = [self.center.mean() as f32, cfg.kd.temperature, cfg.kd.w_min, cfg.kd.w_max, 1.0];
        let stats = kd_record(&batches, kd, &self.dist)?;
        batches.iter_mut().for_each(|b| b.kd = kd);
        Ok(Drawn { batches, counts, rows_per_dataset, kd: stats, opd: None })
    }

    fn save(&self, meta: &mut Meta) {
        meta.data_cursor = self.reader.cursor();
        meta.scalars.insert("kd_logp_sum".into(), self.center.sum);
        meta.scalars.insert("kd_logp_count".into(), self.center.count as f64);
    }

    fn restore(&mut self, meta: &Meta) -> Result<()> {
        self.reader.restore(meta.data_cursor.clone()).context("restoring the data cursor")?;
        self.center = KdCenter {
            sum: meta.scalars.get("kd_logp_sum").copied().unwrap_or(0.0),
            count: meta.scalars.get("kd_logp_count").copied().unwrap_or(0.0) as u64,
        };
        Ok(())
    }
}
