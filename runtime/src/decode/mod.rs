//! The student generating text on the cpu backend: the decode program
//! (`vpmoe_compiler::decode`: a prefill and a step graph over per-slot key/value caches,
//! [`cache`]), token choice ([`sampler`]) and continuous batching ([`generate`]).
//!
//! A step interprets the decode program's nodes with each op's reference semantics, on just the
//! step's new tokens: GRAPE rotates each token by its own position (`grape_m_at`), attention
//! writes the token's K/V into the cache and reads the keys it may see from there
//! (`reference::cached_attention`), and every other op is the training op. So a sampled token's
//! log-probability is bitwise the one the training forward gives the same tokens
//! (`tests/decode.rs`).

pub mod cache;
pub mod sample;
pub mod sampler;
pub mod score;

use crate::cpu::{model_tensors, FastGemm};
use crate::state::TrainState;
use anyhow::{bail, ensure, Result};
use cache::KvCache;
use sampler::{choose, uniform, Choice, Sampling};
use serde::Serialize;
use std::path::PathBuf;
use vpmoe_compiler::decode::lower_decode;
use vpmoe_compiler::Plan;
use vpmoe_ir::reference::{self, cache_write, cached_attention_part, Data, Dims, Gemm, Tensor};
use vpmoe_ir::{Graph, InputName, Op, OutputName, ValueDef};

/// One new token of a step: its sequence slot, its position there, and whether the step returns
/// the logits that follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tok {
    pub slot: usize,
    pub pos: usize,
    pub token: u32,
    pub logits: bool,
}

/// One graph of the decode program with its parameters bound to the model's tensors.
pub(crate) struct Bound {
    pub graph: Graph,
    /// Per graph parameter: its index in the plan's parameters.
    pub params: Vec<usize>,
}

impl Bound {
    pub fn new(graph: Graph, plan: &Plan) -> Result<Bound> {
        let params = graph
            .params
            .iter()
            .map(|p| {
                plan.params
                    .iter()
                    .position(|q| q.name == p.name)
                    .ok_or_else(|| anyhow::anyhow!("the decode program reads {}, which the plan does not have", p.name))
            })
            .collect::<Result<_>>()?;
        Ok(Bound { graph, params })
    }
}

/// What a backend provides to run the decode program over its caches of [`Engine::slots`]
/// sequences: the cpu interpreter ([`CpuEngine`]) or the cuda one (`crate::cuda::decode`).
pub trait Engine {
    fn slots(&self) -> usize;
    fn vocab(&self) -> usize;
    /// The context: positions per sequence.
    fn max_len(&self) -> usize;
    /// Makes room in `slot` for positions `..len` (the global layers' blocks).
    fn reserve(&mut self, slot: usize, len: usize) -> Result<()>;
    /// Frees `slot`'s cache for a new sequence.
    fn release(&mut self, slot: usize);
    /// Runs the prefill (`step` false) or step graph over `toks` (checked and reserved by
    /// [`Decoder::step`]); the step graph's logits, `vocab` floats per token.
    fn run(&mut self, step: bool, toks: &[Tok]) -> Result<Option<Vec<f32>>>;
}

/// Where a decoder runs: the backend a run chose ([`crate::Backend::decode_on`]).
#[derive(Clone, Debug, PartialEq)]
pub enum DecodeOn {
    Cpu,
    /// The GPU, with the kernels of this plan directory's cubins where current (else NVRTC).
    Cuda(Option<PathBuf>),
}

impl DecodeOn {
    /// A decoder for `slots` sequences with `state`'s weights (see [`Decoder::new`]).
    pub fn decoder(&self, graph: &Graph, plan: &Plan, state: &TrainState, slots: usize) -> Result<Decoder> {
        Ok(match self {
            DecodeOn::Cpu => Decoder::new(graph, plan, state, slots)?,
            DecodeOn::Cuda(dir) => {
                let engine = crate::cuda::decode::CudaEngine::new(graph, plan, state, slots, dir.as_deref())?;
                Decoder::on(Box::new(engine))
            }
        })
    }
}

/// The decode program over a model's weights and the caches of `slots` sequences, on an
/// [`Engine`]; it keeps what each slot holds.
pub struct Decoder {
    engine: Box<dyn Engine>,
    /// Positions each slot holds.
    held: Vec<usize>,
}

