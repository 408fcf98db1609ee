//! The cuda backend against the cpu reference (DESIGN.md numerics ladder, rungs 2–4): every
//! node's kernels against the reference semantics of its op on the same inputs, with poisoned
//! arenas and adversarial batches; whole training steps against the cpu backend; resume across
//! backends. GPU-only tests print a SKIPPED line to the terminal where there is no GPU (and fail
//! instead when `VPMOE_REQUIRE_GPU=1`, so a GPU machine cannot skip them by accident).

mod common;

use common::{compiled, root, run_config, sample_data_for, tmp};
use std::io::Write;
use std::path::PathBuf;
use vpmoe_compiler::Plan;
use vpmoe_ir::reference::{self, Dims, Tensor};
use vpmoe_ir::Graph;
use vpmoe_runtime::backend::Batch;
use vpmoe_runtime::cpu::{CpuBackend, FastGemm};
use vpmoe_runtime::cuda::decode::CudaEngine;
use vpmoe_runtime::cuda::optim::Placement;
use vpmoe_runtime::cuda::{gpu_available, CudaBackend};
use vpmoe_runtime::decode::sampler::Sampling;
use vpmoe_runtime::decode::{generate, CpuEngine, Decoder, GenConfig, Tok};
use vpmoe_runtime::state::TrainState;
use vpmoe_runtime::train::{self, RunOptions, TrainConfig};
use vpmoe_runtime::{parity, synthetic_batch};

/// True with a GPU; otherwise says so on the terminal (not captured by the harness).
fn gpu(test: &str) -> bool {
    if gpu_available() {
        return true;
    }
    assert!(std::env::var_os("VPMOE_REQUIRE_GPU").is_none(), "{test}: VPMOE_REQUIRE_GPU is set but no GPU is usable");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no CUDA GPU on this machine (GPU-only test)");
    false
}

/// The architecture the GPU tests run: the small config, or the one `VPMOE_CUDA_TEST_ARCH` names
/// (relative to the repository root; the host emulator runs a toy config).
fn small() -> (Graph, Plan) {
    compiled(&std::env::var("VPMOE_CUDA_TEST_ARCH").unwrap_or_else(|_| "configs/small.toml".into()))
}

/// Sequence length of the tests' micro-batches: 128, or the architecture's maximum if shorter.
fn seq(plan: &Plan) -> usize {
    plan.arch.max_seq.min(128) as usize
}

