//! Stage 3 (on-policy distillation) on the cpu backend against a stand-in teacher whose
//! log-probabilities are a known function of the sequence: alignment token by token, the
//! learning signal, bitwise reproducibility and resume at lag 0, and the lag-1 pipeline.

mod common;

use common::fake_teacher::{start, Faults, Server};
use common::{compiled, sample_data, tmp};
use std::sync::OnceLock;
use vpmoe_compiler::Plan;
use vpmoe_data::harmony::{self, Conversation, Message, RenderConfig, Role};
use vpmoe_ir::{Graph, OutputName};
use vpmoe_runtime::backend::{Backend, WEIGHT_OPD};
use vpmoe_runtime::cpu::CpuBackend;
use vpmoe_runtime::decode::{DecodeOn, Finish};
use vpmoe_runtime::opd::curriculum::Curriculum;
use vpmoe_runtime::opd::rollout::{self, Prompts, Rollout, Sampler};
use vpmoe_runtime::opd::{OpdConfig, OpdRun, TEACHER_LOGP_FLOOR};
use vpmoe_runtime::state::TrainState;
use vpmoe_runtime::teacher::client::{Client, ClientConfig};
use vpmoe_runtime::teacher::wire::Api;
use vpmoe_runtime::train::TrainConfig;

const SEQ: usize = 192;

/// A teacher that depends on the token, its predecessor and its position, so a shifted
/// alignment shows.
fn hashed(ids: &[i64], t: usize, _k: usize) -> (Vec<(i64, f64)>, f64) {
    let h = vpmoe_ir::rng::splitmix64((ids[t] as u64) << 20 ^ (ids[t - 1] as u64) << 40 ^ t as u64);
    (vec![], -((h % 4000) as f64) / 1000.0 - 0.01)
}

/// A teacher that strongly prefers even token ids (and Harmony's special tokens, so the format
/// is kept): log p = −0.5 for those, −6 for the others.
fn prefers_even(ids: &[i64], t: usize, _k: usize) -> (Vec<(i64, f64)>, f64) {
    (vec![], if preferred(ids[t] as u32) { -0.5 } else { -6.0 })
}

fn preferred(id: u32) -> bool {
    id >= vpmoe_data::tokenizer::N_ORDINARY || id.is_multiple_of(2)
}

fn client(s: &Server) -> ClientConfig {
    ClientConfig {
        url: s.url.clone(),
        api: Api::Vllm,
        model: None,
        timeout: std::time::Duration::from_secs(30),
        retries: 2,
        backoff: std::time::Duration::from_millis(10),
        vocab: vpmoe_data::tokenizer::VOCAB_SIZE as usize,
    }
}

fn model() -> &'static (Graph, Plan) {
    static M: OnceLock<(Graph, Plan)> = OnceLock::new();
    M.get_or_init(|| compiled("configs/small.toml"))
}

/// The small model after stage 1 on the bundled sample, long enough that it writes Harmony
/// messages (its answers have parseable analysis and final spans).
fn stage1() -> &'static TrainState {
    &stage1_run().0
}

/// The stage-1 state and the run directory holding its checkpoint.
fn stage1_run() -> &'static (TrainState, std::path::PathBuf) {
    static S: OnceLock<(TrainState, std::path::PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let (g, plan) = model();
        // The main job's settings (`vpmoe-rt train --backend cpu`).
        let dir = tmp("stage1");
        let (mut cfg, mut opts) = common::run_config(40, 2, 128, dir.clone());
        (cfg.aux_lr, cfg.aux_min_lr, cfg.schedule.warmup) = (0.02, 0.002, 4);
        opts.keep = 1;
        let mut be = CpuBackend::new(g, plan, TrainState::init(plan, cfg.seed));
        (common::train(&mut be, plan, &sample_data(), &cfg, &opts).unwrap().state, dir)
    })
}

fn opd_config(max_lag: u64, ce_anchor: f64) -> OpdConfig {
    OpdConfig {
        ce_anchor,
        max_lag,
        ratio_clip: 2.0,
        max_new_tokens: 96,
        token_budget: 2_000,
        curriculum: Curriculum::default(),
    }
}

