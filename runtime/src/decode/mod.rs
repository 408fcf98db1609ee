//! The student generating text on the cpu backend: prefill and decode steps over per-slot
//! key/value caches ([`cache`]), token choice ([`sampler`]) and continuous batching
//! ([`generate`]).
//!
//! A step runs the training graph's forward nodes that lead to the final norm, with each op's
//! reference semantics, on just the step's new tokens; only the position-dependent ops differ:
//! GRAPE rotates each token by its own position, and attention writes the token's K/V into the
//! cache and reads the keys it may see from there. Every per-token op's arithmetic is the
//! training forward's, so a sampled token's log-probability is bitwise the one the training
//! forward gives the same tokens (`tests/decode.rs`).

pub mod cache;
pub mod sample;
pub mod sampler;
pub mod score;

use crate::cpu::{model_tensors, FastGemm};
use crate::state::TrainState;
use anyhow::{bail, ensure, Context, Result};
use cache::KvCache;
use sampler::{choose, uniform, Choice, Sampling};
use serde::Serialize;
use vpmoe_compiler::Plan;
use vpmoe_ir::reference::{
    self, alibi_slopes, attention_mix, attention_scores, grape_freqs, grape_tokens, softmax_with_sink, Dims, Gemm,
    Tensor,
};
use vpmoe_ir::{AttnKind, Graph, InputName, Op, ValueDef, ValueId};

/// One new token of a step: its sequence slot, its position there, and whether the step returns
/// the logits that follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tok {
    pub slot: usize,
    pub pos: usize,
    pub token: u32,
    pub logits: bool,
}

/// The forward graph prepared for generation over a model's weights.
pub struct Decoder<'g> {
    graph: &'g Graph,
    model: Vec<Tensor>,
    /// The forward nodes the final norm depends on, in graph order.
    nodes: Vec<usize>,
    /// Per node: its attention layer's index into the cache.
    layer_of: Vec<Option<usize>>,
    tokens: ValueId,
    z: ValueId,
    head: usize,
    hidden: usize,
    vocab: usize,
    max_len: usize,
    cache: KvCache,
    /// Positions each slot holds.
    held: Vec<usize>,
    /// Threads the LM head is split over.
    cores: usize,
    gemm: FastGemm,
}

