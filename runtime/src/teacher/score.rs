//! `vpmoe-rt teacher score`: select a subset of a build-synth dataset's `train` split, send
//! each document's exact token ids to the teacher server, and write a scored dataset: the
//! selected documents (tokens, loss mask, span, metadata) plus the `teacher_logp` sidecar and,
//! with `--top-k`, the top-k sidecars (layout: `vpmoe_data::teacher`).
//!
//! Crash safety: every scored document is appended to `.journal/{shard}.log` as a
//! checksummed record as soon as its response is validated. A restart reads the journal back
//! (a torn last record is cut off), skips what it holds and asks the server only for the rest.
//! A shard's files are written from its journal under temporary names and renamed when the
//! shard is complete, then its completion record is written and the journal removed; the
//! manifest comes last. So no sidecar is ever half-written, and a kill at any point loses at
//! most the requests in flight. A journal or record made with other settings (input, subset,
//! teacher, top-k) is discarded, never mixed in.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use vpmoe_data::build_synth::{canonical_json, ShardSplit};
use vpmoe_data::docs::{self, DocMeta};
use vpmoe_data::harmony::ReasoningEffort;
use vpmoe_data::indexed::{self, IndexedWriter};
use vpmoe_data::reader::Shard;
use vpmoe_data::teacher::{sidecar_prefixes, Candidate, SubsetRule, TeacherStats};
use vpmoe_ir::hex;

use super::client::{Client, ClientConfig};
use super::wire::Scores;

/// Schema tag of a scored dataset's manifest.
pub const SCHEMA_VERSION: &str = "synth_kd_teacher_v1";
const JOURNAL_HEADER: &[u8] = b"vpmoe teacher journal v1\n";
const RECORD_MAGIC: u32 = 0x4a54_5056;

/// Options of one scoring run.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    pub client: ClientConfig,
    /// build-synth dataset root (its `train` split is scored).
    pub data: PathBuf,
    pub out: PathBuf,
    pub subset: SubsetRule,
    pub top_k: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Documents are packed into one request up to this many tokens.
    pub max_tokens_per_request: usize,
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct ScoreReport {
    pub documents: u64,
    pub tokens: u64,
    /// Documents taken from finished shards or journals of earlier runs.
    pub resumed: u64,
    /// Documents scored by this run.
    pub scored_now: u64,
    pub tokens_now: u64,
    pub seconds: f64,
    pub stats: TeacherStats,
    pub manifest: PathBuf,
}

/// Completion record of one output shard (`.shards/{name}.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ShardRecord {
    name: String,
    settings_hash: String,
    split: ShardSplit,
}

/// One input shard and what is to be scored from it (read-only while requests run).
struct Job {
    name: String,
    shard: Shard,
    meta: Vec<DocMeta>,
    /// Selected local document indices, ascending.
    selected: Vec<usize>,
}

/// Where a job stands (owned by the thread that writes the journal).
#[derive(Default)]
struct JobState {
    /// Journal offset of each selected document's record, once scored.
    done: Vec<Option<u64>>,
    journal: Option<File>,
    record: Option<ShardRecord>,
}

impl Job {
    fn doc_tokens(&self, i: usize) -> Vec<i32> {
        self.shard.tokens.get(i)
    }
    fn describe(&self, pos: usize) -> String {
        let i = self.selected[pos];
        format!(
            "document {} (shard {}, #{i}, {} tokens)",
            self.meta[i].synth_id,
            self.name,
            self.shard.tokens.lengths()[i]
        )
    }
}