/// What samples a synchronous step of 4 rollouts from the small model.
fn sampler(server: &Server, seed: u64) -> Sampler {
    let plan = &model().1;
    Sampler {
        graph: vpmoe_compiler::lower::lower(&plan.arch),
        plan: plan.clone(),
        prompts: Prompts::open(&sample_data()[0].0).unwrap(),
        teacher: Client::connect(client(server)).unwrap(),
        cfg: opd_config(0, 0.0),
        seed,
        seq_len: SEQ,
        rows: 4,
    }
}

#[test]
fn teacher_logprobs_align_with_every_trained_token() {
    let (g, plan) = model();
    let server = start(Api::Vllm, Faults::default(), hashed);
    let s = sampler(&server, 9);
    let state = stage1();
    let phase = s.cfg.curriculum.at(0.0).clone();
    let mut r = rollout::sample(&s, &DecodeOn::Cpu, state, state.step, &phase, 96, 0..s.rows).unwrap();
    assert_eq!(r.rows.len(), 4);
    assert!(r.rows.iter().any(|x| x.span.iter().any(|&s| s != 0)), "the stage-1 model writes Harmony spans");
    // The teacher's value of each sampled token is the function at that token and context.
    let f = |seq: &[u32], t: usize| {
        let ids: Vec<i64> = seq.iter().map(|&x| x as i64).collect();
        (hashed(&ids, t, 0).1 as f32).max(TEACHER_LOGP_FLOOR)
    };
    for x in &r.rows {
        let seq: Vec<u32> = x.prompt.iter().chain(&x.completion).copied().collect();
        for c in 0..x.completion.len() {
            assert_eq!(x.teacher_logp[c], f(&seq, x.prompt.len() + c), "completion token {c}");
        }
    }
    // A hand-made answer crosses from analysis to final inside one row.
    let answer = harmony::render_for_training(
        &Conversation {
            messages: vec![
                Message::new(Role::Assistant, "Two and two.").with_channel("analysis"),
                Message::new(Role::Assistant, "4").with_channel("final"),
            ],
        },
        RenderConfig::default(),
    )
    .unwrap();
    // The assistant header is the prompt's; the completion starts at the channel.
    assert!(r.rows[0].prompt.ends_with(&answer.token_ids[..2]));
    let completion = answer.token_ids[2..].to_vec();
    let parsed = vpmoe_data::completion::parse(&completion);
    assert!(parsed.verdict.valid, "{:?}", parsed.verdict);
    let prompt = r.rows[0].prompt.clone();
    let seq: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
    let n = completion.len();
    r.rows[1] = Rollout {
        prompt: prompt.clone(),
        effort: r.rows[0].effort,
        teacher_logp: (0..n).map(|c| f(&seq, prompt.len() + c)).collect(),
        sampler_logp: (0..n).map(|c| -(c as f32) / 100.0).collect(),
        span: parsed.span_id.clone(),
        valid: true,
        finish: Finish::Stop,
        completion,
    };
    assert!(r.rows[1].span.contains(&1) && r.rows[1].span.contains(&2));

    // Position p of a row predicts token p + 1: its teacher and sampler values are that token's.
    let batches = rollout::batches(&r.rows, SEQ, 2, 2.0);
    let mut be = CpuBackend::new(g, plan, state.clone());
    let (mut trained, mut spans) = (0, [0; 3]);
    for (k, b) in batches.iter().enumerate() {
        b.validate(plan.arch.vocab).unwrap();
        let lp = be.forward(b, &[OutputName::TokenLoss]).unwrap();
        for (i, x) in r.rows[2 * k..2 * k + 2].iter().enumerate() {
            let seq: Vec<u32> = x.prompt.iter().chain(&x.completion).copied().collect();
            for p in 0..SEQ {
                let at = i * SEQ + p;
                if b.loss_mask[at] == 0 {
                    assert!(
                        b.teacher[at] == 0
                            && (p + 1 < x.prompt.len() || p + 1 >= seq.len() || x.span[p + 1 - x.prompt.len()] == 0)
                    );
                    continue;
                }
                let c = p + 1 - x.prompt.len();
                assert_eq!(b.labels[at] as u32, seq[p + 1]);
                assert_eq!((b.teacher[at], b.span[at]), (WEIGHT_OPD, x.span[c]));
                assert_eq!(b.teacher_logp[at], f(&seq, p + 1), "row {i} position {p}");
                assert_eq!(b.sampler_logp[at], x.sampler_logp[c]);
                spans[x.span[c] as usize] += 1;
                trained += 1;
                // Sampled rows: at lag 0 the sampler's log-probability is the trainer's, bit
                // for bit (the decoder is the training forward), so every ratio is exactly 1.
                if !(k == 0 && i == 1) {
                    assert_eq!((-lp.token_loss()[at]).to_bits(), x.sampler_logp[c].to_bits(), "row {i} position {p}");
                }
            }
        }
    }
    println!("aligned {trained} trained tokens (reasoning {}, final {})", spans[1], spans[2]);
    assert!(spans[1] > 0 && spans[2] > 0);
}

