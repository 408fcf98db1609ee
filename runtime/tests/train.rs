//! Training on the cpu backend: D6 split and padding invariance, a whole-model gradient check,
//! the main job's falling loss, bitwise resume, resume refusal, NaN stops, checkpoint damage and
//! SIGINT.

mod common;

use common::{compiled, root, run_config, sample_data, sample_data_for, tmp};
use std::path::PathBuf;
use vpmoe_compiler::Plan;
use vpmoe_ir::{Graph, OutputName};
use vpmoe_runtime::backend::{seed_step, Backend, Batch};
use vpmoe_runtime::cpu::CpuBackend;
use vpmoe_runtime::state::TrainState;
use vpmoe_runtime::train::{RunOptions, TrainConfig};
use vpmoe_runtime::{checkpoint, synthetic_batch};

/// Splits `rows` rows of a batch into micro-batches of `per` rows.
fn split(b: &Batch, per: usize) -> Vec<Batch> {
    let n = per * b.seq;
    (0..b.tokens.len() / n)
        .map(|i| {
            let r = i * n..(i + 1) * n;
            Batch {
                seq: b.seq,
                tokens: b.tokens[r.clone()].to_vec(),
                doc: b.doc[r.clone()].to_vec(),
                labels: b.labels[r.clone()].to_vec(),
                loss_mask: b.loss_mask[r.clone()].to_vec(),
                span: b.span[r].to_vec(),
                ..b.clone()
            }
        })
        .collect()
}

/// Loss and gradients of one step made of `parts`, with D6's global span scale.
fn step_grads(g: &Graph, plan: &Plan, parts: &mut [Batch]) -> (f64, Vec<Vec<f32>>) {
    seed_step(parts, &plan.arch, [1.0, 0.8]);
    let mut be = CpuBackend::new(g, plan, TrainState::init(plan, 7));
    let mut loss = 0.0;
    for p in parts.iter_mut() {
        loss += be.accumulate(p).unwrap().loss;
    }
    (loss, be.grads().to_vec())
}

fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], plan: &Plan, what: &str) {
    for ((x, y), p) in a.iter().zip(b).zip(&plan.params) {
        for (i, (u, v)) in x.iter().zip(y).enumerate() {
            let tol = 1e-5 + 1e-4 * u.abs().max(v.abs());
            assert!((u - v).abs() <= tol, "{what}: grad of {} [{i}]: {u} vs {v}", p.name);
        }
    }
}

#[test]
fn span_loss_and_gradients_do_not_depend_on_the_micro_batch_split() {
    let (g, plan) = compiled("tests/configs/tiny_moe.toml");
    let full = synthetic_batch(plan.arch.vocab, 16, 4, 3);
    let (l1, g1) = step_grads(&g, &plan, &mut split(&full, 4));
    for per in [2, 1] {
        let (l, gr) = step_grads(&g, &plan, &mut split(&full, per));
        assert!((l - l1).abs() <= 1e-5 * l1.abs(), "loss {l} vs {l1} with {per} rows per micro-batch");
        assert_close(&gr, &g1, &plan, &format!("{per} rows per micro-batch"));
    }
}

#[test]
fn padding_changes_neither_loss_nor_gradients() {
    // Dense config: a padded micro-batch has no aux loss of its own to add.
    let (g, plan) = compiled("tests/configs/tiny_dense.toml");
    let full = synthetic_batch(plan.arch.vocab, 16, 2, 5);
    let (l1, g1) = step_grads(&g, &plan, &mut split(&full, 2));
    let mut pad = synthetic_batch(plan.arch.vocab, 16, 2, 9);
    pad.loss_mask.iter_mut().for_each(|m| *m = 0);
    let mut parts = split(&full, 1);
    parts.push(pad);
    let (l2, g2) = step_grads(&g, &plan, &mut parts);
    assert!((l1 - l2).abs() <= 1e-6 * l1.abs(), "{l1} vs {l2}");
    assert_close(&g2, &g1, &plan, "padded");
}

