//! `vpmoec`: the vpmoe compiler CLI.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;
use vpmoe_compiler::{compile_arch, config, default_cache_dir, write_plan_dir, KernelOptions};

#[derive(Parser)]
#[command(
    name = "vpmoec",
    version,
    about = "Compile a vpMoE architecture TOML into a plan directory (IR, plan, CUDA kernels)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    Human,
    Json,
}

/// What `--emit-mlir` writes besides `ir.mlir`.
#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum MlirForm {
    /// `ir.mlir` only: every op in the `vpmoe` dialect.
    Vpmoe,
    /// Also `ir.linalg.mlir`: the plain tensor computations in `linalg`, `arith`, `tensor`.
    Linalg,
}

#[derive(Subcommand)]
enum Cmd {
    /// Lower ARCH.toml to verified IR, plan it, generate every CUDA kernel and (when NVRTC is
    /// present) compile them, writing DIR/{plan.json, ir.txt, kernels/}.
    Compile {
        /// Architecture config in the reference schema (e.g. configs/vpmoe.toml).
        arch_toml: PathBuf,
        /// Output plan directory (replaced atomically; untouched on failure).
        #[arg(short, long)]
        out: PathBuf,
        /// GPU architecture the kernels are compiled for.
        #[arg(long, default_value = "sm_90a")]
        arch: String,
        /// Also write every kernel's source, PTX and the device headers to this directory
        /// (compiled with -lineinfo, for nsys/ncu source views).
        #[arg(long)]
        dump_kernels: Option<PathBuf>,
        /// Print parameter counts, FLOPs per token and memory: `--report` for people,
        /// `--report=json` for machines (on stdout).
        #[arg(long, num_args = 0..=1, default_missing_value = "human", require_equals = true)]
        report: Option<ReportFormat>,
        /// With --report: also the memory per GPU and the traffic per step of data-parallel
        /// training on this many GPUs (optimizer sharded by rank).
        #[arg(long, requires = "report", value_parser = clap::value_parser!(u64).range(1..=65536))]
        world_size: Option<u64>,
        /// Fail when NVRTC is not available instead of writing kernel sources only.
        #[arg(long)]
        require_nvrtc: bool,
        /// Also write DIR/ir.mlir: the training step and the decode program as MLIR (a `vpmoe`
        /// dialect in the generic form, verified by MLIR); `=linalg` also DIR/ir.linalg.mlir, with
        /// the plain tensor computations in upstream dialects. Needs the `mlir` feature.
        #[arg(long, num_args = 0..=1, default_missing_value = "vpmoe", require_equals = true)]
        emit_mlir: Option<MlirForm>,
    },
    /// Print the registers, shared memory, stack and spills of every kernel of a compiled plan
    /// (from PLAN_DIR/kernels/resources.json) as a Markdown table.
    Resources {
        /// Plan directory written by `vpmoec compile` with NVRTC present.
        plan_dir: PathBuf,
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
        Cmd::Compile { arch_toml, out, arch, dump_kernels, report, world_size, require_nvrtc, emit_mlir } => {
            if emit_mlir.is_some() && !cfg!(feature = "mlir") {
                anyhow::bail!("{}", vpmoe_compiler::MLIR_MISSING);
            }
            let t0 = Instant::now();
            let a = config::load(&arch_toml)?;
            for w in a.warnings() {
                eprintln!("warning: {}: {w}", arch_toml.display());
            }
            let (graph, plan) = compile_arch(&a)?;
            let opts = KernelOptions {
                arch,
                require_nvrtc,
                cache_dir: default_cache_dir(),
                dump_dir: dump_kernels,
                emit_mlir: emit_mlir.is_some(),
                emit_linalg: emit_mlir == Some(MlirForm::Linalg),
            };
            let k = write_plan_dir(&graph, &plan, &out, &opts)?;
            let dp = world_size.map(|w| vpmoe_compiler::report::data_parallel(&plan, w as usize));
            match report {
                Some(ReportFormat::Json) => {
                    let mut v = serde_json::to_value(&plan.report)?;
                    if let Some(dp) = &dp {
                        v["data_parallel"] = serde_json::to_value(dp)?;
                    }
                    println!("{}", serde_json::to_string_pretty(&v)?)
                }
                Some(ReportFormat::Human) => {
                    print!("{}", plan.report.human());
                    if let Some(dp) = &dp {
                        print!("{}", dp.human());
                    }
                }
                None => {}
            }
            match &k.skipped {
                Some(why) => eprintln!("kernels: {} sources written, NOT compiled: {why}", plan.kernels.len()),
                None => eprintln!(
                    "kernels: {} for {} ({} compiled, {} from cache)",
                    plan.kernels.len(),
                    opts.arch,
                    k.compiled,
                    k.cached
                ),
            }
            eprintln!(
                "wrote {} ({} nodes, {} launches, fingerprint {}) in {:.2} s",
                out.display(),
                graph.nodes.len(),
                plan.report.launches,
                &plan.fingerprint[..16],
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Resources { plan_dir } => {
            let path = plan_dir.join("kernels/resources.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {} (compile the plan with NVRTC present)", path.display()))?;
            print!("{}", vpmoe_compiler::report::resources_table(&text).with_context(|| path.display().to_string())?);
            Ok(())
        }
    }
}
