//! Every kernel family compiles with the real NVRTC for sm_90a, for the locked config's shapes
//! and small ones. Full tier (`vpmoe_codegen::full_tier`): there a missing NVRTC is a failure.

mod common;

use std::collections::BTreeSet;
use vpmoe_codegen::{families, lower_node, nvrtc::Toolchain, shim, KernelSpec};

pub fn toolchain_or_skip() -> Option<Toolchain> {
    vpmoe_codegen::full_tier("NVRTC kernel builds").then(|| Toolchain::discover().unwrap_or_else(|e| panic!("{e:#}")))
}

/// Hand-picked instantiations (edge shapes), then every distinct kernel that the lowering of
/// every forward op, vjp and add of the locked and small configurations produces.
fn specs() -> Vec<(KernelSpec, u32)> {
    let mut v = hand_specs();
    let mut seen: BTreeSet<(String, u32)> = v.iter().map(|(s, b)| (s.name(), *b)).collect();
    let mut cfgs = vec![common::locked()];
    cfgs.extend(common::smalls());
    for cfg in &cfgs {
        for node in common::all_nodes(cfg) {
            for l in lower_node(&node).0 {
                if seen.insert((l.kernel.name(), l.block)) {
                    v.push((l.kernel, l.block));
                }
            }
        }
    }
    v
}

fn hand_specs() -> Vec<(KernelSpec, u32)> {
    let k = |f: &str, t: &[u64], b: u32| (KernelSpec { family: f.into(), targs: t.to_vec() }, b);
    vec![
        k("embed", &[1024], 128),
        k("rmsnorm", &[1024], 256),
        k("qk_norm", &[128], 256),
        k("gemm", &[1536, 1024, 0, 0], 128),
        k("gemm", &[128, 1024, 1, 0], 128),
        k("gemm", &[1024, 128, 2, 0], 128),
        k("gemm", &[256, 1024, 0, 1], 128),
        k("gemm", &[36, 48, 1, 0], 128),
        k("qkv_split", &[8, 2, 128], 128),
        k("tpa_combine", &[8, 2, 128, 4, 2], 128),
        k("grape", &[128], 128),
        k("vres", &[], 256),
        k("attention", &[128, 8, 2, 128, 0, 1], 128),
        k("attention", &[128, 8, 2, 0, 1, 1], 128),
        k("attention", &[16, 4, 2, 0, 0, 0], 128),
        k("router", &[256, 4, 8, 4, 1], 256),
        k("router", &[8, 2, 0, 0, 0], 256),
        k("moe_count", &[256, 4], 256),
        k("moe_scatter", &[256, 4], 256),
        k("grouped_gemm", &[128, 1024, 1, 256], 128),
        k("grouped_gemm", &[1024, 128, 0, 256], 128),
        k("combine", &[1024, 4, 1], 128),
        k("combine", &[1024, 4, 0], 128),
        k("seq_aux", &[256, 4], 256),
        k("head_lse", &[201088, 1024], 128),
        k("ce_lse", &[201088], 256),
        k("token_weight", &[], 256),
        k("span_weight", &[], 256),
        k("sum", &[], 1024),
        // ----- backward families (locked config) -----
        k("add", &[0, 0, 2], 256),
        k("add", &[1, 1, 4], 256),
        k("add", &[0, 1, 4], 256),
        k("gemm_nn", &[1024, 1536, 0, 0, 0, 0], 128),
        k("gemm_nn", &[128, 1024, 0, 0, 3, 0], 128),
        k("gemm_nn", &[1024, 256, 0, 1, 0, 0], 128),
        k("gemm_nn", &[1024, 201088, 0, 0, 0, 0], 128),
        k("gemm_nn", &[1024, 32, 0, 0, 0, 1], 128),
        k("gemm_nn", &[128, 1024, 256, 0, 3, 0], 128),
        k("gemm_nn", &[1024, 128, 256, 0, 0, 0], 128),
        k("gemm_tn", &[1536, 1024, 0, 0, 0, 1], 128),
        k("gemm_tn", &[1024, 128, 0, 0, 1, 1], 128),
        k("gemm_tn", &[256, 1024, 0, 1, 0, 0], 128),
        k("gemm_tn", &[201088, 1024, 0, 0, 0, 0], 128),
        k("gemm_tn", &[1024, 128, 256, 0, 1, 1], 128),
        k("gemm_tn", &[128, 1024, 256, 0, 0, 1], 128),
        k("colsum", &[1536, 0], 256),
        k("colsum", &[256, 1], 256),
        k("rmsnorm_bwd", &[1024], 256),
        k("rmsnorm_bwd", &[128], 256),
        k("qk_norm_bwd", &[128], 256),
        k("qkv_pack", &[8, 2, 128], 128),
        k("qkv_colsum", &[8, 2, 128], 256),
        k("tpa_bwd", &[8, 2, 128, 4, 2], 128),
        k("grape_bwd", &[128], 128),
        k("vres_bwd", &[], 256),
        k("attn_stats", &[128, 8, 2, 128, 0, 1], 128),
        k("attn_stats", &[128, 8, 2, 0, 1, 1], 128),
        k("attn_bwd_dq", &[128, 8, 2, 128, 0], 128),
        k("attn_bwd_dq", &[128, 8, 2, 0, 1], 128),
        k("attn_bwd_dkdv", &[128, 8, 2, 128, 0, 0], 128),
        k("attn_bwd_dkdv", &[128, 8, 2, 0, 1, 1], 128),
        k("attn_dkdv_sum", &[128, 8, 2], 128),
        k("router_bwd", &[256, 4], 256),
        k("moe_gather", &[1024, 4], 128),
        k("combine_bwd", &[1024, 4], 128),
        k("seq_aux_count", &[256, 4], 256),
        k("seq_aux_bwd", &[256, 4], 256),
        k("head_dl", &[201088, 1024, 25152], 128),
        k("head_dl", &[1001, 36, 1024], 128),
        k("embed_sort", &[], 1024),
        k("embed_bwd", &[1024], 128),
    ]
    .into_iter()
    // The locked config's optimizer: its nine Normuon shape families, both AdamW model dtypes.
    .chain(vpmoe_codegen::optim::kernels(
        &[
            (4, 1024),
            (32, 1024),
            (128, 1024),
            (256, 1024),
            (512, 1024),
            (1024, 128),
            (1024, 512),
            (1024, 1024),
            (1536, 1024),
        ],
        &[false, true],
    ))
    .collect()
}

