//! `cargo bench -p vpmoe-runtime --bench train_step`: cpu training throughput of the small config
//! and the optimizer's share of a step, and the locked config's Polar Express launches per step
//! against the reference's one-per-matrix baseline (MODEL.md §11).

use std::path::Path;
use std::time::Instant;
use vpmoe_runtime::backend::{Backend, StepScalars};
use vpmoe_runtime::{cpu::CpuBackend, state::TrainState, synthetic_batch};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let load = |p: &str| vpmoe_compiler::config::load(&root.join(p)).unwrap();

    let locked = vpmoe_compiler::compile_arch(&load("configs/vpmoe.toml")).unwrap().1;
    let r = &locked.report;
    println!(
        "locked config: {} Normuon matrices in {} shape families -> {} batched Polar Express launches per step \
         (baseline, the reference: {} launches, one per matrix; {:.0}x fewer)",
        r.normuon_matrices,
        r.polar_express_launches,
        r.polar_express_launches,
        r.normuon_matrices,
        r.normuon_matrices as f64 / r.polar_express_launches as f64
    );

    let (g, plan) = vpmoe_compiler::compile_arch(&load("configs/small.toml")).unwrap();
    let (rows, seq, steps) = (2, 128, 5);
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, 1));
    let sc = StepScalars { lr: 0.01, aux_lr: 0.004, weight_decay: 0.01, clip: 1.0, bias_rate: 1e-3 };
    let mut batch = synthetic_batch(plan.arch.vocab, seq, rows, 2);
    batch.aux_grad = 1e-4;
    let tokens = (rows * seq) as f64;
    // Warm-up step, then timed steps.
    be.accumulate(&batch).unwrap();
    be.step(&sc).unwrap();
    let (mut fwd, mut fb, mut opt) = (0.0, 0.0, 0.0);
    for _ in 0..steps {
        let t = Instant::now();
        be.forward(&batch, &[]).unwrap();
        fwd += t.elapsed().as_secs_f64();
        let t = Instant::now();
        be.accumulate(&batch).unwrap();
        fb += t.elapsed().as_secs_f64();
        let t = Instant::now();
        be.step(&sc).unwrap();
        opt += t.elapsed().as_secs_f64();
    }
    let n = steps as f64;
    println!(
        "small config, cpu, {rows}x{seq} tokens: forward {:.0} tok/s; training step {:.0} tok/s \
         ({:.2}x the forward-only baseline); optimizer {:.3} s per step = {:.1}% of the step",
        tokens * n / fwd,
        tokens * n / (fb + opt),
        fwd / (fb + opt),
        opt / n,
        100.0 * opt / (fb + opt)
    );
}
