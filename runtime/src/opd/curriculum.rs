//! Stage 3's curriculum of teacher reasoning modes (DISTILL.md): phases by fraction of the OPD
//! token budget, each with its mix of reasoning efforts and its rollouts per prompt. It is data:
//! the default is DISTILL.md's 3a/3b/3c, and `--curriculum FILE` (TOML) gives another:
//!
//! ```toml
//! [[phase]]
//! name = "3a"
//! until = 0.30          # ends when 30 % of the OPD token budget is trained on
//! low = 0.7
//! medium = 0.3
//! high = 0.0
//! rollouts = 1          # rollouts per prompt
//! ```

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use vpmoe_data::harmony::ReasoningEffort;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    /// The phase ends once this fraction of the OPD token budget has been trained on.
    pub until: f64,
    /// Shares of low, medium and high reasoning effort (they sum to 1).
    pub low: f64,
    pub medium: f64,
    pub high: f64,
    /// Rollouts sampled per prompt.
    pub rollouts: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Curriculum {
    pub phase: Vec<Phase>,
}

/// At most this many rollouts of one prompt.
const MAX_ROLLOUTS: usize = 16;

impl Default for Curriculum {
    /// DISTILL.md: 3a (first 30 %) 70/30/0, one rollout; 3b (next 40 %) 20/60/20, one rollout
    /// moving to two for its last quarter; 3c (final 30 %) 10/30/60, two rollouts.
    fn default() -> Self {
        let p = |name: &str, until, low, medium, high, rollouts| Phase {
            name: name.into(),
            until,
            low,
            medium,
            high,
            rollouts,
        };
        Curriculum {
            phase: vec![
                p("3a", 0.30, 0.7, 0.3, 0.0, 1),
                p("3b", 0.60, 0.2, 0.6, 0.2, 1),
                p("3b-late", 0.70, 0.2, 0.6, 0.2, 2),
                p("3c", 1.0, 0.1, 0.3, 0.6, 2),
            ],
        }
    }
}

impl Curriculum {
    /// Reads and checks a curriculum file.
    pub fn load(path: &Path) -> Result<Curriculum> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Curriculum = toml::from_str(&text).with_context(|| format!("{}: not a curriculum", path.display()))?;
        c.validate().with_context(|| path.display().to_string())?;
        Ok(c)
    }

    /// Phases in order, ending at 1; shares that sum to 1; 1..=16 rollouts.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.phase.is_empty(), "a curriculum needs at least one [[phase]]");
        let mut prev = 0.0;
        for p in &self.phase {
            let at = format!("phase {:?}", p.name);
            ensure!(
                p.until > prev && p.until <= 1.0,
                "{at}: until = {} must exceed the previous phase's ({prev}) and be ≤ 1",
                p.until
            );
            prev = p.until;
            for (name, x) in [("low", p.low), ("medium", p.medium), ("high", p.high)] {
                ensure!(x.is_finite() && (0.0..=1.0).contains(&x), "{at}: {name} = {x} is not a share in [0, 1]");
            }
            let sum = p.low + p.medium + p.high;
            ensure!((sum - 1.0).abs() < 1e-6, "{at}: low + medium + high = {sum}, not 1");
            ensure!(
                (1..=MAX_ROLLOUTS).contains(&p.rollouts),
                "{at}: rollouts = {} is not in 1..={MAX_ROLLOUTS}",
                p.rollouts
            );
        }
        ensure!(prev == 1.0, "the last phase must end at until = 1 (it ends at {prev})");
        Ok(())
    }

    /// The phase at `fraction` of the token budget (the last one past the budget).
    pub fn at(&self, fraction: f64) -> &Phase {
        self.phase.iter().find(|p| fraction < p.until).unwrap_or_else(|| self.phase.last().expect("validated"))
    }
}

impl Phase {
    /// The phase with a share `cut` of its high-effort prompts moved to medium effort.
    pub fn with_high_cut(&self, cut: f64) -> Phase {
        let moved = self.high * cut.clamp(0.0, 1.0);
        Phase { medium: self.medium + moved, high: self.high - moved, ..self.clone() }
    }

    /// The reasoning effort a uniform draw `u` in [0, 1) picks.
    pub fn effort(&self, u: f64) -> ReasoningEffort {
        if u < self.low {
            ReasoningEffort::Low
        } else if u < self.low + self.medium {
            ReasoningEffort::Medium
        } else {
            ReasoningEffort::High
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_distill_md_and_valid() {
        let c = Curriculum::default();
        c.validate().unwrap();
        assert_eq!(c.at(0.0).name, "3a");
        assert_eq!(c.at(0.3).name, "3b");
        assert_eq!(c.at(0.65).rollouts, 2);
        assert_eq!(c.at(0.99).name, "3c");
        assert_eq!(c.at(1.5).name, "3c");
        let p = c.at(0.1);
        assert_eq!(
            (p.effort(0.0), p.effort(0.69), p.effort(0.7)),
            (ReasoningEffort::Low, ReasoningEffort::Low, ReasoningEffort::Medium)
        );
    }

    #[test]
    fn bad_curricula_are_refused_by_name() {
        let bad = |f: &dyn Fn(&mut Curriculum), want: &str| {
            let mut c = Curriculum::default();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        bad(&|c| c.phase[1].until = 0.2, "phase \"3b\": until = 0.2");
        bad(&|c| c.phase[0].high = 0.1, "low + medium + high");
        bad(&|c| c.phase[3].until = 0.9, "must end at until = 1");
        bad(&|c| c.phase[2].rollouts = 0, "rollouts = 0");
        bad(&|c| c.phase.clear(), "at least one");
        let e = toml::from_str::<Curriculum>(
            "[[phase]]\nname = \"x\"\nuntil = 1.0\nlow = 1.0\nmedium = 0.0\nhigh = 0.0\nrollouts = 1\nextra = 2\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
    }
}
