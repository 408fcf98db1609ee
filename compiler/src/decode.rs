//! The decode program (docs/generation.md): the training graph's forward, restricted to what the
//! final norm needs, run over a step's new tokens against per-sequence attention caches.
//!
//! Both graphs come from one transformation of the training graph, so every op is the op that
//! trained:
//! - `decode.step` (`$tokens`, `$pos`, `$slot` → `logits`): the logits after every token;
//! - `decode.prefill` (the same inputs, no outputs): only what writes the caches, for the tokens
//!   whose logits nobody reads (a prompt's tokens before its last).
//!
//! GRAPE-M becomes `grape_m_at` (each token rotated by `$pos`, its position in its sequence), and
//! each attention node `cached_*_attention` over its own cache (`layer`, numbered in graph
//! order), addressed by `$slot` and `$pos`. A slot holds one sequence, so `$doc` goes. The LM
//! head's product becomes `logits`. Parameters keep their training names, by which the runtime
//! binds them.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use vpmoe_ir::{AttnKind, DType, Graph, InputKind, InputName, Op, OutputName, TensorType, ValueDef, ValueId};

/// The two graphs and the caches they share.
#[derive(Clone, Debug)]
pub struct DecodeProgram {
    pub prefill: Graph,
    pub step: Graph,
    /// Indexed by `cached_*_attention`'s `layer`.
    pub caches: Vec<Cache>,
}

/// One attention layer's cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cache {
    /// The attention node it serves.
    pub node: String,
    /// A window layer's ring of positions; `None`: a global layer, every position (paged).
    pub window: Option<u64>,
    /// Values per position of K, and of V: groups × head_dim.
    pub width: u64,
}

impl Cache {
    /// Positions a sequence of `len` positions keeps.
    pub fn positions(&self, len: u64) -> u64 {
        self.window.map_or(len, |w| w.min(len))
    }
}

impl DecodeProgram {
    /// Both graphs in the text form, as `ir.txt` shows them.
    pub fn to_text(&self) -> String {
        self.prefill.to_text() + "\n" + &self.step.to_text()
    }

    /// Bytes of K and V one sequence of `len` positions holds, at `bytes` per value.
    pub fn cache_bytes(&self, len: u64, bytes: u64) -> u64 {
        self.caches.iter().map(|c| 2 * c.width * c.positions(len) * bytes).sum()
    }
}

/// Lowers the decode program from a training graph (forward, with or without its backward).
pub fn lower_decode(train: &Graph) -> Result<DecodeProgram> {
    let head = train.nodes.iter().find(|n| matches!(n.op, Op::HeadCe { .. })).context("the graph has no LM head")?;
    let Op::HeadCe { hidden, vocab } = head.op else { unreachable!("found as head_ce") };
    let (z, head_w) = (head.inputs[0], head.inputs[1]);
    let step_nodes = reaching(train, &[z]);
    let attention: Vec<usize> =
        step_nodes.iter().copied().filter(|&i| matches!(train.nodes[i].op, Op::Attention(_))).collect();
    if attention.is_empty() {
        bail!("the graph has no attention layer to cache");
    }
    let roots: Vec<ValueId> = attention.iter().flat_map(|&i| train.nodes[i].inputs.clone()).collect();
    let mut prefill_nodes = reaching(train, &roots);
    prefill_nodes.extend(&attention);
    prefill_nodes.sort_unstable();
    prefill_nodes.dedup();
    let mut caches = Vec::new();
    let prefill = build(train, "decode.prefill", &prefill_nodes, None, &mut Vec::new())?;
    let step =
        build(train, "decode.step", &step_nodes, Some((head.name.clone(), z, head_w, hidden, vocab)), &mut caches)?;
    for (g, pass) in [(&prefill, "decode.prefill"), (&step, "decode.step")] {
        if let Err(errs) = vpmoe_ir::verify(g) {
            bail!("internal error: the {pass} graph fails verification:\n  {}", errs.join("\n  "));
        }
    }
    Ok(DecodeProgram { prefill, step, caches })
}

/// The nodes whose outputs `roots` depend on, in graph order.
fn reaching(g: &Graph, roots: &[ValueId]) -> Vec<usize> {
    let mut need = vec![false; g.values.len()];
    roots.iter().for_each(|v| need[v.0 as usize] = true);
    let mut nodes = Vec::new();
    for (i, n) in g.nodes.iter().enumerate().rev() {
        if n.outputs.iter().any(|v| need[v.0 as usize]) {
            nodes.push(i);
            n.inputs.iter().for_each(|v| need[v.0 as usize] = true);
        }
    }
    nodes.reverse();
    nodes
}

