//! Binds every launch of every shipped config against a fake device address space, without a
//! GPU: each argument must have the C type its kernel declares (pointer element types included),
//! lie inside its arena or parameter, and every grid must be within the device's limits. Every
//! finalised gradient is written into its gradient sum by launches that add (`accum` = 1) once the
//! step has an earlier micro-batch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use vpmoe_codegen::lower_node;
use vpmoe_codegen::{consts::TICKETS, family};
use vpmoe_compiler::plan::schedule;
use vpmoe_compiler::{compile_arch, config};
use vpmoe_ir::DType;
use vpmoe_runtime::cuda::bind::{param_regions, Caches, Layout, Param, Region};
use vpmoe_runtime::cuda::blas::{lower, Gemm};

const TOK_BASE: u64 = 1 << 40;
const FIXED_BASE: u64 = 1 << 44;
const PARAM_BASE: u64 = 1 << 46;
const SUM_BASE: u64 = 1 << 47;
const TICKETS_BASE: u64 = 1 << 48;

/// Binds every launch of config `rel` at `rows` rows; returns the launches `--cublas` issues as
/// cuBLAS calls (kernel names, in plan order).
fn check(rel: &str, rows: u64) -> Vec<String> {
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
    let mut sums = BTreeMap::new();
    let mut at = SUM_BASE;
    for &pi in plan.steps.iter().flat_map(|s| &s.grads) {
        let p = &plan.params[pi as usize];
        let v = g.output_named(&vpmoe_ir::OutputName::Grad(vpmoe_ir::ParamId(pi))).unwrap();
        sums.insert(v.0, Region { addr: at, bytes: p.numel * 4, dtype: DType::F32 });
        extents.push((at, at + p.numel * 4));
        at = (at + p.numel * 4).next_multiple_of(256);
    }
    assert_eq!(sums.len(), plan.params.iter().filter(|p| p.trainable()).count(), "{rel}: one sum per trainable");
    let params = param_regions(&plan, &params);
    let lay = Layout {
        graph: &g,
        buffers: &plan.buffers,
        tokens: t,
        seq,
        tok_base: TOK_BASE,
        fixed_base: FIXED_BASE,
        params: &params,
        sums: &sums,
        accumulating: true,
        tickets: TICKETS_BASE,
        caches: None,
    };
    let mut written = BTreeSet::new();
    let mut launches = 0;
    let mut tickets = 0;
    let mut blas = Vec::new();
    for (ni, node) in g.nodes.iter().enumerate() {
        let scratch = lower_node(node).1;
        for l in &plan.steps[ni].launches {
            let b = lay.bind(ni, l, &scratch).unwrap_or_else(|e| panic!("{rel}: {}: {e:#}", node.name));
            for p in &b.params {
                if let Param::Ptr(addr, Some(r)) = p {
                    let (lo, hi) = (r.addr, r.addr + r.bytes);
                    let inside = (TOK_BASE <= lo && hi <= tok_end)
                        || (FIXED_BASE <= lo && hi <= fixed_end)
                        || (lo == TICKETS_BASE && r.bytes == TICKETS * 4)
                        || extents.iter().any(|&(a, z)| a <= lo && hi <= z);
                    assert!(
                        inside && *addr == lo,
                        "{rel}: {} ({}): region {r:?} outside every allocation",
                        node.name,
                        b.kernel
                    );
                }
            }
            // A split reduction's groups (one ticket each, as its kernel numbers them) fit the tickets.
            if b.params.iter().any(|p| matches!(p, Param::Ptr(TICKETS_BASE, _))) {
                let groups = match l.kernel.family.as_str() {
                    "gemm_tn" | "tpa_wgrad" => b.grid[0] * b.grid[1],
                    "colsum" | "qkv_colsum" | "qk_norm_bwd" => b.grid[1],
                    "rmsnorm_bwd" | "grape_bwd" | "vres_bwd" | "seq_aux" | "seq_aux_count" | "moe_count" => 1,
                    f => panic!("{rel}: {}: {f} counts in the tickets without a rule here", node.name),
                };
                assert!(groups as u64 <= TICKETS, "{rel}: {} ({}): {groups} ticket groups", node.name, b.kernel);
                tickets += 1;
            }
            // A launch touching a gradient sum adds into it.
            let accum = family(&l.kernel.family).params.iter().position(|p| p.1 == "accum");
            for p in &b.params {
                if let Param::Ptr(addr, Some(_)) = p {
                    if let Some(v) = sums.iter().find(|(_, r)| r.addr == *addr).map(|(v, _)| *v) {
                        assert_eq!(
                            accum.map(|i| b.params[i]),
                            Some(Param::I32(1)),
                            "{rel}: {} ({})",
                            node.name,
                            b.kernel
                        );
                        written.insert(v);
                    }
                }
            }
            if let Some(gm) = lower(&l.kernel, &b) {
                check_blas_operands(&format!("{rel}: {} ({})", node.name, b.kernel), &gm, &b.params);
                blas.push(b.kernel.clone());
            }
            launches += 1;
        }
    }
    assert_eq!(launches, plan.report.launches, "{rel}: every launch bound");
    assert!(tickets > 0, "{rel}: no split reduction counted in the tickets");
    assert_eq!(written.len(), sums.len(), "{rel}: every gradient sum written");
    blas
}

