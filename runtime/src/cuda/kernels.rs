//! Loading the plan's kernels: each kernel's cubin from the plan directory when it was built from
//! the same shim and the same templates for this GPU, otherwise compiled at load by NVRTC
//! (through the persistent cache), so an edited codegen or template, or a plan compiled without
//! NVRTC, still runs the current code.

use super::device::Gpu;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{sys, CudaFunction, CudaModule};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use vpmoe_codegen::nvrtc::Toolchain;
use vpmoe_codegen::{emu_launcher, shim, KernelSpec};
use vpmoe_compiler::plan::KernelEntry;
use vpmoe_compiler::Plan;

pub struct Kernels {
    funcs: HashMap<String, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    /// How many came from the plan directory and how many NVRTC compiled (or took from its cache).
    pub from_plan: usize,
    pub compiled: usize,
}

/// Whether the plan directory's cubins (`kernels/resources.json`) were built for `arch` from the
/// templates this build embeds.
fn plan_cubins_current(dir: &Path, arch: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("kernels/resources.json")) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    v.get("arch").and_then(|a| a.as_str()) == Some(arch)
        && v.get("headers_sha256").and_then(|h| h.as_str()) == Some(vpmoe_codegen::headers::digest().as_str())
}

impl Kernels {
    pub fn load(gpu: &Gpu, plan: &Plan, plan_dir: Option<&Path>) -> Result<Kernels> {
        Kernels::load_entries(gpu, &plan.kernels, plan_dir)
    }

    /// Loads `entries` (see [`Kernels::load`]).
    pub fn load_entries(gpu: &Gpu, entries: &[KernelEntry], plan_dir: Option<&Path>) -> Result<Kernels> {
        let arch = gpu.arch();
        let dir_ok = plan_dir.filter(|d| plan_cubins_current(d, &arch));
        let mut toolchain: Option<Result<Toolchain>> = None;
        let cache = vpmoe_compiler::default_cache_dir();
        let mut k = Kernels { funcs: HashMap::new(), _modules: Vec::new(), from_plan: 0, compiled: 0 };
        if gpu.emulated {
            k.load_emulated(gpu, entries)?;
            return Ok(k);
        }
        for e in entries {
            let spec = KernelSpec { family: e.family.clone(), targs: e.targs.clone() };
            let src = shim(&spec, e.block);
            let stored = dir_ok.and_then(|d| {
                let kd = d.join("kernels");
                let same = std::fs::read_to_string(kd.join(format!("{}.cu", e.name))).ok()? == src;
                same.then(|| std::fs::read(kd.join(format!("{}.cubin", e.name))).ok()).flatten()
            });
            let cubin = match stored {
                Some(c) => {
                    k.from_plan += 1;
                    c
                }
                None => {
                    let tc = toolchain.get_or_insert_with(Toolchain::discover).as_ref().map_err(|err| {
                        anyhow!(
                            "kernel {} has no current {arch} cubin in the plan directory and NVRTC is unavailable: {err}",
                            e.name
                        )
                    })?;
                    k.compiled += 1;
                    tc.compile(&e.name, &src, &arch, &cache)?.cubin
                }
            };
            if cubin.is_empty() {
                bail!("kernel {}: empty cubin", e.name);
            }
            k.add(load(gpu, &e.name, cubin)?);
        }
        Ok(k)
    }

    /// On the host emulator's driver a module is the kernel's source with its emulator entry point
    /// (the driver compiles it with g++); loads run on every core, since compiling dominates.
    fn load_emulated(&mut self, gpu: &Gpu, entries: &[KernelEntry]) -> Result<()> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = entries.len().div_ceil(threads).max(1);
        let loaded: Vec<Result<Vec<Loaded>>> = std::thread::scope(|sc| {
            let jobs: Vec<_> = entries
                .chunks(chunk)
                .map(|part| {
                    sc.spawn(move || {
                        part.iter()
                            .map(|e| {
                                let spec = KernelSpec { family: e.family.clone(), targs: e.targs.clone() };
                                let image = format!("VPMOE-EMU\n{}{}\0", shim(&spec, e.block), emu_launcher(&spec));
                                load(gpu, &e.name, image.into_bytes())
                            })
                            .collect()
                    })
                })
                .collect();
            jobs.into_iter().map(|j| j.join().expect("a kernel-loading thread panicked")).collect()
        });
        for part in loaded {
            for l in part? {
                self.add(l);
                self.compiled += 1;
            }
        }
        Ok(())
    }

    fn add(&mut self, (name, module, f): Loaded) {
        self.funcs.insert(name, f);
        self._modules.push(module);
    }

    pub fn get(&self, name: &str) -> Result<sys::CUfunction> {
        self.funcs.get(name).map(|f| f.cu_function()).with_context(|| format!("kernel {name} is not loaded"))
    }
}

/// A loaded kernel: its name, module and entry point.
type Loaded = (String, Arc<CudaModule>, CudaFunction);

/// Loads one module image (a cubin, or emulator source) and its kernel `name`.
fn load(gpu: &Gpu, name: &str, image: Vec<u8>) -> Result<Loaded> {
    let m = gpu
        .ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(image))
        .map_err(|err| anyhow!("loading kernel {name} on {}: {err}", gpu.name))?;
    let f = m.load_function(name).map_err(|err| anyhow!("kernel {name}: {err}"))?;
    Ok((name.to_string(), m, f))
}
