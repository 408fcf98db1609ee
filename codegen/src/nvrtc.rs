//! NVRTC compilation with a persistent cache.
//!
//! NVRTC is loaded dynamically. [`Toolchain::discover`] looks for it, in order, under
//! `$VPMOE_CUDA_ROOT`, the repository's `.cuda/nvidia/cu13` (installed by `scripts/setup-cuda`),
//! `$CUDA_HOME` and `/usr/local/cuda`, and preloads `libnvrtc` (and its builtins) by absolute path so
//! no `LD_LIBRARY_PATH` is needed; a library already on the loader path also works. Headers come
//! from `$CUDA_INCLUDE` or `<root>/include`.

use crate::headers::HEADERS;
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

/// Where NVRTC and the CUDA headers are.
#[derive(Clone, Debug)]
pub struct Toolchain {
    pub include: PathBuf,
    /// `major.minor` of the loaded NVRTC.
    pub version: String,
}

/// Resource usage reported by ptxas for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub smem_bytes: u32,
    pub stack_bytes: u32,
}

pub struct Compiled {
    pub ptx: String,
    pub cubin: Vec<u8>,
    pub log: String,
    pub resources: Resources,
    pub cached: bool,
}

fn candidate_roots() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(r) = std::env::var("VPMOE_CUDA_ROOT") {
        v.push(PathBuf::from(r));
    }
    // The repo-local install: look upward from the working directory and from the executable.
    let mut starts = vec![std::env::current_dir().ok()];
    starts.push(std::env::current_exe().ok());
    for s in starts.into_iter().flatten() {
        for dir in s.ancestors() {
            let p = dir.join(".cuda/nvidia/cu13");
            if p.is_dir() {
                v.push(p);
                break;
            }
        }
    }
    if let Ok(h) = std::env::var("CUDA_HOME") {
        v.push(PathBuf::from(h));
    }
    v.push(PathBuf::from("/usr/local/cuda"));
    v
}

fn preload(lib_dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(lib_dir) else { return false };
    let mut libs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("libnvrtc-builtins.so.") && !n.contains(".alt.")
        })
        .collect();
    libs.sort();
    let main = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].iter().map(|n| lib_dir.join(n)).find(|p| p.exists());
    let Some(main) = main else { return false };
    libs.push(main);
    for p in libs {
        // Keep the library loaded for the process lifetime; cudarc's own dlopen then finds it by SONAME.
        match unsafe { libloading::Library::new(&p) } {
            Ok(l) => std::mem::forget(l),
            Err(_) => return false,
        }
    }
    true
}

impl Toolchain {
    /// Finds and loads NVRTC, or explains what is missing.
    pub fn discover() -> Result<Toolchain> {
        if std::env::var_os("VPMOE_NO_NVRTC").is_some() {
            bail!("NVRTC disabled by VPMOE_NO_NVRTC");
        }
        let roots = candidate_roots();
        let mut include = std::env::var("CUDA_INCLUDE").ok().map(PathBuf::from);
        for r in &roots {
            for lib in ["lib", "lib64"] {
                if preload(&r.join(lib)) && include.is_none() {
                    include = Some(r.join("include"));
                }
            }
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            bail!(
                "NVRTC not found (looked in $VPMOE_CUDA_ROOT, .cuda/nvidia/cu13, $CUDA_HOME, /usr/local/cuda and the \
                 loader path); run scripts/setup-cuda to install nvidia-cuda-nvrtc==13.0.88 into .cuda/"
            );
        }
        let include = include
            .or_else(|| roots.iter().map(|r| r.join("include")).find(|p| p.join("cuda_bf16.h").exists()))
            .ok_or_else(|| anyhow!("CUDA headers (cuda_bf16.h) not found; set CUDA_INCLUDE"))?;
        if !include.join("cuda_bf16.h").exists() {
            bail!("{} has no cuda_bf16.h; set CUDA_INCLUDE to the CUDA include directory", include.display());
        }
        let (mut maj, mut min) = (0, 0);
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut maj, &mut min) }
            .result()
            .map_err(|e| anyhow!("nvrtcVersion: {e:?}"))?;
        Ok(Toolchain { include, version: format!("{maj}.{min}") })
    }

    pub fn options(&self, arch: &str) -> Vec<String> {
        vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            "--ptxas-options=-v".into(),
            "-lineinfo".into(),
            format!("--include-path={}", self.include.display()),
        ]
    }

    /// Cache key: source, embedded headers, options, NVRTC version and arch.
    pub fn cache_key(&self, src: &str, arch: &str) -> String {
        let mut h = Sha256::new();
        h.update(src);
        h.update(crate::headers::digest());
        for o in self.options(arch) {
            // The include path's location does not change the code; its NVRTC version does.
            if !o.starts_with("--include-path") {
                h.update(o);
            }
        }
        h.update(&self.version);
        h.update(arch);
        vpmoe_ir::hex(&h.finalize())
    }

    /// [`Toolchain::compile`] for each `(name, source)` of `units`, on as many threads as the
    /// machine has cores; results in `units`' order.
    pub fn compile_all(&self, units: &[(String, String)], arch: &str, cache_dir: &Path) -> Vec<Result<Compiled>> {
        crate::on_cores(units, |(name, src)| self.compile(name, src, arch, cache_dir))
    }

    /// Compiles one translation unit to PTX and a CUBIN for `arch`, through the cache in `cache_dir`.
    pub fn compile(&self, name: &str, src: &str, arch: &str, cache_dir: &Path) -> Result<Compiled> {
        let key = self.cache_key(src, arch);
        let base = cache_dir.join(&key);
        if let (Ok(cubin), Ok(ptx), Ok(log)) = (
            std::fs::read(base.with_extension("cubin")),
            std::fs::read_to_string(base.with_extension("ptx")),
            std::fs::read_to_string(base.with_extension("log")),
        ) {
            let resources = parse_resources(&log);
            return Ok(Compiled { ptx, cubin, log, resources, cached: true });
        }
        let (ptx, cubin, log) = compile_uncached(name, src, &self.options(arch))?;
        std::fs::create_dir_all(cache_dir).with_context(|| format!("creating cache {}", cache_dir.display()))?;
        // Write each file under a temporary name and rename, the log (checked last on lookup) last.
        static TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (ext, bytes) in [("cubin", cubin.as_slice()), ("ptx", ptx.as_bytes()), ("log", log.as_bytes())] {
            let tmp = base.with_extension(format!("{ext}.tmp{}-{n}", std::process::id()));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, base.with_extension(ext))?;
        }
        let resources = parse_resources(&log);
        Ok(Compiled { ptx, cubin, log, resources, cached: false })
    }
}