/// Whole-model check: for every trainable tensor p, the directional derivative of the step
/// objective along p's own gradient direction equals ‖∇_p L‖ (central differences on the exact
/// f32 model, no bf16 rounding).
#[test]
fn whole_model_gradient_check() {
    for cfgname in ["tests/configs/tiny_dense.toml", "tests/configs/tiny_moe.toml", "tests/configs/tiny_tied.toml"] {
        let (g, plan) = compiled(cfgname);
        let mut batch = synthetic_batch(plan.arch.vocab, 16, 2, 11);
        batch.aux_grad = plan.arch.moe.as_ref().and_then(|m| m.seq_aux_coeff).unwrap_or(0.0) as f32;
        let state = TrainState::init(&plan, 3);
        let mut be = CpuBackend::new(&g, &plan, state.clone());
        be.exact_weights();
        be.accumulate(&batch).unwrap();
        let grads = be.grads().to_vec();
        let keep: Vec<OutputName> = g
            .outputs
            .iter()
            .filter(|(k, _)| matches!(k, OutputName::RouterLoad { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        // The objective and the routing's expert loads (to detect a flipped top-k decision).
        let objective = |st: &TrainState| -> (f64, Vec<i32>) {
            let mut b = CpuBackend::new(&g, &plan, st.clone());
            b.exact_weights();
            let out = b.forward(&batch, &keep).unwrap();
            let aux: f64 = out.aux().iter().map(|(_, a)| *a as f64).sum();
            // The span loss re-summed in f64 from the per-token CE (less rounding than `loss`).
            let tl = out.token_loss();
            let ce: f64 =
                tl.iter().zip(&batch.span).map(|(l, s)| *l as f64 * batch.span_scale[*s as usize] as f64).sum();
            let routes = keep.iter().flat_map(|k| out.values[k].i().to_vec()).collect();
            (ce + batch.aux_grad as f64 * aux, routes)
        };
        let routes0 = objective(&state).1;
        let mut checked = 0;
        for (i, p) in plan.params.iter().enumerate() {
            let gn = grads[i].iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            if !p.trainable() || gn < 1e-3 {
                continue; // too small to resolve with f32 losses (e.g. the value-residual logit)
            }
            let shifted = |step: f64| {
                let mut st = state.clone();
                for (w, d) in st.master[i].iter_mut().zip(&grads[i]) {
                    *w += (step * *d as f64 / gn) as f32;
                }
                objective(&st)
            };
            // Richardson-extrapolated central differences (cancels the h² term), with h halved
            // until no routing decision changes between the evaluations.
            let mut h = 4e-3 / gn.max(1.0);
            let fd = loop {
                let pts: Vec<(f64, Vec<i32>)> = [h, -h, h / 2.0, -h / 2.0].iter().map(|&x| shifted(x)).collect();
                if pts.iter().all(|(_, r)| *r == routes0) {
                    let d1 = (pts[0].0 - pts[1].0) / (2.0 * h);
                    let d2 = (pts[2].0 - pts[3].0) / h;
                    break (4.0 * d2 - d1) / 3.0;
                }
                h /= 4.0;
                assert!(h > 1e-6, "{cfgname}: {}: routing flips under every step size", p.name);
            };
            // 3 % plus the f32 forward's rounding floor (≈1e-7 per token loss over 2h).
            let rel = (fd - gn).abs() / gn;
            assert!(
                (fd - gn).abs() < 0.01 * gn + 1e-4,
                "{cfgname}: {}: directional derivative {fd} vs |grad| {gn} (rel {rel:.3})",
                p.name
            );
            checked += 1;
        }
        assert!(
            checked >= plan.params.iter().filter(|p| p.trainable()).count() / 2,
            "{cfgname}: only {checked} checked"
        );
    }
}

/// The main job's run on the bundled sample: 1 × 48 tokens per micro-batch.
fn sample_cfg(steps: u64) -> (TrainConfig, RunOptions) {
    run_config(steps, 1, 48, PathBuf::new())
}

#[test]
fn main_job_loss_falls_on_the_bundled_sample() {
    let (g, plan) = compiled("configs/small.toml");
    let (cfg, mut opts) = sample_cfg(12);
    opts.ckpt_dir = tmp("falls");
    opts.eval_every = 6;
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    let out = common::train(&mut be, &plan, &sample_data(), &cfg, &opts).unwrap();
    let first = &out.records[..3].iter().map(|r| r.loss).sum::<f64>() / 3.0;
    let last = &out.records[9..].iter().map(|r| r.loss).sum::<f64>() / 3.0;
    assert!(last < first - 1.0, "loss did not fall: first steps {first:.3}, last steps {last:.3}");
    assert!(out.records[5].eval.is_some() && out.records[11].eval.is_some());
    let r = out.records[0].router.as_ref().expect("router health");
    assert!(r.aux > 0.5 && r.entropy > 0.0 && r.entropy <= 1.0);
    assert!(out.records[0].tokens_reasoning + out.records[0].tokens_final > 0);
    let lines = std::fs::read_to_string(opts.ckpt_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 12);
    let _ = std::fs::remove_dir_all(&opts.ckpt_dir);
}

#[test]
fn resume_is_bitwise() {
    let (g, plan) = compiled("configs/small.toml");
    let (cfg, mut opts) = sample_cfg(6);
    let data = sample_data();
    // Straight: 6 steps.
    opts.ckpt_dir = tmp("straight");
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    let straight = common::train(&mut be, &plan, &data, &cfg, &opts).unwrap();
    // Interrupted: the same run saving every 3 steps, then a fresh process-like restart from
    // step 3 only (the step-6 checkpoint removed).
    opts.ckpt_dir = tmp("resumed");
    opts.save_every = 3;
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    common::train(&mut be, &plan, &data, &cfg, &opts).unwrap();
    std::fs::remove_dir_all(opts.ckpt_dir.join("step_00000006")).unwrap();
    opts.resume = true;
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, 999));
    let resumed = common::train(&mut be, &plan, &data, &cfg, &opts).unwrap();
    assert_eq!(resumed.records.len(), 3);
    for (a, b) in straight.records[3..].iter().zip(&resumed.records) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}: {} vs {}", a.step, a.loss, b.loss);
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits(), "step {}", a.step);
    }
    assert_eq!(straight.state, resumed.state);
    assert_eq!(straight.state.checksum(), resumed.state.checksum());
    // Steps 4..6 were logged before the step-6 checkpoint went: the resumed run cut them back, so
    // the log describes one run, each step once.
    let log = std::fs::read_to_string(opts.ckpt_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> =
        log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);

    // A different run is refused, saying what differs.
    let mut other = cfg.clone();
    other.schedule.lr = 0.03;
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    let e = common::train(&mut be, &plan, &data, &other, &opts).unwrap_err().to_string();
    assert!(e.contains("different run") && e.contains("schedule"), "{e}");
    let (g2, plan2) = compiled("tests/configs/tiny_moe.toml");
    let mut be = CpuBackend::new(&g2, &plan2, TrainState::init(&plan2, 1));
    let short = TrainConfig { seq_len: 32, ..cfg.clone() };
    let e = format!("{:#}", common::train(&mut be, &plan2, &sample_data_for(512), &short, &opts).unwrap_err());
    assert!(e.contains("missing tensor") || e.contains("fingerprint"), "{e}");

    // A damaged checkpoint is refused by its checksum.
    let last = checkpoint::latest(&opts.ckpt_dir).unwrap().unwrap();
    let f = last.join("state.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
    let e = checkpoint::load(&last, &plan).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
    // A newest checkpoint missing a file is an error naming it, never a silent fall-back.
    let partial = opts.ckpt_dir.join("step_00000009");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("state.safetensors"), b"x").unwrap();
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    let e = format!("{:#}", common::train(&mut be, &plan, &data, &cfg, &opts).unwrap_err());
    assert!(e.contains("step_00000009 is incomplete (missing meta.json)") && e.contains("step_00000006"), "{e}");
    for d in ["straight", "resumed"] {
        let _ = std::fs::remove_dir_all(tmp(d));
    }
}