/// A decode graph of the training graph's `nodes`, with the head's logits as its output when
/// `head` is given; `caches` receives each attention layer's cache.
fn build(
    train: &Graph,
    name: &str,
    nodes: &[usize],
    head: Option<(String, ValueId, ValueId, u64, u64)>,
    caches: &mut Vec<Cache>,
) -> Result<Graph> {
    let mut g = Graph::new(name);
    let tokens_ty = train.input_named(&InputName::Tokens).context("the graph reads no tokens")?;
    let tokens = g.input(InputName::Tokens, InputKind::Data, train.value(tokens_ty.value).ty.clone());
    let pos = g.input(InputName::Pos, InputKind::Data, TensorType::tok(DType::I32, &[]));
    let slot = g.input(InputName::Slot, InputKind::Data, TensorType::tok(DType::I32, &[]));
    let mut map: Vec<Option<ValueId>> = vec![None; train.values.len()];
    // The parameters the nodes read, in the training graph's order.
    let mut read = vec![false; train.values.len()];
    nodes.iter().flat_map(|&i| &train.nodes[i].inputs).for_each(|v| read[v.0 as usize] = true);
    if let Some((_, _, w, ..)) = head {
        read[w.0 as usize] = true;
    }
    for p in train.params.iter().filter(|p| read[p.value.0 as usize]) {
        map[p.value.0 as usize] = Some(g.param(p.name.clone(), p.ty.clone(), p.init, p.opt, p.weight_decay, p.role));
    }
    let mut layer = 0u32;
    for &i in nodes {
        let n = &train.nodes[i];
        let mut ins = Vec::with_capacity(n.inputs.len() + 2);
        for &v in &n.inputs {
            match train.value(v).def {
                ValueDef::Input(k) => match &train.inputs[k as usize].name {
                    InputName::Tokens => ins.push(tokens),
                    InputName::Doc if matches!(n.op, Op::Attention(_)) => {} // the slots are the documents
                    other => bail!("{}: the decode program cannot feed its input ${other}", n.name),
                },
                _ => ins.push(map[v.0 as usize].expect("nodes come in graph order")),
            }
        }
        let op = match n.op {
            Op::GrapeM { heads, groups, head_dim, log_freq_scale } => {
                ins.push(pos);
                Op::GrapeMAt { heads, groups, head_dim, log_freq_scale }
            }
            Op::Attention(attn) => {
                // q, k, v[, sinks] → q, k, v, pos, slot[, sinks]
                ins.splice(3..3, [pos, slot]);
                caches.push(Cache {
                    node: n.name.clone(),
                    window: match attn.kind {
                        AttnKind::Window(w) => Some(w),
                        AttnKind::Global { .. } => None,
                    },
                    width: attn.groups * attn.head_dim,
                });
                layer += 1;
                Op::CachedAttention { attn, layer: layer - 1 }
            }
            ref op => op.clone(),
        };
        for (a, b) in n.outputs.iter().zip(g.node(n.name.clone(), op, ins)) {
            map[a.0 as usize] = Some(b);
        }
    }
    if let Some((name, z, w, hidden, vocab)) = head {
        let ins = vec![map[z.0 as usize].context("the final norm is computed")?, map[w.0 as usize].expect("read")];
        let logits = g.node(name, Op::Logits { hidden, vocab }, ins)[0];
        g.output(OutputName::Logits, logits);
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(rel: &str) -> (Graph, DecodeProgram) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let (g, _) = crate::compile_arch(&crate::config::load(&root.join(rel)).unwrap()).unwrap();
        let p = lower_decode(&g).unwrap();
        (g, p)
    }

    #[test]
    fn every_attention_layer_gets_a_cache_and_the_step_ends_in_logits() {
        for rel in ["configs/vpmoe.toml", "tests/configs/tiny_moe.toml"] {
            let (g, p) = program(rel);
            let attn = g.nodes.iter().filter(|n| matches!(n.op, Op::Attention(_))).count();
            assert_eq!(p.caches.len(), attn, "{rel}");
            for graph in [&p.prefill, &p.step] {
                let cached = graph.nodes.iter().filter(|n| matches!(n.op, Op::CachedAttention { .. })).count();
                assert_eq!(cached, attn, "{rel} {}", graph.name);
                assert!(graph.nodes.iter().all(|n| !matches!(n.op, Op::Attention(_) | Op::GrapeM { .. } | Op::Vjp(_))));
                assert!(graph.input_named(&InputName::Doc).is_none());
            }
            assert_eq!(p.step.outputs.len(), 1);
            assert!(p.prefill.outputs.is_empty() && p.prefill.nodes.len() < p.step.nodes.len());
            // The text form parses back to the same graphs.
            for graph in [&p.prefill, &p.step] {
                assert_eq!(vpmoe_ir::parse_graph(&graph.to_text()).unwrap().to_text(), graph.to_text());
            }
        }
    }

    #[test]
    fn a_window_layer_keeps_its_window_and_a_global_layer_every_position() {
        let (_, p) = program("configs/vpmoe.toml");
        let (w, g): (Vec<&Cache>, Vec<&Cache>) = p.caches.iter().partition(|c| c.window.is_some());
        assert_eq!((w.len(), g.len()), (60, 20));
        assert_eq!(w[0].positions(4096), 128);
        assert_eq!(g[0].positions(4096), 4096);
        // 2 KV groups × head_dim 128, K and V, bf16: 20 global layers × 2048 + 60 × 128 positions.
        assert_eq!(p.cache_bytes(2048, 2), (20 * 2048 + 60 * 128) * 512 * 2);
    }
}