impl Decoder {
    /// A cpu decoder for `slots` concurrent sequences of up to the architecture's
    /// `max_sequence_length` positions, from the training graph `graph` of `plan`.
    pub fn new(graph: &Graph, plan: &Plan, state: &TrainState, slots: usize) -> Result<Decoder> {
        Ok(Decoder::on(Box::new(CpuEngine::new(graph, plan, state, slots)?)))
    }

    /// A decoder on `engine`, every slot free.
    pub fn on(engine: Box<dyn Engine>) -> Decoder {
        Decoder { held: vec![0; engine.slots()], engine }
    }

    pub fn slots(&self) -> usize {
        self.engine.slots()
    }
    pub fn vocab(&self) -> usize {
        self.engine.vocab()
    }
    /// The context: positions per sequence.
    pub fn max_len(&self) -> usize {
        self.engine.max_len()
    }

    /// Frees `slot` for a new sequence.
    pub fn release(&mut self, slot: usize) {
        self.engine.release(slot);
        self.held[slot] = 0;
    }

    /// Runs one step over `toks` (each slot's tokens contiguous, in ascending positions that
    /// continue what the slot holds) and returns the logits after every token that asks for
    /// them, `vocab` floats each, in order. A slot's tokens before its first that asks go
    /// through the prefill graph, the rest through the step graph.
    pub fn step(&mut self, toks: &[Tok]) -> Result<Vec<f32>> {
        ensure!(!toks.is_empty(), "a step without tokens");
        let (slots, vocab) = (self.slots(), self.vocab());
        let mut seen = vec![false; slots];
        let mut held = self.held.clone();
        for (i, t) in toks.iter().enumerate() {
            ensure!(t.slot < slots, "slot {} of {slots}", t.slot);
            if i == 0 || toks[i - 1].slot != t.slot {
                ensure!(!seen[t.slot], "slot {}'s tokens are not contiguous in the step", t.slot);
                seen[t.slot] = true;
            }
            ensure!((t.token as usize) < vocab, "token {} is outside the vocabulary of {vocab}", t.token);
            ensure!(
                t.pos == held[t.slot],
                "slot {} holds {} positions; the next token must be at position {}, not {}",
                t.slot,
                held[t.slot],
                held[t.slot],
                t.pos
            );
            held[t.slot] += 1;
            self.engine.reserve(t.slot, t.pos + 1)?;
        }
        self.held = held;
        let mut asked = vec![false; slots];
        let (mut quiet, mut rest) = (Vec::new(), Vec::new());
        for t in toks {
            asked[t.slot] |= t.logits;
            (if asked[t.slot] { &mut rest } else { &mut quiet }).push(*t);
        }
        if !quiet.is_empty() {
            self.engine.run(false, &quiet)?;
        }
        if rest.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.engine.run(true, &rest)?.expect("the step graph has logits");
        let rows = if rest.iter().all(|t| t.logits) {
            logits
        } else {
            rest.iter()
                .zip(logits.chunks(vocab))
                .filter(|(t, _)| t.logits)
                .flat_map(|(_, row)| row.iter().copied())
                .collect()
        };
        if let Some(i) = rows.iter().position(|x| !x.is_finite()) {
            bail!("the model produced a non-finite logit ({} for token {} of row {})", rows[i], i % vocab, i / vocab);
        }
        Ok(rows)
    }
}

/// The decode program interpreted on the cpu with each op's reference semantics.
pub struct CpuEngine {
    prefill: Bound,
    step: Bound,
    model: Vec<Tensor>,
    vocab: usize,
    max_len: usize,
    cache: KvCache,
    /// Threads the LM head is split over.
    cores: usize,
    gemm: FastGemm,
    /// Model the cuda kernels' roundings ([`CpuEngine::kernel_model`]).
    kernel_model: bool,
}

impl CpuEngine {
    /// The engine with the cuda kernels' roundings: every bf16 value rounded to bf16 where the
    /// kernels store it, and the intermediates they keep in bf16 ([`reference::TensorCore`]).
    /// The reference the cuda decode program is held to.
    pub fn kernel_model(mut self) -> CpuEngine {
        self.kernel_model = true;
        self
    }

