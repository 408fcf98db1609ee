//! The kernel templates run on the CPU by the fiber emulator (`cuda/host_emu`, docs/kernels.md):
//! every family, forward, backward and optimizer, against a transcription of the reference, on
//! seeded and adversarial inputs, under several schedules and under ThreadSanitizer; and the
//! deliberately broken kernels, each of which the emulator must report. Full tier
//! (`vpmoe_codegen::full_tier`): there it needs g++.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory for one test's build, removed when dropped.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("vpmoe-emu-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `run.sh [group]` with extra environment, built under `tmp` (reused there across calls).
fn run(tmp: &Path, group: Option<&str>, env: &[(&str, &str)]) -> Output {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/host_emu");
    let mut cmd = Command::new("sh");
    cmd.arg(dir.join("run.sh")).args(group).env("TMPDIR", tmp);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// One run of the suite: the group (all when `None`) and extra environment.
type Job<'a> = (Option<String>, Vec<(&'a str, &'a str)>);

/// Runs `jobs` on the machine's cores, each as its own process of the build under `tmp` (which
/// the first call, listing the groups, made); outputs in job order.
fn run_all(tmp: &Path, jobs: &[Job]) -> Vec<Output> {
    vpmoe_codegen::on_cores(jobs, |(group, env)| run(tmp, group.as_deref(), env))
}

/// The suite's groups (`run.sh --groups`), building it under `tmp` with `env`.
fn groups(tmp: &Path, env: &[(&str, &str)]) -> Vec<String> {
    let out = run(tmp, Some("--groups"), env);
    assert!(out.status.success(), "building the suite failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let groups: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert!(groups.len() >= 10 && groups.iter().any(|g| g == "optim"), "groups: {groups:?}");
    groups
}

fn suite_passed(out: &Output, what: &str) {
    let text = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = text.lines().filter(|l| l.contains("FAIL")).collect();
    assert!(
        out.status.success() && failed.is_empty() && text.contains("emulator errors: 0, failures: 0"),
        "{what}:\n{}\n{}\nstderr:\n{}",
        failed.join("\n"),
        text.lines().last().unwrap_or(""),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn needs_gxx(what: &str) -> bool {
    if !vpmoe_codegen::full_tier(what) {
        return false;
    }
    assert!(Command::new("g++").arg("--version").output().is_ok(), "the host emulator needs g++ on the PATH");
    true
}

#[test]
fn every_kernel_family_matches_the_reference_under_every_schedule() {
    if !needs_gxx("host emulator kernel suite") {
        return;
    }
    let tmp = Scratch::new("schedules");
    // Builds the suite once, before the runs below share the build.
    groups(&tmp.0, &[]);
    let schedules: [(&str, &str); 8] = [
        ("12345", "random"),
        ("1", "random"),
        ("2", "random"),
        ("3", "random"),
        ("12345", "late"),
        ("12345", "early"),
        ("12345", "in-order"),
        ("12345", "reverse"),
    ];
    // The whole suite under each schedule, and the broken kernels: each is reported (the
    // group's own check), and said so by name.
    let mut jobs: Vec<Job> = schedules
        .iter()
        .map(|&(seed, mode)| (None, vec![("VPMOE_EMU_SEED", seed), ("VPMOE_EMU_MODE", mode)]))
        .collect();
    jobs.push((Some("broken".to_string()), vec![]));
    let mut outs = run_all(&tmp.0, &jobs);
    let out = outs.pop().expect("the broken kernels ran");
    for ((seed, mode), o) in schedules.iter().zip(&outs) {
        suite_passed(o, &format!("VPMOE_EMU_SEED={seed} VPMOE_EMU_MODE={mode}"));
    }
    suite_passed(&out, "broken kernels");
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "read of unwritten shared memory",
        "missing __syncthreads",
        "missing cp_async_wait",
        "__syncthreads at two call sites",
        "shfl and mma in one warp",
    ] {
        assert!(text.lines().any(|l| l.contains(name) && l.contains("(reported)")), "{name} was not reported:\n{text}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("meet"), "mismatched barriers name their call sites:\n{stderr}");
}

#[test]
fn every_kernel_family_is_race_free_under_thread_sanitizer() {
    if !needs_gxx("host emulator under ThreadSanitizer") {
        return;
    }
    let tmp = Scratch::new("tsan");
    let tsan = [("SAN", "thread"), ("TSAN_OPTIONS", "halt_on_error=0")];
    // Every group (a process each, on the machine's cores), and the racy kernel: a plain `+=` by
    // every thread of a block gives the right sum on every schedule; only the sanitizer sees it.
    let mut jobs: Vec<Job> = groups(&tmp.0, &tsan).into_iter().map(|g| (Some(g), tsan.to_vec())).collect();
    jobs.push((Some("broken-race".to_string()), tsan.to_vec()));
    let mut outs = run_all(&tmp.0, &jobs);
    let out = outs.pop().expect("the racy kernel ran");
    for ((g, _), o) in jobs.iter().zip(&outs) {
        suite_passed(o, &format!("SAN=thread, group {}", g.as_deref().unwrap_or("")));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!stderr.contains("ThreadSanitizer"), "ThreadSanitizer reports:\n{stderr}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("ThreadSanitizer: data race") && stderr.contains("racy_accumulate"),
        "the racy accumulation was not reported:\n{stderr}"
    );
}