/// A dataset built with a larger tokenizer than the architecture's vocabulary is refused before
/// anything runs, naming both.
#[test]
fn a_dataset_of_a_larger_vocabulary_is_refused_up_front() {
    let (g, plan) = compiled("tests/configs/tiny_moe.toml");
    let (cfg, mut opts) = run_config(2, 1, 32, tmp("vocab"));
    opts.eval_every = 0;
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    let e = format!("{:#}", common::train(&mut be, &plan, &sample_data(), &cfg, &opts).unwrap_err());
    assert!(e.contains("(201088 tokens); the architecture has 512"), "{e}");
    assert!(!opts.ckpt_dir.exists(), "nothing was written");
}

/// Schedule errors name the flags that set the schedule.
#[test]
fn schedule_errors_name_the_flags() {
    let (g, plan) = compiled("configs/small.toml");
    let (mut cfg, opts) = run_config(2, 1, 32, tmp("warmup"));
    cfg.schedule.warmup = 4;
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    let e = format!("{:#}", common::train(&mut be, &plan, &sample_data(), &cfg, &opts).unwrap_err());
    assert!(e.contains("--warmup") && e.contains("--steps") && e.contains("warmup (4) exceeds total (2)"), "{e}");
}

/// A run holds its directory: a second process is refused naming the holder, and a fresh run is
/// refused where another run's checkpoints are (so `--resume` never picks from two runs).
#[test]
fn a_run_directory_belongs_to_one_run() {
    let (g, plan) = compiled("configs/small.toml");
    let (cfg, mut opts) = sample_cfg(2);
    opts.ckpt_dir = tmp("one-run");
    std::fs::create_dir_all(&opts.ckpt_dir).unwrap();
    let held = vpmoe_data::lock::DirLock::acquire(&opts.ckpt_dir, "vpmoe-rt train").unwrap();
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    let e = format!("{:#}", common::train(&mut be, &plan, &sample_data(), &cfg, &opts).unwrap_err());
    assert!(e.contains("is in use by vpmoe-rt train (pid"), "{e}");
    drop(held);
    common::train(&mut be, &plan, &sample_data(), &cfg, &opts).unwrap();
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, 99));
    let e = format!("{:#}", common::train(&mut be, &plan, &sample_data(), &cfg, &opts).unwrap_err());
    assert!(e.contains("holds the checkpoints of a run") && e.contains("--resume"), "{e}");
    let _ = std::fs::remove_dir_all(&opts.ckpt_dir);
}

