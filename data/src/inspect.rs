//! `data inspect DIR`: counts, token and span statistics, a length histogram and one decoded
//! sample with its mask/span (ANSI colour on a terminal, plain markers when piped).

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result};

use crate::cli::InspectArgs;
use crate::reader::{resolve_prefixes, Shard};
use crate::tokenizer;

/// Statistics of a set of shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub shards: usize,
    pub docs: u64,
    pub tokens: u64,
    pub loss_tokens: u64,
    /// Positions per span id 0, 1, 2 (label-aligned, as stored).
    pub span_tokens: [u64; 3],
    pub min_len: u64,
    pub max_len: u64,
    /// Histogram of document lengths over power-of-two bins: (lower bound, count).
    pub histogram: Vec<(u64, u64)>,
}

/// Compute statistics: lengths from the indices; loss/span counts by scanning the mask data
/// when `scan_masks` (otherwise left 0 for the caller to fill, e.g. from the manifest).
pub fn stats(shards: &[Shard], scan_masks: bool) -> Stats {
    let mut st = Stats { shards: shards.len(), min_len: u64::MAX, ..Default::default() };
    let mut bins = [0u64; 40];
    for sh in shards {
        for (i, &l) in sh.tokens.lengths().iter().enumerate() {
            let l = l as u64;
            st.docs += 1;
            st.tokens += l;
            st.min_len = st.min_len.min(l);
            st.max_len = st.max_len.max(l);
            bins[(64 - l.max(1).leading_zeros() - 1) as usize] += 1;
            if !scan_masks {
                continue;
            }
            for &m in sh.lossmask.bytes(i, 0, l as usize) {
                st.loss_tokens += u64::from(m);
            }
            for &s in sh.span.bytes(i, 0, l as usize) {
                st.span_tokens[usize::from(s.min(2))] += 1;
            }
        }
    }
    if st.docs == 0 {
        st.min_len = 0;
    }
    let first = bins.iter().position(|&c| c > 0).unwrap_or(0);
    let last = bins.iter().rposition(|&c| c > 0).unwrap_or(0);
    st.histogram = (first..=last).map(|b| (1u64 << b, bins[b])).collect();
    st
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

/// Render the statistics as text.
pub fn format_stats(name: &str, st: &Stats) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "split {name}: {} shards, {} documents, {} tokens (length min {} / mean {:.1} / max {})",
        st.shards,
        st.docs,
        st.tokens,
        st.min_len,
        if st.docs == 0 { 0.0 } else { st.tokens as f64 / st.docs as f64 },
        st.max_len
    );
    let _ = writeln!(
        s,
        "  loss tokens {} ({:.1}%); span 0 ignore {} ({:.1}%), 1 analysis {} ({:.1}%), 2 final {} ({:.1}%)",
        st.loss_tokens,
        pct(st.loss_tokens, st.tokens),
        st.span_tokens[0],
        pct(st.span_tokens[0], st.tokens),
        st.span_tokens[1],
        pct(st.span_tokens[1], st.tokens),
        st.span_tokens[2],
        pct(st.span_tokens[2], st.tokens)
    );
    let _ = writeln!(s, "  document length histogram (tokens):");
    let max = st.histogram.iter().map(|h| h.1).max().unwrap_or(1).max(1);
    for &(lo, c) in &st.histogram {
        let bar = "#".repeat(((c * 40).div_ceil(max)) as usize);
        let _ = writeln!(s, "    [{:>6}, {:>6})  {:<40} {}", lo, lo * 2, bar, c);
    }
    s
}

/// Decode one document with its token-aligned mask/span (the stored label-aligned arrays
/// shifted back by one). `color` uses ANSI escapes; otherwise runs are tagged
/// `«mask/span:…»`.
pub fn format_sample(shard: &Shard, doc: usize, color: bool) -> String {
    let toks: Vec<i32> = shard.tokens.get(doc);
    let mask: Vec<u8> = shard.lossmask.get(doc);
    let span: Vec<u8> = shard.span.get(doc);
    // Token t's own mask is the stored (label) mask of position t - 1.
    let tok_mask = |t: usize| if t == 0 { 0 } else { mask[t - 1] };
    let tok_span = |t: usize| if t == 0 { 0 } else { span[t - 1] };
    let mut out = String::new();
    let mut t = 0;
    while t < toks.len() {
        let key = (tok_mask(t), tok_span(t));
        let mut e = t;
        while e < toks.len() && (tok_mask(e), tok_span(e)) == key {
            e += 1;
        }
        let ids: Vec<u32> = toks[t..e].iter().map(|&x| x as u32).collect();
        let text = tokenizer::decode(&ids);
        if color {
            let code = match key {
                (0, _) => "2",
                (_, 1) => "33",
                (_, 2) => "32",
                _ => "36",
            };
            let _ = write!(out, "\x1b[{code}m{text}\x1b[0m");
        } else {
            let _ = write!(out, "«m{}s{}:{text}»", key.0, key.1);
        }
        t = e;
    }
    out
}