/// A cuBLAS call reads and writes inside the regions its launch bound: each operand's column-major
/// extent (`cols − 1` leading dimensions plus `rows` elements) fits the region at its pointer,
/// and every leading dimension is at least its matrix's row count (cuBLAS refuses less).
fn check_blas_operands(what: &str, g: &Gemm, params: &[Param]) {
    let region = |addr: u64| {
        params
            .iter()
            .find_map(|p| match p {
                Param::Ptr(a, Some(r)) if *a == addr => Some(*r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{what}: operand {addr:#x} is not a bound region"))
    };
    let (ar, ac) = if g.ta { (g.k, g.m) } else { (g.m, g.k) };
    let (br, bc) = if g.tb { (g.n, g.k) } else { (g.k, g.n) };
    for (name, addr, rows, cols, ld, dtype) in [
        ("A", g.a, ar, ac, g.lda, DType::Bf16),
        ("B", g.b, br, bc, g.ldb, DType::Bf16),
        ("C", g.c, g.m, g.n, g.ldc, if g.c_f32 { DType::F32 } else { DType::Bf16 }),
    ] {
        let r = region(addr);
        assert_eq!(r.dtype, dtype, "{what}: {name}'s element type");
        assert!(rows > 0 && cols > 0 && ld >= rows, "{what}: {name} is {rows} x {cols} with ld {ld}");
        let need = ((cols as u64 - 1) * ld as u64 + rows as u64) * dtype.bytes();
        assert!(need <= r.bytes, "{what}: {name} spans {need} bytes of a {}-byte region", r.bytes);
    }
}

#[test]
fn every_launch_binds_small() {
    check("configs/small.toml", 2);
}

/// Also what `--cublas` takes over on the locked config: the LM head's backward (both gradient
/// GEMMs of all eight vocabulary chunks but the last chunk's input gradient, which rounds the
/// f32 accumulator to bf16 in its epilogue) and the dense gradients without a fused epilogue
/// (a weight gradient that also writes its layer's bias gradient is not a plain product).
#[test]
fn every_launch_binds_locked() {
    let blas = check("configs/vpmoe.toml", 1);
    let mut by_kernel = BTreeMap::<&str, usize>::new();
    blas.iter().for_each(|k| *by_kernel.entry(k).or_default() += 1);
    eprintln!("--cublas issues {} launches as cuBLAS calls: {by_kernel:#?}", blas.len());
    let n = |k: &str| by_kernel.get(k).copied().unwrap_or(0);
    // The head's weight gradient: seven full chunks and the last, narrower one.
    assert_eq!(
        n("vp_gemm_tn_N25152_K1024_E0_AMODE0_BRELU20_BIAS0") + n("vp_gemm_tn_N25024_K1024_E0_AMODE0_BRELU20_BIAS0"),
        8
    );
    assert_eq!(n("vp_gemm_nn_N1024_KD25152_E0_AMODE0_EPI0_OUT1"), 7);
    // Every layer's attention output projection: the input gradient; its weight gradient carries
    // the projection's bias gradient and stays generated.
    assert_eq!(n("vp_gemm_nn_N1024_KD1024_E0_AMODE0_EPI0_OUT0"), 80);
    assert_eq!(n("vp_gemm_tn_N1024_K1024_E0_AMODE0_BRELU20_BIAS1"), 0);
}

/// Every launch of the decode program (prefill and step graphs) of the locked and small configs
/// binds inside its arenas, the model copies, the layer's caches and the block table, as
/// `cuda::decode::CudaEngine` lays them out for 4 slots.
#[test]
fn every_decode_launch_binds() {
    const CACHE_BASE: u64 = 1 << 52;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for rel in ["configs/vpmoe.toml", "configs/small.toml"] {
        let (g, plan) = compile_arch(&config::load(&root.join(rel)).unwrap()).unwrap();
        let program = vpmoe_compiler::decode::lower_decode(&g).unwrap();
        let (slots, per_slot) = (4u64, plan.arch.max_seq.div_ceil(vpmoe_codegen::consts::KV_BLOCK));
        let layers: Vec<[Region; 2]> = program
            .caches
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let rows = c.window.map_or(slots * per_slot * vpmoe_codegen::consts::KV_BLOCK, |w| slots * w);
                let bytes = rows * c.width * 2;
                let at = CACHE_BASE + ((2 * i as u64) << 36);
                [at, at + (1 << 36)].map(|addr| Region { addr, bytes, dtype: DType::Bf16 })
            })
            .collect();
        let table = Region { addr: CACHE_BASE - (1 << 36), bytes: slots * per_slot * 4, dtype: DType::I32 };
        let caches = Caches { layers, table, per_slot };
        let allowed: Vec<(u64, u64)> =
            caches.layers.iter().flatten().chain([&table]).map(|r| (r.addr, r.addr + r.bytes)).collect();
        for graph in [&program.prefill, &program.step] {
            let sched = schedule(graph);
            let params: Vec<Region> = graph
                .params
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let e = plan.params.iter().find(|e| e.name == p.name).unwrap();
                    Region {
                        addr: PARAM_BASE + ((i as u64) << 36),
                        bytes: e.numel * e.ty.dtype.bytes(),
                        dtype: e.ty.dtype,
                    }
                })
                .collect();
            let t = 96;
            let lay = Layout {
                graph,
                buffers: &sched.buffers,
                tokens: t,
                seq: t,
                tok_base: TOK_BASE,
                fixed_base: FIXED_BASE,
                params: &params,
                sums: &BTreeMap::new(),
                accumulating: false,
                tickets: TICKETS_BASE,
                caches: Some(&caches),
            };
            let (tok_end, fixed_end) =
                (TOK_BASE + sched.tok_arena_bytes_per_token * t, FIXED_BASE + sched.fixed_arena_bytes);
            let mut cache_launches = 0;
            for (ni, node) in graph.nodes.iter().enumerate() {
                for l in &sched.steps[ni].launches {
                    let b =
                        lay.bind(ni, l, &sched.scratch[ni]).unwrap_or_else(|e| panic!("{rel}: {}: {e:#}", node.name));
                    for p in &b.params {
                        let Param::Ptr(_, Some(r)) = p else { continue };
                        let (lo, hi) = (r.addr, r.addr + r.bytes);
                        let inside = (TOK_BASE <= lo && hi <= tok_end)
                            || (FIXED_BASE <= lo && hi <= fixed_end)
                            || lo == TICKETS_BASE
                            || params.iter().any(|q| q.addr <= lo && hi <= q.addr + q.bytes)
                            || allowed.iter().any(|&(a, z)| a <= lo && hi <= z);
                        assert!(
                            inside,
                            "{rel} {}: {} ({}): region {r:?} outside every allocation",
                            graph.name, node.name, b.kernel
                        );
                    }
                    cache_launches +=
                        b.params.iter().filter(|p| matches!(p, Param::Ptr(a, _) if *a >= CACHE_BASE)).count().min(1);
                }
            }
            assert_eq!(
                cache_launches,
                2 * program.caches.len(),
                "{rel} {}: an attend and a write per layer",
                graph.name
            );
        }
    }
}