#[test]
fn a_non_finite_value_stops_the_run_and_keeps_the_last_checkpoint() {
    let (g, plan) = compiled("configs/small.toml");
    let (cfg, mut opts) = sample_cfg(4);
    opts.ckpt_dir = tmp("nan");
    opts.steps = 2;
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    common::train(&mut be, &plan, &sample_data(), &cfg, &opts).unwrap();
    let good = checkpoint::latest(&opts.ckpt_dir).unwrap().unwrap();
    let before = std::fs::read(good.join("state.safetensors")).unwrap();
    // Poison one weight and continue to step 4.
    let mut st = be.state().unwrap();
    let i = plan.params.iter().position(|p| p.name.ends_with("self_attention.linear_proj.weight")).unwrap();
    st.master[i][3] = f32::NAN;
    be.set_state(st).unwrap();
    opts.steps = 4;
    let e = format!("{:#}", common::train(&mut be, &plan, &sample_data(), &cfg, &opts).unwrap_err());
    assert!(e.contains("step 3") && e.contains("non-finite"), "{e}");
    assert!(e.contains("blk1.attn.proj"), "the first offending tensor is named: {e}");
    assert_eq!(checkpoint::latest(&opts.ckpt_dir).unwrap().unwrap(), good);
    assert_eq!(std::fs::read(good.join("state.safetensors")).unwrap(), before);
    let _ = std::fs::remove_dir_all(&opts.ckpt_dir);
}

