//! `vpmoe-rt`: the vpmoe runtime CLI.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;
use vpmoe_runtime::{cpu::CpuBackend, load_plan, params::Params, synthetic_batch, Backend};

#[derive(Parser)]
#[command(name = "vpmoe-rt", version, about = "Run compiled vpmoe plans: forward, data, training")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum BackendKind {
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Datasets: render Harmony conversations, build token datasets from SYNTH parquet, inspect.
    #[command(subcommand)]
    Data(vpmoe_data::cli::DataCmd),
    /// Run the forward graph of a plan on a seeded synthetic micro-batch and print the
    /// span-normalised loss (at initialisation it should be close to ln(vocab)).
    Forward {
        /// Plan directory written by `vpmoec compile`.
        #[arg(long, conflicts_with = "arch")]
        plan: Option<PathBuf>,
        /// Or compile this architecture TOML in memory (default: configs/small.toml).
        #[arg(long)]
        arch: Option<PathBuf>,
        /// Which backend executes the plan. Always explicit: nothing falls back silently.
        #[arg(long, value_enum)]
        backend: BackendKind,
        /// Tokens per row (default: the architecture's max_sequence_length).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Rows in the micro-batch.
        #[arg(long, default_value_t = 1)]
        micro_batch: usize,
        /// Seed for parameter initialisation and the synthetic tokens.
        #[arg(long, default_value_t = 1234)]
        seed: u64,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Data(cmd) => vpmoe_data::cli::run(cmd),
        Cmd::Forward { plan, arch, backend, seq_len, micro_batch, seed } => {
            let (graph, plan) = match plan {
                Some(dir) => load_plan(&dir)?,
                None => {
                    let path = arch.unwrap_or_else(|| PathBuf::from("configs/small.toml"));
                    vpmoe_compiler::compile_arch(&vpmoe_compiler::config::load(&path)?)?
                }
            };
            if backend == BackendKind::Cuda {
                bail!("the cuda backend is not part of this build yet; run with --backend cpu");
            }
            let a = &plan.arch;
            let seq = seq_len.unwrap_or(a.max_seq as usize);
            if seq == 0 || seq as u64 > a.max_seq {
                bail!("--seq-len {seq} must be in 1..={}", a.max_seq);
            }
            let batch = synthetic_batch(a.vocab, seq, micro_batch, seed);
            batch.validate(a.vocab)?;
            let t0 = Instant::now();
            let mut be = CpuBackend::new(&graph, Params::init(&plan.params, seed));
            let init_s = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let out = be.forward(&batch, &["token_loss"])?;
            let fwd_s = t1.elapsed().as_secs_f64();
            let tl = out.values["token_loss"].f();
            let span_mean = |s: u8| {
                let (sum, n) = tl
                    .iter()
                    .zip(&batch.span)
                    .zip(&batch.loss_mask)
                    .filter(|((_, sp), m)| **sp == s && **m != 0)
                    .fold((0f64, 0usize), |(a, n), ((l, _), _)| (a + *l as f64, n + 1));
                if n > 0 {
                    sum / n as f64
                } else {
                    0.0
                }
            };
            let aux: Vec<f32> =
                out.values.iter().filter(|(k, _)| k.starts_with("aux.")).map(|(_, v)| v.f()[0]).collect();
            println!(
                "arch          {} ({} params, fingerprint {})",
                a.name,
                plan.report.params_total,
                &plan.fingerprint[..16]
            );
            println!("backend       {}", be.name());
            println!("batch         {micro_batch} x {seq} tokens (seed {seed})");
            println!(
                "loss          {:.6}   (w_r·CE_r + w_f·CE_f; ln(vocab) = {:.6})",
                out.loss(),
                (a.vocab as f64).ln()
            );
            println!("span losses   reasoning {:.6}, final {:.6}", span_mean(1), span_mean(2));
            if !aux.is_empty() {
                println!(
                    "seq aux loss  {:.6} (mean over {} MoE layers; 1.0 = balanced)",
                    aux.iter().sum::<f32>() / aux.len() as f32,
                    aux.len()
                );
            }
            println!(
                "time          init {init_s:.2} s, forward {fwd_s:.3} s ({:.0} tokens/s)",
                batch.tokens.len() as f64 / fwd_s
            );
            Ok(())
        }
    }
}
