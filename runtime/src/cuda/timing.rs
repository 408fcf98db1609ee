//! Per-kernel timing with CUDA events around every launch (`vpmoe-rt train --profile-steps`).
//! Events are resolved after the step synchronises, so timing never adds a host sync per launch.

use anyhow::{anyhow, Result};
use cudarc::driver::{result::event, sys};
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Default)]
pub struct Timer {
    pending: Vec<(String, &'static str, sys::CUevent, sys::CUevent)>,
    /// Kernel name → (launches, total milliseconds).
    totals: BTreeMap<String, (u64, f64)>,
    /// Step-time category ([`category`]) → milliseconds.
    categories: BTreeMap<&'static str, f64>,
}

/// The share of a step a node's kernels belong to, from the node's name.
pub fn category(node: &str) -> &'static str {
    if node.contains(".attn.") {
        "attention"
    } else if node.contains(".moe.") {
        "moe"
    } else if node.starts_with("lm_head") || node.starts_with("loss") {
        "lm_head+loss"
    } else if node == "optimizer" {
        "optimizer"
    } else {
        "other"
    }
}

impl Timer {
    pub(super) fn start(&mut self, stream: sys::CUstream) -> Result<sys::CUevent> {
        let e = event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| anyhow!("{e}"))?;
        unsafe { event::record(e, stream) }.map_err(|e| anyhow!("{e}"))?;
        Ok(e)
    }

    pub(super) fn stop(&mut self, kernel: &str, node: &str, start: sys::CUevent, stream: sys::CUstream) -> Result<()> {
        let e = self.start(stream)?;
        self.pending.push((kernel.to_string(), category(node), start, e));
        Ok(())
    }

    /// Folds the finished launches into the totals (call after a synchronisation).
    pub fn collect(&mut self) -> Result<()> {
        for (k, cat, a, b) in std::mem::take(&mut self.pending) {
            let ms = unsafe { event::elapsed(a, b) }.map_err(|e| anyhow!("{e}"))?;
            unsafe {
                let _ = event::destroy(a);
                let _ = event::destroy(b);
            }
            self.add(&k, cat, ms as f64);
        }
        Ok(())
    }

    /// Adds one timed launch of `kernel` to the totals.
    pub fn add(&mut self, kernel: &str, category: &'static str, ms: f64) {
        let t = self.totals.entry(kernel.to_string()).or_default();
        t.0 += 1;
        t.1 += ms;
        *self.categories.entry(category).or_default() += ms;
    }

    pub fn totals(&self) -> &BTreeMap<String, (u64, f64)> {
        &self.totals
    }

    pub fn categories(&self) -> &BTreeMap<&'static str, f64> {
        &self.categories
    }

    /// The table: kernel, launches, total and mean time, share, sorted by total time.
    pub fn table(&self) -> String {
        let all: f64 = self.totals.values().map(|t| t.1).sum();
        let mut rows: Vec<_> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let mut s = String::new();
        writeln!(s, "{:<56} {:>8} {:>12} {:>10} {:>7}", "kernel", "launches", "total ms", "mean us", "share").unwrap();
        for (k, (n, ms)) in rows {
            let share = if all > 0.0 { 100.0 * ms / all } else { 0.0 };
            writeln!(s, "{k:<56} {n:>8} {ms:>12.3} {:>10.1} {share:>6.1}%", 1e3 * ms / *n as f64).unwrap();
        }
        writeln!(s, "{:<56} {:>8} {all:>12.3}", "all kernels", "").unwrap();
        for (c, ms) in &self.categories {
            let share = if all > 0.0 { 100.0 * ms / all } else { 0.0 };
            writeln!(s, "  {c:<54} {:>8} {ms:>12.3} {:>10} {share:>6.1}%", "", "").unwrap();
        }
        s
    }
}
