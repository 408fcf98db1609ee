//! Generation on the cpu backend: prefill + decode over the key/value caches gives every token
//! bitwise the log-probability the training forward gives it, across window boundaries, several
//! sequences finishing at different times and a reused slot; sampling is reproducible whatever
//! the batch.

mod common;

use vpmoe_ir::reference::row_lse;
use vpmoe_ir::rng::Rng;
use vpmoe_ir::OutputName;
use vpmoe_runtime::backend::{Backend, Batch, KD_NONE};
use vpmoe_runtime::cpu::CpuBackend;
use vpmoe_runtime::decode::sampler::Sampling;
use vpmoe_runtime::decode::score::score_in_chunks;
use vpmoe_runtime::decode::{generate, Decoder, Finish, GenConfig, Tok};
use vpmoe_runtime::state::TrainState;

const ARCH: &str = "tests/configs/tiny_moe.toml"; // window 4, context 32, vocab 512, every feature

fn random_tokens(seed: u64, n: usize, vocab: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.next_u64() % vocab) as u32).collect()
}

/// `log p(tokens[i + 1] | tokens[..=i])` for every i, from the training forward over one row.
fn training_logprobs(be: &mut CpuBackend, tokens: &[u32]) -> Vec<f32> {
    let n = tokens.len();
    let batch = Batch {
        seq: n,
        tokens: tokens.iter().map(|&t| t as i32).collect(),
        doc: vec![0; n],
        labels: (0..n).map(|i| tokens.get(i + 1).map_or(0, |&t| t as i32)).collect(),
        loss_mask: (0..n).map(|i| u8::from(i + 1 < n)).collect(),
        span: vec![0; n],
        span_scale: [1.0; 3],
        loss_grad: 1.0,
        aux_grad: 0.0,
        kd: KD_NONE,
        ..Batch::default()
    };
    let out = be.forward(&batch, &[OutputName::TokenLoss]).unwrap();
    out.token_loss()[..n - 1].iter().map(|&ce| -ce).collect()
}

fn logprob(row: &[f32], token: u32) -> f32 {
    (row[token as usize] as f64 - row_lse(row)) as f32
}

#[test]
fn prefill_and_decode_match_the_training_forward_bitwise() {
    let (graph, plan) = common::compiled(ARCH);
    let state = TrainState::init(&plan, 11);
    let mut be = CpuBackend::new(&graph, &plan, state.clone());
    let vocab = plan.arch.vocab;
    // (prompt length, total length): a prompt longer than the window, one of a single token,
    // a full context, and a fourth sequence that takes over the first one to finish.
    let seqs: Vec<(usize, Vec<u32>)> = [(7usize, 20usize), (1, 9), (3, 32), (5, 12)]
        .iter()
        .enumerate()
        .map(|(i, &(p, n))| (p, random_tokens(100 + i as u64, n, vocab)))
        .collect();
    let want: Vec<Vec<f32>> = seqs.iter().map(|(_, t)| training_logprobs(&mut be, t)).collect();

    let mut dec = Decoder::new(&graph, &plan, &state, 3).unwrap();
    // got[s][i] = log p(token i + 1) from the decoder.
    let mut got: Vec<Vec<f32>> = seqs.iter().map(|_| Vec::new()).collect();
    // slot → (sequence, next position to feed).
    let mut slots: Vec<Option<(usize, usize)>> = vec![Some((0, 0)), Some((1, 0)), Some((2, 0))];
    let mut waiting = vec![3usize];
    loop {
        let mut toks = Vec::new();
        let mut owners = Vec::new();
        for (slot, s) in slots.iter_mut().enumerate() {
            let Some((si, pos)) = s else { continue };
            let (prompt, tokens) = &seqs[*si];
            // A new sequence feeds its whole prompt at once, then one token a step.
            let upto = if *pos == 0 { *prompt } else { *pos + 1 };
            for p in *pos..upto {
                let logits = p + 1 < tokens.len();
                toks.push(Tok { slot, pos: p, token: tokens[p], logits });
                if logits {
                    owners.push((*si, p));
                }
            }
            *pos = upto;
        }
        if toks.is_empty() {
            break;
        }
        let logits = dec.step(&toks).unwrap();
        for ((si, p), row) in owners.iter().zip(logits.chunks(vocab as usize)) {
            got[*si].push(logprob(row, seqs[*si].1[p + 1]));
        }
        for (slot, s) in slots.iter_mut().enumerate() {
            if let Some((si, pos)) = *s {
                if pos >= seqs[si].1.len() {
                    dec.release(slot);
                    *s = waiting.pop().map(|w| (w, 0));
                }
            }
        }
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), w.len(), "sequence {i}");
        for (p, (a, b)) in g.iter().zip(w).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "sequence {i}, token {}: decode {a} vs training {b}", p + 1);
        }
    }
}