    pub fn new(graph: &Graph, plan: &Plan, state: &TrainState, slots: usize) -> Result<CpuEngine> {
        ensure!(slots > 0, "at least one sequence slot");
        crate::backend::check_weights(plan, state)?;
        let program = lower_decode(graph)?;
        let width = program.caches[0].width;
        ensure!(program.caches.iter().all(|c| c.width == width), "attention layers of different widths");
        let windows: Vec<Option<usize>> = program.caches.iter().map(|c| c.window.map(|w| w as usize)).collect();
        let max_len = plan.arch.max_seq as usize;
        Ok(CpuEngine {
            prefill: Bound::new(program.prefill, plan)?,
            step: Bound::new(program.step, plan)?,
            model: model_tensors(plan, &state.master),
            vocab: plan.arch.vocab as usize,
            max_len,
            cache: KvCache::new(&windows, width as usize, slots, max_len),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gemm: FastGemm,
            kernel_model: false,
        })
    }
}

impl Engine for CpuEngine {
    fn slots(&self) -> usize {
        self.cache.slots()
    }
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn max_len(&self) -> usize {
        self.max_len
    }
    fn reserve(&mut self, slot: usize, len: usize) -> Result<()> {
        self.cache.reserve(slot, len)
    }
    fn release(&mut self, slot: usize) {
        self.cache.release(slot);
    }

    fn run(&mut self, step: bool, toks: &[Tok]) -> Result<Option<Vec<f32>>> {
        let b = if step { &self.step } else { &self.prefill };
        let g = &b.graph;
        let n = toks.len();
        let dims = Dims { tokens: n, seq: n };
        let mut vals: Vec<Option<Tensor>> = vec![None; g.values.len()];
        for inp in &g.inputs {
            vals[inp.value.0 as usize] = Some(Tensor::i32(vec![n], input(&inp.name, toks)));
        }
        let tensor_core = reference::TensorCore(&self.gemm);
        let gemm: &dyn Gemm = if self.kernel_model { &tensor_core } else { &self.gemm };
        for node in &g.nodes {
            let outs = {
                let ins: Vec<&Tensor> = node
                    .inputs
                    .iter()
                    .map(|v| match g.value(*v).def {
                        ValueDef::Param(p) => &self.model[b.params[p.0 as usize]],
                        _ => vals[v.0 as usize].as_ref().expect("inputs are computed before use"),
                    })
                    .collect();
                match node.op {
                    Op::CachedAttention { ref attn, layer } => {
                        let threads = attention_threads(attn, ins[3].i(), self.cores);
                        let out = attend(attn, layer as usize, &ins, &self.cache, threads);
                        cache_write(attn, layer as usize, &ins, &mut self.cache);
                        vec![Tensor::f32(vec![n, (attn.heads * attn.head_dim) as usize], out)]
                    }
                    Op::Logits { hidden, vocab } => {
                        let (h, v) = (hidden as usize, vocab as usize);
                        vec![Tensor::f32(vec![n, v], head_logits(&self.gemm, ins[0].f(), h, ins[1].f(), v, self.cores))]
                    }
                    ref op => reference::forward(op, &dims, &ins, gemm),
                }
            };
            for (v, mut t) in node.outputs.iter().zip(outs) {
                if self.kernel_model && g.value(*v).ty.dtype == vpmoe_ir::DType::Bf16 {
                    if let Data::F32(x) = &mut t.data {
                        x.iter_mut().for_each(|x| *x = reference::round_bf16(*x));
                    }
                }
                vals[v.0 as usize] = Some(t);
            }
        }
        let Some(out) = g.output_named(&OutputName::Logits) else { return Ok(None) };
        match vals[out.0 as usize].take().map(|t| t.data) {
            Some(Data::F32(v)) => Ok(Some(v)),
            _ => unreachable!("logits are f32 and computed"),
        }
    }
}

/// The decode program's input `name` for `toks`: `$tokens`, `$pos` or `$slot`.
pub fn input(name: &InputName, toks: &[Tok]) -> Vec<i32> {
    match name {
        InputName::Tokens => toks.iter().map(|t| t.token as i32).collect(),
        InputName::Pos => toks.iter().map(|t| t.pos as i32).collect(),
        InputName::Slot => toks.iter().map(|t| t.slot as i32).collect(),
        other => unreachable!("the decode program reads ${other}"),
    }
}

