//! Teacher scoring against local stand-in servers (`common::fake_teacher`) with the faults
//! real servers have: 5xx, dropped connections, slow answers, 4xx, wrong echoes, NaN.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::fake_teacher::{start, Faults, Server, MODEL};
use serde_json::Value;
use vpmoe_data::build_synth::{build_synth, BuildOptions};
use vpmoe_data::indexed::IndexedDataset;
use vpmoe_data::reader::{Reader, Shard};
use vpmoe_runtime::teacher::client::ClientConfig;
use vpmoe_runtime::teacher::score::{score, ScoreOptions};
use vpmoe_runtime::teacher::wire::Api;

const VOCAB: i64 = 201_088;

use vpmoe_ir::rng::splitmix64 as mix;

/// The fake teacher's distribution at position t ≥ 1 of `ids`: (top-k candidates best first,
/// the prompt token's log-probability as sent on the wire, −9999 meaning −inf).
fn teacher(ids: &[i64], t: usize, k: usize) -> (Vec<(i64, f64)>, f64) {
    let h = mix(ids[t - 1] as u64 * 1_000_003 + t as u64);
    let top: Vec<(i64, f64)> = (0..k)
        .map(|j| (((h + j as u64 * 7919) % VOCAB as u64) as i64, -(0.05 + 0.25 * j as f64) - (h % 97) as f64 / 1000.0))
        .collect();
    let actual = if let Some(c) = top.iter().find(|c| c.0 == ids[t]) {
        c.1
    } else if (ids[t] as usize + t).is_multiple_of(41) {
        -9999.0
    } else {
        -(1.5 + ((ids[t] * 7 + t as i64) % 500) as f64 / 100.0)
    };
    (top, actual)
}

