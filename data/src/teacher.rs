//! Teacher-scored datasets (DISTILL.md stage 2): sidecar names, subset selection and statistics.
//!
//! A scored dataset is an ordinary dataset (tokens, loss mask, span, `_docs.jsonl`) plus, per
//! shard, `{shard}_teacher_logp.{bin,idx}`: float32, one entry per token, entry t =
//! `log p_teacher(tokens[t+1] | tokens[..=t])`, aligned with labels exactly like the loss mask
//! (D7). Positions the loss mask excludes hold 0. `-inf` (a server's clamped −9999) is stored
//! as `-inf`. With top-k, `{shard}_teacher_topk_ids` (int32) and `{shard}_teacher_topk_logp`
//! (float32) hold K entries per token (`t·K + j`, best first); excluded positions hold id −1
//! and logp 0.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::docs::DocMeta;
use crate::reader::Shard;

/// The sidecar prefixes of a shard given its `…_tokens` prefix: (logp, top-k ids, top-k logp).
pub fn sidecar_prefixes(tokens_prefix: &Path) -> [PathBuf; 3] {
    let s = tokens_prefix.to_string_lossy();
    let base = s.strip_suffix("_tokens").unwrap_or(&s);
    ["teacher_logp", "teacher_topk_ids", "teacher_topk_logp"].map(|k| PathBuf::from(format!("{base}_{k}")))
}

// ---------------------------------------------------------------------------------------------
// Subset selection (DISTILL.md 2A)

/// Which documents to score. Text form (comma-separated `key=value`, any order):
///
/// * `fraction=F` — share of the candidate token volume to select, `0 < F ≤ 1` (default 1);
/// * `prefer=long-reasoning|random` — order in which documents are taken: most analysis-span
///   tokens first, or a hash of `synth_id` (default `random`); ties break by the hash;
/// * `exercise=a|b|…`, `language=x|y|…` — keep only these (default: all);
/// * `balance=exercise|language` — split the token budget equally across the groups
///   (a group smaller than its share gives the rest to the others).
///
/// Selection depends only on the documents' metadata and lengths, so it is the same for any
/// shard order or thread count; documents with the same `synth_id` content always agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubsetRule {
    pub fraction: f64,
    pub prefer: Prefer,
    pub exercise: Option<Vec<String>>,
    pub language: Option<Vec<String>>,
    pub balance: Option<Balance>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prefer {
    LongReasoning,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    Exercise,
    Language,
}

impl Default for SubsetRule {
    fn default() -> Self {
        SubsetRule { fraction: 1.0, prefer: Prefer::Random, exercise: None, language: None, balance: None }
    }
}

impl std::str::FromStr for SubsetRule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut r = SubsetRule::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                bail!("subset rule {s:?}: {part:?} is not key=value");
            };
            let list =
                || -> Vec<String> { v.split('|').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect() };
            match k.trim() {
                "fraction" => {
                    r.fraction = v.parse().with_context(|| format!("subset rule: fraction {v:?} is not a number"))?;
                    ensure!(r.fraction > 0.0 && r.fraction <= 1.0, "subset rule: fraction must be in (0, 1], got {v}");
                }
                "prefer" => {
                    r.prefer = match v {
                        "long-reasoning" => Prefer::LongReasoning,
                        "random" => Prefer::Random,
                        _ => bail!("subset rule: prefer must be long-reasoning or random, got {v:?}"),
                    }
                }
                "exercise" => r.exercise = Some(list()),
                "language" => r.language = Some(list()),
                "balance" => {
                    r.balance = Some(match v {
                        "exercise" => Balance::Exercise,
                        "language" => Balance::Language,
                        _ => bail!("subset rule: balance must be exercise or language, got {v:?}"),
                    })
                }
                other => bail!("subset rule: unknown key {other:?} (fraction, prefer, exercise, language, balance)"),
            }
        }
        Ok(r)
    }
}

impl std::fmt::Display for SubsetRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prefer = match self.prefer {
            Prefer::LongReasoning => "long-reasoning",
            Prefer::Random => "random",
        };
        write!(f, "fraction={},prefer={prefer}", self.fraction)?;
        if let Some(e) = &self.exercise {
            write!(f, ",exercise={}", e.join("|"))?;
        }
        if let Some(l) = &self.language {
            write!(f, ",language={}", l.join("|"))?;
        }
        match self.balance {
            Some(Balance::Exercise) => write!(f, ",balance=exercise"),
            Some(Balance::Language) => write!(f, ",balance=language"),
            None => Ok(()),
        }
    }
}