#[test]
fn without_a_gpu_the_cuda_backend_says_so() {
    if gpu_available() {
        let _ = writeln!(std::io::stderr(), "note: a GPU is present; the no-GPU error path is not exercised here");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpmoe-rt"))
        .args(["forward", "--backend", "cuda", "--arch"])
        .arg(root().join("configs/small.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the cuda backend needs an NVIDIA GPU") && err.contains("--backend cpu"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "nothing ran on another backend");
}

/// The adversarial micro-batches: random tokens; one-token documents (every attention row sees
/// only itself, every span is empty); and, through the expert biases, all tokens routed to the
/// same experts (an expert receiving every token, the others empty).
fn batches(vocab: u64, seq: usize) -> Vec<(&'static str, Batch, bool)> {
    let random = synthetic_batch(vocab, seq, 2, 11);
    let mut lonely = synthetic_batch(vocab, seq / 2, 2, 12);
    lonely.doc = (0..lonely.tokens.len() as i32).collect();
    lonely.loss_mask.fill(0);
    lonely.span.fill(0);
    lonely.single_step_scale(1.0, 1.0);
    let skewed = synthetic_batch(vocab, seq, 1, 13);
    vec![("random", random, false), ("one-token documents", lonely, false), ("all tokens to two experts", skewed, true)]
}

/// Sets every MoE layer's expert bias so that experts 0..topk win every selection.
fn skew_router(plan: &Plan, st: &mut TrainState) {
    let topk = plan.arch.moe.as_ref().map(|m| m.topk).unwrap_or(0) as usize;
    for (p, w) in plan.params.iter().zip(&mut st.master) {
        if p.name.ends_with(".mlp.router.expert_bias") {
            w.iter_mut().enumerate().for_each(|(e, x)| *x = if e < topk { 100.0 } else { -100.0 });
        }
    }
}

#[test]
fn every_node_matches_the_reference() {
    if !gpu("every_node_matches_the_reference") {
        return;
    }
    let (g, plan) = small();
    let (failures, checked, _) = node_parity(&g, &plan, batches(plan.arch.vocab, seq(&plan)), false);
    assert!(failures.is_empty(), "{} of {checked} node outputs differ:\n{}", failures.len(), failures.join("\n"));
}

/// `--cublas`: the dense GEMMs that are plain products issued as cuBLAS calls (runtime/src/cuda/
/// blas.rs) give every node's outputs within the same tolerances, and cuBLAS really ran them.
#[test]
fn cublas_gemms_match_the_reference() {
    if !gpu("cublas_gemms_match_the_reference") {
        return;
    }
    let (g, plan) = small();
    let random = batches(plan.arch.vocab, seq(&plan)).into_iter().take(1).collect();
    let (failures, checked, calls) = node_parity(&g, &plan, random, true);
    assert!(calls > 0, "no launch went to cuBLAS");
    eprintln!("cublas: {calls} launches issued as cuBLAS calls");
    assert!(failures.is_empty(), "{} of {checked} node outputs differ:\n{}", failures.len(), failures.join("\n"));

    // A later micro-batch adds into the gradient sums (β = 1): two micro-batches accumulated with
    // cuBLAS give the generated kernels' sums up to summation order.
    use vpmoe_runtime::backend::Backend;
    let micro: Vec<Batch> = (0..2).map(|i| synthetic_batch(plan.arch.vocab, seq(&plan), 2, 21 + i)).collect();
    let sums = |cublas: bool| {
        let tokens = micro[0].tokens.len();
        let mut be = cuda_backend(&g, &plan, TrainState::init(&plan, 7), tokens, cublas);
        micro.iter().for_each(|b| drop(be.accumulate(b).unwrap()));
        be.gradient_sums().unwrap()
    };
    let (want, got) = (sums(false), sums(true));
    let norm = |x: &[f32]| x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    for ((p, w), x) in plan.params.iter().zip(&want).zip(&got) {
        let diff: Vec<f32> = w.iter().zip(x).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(w).max(1e-30);
        assert!(rel <= 2e-2, "{}: gradient sum with cuBLAS off by {rel:.3e} of its norm", p.name);
    }
}

/// A cuda backend for micro-batches of up to `tokens` tokens, with `--cublas` when `cublas`.
fn cuda_backend<'g>(g: &'g Graph, plan: &'g Plan, st: TrainState, tokens: usize, cublas: bool) -> CudaBackend<'g> {
    let mut be = CudaBackend::new(g, plan, st, None, tokens, Placement::default()).unwrap();
    if cublas {
        be.use_cublas().unwrap();
    }
    be
}

/// Runs every node of each batch on poisoned arenas and compares its outputs with the reference
/// semantics of its op on the inputs the kernels saw: (failures, outputs checked, cuBLAS calls).
fn node_parity(g: &Graph, plan: &Plan, batches: Vec<(&str, Batch, bool)>, cublas: bool) -> (Vec<String>, usize, u64) {
    let mut failures = Vec::new();
    let (mut checked, mut calls) = (0usize, 0u64);
    for (what, batch, skew) in batches {
        let mut st = TrainState::init(plan, 7);
        if skew {
            skew_router(plan, &mut st);
        }
        let mut be = cuda_backend(g, plan, st, batch.tokens.len(), cublas);
        be.poison = true;
        let dims = Dims { tokens: batch.tokens.len(), seq: batch.seq };
        let mut each = |ni: usize, be: &CudaBackend, lay: &vpmoe_runtime::cuda::bind::Layout| -> anyhow::Result<()> {
            let node = &g.nodes[ni];
            let ins: Vec<Tensor> = node.inputs.iter().map(|v| be.read_value(lay, *v)).collect::<anyhow::Result<_>>()?;
            let refs: Vec<&Tensor> = ins.iter().collect();
            let want = reference::forward(&node.op, &dims, &refs, &reference::TensorCore(&FastGemm));
            for (k, (v, w)) in node.outputs.iter().zip(&want).enumerate() {
                let got = be.read_value(lay, *v)?;
                if let Err(d) = parity::compare(parity::tolerance(g.value(*v).ty.dtype), &got, w) {
                    failures.push(format!("[{what}] {} output {k} ({}): {d}", node.name, g.value(*v).ty));
                }
                checked += 1;
            }
            Ok(())
        };
        be.run_nodes(&batch, g.nodes.len(), Some(&mut each)).unwrap();
        calls += be.cublas_calls();
    }
    (failures, checked, calls)
}

/// Seeded N(0, sd) values (a small LCG + Box–Muller: the test needs no RNG crate).
fn normals(n: usize, sd: f64, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut uni = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n).map(|_| ((-2.0 * uni().ln()).sqrt() * (std::f64::consts::TAU * uni()).cos() * sd) as f32).collect()
}

/// The device optimizer (rung 3 for the step) against `optim::apply` on the same gradients, loads
/// and state: AdamW, the momentum and the expert biases bitwise, the global norm to f64 rounding,
/// Normuon's update under `parity::NORMUON` against the host step with the kernels' rounding
/// (`reference::TensorCore`), and a non-finite gradient refused by name with nothing changed.
#[test]
fn the_device_optimizer_matches_the_host_step() {
    if !gpu("the_device_optimizer_matches_the_host_step") {
        return;
    }
    use vpmoe_runtime::backend::{Backend, StepScalars};
    let (g, plan) = small();
    let mut st = TrainState::init(&plan, 3);
    for (i, (m, v)) in st.m.iter_mut().zip(st.v.iter_mut()).enumerate() {
        *m = normals(m.len(), 1e-3, 100 + i as u64);
        *v = normals(v.len(), 1e-5, 200 + i as u64).iter().map(|x| x.abs()).collect();
    }
    st.step = 6;
    let grads: Vec<Vec<f32>> = plan
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| if p.trainable() { normals(p.numel as usize, 0.05, i as u64) } else { vec![] })
        .collect();
    let loads: std::collections::BTreeMap<u32, Vec<u64>> = plan
        .params
        .iter()
        .filter_map(|p| match p.role {
            vpmoe_ir::Role::ExpertBias { layer } => {
                Some((layer, (0..p.numel).map(|e| (e * 7 + layer as u64) % 11).collect()))
            }
            _ => None,
        })
        .collect();
    assert!(!loads.is_empty(), "the small config has expert biases");
    let mut failures = Vec::new();
    for clip in [1e9, 1.0] {
        let s = StepScalars { lr: 0.02, aux_lr: 0.004, weight_decay: 0.01, clip, bias_rate: 1e-3 };
        let mut host = st.clone();
        let mut hg = grads.clone();
        let want = vpmoe_runtime::optim::apply(
            &plan,
            &mut host,
            &mut hg,
            loads.clone().into_iter().collect(),
            &s,
            &reference::TensorCore(&FastGemm),
        )
        .unwrap();
        let mut be = CudaBackend::new(&g, &plan, st.clone(), None, 256, Placement::default()).unwrap();
        be.set_step_inputs(&grads, loads.clone()).unwrap();
        let got = be.step(&s).unwrap();
        let dev = be.state().unwrap();
        assert!(
            (got.grad_norm - want.grad_norm).abs() <= 1e-12 * want.grad_norm,
            "{} vs {}",
            got.grad_norm,
            want.grad_norm
        );
        assert_eq!(got.clip_coef, want.clip_coef, "clip {clip}");
        assert_eq!(got.expert_bias, want.expert_bias);
        assert_eq!(dev.step, host.step);
        let keep = 1.0 - s.lr * s.weight_decay;
        for (i, p) in plan.params.iter().enumerate() {
            let what = format!("{} (clip {clip})", p.name);
            if p.opt != vpmoe_ir::OptGroup::Normuon {
                assert!(
                    dev.master[i] == host.master[i] && dev.m[i] == host.m[i] && dev.v[i] == host.v[i],
                    "{what}: not bitwise"
                );
                continue;
            }
            assert!(dev.m[i] == host.m[i], "{what}: momentum not bitwise");
            let delta = |w: &[f32]| -> Vec<f64> {
                st.master[i].iter().zip(w).map(|(&a, &b)| (a as f64 * keep - b as f64) / s.lr).collect()
            };
            let (d, h) = (delta(&dev.master[i]), delta(&host.master[i]));
            let rms = (h.iter().map(|x| x * x).sum::<f64>() / h.len() as f64).sqrt();
            let err = (d.iter().zip(&h).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / h.len() as f64).sqrt() / rms;
            let max = d.iter().zip(&h).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / rms;
            let bound = &parity::NORMUON;
            if err > bound.rms || max > bound.max {
                failures.push(format!(
                    "{what} ({} elements): update rms error {err:.3}, max {max:.3} (relative to its rms)",
                    p.numel
                ));
            }
            for (a, b) in dev.v[i].iter().zip(&host.v[i]) {
                if ((a - b).abs() as f64) > bound.v * b.abs() as f64 + 1e-9 {
                    failures.push(format!("{what}: v {a} vs {b}"));
                    break;
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A NaN gradient: refused by name before anything moves.
    let mut bad = grads.clone();
    let victim = plan.params.iter().rposition(|p| p.opt == vpmoe_ir::OptGroup::Normuon).unwrap();
    bad[victim][3] = f32::NAN;
    let mut be = CudaBackend::new(&g, &plan, st.clone(), None, 256, Placement::default()).unwrap();
    be.set_step_inputs(&bad, loads).unwrap();
    let s = StepScalars { lr: 0.02, aux_lr: 0.004, weight_decay: 0.01, clip: 1.0, bias_rate: 1e-3 };
    let err = be.step(&s).unwrap_err().to_string();
    assert!(err.contains(&plan.params[victim].name) && err.contains("not finite"), "{err}");
    assert_eq!(be.state().unwrap(), st, "a refused step changes nothing");
}

/// 2 sequences of [`seq`] tokens per micro-batch.
fn cfg(plan: &Plan, steps: u64, dir: PathBuf) -> (TrainConfig, RunOptions) {
    run_config(steps, 2, seq(plan), dir)
}

/// Relative loss tolerance of whole steps: bf16 rounding differences compound through the
/// updates, so the bound is looser than a single kernel's (`vpmoe_runtime::parity`).
const STEP_RTOL: f64 = 2e-2;

fn assert_tracks(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= STEP_RTOL * y.abs(),
            "{what}: step {} loss {x} vs cpu {y}\ncuda {a:?}\ncpu  {b:?}",
            i + 1
        );
    }
}

#[test]
fn training_tracks_the_cpu_backend_for_24_steps() {
    if !gpu("training_tracks_the_cpu_backend_for_24_steps") {
        return;
    }
    let (g, plan) = small();
    let (c, o_cpu) = cfg(&plan, 24, tmp("track-cpu"));
    let cpu = {
        let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, c.seed));
        common::train(&mut be, &plan, &sample_data_for(plan.arch.vocab), &c, &o_cpu).unwrap()
    };
    let (_, mut o_gpu) = cfg(&plan, 24, tmp("track-cuda"));
    o_gpu.profile_steps = Some((3, 4));
    let gpu = {
        let mut be = CudaBackend::new(
            &g,
            &plan,
            TrainState::init(&plan, c.seed),
            None,
            c.micro_batch * c.seq_len,
            Placement::default(),
        )
        .unwrap();
        common::train(&mut be, &plan, &sample_data_for(plan.arch.vocab), &c, &o_gpu).unwrap()
    };
    let l = |o: &common::Trained| o.records.iter().map(|r| r.loss).collect::<Vec<_>>();
    assert_tracks(&l(&gpu), &l(&cpu), "cuda vs cpu");
    assert!(l(&gpu)[23] < l(&gpu)[0] - 1.0, "the loss falls on the GPU too: {:?}", l(&gpu));
    let table = std::fs::read_to_string(o_gpu.ckpt_dir.join("kernel-times.txt")).unwrap();
    assert!(table.contains("vp_attention") && table.contains("all kernels"), "{table}");
    let _ = writeln!(std::io::stderr(), "kernel times of steps 3-4 of the small config:\n{table}");
}