/// The checks bite: an argument of the wrong element type or an out-of-range grid is refused.
#[test]
fn mismatches_are_refused() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let (g, plan) = compile_arch(&config::load(&root.join("configs/small.toml")).unwrap()).unwrap();
    let params: Vec<u64> = (0..plan.params.len() as u64).map(|i| PARAM_BASE + (i << 32)).collect();
    let params = param_regions(&plan, &params);
    let lay = Layout {
        graph: &g,
        buffers: &plan.buffers,
        tokens: 256,
        seq: 128,
        tok_base: TOK_BASE,
        fixed_base: FIXED_BASE,
        params: &params,
        sums: &BTreeMap::new(),
        accumulating: false,
        tickets: TICKETS_BASE,
        caches: None,
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

/// The device optimizer's groups (no GPU needed): every trainable parameter in exactly one group,
/// members back to back (so a Normuon family is one `[matrices, rows, cols]` batch), second
/// moments sized `[matrices, rows]`, and the locked config's device footprint. ZeRO-1's shares:
/// every unit in exactly one rank's groups, whole Normuon matrices, the groups of every rank in
/// the same order, each rank's runs of the whole buffers its members' places, and the staging
/// chunks covering each run once.
#[test]
fn optimizer_groups_cover_every_trainable_parameter_once() {
    use vpmoe_runtime::cuda::optim::{chunks, layout, momentum_bytes, planned_bytes, runs, whole_layout, Kind};
    use vpmoe_runtime::dist::zero;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for cfg in ["configs/small.toml", "configs/vpmoe.toml"] {
        let (_, plan) = compile_arch(&config::load(&root.join(cfg)).unwrap()).unwrap();
        let groups = whole_layout(&plan);
        let mut seen = vec![0; plan.params.len()];
        for g in &groups {
            let (mut off, mut v_off) = (0, 0);
            for m in &g.members {
                seen[m.param] += 1;
                assert_eq!((m.lo, m.off, m.v_off, m.len), (0, off, v_off, plan.params[m.param].numel), "{cfg}");
                off += m.len;
                v_off += m.v_len;
            }
            assert_eq!((g.len, g.v_len), (off, v_off));
            if let Kind::Normuon { rows, cols, matrices } = g.kind {
                assert_eq!(g.len, rows * cols * matrices, "{cfg}: family [{rows}, {cols}]");
                assert_eq!(g.v_len, rows * matrices);
            }
        }
        for (p, n) in plan.params.iter().zip(&seen) {
            assert_eq!(*n, p.trainable() as u32, "{cfg}: {}", p.name);
        }
        let units = zero::units(&plan);
        let world = 3;
        let owners = zero::owners(&units, world);
        let mut owned = vec![0; units.len()];
        for r in 0..world {
            let mine = layout(&plan, &units, |k| owners[k] == r);
            assert_eq!(
                mine.iter().map(|g| &g.kind).collect::<Vec<_>>(),
                groups.iter().map(|g| &g.kind).collect::<Vec<_>>()
            );
            let runs = runs(&groups, &mine);
            for ((g, w), runs) in mine.iter().zip(&groups).zip(&runs) {
                let (mut off, mut v_off) = (0, 0);
                for m in &g.members {
                    assert_eq!((m.off, m.v_off), (off, v_off), "{cfg}: rank {r}'s members are back to back");
                    off += m.len;
                    v_off += m.v_len;
                }
                assert_eq!((g.len, g.v_len), (off, v_off));
                if let Kind::Normuon { rows, cols, .. } = g.kind {
                    assert!(g.members.iter().all(|m| m.lo % (rows * cols) == 0 && m.len % (rows * cols) == 0));
                }
                for &k in &g.units {
                    owned[k] += 1;
                }
                // The runs are the members' places in the whole group, joined where adjacent.
                let places: Vec<(u64, u64)> = g
                    .members
                    .iter()
                    .map(|m| (w.members.iter().find(|x| x.param == m.param).unwrap().off + m.lo, m.len))
                    .collect();
                assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), g.len);
                assert!(runs.windows(2).all(|p| p[0].0 + p[0].1 < p[1].0), "{cfg}: runs ascending, apart");
                assert!(places.iter().all(|&(o, n)| runs.iter().any(|&(ro, rn)| ro <= o && o + n <= ro + rn)));
                for cap in [1000, 1 << 26] {
                    let cut = chunks(runs, cap);
                    let mut pos = 0;
                    let mut pieces = Vec::new();
                    for (p, c) in &cut {
                        let n: u64 = c.iter().map(|x| x.1).sum();
                        assert!(*p == pos && n <= cap && n > 0);
                        pos += n;
                        pieces.extend(c.iter().copied());
                    }
                    assert_eq!(pos, g.len);
                    let mut joined: Vec<(u64, u64)> = Vec::new();
                    for (o, n) in pieces {
                        match joined.last_mut() {
                            Some(j) if j.0 + j.1 == o => j.1 += n,
                            _ => joined.push((o, n)),
                        }
                    }
                    assert_eq!(&joined, runs, "{cfg}: the chunks cover the runs once, in order");
                }
            }
        }
        assert!(owned.iter().all(|&n| n == 1), "{cfg}: every unit in exactly one rank's groups");
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        if cfg.ends_with("vpmoe.toml") {
            // 6.02 B parameters × (bf16 copy + fp32 master, gradient sum and first moment) + 1 GiB
            // Polar Express scratch + the second moments (AdamW's for the embedding and head):
            // about 81 GiB, which with the arenas fits an H200, not an 80 GB H100 (docs/gpu.md).
            let b = planned_bytes(&plan, false, None);
            assert!((79.0..84.0).contains(&gib(b)), "{} GiB", gib(b));
            // Whole device footprint at one 2048-token micro-batch. The H100 exposes ≈ 79 GiB;
            // leave 5 GiB for the context, modules and fragmentation.
            let arenas = plan.tok_arena_bytes_per_token * 2048 + plan.fixed_arena_bytes;
            let (device, h100) = (gib(arenas + b), gib(arenas + planned_bytes(&plan, true, None)));
            assert!(device > 80.0 && device < 130.0, "{device} GiB: an H200, not an H100");
            assert!(h100 < 74.0, "--host-momentum needs {h100} GiB: does not fit an 80 GB H100");
            assert!(gib(momentum_bytes(&plan, None)) > 18.0);
            // ZeRO-1 at 8 GPUs: each rank's largest share of the masters and moments, against the
            // compiler's report of the same (plus the rank's own gradient sums, model copies and
            // the staging buffer).
            let dp = vpmoe_compiler::report::data_parallel(&plan, 8);
            let most = (0..8).map(|r| planned_bytes(&plan, false, Some((r, 8)))).max().unwrap();
            let m = &dp.memory;
            let report = m.weights + m.gradients + m.masters + m.optimizer_state;
            eprintln!(
                "locked config at 2048 tokens: {device:.2} GiB, {h100:.2} GiB with --host-momentum; ZeRO-1 at 8: \
                 optimizer {:.2} GiB per rank (report {:.2})",
                gib(most),
                gib(report)
            );
            // The whole model's gradient sums (22.4 GiB) and bf16 copies (11.2 GiB) stay on every rank.
            assert!(
                gib(b) - gib(most) > 30.0,
                "ZeRO-1 at 8 ranks keeps {:.2} GiB of {:.2} per rank",
                gib(most),
                gib(b)
            );
            assert!(most >= report && gib(most - report) < 8.0, "{} vs {}", gib(most), gib(report));
        }
    }
}

