//! Binds every launch of every shipped config against a fake device address space, without a
//! GPU: each argument must have the C type its kernel declares (pointer element types included),
//! lie inside its arena or parameter, and every grid must be within the device's limits.

use std::path::Path;
use vpmoe_codegen::lower_node;
use vpmoe_compiler::{compile_arch, config};
use vpmoe_runtime::cuda::bind::{Layout, Param};

const TOK_BASE: u64 = 1 << 40;
const FIXED_BASE: u64 = 1 << 44;
const PARAM_BASE: u64 = 1 << 46;

fn check(rel: &str, rows: u64) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let (g, plan) = compile_arch(&config::load(&root.join(rel)).unwrap()).unwrap();
    let seq = plan.arch.max_seq.min(256);
    let t = rows * seq;
    let mut params = Vec::new();
    let mut at = PARAM_BASE;
    let mut extents = Vec::new();
    for p in &plan.params {
        params.push(at);
        let n = p.numel * p.ty.dtype.bytes();
        extents.push((at, at + n));
        at = (at + n).next_multiple_of(256);
    }
    let tok_end = TOK_BASE + plan.tok_arena_bytes_per_token * t;
    let fixed_end = FIXED_BASE + plan.fixed_arena_bytes;
    let lay =
        Layout { plan: &plan, graph: &g, tokens: t, seq, tok_base: TOK_BASE, fixed_base: FIXED_BASE, params: &params };
    let mut launches = 0;
    for (ni, node) in g.nodes.iter().enumerate() {
        let scratch = lower_node(node).1;
        for l in &plan.steps[ni].launches {
            let b = lay.bind(ni, l, &scratch).unwrap_or_else(|e| panic!("{rel}: {}: {e:#}", node.name));
            for p in &b.params {
                if let Param::Ptr(addr, Some(r)) = p {
                    let (lo, hi) = (r.addr, r.addr + r.bytes);
                    let inside = (TOK_BASE <= lo && hi <= tok_end)
                        || (FIXED_BASE <= lo && hi <= fixed_end)
                        || extents.iter().any(|&(a, z)| a <= lo && hi <= z);
                    assert!(
                        inside && *addr == lo,
                        "{rel}: {} ({}): region {r:?} outside every allocation",
                        node.name,
                        b.kernel
                    );
                }
            }
            launches += 1;
        }
    }
    assert_eq!(launches, plan.report.launches, "{rel}: every launch bound");
}

#[test]
fn every_launch_binds_small() {
    check("configs/small.toml", 2);
}

#[test]
fn every_launch_binds_locked() {
    check("configs/vpmoe.toml", 1);
}

/// The checks bite: an argument of the wrong element type or an out-of-range grid is refused.
#[test]
fn mismatches_are_refused() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let (g, plan) = compile_arch(&config::load(&root.join("configs/small.toml")).unwrap()).unwrap();
    let params: Vec<u64> = (0..plan.params.len() as u64).map(|i| PARAM_BASE + (i << 32)).collect();
    let lay = Layout {
        plan: &plan,
        graph: &g,
        tokens: 256,
        seq: 128,
        tok_base: TOK_BASE,
        fixed_base: FIXED_BASE,
        params: &params,
    };
    // The embedding gather: (tokens i32*, table bf16*, out bf16*, T).
    let ni = plan.steps.iter().position(|s| s.launches.iter().any(|l| l.kernel.family == "embed")).unwrap();
    let scratch = lower_node(&g.nodes[ni]).1;
    let good = plan.steps[ni].launches.iter().find(|l| l.kernel.family == "embed").unwrap().clone();
    lay.bind(ni, &good, &scratch).unwrap();
    let mut swapped = good.clone();
    swapped.args.swap(0, 1);
    let e = lay.bind(ni, &swapped, &scratch).unwrap_err().to_string();
    assert!(e.contains("parameter tokens is `const int*`"), "{e}");
    let mut short = good.clone();
    short.args.pop();
    assert!(lay.bind(ni, &short, &scratch).unwrap_err().to_string().contains("arguments for"));
    let mut huge = good;
    huge.grid[1] = vpmoe_codegen::LaunchDim::Const(1 << 20);
    assert!(lay.bind(ni, &huge, &scratch).unwrap_err().to_string().contains("device limits"));
}