/// Threads for a cached-attention call: all the cores once it reads at least 2²⁰ key values
/// (a few milliseconds of work, against tens of microseconds to start a thread).
fn attention_threads(a: &vpmoe_ir::Attn, pos: &[i32], cores: usize) -> usize {
    let keys: usize = pos
        .iter()
        .map(|&p| match a.kind {
            vpmoe_ir::AttnKind::Window(w) => (p as usize + 1).min(w as usize),
            vpmoe_ir::AttnKind::Global { .. } => p as usize + 1,
        })
        .sum();
    if keys * (a.heads * a.head_dim) as usize >= 1 << 20 {
        cores
    } else {
        1
    }
}

/// Cached attention's context vectors on the cpu (before the call's K/V are written), the
/// (token, head) pairs split across up to `threads` threads. Each pair is computed whole by the
/// reference, so the split changes no bit.
fn attend(a: &vpmoe_ir::Attn, layer: usize, ins: &[&Tensor], cache: &KvCache, threads: usize) -> Vec<f32> {
    let (d, pairs) = (a.head_dim as usize, ins[3].i().len() * a.heads as usize);
    let per = pairs.div_ceil(threads.clamp(1, pairs.max(1)));
    let mut out = vec![0f32; pairs * d];
    std::thread::scope(|s| {
        let mut parts = out.chunks_mut(per * d).enumerate();
        let (_, mine) = parts.next().expect("at least one pair");
        for (c, part) in parts {
            s.spawn(move || cached_attention_part(a, layer, ins, cache, c * per, part));
        }
        cached_attention_part(a, layer, ins, cache, 0, mine); // this thread takes the first share
    });
    out
}

/// The `logits` op on the cpu: `rows · headᵀ` (`rows`: m × h, `head`: v × h), the vocabulary
/// split across up to `threads` threads (slices of at least 4096 entries). Each logit is one dot
/// product whatever the split, so the result is the reference's bit for bit.
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
    on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generated>> {
    generate_from(dec, prompts, 0, cfg, on_token)
}

/// [`generate`] for requests `first..first + prompts.len()` of a larger set (a data-parallel
/// rank's share): their draws are the ones the whole set's would be.
pub fn generate_from(
    dec: &mut Decoder,
    prompts: &[Vec<u32>],
    first: u64,
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
            let u = uniform(cfg.seed, first + seq.request as u64, seq.len as u64);
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
    fn split_attention_is_the_single_thread_result_bit_for_bit() {
        use vpmoe_ir::reference::KvStore;
        use vpmoe_ir::{Attn, AttnKind};
        let mut r = vpmoe_ir::rng::Rng::new(5);
        let mut rand = |n: usize| Tensor::f32(vec![n], (0..n).map(|_| r.uniform() as f32 - 0.5).collect());
        let (nh, ng, d) = (4, 2, 8);
        for kind in [AttnKind::Window(3), AttnKind::Global { alibi: true }] {
            let a = Attn { heads: nh as u64, groups: ng as u64, head_dim: d as u64, kind, sinks: true };
            let mut cache = KvCache::new(&[Some(3), None], ng * d, 2, 32);
            // Slot 0 holds 5 positions, slot 1 none; the call continues slot 0 by 2 tokens and
            // starts slot 1 with 4.
            for p in 0..5 {
                cache.reserve(0, p + 1).unwrap();
                let layer = usize::from(matches!(kind, AttnKind::Global { .. }));
                let (k, v) = (rand(ng * d), rand(ng * d));
                cache.write(layer, 0, p, k.f(), v.f());
            }
            cache.reserve(1, 4).unwrap();
            cache.reserve(0, 7).unwrap();
            let (pos, slot) = (vec![5, 6, 0, 1, 2, 3], vec![0, 0, 1, 1, 1, 1]);
            let t = pos.len();
            let (q, k, v, sinks) = (rand(t * nh * d), rand(t * ng * d), rand(t * ng * d), rand(nh));
            let (pos, slot) = (Tensor::i32(vec![t], pos), Tensor::i32(vec![t], slot));
            let ins = [&q, &k, &v, &pos, &slot, &sinks];
            let layer = usize::from(matches!(kind, AttnKind::Global { .. }));
            let one = attend(&a, layer, &ins, &cache, 1);
            for threads in [2, 3, 7, 100] {
                let split = attend(&a, layer, &ins, &cache, threads);
                assert!(split.iter().zip(&one).all(|(x, y)| x.to_bits() == y.to_bits()), "{threads} threads");
            }
            assert!(one.iter().all(|x| x.is_finite()) && one.iter().any(|&x| x != 0.0));
        }
    }

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