fn expected_logp(ids: &[i64], t: usize, k: usize) -> f32 {
    let lp = teacher(ids, t, k).1;
    if lp == -9999.0 {
        f32::NEG_INFINITY
    } else {
        lp as f32
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vpmoe-teacher-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The sample parquet built twice under different shard names (two shards).
fn dataset(dir: &Path) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tests/fixtures/synth_sample.parquet");
    let inputs = dir.join("parquet");
    std::fs::create_dir_all(&inputs).unwrap();
    for name in ["a_000.parquet", "b_001.parquet"] {
        std::fs::copy(&fixture, inputs.join(name)).unwrap();
    }
    let out = dir.join("synth");
    let mut o = BuildOptions::new(vec![inputs], out.clone());
    o.seq_len = 2048;
    o.valid_fraction = "0.001".parse().unwrap();
    build_synth(&o).unwrap();
    out
}

fn options(server: &Server, api: Api, data: &Path, out: &Path, top_k: usize) -> ScoreOptions {
    ScoreOptions {
        client: ClientConfig {
            url: server.url.clone(),
            api,
            model: None,
            timeout: Duration::from_secs(2),
            retries: 4,
            backoff: Duration::from_millis(10),
            vocab: VOCAB as usize,
        },
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        subset: "fraction=1".parse().unwrap(),
        top_k,
        concurrency: 2,
        max_tokens_per_request: 4096,
        progress: false,
    }
}

/// Every scored position of every shard equals the fake teacher's value for the label.
fn check_alignment(out: &Path, k: usize) -> usize {
    let mut checked = 0;
    let mut shards = 0;
    for e in std::fs::read_dir(out.join("train")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let Some(base) = name.strip_suffix("_tokens.idx") else { continue };
        shards += 1;
        let sh = Shard::open(&out.join("train").join(format!("{base}_tokens"))).unwrap();
        let tl = sh.teacher_logp.as_ref().expect("teacher sidecar");
        let (ids_ds, lps_ds) = (
            IndexedDataset::open(&out.join("train").join(format!("{base}_teacher_topk_ids"))).ok(),
            IndexedDataset::open(&out.join("train").join(format!("{base}_teacher_topk_logp"))).ok(),
        );
        assert_eq!(ids_ds.is_some(), k > 0);
        for i in 0..sh.len() {
            let ids: Vec<i64> = sh.tokens.get::<i32>(i).iter().map(|&x| i64::from(x)).collect();
            let mask: Vec<u8> = sh.lossmask.get(i);
            let lp: Vec<f32> = tl.get(i);
            assert_eq!(lp.len(), ids.len());
            let (tid, tlp): (Vec<i32>, Vec<f32>) = match (&ids_ds, &lps_ds) {
                (Some(a), Some(b)) => (a.get(i), b.get(i)),
                _ => (vec![], vec![]),
            };
            for t in 0..ids.len() {
                if mask[t] == 0 {
                    assert_eq!(lp[t], 0.0, "doc {i} position {t}: excluded position holds 0");
                    continue;
                }
                let want = expected_logp(&ids, t + 1, k);
                assert!(lp[t] == want, "doc {i} position {t}: {} != {want}", lp[t]);
                if k > 0 {
                    let (top, _) = teacher(&ids, t + 1, k);
                    for (j, (id, l)) in top.iter().enumerate() {
                        assert_eq!(i64::from(tid[t * k + j]), *id);
                        assert_eq!(tlp[t * k + j], *l as f32);
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(shards >= 1);
    checked
}

#[test]
fn vllm_scores_align_with_labels_through_retries() {
    let dir = tmp("vllm");
    let data = dataset(&dir);
    // Two 503s, one dropped connection and one answer slower than the 2 s timeout: all retried.
    let faults = Faults {
        status_first: Some((503, 2)),
        drop_next: 1,
        slow_next: Some((Duration::from_secs(3), 1)),
        ..Default::default()
    };
    let server = start(Api::Vllm, faults, teacher);
    let out = dir.join("scored");
    let rep = score(&options(&server, Api::Vllm, &data, &out, 3)).unwrap();
    assert_eq!(rep.resumed, 0);
    assert!(rep.documents >= 10, "{} documents", rep.documents);
    // 2 × 503, a dropped connection and a timed-out answer, then the real answers.
    assert!(server.requests.load(Ordering::SeqCst) >= 5);
    let checked = check_alignment(&out, 3);
    assert!(checked > 500, "{checked} positions checked");
    // Some −9999 came back and were stored as −inf.
    assert!(rep.stats.neg_inf.iter().sum::<u64>() > 0);

    let m: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let t = &m["teacher"];
    assert_eq!(t["model"], MODEL);
    assert_eq!(t["server"]["api"], "vllm");
    assert_eq!(t["server"]["version"], "0.11.0-fake");
    assert_eq!(t["reasoning_effort"], "medium");
    assert_eq!(t["request"]["top_k"], 3);
    let input_sha =
        vpmoe_ir::hex(&<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(data.join("manifest.json")).unwrap()));
    assert_eq!(t["input"]["manifest_sha256"], input_sha.as_str());
    assert_eq!(std::fs::read_to_string(out.join("examples.jsonl")).unwrap().lines().count() as u64, rep.documents);
    assert!(!out.join(".journal").read_dir().unwrap().any(|_| true), "journals are removed when shards finish");

    // The reader blends it with the vanilla dataset: rows from the scored one carry teacher values.
    let mut r = Reader::open(&[(data.as_path(), 0.5), (out.as_path(), 0.5)], 256, 7).unwrap();
    let b = r.next_batch(4);
    for row in 0..4 {
        let rng = row * 256..(row + 1) * 256;
        let flagged = b.teacher[rng.clone()].iter().filter(|&&x| x == 1).count();
        let masked = b.loss_mask[rng.clone()].iter().filter(|&&x| x == 1).count();
        if b.source[row] == 1 {
            assert_eq!(flagged, masked);
        } else {
            assert_eq!(flagged, 0);
            assert!(b.teacher_logp[rng].iter().all(|&x| x == 0.0));
        }
    }
    let text = vpmoe_data::inspect::describe(&out, false).unwrap();
    assert!(text.contains("teacher openai/gpt-oss-120b via vllm 0.11.0-fake"), "{text}");
    assert!(text.contains("teacher logp:"), "{text}");

    // A second run with the same settings reuses everything and asks nothing.
    let before = server.requests.load(Ordering::SeqCst);
    let again = score(&options(&server, Api::Vllm, &data, &out, 3)).unwrap();
    assert_eq!((again.resumed, again.scored_now), (rep.documents, 0));
    assert_eq!(server.requests.load(Ordering::SeqCst), before);

    // SGLang's answers (same fake teacher) give byte-identical sidecars.
    let sg = start(Api::Sglang, Faults { status_first: Some((502, 1)), ..Default::default() }, teacher);
    let out2 = dir.join("scored-sglang");
    score(&options(&sg, Api::Sglang, &data, &out2, 3)).unwrap();
    check_alignment(&out2, 3);
    for e in std::fs::read_dir(out.join("train")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if name.to_string_lossy().contains("teacher") {
            assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(out2.join("train").join(&name)).unwrap(), "{p:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_answers_fail_naming_the_document_and_leave_no_sidecar() {
    let dir = tmp("bad");
    let data = dataset(&dir);
    let sh = Shard::open(&vpmoe_data::reader::resolve_prefixes(&data).unwrap()[0]).unwrap();
    let victim_len = sh.tokens.lengths()[1] as usize;
    let victim_id =
        vpmoe_data::docs::read(&vpmoe_data::docs::docs_path(sh.tokens.prefix()), sh.len()).unwrap()[1].synth_id.clone();

    for (name, faults, k, want) in [
        ("echo", Faults { bad_echo_len: Some(victim_len), ..Default::default() }, 0, "echoed prompt id at position 5"),
        ("nan", Faults { nan_len: Some(victim_len), ..Default::default() }, 2, "NaN"),
        ("400", Faults { status_first: Some((400, 1000)), ..Default::default() }, 0, "HTTP 400"),
    ] {
        for api in [Api::Vllm, Api::Sglang] {
            let server = start(api, faults.clone(), teacher);
            let out = dir.join(format!("out-{name}-{}", api.as_str()));
            let mut o = options(&server, api, &data, &out, k);
            o.max_tokens_per_request = 2049; // one document per request
            o.concurrency = 1;
            let err = format!("{:#}", score(&o).unwrap_err());
            assert!(err.contains(want), "{name}/{api:?}: {err}");
            if name != "400" {
                assert!(err.contains(&victim_id), "{name}/{api:?}: the error names the document: {err}");
            } else {
                // Retried, it would be asked 5 times; the one worker may have started the next
                // request (the other shard, same prompts) before it saw the failure.
                assert!(server.requests.load(Ordering::SeqCst) <= 2, "a 400 is not retried");
            }
            assert!(!out.join("manifest.json").exists());
            for e in std::fs::read_dir(out.join("train")).unwrap() {
                let p = e.unwrap().path();
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    !n.contains("_teacher_") || !n.starts_with("a_000"),
                    "{n} must not exist: the shard is incomplete"
                );
            }
        }
    }
    // 503 forever: retries run out with a message that says so.
    let server = start(Api::Vllm, Faults { status_first: Some((503, 1000)), ..Default::default() }, teacher);
    let mut o = options(&server, Api::Vllm, &data, &dir.join("out-503"), 0);
    o.client.retries = 2;
    let err = format!("{:#}", score(&o).unwrap_err());
    assert!(err.contains("failed after 3 attempts") && err.contains("HTTP 503"), "{err}");
    // A dataset whose system messages carry another reasoning effort than its manifest says is
    // refused before any request.
    let low = dir.join("low");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tests/fixtures/synth_sample.parquet");
    let mut b = BuildOptions::new(vec![fixture], low.clone());
    b.reasoning_effort = vpmoe_data::harmony::ReasoningEffort::Low;
    build_synth(&b).unwrap();
    let mpath = low.join("manifest.json");
    let text = std::fs::read_to_string(&mpath)
        .unwrap()
        .replace("\"reasoning_effort\": \"low\"", "\"reasoning_effort\": \"medium\"");
    std::fs::write(&mpath, text).unwrap();
    let server = start(Api::Vllm, Faults::default(), teacher);
    let err = format!("{:#}", score(&options(&server, Api::Vllm, &low, &dir.join("out-low"), 0)).unwrap_err());
    assert!(err.contains("Reasoning: low") && err.contains("reasoning effort medium"), "{err}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill_9_mid_run_then_restart_gives_the_same_sidecars() {
    let dir = tmp("kill");
    let data = dataset(&dir);
    let bin = env!("CARGO_BIN_EXE_vpmoe-rt");
    let run = |server: &Server, out: &Path| {
        std::process::Command::new(bin)
            .args(["teacher", "score", "--server", &server.url, "--api", "vllm", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(out)
            .args(["--subset", "fraction=0.7,prefer=long-reasoning", "--top-k", "2", "--concurrency", "1"])
            .args(["--max-tokens-per-request", "160", "--retries", "1"]) // one document per request
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Reference: one uninterrupted run.
    let fast = start(Api::Vllm, Faults::default(), teacher);
    let reference = dir.join("reference");
    let out = run(&fast, &reference).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let total = fast.requests.load(Ordering::SeqCst);
    assert!(total >= 8, "{total} documents scored");

    // Slow server; kill -9 once some documents are journaled.
    let slow = start(Api::Vllm, Faults { delay: Duration::from_millis(250), ..Default::default() }, teacher);
    let scored = dir.join("scored");
    let mut child = run(&slow, &scored);
    let t0 = Instant::now();
    while slow.requests.load(Ordering::SeqCst) < total / 2 + 1 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the scorer made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second scorer into the same directory is refused while the first holds it.
    let second = run(&slow, &scored).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("is in use by vpmoe-rt teacher score (pid"), "{err}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!scored.join("manifest.json").exists());
    // No sidecar is half-written: every index in place opens with its complete, matching data
    // (the kill may land between a finished shard's renames and its completion record).
    for e in std::fs::read_dir(scored.join("train")).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(prefix) = n.strip_suffix("_teacher_logp.idx") {
            let side = IndexedDataset::open(&scored.join("train").join(format!("{prefix}_teacher_logp"))).unwrap();
            if let Ok(tokens) = IndexedDataset::open(&scored.join("train").join(format!("{prefix}_tokens"))) {
                vpmoe_data::reader::check_sidecar(&side, &tokens, 1).unwrap();
            }
        }
    }
    let asked_before = slow.per_prompt.lock().unwrap().values().sum::<usize>();
    assert!(asked_before >= 2);

    // Restart against a fresh server: only the rest is asked for.
    let fresh = start(Api::Vllm, Faults::default(), teacher);
    let out = run(&fresh, &scored).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let asked_after = fresh.requests.load(Ordering::SeqCst);
    assert!(asked_after < total, "restart asked for {asked_after} of {total} documents: {stdout}");
    assert!(asked_after + asked_before >= total);
    assert!(stdout.contains("from earlier runs"), "{stdout}");
    for e in std::fs::read_dir(reference.join("train")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        assert_eq!(
            std::fs::read(&p).unwrap(),
            std::fs::read(scored.join("train").join(&name)).unwrap(),
            "{name:?} differs"
        );
    }
    check_alignment_subset(&scored);

    // Ctrl-C: the scorer says what is kept and how to continue, and exits 130.
    let slow = start(Api::Vllm, Faults { delay: Duration::from_millis(250), ..Default::default() }, teacher);
    let child = run(&slow, &dir.join("interrupted"));
    let t0 = Instant::now();
    while slow.requests.load(Ordering::SeqCst) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the scorer made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let int = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(int.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: every document scored so far is kept in") && err.contains("re-run"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn check_alignment_subset(out: &Path) {
    let m: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["teacher"]["subset"], "fraction=0.7,prefer=long-reasoning");
    check_alignment(out, 2);
}

/// DISTILL 2B end to end: score a subset, then train on the cpu backend with 70 % of the rows
/// from the scored set (confidence-weighted CE) and 30 % from the vanilla set (plain CE).
#[test]
fn stage_two_trains_on_a_blend_with_confidence_weighted_ce() {
    use vpmoe_runtime::backend::{Backend, Batch};
    use vpmoe_runtime::cpu::CpuBackend;
    use vpmoe_runtime::state::TrainState;
    use vpmoe_runtime::train::{KdConfig, RunOptions, TrainConfig};

    let dir = tmp("stage2");
    let data = dataset(&dir);
    let server = start(Api::Vllm, Faults::default(), teacher);
    let scored = dir.join("scored");
    let mut o = options(&server, Api::Vllm, &data, &scored, 0);
    o.subset = "fraction=0.6,prefer=long-reasoning".parse().unwrap();
    score(&o).unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let (g, plan) =
        vpmoe_compiler::compile_arch(&vpmoe_compiler::config::load(&root.join("configs/small.toml")).unwrap()).unwrap();
    let schedule = vpmoe_ir::optim::Schedule {
        lr: 0.02,
        min_lr: 0.002,
        warmup: 1,
        total: 4,
        decay: vpmoe_ir::optim::DecayStyle::Cosine,
        wsd_decay: 0,
    };
    let kd = KdConfig { temperature: 1.0, w_min: 0.25, w_max: 4.0 };
    let cfg = TrainConfig {
        micro_batch: 2,
        grad_accum: 5,
        seq_len: 48,
        seed: 11,
        schedule,
        aux_lr: 0.004,
        aux_min_lr: 0.0004,
        weight_decay: 0.01,
        clip: 1.0,
        span_weights: [1.0, 1.0],
        kd: kd.clone(),
        init_sha256: None,
        opd: None,
    };
    let blend = vec![(data.clone(), 0.3), (scored.clone(), 0.7)];
    let mut opts = RunOptions {
        steps: 4,
        ckpt_dir: dir.join("run"),
        resume: false,
        eval_every: 0,
        eval_batches: 1,
        save_every: 0,
        keep: 3,
        progress: false,
        print_every: 0,
        profile_steps: None,
        opd: None,
        canary: None,
        eval_prompts: None,
        dist: Default::default(),
        shard_optimizer: false,
    };
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    let out = common::train(&mut be, &plan, &blend, &cfg, &opts).unwrap();
    let rows: Vec<u64> = out.records.iter().flat_map(|r| r.rows_per_dataset.clone()).collect();
    let (vanilla, rescored): (u64, u64) = (rows.iter().step_by(2).sum(), rows.iter().skip(1).step_by(2).sum());
    assert_eq!((vanilla, rescored), (12, 28), "the blend follows the 30/70 weights exactly");
    for r in &out.records {
        assert!(r.teacher_tokens > 0, "step {}: no teacher tokens", r.step);
        let k = r.kd.as_ref().unwrap();
        assert!(k.center < 0.0 && k.weight_mean > 0.25 && k.weight_mean < 4.0, "{k:?}");
    }

    // Step 1's loss is the confidence-weighted objective: recompute it from the same batches with
    // a fresh backend (same initialisation), the IR reference weights and D6 scaling.
    let mut reader = vpmoe_data::reader::Reader::open(&blend, cfg.seq_len, cfg.seed).unwrap();
    let mut batches: Vec<Batch> =
        (0..cfg.grad_accum).map(|_| Batch::from_reader(reader.next_batch(cfg.micro_batch))).collect();
    let mut counts = [0u64; 3];
    let (mut sum, mut n) = (0f64, 0u64);
    for b in &batches {
        let c = b.span_counts();
        (0..3).for_each(|i| counts[i] += c[i]);
        for (&lp, &on) in b.teacher_logp.iter().zip(&b.teacher) {
            if on == 1 && lp.is_finite() {
                sum += lp as f64;
                n += 1;
            }
        }
    }
    let kd_in = [(sum / n as f64) as f32, kd.temperature, kd.w_min, kd.w_max, 1.0];
    assert_eq!(out.records[0].kd.as_ref().unwrap().center, kd_in[0] as f64);
    let scale = vpmoe_runtime::backend::span_scale(&counts, 1.0, 1.0);
    let fresh = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    let mut fresh = fresh;
    let (mut weighted, mut plain) = (0f64, 0f64);
    for b in &mut batches {
        b.span_scale = scale;
        b.kd = kd_in;
        let tl = fresh.forward(b, &[]).unwrap().token_loss().to_vec();
        for t in 0..tl.len() {
            if b.loss_mask[t] == 0 {
                continue;
            }
            let w = vpmoe_ir::reference::token_weight(b.teacher[t] as i32, tl[t], b.teacher_logp[t], 0.0, &kd_in);
            weighted += tl[t] as f64 * scale[b.span[t] as usize] as f64 * w as f64;
            plain += tl[t] as f64 * scale[b.span[t] as usize] as f64;
        }
    }
    let got = out.records[0].loss;
    assert!((got - weighted).abs() <= 1e-4 * weighted.abs(), "loss {got} vs weighted CE {weighted}");
    assert!((plain - weighted).abs() > 1e-2 * weighted.abs(), "the weights must matter: {plain} vs {weighted}");

    // Resume is bitwise, the running mean included.
    opts.ckpt_dir = dir.join("resumed");
    opts.save_every = 2;
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, cfg.seed));
    common::train(&mut be, &plan, &blend, &cfg, &opts).unwrap();
    std::fs::remove_dir_all(opts.ckpt_dir.join("step_00000004")).unwrap();
    opts.resume = true;
    let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, 1));
    let resumed = common::train(&mut be, &plan, &blend, &cfg, &opts).unwrap();
    for (a, b) in out.records[2..].iter().zip(&resumed.records) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}", a.step);
        assert_eq!(a.kd.as_ref().unwrap().center.to_bits(), b.kd.as_ref().unwrap().center.to_bits());
    }
    assert_eq!(out.state.checksum(), resumed.state.checksum());
    let _ = std::fs::remove_dir_all(&dir);
}
