//! vpmoec: architecture TOML → verified IR → plan → CUDA kernels.
//!
//! The pipeline is [`compile_arch`]: `config` (parse + validate) → `lower` (forward graph) →
//! `verify` → `autodiff` (explicit backward nodes) → `verify` → `plan` (kernels, launches, liveness-based memory plan, parameter table, report,
//! fingerprint); `decode` lowers the generation program from the same graph. [`write_plan_dir`]
//! then generates and NVRTC-compiles every kernel.

pub mod autodiff;
pub mod config;
pub mod decode;
pub mod lower;
#[cfg(feature = "mlir")]
pub mod mlir;
pub mod optimizer;
pub mod plan;
pub mod report;
pub mod shard;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use vpmoe_codegen::nvrtc::{Resources, Toolchain};
use vpmoe_ir::{DType, Graph};

pub use config::Arch;
pub use plan::Plan;

/// Lowers the forward graph, appends its backward graph, verifying after each pass, and builds
/// the plan of the whole training step; the decode program is lowered and verified too (its
/// cache size goes in the report).
pub fn compile_arch(arch: &Arch) -> Result<(Graph, Plan)> {
    let mut graph = lower::lower(arch);
    check(&graph, "lower")?;
    autodiff::autodiff(&mut graph)?;
    check(&graph, "autodiff")?;
    let decode = decode::lower_decode(&graph)?;
    let mut plan = plan::build(&graph, arch);
    plan.report.kv_cache_bytes_per_sequence = decode.cache_bytes(arch.max_seq, DType::Bf16.bytes());
    // The decode program's kernels are compiled with the training step's (vpmoe-rt sample
    // --backend cuda loads them from the plan directory).
    let (prefill, step) = (plan::schedule(&decode.prefill), plan::schedule(&decode.step));
    plan.add_kernels(prefill.steps.iter().chain(&step.steps));
    Ok((graph, plan))
}

fn check(g: &Graph, pass: &str) -> Result<()> {
    if let Err(errs) = vpmoe_ir::verify(g) {
        bail!("internal error: the graph fails verification after {pass}:\n  {}", errs.join("\n  "));
    }
    Ok(())
}

/// How `write_plan_dir` treats NVRTC.
pub struct KernelOptions {
    pub arch: String,
    /// Fail instead of writing sources only when NVRTC is missing.
    pub require_nvrtc: bool,
    pub cache_dir: PathBuf,
    /// Also copy every kernel's source and PTX here (for nsys/ncu).
    pub dump_dir: Option<PathBuf>,
    /// Also write `ir.mlir` (the `mlir` feature).
    pub emit_mlir: bool,
    /// Also write `ir.linalg.mlir` (the `mlir` feature).
    pub emit_linalg: bool,
}

#[derive(Debug, Default)]
pub struct KernelSummary {
    pub compiled: usize,
    pub cached: usize,
    /// Why kernels were not compiled, when NVRTC is absent.
    pub skipped: Option<String>,
    pub resources: Vec<(String, Resources)>,
}

/// The persistent kernel cache: `$VPMOE_CACHE_DIR`, else `$XDG_CACHE_HOME/vpmoe/kernels`,
/// else `~/.cache/vpmoe/kernels`.
pub fn default_cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("VPMOE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache"));
    base.join("vpmoe/kernels")
}