#[test]
fn checkpoints_resume_across_backends() {
    if !gpu("checkpoints_resume_across_backends") {
        return;
    }
    let (g, plan) = small();
    let (c, straight) = cfg(&plan, 6, tmp("x-straight"));
    let reference: Vec<f64> = {
        let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, c.seed));
        common::train(&mut be, &plan, &sample_data_for(plan.arch.vocab), &c, &straight)
            .unwrap()
            .records
            .iter()
            .map(|r| r.loss)
            .collect()
    };
    for first_cuda in [false, true] {
        let dir = tmp(if first_cuda { "x-cuda-cpu" } else { "x-cpu-cuda" });
        let (_, mut o) = cfg(&plan, 3, dir.clone());
        let mk = |cuda: bool| -> Box<dyn vpmoe_runtime::Backend + '_> {
            let st = TrainState::init(&plan, c.seed);
            if cuda {
                Box::new(
                    CudaBackend::new(&g, &plan, st, None, c.micro_batch * c.seq_len, Placement::default()).unwrap(),
                )
            } else {
                Box::new(CpuBackend::new(&g, &plan, st))
            }
        };
        let mut a = mk(first_cuda);
        let mut losses: Vec<f64> = common::train(a.as_mut(), &plan, &sample_data_for(plan.arch.vocab), &c, &o)
            .unwrap()
            .records
            .iter()
            .map(|r| r.loss)
            .collect();
        o.steps = 6;
        o.resume = true;
        let mut b = mk(!first_cuda);
        let rest = common::train(b.as_mut(), &plan, &sample_data_for(plan.arch.vocab), &c, &o).unwrap();
        assert_eq!(rest.records[0].step, 4, "resumed at step 4");
        losses.extend(rest.records.iter().map(|r| r.loss));
        assert_tracks(&losses, &reference, if first_cuda { "cuda then cpu" } else { "cpu then cuda" });
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The 80 GB H100 option: Normuon momenta in pinned host memory change where bytes live, not
/// what is computed, so four steps leave the same state bit for bit.
#[test]
fn host_momentum_gives_the_same_state_bit_for_bit() {
    if !gpu("host_momentum_gives_the_same_state_bit_for_bit") {
        return;
    }
    let (g, plan) = small();
    let mut states = Vec::new();
    for host in [false, true] {
        let (c, o) = cfg(&plan, 4, tmp(if host { "hm-host" } else { "hm-device" }));
        let tokens = c.micro_batch * c.seq_len;
        let placement = Placement { host_momentum: host, shard: None };
        let mut be = CudaBackend::new(&g, &plan, TrainState::init(&plan, c.seed), None, tokens, placement).unwrap();
        common::train(&mut be, &plan, &sample_data_for(plan.arch.vocab), &c, &o).unwrap();
        states.push(vpmoe_runtime::Backend::state(&be).unwrap());
    }
    assert_same_state(&states[0], &states[1], 4);
}