/// Run the scorer. See the module docs.
pub fn score(opts: &ScoreOptions) -> Result<ScoreReport> {
    ensure!(opts.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(opts.max_tokens_per_request >= 1, "--max-tokens-per-request must be at least 1");
    let started = Instant::now();
    // The input dataset.
    let manifest_path = opts.data.join("manifest.json");
    let manifest_bytes = fs::read(&manifest_path)
        .with_context(|| format!("{}: not a build-synth dataset (reading manifest.json)", opts.data.display()))?;
    let input: Value = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("{}: invalid JSON", manifest_path.display()))?;
    ensure!(
        input.get("teacher").is_none(),
        "{} is already a teacher-scored dataset; score the build-synth dataset it came from",
        opts.data.display()
    );
    let effort_name = input["config"]["reasoning_effort"]
        .as_str()
        .with_context(|| format!("{}: config.reasoning_effort is missing", manifest_path.display()))?;
    let effort = <ReasoningEffort as clap::ValueEnum>::from_str(effort_name, true)
        .map_err(|e| anyhow::anyhow!("{}: config.reasoning_effort: {e}", manifest_path.display()))?;
    let mut jobs = open_jobs(&opts.data, &input, &manifest_path)?;

    // Subset selection over the whole split (DISTILL 2A).
    let mut candidates = Vec::new();
    let mut owners = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        for i in 0..job.shard.len() {
            let len = job.shard.tokens.lengths()[i] as usize;
            let reasoning = job.shard.span.bytes(i, 0, len).iter().filter(|&&s| s == 1).count() as u64;
            candidates.push(Candidate { meta: &job.meta[i], tokens: len as u64, reasoning_tokens: reasoning });
            owners.push((j, i));
        }
    }
    let chosen = opts.subset.select(&candidates);
    let mut ids_hash = Sha256::new();
    for &c in &chosen {
        ids_hash.update(candidates[c].meta.synth_id.as_bytes());
        ids_hash.update(b"\n");
    }
    let selected_sha = hex(&ids_hash.finalize());
    drop(candidates);
    for &c in &chosen {
        let (j, i) = owners[c];
        jobs[j].selected.push(i);
    }
    jobs.retain(|j| !j.selected.is_empty());
    ensure!(!jobs.is_empty(), "the subset rule {} selects no documents", opts.subset);
    let mut states: Vec<JobState> =
        jobs.iter().map(|j| JobState { done: vec![None; j.selected.len()], ..Default::default() }).collect();

    // Every prompt must carry the dataset's reasoning effort in its system message.
    let prefix = vpmoe_data::synth::system_prefix(effort)?;
    for job in &jobs {
        for (pos, &i) in job.selected.iter().enumerate() {
            let len = (job.shard.tokens.lengths()[i] as usize).min(prefix.len());
            let mut head: Vec<i32> = Vec::with_capacity(len);
            job.shard.tokens.read_into(i, 0, len, &mut head);
            if head != prefix {
                let found = [ReasoningEffort::Low, ReasoningEffort::Medium, ReasoningEffort::High]
                    .into_iter()
                    .find(|e| vpmoe_data::synth::system_prefix(*e).is_ok_and(|p| head == p))
                    .map(|e| format!("Reasoning: {}", e.as_str()))
                    .unwrap_or_else(|| "no recognised system message".into());
                bail!(
                    "{}: its system message has {found}, but the dataset manifest says reasoning effort {effort_name}",
                    job.describe(pos)
                );
            }
        }
    }

    let client = Client::connect(opts.client.clone())?;
    let settings = json!({
        "input_manifest_sha256": crate::checkpoint::sha256_hex(&manifest_bytes),
        "split": "train",
        "subset": opts.subset.to_string(),
        "selected_synth_ids_sha256": selected_sha,
        "api": opts.client.api.as_str(),
        "model": client.info.model,
        "server_version": client.info.version,
        "reasoning_effort": effort.as_str(),
        "top_k": opts.top_k,
        "temperature": 1.0,
        "prompt": "document token ids exactly as stored (system message through <|return|> and EOD)",
    });
    let settings_hash = crate::checkpoint::sha256_hex(canonical_json(&settings).as_bytes());

    let _lock = prepare_out(&opts.out, &jobs)?;
    let mut resumed = 0u64;
    for (job, st) in jobs.iter().zip(&mut states) {
        resumed += resume_job(&opts.out, job, st, &settings_hash, opts.top_k)?;
    }

    // Requests: pending documents of one shard, packed up to the token cap.
    let mut requests: Vec<(usize, Vec<usize>)> = Vec::new();
    let mut pending_tokens = 0u64;
    for (j, job) in jobs.iter().enumerate() {
        if states[j].record.is_some() {
            continue;
        }
        let mut cur: Vec<usize> = Vec::new();
        let mut cur_tokens = 0;
        for pos in 0..job.selected.len() {
            if states[j].done[pos].is_some() {
                continue;
            }
            let n = job.shard.tokens.lengths()[job.selected[pos]] as usize;
            ensure!(
                n <= opts.max_tokens_per_request,
                "{} is longer than --max-tokens-per-request {}; raise it (the teacher needs whole documents)",
                job.describe(pos),
                opts.max_tokens_per_request
            );
            if cur_tokens + n > opts.max_tokens_per_request && !cur.is_empty() {
                requests.push((j, std::mem::take(&mut cur)));
                cur_tokens = 0;
            }
            cur.push(pos);
            cur_tokens += n;
            pending_tokens += n as u64;
        }
        if !cur.is_empty() {
            requests.push((j, cur));
        }
    }

    let pb = vpmoe_data::progress_bar(pending_tokens, "tokens", opts.progress);
    let total_docs: usize = jobs.iter().map(|j| j.selected.len()).sum();
    let (mut scored_now, mut tokens_now) = (0u64, 0u64);
    let mut first_error: Option<anyhow::Error> = None;
    for (job, st) in jobs.iter().zip(&mut states) {
        if st.record.is_none() && st.done.iter().all(Option::is_some) {
            finalize(&opts.out, job, st, &settings_hash, opts.top_k)?;
        }
    }
    let t_score = Instant::now();
    {
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<Vec<Scores>>)>();
        let (jobs_ref, requests_ref, client_ref) = (&jobs, &requests, &client);
        std::thread::scope(|sc| {
            for _ in 0..opts.concurrency.min(requests.len()) {
                let tx = tx.clone();
                let (next, stop) = (&next, &stop);
                sc.spawn(move || loop {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = next.fetch_add(1, Ordering::SeqCst);
                    let Some((j, positions)) = requests_ref.get(r) else { break };
                    let job = &jobs_ref[*j];
                    let docs: Vec<Vec<i32>> = positions.iter().map(|&p| job.doc_tokens(job.selected[p])).collect();
                    let prompts: Vec<&[i32]> = docs.iter().map(Vec::as_slice).collect();
                    let res = client_ref.score(&prompts, opts.top_k).with_context(|| {
                        let names: Vec<String> = positions
                            .iter()
                            .enumerate()
                            .map(|(k, &p)| format!("prompt {k} = {}", job.describe(p)))
                            .collect();
                        format!("scoring {}", names.join(", "))
                    });
                    if tx.send((r, res)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (r, res) in rx {
                let (j, positions) = &requests[r];
                let (job, st) = (&jobs[*j], &mut states[*j]);
                // Answers that arrive after a failure are still kept: they shorten the re-run.
                let handled = res.and_then(|scores| -> Result<()> {
                    for (&pos, s) in positions.iter().zip(&scores) {
                        let n = job.shard.tokens.lengths()[job.selected[pos]] as usize;
                        append_record(job, st, pos, s, opts.top_k)?;
                        scored_now += 1;
                        tokens_now += n as u64;
                        pb.inc(n as u64);
                    }
                    let secs = t_score.elapsed().as_secs_f64().max(1e-9);
                    pb.set_message(format!(
                        "{} / {total_docs} documents, {:.0} tok/s",
                        resumed + scored_now,
                        tokens_now as f64 / secs
                    ));
                    if st.done.iter().all(Option::is_some) {
                        finalize(&opts.out, job, st, &settings_hash, opts.top_k)?;
                    }
                    Ok(())
                });
                if let Err(e) = handled {
                    stop.store(true, Ordering::SeqCst);
                    first_error.get_or_insert(e);
                }
            }
        });
    }
    pb.finish_and_clear();
    if let Some(e) = first_error {
        return Err(e.context(format!(
            "teacher scoring stopped; {} documents are saved in {} and a re-run continues from them",
            resumed + scored_now,
            opts.out.join(".journal").display()
        )));
    }
    let seconds = started.elapsed().as_secs_f64();
    let score_seconds = t_score.elapsed().as_secs_f64();
    write_outputs(
        opts,
        &jobs,
        &states,
        &input,
        &settings,
        &settings_hash,
        &client,
        scored_now,
        tokens_now,
        score_seconds,
    )
    .map(|(stats, manifest, tokens)| ScoreReport {
        documents: total_docs as u64,
        tokens,
        resumed,
        scored_now,
        tokens_now,
        seconds,
        stats,
        manifest,
    })
}

/// The shards of the input's `train` split with their metadata.
fn open_jobs(data: &Path, input: &Value, manifest_path: &Path) -> Result<Vec<Job>> {
    let shards = input["splits"]["train"]["shards"]
        .as_array()
        .with_context(|| format!("{}: no train split", manifest_path.display()))?;
    let mut jobs = Vec::new();
    for s in shards {
        let name = s["name"].as_str().with_context(|| format!("{}: shard without a name", manifest_path.display()))?;
        let rel = s["paths"]["tokens_idx"]
            .as_str()
            .with_context(|| format!("{}: shard {name} without paths.tokens_idx", manifest_path.display()))?;
        let prefix = data.join(rel.strip_suffix(".idx").unwrap_or(rel));
        let shard = Shard::open(&prefix)?;
        let docs_file = docs::docs_path(&prefix);
        ensure!(
            docs_file.is_file(),
            "{}: missing; this dataset predates per-document metadata, rebuild it with `vpmoe-rt data build-synth`",
            docs_file.display()
        );
        let meta = docs::read(&docs_file, shard.len())?;
        jobs.push(Job { name: name.to_string(), shard, meta, selected: Vec::new() });
    }
    Ok(jobs)
}

/// Output files of shard `name` (relative to the output root).
fn out_files(name: &str, top_k: usize) -> Vec<String> {
    let mut v = Vec::new();
    let mut kinds = vec!["tokens", "lossmask", "span", "teacher_logp"];
    if top_k > 0 {
        kinds.extend(["teacher_topk_ids", "teacher_topk_logp"]);
    }
    for k in kinds {
        for ext in ["bin", "idx"] {
            v.push(format!("train/{name}_{k}.{ext}"));
        }
    }
    v.push(format!("train/{name}_docs.jsonl"));
    v
}

/// Create (or take over) and lock the output directory; remove the manifest, temporaries and the
/// files of shards this run does not produce.
fn prepare_out(out: &Path, jobs: &[Job]) -> Result<vpmoe_data::lock::DirLock> {
    vpmoe_data::lock::check_output_dir(out, ".journal", "teacher-score output")?;
    for d in ["train", ".journal", ".shards"] {
        fs::create_dir_all(out.join(d)).with_context(|| format!("creating {}", out.join(d).display()))?;
    }
    let lock = vpmoe_data::lock::DirLock::acquire(out, "vpmoe-rt teacher score")?;
    let manifest = out.join("manifest.json");
    if manifest.exists() {
        fs::remove_file(&manifest).with_context(|| format!("removing stale {}", manifest.display()))?;
    }
    let keep: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    let owner = |file: &str| -> Option<String> {
        let stem = file.split('.').next().unwrap_or(file);
        ["_tokens", "_lossmask", "_span", "_teacher_logp", "_teacher_topk_ids", "_teacher_topk_logp", "_docs"]
            .iter()
            .find_map(|s| stem.strip_suffix(s))
            .map(str::to_string)
    };
    for dir in [out.join("train"), out.join(".journal"), out.join(".shards"), out.to_path_buf()] {
        for e in fs::read_dir(&dir)? {
            let p = e?.path();
            if !p.is_file() {
                continue;
            }
            let file = p.file_name().and_then(|s| s.to_str()).unwrap_or("").to_string();
            let stale = if file.ends_with(".tmp") {
                true
            } else if dir == out {
                false
            } else if dir.ends_with("train") {
                owner(&file).is_some_and(|o| !keep.contains(&o.as_str()))
            } else {
                let stem = file.rsplit_once('.').map(|x| x.0).unwrap_or(&file);
                !keep.contains(&stem)
            };
            if stale {
                fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    Ok(lock)
}

/// Reuse a finished shard, or load its journal. Returns the documents already scored.
fn resume_job(out: &Path, job: &Job, st: &mut JobState, settings_hash: &str, top_k: usize) -> Result<u64> {
    let rec_path = out.join(".shards").join(format!("{}.json", job.name));
    if let Ok(text) = fs::read_to_string(&rec_path) {
        let intact = |r: &ShardRecord| {
            r.settings_hash == settings_hash
                && r.split.rows == job.selected.len() as u64
                && out_files(&job.name, top_k).iter().all(|f| {
                    r.split.paths.values().any(|p| p == f)
                        && fs::metadata(out.join(f)).is_ok_and(|m| {
                            r.split.bytes.iter().any(|(k, &b)| r.split.paths.get(k) == Some(f) && b == m.len())
                        })
                })
        };
        match serde_json::from_str::<ShardRecord>(&text) {
            Ok(r) if intact(&r) => {
                st.record = Some(r);
                return Ok(job.selected.len() as u64);
            }
            _ => fs::remove_file(&rec_path)?,
        }
    }
    let path = out.join(".journal").join(format!("{}.log", job.name));
    let mut header = JOURNAL_HEADER.to_vec();
    header.extend_from_slice(settings_hash.as_bytes());
    header.push(b'\n');
    let mut resumed = 0;
    if path.exists() {
        let mut f = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut head = vec![0u8; header.len()];
        let same = f.read_exact(&mut head).is_ok() && head == header;
        let mut good_end = header.len() as u64;
        if same {
            let mut r = BufReader::new(&mut f);
            r.seek(SeekFrom::Start(good_end))?;
            while let Some((pos, len)) = read_record(&mut r, job, top_k)? {
                if st.done[pos].is_none() {
                    st.done[pos] = Some(good_end);
                    resumed += 1;
                }
                good_end += len;
            }
            drop(r);
            f.set_len(good_end)?;
            f.seek(SeekFrom::End(0))?;
            st.journal = Some(f);
            return Ok(resumed);
        }
        drop(f);
        fs::remove_file(&path)?;
    }
    let mut f = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    f.write_all(&header)?;
    st.journal = Some(f);
    Ok(resumed)
}

fn record_len(n: usize, k: usize) -> usize {
    16 + 4 * n + 8 * n * k + 8
}

/// Read one record: `Some((position, bytes))`, or None at the end or at a torn/corrupt tail.
fn read_record(r: &mut impl Read, job: &Job, top_k: usize) -> Result<Option<(usize, u64)>> {
    let mut head = [0u8; 16];
    if r.read_exact(&mut head).is_err() {
        return Ok(None);
    }
    let word = |i: usize| u32::from_le_bytes(head[4 * i..4 * i + 4].try_into().unwrap());
    let (magic, pos, n, k) = (word(0), word(1) as usize, word(2) as usize, word(3) as usize);
    if magic != RECORD_MAGIC || pos >= job.selected.len() || k != top_k {
        return Ok(None);
    }
    if n != job.shard.tokens.lengths()[job.selected[pos]] as usize {
        return Ok(None);
    }
    let mut rest = vec![0u8; record_len(n, k) - 16];
    if r.read_exact(&mut rest).is_err() {
        return Ok(None);
    }
    let (payload, sum) = rest.split_at(rest.len() - 8);
    let mut h = Sha256::new();
    h.update(head);
    h.update(payload);
    if h.finalize()[..8] != *sum {
        return Ok(None);
    }
    Ok(Some((pos, record_len(n, k) as u64)))
}

/// Label-align one document's scores (D7: entry t scores token t+1; zero where the loss mask
/// is 0) and append them to the shard's journal.
fn append_record(job: &Job, st: &mut JobState, pos: usize, s: &Scores, k: usize) -> Result<()> {
    let i = job.selected[pos];
    let n = job.shard.tokens.lengths()[i] as usize;
    let mask = job.shard.lossmask.bytes(i, 0, n).to_vec();
    let mut buf = Vec::with_capacity(record_len(n, k));
    for w in [RECORD_MAGIC, pos as u32, n as u32, k as u32] {
        buf.extend_from_slice(&w.to_le_bytes());
    }
    // Position t scores token t+1; the stored mask is 0 at the last position (D7 padding).
    let scored: Vec<bool> = (0..n).map(|t| mask[t] != 0 && t + 1 < n).collect();
    for (t, &on) in scored.iter().enumerate() {
        let v = if on { s.logp[t + 1] } else { 0.0 };
        buf.extend_from_slice(&v.to_le_bytes());
    }
    for (t, &on) in scored.iter().enumerate() {
        for j in 0..k {
            let id = if on { s.topk_ids[(t + 1) * k + j] } else { -1 };
            buf.extend_from_slice(&id.to_le_bytes());
        }
    }
    for (t, &on) in scored.iter().enumerate() {
        for j in 0..k {
            let v = if on { s.topk_logp[(t + 1) * k + j] } else { 0.0 };
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
    let sum = Sha256::digest(&buf);
    buf.extend_from_slice(&sum[..8]);
    let f = st.journal.as_mut().expect("open journal");
    let at = f.seek(SeekFrom::End(0))?;
    // One write: a kill leaves at most a torn tail, which the checksum rejects on resume.
    f.write_all(&buf).context("appending to the teacher journal")?;
    st.done[pos] = Some(at);
    Ok(())
}

/// Write a complete shard from its journal (temporary names, renamed), then its completion
/// record, then drop the journal.
fn finalize(out: &Path, job: &Job, st: &mut JobState, settings_hash: &str, k: usize) -> Result<()> {
    let base = out.join("train").join(format!("{}_tokens", job.name));
    let [tl, ti, tv] = sidecar_prefixes(&base);
    let stem = |kind: &str| out.join("train").join(format!("{}_{kind}", job.name));
    let mut tokens = IndexedWriter::<i32>::create(&stem("tokens"))?;
    let mut lossmask = IndexedWriter::<u8>::create(&stem("lossmask"))?;
    let mut span = IndexedWriter::<u8>::create(&stem("span"))?;
    let mut logp = IndexedWriter::<f32>::create(&tl)?;
    let mut top =
        if k > 0 { Some((IndexedWriter::<i32>::create(&ti)?, IndexedWriter::<f32>::create(&tv)?)) } else { None };
    let mut split = ShardSplit::new(&job.name);
    let mut meta = Vec::with_capacity(job.selected.len());
    let f = st.journal.as_mut().expect("open journal");
    let mut rec = Vec::new();
    for (pos, &i) in job.selected.iter().enumerate() {
        let n = job.shard.tokens.lengths()[i] as usize;
        let toks: Vec<i32> = job.shard.tokens.get(i);
        let m: Vec<u8> = job.shard.lossmask.get(i);
        let sp: Vec<u8> = job.shard.span.get(i);
        tokens.add(&toks)?;
        lossmask.add(&m)?;
        span.add(&sp)?;
        split.add_doc(&m, &sp);
        meta.push(job.meta[i].clone());
        rec.resize(record_len(n, k), 0);
        f.seek(SeekFrom::Start(st.done[pos].expect("complete shard")))?;
        f.read_exact(&mut rec)?;
        let floats = |a: usize, len: usize| -> Vec<f32> {
            rec[a..a + 4 * len].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        };
        logp.add(&floats(16, n))?;
        if let Some((ids, lps)) = &mut top {
            let a = 16 + 4 * n;
            let v: Vec<i32> =
                rec[a..a + 4 * n * k].chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
            ids.add(&v)?;
            lps.add(&floats(a + 4 * n * k, n * k))?;
        }
    }
    let mut sizes = vec![
        ("tokens", tokens.finish()?),
        ("lossmask", lossmask.finish()?),
        ("span", span.finish()?),
        ("teacher_logp", logp.finish()?),
    ];
    if let Some((ids, lps)) = top {
        sizes.push(("teacher_topk_ids", ids.finish()?));
        sizes.push(("teacher_topk_logp", lps.finish()?));
    }
    for (kind, (bin, idx)) in sizes {
        for (ext, b) in [("bin", bin), ("idx", idx)] {
            split.record_file(&format!("{kind}_{ext}"), format!("train/{}_{kind}.{ext}", job.name), b);
        }
    }
    let docs_bytes = docs::encode(&meta);
    let rel = format!("train/{}_docs.jsonl", job.name);
    indexed::write_atomic(&out.join(&rel), &docs_bytes)?;
    split.record_file("docs_jsonl", rel, docs_bytes.len() as u64);
    let record = ShardRecord { name: job.name.clone(), settings_hash: settings_hash.to_string(), split };
    let text = serde_json::to_string_pretty(&record)? + "\n";
    indexed::write_atomic(&out.join(".shards").join(format!("{}.json", job.name)), text.as_bytes())?;
    st.journal = None;
    fs::remove_file(out.join(".journal").join(format!("{}.log", job.name)))?;
    st.record = Some(record);
    Ok(())
}

/// Statistics, per-example means and the manifest (last).
#[allow(clippy::too_many_arguments)]
fn write_outputs(
    opts: &ScoreOptions,
    jobs: &[Job],
    states: &[JobState],
    input: &Value,
    settings: &Value,
    settings_hash: &str,
    client: &Client,
    scored_now: u64,
    tokens_now: u64,
    score_seconds: f64,
) -> Result<(TeacherStats, PathBuf, u64)> {
    let out = &opts.out;
    let mut shards = Vec::new();
    for job in jobs {
        let sh = Shard::open(&out.join("train").join(format!("{}_tokens", job.name)))?;
        ensure!(sh.teacher_logp.is_some(), "shard {}: teacher_logp sidecar missing after scoring", job.name);
        shards.push(sh);
    }
    let stats = TeacherStats::of_shards(&shards);
    // Per-example means (DISTILL: teacher mean logp per example).
    let mut examples = String::new();
    for (job, sh) in jobs.iter().zip(&shards) {
        let tl = sh.teacher_logp.as_ref().expect("checked");
        for (pos, &i) in job.selected.iter().enumerate() {
            let mut one = TeacherStats::default();
            one.add_doc(&tl.get::<f32>(pos), &sh.lossmask.get::<u8>(pos), &sh.span.get::<u8>(pos));
            let m = &job.meta[i];
            let line = json!({
                "synth_id": m.synth_id, "language": m.language, "exercise": m.exercise,
                "tokens": sh.tokens.lengths()[pos], "scored_tokens": one.tokens[1] + one.tokens[2] + one.tokens[0],
                "mean_logp": one.example_means.first(), "reasoning_mean_logp": one.mean(1), "final_mean_logp": one.mean(2),
                "neg_inf": one.neg_inf.iter().sum::<u64>(),
            });
            examples.push_str(&line.to_string());
            examples.push('\n');
        }
    }
    indexed::write_atomic(&out.join("examples.jsonl"), examples.as_bytes())?;
    let throughput = json!({
        "documents_this_run": scored_now,
        "tokens_this_run": tokens_now,
        "seconds": score_seconds,
        "tokens_per_second": if score_seconds > 0.0 { tokens_now as f64 / score_seconds } else { 0.0 },
    });
    let mut st_json = stats.to_json();
    st_json["throughput"] = throughput.clone();
    indexed::write_atomic(&out.join("stats.json"), (serde_json::to_string_pretty(&st_json)? + "\n").as_bytes())?;

    let splits: Vec<&ShardSplit> = states.iter().map(|s| &s.record.as_ref().expect("finalized").split).collect();
    let mut span = BTreeMap::new();
    for s in &splits {
        for (k, v) in &s.span_tokens {
            *span.entry(k.clone()).or_insert(0u64) += v;
        }
    }
    let tokens: u64 = splits.iter().map(|s| s.tokens).sum();
    let docs: u64 = splits.iter().map(|s| s.rows).sum();
    let manifest = json!({
        "schema_version": SCHEMA_VERSION,
        "git_sha": env!("VPMOE_GIT_SHA"),
        "producer": {"crate": "vpmoe-runtime", "version": env!("CARGO_PKG_VERSION")},
        "config_hash": input["config_hash"],
        "config": input["config"],
        "renderer": input["renderer"],
        "tokenizer": input["tokenizer"],
        "rows": {"read": docs, "written": docs, "truncated": 0, "rejected": 0, "dropped_overlong": 0},
        "teacher": {
            "model": client.info.model,
            "server": {"api": opts.client.api.as_str(), "url": opts.client.url, "version": client.info.version},
            "reasoning_effort": settings["reasoning_effort"],
            "request": {
                "endpoint": opts.client.api.endpoint(),
                "top_k": opts.top_k,
                "temperature": 1.0,
                "max_tokens_per_request": opts.max_tokens_per_request,
                "concurrency": opts.concurrency,
                "timeout_s": opts.client.timeout.as_secs_f64(),
                "retries": opts.client.retries,
            },
            "input": {
                "dataset": opts.data.display().to_string(),
                "split": "train",
                "manifest_sha256": settings["input_manifest_sha256"],
                "config_hash": input["config_hash"],
            },
            "subset": opts.subset.to_string(),
            "documents": docs,
            "tokens": tokens,
            "settings_hash": settings_hash,
            "alignment": "teacher_logp[t] = log p_teacher(tokens[t+1] | tokens[..=t]) where loss_mask[t] = 1, else 0; -inf stored as -inf",
            "throughput": throughput,
        },
        "stats": stats.to_json(),
        "splits": {"train": {
            "rows": docs,
            "tokens": tokens,
            "loss_tokens": splits.iter().map(|s| s.loss_tokens).sum::<u64>(),
            "span_tokens": span,
            "shards": splits,
        }},
    });
    let path = out.join("manifest.json");
    indexed::write_atomic(&path, (serde_json::to_string_pretty(&manifest)? + "\n").as_bytes())?;
    Ok((stats, path, tokens))
}
