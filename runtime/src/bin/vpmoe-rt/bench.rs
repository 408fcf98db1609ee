//! `vpmoe-rt bench`: whole training steps on synthetic micro-batches, timed, with MFU against the
//! device's dense bf16 peak, the optimizer's share and (cuda) the per-kernel table.

use crate::cli::{backend, BackendKind, BenchArgs};
use anyhow::{bail, Result};
use std::time::Instant;
use vpmoe_runtime::{state::TrainState, synthetic_batch, Backend};

/// Dense bf16 tensor-core peak (FLOP/s) of the GPUs vpmoe targets: the MFU baseline.
fn peak_flops(device: &str) -> Option<f64> {
    (device.contains("H100") || device.contains("H200")).then_some(989.4e12)
}

pub(crate) fn run_bench(args: BenchArgs) -> Result<()> {
    if args.decode {
        return run_decode_bench(args);
    }
    let BenchArgs { run: a, warmup, steps, grad_accum, .. } = args;
    let (plan_dir, graph, plan, seq) = a.plan()?;
    if steps == 0 || grad_accum == 0 {
        bail!("--steps and --grad-accum must be at least 1");
    }
    let tokens = seq * a.micro_batch;
    let mut be =
        backend(&a.backend, &graph, &plan, TrainState::init(&plan, a.seed), plan_dir.as_deref(), tokens, None)?;
    let device = match a.backend.kind {
        BackendKind::Cpu => "cpu".to_string(),
        BackendKind::Cuda => be.device_name(),
    };
    let scalars = vpmoe_runtime::backend::StepScalars {
        lr: 1e-3,
        aux_lr: 1e-3,
        weight_decay: 0.01,
        clip: 1.0,
        bias_rate: plan.arch.moe.as_ref().and_then(|m| m.expert_bias_rate).unwrap_or(0.0),
    };
    let one_step = |be: &mut dyn Backend, i: u64| -> Result<(f64, f64)> {
        let mut batches: Vec<_> = (0..grad_accum)
            .map(|j| synthetic_batch(plan.arch.vocab, seq, a.micro_batch, a.seed + i * grad_accum + j))
            .collect();
        vpmoe_runtime::backend::seed_step(&mut batches, &plan.arch, [1.0, 1.0]);
        let t0 = Instant::now();
        for b in &batches {
            be.accumulate(b)?;
        }
        let st = be.step(&scalars)?;
        Ok((t0.elapsed().as_secs_f64(), st.optimizer_seconds))
    };
    let pb = indicatif::ProgressBar::new(warmup + steps + (a.backend.kind == BackendKind::Cuda) as u64);
    for i in 0..warmup {
        one_step(be.as_mut(), i)?;
        pb.inc(1);
    }
    let (mut wall, mut opt) = (Vec::new(), 0.0);
    for i in 0..steps {
        let (w, o) = one_step(be.as_mut(), warmup + i)?;
        wall.push(w);
        opt += o;
        pb.inc(1);
    }
    // One more step with per-kernel events, kept out of the timed ones (events cost time).
    let table = if a.backend.kind == BackendKind::Cuda {
        be.profile(true)?;
        one_step(be.as_mut(), warmup + steps)?;
        pb.inc(1);
        be.profile(false)?
    } else {
        None
    };
    pb.finish_and_clear();
    wall.sort_by(f64::total_cmp);
    let median = wall[wall.len() / 2];
    let tps = (tokens as u64 * grad_accum) as f64 / median;
    let flops = plan.report.training_flops_per_token;
    let gemms = if a.backend.cublas { ", cuBLAS GEMMs" } else { "" };
    println!("{}{gemms}", bench_header(&plan.arch.name, &device, grad_accum, a.micro_batch, seq, steps));
    println!("step          {:.3} s median (min {:.3}, max {:.3})", median, wall[0], wall[wall.len() - 1]);
    println!("tokens/s      {tps:.0}");
    match peak_flops(&device) {
        Some(p) => println!(
            "MFU           {:.2} % ({:.3e} FLOP per token x tokens/s over the {:.1} TFLOP/s dense bf16 peak)",
            100.0 * tps * flops / p,
            flops,
            p / 1e12
        ),
        None => println!("MFU           n/a (no known peak for {device}); {:.3e} FLOP/s achieved", tps * flops),
    }
    // The optimizer's cost is per step, the rest per micro-batch: from both, the step size at
    // which the optimizer falls under 10 % (the bar depends on the global batch).
    let opt_step = opt / steps as f64;
    let per_micro = (median - opt_step) / grad_accum as f64;
    print!("optimizer     {:.3} s per step, {:.1} % of step time", opt_step, 100.0 * opt / wall.iter().sum::<f64>());
    match micro_batches_for_share(opt_step, per_micro, 0.10) {
        Some(k) => println!("; under 10 % from {k} micro-batches ({} tokens) per step", k * tokens as u64),
        None => println!(),
    }
    if let Some((used, total)) = be.device_memory() {
        println!("device memory {:.2} of {:.2} GiB in use", used as f64 / GIB, total as f64 / GIB);
    }
    if let Some(t) = table {
        println!("\n{KERNEL_TABLE}\n{t}");
    }
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

/// `bench --decode`: for each context C (128, 256, … up to the architecture's context) and batch
/// B (1 and --micro-batch), the prefill of B prompts of C tokens, then --steps decode steps over
/// the caches, against the same B next tokens computed by recomputing the whole prefix (a
/// prefill of C + 1 tokens each, as a model without caches would).
fn run_decode_bench(args: BenchArgs) -> Result<()> {
    use vpmoe_runtime::decode::Tok;
    let BenchArgs { run: a, steps, .. } = args;
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let (plan_dir, graph, plan, _) = a.plan()?;
    let kind = a.backend.kind;
    let state = TrainState::init(&plan, a.seed);
    let decoder = |slots| crate::cli::decoder(kind, &graph, &plan, &state, plan_dir.as_deref(), slots);
    let max = plan.arch.max_seq as usize;
    let contexts: Vec<usize> = (7..=12).map(|p| 1usize << p).filter(|&c| c + steps as usize <= max).collect();
    if contexts.is_empty() {
        bail!(
            "bench --decode needs max_sequence_length ≥ {} (128 + --steps); {} has {max}",
            128 + steps,
            plan.arch.name
        );
    }
    let batches: Vec<usize> = if a.micro_batch > 1 { vec![1, a.micro_batch] } else { vec![1] };
    let windows: Vec<String> = graph
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            vpmoe_ir::Op::Attention(at) => Some(match at.kind {
                vpmoe_ir::AttnKind::Window(w) => format!("W{w}"),
                vpmoe_ir::AttnKind::Global { .. } => "global".into(),
            }),
            _ => None,
        })
        .collect();
    println!(
        "bench --decode {} on {}: attention layers [{}], {steps} decode steps per context",
        plan.arch.name,
        kind.name(),
        windows.join(" ")
    );
    println!(
        "{:>6} {:>7} {:>14} {:>14} {:>12} {:>16} {:>8}",
        "batch", "context", "prefill tok/s", "decode tok/s", "step ms", "recompute ms", "ratio"
    );
    let mut rng = vpmoe_ir::rng::Rng::new(a.seed);
    for &b in &batches {
        for &c in &contexts {
            let toks: Vec<Vec<u32>> =
                (0..b).map(|_| (0..c + steps as usize).map(|_| rng.below(plan.arch.vocab) as u32).collect()).collect();
            let prefill = |len: usize| -> Vec<Tok> {
                (0..b)
                    .flat_map(|s| (0..len).map(move |p| (s, p)))
                    .map(|(s, p)| Tok { slot: s, pos: p, token: toks[s][p], logits: p + 1 == len })
                    .collect()
            };
            let mut dec = decoder(b)?;
            let t0 = Instant::now();
            dec.step(&prefill(c))?;
            let t_prefill = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            for i in 0..steps as usize {
                let step: Vec<Tok> =
                    (0..b).map(|s| Tok { slot: s, pos: c + i, token: toks[s][c + i], logits: true }).collect();
                dec.step(&step)?;
            }
            let t_step = t1.elapsed().as_secs_f64() / steps as f64;
            let mut full = decoder(b)?;
            let t2 = Instant::now();
            full.step(&prefill(c + 1))?;
            let t_full = t2.elapsed().as_secs_f64();
            println!(
                "{b:>6} {c:>7} {:>14.0} {:>14.1} {:>12.2} {:>16.2} {:>7.1}x",
                (b * c) as f64 / t_prefill,
                b as f64 / t_step,
                1e3 * t_step,
                1e3 * t_full,
                t_full / t_step
            );
        }
    }
    Ok(())
}

