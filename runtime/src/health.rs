//! Router health (DISTILL.md logging): per MoE layer from the step's expert loads, its sequence
//! aux loss and its expert biases, and aggregated over layers.

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RouterHealth {
    /// Sequence aux loss without α (1.0 = perfectly balanced), mean over micro-batches.
    pub aux: f64,
    /// The busiest expert's share of routed token-slots, in percent (ideal: 100/E).
    pub max_load_pct: f64,
    /// Coefficient of variation of the expert loads (0 = balanced).
    pub cv: f64,
    /// Experts that received no token in the step.
    pub dead: u64,
    /// Entropy of the load distribution over ln E (1 = uniform).
    pub entropy: f64,
    /// max − min of the expert biases (§4.11).
    pub bias_range: f64,
}

pub fn layer(loads: &[u64], aux: f64, bias: Option<&[f32]>) -> RouterHealth {
    let e = loads.len() as f64;
    let total: u64 = loads.iter().sum();
    let mean = total as f64 / e;
    let var = loads.iter().map(|&n| (n as f64 - mean).powi(2)).sum::<f64>() / e;
    let p = |n: u64| n as f64 / total.max(1) as f64;
    let h: f64 = loads.iter().filter(|&&n| n > 0).map(|&n| -p(n) * p(n).ln()).sum();
    let range = bias.map(|b| {
        let (lo, hi) = b.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
        (hi - lo) as f64
    });
    RouterHealth {
        aux,
        max_load_pct: 100.0 * loads.iter().copied().max().map(p).unwrap_or(0.0),
        cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
        dead: loads.iter().filter(|&&n| n == 0).count() as u64,
        entropy: if e > 1.0 { h / e.ln() } else { 1.0 },
        bias_range: range.unwrap_or(0.0),
    }
}

/// Health of every MoE layer (by 1-based layer number) of the step.
pub fn per_layer(
    loads: &[(u32, Vec<u64>)],
    aux: &[(u32, f64)],
    biases: &[(u32, Vec<f32>)],
) -> Vec<(u32, RouterHealth)> {
    loads
        .iter()
        .map(|&(l, ref n)| {
            let a = aux.iter().find(|(k, _)| *k == l).map(|x| x.1).unwrap_or(0.0);
            let bias = biases.iter().find(|(k, _)| *k == l).map(|x| x.1.as_slice());
            (l, layer(n, a, bias))
        })
        .collect()
}

/// Over layers: mean aux, CV and entropy; the worst max load; total dead experts; widest bias range.
pub fn aggregate(layers: &[(u32, RouterHealth)]) -> Option<RouterHealth> {
    if layers.is_empty() {
        return None;
    }
    let n = layers.len() as f64;
    let mean = |f: fn(&RouterHealth) -> f64| layers.iter().map(|(_, h)| f(h)).sum::<f64>() / n;
    Some(RouterHealth {
        aux: mean(|h| h.aux),
        max_load_pct: layers.iter().map(|(_, h)| h.max_load_pct).fold(0.0, f64::max),
        cv: mean(|h| h.cv),
        dead: layers.iter().map(|(_, h)| h.dead).sum(),
        entropy: mean(|h| h.entropy),
        bias_range: layers.iter().map(|(_, h)| h.bias_range).fold(0.0, f64::max),
    })
}