#[test]
fn samples_depend_on_the_seed_not_on_the_batch() {
    let (graph, plan) = common::compiled(ARCH);
    let state = TrainState::init(&plan, 5);
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| random_tokens(200 + i, 2 + i as usize * 3, plan.arch.vocab)).collect();
    let cfg = |seed| GenConfig {
        sampling: Sampling { temperature: 1.0, top_k: 50, top_p: 0.95 },
        seed,
        max_new_tokens: 12,
        stop: vec![7], // a toy stop token, so some sequences finish early
    };
    let run = |slots: usize, seed: u64, prompts: &[Vec<u32>]| {
        let mut dec = Decoder::new(&graph, &plan, &state, slots).unwrap();
        generate(&mut dec, prompts, &cfg(seed), |_, _| {}).unwrap()
    };
    let one = run(1, 9, &prompts);
    let three = run(3, 9, &prompts);
    assert_eq!(one, three, "batch size changes nothing");
    assert_ne!(one, run(3, 10, &prompts), "another seed samples otherwise");
    for (g, p) in one.iter().zip(&prompts) {
        assert!(!g.tokens.is_empty() && g.tokens.len() <= 12);
        assert_eq!(g.finish == Finish::Stop, g.tokens.last() == Some(&7));
        assert!(p.len() + g.tokens.len() <= plan.arch.max_seq as usize);
    }

    // The recorded log-probabilities are the training forward's over prompt + continuation.
    let mut be = CpuBackend::new(&graph, &plan, state.clone());
    for (g, p) in one.iter().zip(&prompts) {
        let all: Vec<u32> = p.iter().chain(&g.tokens).copied().collect();
        let lp = training_logprobs(&mut be, &all);
        for (i, x) in g.logprobs.iter().enumerate() {
            assert_eq!(x.to_bits(), lp[p.len() - 1 + i].to_bits(), "token {i}");
        }
    }
}

#[test]
fn bad_prompts_are_named() {
    let (graph, plan) = common::compiled(ARCH);
    let state = TrainState::init(&plan, 5);
    let mut dec = Decoder::new(&graph, &plan, &state, 2).unwrap();
    let cfg = GenConfig { sampling: Sampling::greedy(), seed: 1, max_new_tokens: 4, stop: vec![] };
    let long = vec![1u32; plan.arch.max_seq as usize];
    let e = generate(&mut dec, &[vec![1, 2], long], &cfg, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("prompt 2 has 32 tokens"), "{e}");
    let e = generate(&mut dec, &[vec![]], &cfg, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("prompt 1 is empty"), "{e}");
    let e = dec.step(&[Tok { slot: 0, pos: 0, token: 9999, logits: true }]).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = dec.step(&[Tok { slot: 1, pos: 3, token: 1, logits: true }]).unwrap_err().to_string();
    assert!(e.contains("the next token must be at position 0, not 3"), "{e}");
    // A full context ends the sequence: one token fits after a 31-token prompt.
    let out = generate(&mut dec, &[vec![1u32; 31]], &cfg, |_, _| {}).unwrap();
    assert_eq!((out[0].tokens.len(), out[0].finish), (1, Finish::Length));
}

#[test]
fn scores_are_the_training_forwards_in_any_chunking() {
    let (graph, plan) = common::compiled(ARCH);
    let state = TrainState::init(&plan, 8);
    let tokens = random_tokens(300, 27, plan.arch.vocab);
    let want = training_logprobs(&mut CpuBackend::new(&graph, &plan, state.clone()), &tokens);
    let mut dec = Decoder::new(&graph, &plan, &state, 1).unwrap();
    for chunk in [1, 4, 5, 26, 100] {
        let s = score_in_chunks(&mut dec, &tokens, 3, chunk).unwrap();
        assert_eq!(s.logprobs[0], None);
        let got: Vec<u32> = s.logprobs[1..].iter().map(|x| x.unwrap().to_bits()).collect();
        assert_eq!(got, want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "chunks of {chunk}");
        assert_eq!(s.top.len(), tokens.len());
        assert!(s.top[0].is_empty() && s.top[1..].iter().all(|t| t.len() == 3 && t[0].1 >= t[1].1 && t[1].1 >= t[2].1));
        // A scored token in the top 3 carries the same log-probability there.
        for (t, top) in s.top.iter().enumerate().skip(1) {
            if let Some(&(_, lp)) = top.iter().find(|(id, _)| *id == tokens[t]) {
                assert_eq!(lp.to_bits(), s.logprobs[t].unwrap().to_bits());
            }
        }
    }
}