fn assert_same_state(a: &TrainState, b: &TrainState, steps: u64) {
    let bits = |t: &[Vec<f32>]| t.iter().map(|x| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>();
    assert_eq!((a.step, b.step), (steps, steps));
    assert!(bits(&a.master) == bits(&b.master), "masters differ");
    assert!(bits(&a.m) == bits(&b.m), "momenta differ");
    assert!(bits(&a.v) == bits(&b.v), "second moments differ");
}

/// Micro-batches replayed as CUDA graphs (the default) against launches issued one by one from
/// the host: three steps of two micro-batches each (a step's first micro-batch and a later one
/// are captured apart) leave the same state and losses bit for bit, with the generated GEMMs
/// and with `--cublas` (its calls captured into the graphs too), whose losses track the
/// generated ones.
#[test]
fn graph_replay_gives_the_same_state_bit_for_bit() {
    if !gpu("graph_replay_gives_the_same_state_bit_for_bit") {
        return;
    }
    let (g, plan) = small();
    let mut loss_of = Vec::new();
    for cublas in [false, true] {
        let (mut states, mut losses) = (Vec::new(), Vec::new());
        for graphs in [true, false] {
            let (c, o) = cfg(&plan, 3, tmp(&format!("replay-{graphs}-{cublas}")));
            let tokens = c.micro_batch * c.seq_len;
            let mut be = cuda_backend(&g, &plan, TrainState::init(&plan, c.seed), tokens, cublas);
            be.graphs = graphs;
            let out = common::train(&mut be, &plan, &sample_data_for(plan.arch.vocab), &c, &o).unwrap();
            assert_eq!(be.cublas_calls() > 0, cublas, "cuBLAS calls issued");
            losses.push(out.records.iter().map(|r| r.loss).collect::<Vec<_>>());
            states.push(vpmoe_runtime::Backend::state(&be).unwrap());
        }
        let bits = |l: &[f64]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&losses[0]), bits(&losses[1]), "losses differ (cublas {cublas})");
        assert_same_state(&states[0], &states[1], 3);
        loss_of.push(losses.swap_remove(0));
    }
    assert_tracks(&loss_of[1], &loss_of[0], "cublas against the generated GEMMs");
}