impl<'g> Decoder<'g> {
    /// A decoder for `slots` concurrent sequences of up to the architecture's
    /// `max_sequence_length` positions.
    pub fn new(graph: &'g Graph, plan: &Plan, state: &TrainState, slots: usize) -> Result<Decoder<'g>> {
        ensure!(slots > 0, "at least one sequence slot");
        crate::backend::check_state(plan, state)?;
        let head_node =
            graph.nodes.iter().find(|n| matches!(n.op, Op::HeadCe { .. })).context("the graph has no LM head")?;
        let (z, head_v) = (head_node.inputs[0], head_node.inputs[1]);
        let ValueDef::Param(head) = graph.value(head_v).def else { bail!("the LM head weight is not a parameter") };
        // The nodes the final norm depends on.
        let mut need = vec![false; graph.values.len()];
        need[z.0 as usize] = true;
        let mut nodes = Vec::new();
        for (i, n) in graph.nodes.iter().enumerate().rev() {
            if n.outputs.iter().any(|v| need[v.0 as usize]) {
                nodes.push(i);
                n.inputs.iter().for_each(|v| need[v.0 as usize] = true);
            }
        }
        nodes.reverse();
        let mut tokens = None;
        for inp in &graph.inputs {
            if need[inp.value.0 as usize] {
                match inp.name {
                    InputName::Tokens => tokens = Some(inp.value),
                    InputName::Doc => {} // attention reads documents from the cache's slots
                    ref other => bail!("generation cannot feed the graph input {other}"),
                }
            }
        }
        let mut layer_of = vec![None; graph.nodes.len()];
        let mut windows = Vec::new();
        let mut width = 0;
        for &i in &nodes {
            if let Op::Attention(a) = &graph.nodes[i].op {
                layer_of[i] = Some(windows.len());
                windows.push(match a.kind {
                    AttnKind::Window(w) => Some(w as usize),
                    AttnKind::Global { .. } => None,
                });
                width = (a.groups * a.head_dim) as usize;
            }
        }
        let max_len = plan.arch.max_seq as usize;
        Ok(Decoder {
            graph,
            model: model_tensors(plan, &state.master),
            nodes,
            layer_of,
            tokens: tokens.context("the graph reads no tokens")?,
            z,
            head: head.0 as usize,
            hidden: plan.arch.hidden as usize,
            vocab: plan.arch.vocab as usize,
            max_len,
            cache: KvCache::new(&windows, width, slots, max_len),
            held: vec![0; slots],
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gemm: FastGemm,
        })
    }

    pub fn slots(&self) -> usize {
        self.cache.slots()
    }
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// The context: positions per sequence.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Frees `slot` for a new sequence.
    pub fn release(&mut self, slot: usize) {
        self.cache.release(slot);
        self.held[slot] = 0;
    }

    /// Runs one step over `toks` (each slot's tokens contiguous, in ascending positions that
    /// continue what the slot holds) and returns the logits after every token that asks for
    /// them, `vocab` floats each, in order.
    pub fn step(&mut self, toks: &[Tok]) -> Result<Vec<f32>> {
        let n = toks.len();
        ensure!(n > 0, "a step without tokens");
        let mut held = self.held.clone();
        for t in toks {
            ensure!(t.slot < self.slots(), "slot {} of {}", t.slot, self.slots());
            ensure!((t.token as usize) < self.vocab, "token {} is outside the vocabulary of {}", t.token, self.vocab);
            ensure!(
                t.pos == held[t.slot],
                "slot {} holds {} positions; the next token must be at position {}, not {}",
                t.slot,
                held[t.slot],
                held[t.slot],
                t.pos
            );
            held[t.slot] += 1;
            self.cache.reserve(t.slot, t.pos + 1)?;
        }
        self.held = held;
        let g = self.graph;
        let dims = Dims { tokens: n, seq: n };
        let mut vals: Vec<Option<Tensor>> = vec![None; g.values.len()];
        vals[self.tokens.0 as usize] = Some(Tensor::i32(vec![n], toks.iter().map(|t| t.token as i32).collect()));
        for &ni in &self.nodes {
            let node = &g.nodes[ni];
            let outs = {
                let ins: Vec<&Tensor> = node
                    .inputs
                    .iter()
                    .filter_map(|v| match g.value(*v).def {
                        ValueDef::Param(p) => Some(&self.model[p.0 as usize]),
                        ValueDef::Input(_) if *v != self.tokens => None, // documents: the slots
                        _ => Some(vals[v.0 as usize].as_ref().expect("inputs are computed before use")),
                    })
                    .collect();
                match &node.op {
                    Op::GrapeM { head_dim, log_freq_scale, .. } => {
                        // Each token rotated by its position in its sequence.
                        let freqs = grape_freqs(ins[2].f(), *log_freq_scale);
                        let pos = |ti: usize| toks[ti].pos;
                        let d = *head_dim as usize;
                        vec![grape_tokens(ins[0], n, &freqs, d, pos), grape_tokens(ins[1], n, &freqs, d, pos)]
                    }
                    Op::Attention(a) => {
                        let layer = self.layer_of[ni].expect("attention layers are numbered");
                        let sinks = a.sinks.then(|| ins[3].f());
                        vec![attend(&mut self.cache, layer, a, ins[0].f(), ins[1].f(), ins[2].f(), sinks, toks)]
                    }
                    op => reference::forward(op, &dims, &ins, &self.gemm),
                }
            };
            for (v, t) in node.outputs.iter().zip(outs) {
                vals[v.0 as usize] = Some(t);
            }
        }
        let z = vals[self.z.0 as usize].take().expect("the final norm ran");
        let (h, v) = (self.hidden, self.vocab);
        let rows: Vec<f32> = toks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.logits)
            .flat_map(|(i, _)| z.f()[i * h..(i + 1) * h].to_vec())
            .collect();
        let logits = head_logits(&self.gemm, &rows, h, self.model[self.head].f(), v, self.cores);
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            bail!("the model produced a non-finite logit ({} for token {} of row {})", logits[i], i % v, i / v);
        }
        Ok(logits)
    }
}