#[test]
fn sigint_saves_at_the_next_step_boundary() {
    let dir = tmp("sigint");
    let data = sample_data();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vpmoe-rt"))
        .current_dir(root())
        .args(["train", "--backend", "cpu", "--steps", "1000", "--seq-len", "32", "--micro-batch", "1"])
        .args(["--grad-accum", "1", "--eval-every", "0", "--ckpt-dir"])
        .arg(&dir)
        .arg("--data")
        .arg(&data[0].0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = dir.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map(|s| s.lines().count()).unwrap_or(0) < 1 {
        assert!(t0.elapsed().as_secs() < 300, "no step finished");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let ck = checkpoint::latest(&dir).unwrap().expect("a checkpoint was saved");
    let steps = std::fs::read_to_string(&metrics).unwrap().lines().count() as u64;
    let (g, plan) = compiled("configs/small.toml");
    let _ = g;
    let (meta, st) = checkpoint::load(&ck, &plan).unwrap();
    assert_eq!(meta.step, steps);
    assert_eq!(st.step, steps);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The AdamW group's learning rates (MODEL.md §7.4): without `normuon_aux_lr`/`normuon_aux_min_lr`
/// they are `--lr`/`--min-lr`; with them, the config's. The run says which, and its checkpoint
/// records them.
#[test]
fn the_adamw_learning_rates_follow_the_spec() {
    let dir = tmp("aux-lr");
    std::fs::create_dir_all(&dir).unwrap();
    let with = dir.join("with_aux.toml");
    let small = std::fs::read_to_string(root().join("configs/small.toml")).unwrap();
    assert!(small.trim_end().ends_with("name = \"normuon\""), "the optimizer section is last");
    std::fs::write(&with, small + "normuon_aux_lr = 0.001\nnormuon_aux_min_lr = 0.0001\n").unwrap();
    let run = |arch: &std::path::Path, ckpt: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpmoe-rt"))
            .args(["train", "--backend", "cpu", "--steps", "1", "--warmup", "0", "--eval-every", "0"])
            .args(["--micro-batch", "1", "--grad-accum", "1", "--seq-len", "32", "--lr", "0.02", "--min-lr", "0.002"])
            .arg("--arch")
            .arg(arch)
            .arg("--ckpt-dir")
            .arg(dir.join(ckpt))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(ckpt).join("step_00000001/meta.json")).unwrap()).unwrap();
        let line = text.lines().find(|l| l.starts_with("learning rates:")).unwrap_or_default().to_string();
        (line, meta["train"]["aux_lr"].as_f64().unwrap(), meta["train"]["aux_min_lr"].as_f64().unwrap())
    };
    let (line, lr, min) = run(&root().join("configs/small.toml"), "default");
    assert_eq!((lr, min), (0.02, 0.002), "{line}");
    assert!(line.contains("AdamW 2.000e-2 (= --lr, MODEL.md §7.4) -> 2.000e-3 (= --min-lr"), "{line}");
    let (line, lr, min) = run(&with, "config");
    assert_eq!((lr, min), (0.001, 0.0001), "{line}");
    assert!(
        line.contains("(config optimizer.normuon_aux_lr)") && line.contains("(config optimizer.normuon_aux_min_lr)"),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A micro-batch too large for the host is refused before anything is allocated, with the
/// number of tokens that fit; no abort, no backtrace.
#[test]
fn a_micro_batch_that_does_not_fit_is_refused_up_front() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpmoe-rt"))
        .args(["forward", "--backend", "cpu", "--micro-batch", "1000000", "--seq-len", "128"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("GiB of host memory") && err.contains("tokens (--micro-batch × --seq-len)"), "{err}");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{err}");
}

/// `vpmoe-rt bench` on the cpu backend: M micro-batches per step count in tokens/s and the
/// header; the cuda-only placement flag is refused on cpu rather than ignored.
#[test]
fn bench_reports_steps_of_several_micro_batches() {
    let bench = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vpmoe-rt"))
            .current_dir(root())
            .args([
                "bench",
                "--backend",
                "cpu",
                "--seq-len",
                "32",
                "--warmup",
                "0",
                "--steps",
                "1",
                "--grad-accum",
                "2",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = bench(&[]);
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{se}");
    assert!(so.contains("(2 x 1 x 32 tokens per step, 1 timed steps)"), "{so}");
    assert!(so.contains("tokens/s") && so.contains("optimizer"), "{so}");
    let out = bench(&["--host-momentum"]);
    let se = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(se.contains("--host-momentum") && se.contains("--backend cuda"), "{se}");
}
