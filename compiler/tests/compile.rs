//! Compiler tests on whole configs: the plan text of `configs/small.toml` (one snapshot), the
//! report's exactness (against the locked numbers and an independent closed-form count), config
//! errors, gradients written into their sums, the memory plan's invariants, the fingerprint, the
//! plan directory's atomic writes and the layer-count independence of the kernel set. Single ops,
//! autodiff and the verifier are covered by the filetests (tests/filetests, `filetests.rs`).

use std::path::{Path, PathBuf};
use vpmoe_codegen::Arg;
use vpmoe_compiler::config::{self, Arch};
use vpmoe_compiler::{compile_arch, plan::Arena};
use vpmoe_ir::{OutputName, ParamId};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}
fn load(rel: &str) -> Arch {
    config::load(&root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e:#}"))
}
const SMALL: [&str; 4] = ["tiny_moe", "tiny_tied", "tiny_dense", "tiny_noshared"];

#[test]
fn every_trainable_parameter_gets_a_gradient_output() {
    for name in SMALL.iter().map(|n| format!("tests/configs/{n}.toml")).chain(["configs/vpmoe.toml".to_string()]) {
        let (g, _) = compile_arch(&load(&name)).unwrap();
        for (pi, p) in g.params.iter().enumerate().filter(|(_, p)| p.trainable()) {
            let grad = OutputName::Grad(ParamId(pi as u32));
            let v = g.output_named(&grad).unwrap_or_else(|| panic!("{name}: {}", p.name));
            assert_eq!(g.value(v).ty, vpmoe_ir::grad_type(&p.ty), "{name}: {}", p.name);
        }
        let extra = g.outputs.iter().find(|(o, _)| matches!(o, OutputName::Other(_)));
        assert!(extra.is_none(), "{name}: {extra:?} kept alive to the end");
    }
}

/// Each trainable parameter's gradient is finalised by one node (`Step::grads`) and has no
/// buffer: its launches write into the step's gradient sum (adding from the second micro-batch
/// on), so a micro-batch never holds a second fp32 copy of the model (22.4 GiB for the locked
/// config) nor pays a separate accumulation pass over it.
#[test]
fn gradients_are_written_into_their_sums() {
    for name in SMALL.iter().map(|n| format!("tests/configs/{n}.toml")).chain(["configs/vpmoe.toml".to_string()]) {
        let (g, plan) = compile_arch(&load(&name)).unwrap();
        let mut at = vec![None; plan.params.len()];
        for (ni, st) in plan.steps.iter().enumerate() {
            for &pi in &st.grads {
                assert!(
                    at[pi as usize].replace(ni).is_none(),
                    "{name}: {} finalised twice",
                    plan.params[pi as usize].name
                );
            }
        }
        for (pi, p) in plan.params.iter().enumerate() {
            let Some(ni) = at[pi] else {
                assert!(!p.trainable(), "{name}: {} is never finalised", p.name);
                continue;
            };
            let v = g.output_named(&OutputName::Grad(ParamId(pi as u32))).unwrap();
            assert!(
                matches!(g.value(v).def, vpmoe_ir::ValueDef::Node(id, _) if id.0 as usize == ni),
                "{name}: {}",
                p.name
            );
            assert!(
                plan.buffer_of(&vpmoe_compiler::plan::BufferKey::Value(v.0)).is_none(),
                "{name}: {} has a buffer",
                p.name
            );
            // Every writer carries the accum flag of a gradient finalised by the same node (one
            // flag serves all of a launch's gradients: they all live in the sums).
            let finals: Vec<_> =
                plan.steps[ni].grads.iter().map(|&q| g.output_named(&OutputName::Grad(ParamId(q))).unwrap()).collect();
            let writers: Vec<_> =
                plan.steps[ni].launches.iter().filter(|l| l.args.iter().any(|a| a.value() == Some(v))).collect();
            assert!(
                !writers.is_empty()
                    && writers.iter().all(|l| l.args.iter().any(|a| matches!(a, Arg::Accum(u) if finals.contains(u)))),
                "{name}: {}",
                p.name
            );
        }
        if name.ends_with("vpmoe.toml") {
            assert!(plan.fixed_arena_bytes < 64 << 20, "{name}: fixed arena {} B", plan.fixed_arena_bytes);
        }
    }
}

/// The whole plan of the small built-in architecture as text: every step's launches with their
/// grids and named arguments, scratch buffers and finalised gradients, then the memory plan. It
/// guards what the training job runs; per-op lowering is in tests/filetests.
#[test]
fn plan_of_the_small_config() {
    let (g, plan) = compile_arch(&load("configs/small.toml")).unwrap();
    insta::assert_snapshot!("plan_small", plan.to_text(&g));
}

#[test]
fn report_is_exact_for_the_locked_config() {
    let (_, plan) = compile_arch(&load("configs/vpmoe.toml")).unwrap();
    let r = &plan.report;
    assert_eq!(r.params_total, 6_021_784_719);
    assert_eq!(r.params_active, 780_087_951);
    assert_eq!(r.params_active_excl_embedding_and_head, 368_259_727);
    // MODEL.md §10: 1,147,166,720 GEMM + 114,408,960 attention FLOPs per token.
    assert_eq!(r.forward_flops_per_token, 1_261_575_680.0);
    assert_eq!(r.training_flops_per_token, 3.0 * 1_261_575_680.0);
    insta::assert_json_snapshot!("report_locked", r);
}

/// `--report --world-size`: at 8 GPUs each holds about an eighth of the masters and optimizer
/// state (whole matrices, so not exactly), everything else whole; at 1 it is the plain report.
#[test]
fn data_parallel_report_shares_the_optimizer_out() {
    let (_, plan) = compile_arch(&load("configs/vpmoe.toml")).unwrap();
    let m = &plan.report.memory;
    let one = vpmoe_compiler::report::data_parallel(&plan, 1);
    assert_eq!(one.memory, *m);
    assert_eq!((one.reduce_scatter_bytes, one.all_gather_bytes, one.all_reduce_bytes), (0, 0, 0));
    let eight = vpmoe_compiler::report::data_parallel(&plan, 8);
    let d = &eight.memory;
    assert_eq!(
        (d.weights, d.gradients, d.activations, d.workspace),
        (m.weights, m.gradients, m.activations, m.workspace)
    );
    for (share, whole) in [(d.masters, m.masters), (d.optimizer_state, m.optimizer_state)] {
        assert!(share >= whole / 8 && share as f64 <= 1.03 * (whole / 8) as f64, "{share} of {whole}");
    }
    assert_eq!(eight.reduce_scatter_bytes, m.gradients / 8 * 7);
    assert_eq!(eight.all_reduce_bytes, 2 * eight.reduce_scatter_bytes);
    assert!(eight.all_gather_bytes < m.weights && eight.all_gather_bytes > m.weights / 8 * 6);
    assert!(eight.human().contains("data parallel at 8 GPUs"));
}

/// MODEL.md §9's arithmetic, generalised: an independent count to check the graph-derived one.
fn closed_form(a: &Arch) -> (u64, u64, u64) {
    let (h, nh, ng, d, v) = (a.hidden, a.heads, a.groups, a.head_dim, a.vocab);
    let b = a.bias_linear as u64;
    let qkv_n = (nh + 2 * ng) * d;
    let mlp = |f: u64| 2 * h * f + b * (f + h);
    let embed = v * h * if a.tied_embeddings { 1 } else { 2 };
    let (mut total, mut active) = (embed + h, embed + h);
    if (0..a.layers).any(|i| a.layer(i).rotate) && a.grape.learnable_freq {
        total += d / 2;
        active += d / 2;
    }
    for i in 0..a.layers {
        let l = a.layer(i);
        let mut p = 2 * h + if a.qk_norm { 2 * d } else { 0 } + if a.sinks { nh } else { 0 };
        p += h * nh * d + b * h;
        p += if l.tpa {
            let (rq, r) = a.tpa.unwrap();
            h * (nh * rq + 2 * ng * r + (rq + 2 * r) * d)
        } else {
            h * qkv_n
        } + if a.qkv_bias { qkv_n } else { 0 };
        if a.value_residual.is_some() && i > 0 {
            p += 1;
        }
        let (mut lt, mut la) = (p, p);
        if l.moe {
            let m = a.moe.as_ref().unwrap();
            let router = m.experts * h + b * m.experts;
            let shared = m.shared.map(mlp).unwrap_or(0);
            lt += router + shared + m.experts * mlp(a.ffn);
            la += router + shared + m.topk * mlp(a.ffn);
        } else {
            lt += mlp(a.ffn);
            la += mlp(a.ffn);
        }
        total += lt;
        active += la;
    }
    (total, active, active - embed)
}

#[test]
fn report_matches_the_closed_form_count_for_every_config() {
    let mut variants: Vec<Arch> = SMALL.iter().map(|n| load(&format!("tests/configs/{n}.toml"))).collect();
    variants.push(load("configs/vpmoe.toml"));
    for rung in ["qwen3-0_6B-o200k", "vpDense0-5_28", "vpDense_28", "vpDense_80"] {
        variants.push(load(&format!("configs/rungs/{rung}.toml")));
    }
    // Other ranks, windows, skip frequencies and expert counts.
    let locked = std::fs::read_to_string(root().join("configs/vpmoe.toml")).unwrap();
    for (from, to) in [
        ("tpa_rank = 2", "tpa_rank = 3"),
        ("window_size = 128", "window_size = 64"),
        ("window_attn_skip_freq = 4", "window_attn_skip_freq = 3"),
        ("num_experts = 256", "num_experts = 64"),
        ("num_layers = 80", "num_layers = 7"),
        ("grapem_learnable_freq = true", "grapem_learnable_freq = false"),
    ] {
        assert!(locked.contains(from));
        variants.push(config::parse(&locked.replace(from, to), "variant", Path::new(".")).unwrap());
    }
    for a in &variants {
        let (_, plan) = compile_arch(a).unwrap();
        let r = &plan.report;
        assert_eq!(
            (r.params_total, r.params_active, r.params_active_excl_embedding_and_head),
            closed_form(a),
            "{}",
            a.name
        );
    }
}

#[test]
fn kernel_set_does_not_grow_with_layers() {
    let locked = std::fs::read_to_string(root().join("configs/vpmoe.toml")).unwrap();
    let eight = config::parse(&locked.replace("num_layers = 80", "num_layers = 8"), "eight", Path::new(".")).unwrap();
    let names = |a: &Arch| compile_arch(a).unwrap().1.kernels.iter().map(|k| k.name.clone()).collect::<Vec<_>>();
    let k80 = names(&load("configs/vpmoe.toml"));
    assert_eq!(k80, names(&eight));
    // Forward, backward and optimizer families, each specialised per shape family only.
    assert!(k80.len() < 180, "{} kernels", k80.len());
}

#[test]
fn memory_plan_never_overlaps_live_buffers() {
    for name in SMALL.iter().map(|n| format!("tests/configs/{n}.toml")).chain(["configs/vpmoe.toml".to_string()]) {
        let (_, plan) = compile_arch(&load(&name)).unwrap();
        for arena in [Arena::Tok, Arena::Fixed] {
            let bs: Vec<_> = plan.buffers.iter().filter(|b| b.arena == arena).collect();
            let cap = if arena == Arena::Tok { plan.tok_arena_bytes_per_token } else { plan.fixed_arena_bytes };
            for (i, a) in bs.iter().enumerate() {
                assert!(a.offset + a.size <= cap);
                assert_eq!(a.offset % if arena == Arena::Tok { 16 } else { 256 }, 0);
                for b in &bs[i + 1..] {
                    let time = a.live.0 <= b.live.1 && b.live.0 <= a.live.1;
                    let space = a.offset < b.offset + b.size && b.offset < a.offset + a.size;
                    assert!(!(time && space), "{name}: {:?} and {:?} overlap", a.key, b.key);
                }
            }
            // Activations are reused: the arena is smaller than the sum of its buffers. (The fixed
            // arena is mostly parameter gradients, which all live to the end of the step.)
            let sum: u64 = bs.iter().map(|b| b.size).sum();
            assert!(arena == Arena::Fixed || cap < sum, "{name}: no reuse in {arena:?}");
        }
    }
}

#[test]
fn fingerprint_tracks_the_plan_not_the_config_name() {
    let fp = |a: &vpmoe_compiler::Arch| vpmoe_compiler::compile_arch(a).unwrap().1.fingerprint;
    let a = load("tests/configs/tiny_moe.toml");
    let mut renamed = a.clone();
    renamed.name = "other".into();
    assert_eq!(fp(&a), fp(&renamed));
    let mut wider = a.clone();
    wider.ffn += 1;
    assert_ne!(fp(&a), fp(&wider));
    // Same config, different graph (as a compiler change would make it): another plan.
    let mut g = vpmoe_compiler::lower::lower(&a);
    vpmoe_compiler::autodiff::autodiff(&mut g).unwrap();
    let base = vpmoe_compiler::plan::build(&g, &a).fingerprint;
    assert_eq!(base, fp(&a));
    g.nodes[0].name.push_str(".renamed");
    assert_ne!(vpmoe_compiler::plan::build(&g, &a).fingerprint, base);
}

#[test]
fn config_errors_name_the_file_and_key() {
    let base = std::fs::read_to_string(root().join("tests/configs/tiny_moe.toml")).unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("num_query_groups = 2", "num_query_groups = 3", "model.num_query_groups"),
        ("topk = 2", "topk = 9", "moe.topk"),
        ("router_num_groups = 4", "router_num_groups = 3", "moe.router_num_groups"),
        ("router_group_topk = 1", "router_group_topk = 5", "moe.router_group_topk"),
        ("window_size = 4", "window_size = -1", "attention.window_size"),
        ("window_size = 4", "window_size = 33", "attention.window_size"),
        ("num_layers = 4", "num_layers = 1000000", "model.num_layers"),
        ("max_sequence_length = 32", "max_sequence_length = 1000000000000", "attention.max_sequence_length"),
        ("vocab_size = 512", "vocab_size = 9223372036854775807", "tokenizer.vocab_size"),
        ("router_bias_update_rate = 1e-3", "router_bias_update_rate = nan", "moe.router_bias_update_rate"),
        ("router_bias_update_rate = 1e-3", "router_bias_update_rate = -1.0", "moe.router_bias_update_rate"),
        ("aux_loss_coeff = 1e-4", "aux_loss_coeff = inf", "moe.aux_loss_coeff"),
        ("activation = \"squaredrelu\"", "activation = \"swiglu\"", "model.activation"),
        ("normalization = \"RMSNorm\"", "normalization = \"LayerNorm\"", "model.normalization"),
        ("softmax_type = \"learnable\"", "softmax_type = \"off-by-one\"", "model.softmax_type"),
        ("hidden_size = 32", "hidden_size = 32\nhiden_dropout = 0.0", "hiden_dropout"),
        ("hidden_size = 32\n", "", "hidden_size"),
        ("num_layers = 4", "num_layers = \"four\"", "num_layers"),
        (
            "position_embedding_type = \"grapem\"",
            "position_embedding_type = \"learned_absolute\"",
            "attention.position_embedding_type",
        ),
        ("position_embedding_type = \"grapem\"", "position_embedding_type = \"rope\"", "[grape] section"),
        (
            "position_embedding_type = \"grapem\"",
            "position_embedding_type = \"grapem\"\nrotary_base = 0.5",
            "attention.rotary_base",
        ),
        ("[model]", "[model]\nhidden_dropout = 0.1", "model.hidden_dropout"),
    ];
    let dir = std::env::temp_dir().join(format!("vpmoe-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to, key) in cases {
        assert!(base.contains(from), "{from}");
        let path = dir.join("bad.toml");
        std::fs::write(&path, base.replacen(from, to, 1)).unwrap();
        let err = format!("{:#}", config::load(&path).expect_err(key));
        assert!(err.contains("bad.toml"), "{key}: error does not name the file: {err}");
        assert!(err.contains(key), "error does not name {key}: {err}");
    }
    // TPA without a window.
    let no_window =
        base.replace("window_size = 4\nwindow_attn_skip_freq = 2\n", "").replace("grape_a = true", "grape_a = false");
    std::fs::write(dir.join("bad.toml"), no_window).unwrap();
    let err = format!("{:#}", config::load(&dir.join("bad.toml")).unwrap_err());
    assert!(err.contains("tpa.use_tpa"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn plan_dir_is_replaced_atomically_and_kept_on_failure() {
    let dir = std::env::temp_dir().join(format!("vpmoe-plan-{}", std::process::id()));
    let out = dir.join("plan");
    let a = load("tests/configs/tiny_dense.toml");
    let (g, plan) = compile_arch(&a).unwrap();
    let opts = vpmoe_compiler::KernelOptions {
        arch: "sm_90a".into(),
        require_nvrtc: false,
        cache_dir: dir.join("cache"),
        dump_dir: None,
        emit_mlir: false,
        emit_linalg: false,
    };
    vpmoe_compiler::write_plan_dir(&g, &plan, &out, &opts).unwrap();
    let before = std::fs::read(out.join("plan.json")).unwrap();
    // A failing write (a GPU architecture NVRTC rejects, or no NVRTC at all) leaves the previous
    // directory intact.
    let strict = vpmoe_compiler::KernelOptions { require_nvrtc: true, arch: "sm_bogus".into(), ..opts };
    assert!(vpmoe_compiler::write_plan_dir(&g, &plan, &out, &strict).is_err());
    assert_eq!(std::fs::read(out.join("plan.json")).unwrap(), before);
    let stray: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "temporary directories left behind");
    let p: vpmoe_compiler::Plan = serde_json::from_slice(&before).unwrap();
    assert!(p == plan, "plan.json does not round-trip exactly");
    std::fs::remove_dir_all(&dir).ok();
}

/// Routing that takes every expert of the chosen groups is valid but draws a warning; the shipped
/// configs route with a real choice inside their groups.
#[test]
fn degenerate_group_routing_is_warned_about() {
    for rel in ["configs/small.toml", "configs/vpmoe.toml"] {
        assert!(load(rel).warnings().is_empty(), "{rel}: {:?}", load(rel).warnings());
    }
    let text = std::fs::read_to_string(root().join("configs/small.toml")).unwrap();
    let degenerate = text.replace("router_group_topk = 2", "router_group_topk = 1");
    let a = vpmoe_compiler::config::parse(&degenerate, "degenerate", &root()).unwrap();
    let w = a.warnings();
    assert!(w.len() == 1 && w[0].contains("moe.router_group_topk") && w[0].contains("only chooses groups"), "{w:?}");
}

/// `-o` naming a folder that is not a plan, or a file, is refused and left as it was; an empty
/// folder is fine; a killed compile's leftovers are removed by the next one.
#[test]
fn plan_dir_never_replaces_what_is_not_a_plan() {
    let dir = std::env::temp_dir().join(format!("vpmoe-precious-{}", std::process::id()));
    let (g, plan) = compile_arch(&load("tests/configs/tiny_dense.toml")).unwrap();
    let opts = |d: &std::path::Path| vpmoe_compiler::KernelOptions {
        arch: "sm_90a".into(),
        require_nvrtc: false,
        cache_dir: d.join("cache"),
        dump_dir: None,
        emit_mlir: false,
        emit_linalg: false,
    };
    let precious = dir.join("precious");
    std::fs::create_dir_all(&precious).unwrap();
    std::fs::write(precious.join("important.txt"), "keep").unwrap();
    let e = vpmoe_compiler::write_plan_dir(&g, &plan, &precious, &opts(&dir)).unwrap_err().to_string();
    assert!(e.contains("is not a plan directory"), "{e}");
    assert_eq!(std::fs::read_to_string(precious.join("important.txt")).unwrap(), "keep");
    let file = dir.join("notes.txt");
    std::fs::write(&file, "keep").unwrap();
    let e = vpmoe_compiler::write_plan_dir(&g, &plan, &file, &opts(&dir)).unwrap_err().to_string();
    assert!(e.contains("is not a directory"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    // A plan directory with a stranger inside is not replaced either.
    let out = dir.join("plan");
    vpmoe_compiler::write_plan_dir(&g, &plan, &out, &opts(&dir)).unwrap();
    std::fs::write(out.join("mine.txt"), "keep").unwrap();
    assert!(vpmoe_compiler::write_plan_dir(&g, &plan, &out, &opts(&dir)).is_err());
    std::fs::remove_file(out.join("mine.txt")).unwrap();
    // An empty folder is replaced, and a dead process's temporary directory is cleaned up.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let stale = dir.join(".empty.tmp-4000000000");
    std::fs::create_dir_all(&stale).unwrap();
    vpmoe_compiler::write_plan_dir(&g, &plan, &empty, &opts(&dir)).unwrap();
    assert!(empty.join("plan.json").exists() && !stale.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Every kernel of the locked plan compiles with the real NVRTC for sm_90a (full tier), and a
/// second compile is served from the cache.
#[test]
fn locked_plan_kernels_compile_with_nvrtc_and_cache() {
    if !vpmoe_codegen::full_tier("locked plan through NVRTC") {
        return;
    }
    if let Err(e) = vpmoe_codegen::nvrtc::Toolchain::discover() {
        panic!("{e:#}");
    }
    let dir = std::env::temp_dir().join(format!("vpmoe-locked-{}", std::process::id()));
    let (g, plan) = compile_arch(&load("configs/vpmoe.toml")).unwrap();
    let opts = vpmoe_compiler::KernelOptions {
        arch: "sm_90a".into(),
        require_nvrtc: true,
        cache_dir: dir.join("cache"),
        dump_dir: Some(dir.join("dump")),
        emit_mlir: false,
        emit_linalg: false,
    };
    let first = vpmoe_compiler::write_plan_dir(&g, &plan, &dir.join("plan"), &opts).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(first.compiled, plan.kernels.len());
    for k in &plan.kernels {
        let cubin = std::fs::read(dir.join("plan/kernels").join(format!("{}.cubin", k.name))).unwrap();
        assert!(cubin.starts_with(b"\x7fELF"), "{}", k.name);
        assert!(dir.join("dump").join(format!("{}.cu", k.name)).exists());
    }
    let second = vpmoe_compiler::write_plan_dir(&g, &plan, &dir.join("plan"), &opts).unwrap();
    assert_eq!((second.compiled, second.cached), (0, plan.kernels.len()));
    std::fs::remove_dir_all(&dir).ok();
}

/// Without the `mlir` feature, `--emit-mlir` says how to get a build that has it.
#[cfg(not(feature = "mlir"))]
#[test]
fn emit_mlir_without_the_feature_says_how_to_build_it() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vpmoec"))
        .args(["compile", "--emit-mlir", "-o", "/nonexistent/plan"])
        .arg(root().join("tests/configs/tiny_dense.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the mlir feature") && err.contains("scripts/setup-mlir") && !err.contains("panicked"),
        "{err}"
    );
}