#[test]
fn every_family_compiles_for_sm90a() {
    let Some(tc) = toolchain_or_skip() else { return };
    let cache = std::env::temp_dir().join(format!("vpmoe-nvrtc-test-{}", std::process::id()));
    let specs = specs();
    let t0 = std::time::Instant::now();
    for f in families() {
        assert!(specs.iter().any(|(s, _)| s.family == f.name), "no test instantiation of family {}", f.name);
    }
    let mut failures = Vec::new();
    let units: Vec<(String, String)> = specs.iter().map(|(spec, block)| (spec.name(), shim(spec, *block))).collect();
    for ((spec, _), got) in specs.iter().zip(tc.compile_all(&units, "sm_90a", &cache)) {
        match got {
            Ok(c) => {
                assert!(c.cubin.starts_with(b"\x7fELF"), "{}: not an ELF cubin", spec.name());
                assert!(c.ptx.contains(&spec.name()), "{}: entry point missing from PTX", spec.name());
                eprintln!(
                    "{}: {} regs, {} B smem, {} B spills",
                    spec.name(),
                    c.resources.registers,
                    c.resources.smem_bytes,
                    c.resources.spill_stores
                );
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    std::fs::remove_dir_all(&cache).ok();
    eprintln!("compiled {} kernels in {:.1} s", specs.len(), t0.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{} kernels failed:\n{}", failures.len(), failures.join("\n\n"));
}