/// The first line of a bench report (scripts/cublas-baseline reads the micro-batch size from it).
fn bench_header(arch: &str, device: &str, grad_accum: u64, micro_batch: usize, seq: usize, steps: u64) -> String {
    format!("bench {arch} on {device} ({grad_accum} x {micro_batch} x {seq} tokens per step, {steps} timed steps)")
}

/// The line before the per-kernel table of a bench report.
const KERNEL_TABLE: &str = "kernel time of one profiled step:";

/// The fewest micro-batches per step for which a fixed per-step optimizer time `opt` is at most
/// `share` of the step, each micro-batch taking `per_micro` seconds.
fn micro_batches_for_share(opt: f64, per_micro: f64, share: f64) -> Option<u64> {
    if !(per_micro > 0.0 && opt >= 0.0 && share > 0.0 && share < 1.0) {
        return None;
    }
    Some(((opt * (1.0 - share) / (share * per_micro) - 1e-9).ceil() as u64).max(1))
}

#[cfg(test)]
mod tests {
    use super::{bench_header, micro_batches_for_share, KERNEL_TABLE};
    use vpmoe_runtime::cuda::timing::Timer;

    /// scripts/cublas-baseline reads what `bench` prints: the header's micro-batch size and the
    /// per-kernel table's dense GEMM rows (grouped expert GEMMs and other kernels are skipped).
    #[test]
    fn cublas_baseline_reads_the_bench_report() {
        let mut t = Timer::default();
        for (k, ms) in [
            ("vp_gemm_N1536_KD1024_EPI0_OUT0", 0.05),
            ("vp_gemm_nn_N1024_KD256_E0_AMODE1_EPI0_OUT0", 0.02),
            ("vp_gemm_tn_N25152_K1024_E0_AMODE0_BRELU20_BIAS0", 1.4),
            ("vp_gemm_tn_N1024_K512_E0_AMODE0_BRELU20_BIAS1", 0.03),
            ("vp_gemm_tn_N128_K1024_E256_AMODE0_BRELU20_BIAS1", 0.02),
            ("vp_attention_D128_HEADS8_GROUPS2_WINDOW0_ALIBI1_SINKS1", 0.06),
        ] {
            t.add(k, "other", ms);
        }
        let log =
            format!("{}\nstep 1.0 s\n\n{KERNEL_TABLE}\n{}", bench_header("vpmoe", "H100", 8, 2, 2048, 5), t.table());
        let dir = std::env::temp_dir().join(format!("vpmoe-cublas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bench.log"), log).unwrap();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cublas-baseline");
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg("--shapes")
            .arg(dir.join("bench.log"))
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("M = 4096"), "{text}");
        assert!(text.contains("nt 4096,1536,1024"), "{text}");
        assert!(text.contains("nn 4096,1024,256 x2"), "{text}");
        assert!(text.contains("tn 4096,25152,1024"), "{text}");
        assert!(text.contains("tn 4096,1024,512 +b"), "{text}");
        assert!(!text.contains("E256") && !text.contains("attention"), "{text}");
    }

    #[test]
    fn optimizer_share_crossover() {
        // 0.1 s of optimizer against 0.1 s micro-batches: 9 of them make it exactly 10 %.
        assert_eq!(micro_batches_for_share(0.1, 0.1, 0.1), Some(9));
        assert_eq!(micro_batches_for_share(0.1, 0.09, 0.1), Some(10));
        assert_eq!(micro_batches_for_share(0.0, 0.1, 0.1), Some(1));
        assert_eq!(micro_batches_for_share(0.1, 0.0, 0.1), None);
        assert_eq!(micro_batches_for_share(0.1, -1.0, 0.1), None);
    }
}