/// `rows · headᵀ` (`rows`: m × h, `head`: v × h), the vocabulary split across up to `threads`
/// threads (slices of at least 4096 entries). Each logit is one dot product whatever the split, so
/// the result is the training head's bit for bit.
fn head_logits(gemm: &FastGemm, rows: &[f32], h: usize, head: &[f32], v: usize, threads: usize) -> Vec<f32> {
    let m = rows.len() / h;
    let threads = threads.min(v.div_ceil(4096)).max(1);
    let chunk = v.div_ceil(threads);
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..v)
            .step_by(chunk)
            .map(|c0| {
                let n = chunk.min(v - c0);
                s.spawn(move || {
                    let mut out = vec![0f32; m * n];
                    gemm.xwt(m, h, n, rows, &head[c0 * h..(c0 + n) * h], &mut out, false);
                    out
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().expect("a logits thread panicked")).collect()
    });
    let mut logits = vec![0f32; m * v];
    for (part, c0) in parts.iter().zip((0..v).step_by(chunk)) {
        let n = part.len() / m.max(1);
        for r in 0..m {
            logits[r * v + c0..r * v + c0 + n].copy_from_slice(&part[r * n..(r + 1) * n]);
        }
    }
    logits
}

/// Attention of each new token over its slot's cached keys, token by token: its K/V are written
/// first, so it sees itself, and a ring never loses a key that a later token of the step needs.
/// Scores and the mix are the reference's (`attention_scores`, `attention_mix`), over the keys it
/// attends in ascending position.
#[allow(clippy::too_many_arguments)]
fn attend(
    cache: &mut KvCache,
    layer: usize,
    a: &vpmoe_ir::Attn,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sinks: Option<&[f32]>,
    toks: &[Tok],
) -> Tensor {
    let (nh, ng, d) = (a.heads as usize, a.groups as usize, a.head_dim as usize);
    let gsz = nh / ng;
    let w = ng * d;
    let scale = 1.0 / (d as f32).sqrt();
    let slopes = matches!(a.kind, AttnKind::Global { alibi: true }).then(|| alibi_slopes(nh));
    let mut out = vec![0f32; toks.len() * nh * d];
    for (t, tok) in toks.iter().enumerate() {
        cache.write(layer, tok.slot, tok.pos, &k[t * w..][..w], &v[t * w..][..w]);
        let lo = match a.kind {
            AttnKind::Window(win) => (tok.pos + 1).saturating_sub(win as usize),
            AttnKind::Global { .. } => 0,
        };
        for h in 0..nh {
            let g = h / gsz;
            let qv = &q[(t * nh + h) * d..][..d];
            let keys = (lo..=tok.pos).map(|j| Some((tok.pos - j, &cache.read(layer, tok.slot, j).0[g * d..][..d])));
            let scores = attention_scores(qv, keys, scale, slopes.as_ref().map(|s| s[h]));
            let p = softmax_with_sink(&scores, sinks.map(|s| s[h]));
            let value = |j: usize| &cache.read(layer, tok.slot, lo + j).1[g * d..][..d];
            attention_mix(&p, value, &mut out[(t * nh + h) * d..][..d]);
        }
    }
    Tensor::f32(vec![toks.len(), nh * d], out)
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// It sampled a stop token (kept as its last token).
    Stop,
    /// The token budget or the context ran out.
    Length,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenConfig {
    pub sampling: Sampling,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Tokens that end a sequence (Harmony's `<|return|>` and `<|call|>`).
    pub stop: Vec<u32>,
}

/// One sequence's continuation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Generated {
    pub tokens: Vec<u32>,
    /// Each token's log-probability under the full distribution at temperature 1.
    pub logprobs: Vec<f32>,
    pub finish: Finish,
}

struct Live {
    request: usize,
    /// Positions the slot holds.
    len: usize,
    out: Generated,
}

/// Continues every prompt, keeping up to `dec.slots()` sequences live: a finished sequence's
/// slot and cache blocks go to the next prompt at once. Request `i`'s draws are keyed by
/// `(seed, i, position)`, so its samples do not depend on the batch. `on_token(i, token)` hears
/// every token as it is sampled.
pub fn generate(
    dec: &mut Decoder,
    prompts: &[Vec<u32>],
    cfg: &GenConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generated>> {
    cfg.sampling.validate()?;
    ensure!(cfg.max_new_tokens > 0, "--max-new-tokens must be at least 1");
    for (i, p) in prompts.iter().enumerate() {
        ensure!(!p.is_empty(), "prompt {} is empty", i + 1);
        ensure!(
            p.len() < dec.max_len(),
            "prompt {} has {} tokens; the context holds {} (one more is needed for an answer)",
            i + 1,
            p.len(),
            dec.max_len()
        );
    }
    let mut done: Vec<Option<Generated>> = vec![None; prompts.len()];
    let mut live: Vec<Option<Live>> = (0..dec.slots()).map(|_| None).collect();
    let mut next = 0;
    loop {
        let mut toks = Vec::new();
        for (slot, l) in live.iter_mut().enumerate() {
            match l {
                Some(l) => {
                    let last = *l.out.tokens.last().expect("a live sequence has sampled");
                    toks.push(Tok { slot, pos: l.len, token: last, logits: true });
                    l.len += 1;
                }
                None if next < prompts.len() => {
                    let p = &prompts[next];
                    let n = p.len();
                    toks.extend(p.iter().enumerate().map(|(pos, &token)| Tok {
                        slot,
                        pos,
                        token,
                        logits: pos + 1 == n,
                    }));
                    let out = Generated { tokens: Vec::new(), logprobs: Vec::new(), finish: Finish::Length };
                    *l = Some(Live { request: next, len: n, out });
                    next += 1;
                }
                None => {}
            }
        }
        if toks.is_empty() {
            break;
        }
        let logits = dec.step(&toks)?;
        let mut rows = logits.chunks(dec.vocab());
        for (slot, l) in live.iter_mut().enumerate() {
            let Some(seq) = l else { continue };
            let row = rows.next().expect("a row per live slot");
            let u = uniform(cfg.seed, seq.request as u64, seq.len as u64);
            let Choice { token, logprob } = choose(row, &cfg.sampling, u);
            seq.out.tokens.push(token);
            seq.out.logprobs.push(logprob);
            on_token(seq.request, token);
            let stop = cfg.stop.contains(&token);
            if stop || seq.out.tokens.len() >= cfg.max_new_tokens || seq.len + 1 >= dec.max_len() {
                let mut s = l.take().expect("live");
                s.out.finish = if stop { Finish::Stop } else { Finish::Length };
                done[s.request] = Some(s.out);
                dec.release(slot);
            }
        }
    }
    Ok(done.into_iter().map(|d| d.expect("every prompt finished")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_head_is_the_whole_product_bit_for_bit() {
        let (m, h, v) = (3, 24, 10_007);
        let mut r = vpmoe_ir::rng::Rng::new(4);
        let rows: Vec<f32> = (0..m * h).map(|_| r.uniform() as f32 - 0.5).collect();
        let head: Vec<f32> = (0..v * h).map(|_| r.uniform() as f32 - 0.5).collect();
        let mut whole = vec![0f32; m * v];
        FastGemm.xwt(m, h, v, &rows, &head, &mut whole, false);
        for threads in [1, 2, 3] {
            let split = head_logits(&FastGemm, &rows, h, &head, v, threads);
            assert!(split.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()), "{threads} threads");
        }
    }
}