/// Stage 3 from the stage-1 model, a schedule of `steps` steps, run up to step `until` of them.
fn opd_run(
    server: &Server,
    dir: &std::path::Path,
    opd: OpdConfig,
    (steps, until): (u64, u64),
    resume: bool,
) -> (common::Trained, TrainConfig) {
    let (g, plan) = model();
    let start_step = stage1().step;
    let (mut cfg, mut opts) = common::run_config(start_step + steps, 2, SEQ, dir.to_path_buf());
    opts.steps = start_step + until;
    (cfg.schedule.warmup, cfg.schedule.lr, cfg.aux_lr) = (0, 0.02, 0.02);
    cfg.opd = Some(opd);
    opts.resume = resume;
    opts.keep = 5;
    opts.opd = Some(OpdRun { teacher: client(server), prompts: sample_data()[0].0.clone() });
    let mut be = CpuBackend::new(g, plan, stage1().clone());
    (common::train(&mut be, plan, &sample_data(), &cfg, &opts).unwrap(), cfg)
}

/// [`opd_run`] (no resume) on `world` ranks with the sharded optimizer; rank 0's outcome.
fn opd_ranks(world: usize, server: &Server, dir: &std::path::Path, opd: OpdConfig, steps: u64) -> common::Trained {
    let (g, plan) = model();
    let start_step = stage1().step;
    let (mut cfg, mut opts) = common::run_config(start_step + steps, 2, SEQ, dir.to_path_buf());
    (cfg.schedule.warmup, cfg.schedule.lr, cfg.aux_lr) = (0, 0.02, 0.02);
    cfg.opd = Some(opd);
    opts.opd = Some(OpdRun { teacher: client(server), prompts: sample_data()[0].0.clone() });
    let mut outs = common::on_ranks(world, |dist| {
        let mut opts = opts.clone();
        (opts.dist, opts.shard_optimizer) = (dist, true);
        let mut be = CpuBackend::new(g, plan, stage1().clone());
        common::train(&mut be, plan, &sample_data(), &cfg, &opts).unwrap()
    });
    outs.swap_remove(0)
}

/// Two ranks sample and score the rollouts of their own micro-batches: the same rollouts and
/// statistics as one rank that samples them all, and the same model within the fp32
/// summation-order tolerance of tests/dist.rs.
#[test]
fn two_ranks_share_a_steps_rollouts() {
    let server = start(Api::Vllm, Faults::default(), prefers_even);
    let cfg = opd_config(0, 0.34);
    let (one, _) = opd_run(&server, &tmp("dp1"), cfg.clone(), (3, 3), false);
    let two = opd_ranks(2, &server, &tmp("dp2"), cfg, 3);
    for (a, b) in one.records.iter().zip(&two.records) {
        let (x, y) = (a.opd.as_ref().unwrap(), b.opd.as_ref().unwrap());
        assert_eq!(
            (x.anchor, x.modes, x.opd_tokens, x.teacher_floored),
            (y.anchor, y.modes, y.opd_tokens, y.teacher_floored)
        );
        assert_eq!((x.valid_rate, x.length_by_mode), (y.valid_rate, y.length_by_mode), "step {}", a.step);
        assert_eq!((a.tokens_reasoning, a.tokens_final), (b.tokens_reasoning, b.tokens_final));
        let d = (a.loss - b.loss).abs() / a.loss.abs();
        assert!(d <= 3e-4, "step {}: loss {} vs {} ({d:.1e})", a.step, a.loss, b.loss);
        assert!((x.advantage_final - y.advantage_final).abs() <= 1e-3 * x.advantage_final.abs().max(1.0));
    }
    assert!(one.records.iter().any(|r| !r.opd.as_ref().unwrap().anchor), "an OPD step ran");
}

