//! Choosing the next token from a row of logits: greedy, or temperature with top-k and top-p.
//! The uniform draw is a counter-based hash of (seed, sequence, position), so a sequence's
//! samples do not depend on which other sequences share its batch or on their order. Every
//! choice also reports the token's log-probability under the full distribution at temperature 1
//! (what on-policy distillation compares with the teacher's).

use anyhow::{ensure, Result};
use vpmoe_ir::reference::row_lse;
use vpmoe_ir::rng::splitmix64;

/// How to choose a token. `temperature == 0` is greedy (top-k and top-p then do not matter).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 }
    }
}

impl Sampling {
    pub fn greedy() -> Sampling {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 }
    }

    /// Refuses settings with no meaning, naming the flag.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "--temperature {} must be a finite number ≥ 0 (0 is greedy)",
            self.temperature
        );
        ensure!(self.top_p > 0.0 && self.top_p <= 1.0, "--top-p {} must be in (0, 1]", self.top_p);
        Ok(())
    }
}

/// The uniform number in [0, 1) of `(seed, sequence, position)`: SplitMix64 applied to each key
/// in turn, so nearby keys give unrelated numbers.
pub fn uniform(seed: u64, sequence: u64, position: u64) -> f64 {
    let h = splitmix64(splitmix64(splitmix64(seed) ^ sequence) ^ position);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// One choice: the token and its log-probability at temperature 1 over the whole vocabulary.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub logprob: f32,
}

/// The ids of the `k` highest logits (all when `k` is 0 or past the row), highest first; ties to
/// the lower id.
pub fn ranked(logits: &[f32], k: usize) -> Vec<usize> {
    let better = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k == 1 {
        return (0..logits.len()).min_by(better).into_iter().collect(); // a scan, no sort
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, better);
        order.truncate(k);
    }
    order.sort_unstable_by(better);
    order
}

/// Chooses a token from `logits` with the draw `u` (from [`uniform`]).
pub fn choose(logits: &[f32], s: &Sampling, u: f64) -> Choice {
    assert!(!logits.is_empty(), "an empty row of logits");
    let lse = row_lse(logits);
    let logprob = |t: usize| (logits[t] as f64 - lse) as f32;
    if s.temperature == 0.0 {
        let t = ranked(logits, 1)[0];
        return Choice { token: t as u32, logprob: logprob(t) };
    }
    let order = ranked(logits, s.top_k);
    let inv_t = 1.0 / s.temperature as f64;
    let top = logits[order[0]] as f64;
    let mut w: Vec<f64> = order.iter().map(|&t| ((logits[t] as f64 - top) * inv_t).exp()).collect();
    if s.top_p < 1.0 {
        let total: f64 = w.iter().sum();
        let (mut acc, mut keep) = (0.0, w.len());
        for (i, x) in w.iter().enumerate() {
            acc += x / total;
            if acc >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        w.truncate(keep);
    }
    let total: f64 = w.iter().sum();
    let target = u * total;
    let mut acc = 0.0;
    for (i, x) in w.iter().enumerate() {
        acc += x;
        if target < acc {
            return Choice { token: order[i] as u32, logprob: logprob(order[i]) };
        }
    }
    let t = order[w.len() - 1];
    Choice { token: t as u32, logprob: logprob(t) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_reports_its_full_logprob() {
        let logits = [0.5f32, 2.0, 2.0, -1.0];
        let c = choose(&logits, &Sampling::greedy(), 0.99);
        assert_eq!(c.token, 1, "ties go to the lower id");
        let lse = (logits.iter().map(|&x| (x as f64).exp()).sum::<f64>()).ln();
        assert!((c.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_only_keep_the_head() {
        let logits = [3.0f32, 2.0, 1.0, 0.0, -1.0];
        let k2 = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 };
        let p = Sampling { temperature: 1.0, top_k: 0, top_p: 0.5 };
        for i in 0..2000 {
            let u = uniform(7, 0, i);
            assert!(choose(&logits, &k2, u).token < 2);
            assert_eq!(choose(&logits, &p, u).token, 0, "p(0) = 0.64 covers top-p 0.5 alone");
        }
        // The log-probability stays the full temperature-1 one whatever was cut.
        let c = choose(&logits, &k2, 0.0);
        assert_eq!(c.token, 0);
        assert!((c.logprob as f64 - (3.0 - row_lse(&logits))).abs() < 1e-6);
    }

    #[test]
    fn sampling_follows_the_tempered_distribution() {
        let logits = [1.0f32, 0.0, -1.0];
        let s = Sampling { temperature: 2.0, top_k: 0, top_p: 1.0 };
        let n = 20000;
        let mut counts = [0usize; 3];
        for i in 0..n {
            counts[choose(&logits, &s, uniform(1, 2, i)).token as usize] += 1;
        }
        let w: Vec<f64> = logits.iter().map(|&x| (x as f64 / 2.0).exp()).collect();
        let z: f64 = w.iter().sum();
        for (c, wi) in counts.iter().zip(&w) {
            let (got, want) = (*c as f64 / n as f64, wi / z);
            assert!((got - want).abs() < 0.015, "{got} vs {want}");
        }
    }

    #[test]
    fn draws_are_keyed_by_seed_sequence_and_position() {
        assert_eq!(uniform(1, 2, 3), uniform(1, 2, 3));
        let all = [uniform(1, 2, 3), uniform(2, 2, 3), uniform(1, 3, 3), uniform(1, 2, 4)];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j]);
            }
        }
        assert!(Sampling { temperature: -1.0, ..Sampling::default() }.validate().is_err());
        assert!(Sampling { top_p: 0.0, ..Sampling::default() }.validate().is_err());
    }
}