/// Data parallel on the cuda backend: two ranks of one micro-batch each train as one rank of
/// two. A rank's gradient sum is the one micro-batch's, and the all-reduce adds the two in rank
/// order — the same single fp32 addition one rank makes accumulating its second micro-batch — so
/// the masters, moments and losses are bit for bit one rank's. With the optimizer sharded
/// (ZeRO-1: gradients reduced to each unit's owner, which updates its masters and moments, new
/// model copies broadcast; rank 1 keeps its momenta in host memory; the run stops after one
/// step and resumes, each rank reading its share) they are bit for bit the replicated
/// optimizer's, and so is the checkpoint file the ranks write. On the host emulator
/// device buffers cross through the TCP collective (NCCL needs a GPU per rank:
/// `scripts/gpu-check multi` runs this over NCCL on 2+ GPUs).
#[test]
fn two_ranks_train_as_one_with_either_optimizer() {
    const NAME: &str = "two_ranks_train_as_one_with_either_optimizer";
    if !gpu(NAME) {
        return;
    }
    if std::env::var_os("VPMOE_EMU_SRC").is_none() {
        let _ = writeln!(std::io::stderr(), "SKIPPED {NAME}: one GPU per rank (scripts/gpu-check multi)");
        return;
    }
    let (g, plan) = small();
    let data = sample_data_for(plan.arch.vocab);
    // `upto` steps of a 2-step run, resuming the directory's checkpoint past step 0.
    let run = |world: usize, shard: bool, dir: PathBuf, upto: u64| {
        let mut outs = common::on_ranks(world, |dist| {
            let (mut c, mut o) = cfg(&plan, 2, dir.clone());
            let resume = vpmoe_runtime::checkpoint::latest(&dir).ok().flatten().is_some();
            (c.grad_accum, o.steps, o.resume) = (2, upto, resume);
            let placement = Placement {
                host_momentum: shard && dist.rank.rank == 1,
                shard: (shard && world > 1).then(|| dist.clone()),
            };
            (o.dist, o.shard_optimizer) = (dist, shard);
            let tokens = c.micro_batch * c.seq_len;
            let mut be = CudaBackend::new(&g, &plan, TrainState::init(&plan, c.seed), None, tokens, placement).unwrap();
            assert_eq!(vpmoe_runtime::Backend::shard(&be).unwrap().is_some(), shard && world > 1);
            let out = common::train(&mut be, &plan, &data, &c, &o).unwrap();
            // A decoder's weights are the model copies every rank holds: the masters rounded.
            let w = vpmoe_runtime::Backend::weights(&be).unwrap();
            for (p, (w, m)) in plan.params.iter().zip(w.master.iter().zip(&out.state.master)) {
                assert!(*w == vpmoe_runtime::cpu::model_values(p, m), "{}: weights are the rounded masters", p.name);
            }
            out
        });
        for o in &outs[1..] {
            assert_eq!(o.state, outs[0].state, "every rank ends with rank 0's state");
        }
        outs.swap_remove(0)
    };
    let (d1, d2, dz) = (tmp("dp-cuda-1"), tmp("dp-cuda-2"), tmp("dp-cuda-zero"));
    let (one, two) = (run(1, false, d1.clone(), 2), run(2, false, d2.clone(), 2));
    let (first, zero) = (run(2, true, dz.clone(), 1), run(2, true, dz.clone(), 2));
    assert_same_state(&one.state, &two.state, 2);
    assert_same_state(&two.state, &zero.state, 2);
    type Of = fn(&train::StepRecord) -> f64;
    let bits =
        |o: &[&common::Trained], f: Of| o.iter().flat_map(|o| &o.records).map(|r| f(r).to_bits()).collect::<Vec<_>>();
    let (loss, norm): (Of, Of) = (|r| r.loss, |r| r.grad_norm);
    assert_eq!(bits(&[&one], loss), bits(&[&two], loss));
    assert_eq!(bits(&[&two], loss), bits(&[&first, &zero], loss));
    assert_eq!(bits(&[&two], norm), bits(&[&first, &zero], norm), "the global norm is summed in unit order either way");
    let written = |d: &PathBuf| vpmoe_runtime::checkpoint::latest(d).unwrap().expect("rank 0 saved");
    assert_eq!(vpmoe_runtime::checkpoint::load(&written(&d2), &plan).unwrap().1, two.state);
    let file = |d: &PathBuf| std::fs::read(written(d).join("state.safetensors")).unwrap();
    assert!(file(&d2) == file(&dz), "the sharded ranks' checkpoint file is the replicated one's");
    for d in [d1, d2, dz] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `log p(next token)` at every position from `from[s]` of each sequence `seqs[s]`, fed by
/// teacher forcing through `dec` (3 slots): a new sequence's prompt (`from[s] + 1` tokens) in one
/// call whose last token alone asks for logits, then one token a step; a finished sequence's slot
/// goes to the next waiting one.
fn teacher_forced(dec: &mut Decoder, seqs: &[(usize, Vec<u32>)]) -> Vec<Vec<f32>> {
    let vocab = dec.vocab();
    let mut got: Vec<Vec<f32>> = seqs.iter().map(|_| Vec::new()).collect();
    let mut slots: Vec<Option<(usize, usize)>> = vec![Some((0, 0)), Some((1, 0)), Some((2, 0))];
    let mut waiting: Vec<usize> = (3..seqs.len()).rev().collect();
    loop {
        let (mut toks, mut owners) = (Vec::new(), Vec::new());
        for (slot, s) in slots.iter_mut().enumerate() {
            let Some((si, pos)) = s else { continue };
            let (prompt, tokens) = &seqs[*si];
            let upto = if *pos == 0 { *prompt + 1 } else { *pos + 1 };
            toks.extend((*pos..upto).map(|p| Tok { slot, pos: p, token: tokens[p], logits: p + 1 == upto }));
            owners.push((*si, upto - 1));
            *pos = upto;
        }
        if toks.is_empty() {
            break;
        }
        let rows = dec.step(&toks).unwrap();
        for ((si, p), row) in owners.iter().zip(rows.chunks(vocab)) {
            let next = seqs[*si].1[p + 1];
            got[*si].push((row[next as usize] as f64 - reference::row_lse(row)) as f32);
        }
        for (slot, s) in slots.iter_mut().enumerate() {
            if let Some((si, pos)) = *s {
                if pos + 1 >= seqs[si].1.len() {
                    dec.release(slot);
                    *s = waiting.pop().map(|w| (w, 0));
                }
            }
        }
    }
    got
}

/// The decode test's weights: the initialisation's, times this.
const SHARPEN: f32 = 3.0;

/// The cuda decode program (prefill and step graphs, window rings, the paged pool, CUDA-graph
/// replay of decode steps) tracks the cpu decoder with the kernels' roundings
/// (`parity::DECODE_LOGP`) under teacher forcing across the window
/// boundary (positions W−1, W, W+1), a prompt longer than the window, sequences finishing at
/// different times and a reused slot; and it is bitwise independent of how the tokens were
/// batched into calls (each sequence again in one call).
#[test]
fn decoding_tracks_the_cpu_decoder() {
    if !gpu("decoding_tracks_the_cpu_decoder") {
        return;
    }
    let (g, plan) = small();
    // Weights scaled up from the initialisation, so attention is sharp and the next token
    // depends on the context (at initialisation every position's distribution is nearly the
    // same, and a wrong key would hardly show).
    let mut state = TrainState::init(&plan, 5);
    state.master.iter_mut().flatten().for_each(|x| *x *= SHARPEN);
    let (len, vocab) = (plan.arch.max_seq as usize, plan.arch.vocab);
    let w = plan.arch.window.unwrap_or(len as u64) as usize;
    let tokens = |seed: u64, n: usize| -> Vec<u32> {
        let mut r = vpmoe_ir::rng::Rng::new(seed);
        (0..n).map(|_| (r.next_u64() % vocab) as u32).collect()
    };
    // (last prompt position, tokens): across the window, a one-token prompt, a prompt longer
    // than the window, and a sequence that takes over the slot of the first to finish.
    let seqs: Vec<(usize, Vec<u32>)> = vec![
        (w - 3, tokens(1, (w + 4).min(len))),
        (0, tokens(2, 12)),
        (w + 5, tokens(3, (w + 12).min(len))),
        (9, tokens(4, 30)),
    ];
    let mut cuda = Decoder::on(Box::new(CudaEngine::new(&g, &plan, &state, 3, None).unwrap()));
    let mut cpu = Decoder::on(Box::new(CpuEngine::new(&g, &plan, &state, 3).unwrap().kernel_model()));
    let (got, want) = (teacher_forced(&mut cuda, &seqs), teacher_forced(&mut cpu, &seqs));
    let mut worst = 0f32;
    for (s, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(a.len(), b.len(), "sequence {s}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                x.is_finite() && (x - y).abs() <= parity::DECODE_LOGP,
                "sequence {s} position {}: {x} vs cpu {y}",
                seqs[s].0 + i
            );
            worst = worst.max((x - y).abs());
        }
    }
    let _ = writeln!(std::io::stderr(), "decode: worst |log p(cuda) − log p(cpu)| = {worst:.2e}");
    // Each sequence whole in one call (every token asking) gives the same bits.
    for (s, (from, t)) in seqs.iter().enumerate() {
        let toks: Vec<Tok> =
            t.iter().enumerate().map(|(pos, &token)| Tok { slot: 0, pos, token, logits: pos >= *from }).collect();
        let rows = cuda.step(&toks[..t.len() - 1]).unwrap();
        cuda.release(0);
        for (i, row) in rows.chunks(vocab as usize).enumerate() {
            let x = (row[t[from + i + 1] as usize] as f64 - reference::row_lse(row)) as f32;
            assert_eq!(
                x.to_bits(),
                got[s][i].to_bits(),
                "sequence {s} position {}: one call {x}, stepped {}",
                from + i,
                got[s][i]
            );
        }
    }
    // The same seed samples the same tokens whatever the batch.
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|(from, t)| t[..=*from].to_vec()).collect();
    let sampling = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 };
    let cfg = GenConfig { sampling, seed: 9, max_new_tokens: 6, stop: vec![] };
    let three = generate(&mut cuda, &prompts, &cfg, |_, _| {}).unwrap();
    let mut one = Decoder::on(Box::new(CudaEngine::new(&g, &plan, &state, 1, None).unwrap()));
    assert_eq!(generate(&mut one, &prompts, &cfg, |_, _| {}).unwrap(), three);
}