/// Writes `plan.json`, `ir.txt` (the training graph, the optimizer program, the decode program)
/// and `kernels/` (sources, and PTX, CUBIN and ptxas reports when
/// NVRTC is present) to `out`. Everything is built in a temporary directory next to `out` and
/// renamed into place, so a failure never leaves a half-written or damaged plan directory. An
/// existing `out` is replaced only when it is a plan directory (or empty): anything else is
/// refused before anything is written.
pub fn write_plan_dir(graph: &Graph, plan: &Plan, out: &Path, opts: &KernelOptions) -> Result<KernelSummary> {
    check_replaceable(out)?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out.file_name().context("output directory has no name")?.to_string_lossy().into_owned();
    remove_stale_siblings(parent, &name);
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let res = fill_plan_dir(graph, plan, &tmp, opts);
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        return res;
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if out.exists() {
        std::fs::rename(out, &old).with_context(|| format!("moving the previous {} aside", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    res
}

/// `out` may be replaced: it does not exist, is an empty directory, or is a plan directory
/// (`plan.json` of a vpmoe plan, and nothing but plan files beside it).
fn check_replaceable(out: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else { return Ok(()) };
    if !meta.is_dir() {
        bail!("{} exists and is not a directory; refusing to replace it with a plan directory", out.display());
    }
    let entries: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    if entries.is_empty() {
        return Ok(());
    }
    let is_plan = std::fs::read(out.join("plan.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("format").is_some() && v.get("fingerprint").is_some());
    let foreign: Vec<&String> = entries
        .iter()
        .filter(|e| !["plan.json", "ir.txt", "ir.mlir", "ir.linalg.mlir", "kernels"].contains(&e.as_str()))
        .collect();
    if !is_plan || !foreign.is_empty() {
        let what = if is_plan { format!("it also holds {foreign:?}") } else { "it has no vpmoe plan.json".to_string() };
        bail!("{} is not a plan directory ({what}); refusing to replace it: choose another -o", out.display());
    }
    Ok(())
}

/// Removes the temporary and set-aside directories (`.NAME.tmp-PID`, `.NAME.old-PID`) that a
/// killed compile of `NAME` left in `parent`, when their process is gone.
fn remove_stale_siblings(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let pid = [".tmp-", ".old-"].iter().find_map(|k| file.strip_prefix(&format!(".{name}{k}")));
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Why `--emit-mlir` cannot run in a build without the `mlir` feature, and how to get one.
pub const MLIR_MISSING: &str =
    "--emit-mlir needs vpmoec built with the mlir feature: `eval $(bash scripts/setup-mlir)` \
     (LLVM 19's MLIR), then `cargo run --release -p vpmoe-compiler --features mlir --bin vpmoec -- compile …`";

/// `ir.txt`: the training graph, the optimizer program, the decode program.
pub fn ir_text(graph: &Graph, plan: &Plan, decode: &decode::DecodeProgram) -> String {
    graph.to_text() + "\n" + &plan.optimizer.to_text(graph) + "\n" + &decode.to_text()
}

/// The training step and the decode program as an MLIR module in the generic form (`ir.mlir`).
#[cfg(feature = "mlir")]
pub fn emit_mlir(graph: &Graph, plan: &Plan) -> Result<String> {
    with_functions(graph, plan, mlir::emit)
}

/// The same with the plain tensor computations in upstream dialects (`ir.linalg.mlir`).
#[cfg(feature = "mlir")]
pub fn emit_mlir_linalg(graph: &Graph, plan: &Plan) -> Result<String> {
    with_functions(graph, plan, mlir::emit_linalg)
}

#[cfg(feature = "mlir")]
fn with_functions(graph: &Graph, plan: &Plan, emit: fn(&mlir::Functions) -> Result<String>) -> Result<String> {
    let decode = decode::lower_decode(graph)?;
    let optimizer = plan.optimizer.to_text(graph);
    emit(&mlir::Functions { train: graph, optimizer, prefill: &decode.prefill, step: &decode.step })
}

fn fill_plan_dir(graph: &Graph, plan: &Plan, dir: &Path, opts: &KernelOptions) -> Result<KernelSummary> {
    let kdir = dir.join("kernels");
    std::fs::create_dir_all(&kdir)?;
    std::fs::write(dir.join("plan.json"), serde_json::to_string_pretty(plan)?)?;
    let decode = decode::lower_decode(graph)?;
    std::fs::write(dir.join("ir.txt"), ir_text(graph, plan, &decode))?;
    if opts.emit_mlir || opts.emit_linalg {
        #[cfg(feature = "mlir")]
        {
            std::fs::write(dir.join("ir.mlir"), emit_mlir(graph, plan)?)?;
            if opts.emit_linalg {
                std::fs::write(dir.join("ir.linalg.mlir"), emit_mlir_linalg(graph, plan)?)?;
            }
        }
        #[cfg(not(feature = "mlir"))]
        bail!("{MLIR_MISSING}");
    }
    let toolchain = match Toolchain::discover() {
        Ok(t) => Some(t),
        Err(e) if opts.require_nvrtc => return Err(e.context("--require-nvrtc")),
        Err(e) => {
            let s = KernelSummary { skipped: Some(format!("{e}")), ..Default::default() };
            for k in &plan.kernels {
                let spec = vpmoe_codegen::KernelSpec { family: k.family.clone(), targs: k.targs.clone() };
                std::fs::write(kdir.join(format!("{}.cu", k.name)), vpmoe_codegen::shim(&spec, k.block))?;
            }
            return Ok(s);
        }
    };
    let tc = toolchain.expect("checked");
    let mut summary = KernelSummary::default();
    if let Some(d) = &opts.dump_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut table = serde_json::Map::new();
    let units: Vec<(String, String)> = plan
        .kernels
        .iter()
        .map(|k| {
            let spec = vpmoe_codegen::KernelSpec { family: k.family.clone(), targs: k.targs.clone() };
            (k.name.clone(), vpmoe_codegen::shim(&spec, k.block))
        })
        .collect();
    let compiled = tc.compile_all(&units, &opts.arch, &opts.cache_dir);
    for ((k, (_, src)), c) in plan.kernels.iter().zip(&units).zip(compiled) {
        std::fs::write(kdir.join(format!("{}.cu", k.name)), src)?;
        let c = c?;
        std::fs::write(kdir.join(format!("{}.ptx", k.name)), &c.ptx)?;
        std::fs::write(kdir.join(format!("{}.cubin", k.name)), &c.cubin)?;
        std::fs::write(kdir.join(format!("{}.log", k.name)), &c.log)?;
        if let Some(d) = &opts.dump_dir {
            std::fs::write(d.join(format!("{}.cu", k.name)), src)?;
            std::fs::write(d.join(format!("{}.ptx", k.name)), &c.ptx)?;
        }
        if c.cached {
            summary.cached += 1;
        } else {
            summary.compiled += 1;
        }
        table.insert(k.name.clone(), serde_json::to_value(&c.resources)?);
        summary.resources.push((k.name.clone(), c.resources));
    }
    if let Some(d) = &opts.dump_dir {
        for (n, body) in vpmoe_codegen::headers::HEADERS {
            std::fs::write(d.join(n), body)?;
        }
    }
    let meta = serde_json::json!({
        "arch": opts.arch,
        "nvrtc": tc.version,
        "headers_sha256": vpmoe_codegen::headers::digest(),
        "kernels": table
    });
    std::fs::write(kdir.join("resources.json"), serde_json::to_string_pretty(&meta)?)?;
    Ok(summary)
}