/// Print everything about a dataset.
pub fn describe(dir: &Path, color: bool) -> Result<String> {
    let mut out = String::new();
    let manifest = dir.join("manifest.json");
    let mut manifest_json: Option<serde_json::Value> = None;
    let splits: Vec<(String, std::path::PathBuf)> = if manifest.is_file() {
        let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", manifest.display()))?;
        manifest_json = Some(v.clone());
        let _ = writeln!(
            out,
            "dataset {} ({}), config_hash {}, git {}",
            dir.display(),
            v["schema_version"].as_str().unwrap_or("?"),
            v["config_hash"].as_str().unwrap_or("?"),
            v["git_sha"].as_str().unwrap_or("unknown")
        );
        let _ = writeln!(
            out,
            "tokenizer {} sha256 {}; seq_len {}, valid_fraction {}, reasoning effort {}",
            v["tokenizer"]["type"].as_str().unwrap_or("?"),
            v["tokenizer"]["model_sha256"].as_str().unwrap_or("?"),
            v["config"]["seq_len"],
            v["config"]["valid_fraction"].as_str().unwrap_or("?"),
            v["config"]["reasoning_effort"].as_str().unwrap_or("?")
        );
        let r = &v["rows"];
        let _ = writeln!(
            out,
            "rows: {} read, {} written, {} truncated, {} rejected, {} dropped (overlong)",
            r["read"], r["written"], r["truncated"], r["rejected"], r["dropped_overlong"]
        );
        if let Some(t) = v.get("teacher") {
            let _ = writeln!(
                out,
                "teacher {} via {} {} (reasoning {}, top-k {}), scored {} documents of {}",
                t["model"].as_str().unwrap_or("?"),
                t["server"]["api"].as_str().unwrap_or("?"),
                t["server"]["version"].as_str().unwrap_or("?"),
                t["reasoning_effort"].as_str().unwrap_or("?"),
                t["request"]["top_k"],
                t["documents"],
                t["input"]["dataset"].as_str().unwrap_or("?"),
            );
        }
        ["train", "valid"]
            .iter()
            .filter(|s| v["splits"].get(**s).is_some())
            .map(|s| (s.to_string(), dir.join(s)))
            .collect()
    } else {
        let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        vec![(name, dir.to_path_buf())]
    };
    let mut sample: Option<(String, Shard)> = None;
    for (name, path) in splits {
        let prefixes = if manifest.is_file() {
            let root_split = dir.join(&name);
            resolve_prefixes(&root_split)?
        } else {
            resolve_prefixes(&path)?
        };
        let mut shards = Vec::new();
        for p in &prefixes {
            shards.push(Shard::open(p)?);
        }
        // With a manifest, loss/span counts come from it (no scan of the mask data, which can
        // be tens of GB); the manifest's token count must agree with the indices.
        let mut st = stats(&shards, manifest_json.is_none());
        if let Some(v) = &manifest_json {
            let sp = &v["splits"][&name];
            let want = sp["tokens"].as_u64().unwrap_or(0);
            anyhow::ensure!(
                want == st.tokens,
                "{}: split {name} has {} tokens in its indices but the manifest says {want}",
                manifest.display(),
                st.tokens
            );
            st.loss_tokens = sp["loss_tokens"].as_u64().unwrap_or(0);
            for k in 0..3 {
                st.span_tokens[k] = sp["span_tokens"][k.to_string()].as_u64().unwrap_or(0);
            }
        }
        out.push_str(&format_stats(&name, &st));
        if shards.first().is_some_and(|s| s.teacher_logp.is_some()) {
            out.push_str(&crate::teacher::TeacherStats::of_shards(&shards).format());
        }
        if sample.is_none() {
            sample =
                prefixes.iter().zip(shards).find(|(_, s)| !s.is_empty()).map(|(p, s)| (p.display().to_string(), s));
        }
    }
    if let Some((name, sh)) = sample {
        let _ = writeln!(
            out,
            "sample: {name} document 0 ({} tokens); {}",
            sh.tokens.lengths()[0],
            if color {
                "\x1b[2mmask 0\x1b[0m, \x1b[33manalysis\x1b[0m, \x1b[32mfinal\x1b[0m, \x1b[36mother loss\x1b[0m"
            } else {
                "«m<mask>s<span>:text» runs, token-aligned"
            }
        );
        out.push_str(&format_sample(&sh, 0, color));
        out.push('\n');
    }
    Ok(out)
}

/// `data inspect`.
pub fn run(a: &InspectArgs) -> Result<()> {
    let color = std::io::stdout().is_terminal();
    print!("{}", describe(&a.dir, color)?);
    Ok(())
}