/// A document offered to the selection.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub meta: &'a DocMeta,
    pub tokens: u64,
    /// Analysis-span (reasoning) tokens.
    pub reasoning_tokens: u64,
}

fn id_hash(synth_id: &str) -> u64 {
    crate::synth::blake2b8(&format!("subset:{synth_id}"))
}

impl SubsetRule {
    /// Indices (into `docs`) of the selected documents, ascending.
    pub fn select(&self, docs: &[Candidate<'_>]) -> Vec<usize> {
        let keep = |want: &Option<Vec<String>>, have: &Option<String>| match want {
            None => true,
            Some(w) => have.as_ref().is_some_and(|h| w.iter().any(|x| x == h)),
        };
        let pool: Vec<usize> = (0..docs.len())
            .filter(|&i| keep(&self.exercise, &docs[i].meta.exercise) && keep(&self.language, &docs[i].meta.language))
            .collect();
        let total: u64 = pool.iter().map(|&i| docs[i].tokens).sum();
        let budget = (self.fraction * total as f64).ceil() as u64;
        // Groups in a fixed (name) order, each in preference order.
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for &i in &pool {
            let m = docs[i].meta;
            let key = match self.balance {
                None => String::new(),
                Some(Balance::Exercise) => m.exercise.clone().unwrap_or_default(),
                Some(Balance::Language) => m.language.clone().unwrap_or_default(),
            };
            groups.entry(key).or_default().push(i);
        }
        for g in groups.values_mut() {
            g.sort_by_key(|&i| {
                let h = id_hash(&docs[i].meta.synth_id);
                match self.prefer {
                    Prefer::LongReasoning => (u64::MAX - docs[i].reasoning_tokens, h, i),
                    Prefer::Random => (0, h, i),
                }
            });
        }
        // Water-filling: equal shares; a group that cannot fill its share passes the rest on.
        let sizes: Vec<u64> = groups.values().map(|g| g.iter().map(|&i| docs[i].tokens).sum()).collect();
        let mut quota = vec![0u64; sizes.len()];
        let mut left = budget;
        let mut open: Vec<usize> = (0..sizes.len()).collect();
        while left > 0 && !open.is_empty() {
            let share = left.div_ceil(open.len() as u64);
            let mut next = Vec::new();
            for &g in &open {
                let give = share.min(sizes[g] - quota[g]).min(left);
                quota[g] += give;
                left -= give;
                if quota[g] < sizes[g] {
                    next.push(g);
                }
            }
            open = next;
        }
        let mut out = Vec::new();
        for (g, q) in groups.values().zip(quota) {
            let mut taken = 0u64;
            for &i in g {
                if taken >= q {
                    break;
                }
                taken += docs[i].tokens;
                out.push(i);
            }
        }
        out.sort_unstable();
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// Upper edges of the log-probability histogram bins (the last bin also holds −inf).
pub const LOGP_BINS: [f64; 8] = [-0.01, -0.1, -0.5, -1.0, -2.0, -5.0, -10.0, f64::NEG_INFINITY];
const LOGP_BIN_NAMES: [&str; 8] =
    ["[-0.01,0]", "[-0.1,-0.01)", "[-0.5,-0.1)", "[-1,-0.5)", "[-2,-1)", "[-5,-2)", "[-10,-5)", "<-10"];

/// Teacher log-probability statistics of scored documents, split by span (1 analysis, 2 final;
/// 0 holds loss positions of other spans).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TeacherStats {
    pub docs: u64,
    /// Scored (loss-mask) positions per span.
    pub tokens: [u64; 3],
    /// Sum of finite teacher logp per span.
    pub sum: [f64; 3],
    /// Positions whose teacher logp is −inf, per span.
    pub neg_inf: [u64; 3],
    /// Histogram per span over [`LOGP_BINS`].
    pub histogram: [[u64; 8]; 3],
    /// Per-example mean teacher logp (finite positions), sorted ascending.
    pub example_means: Vec<f64>,
}

impl TeacherStats {
    /// Add one document (label-aligned arrays).
    pub fn add_doc(&mut self, logp: &[f32], mask: &[u8], span: &[u8]) {
        let (mut s, mut n) = (0f64, 0u64);
        for ((&l, &m), &sp) in logp.iter().zip(mask).zip(span) {
            if m == 0 {
                continue;
            }
            let k = usize::from(sp.min(2));
            self.tokens[k] += 1;
            let l = f64::from(l);
            if l.is_finite() {
                self.sum[k] += l;
                s += l;
                n += 1;
            } else {
                self.neg_inf[k] += 1;
            }
            let b = LOGP_BINS.iter().position(|&e| l >= e).unwrap_or(LOGP_BINS.len() - 1);
            self.histogram[k][b] += 1;
        }
        self.docs += 1;
        if n > 0 {
            let mean = s / n as f64;
            let at = self.example_means.partition_point(|&x| x < mean);
            self.example_means.insert(at, mean);
        }
    }

    /// Statistics of every document of the shards that carry a teacher sidecar.
    pub fn of_shards(shards: &[Shard]) -> TeacherStats {
        let mut st = TeacherStats::default();
        let mut means = Vec::new();
        for sh in shards {
            let Some(tl) = &sh.teacher_logp else { continue };
            for i in 0..sh.len() {
                let mut one = TeacherStats::default();
                one.add_doc(&tl.get::<f32>(i), &sh.lossmask.get::<u8>(i), &sh.span.get::<u8>(i));
                st.merge_counts(&one);
                means.extend(one.example_means);
            }
        }
        means.sort_by(f64::total_cmp);
        st.example_means = means;
        st
    }

    fn merge_counts(&mut self, o: &TeacherStats) {
        self.docs += o.docs;
        for k in 0..3 {
            self.tokens[k] += o.tokens[k];
            self.sum[k] += o.sum[k];
            self.neg_inf[k] += o.neg_inf[k];
            for b in 0..8 {
                self.histogram[k][b] += o.histogram[k][b];
            }
        }
    }

    /// Mean finite teacher logp of a span.
    pub fn mean(&self, k: usize) -> f64 {
        let n = self.tokens[k] - self.neg_inf[k];
        if n == 0 {
            0.0
        } else {
            self.sum[k] / n as f64
        }
    }

    /// Summary as JSON (what `teacher score` writes to `stats.json`).
    pub fn to_json(&self) -> serde_json::Value {
        let q = |p: f64| -> Option<f64> {
            let v = &self.example_means;
            (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * p).round() as usize])
        };
        let span = |k: usize| {
            serde_json::json!({
                "tokens": self.tokens[k],
                "mean_logp": self.mean(k),
                "neg_inf": self.neg_inf[k],
                "histogram": LOGP_BIN_NAMES.iter().zip(self.histogram[k]).map(|(n, c)| (n.to_string(), c)).collect::<BTreeMap<_, _>>(),
            })
        };
        serde_json::json!({
            "documents": self.docs,
            "reasoning": span(1),
            "final": span(2),
            "example_mean_logp": {"min": q(0.0), "p10": q(0.1), "median": q(0.5), "p90": q(0.9), "max": q(1.0)},
        })
    }

