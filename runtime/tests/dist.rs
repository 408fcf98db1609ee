//! Data parallel training on the cpu backend with the TCP collective: ranks as threads (one
//! process, one TCP connection per rank, as between processes) and as processes (`launch`, a
//! killed rank).

mod common;

use common::Trained;
use common::{compiled, free_port, on_ranks, rank, root, run_config, sample_data_for, tmp};
use std::path::PathBuf;
use std::time::Duration;
use vpmoe_runtime::checkpoint;
use vpmoe_runtime::cpu::CpuBackend;
use vpmoe_runtime::dist::tcp::TcpCollective;
use vpmoe_runtime::dist::Collective;
use vpmoe_runtime::state::TrainState;
use vpmoe_runtime::train::{RunOptions, TrainConfig};

#[test]
fn collectives_reduce_in_rank_order_and_refuse_mismatches() {
    // Values whose f32 sum depends on the order: rank order is ((x0 + x1) + x2).
    let parts = [1.0e8f32, -1.0e8, 1.0];
    let out = on_ranks(3, |d| {
        let r = d.rank.rank;
        let mut x = vec![parts[r], r as f32, 0.1 * (r + 1) as f32];
        d.all_reduce_f32(&mut x).unwrap();
        let mut u = [r as u64 + 1, 10];
        d.all_reduce_u64(&mut u).unwrap();
        let mut f = [0.1f64 * r as f64];
        d.all_reduce_f64(&mut f).unwrap();
        let rs = d.reduce_scatter_f32(&[1.0 + r as f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 2, 3]).unwrap();
        let ag = d.all_gather_f32(&vec![r as f32; r + 1], &[1, 2, 3]).unwrap();
        let mut b = if r == 1 { b"from one".to_vec() } else { Vec::new() };
        d.broadcast(&mut b, 1).unwrap();
        d.barrier().unwrap();
        assert!(d.any(r == 2).unwrap() && !d.any(false).unwrap());
        (x, u, f, rs, ag, b)
    });
    let want0 = (parts[0] + parts[1]) + parts[2];
    for (r, (x, u, f, rs, ag, b)) in out.iter().enumerate() {
        assert_eq!(x[0].to_bits(), want0.to_bits(), "rank {r}");
        assert_eq!(x[1], 3.0);
        assert_eq!(x[2].to_bits(), ((0.1f32 + 0.2) + 0.3f32).to_bits());
        assert_eq!(u, &[6, 30]);
        assert_eq!(f[0].to_bits(), ((0.0 + 0.1) + 0.2f64).to_bits());
        let want_rs: Vec<f32> = match r {
            0 => vec![6.0],
            1 => vec![6.0, 9.0],
            _ => vec![12.0, 15.0, 18.0],
        };
        assert_eq!(rs, &want_rs);
        assert_eq!(ag, &[0.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert_eq!(b, b"from one");
    }
    // Ranks that disagree on a buffer's length fail, all of them, saying which rank.
    let errs = on_ranks(2, |d| {
        let mut x = vec![0.0f32; 3 + d.rank.rank];
        format!("{:#}", d.all_reduce_f32(&mut x).unwrap_err())
    });
    for e in &errs {
        assert!(e.contains("rank 1 contributed 4 elements, rank 0 3"), "{e}");
    }
}

/// A rank that never arrives is named by the others within the timeout.
#[test]
fn a_silent_rank_is_named_within_the_timeout() {
    let port = free_port();
    let t0 = std::time::Instant::now();
    let errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|r| {
                s.spawn(move || {
                    let rk = rank(r, 3, port);
                    let c = TcpCollective::connect(&rk, Duration::from_secs(2)).unwrap();
                    if r == 2 {
                        // Holds its connection open and never joins the collective.
                        std::thread::sleep(Duration::from_secs(4));
                        return String::new();
                    }
                    format!("{:#}", c.barrier().unwrap_err())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(t0.elapsed() < Duration::from_secs(30));
    for e in &errs[..2] {
        assert!(e.contains("rank 2 did not reach collective #1"), "{e}");
    }
}

/// The trainings compared here: every feature at toy size (MoE layers with stacked experts and
/// expert biases, Normuon families and AdamW parameters), quick on two cores.
const ARCH: &str = "tests/configs/tiny_moe.toml";

fn base(steps: u64, grad_accum: usize, dir: PathBuf) -> (TrainConfig, RunOptions) {
    let (mut cfg, mut opts) = run_config(steps, 2, 32, dir);
    cfg.grad_accum = grad_accum;
    opts.keep = 10;
    (cfg, opts)
}

/// `world` ranks train `cfg` into `dir` (rank 0's outcome; every rank's final state is checked
/// to be the same).
fn train_on(world: usize, shard: bool, cfg: &TrainConfig, opts: &RunOptions, init_seed: u64) -> Trained {
    let (g, plan) = compiled(ARCH);
    let data = sample_data_for(512);
    let mut outs = on_ranks(world, |dist| {
        let mut opts = opts.clone();
        (opts.dist, opts.shard_optimizer) = (dist, shard);
        let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, init_seed));
        common::train(&mut be, &plan, &data, cfg, &opts).unwrap()
    });
    for (r, o) in outs.iter().enumerate().skip(1) {
        assert_eq!(o.state.checksum(), outs[0].state.checksum(), "rank {r} ends with rank 0's model");
    }
    outs.swap_remove(0)
}

/// The largest |a − b| over every master, relative to the largest |a|.
fn master_gap(a: &TrainState, b: &TrainState) -> f64 {
    let (mut d, mut m) = (0f64, 0f64);
    for (x, y) in a.master.iter().zip(&b.master) {
        for (p, q) in x.iter().zip(y) {
            d = d.max((p - q).abs() as f64);
            m = m.max(p.abs() as f64);
        }
    }
    d / m
}

/// Losses of two runs of the same global batches agree to [`LOSS_TOL`] (relative) and masters
/// to [`MASTER_TOL`] (relative to the largest master).
fn assert_tracks(a: &Trained, b: &Trained, what: &str) {
    assert_eq!(a.records.len(), b.records.len());
    let diffs: Vec<String> = a
        .records
        .iter()
        .zip(&b.records)
        .map(|(x, y)| format!("{:.1e}", (x.loss - y.loss).abs() / x.loss.abs()))
        .collect();
    eprintln!(
        "{what}: losses differ by {} (per step); masters by {:.2e}",
        diffs.join(" "),
        master_gap(&a.state, &b.state)
    );
    for (x, y) in a.records.iter().zip(&b.records) {
        let d = (x.loss - y.loss).abs() / x.loss.abs();
        assert!(d <= LOSS_TOL, "{what}: step {} loss {} vs {} ({d:.1e})", x.step, x.loss, y.loss);
        assert_eq!((x.tokens_reasoning, x.tokens_final), (y.tokens_reasoning, y.tokens_final), "{what}: same batch");
    }
    let gap = master_gap(&a.state, &b.state);
    assert!(gap <= MASTER_TOL, "{what}: masters differ by {gap:.2e} of the largest");
}

/// Ranks add a step's micro-batch gradients in another grouping than one rank's loop
/// (`(g0+g1)+(g2+g3)` against `((g0+g1)+g2)+g3`), so each fp32 sum moves by a few units in its
/// last place (2⁻²⁴ ≈ 6·10⁻⁸ relative), and the updates with it; masters near a bf16 rounding
/// boundary then flip their model copies by one bf16 step (2⁻⁸), and those flips compound step
/// by step. Measured on [`ARCH`] (3 steps of 8 micro-batches): step 1 equal, step 3 at most
/// 8·10⁻⁸ relative in the loss, masters 3·10⁻⁸ of the largest. The bounds allow about 100× and
/// 30× that; losing one of two ranks' gradients moves step 2's loss by 1.6·10⁻³ and the masters
/// by 2.6·10⁻⁴ — 160× and 260× past them.
const LOSS_TOL: f64 = 1e-5;
const MASTER_TOL: f64 = 1e-6;

#[test]
fn world_sizes_one_two_and_four_train_the_same_model() {
    // Two micro-batches per rank at world 4: every world size groups the sums its own way.
    let (cfg, opts) = base(3, 8, PathBuf::new());
    let dirs: Vec<PathBuf> = ["w1", "w2", "w4", "w2-again"].iter().map(|d| tmp(d)).collect();
    let run = |world: usize, dir: &PathBuf| {
        let mut o = opts.clone();
        o.ckpt_dir = dir.clone();
        train_on(world, true, &cfg, &o, cfg.seed)
    };
    let one = run(1, &dirs[0]);
    let two = run(2, &dirs[1]);
    let four = run(4, &dirs[2]);
    assert_tracks(&one, &two, "world 2 against world 1");
    assert_tracks(&one, &four, "world 4 against world 1");
    // Bitwise run to run at a world size.
    let again = run(2, &dirs[3]);
    assert_eq!(two.state, again.state);
    for (x, y) in two.records.iter().zip(&again.records) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits());
        assert_eq!(x.grad_norm.to_bits(), y.grad_norm.to_bits());
    }
    // Only rank 0 logs.
    let log = std::fs::read_to_string(dirs[1].join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn zero1_is_bitwise_the_replicated_optimizer() {
    let (cfg, opts) = base(3, 4, PathBuf::new());
    for world in [2, 4] {
        let mut o = opts.clone();
        let (zdir, rdir) = (tmp(&format!("z{world}")), tmp(&format!("r{world}")));
        o.ckpt_dir = zdir.clone();
        let sharded = train_on(world, true, &cfg, &o, cfg.seed);
        o.ckpt_dir = rdir.clone();
        let replicated = train_on(world, false, &cfg, &o, cfg.seed);
        assert_eq!(sharded.state, replicated.state, "world {world}: masters and moments");
        for (x, y) in sharded.records.iter().zip(&replicated.records) {
            assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "world {world} step {}", x.step);
            assert_eq!(x.grad_norm.to_bits(), y.grad_norm.to_bits(), "world {world} step {}", x.step);
        }
        // The checkpoint holds the whole state, as one rank writes it.
        let (_, st) = checkpoint::load(&checkpoint::latest(&o.ckpt_dir).unwrap().unwrap(), &compiled(ARCH).1).unwrap();
        assert_eq!(st, replicated.state);
        let file = |d: &PathBuf| std::fs::read(checkpoint::latest(d).unwrap().unwrap().join("state.safetensors"));
        assert!(file(&zdir).unwrap() == file(&rdir).unwrap(), "world {world}: the same file");
        for d in [zdir, rdir] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[test]
fn a_checkpoint_of_world_two_resumes_at_one_two_and_four() {
    let (cfg, opts) = base(6, 4, PathBuf::new());
    let mut o = opts.clone();
    o.ckpt_dir = tmp("straight2");
    let straight = train_on(2, true, &cfg, &o, cfg.seed);
    o.ckpt_dir = tmp("saved2");
    o.save_every = 3;
    train_on(2, true, &cfg, &o, cfg.seed);
    let saved = o.ckpt_dir.clone();
    let tail = |world: usize| {
        let dir = tmp(&format!("resume-at-{world}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let from = saved.join("step_00000003");
        copy_dir(&from, &dir.join("step_00000003"));
        let mut o = opts.clone();
        (o.ckpt_dir, o.resume) = (dir.clone(), true);
        let out = train_on(world, true, &cfg, &o, 999);
        let _ = std::fs::remove_dir_all(&dir);
        out
    };
    let same = tail(2);
    assert_eq!(same.records.len(), 3);
    assert_eq!(same.state, straight.state, "resume at the same world size is bitwise");
    for (x, y) in straight.records[3..].iter().zip(&same.records) {
        assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "step {}", x.step);
    }
    let cut = Trained {
        out: vpmoe_runtime::train::Outcome { records: straight.records[3..].to_vec(), ..straight.out },
        ..straight
    };
    assert_tracks(&cut, &tail(1), "world 2 → 1");
    assert_tracks(&cut, &tail(4), "world 2 → 4");
    for d in ["straight2", "saved2"] {
        let _ = std::fs::remove_dir_all(tmp(d));
    }
}

/// Ranks write one checkpoint, each its part (a ZeRO-1 shard or its share of a whole state),
/// byte for byte the file one process writes — which is the safetensors crate's serialisation.
#[test]
fn ranks_write_one_checkpoint_in_the_safetensors_layout() {
    use safetensors::tensor::{Dtype, TensorView};
    use vpmoe_runtime::checkpoint::Part;
    use vpmoe_runtime::dist::zero::{self, Shard};
    let (_, plan) = compiled(ARCH);
    let mut st = TrainState::init(&plan, 7);
    // Moments unlike each other and the masters, so a misplaced slice shows.
    for (i, (m, v)) in st.m.iter_mut().zip(&mut st.v).enumerate() {
        m.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 1000 + j) as f32 * 1e-3);
        v.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 7 + j) as f32 * 1e-2 + 0.5);
    }
    st.step = 5;
    let mut meta = checkpoint::step0_meta(&plan, serde_json::json!({"test": true}), 1, Default::default());
    meta.step = 5;
    let file = |dir: &PathBuf, f: &str| std::fs::read(dir.join("step_00000005").join(f)).unwrap();
    let one = tmp("ckpt-one");
    checkpoint::save(&one, &plan, &st, meta.clone(), 1).unwrap();
    let bytes = file(&one, "state.safetensors");
    let mut bufs = Vec::new();
    for (i, p) in plan.params.iter().enumerate() {
        let shape = p.ty.shape(0);
        let f32s = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        let model = if p.ty.dtype == vpmoe_ir::DType::Bf16 {
            let b: Vec<u16> = st.master[i].iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            (Dtype::BF16, bytemuck::cast_slice::<u16, u8>(&b).to_vec())
        } else {
            (Dtype::F32, f32s(&st.master[i]))
        };
        bufs.push((format!("model/{}", p.name), model.0, shape.clone(), model.1));
        bufs.push((format!("master/{}", p.name), Dtype::F32, shape.clone(), f32s(&st.master[i])));
        if !st.m[i].is_empty() {
            let vshape = if st.v[i].len() == st.m[i].len() { shape.clone() } else { vec![st.v[i].len()] };
            bufs.push((format!("opt.m/{}", p.name), Dtype::F32, shape, f32s(&st.m[i])));
            bufs.push((format!("opt.v/{}", p.name), Dtype::F32, vshape, f32s(&st.v[i])));
        }
    }
    let views: Vec<(String, TensorView)> =
        bufs.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let md = std::collections::HashMap::from([("step".to_string(), "5".to_string())]);
    assert!(bytes == safetensors::serialize(views, Some(md)).unwrap(), "the safetensors crate's bytes");
    let (_, back) = checkpoint::load(&one.join("step_00000005"), &plan).unwrap();
    assert_eq!(back, st);
    for (world, sharded) in [(2, false), (3, true), (4, true)] {
        let dir = tmp(&format!("ckpt-{world}"));
        // What an interrupted save leaves behind goes with the next save.
        let stale = dir.join(".step_00000003.tmp-99999");
        std::fs::create_dir_all(&stale).unwrap();
        let sums = on_ranks(world, |dist| {
            let (units, keep) = (zero::units(&plan), st.clone());
            let shard = Shard::take(&units, &zero::owners(&units, world), dist.rank.rank, &st);
            let mut rest = st.clone();
            for i in (0..plan.params.len()).filter(|&i| plan.params[i].trainable()) {
                (rest.master[i], rest.m[i], rest.v[i]) = Default::default();
            }
            let part = if sharded { Part::Shard(&shard, &rest) } else { Part::Whole(&keep) };
            let saved = checkpoint::save_part(&dir, &plan, part, meta.clone(), 1, &dist).unwrap();
            // ZeRO-1's resume reads every master and this rank's share of the moments.
            let (m, masters, back) = checkpoint::load_share(&saved.0, &plan, &dist).unwrap();
            assert_eq!((m.step, &masters.master), (5, &st.master));
            assert!(masters.m.iter().chain(&masters.v).all(Vec::is_empty));
            let same =
                (&back.units, &back.master, &back.m, &back.v) == (&shard.units, &shard.master, &shard.m, &shard.v);
            assert!(same, "world {world} rank {}: the share read is the share written", dist.rank.rank);
            saved
        });
        for (p, sum) in sums {
            assert_eq!((p, sum), (dir.join("step_00000005"), st.checksum()), "world {world}: path and checksum");
        }
        assert!(file(&dir, "state.safetensors") == bytes, "world {world}: the one-process file");
        assert_eq!(file(&dir, "meta.json"), file(&one, "meta.json"), "world {world}");
        assert!(!stale.exists(), "world {world}: the stale temporary directory is removed");
        if world == 3 {
            // A damaged file: rank 0 alone hashes it, and every rank refuses it.
            let f = dir.join("step_00000005").join("state.safetensors");
            let mut b = std::fs::read(&f).unwrap();
            let n = b.len();
            b[n - 5] ^= 0x10;
            std::fs::write(&f, b).unwrap();
            let errs = on_ranks(3, |dist| {
                format!("{:#}", checkpoint::load_share(&dir.join("step_00000005"), &plan, &dist).unwrap_err())
            });
            assert!(errs[0].contains("do not match the checksum"), "{}", errs[0]);
            assert!(errs[1..].iter().all(|e| e.contains("rank 0 found it damaged")), "{errs:?}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_dir_all(one);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// A global batch the ranks cannot share equally is refused before anything runs.
#[test]
fn a_batch_the_ranks_cannot_share_is_refused() {
    let (cfg, opts) = base(2, 3, tmp("uneven"));
    let (g, plan) = compiled(ARCH);
    let data = sample_data_for(512);
    let errs = on_ranks(2, |dist| {
        let mut o = opts.clone();
        o.dist = dist;
        let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, 1));
        format!("{:#}", common::train(&mut be, &plan, &data, &cfg, &o).unwrap_err())
    });
    for e in errs {
        assert!(e.contains("--grad-accum 3") && e.contains("multiple of the world size 2"), "{e}");
    }
}

fn train_cmd(dir: &std::path::Path, steps: u64, grad_accum: usize) -> Vec<String> {
    let data = sample_data_for(512)[0].0.display().to_string();
    let mut v: Vec<String> = ["train", "--backend", "cpu", "--arch", ARCH, "--seq-len", "32", "--micro-batch", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(["--grad-accum".into(), grad_accum.to_string(), "--steps".into(), steps.to_string(), "--warmup".into()]);
    v.push("1".into());
    v.extend(["--eval-every".into(), "0".into(), "--save-every".into(), "1".into()]);
    v.extend(["--ckpt-dir".into(), dir.display().to_string(), "--data".into(), data]);
    v
}

/// `vpmoe-rt launch` runs a job of processes; its checkpoint is the one a thread job writes.
#[test]
fn launch_runs_ranks_as_processes() {
    let dir = tmp("launch");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vpmoe-rt"))
        .current_dir(root())
        .args(["launch", "--nproc", "2", "--"])
        .args(train_cmd(&dir, 2, 4))
        .output()
        .unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(so.contains("data parallel: 2 ranks") && so.contains("ZeRO-1"), "{so}");
    assert_eq!(so.matches("learning rates:").count(), 1, "only rank 0 prints: {so}");
    let log = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Killing one rank ends every other rank with an error naming it, within the timeout, and
/// leaves the last checkpoint whole.
#[test]
fn a_killed_rank_ends_the_job_and_is_named() {
    let dir = tmp("killed");
    let port = free_port().to_string();
    let world = 3;
    let mut ranks: Vec<std::process::Child> = (0..world)
        .map(|r| {
            std::process::Command::new(env!("CARGO_BIN_EXE_vpmoe-rt"))
                .current_dir(root())
                .args(train_cmd(&dir, 1000, 3))
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("VPMOE_DIST_TIMEOUT", "20")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let metrics = dir.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map(|s| s.lines().count()).unwrap_or(0) < 2 {
        assert!(t0.elapsed().as_secs() < 300, "no step finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    ranks[2].kill().unwrap();
    let killed_at = std::time::Instant::now();
    for (r, child) in ranks.into_iter().enumerate().take(2) {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "rank {r} went on");
        assert!(err.contains("rank 2 exited"), "rank {r}: {err}");
    }
    assert!(killed_at.elapsed() < Duration::from_secs(60), "the ranks took {:?} to stop", killed_at.elapsed());
    let last = checkpoint::latest(&dir).unwrap().expect("a checkpoint");
    checkpoint::load(&last, &compiled(ARCH).1).expect("the last checkpoint is whole");
    let _ = std::fs::remove_dir_all(&dir);
}

/// NCCL loads, reports its version and makes a unique id without a GPU, and rank 0's id reaches
/// every rank over the rendezvous (everything of communicator creation short of the device).
#[test]
fn nccl_binds_and_shares_its_unique_id_without_a_gpu() {
    use vpmoe_runtime::dist::nccl;
    if let Err(e) = nccl::check_loadable() {
        assert!(std::env::var_os("VPMOE_FULL").is_none(), "the full tier needs NCCL: {e:#}");
        eprintln!("SKIPPED: {e:#}");
        return;
    }
    let (major, minor, _) = nccl::version().unwrap();
    assert_eq!((major, minor), (2, 30), "the NCCL cudarc binds");
    let ids = on_ranks(3, |d| nccl::shared_id(&d).map(|id| id.internal().map(|c| c as u8).to_vec()).unwrap());
    assert_eq!(ids[0].len(), 128);
    assert!(ids[0].iter().any(|&b| b != 0));
    assert!(ids.iter().all(|id| *id == ids[0]), "every rank has rank 0's id");
    assert_ne!(nccl::unique_id().unwrap(), ids[0], "a fresh id each time");
}