fn cstring_from(v: Vec<c_char>) -> String {
    if v.is_empty() {
        return String::new();
    }
    unsafe { CStr::from_ptr(v.as_ptr()) }.to_string_lossy().into_owned()
}

fn compile_uncached(name: &str, src: &str, opts: &[String]) -> Result<(String, Vec<u8>, String)> {
    use cudarc::nvrtc::{result as nres, sys as nsys};
    let csrc = CString::new(src)?;
    let cname = CString::new(format!("{name}.cu"))?;
    let hdr_bodies: Vec<CString> = HEADERS.iter().map(|(_, b)| CString::new(*b).unwrap()).collect();
    let hdr_names: Vec<CString> = HEADERS.iter().map(|(n, _)| CString::new(*n).unwrap()).collect();
    let bodies: Vec<*const c_char> = hdr_bodies.iter().map(|c| c.as_ptr()).collect();
    let names: Vec<*const c_char> = hdr_names.iter().map(|c| c.as_ptr()).collect();
    let mut prog = std::mem::MaybeUninit::uninit();
    unsafe {
        nsys::nvrtcCreateProgram(
            prog.as_mut_ptr(),
            csrc.as_ptr(),
            cname.as_ptr(),
            bodies.len() as i32,
            bodies.as_ptr(),
            names.as_ptr(),
        )
    }
    .result()
    .map_err(|e| anyhow!("nvrtcCreateProgram({name}): {e:?}"))?;
    let prog = unsafe { prog.assume_init() };
    let res = unsafe { nres::compile_program(prog, opts) };
    let log = cstring_from(unsafe { nres::get_program_log(prog) }.unwrap_or_default());
    if let Err(e) = res {
        unsafe { nres::destroy_program(prog) }.ok();
        bail!("NVRTC failed to compile kernel {name} ({e:?})\n--- log ---\n{log}\n--- source ---\n{src}");
    }
    let ptx = cstring_from(unsafe { nres::get_ptx(prog) }.map_err(|e| anyhow!("nvrtcGetPTX: {e:?}"))?);
    let mut size = 0usize;
    let cubin = unsafe {
        nsys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| anyhow!("nvrtcGetCUBINSize: {e:?}"))?;
        let mut buf = vec![0u8; size];
        nsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
            .result()
            .map_err(|e| anyhow!("nvrtcGetCUBIN: {e:?}"))?;
        buf
    };
    unsafe { nres::destroy_program(prog) }.ok();
    Ok((ptx, cubin, log))
}

/// Parses ptxas' `-v` report (registers, spills, shared memory, stack).
pub fn parse_resources(log: &str) -> Resources {
    let num_before = |line: &str, suffix: &str| -> Option<u32> {
        let i = line.find(suffix)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let mut r = Resources::default();
    for line in log.lines() {
        if let Some(n) = num_before(line, " registers") {
            r.registers = n;
        }
        if let Some(n) = num_before(line, " bytes smem") {
            r.smem_bytes = n;
        }
        if let Some(n) = num_before(line, " bytes spill stores") {
            r.spill_stores = n;
        }
        if let Some(n) = num_before(line, " bytes spill loads") {
            r.spill_loads = n;
        }
        if let Some(n) = num_before(line, " bytes stack frame") {
            r.stack_bytes = n;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
                   ptxas         .     16 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n\
                   ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem";
        let r = super::parse_resources(log);
        assert_eq!((r.registers, r.smem_bytes, r.spill_stores, r.spill_loads, r.stack_bytes), (40, 1024, 4, 8, 16));
    }
}