    /// Human-readable summary.
    pub fn format(&self) -> String {
        let mut s = String::new();
        let q = |p: f64| {
            let v = &self.example_means;
            if v.is_empty() {
                f64::NAN
            } else {
                v[((v.len() - 1) as f64 * p).round() as usize]
            }
        };
        let _ = writeln!(
            s,
            "  teacher logp: {} documents; per-example mean min {:.3} / median {:.3} / max {:.3}",
            self.docs,
            q(0.0),
            q(0.5),
            q(1.0)
        );
        for (k, name) in [(1, "reasoning"), (2, "final")] {
            let total = self.tokens[k].max(1) as f64;
            let hist: Vec<String> = LOGP_BIN_NAMES
                .iter()
                .zip(self.histogram[k])
                .map(|(n, c)| format!("{n} {:.1}%", 100.0 * c as f64 / total))
                .collect();
            let _ = writeln!(
                s,
                "    {name:<9} {} tokens, mean {:.4}, -inf {}; {}",
                self.tokens[k],
                self.mean(k),
                self.neg_inf[k],
                hist.join(", ")
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, lang: &str, ex: &str) -> DocMeta {
        DocMeta { synth_id: id.into(), language: Some(lang.into()), exercise: Some(ex.into()) }
    }

    #[test]
    fn rule_round_trips_and_rejects_bad_input() {
        let r: SubsetRule = "fraction=0.2,prefer=long-reasoning,exercise=math|mcq,balance=language".parse().unwrap();
        assert_eq!(r.fraction, 0.2);
        assert_eq!(r.to_string().parse::<SubsetRule>().unwrap(), r);
        for bad in ["fraction=0", "fraction=1.5", "prefer=short", "colour=red", "fraction"] {
            assert!(bad.parse::<SubsetRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn selection_is_deterministic_and_respects_budget() {
        let metas: Vec<DocMeta> = (0..200)
            .map(|i| {
                meta(&format!("id{i}"), if i % 3 == 0 { "fr" } else { "en" }, if i % 2 == 0 { "math" } else { "rag" })
            })
            .collect();
        let docs: Vec<Candidate> = metas
            .iter()
            .enumerate()
            .map(|(i, m)| Candidate {
                meta: m,
                tokens: 10 + (i as u64 * 7) % 50,
                reasoning_tokens: (i as u64 * 13) % 40,
            })
            .collect();
        let total: u64 = docs.iter().map(|d| d.tokens).sum();
        let r: SubsetRule = "fraction=0.25".parse().unwrap();
        let a = r.select(&docs);
        let got: u64 = a.iter().map(|&i| docs[i].tokens).sum();
        assert!(got as f64 >= 0.25 * total as f64 && got as f64 <= 0.25 * total as f64 + 60.0);
        // Same answer for a permuted candidate list (selection keys on synth_id, not position).
        let mut perm: Vec<usize> = (0..docs.len()).rev().collect();
        perm.rotate_left(17);
        let shuffled: Vec<Candidate> = perm.iter().map(|&i| docs[i].clone()).collect();
        let mut b: Vec<String> = r.select(&shuffled).iter().map(|&i| shuffled[i].meta.synth_id.clone()).collect();
        let mut a_ids: Vec<String> = a.iter().map(|&i| docs[i].meta.synth_id.clone()).collect();
        a_ids.sort();
        b.sort();
        assert_eq!(a_ids, b);
        // Long reasoning first: every selected doc has at least as much reasoning as any unselected one
        // except for the last one taken.
        let lr: SubsetRule = "fraction=0.1,prefer=long-reasoning".parse().unwrap();
        let sel = lr.select(&docs);
        let min_sel = sel.iter().map(|&i| docs[i].reasoning_tokens).min().unwrap();
        let max_rest = (0..docs.len()).filter(|i| !sel.contains(i)).map(|i| docs[i].reasoning_tokens).max().unwrap();
        assert!(min_sel >= max_rest);
        // Filters.
        let f: SubsetRule = "exercise=math,language=fr".parse().unwrap();
        assert!(f.select(&docs).iter().all(|&i| i % 2 == 0 && i % 3 == 0));
        assert_eq!(f.select(&docs).len(), (0..200).filter(|i| i % 6 == 0).count());
        // Balance: equal token shares across languages (fr is a third of the pool).
        let bal: SubsetRule = "fraction=0.3,balance=language".parse().unwrap();
        let sel = bal.select(&docs);
        let vol = |l: &str| -> u64 {
            sel.iter().filter(|&&i| docs[i].meta.language.as_deref() == Some(l)).map(|&i| docs[i].tokens).sum()
        };
        let (fr, en) = (vol("fr") as f64, vol("en") as f64);
        assert!((fr - en).abs() <= 60.0, "fr {fr} en {en}");
    }

    #[test]
    fn stats_by_span() {
        let mut st = TeacherStats::default();
        st.add_doc(&[0.0, -0.5, -2.0, f32::NEG_INFINITY, 0.0], &[0, 1, 1, 1, 0], &[0, 1, 2, 2, 0]);
        assert_eq!(st.tokens, [0, 1, 2]);
        assert_eq!(st.neg_inf, [0, 0, 1]);
        assert_eq!(st.mean(1), -0.5);
        assert_eq!(st.mean(2), -2.0);
        assert_eq!(st.example_means, vec![-1.25]);
        assert_eq!(st.histogram[1][2], 1);
        assert_eq!(st.histogram[2][4], 1);
        assert_eq!(st.histogram[2][7], 1);
    }
}
