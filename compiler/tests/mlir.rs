//! `--emit-mlir` (the `mlir` feature): for every shipped config the module MLIR's verifier
//! accepts, `mlir-opt` (LLVM 19's) accepts with `--allow-unregistered-dialect`, and MLIR's parser
//! reads back into the same `ir.txt`.
#![cfg(feature = "mlir")]

mod common;

use common::configs;
use std::path::Path;
use vpmoe_compiler::{compile_arch, config, decode, ir_text, mlir};

#[test]
fn every_config_round_trips_through_mlir() {
    let mlir_opt = Path::new("/usr/lib/llvm-19/bin/mlir-opt");
    assert!(mlir_opt.is_file(), "mlir-opt 19 is missing: bash scripts/setup-mlir");
    let tmp = std::env::temp_dir().join(format!("vpmoe-mlir-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for path in configs() {
        let name = path.display();
        let (g, plan) = compile_arch(&config::load(&path).unwrap()).unwrap();
        let text = vpmoe_compiler::emit_mlir(&g, &plan).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(text.contains("\"vpmoe.head_ce\"") && text.contains("\"func.func\""), "{name}: generic form");
        let back = mlir::parse_module(&text).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let graph = |sym: &str| {
            let (_, t) = back.graphs.iter().find(|(s, _)| s == sym).unwrap_or_else(|| panic!("{name}: no @{sym}"));
            vpmoe_ir::parse_graph(t).unwrap_or_else(|e| panic!("{name} @{sym}: {e}\n{t}")).to_text()
        };
        let program = decode::lower_decode(&g).unwrap();
        let want = ir_text(&g, &plan, &program);
        let got =
            graph("train") + "\n" + &back.optimizer + "\n" + &graph("decode_prefill") + "\n" + &graph("decode_step");
        assert!(got == want, "{name}: ir.txt from ir.mlir differs");
        let file = tmp.join("ir.mlir");
        std::fs::write(&file, &text).unwrap();
        let o = std::process::Command::new(mlir_opt).arg("--allow-unregistered-dialect").arg(&file).output().unwrap();
        assert!(o.status.success(), "{name}: mlir-opt: {}", String::from_utf8_lossy(&o.stderr));
        // The linalg form: no unregistered dialect, the plain ops lowered, the rest declared.
        let linalg = vpmoe_compiler::emit_mlir_linalg(&g, &plan).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        std::fs::write(&file, &linalg).unwrap();
        // Upstream passes run on it: named ops to linalg.generic, then canonicalisation.
        let o = std::process::Command::new(mlir_opt)
            .args(["--linalg-generalize-named-ops", "--canonicalize"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: mlir-opt (linalg): {}", String::from_utf8_lossy(&o.stderr));
        assert!(linalg.contains("linalg.matmul_transpose_b") && !linalg.contains("\"vpmoe."), "{name}");
        let lowered = g.nodes.iter().filter(|n| mlir::LOWERED.contains(&n.op.name())).count();
        let calls = linalg.matches(" call @").count();
        let custom = g.nodes.len() + program.prefill.nodes.len() + program.step.nodes.len()
            - lowered
            - program
                .prefill
                .nodes
                .iter()
                .chain(&program.step.nodes)
                .filter(|n| mlir::LOWERED.contains(&n.op.name()))
                .count();
        assert_eq!(calls, custom, "{name}: every other op is a call");
    }
    std::fs::remove_dir_all(&tmp).ok();
}

/// A damaged module is refused by MLIR's parser, and a foreign op by the reader, with the reason.
#[test]
fn damaged_modules_are_refused() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let (g, plan) = compile_arch(&config::load(&root.join("tests/configs/tiny_dense.toml")).unwrap()).unwrap();
    let text = vpmoe_compiler::emit_mlir(&g, &plan).unwrap();
    let cut = &text[..text.len() / 2];
    assert!(format!("{:#}", mlir::parse_module(cut).err().unwrap()).contains("parser rejects"));
    let foreign = text.replacen("\"vpmoe.rms_norm\"", "\"other.rms_norm\"", 1);
    assert!(format!("{:#}", mlir::parse_module(&foreign).err().unwrap()).contains("is not a vpmoe op"));
}

/// `vpmoec compile --emit-mlir` writes the same module into the plan directory.
#[test]
fn vpmoec_writes_ir_mlir() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = std::env::temp_dir().join(format!("vpmoe-mlir-cli-{}", std::process::id()));
    let arch = root.join("tests/configs/tiny_dense.toml");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vpmoec"))
        .args(["compile", "--emit-mlir=linalg", "-o"])
        .arg(&out)
        .arg(&arch)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (g, plan) = compile_arch(&config::load(&arch).unwrap()).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("ir.mlir")).unwrap(), vpmoe_compiler::emit_mlir(&g, &plan).unwrap());
    let linalg = vpmoe_compiler::emit_mlir_linalg(&g, &plan).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("ir.linalg.mlir")).unwrap(), linalg);
    std::fs::remove_dir_all(&out).ok();
}
