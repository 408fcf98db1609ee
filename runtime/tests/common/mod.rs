//! Shared by the training tests of both backends (`train.rs`, `cuda.rs`): paths, compiled
//! configs, the bundled sample dataset and one run configuration.
#![allow(dead_code)] // each test binary uses a subset

pub mod fake_teacher;

use std::path::{Path, PathBuf};
use vpmoe_compiler::{compile_arch, config, Plan};
use vpmoe_ir::Graph;
use vpmoe_runtime::bundled_sample_dataset;
use vpmoe_runtime::dist::{tcp::TcpCollective, Dist, Rank};
use vpmoe_runtime::state::TrainState;
use vpmoe_runtime::train::{Outcome, RunOptions, TrainConfig};

/// The repository root: where the test binary was built, unless `VPMOE_REPO_ROOT` says otherwise
/// (a binary carried to a GPU machine by `scripts/gpu-bundle` runs in another checkout).
pub fn root() -> PathBuf {
    match std::env::var_os("VPMOE_REPO_ROOT") {
        Some(r) => PathBuf::from(r),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf(),
    }
}

pub fn compiled(rel: &str) -> (Graph, Plan) {
    compile_arch(&config::load(&root().join(rel)).unwrap()).unwrap()
}

/// A fresh temporary directory named after the test binary, `name` and this process. The first
/// call removes the directories earlier runs of this binary left (their process is gone), so
/// checkpoints of failed or interrupted runs do not pile up.
pub fn tmp(name: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    let prefix = format!("vpmoe-{}-", env!("CARGO_CRATE_NAME"));
    SWEEP.call_once(|| {
        for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            let pid = n.strip_prefix(&prefix).and_then(|r| r.rsplit('-').next()).and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let d = std::env::temp_dir().join(format!("{prefix}{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The bundled SYNTH sample as a token dataset, built once per test binary.
pub fn sample_data() -> Vec<(PathBuf, f64)> {
    static DATA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    vec![(DATA.get_or_init(|| bundled_sample_dataset(&tmp("data"), 256).unwrap()).clone(), 1.0)]
}

/// The bundled sample for a model with `vocab` entries: the sample itself for the o200k
/// vocabulary, else a copy whose token ids are taken modulo `vocab` (toy configs on the host
/// emulator, where an o200k LM head would take minutes per launch).
pub fn sample_data_for(vocab: u64) -> Vec<(PathBuf, f64)> {
    let sample = sample_data();
    if vocab == vpmoe_data::tokenizer::VOCAB_SIZE as u64 {
        return sample;
    }
    static COPIES: std::sync::Mutex<Vec<(u64, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut copies = COPIES.lock().unwrap();
    if let Some((_, p)) = copies.iter().find(|(v, _)| *v == vocab) {
        return vec![(p.clone(), 1.0)];
    }
    let out = tmp(&format!("data-mod-{vocab}"));
    copy_mod(&sample[0].0, &out, vocab);
    copies.push((vocab, out.clone()));
    vec![(out, 1.0)]
}

fn copy_mod(from: &Path, to: &Path, vocab: u64) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_mod(&p, &dst, vocab);
        } else if p.file_name().is_some_and(|n| n == "manifest.json") {
            // The copy's ids fit `vocab`: its manifest says so (the trainer checks it).
            let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            m["tokenizer"]["vocab_size"] = vocab.into();
            std::fs::write(&dst, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        } else if p.to_string_lossy().ends_with("_tokens.bin") {
            let b = std::fs::read(&p).unwrap();
            let ids = b.chunks_exact(4).map(|c| (i32::from_le_bytes(c.try_into().unwrap()) as u64 % vocab) as i32);
            std::fs::write(&dst, ids.flat_map(i32::to_le_bytes).collect::<Vec<u8>>()).unwrap();
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

/// `steps` steps of 2 micro-batches of `micro_batch × seq_len` tokens, cosine schedule, seed 5,
/// no evaluation or periodic checkpoints, into `ckpt_dir`.
pub fn run_config(steps: u64, micro_batch: usize, seq_len: usize, ckpt_dir: PathBuf) -> (TrainConfig, RunOptions) {
    let schedule = vpmoe_ir::optim::Schedule {
        lr: 0.02,
        min_lr: 0.002,
        warmup: 2,
        total: steps,
        decay: vpmoe_ir::optim::DecayStyle::Cosine,
        wsd_decay: 0,
    };
    let cfg = TrainConfig {
        micro_batch,
        grad_accum: 2,
        seq_len,
        seed: 5,
        schedule,
        aux_lr: 0.004,
        aux_min_lr: 0.0004,
        weight_decay: 0.01,
        clip: 1.0,
        span_weights: [1.0, 1.0],
        kd: Default::default(),
        init_sha256: None,
        opd: None,
    };
    let opts = RunOptions {
        steps,
        ckpt_dir,
        resume: false,
        eval_every: 0,
        eval_batches: 1,
        save_every: 0,
        keep: 2,
        progress: false,
        print_every: 0,
        profile_steps: None,
        opd: None,
        canary: None,
        eval_prompts: None,
        dist: Default::default(),
        shard_optimizer: false,
    };
    (cfg, opts)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Rank `rank` of `world` meeting at 127.0.0.1:`port`.
pub fn rank(rank: usize, world: usize, port: u16) -> Rank {
    let master = format!("127.0.0.1:{port}");
    Rank { rank, world, local_rank: rank, local_world: world, master, launcher: "test" }
}

/// Runs `f(dist)` on `world` ranks (threads, each with its own TCP connection as between
/// processes) joined by the TCP collective; results in rank order.
pub fn on_ranks<T: Send>(world: usize, f: impl Fn(Dist) -> T + Sync) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|r| {
                let f = &f;
                s.spawn(move || {
                    let rk = rank(r, world, port);
                    let dist = match world {
                        1 => Dist::single(),
                        _ => {
                            let comm = TcpCollective::connect(&rk, std::time::Duration::from_secs(60)).unwrap();
                            Dist::new(rk, std::sync::Arc::new(comm))
                        }
                    };
                    f(dist)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A run's outcome and the backend's state after it (a collective on a data-parallel rank).
#[derive(Debug)]
pub struct Trained {
    pub out: Outcome,
    pub state: TrainState,
}

impl std::ops::Deref for Trained {
    type Target = Outcome;
    fn deref(&self) -> &Outcome {
        &self.out
    }
}

/// [`vpmoe_runtime::train::train`], then the backend's whole state.
pub fn train(
    be: &mut dyn vpmoe_runtime::Backend,
    plan: &Plan,
    data: &[(PathBuf, f64)],
    cfg: &TrainConfig,
    opts: &RunOptions,
) -> anyhow::Result<Trained> {
    let out = vpmoe_runtime::train::train(be, plan, data, cfg, opts)?;
    Ok(Trained { out, state: be.state()? })
}