#[test]
fn synchronous_opd_is_reproducible_and_resumes_bit_for_bit() {
    let server = start(Api::Vllm, Faults::default(), prefers_even);
    let cfg = opd_config(0, 0.34);
    let (a, _) = opd_run(&server, &tmp("sync-a"), cfg.clone(), (3, 3), false);
    let (b, _) = opd_run(&server, &tmp("sync-b"), cfg.clone(), (3, 3), false);
    let losses = |o: &common::Trained| o.records.iter().map(|r| r.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(a.state.checksum(), b.state.checksum());
    let kinds: Vec<bool> = a.records.iter().map(|r| r.opd.as_ref().unwrap().anchor).collect();
    assert!(kinds.contains(&true) && kinds.contains(&false), "CE-anchor and OPD steps: {kinds:?}");
    for r in &a.records {
        let o = r.opd.as_ref().unwrap();
        if !o.anchor {
            assert_eq!((o.lag, o.mismatch_max, o.clipped), (0, 0.0, 0.0), "lag 0: the sampler is the trainer");
        }
    }
    // Two steps, a checkpoint, then the third after a resume.
    let dir = tmp("sync-resume");
    let (first, _) = opd_run(&server, &dir, cfg.clone(), (3, 2), false);
    assert_eq!(losses(&first), losses(&a)[..2]);
    let (rest, _) = opd_run(&server, &dir, cfg, (3, 3), true);
    assert_eq!(losses(&rest), losses(&a)[2..]);
    assert_eq!(rest.state.checksum(), a.state.checksum(), "resume is bitwise");
}

/// Share of even ids among the ordinary tokens the model samples for `prompts` (several seeds).
fn even_rate(state: &TrainState, prompts: &[Vec<u32>]) -> f64 {
    let plan = &model().1;
    let graph = vpmoe_compiler::lower::lower(&plan.arch);
    let mut dec = vpmoe_runtime::decode::Decoder::new(&graph, plan, state, prompts.len()).unwrap();
    let (mut even, mut all) = (0u64, 0u64);
    for seed in 0..4 {
        let gen = vpmoe_runtime::decode::GenConfig {
            sampling: Default::default(),
            seed,
            max_new_tokens: 96,
            stop: vpmoe_runtime::decode::sample::STOP.to_vec(),
        };
        for out in vpmoe_runtime::decode::generate(&mut dec, prompts, &gen, |_, _| {}).unwrap() {
            for &t in out.tokens.iter().filter(|&&t| t < vpmoe_data::tokenizer::N_ORDINARY) {
                even += u64::from(t.is_multiple_of(2));
                all += 1;
            }
        }
    }
    even as f64 / all as f64
}

/// The learning signal, measured: against a teacher that prefers even token ids, the student's
/// advantage rises and its samples move toward even ids.
#[test]
fn opd_moves_the_student_toward_the_teacher() {
    let server = start(Api::Vllm, Faults::default(), prefers_even);
    let steps = 16;
    let (out, _) = opd_run(&server, &tmp("learn"), opd_config(0, 0.0), (steps, steps), false);
    let adv: Vec<f64> = out
        .records
        .iter()
        .map(|r| {
            let o = r.opd.as_ref().unwrap();
            let n = (r.tokens_reasoning + r.tokens_final).max(1) as f64;
            (o.advantage_reasoning * r.tokens_reasoning as f64 + o.advantage_final * r.tokens_final as f64) / n
        })
        .collect();
    let (head, tail) = (adv[..3].iter().sum::<f64>() / 3.0, adv[adv.len() - 3..].iter().sum::<f64>() / 3.0);
    let prompts: Vec<Vec<u32>> = {
        let p = Prompts::open(&sample_data()[0].0).unwrap();
        (0..p.len()).filter_map(|d| p.prompt(d, vpmoe_data::harmony::ReasoningEffort::Medium)).collect()
    };
    let (before, after) = (even_rate(stage1(), &prompts), even_rate(&out.state, &prompts));
    println!(
        "OPD, {steps} steps against a teacher preferring even ids: mean advantage {head:+.3} (steps 1-3) -> {tail:+.3} \
         (steps {}-{steps}); even share of sampled tokens {:.1}% -> {:.1}%",
        steps - 2,
        100.0 * before,
        100.0 * after
    );
    assert!(tail > head + 1.0, "the advantage rises: {adv:?}");
    assert!(after > before + 0.03, "samples move toward the preferred tokens: {before} -> {after}");
}

#[test]
fn lag_one_samples_the_next_step_while_training_and_never_trains_older_rollouts() {
    let server = start(Api::Vllm, Faults::default(), prefers_even);
    let dir = tmp("lag1");
    let (out, _) = opd_run(&server, &dir, opd_config(1, 0.0), (4, 4), false);
    let lags: Vec<u64> = out.records.iter().map(|r| r.opd.as_ref().unwrap().lag).collect();
    assert_eq!(lags, [0, 1, 1, 1], "the first step samples itself; each later one was sampled during its predecessor");
    let buffer: Vec<usize> = out.records.iter().map(|r| r.opd.as_ref().unwrap().buffer).collect();
    assert_eq!(buffer, [1, 1, 1, 0], "nothing is sampled past the last step");
    for r in &out.records[1..] {
        let o = r.opd.as_ref().unwrap();
        assert!(o.mismatch_mean > 0.0, "lag 1: the trainer's weights moved since sampling");
    }
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(text.contains("\"lag\":1") && text.contains("\"clipped\""), "{text}");
}

#[test]
fn teacher_outages_are_retried_and_bad_answers_stop_with_a_clear_error() {
    // Two 503s, then answers: the run finishes.
    let flaky = start(Api::Vllm, Faults { status_first: Some((503, 2)), ..Default::default() }, prefers_even);
    let (out, _) = opd_run(&flaky, &tmp("flaky"), opd_config(0, 0.0), (1, 1), false);
    assert_eq!(out.records.len(), 1);
    // NaN in an answer: a clear error, and no checkpoint is left behind.
    let dir = tmp("nan");
    let (g, plan) = model();
    let (mut cfg, mut opts) = common::run_config(stage1().step + 1, 2, SEQ, dir.clone());
    cfg.opd = Some(opd_config(0, 0.0));
    let broken = start(Api::Vllm, Faults { nan_always: true, ..Default::default() }, |_, _, _| (vec![], -1.25));
    opts.opd = Some(OpdRun { teacher: client(&broken), prompts: sample_data()[0].0.clone() });
    let mut be = CpuBackend::new(g, plan, stage1().clone());
    let e = common::train(&mut be, plan, &sample_data(), &cfg, &opts).map(|_| ()).unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("teacher scoring of rollouts") && text.contains("NaN"), "{text}");
    assert!(vpmoe_runtime::checkpoint::latest(&dir).unwrap().is_none());
}