/// The GPU tests above, in a child process whose CUDA driver is the host emulator's stand-in
/// (`codegen/cuda/host_emu/driver.cpp`): the real backend (plan binding, arenas, gradient sums,
/// the device optimizer, graph capture and replay, host momentum) runs the real kernel
/// templates, compiled by g++ and executed block by block as fibers, on the toy config
/// `tests/configs/emu_moe.toml` (tiny_moe at 128-token rows, so every kernel crosses its tiles).
/// What it cannot show is anything about the hardware: speed, memory, tensor-core and PTX
/// semantics beyond the emulator's model of them.
#[test]
fn the_gpu_tests_pass_on_the_host_emulator() {
    if std::env::var_os("VPMOE_EMU_SRC").is_some() || !vpmoe_codegen::full_tier("GPU tests on the host emulator") {
        return; // the child, or the fast tier
    }
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
    let lib = base.join(format!("emu-driver-{}", std::process::id()));
    std::fs::create_dir_all(&lib).unwrap();
    let src = root().join("codegen/cuda");
    let built = std::process::Command::new("g++")
        .args(["-std=c++17", "-O2", "-shared", "-fPIC", "-o"])
        .arg(lib.join("libcuda.so"))
        .arg(src.join("host_emu/driver.cpp"))
        .arg("-ldl")
        .status()
        .expect("g++ is needed to build the host emulator's driver");
    assert!(built.success(), "building the host emulator's driver failed");
    // Its cuBLAS stand-in lives in the same library: one file under both names, mapped once.
    std::os::unix::fs::symlink("libcuda.so", lib.join("libcublas.so")).unwrap();
    // Not host_momentum_gives_the_same_state_bit_for_bit: the emulator's mapped host memory is
    // plain memory, and rank 1 of the data-parallel test keeps its momenta there anyway.
    let tests = [
        "every_node_matches_the_reference",
        "cublas_gemms_match_the_reference",
        "the_device_optimizer_matches_the_host_step",
        "training_tracks_the_cpu_backend_for_24_steps",
        "checkpoints_resume_across_backends",
        "graph_replay_gives_the_same_state_bit_for_bit",
        "decoding_tracks_the_cpu_decoder",
        "two_ranks_train_as_one_with_either_optimizer",
    ];
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(tests)
        .args(["--exact", "--test-threads", "2", "--nocapture"])
        .env("LD_LIBRARY_PATH", &lib)
        .env("VPMOE_EMU_SRC", &src)
        .env("VPMOE_EMU_CACHE", base.join("emu-kernel-cache"))
        .env("VPMOE_REQUIRE_GPU", "1")
        .env("VPMOE_CUDA_TEST_ARCH", "tests/configs/emu_moe.toml")
        .output()
        .unwrap();
    // Without cuBLAS on the loader path, --cublas is refused with an explanation (no panic).
    std::fs::remove_file(lib.join("libcublas.so")).unwrap();
    let no_blas = std::process::Command::new(env!("CARGO_BIN_EXE_vpmoe-rt"))
        .args(["forward", "--backend", "cuda", "--cublas", "--arch"])
        .arg(root().join("tests/configs/emu_moe.toml"))
        .env("LD_LIBRARY_PATH", &lib)
        .env("VPMOE_EMU_SRC", &src)
        .env("VPMOE_EMU_CACHE", base.join("emu-kernel-cache"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&lib);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the GPU tests failed on the host emulator:\n{text}");
    for t in tests {
        assert!(text.contains(&format!("test {t} ... ok")), "{t} did not pass on the host emulator:\n{text}");
    }
    assert!(!text.contains("SKIPPED"), "{text}");
    let err = String::from_utf8_lossy(&no_blas.stderr);
    assert_eq!(no_blas.status.code(), Some(1), "{err}");
    assert!(err.contains("--cublas needs the cuBLAS library") && !err.contains("panicked"), "{err}");
}