/// `--cublas`'s mapping, without a GPU: each plain-product launch shape (odd sizes, output and
/// operand row strides wider than the matrix, f32 and bf16 outputs, storing and accumulating)
/// is bound to host buffers, lowered to its `cublasGemmEx` arguments, and those are evaluated
/// with cuBLAS's column-major semantics; the result must equal the family's row-major contract
/// (gemm.cuh, gemm_nn.cuh, gemm_tn.cuh). Small integers keep every value exact in bf16.
#[test]
fn cublas_calls_compute_what_the_kernels_compute() {
    use half::bf16;
    use vpmoe_codegen::KernelSpec;
    use vpmoe_runtime::cuda::bind::Bound;

    fn ints(n: usize, seed: usize) -> Vec<bf16> {
        (0..n).map(|i| bf16::from_f32(((i * 7 + seed * 13) % 11) as f32 - 5.0)).collect()
    }
    fn region<T>(v: &[T], dtype: DType) -> Param {
        let r = Region { addr: v.as_ptr() as u64, bytes: std::mem::size_of_val(v) as u64, dtype };
        Param::Ptr(r.addr, Some(r))
    }
    /// An output: its address comes from a mutable borrow (the call writes through it).
    fn dst<T>(v: &mut [T], dtype: DType) -> Param {
        let r = Region { addr: v.as_mut_ptr() as u64, bytes: std::mem::size_of_val(v) as u64, dtype };
        Param::Ptr(r.addr, Some(r))
    }
    /// cublasGemmEx's reference semantics on host memory.
    fn run(g: &Gemm) {
        let at = |p: u64, i: usize| unsafe { (*(p as *const bf16).add(i)).to_f32() as f64 };
        for j in 0..g.n as usize {
            for i in 0..g.m as usize {
                let mut s = 0f64;
                for l in 0..g.k as usize {
                    let a = if g.ta { at(g.a, i * g.lda as usize + l) } else { at(g.a, l * g.lda as usize + i) };
                    let b = if g.tb { at(g.b, l * g.ldb as usize + j) } else { at(g.b, j * g.ldb as usize + l) };
                    s += a * b;
                }
                let o = j * g.ldc as usize + i;
                unsafe {
                    if g.c_f32 {
                        let c = (g.c as *mut f32).add(o);
                        *c = (s + g.beta as f64 * *c as f64) as f32;
                    } else {
                        let c = (g.c as *mut bf16).add(o);
                        *c = bf16::from_f64(s + g.beta as f64 * (*c).to_f64());
                    }
                }
            }
        }
    }
    let bound = |family: &str, targs: &[u64], params: Vec<Param>, z: u32| {
        let spec = KernelSpec { family: family.into(), targs: targs.to_vec() };
        let b = Bound { kernel: spec.name(), grid: [1, 1, z], block: 128, params };
        let g = lower(&spec, &b).unwrap_or_else(|| panic!("{} is a plain product", b.kernel));
        run(&g);
    };
    let f = |x: bf16| x.to_f32();

    // gemm: Y[M, N] = X[M, KD]·W[N, KD]ᵀ into a wider output (ldy > N), bf16 and f32.
    let (m, n, kd, ldy) = (3usize, 5usize, 7usize, 9usize);
    let (x, w) = (ints(m * kd, 1), ints(n * kd, 2));
    for out in [0u64, 1] {
        let mut yb = vec![bf16::from_f32(99.0); m * ldy];
        let mut yf = vec![99f32; m * ldy];
        let y = if out == 1 { dst(&mut yf, DType::F32) } else { dst(&mut yb, DType::Bf16) };
        let ps = vec![
            region(&x, DType::Bf16),
            region(&w, DType::Bf16),
            Param::Ptr(0, None),
            Param::Ptr(0, None),
            y,
            Param::I32(m as i32),
            Param::I32(ldy as i32),
        ];
        bound("gemm", &[n as u64, kd as u64, 0, out], ps, 1);
        for r in 0..m {
            for c in 0..ldy {
                let want = if c < n { (0..kd).map(|k| f(x[r * kd + k]) * f(w[c * kd + k])).sum() } else { 99.0 };
                let got = if out == 1 { yf[r * ldy + c] } else { f(yb[r * ldy + c]) };
                assert_eq!(got, want, "gemm OUT{out} ({r}, {c})");
            }
        }
    }

    // gemm_nn: Y[M, N] = A[M, KD] (row stride lda)·W[KD, N], stored in bf16, then added in place
    // into an f32 accumulator (acc = y).
    let (m, n, kd, lda, ldy) = (4usize, 6usize, 5usize, 8usize, 7usize);
    let (a, w) = (ints(m * lda, 3), ints(kd * n, 4));
    let prod = |r: usize, c: usize| (0..kd).map(|k| f(a[r * lda + k]) * f(w[k * n + c])).sum::<f32>();
    let mut yb = vec![bf16::from_f32(99.0); m * ldy];
    let nn = |acc: Param, y: Param, out: u64| {
        let ps = vec![
            region(&a, DType::Bf16),
            Param::Ptr(0, None),
            region(&w, DType::Bf16),
            acc,
            Param::Ptr(0, None),
            y,
            Param::I32(m as i32),
            Param::I32(lda as i32),
            Param::I32(ldy as i32),
        ];
        bound("gemm_nn", &[n as u64, kd as u64, 0, 0, 0, out], ps, 1);
    };
    nn(Param::Ptr(0, None), dst(&mut yb, DType::Bf16), 0);
    let mut yf: Vec<f32> = (0..m * ldy).map(|i| i as f32).collect();
    let acc = dst(&mut yf, DType::F32);
    nn(acc, acc, 1);
    for r in 0..m {
        for c in 0..ldy {
            let (want_b, want_f) =
                if c < n { (prod(r, c), prod(r, c) + (r * ldy + c) as f32) } else { (99.0, (r * ldy + c) as f32) };
            assert_eq!(f(yb[r * ldy + c]), want_b, "gemm_nn store ({r}, {c})");
            assert_eq!(yf[r * ldy + c], want_f, "gemm_nn accumulate ({r}, {c})");
        }
    }

    // gemm_tn: Y[N, K] (+)= A[M, N]ᵀ·B[M, K] with row strides lda, ldb, stored (accum 0) and
    // added into a gradient sum (accum 1).
    let (m, n, k, lda, ldb) = (5usize, 4usize, 6usize, 7usize, 9usize);
    let (a, b) = (ints(m * lda, 5), ints(m * ldb, 6));
    let prod = |i: usize, j: usize| (0..m).map(|r| f(a[r * lda + i]) * f(b[r * ldb + j])).sum::<f32>();
    for accum in [0, 1] {
        let mut y: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let ps = vec![
            region(&a, DType::Bf16),
            region(&b, DType::Bf16),
            Param::Ptr(0, None),
            Param::Ptr(0, None),
            dst(&mut y, DType::F32),
            Param::I32(m as i32),
            Param::I32(lda as i32),
            Param::I32(ldb as i32),
            Param::I32(accum),
        ];
        bound("gemm_tn", &[n as u64, k as u64, 0, 0, 0, 0], ps, 1);
        for i in 0..n {
            for j in 0..k {
                assert_eq!(
                    y[i * k + j],
                    prod(i, j) + accum as f32 * (i * k + j) as f32,
                    "gemm_tn accum {accum} ({i}, {j})"
                );
            }
        }
    }

    // Not plain products: these keep their generated kernels.
    let spec = |family: &str, targs: &[u64]| KernelSpec { family: family.into(), targs: targs.to_vec() };
    let nulls = |n: usize| vec![Param::Ptr(0, None); n];
    let with_ints = |mut p: Vec<Param>, ints: &[i32]| {
        p.extend(ints.iter().map(|&i| Param::I32(i)));
        p
    };
    let b =
        |family: &str, params: Vec<Param>, z: u32| Bound { kernel: family.into(), grid: [1, 1, z], block: 128, params };
    assert!(lower(&spec("gemm", &[8, 8, 1, 0]), &b("gemm", with_ints(nulls(5), &[4, 8]), 1)).is_none(), "ReLU²");
    assert!(
        lower(&spec("gemm_nn", &[8, 8, 4, 0, 0, 0]), &b("gemm_nn", with_ints(nulls(6), &[4, 8, 8]), 1)).is_none(),
        "grouped"
    );
    assert!(
        lower(&spec("gemm_tn", &[8, 8, 0, 1, 0, 0]), &b("gemm_tn", with_ints(nulls(5), &[4, 8, 8, 0]), 1)).is_none(),
        "f32 split A"
    );
    assert!(
        lower(&spec("gemm_tn", &[8, 8, 0, 0, 0, 0]), &b("gemm_tn", with_ints(nulls(5), &[4, 8, 8, 0]), 4)).is_none(),
        "split-K partials"
    );
    assert!(
        lower(&spec("gemm_tn", &[8, 8, 0, 0, 0, 1]), &b("gemm_tn", with_ints(nulls(5), &[4, 8, 8, 0]), 1)).is_none(),
        "fused bias gradient"
    );
}