/// D6: the objective and its gradient do not depend on how a step's rollouts are split into
/// micro-batches, nor on how much padding ends each row.
#[test]
fn the_opd_objective_ignores_the_micro_batch_split_and_padding() {
    let (g, plan) = model();
    let server = start(Api::Vllm, Faults::default(), prefers_even);
    let s = sampler(&server, 4);
    let phase = s.cfg.curriculum.at(0.0).clone();
    let r = rollout::sample(&s, &DecodeOn::Cpu, stage1(), 0, &phase, 96, 0..s.rows).unwrap();
    // A step's loss and gradient norm from its batches.
    let step = |seq: usize, micro: usize| {
        let mut b = rollout::batches(&r.rows, seq, micro, 2.0);
        vpmoe_runtime::backend::seed_step(&mut b, &plan.arch, [1.0, 1.0]);
        let mut be = CpuBackend::new(g, plan, stage1().clone());
        let loss: f64 = b.iter().map(|b| be.accumulate(b).unwrap().loss).sum();
        let sc =
            vpmoe_runtime::backend::StepScalars { lr: 0.0, aux_lr: 0.0, weight_decay: 0.0, clip: 0.0, bias_rate: 0.0 };
        (loss, be.step(&sc).unwrap().grad_norm)
    };
    let (whole, split, padded) = (step(SEQ, 4), step(SEQ, 1), step(SEQ + 64, 2));
    println!(
        "OPD step: loss, |g| = {whole:?} (one micro-batch), {split:?} (four), {padded:?} (64 more padding per row)"
    );
    for (what, x) in [("split", split), ("padding", padded)] {
        assert!((x.0 - whole.0).abs() <= 1e-5 * whole.0.abs().max(1.0), "{what}: loss {} vs {}", x.0, whole.0);
        assert!((x.1 - whole.1).abs() <= 1e-4 * whole.1, "{what}: |g| {} vs {}", x.1, whole.1);
    }
    assert!(whole.1 > 0.0);
}

/// The canonical path: `vpmoe-rt train --init <stage 1> --opd-teacher URL --api vllm`, and its
/// flags refused by name when they make no sense.
#[test]
fn the_cli_runs_stage_three_from_a_stage_one_checkpoint() {
    let server = start(Api::Vllm, Faults::default(), prefers_even);
    let dir = tmp("cli");
    let rt = |extra: &[&str]| {
        let data = sample_data()[0].0.display().to_string();
        let ckpt = dir.join("run").display().to_string();
        let init = stage1_run().1.display().to_string();
        let mut args = vec!["train", "--backend", "cpu", "--data", &data, "--ckpt-dir", &ckpt, "--init", &init];
        args.extend([
            "--steps",
            "2",
            "--warmup",
            "0",
            "--micro-batch",
            "1",
            "--grad-accum",
            "2",
            "--seq-len",
            "192",
            "--eval-every",
            "0",
        ]);
        args.extend(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_vpmoe-rt")).args(&args).output().unwrap()
    };
    let text = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    let url = server.url.clone();
    let o =
        rt(&["--opd-teacher", &url, "--api", "vllm", "--max-lag", "0", "--ce-anchor", "0", "--max-new-tokens", "32"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("initialised from ") && text(&o).contains("stage 3: on-policy distillation against"),
        "{}",
        text(&o)
    );
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"opd\":{\"anchor\":false")).count(), 2, "{metrics}");

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[phase]]\nname = \"only\"\nuntil = 0.5\nlow = 1.0\nmedium = 0.0\nhigh = 0.0\nrollouts = 1\n",
    )
    .unwrap();
    let bad = bad.display().to_string();
    for (args, want) in [
        (vec!["--opd-teacher", &url], "--api"),
        (vec!["--ce-anchor", "0.2"], "--opd-teacher"),
        (vec!["--opd-teacher", &url, "--api", "vllm", "--ce-anchor", "1.5"], "--ce-anchor 1.5 must be in [0, 1)"),
        (vec!["--opd-teacher", &url, "--api", "vllm", "--max-lag", "3"], "--max-lag 3 is not supported"),
        (vec!["--opd-teacher", &url, "--api", "vllm", "--curriculum", &bad], "must end at until = 1"),
    ] {
        let o = rt(&args);
        assert!(!o.status.success() && text(&o).contains(want), "{args:?}: {}", text(&o));
        assert!(!text(&o).contains("panicked"), "{}", text(&o));
    }
}

/// `eval --teacher`: the teacher's mean log-probability of the sampled answers' final tokens.
#[test]
fn eval_reports_the_teachers_mean_logprob_of_final_answers() {
    let plan = &model().1;
    let server = start(Api::Vllm, Faults::default(), |_, _, _| (vec![], -1.25));
    let teacher = Client::connect(client(&server)).unwrap();
    let graph = vpmoe_compiler::lower::lower(&plan.arch);
    let mut dec = vpmoe_runtime::decode::Decoder::new(&graph, plan, stage1(), 4).unwrap();
    let p = Prompts::open(&sample_data()[0].0).unwrap();
    let prompts: Vec<vpmoe_runtime::decode::sample::Prompt> = (0..p.len())
        .filter_map(|d| p.prompt(d, vpmoe_data::harmony::ReasoningEffort::Medium))
        .enumerate()
        .map(|(line, tokens)| vpmoe_runtime::decode::sample::Prompt { line, source: serde_json::Value::Null, tokens })
        .collect();
    let s = vpmoe_runtime::eval::sample_stats(&mut dec, &prompts, "medium", true, 1, 96, 3, Some(&teacher)).unwrap();
    let n = s.teacher_final_tokens.unwrap();
    assert!(n > 0, "the stage-1 model writes final answers");
    assert_eq!(s.teacher_final_logp, Some(-1.25));
    let without = vpmoe_runtime::eval::sample_stats(&mut dec, &prompts, "medium", true, 1, 96, 3, None).unwrap();
    assert_eq!((without.teacher_final_logp, without.teacher_final_tokens), (None, None));
    assert_eq!(without.valid, s.valid, "the teacher changes nothing else");
}
