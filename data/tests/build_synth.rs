//! build-synth end to end: sample fixture, generated fixtures (multilingual, empty reasoning,
//! rag, overlong, invalid, null columns), alignment properties, determinism across thread
//! counts, resumability, corrupt input.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use vpmoe_data::build_synth::{build_synth, BuildOptions};
use vpmoe_data::harmony::{self, ReasoningEffort, RenderConfig};
use vpmoe_data::reader::Shard;
use vpmoe_data::synth::{SynthRow, ValidFraction};
use vpmoe_data::tokenizer::{EOD, RETURN};

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/synth_sample.parquet")
}

fn opts(inputs: Vec<PathBuf>, out: &Path) -> BuildOptions {
    let mut o = BuildOptions::new(inputs, out.to_path_buf());
    o.valid_fraction = "0.2".parse().unwrap();
    o
}

fn manifest(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap()
}

fn docs(out: &Path, split: &str, shard: &str) -> Vec<(Vec<i32>, Vec<u8>, Vec<u8>)> {
    let p = out.join(split).join(format!("{shard}_tokens"));
    if !vpmoe_data::indexed::idx_path(&p).exists() {
        return vec![];
    }
    let s = Shard::open(&p).unwrap();
    (0..s.len()).map(|i| (s.tokens.get(i), s.lossmask.get(i), s.span.get(i))).collect()
}

/// The expected document of a row through the generic renderer (+EOD, label shift).
fn expected_doc(row: &SynthRow, effort: ReasoningEffort) -> (Vec<i32>, Vec<u8>, Vec<u8>) {
    let conv = row.to_conversation(effort).unwrap();
    let r = harmony::render_for_training(&conv, RenderConfig::default()).unwrap();
    let mut t: Vec<i32> = r.token_ids.iter().map(|&x| x as i32).collect();
    t.push(EOD as i32);
    let mut m = r.loss_mask[1..].to_vec();
    m.extend([0, 0]);
    let mut s = r.span_id[1..].to_vec();
    s.extend([0, 0]);
    (t, m, s)
}

#[test]
fn sample_fixture_matches_generic_renderer() {
    let out = tmpdir("sample");
    let mut o = opts(vec![sample()], &out);
    o.reasoning_effort = ReasoningEffort::High;
    let rep = build_synth(&o).unwrap();
    assert_eq!((rep.rows_read, rep.rows_written, rep.rows_rejected), (9, 9, 0));
    let m = manifest(&out);
    assert_eq!(m["config"]["reasoning_effort"], "high");
    assert_eq!(m["input"]["files"][0]["name"], "synth_sample.parquet");
    assert_eq!(m["input"]["files"][0]["bytes"], 7336);
    assert_eq!(m["tokenizer"]["model_sha256"], "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d");
    // Rows from the JSONL mirror, in order, routed by the split rule.
    let vf: ValidFraction = "0.2".parse().unwrap();
    let mirror = include_str!("fixtures/synth_sample.jsonl");
    let (mut train, mut valid) = (vec![], vec![]);
    for line in mirror.lines() {
        let row: SynthRow = serde_json::from_str(line).unwrap();
        let d = expected_doc(&row, ReasoningEffort::High);
        if vf.is_valid(row.synth_id.as_deref().unwrap()) {
            valid.push(d)
        } else {
            train.push(d)
        }
    }
    assert!(!valid.is_empty() && !train.is_empty());
    assert_eq!(docs(&out, "train", "synth_sample"), train);
    assert_eq!(docs(&out, "valid", "synth_sample"), valid);
    let n_train = train.len() as u64;
    assert_eq!(m["splits"]["train"]["rows"], n_train);
    let toks: u64 = train.iter().map(|d| d.0.len() as u64).sum();
    assert_eq!(m["splits"]["train"]["tokens"], toks);
    // Reasoning effort high → token 29 is " high".
    assert_eq!(train[0].0[29], 1932);
}

fn check_alignment(d: &(Vec<i32>, Vec<u8>, Vec<u8>), seq_len: usize) {
    let (t, m, s) = d;
    let n = t.len();
    assert!(n <= seq_len + 1, "document of {n} tokens exceeds seq_len + 1");
    assert_eq!((m.len(), s.len()), (n, n));
    assert_eq!(t[n - 1], EOD as i32);
    assert_eq!(t[n - 2], RETURN as i32);
    // Positions predicting EOD and the EOD itself carry no loss.
    assert_eq!((m[n - 2], m[n - 1], s[n - 2], s[n - 1]), (0, 0, 0, 0));
    for k in 0..n {
        assert!(m[k] <= 1 && s[k] <= 2);
        assert!(s[k] == 0 || m[k] == 1, "span without mask at {k}");
    }
    // Label alignment: the position before an assistant <|start|> is supervised to predict it.
    for k in 0..n - 1 {
        if t[k + 1] == 200006 && t.get(k + 2) == Some(&173781) {
            assert_eq!(m[k], 1, "position {k} should predict <|start|>assistant");
        }
        if t[k] == 200007 && t.get(k + 1) == Some(&200006) && t.get(k + 2) == Some(&1428) {
            // An <|end|> followed by a user turn: not supervised.
            assert_eq!(m[k], 0);
        }
    }
    // Spans: 1 (analysis) strictly before 2 (final), 0 for the prompt.
    let first2 = s.iter().position(|&x| x == 2).expect("final span present");
    assert!(s[first2..n - 2].iter().all(|&x| x == 2));
    assert!(s[..first2].iter().all(|&x| x != 2));
}

#[test]
fn generated_fixtures_reject_truncate_and_align() {
    let dir = tmpdir("gen-in");
    let files = write_fixture_dir(&dir, 3, 120);
    let out = tmpdir("gen-out");
    let mut o = opts(vec![dir.clone()], &out);
    o.seq_len = 256;
    o.batch_rows = 37;
    let rep = build_synth(&o).unwrap();
    assert_eq!(rep.rows_read, 360);
    let expected_invalid: usize = (0..3)
        .map(|k| {
            fixture_rows(k, 120)
                .iter()
                .filter(|r| {
                    let row = r.row();
                    row.messages().is_err()
                })
                .count()
        })
        .sum();
    assert_eq!(rep.rows_rejected as usize, expected_invalid);
    assert!(rep.rows_rejected >= 9);
    assert!(rep.rows_dropped >= 3, "{rep:?}");
    assert!(rep.rows_truncated >= 20, "{rep:?}");
    assert_eq!(rep.rows_written + rep.rows_rejected + rep.rows_dropped, rep.rows_read);
    // Rejections are reported by synth_id.
    let rejected = std::fs::read_to_string(out.join("rejected.jsonl")).unwrap();
    assert!(rejected.contains("\"synth_id\":\"synth_00_00007\""));
    assert!(rejected.contains("missing query"));
    assert!(rejected.contains("missing synthetic_answer"));
    assert!(rejected.contains("missing synth_id"));
    assert!(rejected.contains("\"kind\":\"dropped\""));
    let m = manifest(&out);
    assert_eq!(m["rows"]["rejected"], rep.rows_rejected);
    assert_eq!(m["rows"]["dropped_overlong"], rep.rows_dropped);
    assert_eq!(m["input"]["files"].as_array().unwrap().len(), 3);
    // Every document obeys the alignment properties; untruncated ones equal the generic render.
    let mut checked = 0;
    for (k, f) in files.iter().enumerate() {
        let shard = f.file_stem().unwrap().to_str().unwrap();
        let mut all = docs(&out, "train", shard);
        all.extend(docs(&out, "valid", shard));
        for d in &all {
            check_alignment(d, 256);
            checked += 1;
        }
        let vf: ValidFraction = "0.2".parse().unwrap();
        let train = docs(&out, "train", shard);
        let mut it = train.iter();
        for r in fixture_rows(k, 120) {
            let row = r.row();
            if row.messages().is_err() || vf.is_valid(row.synth_id.as_deref().unwrap()) {
                continue;
            }
            let want = expected_doc(&row, ReasoningEffort::Medium);
            if want.0.len() > 257 {
                // truncated or dropped: skip over it if it was written truncated
                let rend = vpmoe_data::synth::SynthRenderer::new(ReasoningEffort::Medium, 256).unwrap().process(&row);
                if let vpmoe_data::synth::RowOutcome::Doc { doc, truncated } = rend {
                    assert!(truncated);
                    let got = it.next().unwrap();
                    assert_eq!(got.0, doc.tokens);
                    // The final message (and <|return|>) is kept whole.
                    let tail = want.0.len() - got.0.len();
                    assert_eq!(&got.0[got.0.len() - 20..], &want.0[tail + got.0.len() - 20..]);
                }
                continue;
            }
            assert_eq!(it.next().unwrap(), &want);
        }
        assert!(it.next().is_none());
    }
    assert_eq!(checked as u64, rep.rows_written);
    // Multilingual text survives (decode a French document).
    let text = vpmoe_data::inspect::describe(&out, false).unwrap();
    assert!(text.contains("split train:") && text.contains("split valid:"));
}

#[test]
fn strict_mode_fails_on_the_first_invalid_row() {
    let dir = tmpdir("strict-in");
    write_fixture_dir(&dir, 1, 40);
    let out = tmpdir("strict-out");
    let mut o = opts(vec![dir.to_path_buf()], &out);
    o.strict = true;
    let err = format!("{:#}", build_synth(&o).unwrap_err());
    assert!(err.contains("synth_00_00007") && err.contains("missing query"), "{err}");
    assert!(err.contains("synth_001.parquet"), "{err}");
    assert!(!out.join("manifest.json").exists());
    // No complete-looking shard is left behind: the failed run leaves the directory as it found it.
    assert_eq!(std::fs::read_dir(&*out).unwrap().count(), 0);
}

#[test]
fn a_row_containing_a_canary_document_fails_the_build_named() {
    let dir = tmpdir("canary");
    let canary = dir.join("canary.jsonl");
    std::fs::write(&canary, "{\"text\": \"why did they plan to take the eiffel tower down after 20 years\"}\n")
        .unwrap();
    let out = tmpdir("canary-out");
    let mut o = opts(vec![sample()], &out);
    o.canary = Some(canary.clone());
    let err = format!("{:#}", build_synth(&o).unwrap_err());
    assert!(err.contains("contains canary document") && err.contains("canary.jsonl:1"), "{err}");
    assert!(err.contains("synth_sample.parquet row ") && err.contains("synth_id"), "{err}");
    assert!(!out.join("manifest.json").exists());
}

#[test]
fn output_is_identical_for_any_thread_count_and_batch_size() {
    let dir = tmpdir("det-in");
    write_fixture_dir(&dir, 2, 90);
    let mut snaps = Vec::new();
    for (threads, batch) in [(1, 512), (2, 7), (4, 64)] {
        let out = tmpdir("det-out");
        let mut o = opts(vec![dir.clone()], &out);
        o.seq_len = 256;
        o.threads = Some(threads);
        o.batch_rows = batch;
        build_synth(&o).unwrap();
        snaps.push(snapshot(&out));
    }
    assert!(snaps[0].len() >= 14);
    assert_eq!(snaps[0], snaps[1]);
    assert_eq!(snaps[0], snaps[2]);
}

#[test]
fn refuses_a_foreign_non_empty_output_directory() {
    let out = tmpdir("foreign");
    std::fs::write(out.join("precious.txt"), b"keep me").unwrap();
    let err = format!("{:#}", build_synth(&opts(vec![sample()], &out)).unwrap_err());
    assert!(err.contains("not a build-synth output directory"), "{err}");
    assert_eq!(std::fs::read(out.join("precious.txt")).unwrap(), b"keep me");
}

/// A build into a directory another build holds is refused, naming the holder, before it
/// touches anything; once the holder is gone the same build runs.
#[test]
fn a_second_build_into_a_held_directory_is_refused() {
    let out = tmpdir("held");
    let holder = vpmoe_data::lock::DirLock::acquire(&out, "vpmoe-rt data build-synth").unwrap();
    let err = format!("{:#}", build_synth(&opts(vec![sample()], &out)).unwrap_err());
    assert!(err.contains("is in use by vpmoe-rt data build-synth (pid"), "{err}");
    assert!(!out.join("train").exists() && !out.join(".shards").exists(), "the refused build wrote nothing");
    drop(holder);
    build_synth(&opts(vec![sample()], &out)).unwrap();
    assert!(out.join("manifest.json").is_file());
}

#[test]
fn max_rows_limits_and_changes_the_config_hash() {
    let dir = tmpdir("max-in");
    write_fixture_dir(&dir, 2, 30);
    let out = tmpdir("max-out");
    let mut o = opts(vec![dir.clone()], &out);
    o.max_rows = Some(45);
    let rep = build_synth(&o).unwrap();
    assert_eq!(rep.rows_read, 45);
    let h1 = manifest(&out)["config_hash"].clone();
    o.max_rows = None;
    let rep = build_synth(&o).unwrap();
    assert_eq!(rep.rows_read, 60);
    assert_eq!(rep.shards_built, 2);
    assert_ne!(manifest(&out)["config_hash"], h1);
}

#[test]
fn rerun_resumes_and_rebuilds_damaged_shards() {
    let dir = tmpdir("resume-in");
    write_fixture_dir(&dir, 3, 40);
    let out = tmpdir("resume-out");
    let o = opts(vec![dir.clone()], &out);
    let r1 = build_synth(&o).unwrap();
    assert_eq!((r1.shards_built, r1.shards_reused), (3, 0));
    let snap = snapshot(&out);
    // Complete re-run: everything reused, identical bytes.
    let r2 = build_synth(&o).unwrap();
    assert_eq!((r2.shards_built, r2.shards_reused), (0, 3));
    assert_eq!(snapshot(&out), snap);
    // Simulate a crash in shard 2: a half-written temp file, a truncated .bin, no manifest.
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    std::fs::write(out.join("train/synth_002_tokens.bin.tmp"), b"partial").unwrap();
    let bin = out.join("train/synth_002_tokens.bin");
    let len = std::fs::metadata(&bin).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&bin).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    // A reader refuses the damaged shard, naming the file.
    let err = format!("{:#}", Shard::open(&out.join("train/synth_002_tokens")).unwrap_err());
    assert!(err.contains("synth_002_tokens.bin"), "{err}");
    let r3 = build_synth(&o).unwrap();
    assert_eq!((r3.shards_built, r3.shards_reused), (1, 2));
    assert_eq!(snapshot(&out), snap);
    // A changed input file is detected by its hash and rebuilt.
    write_parquet(&dir.join("synth_003.parquet"), &fixture_rows(7, 40), 50);
    let r4 = build_synth(&o).unwrap();
    assert_eq!((r4.shards_built, r4.shards_reused), (1, 2));
    assert_ne!(snapshot(&out), snap);
}

#[test]
fn corrupt_or_truncated_parquet_is_a_clear_error() {
    let dir = tmpdir("corrupt");
    let good = dir.join("good.parquet");
    write_parquet(&good, &fixture_rows(0, 60), 20);
    let bytes = std::fs::read(&good).unwrap();
    // Truncated file (footer lost).
    let trunc = dir.join("truncated.parquet");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    // Not parquet at all.
    let junk = dir.join("junk.parquet");
    std::fs::write(&junk, b"this is not a parquet file at all, just text").unwrap();
    // Footer intact, page data overwritten.
    let smashed = dir.join("smashed.parquet");
    let mut b = bytes.clone();
    for x in &mut b[8..bytes.len() / 2] {
        *x = 0xA5;
    }
    std::fs::write(&smashed, &b).unwrap();
    // Missing columns.
    let missing = dir.join("missing.parquet");
    {
        use arrow_array::{ArrayRef, RecordBatch, StringArray};
        use std::sync::Arc;
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
            "synth_id",
            arrow_schema::DataType::Utf8,
            true,
        )]));
        let col: ArrayRef = Arc::new(StringArray::from(vec![Some("a")]));
        let batch = RecordBatch::try_new(schema.clone(), vec![col]).unwrap();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&missing).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    for (f, needle) in [
        (&trunc, "truncated.parquet"),
        (&junk, "junk.parquet"),
        (&smashed, "smashed.parquet"),
        (&missing, "missing SYNTH column"),
    ] {
        let out = tmpdir("corrupt-out");
        let err = build_synth(&opts(vec![f.clone()], &out)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(needle), "{}: {msg}", f.display());
        assert!(!out.join("manifest.json").exists());
    }
}

/// The `train/` and `valid/` files of a build (the documents and their metadata).
fn split_files(out: &Path) -> Vec<(String, Vec<u8>)> {
    snapshot(out).into_iter().filter(|(p, _)| p.starts_with("train/") || p.starts_with("valid/")).collect()
}

fn props() -> parquet::file::properties::WriterProperties {
    parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(50)).build()
}

#[test]
fn a_file_without_a_language_column_builds_with_null_languages() {
    let rows = fixture_rows(0, 40);
    let (with, without) = (tmpdir("lang-with"), tmpdir("lang-without"));
    write_synth_as(&with.join("synth_001.parquet"), &rows, props(), Strings::Plain, &[]);
    write_synth_as(&without.join("synth_001.parquet"), &rows, props(), Strings::Plain, &["language"]);
    let (out_with, out_without) = (tmpdir("lang-with-out"), tmpdir("lang-without-out"));
    build_synth(&opts(vec![with.to_path_buf()], &out_with)).unwrap();
    build_synth(&opts(vec![without.to_path_buf()], &out_without)).unwrap();
    let (a, b) = (split_files(&out_with), split_files(&out_without));
    assert_eq!(a.len(), b.len());
    for ((pa, da), (pb, db)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        if !pa.ends_with("_docs.jsonl") {
            assert_eq!(da, db, "{pa}");
            continue;
        }
        let meta = |d: &[u8]| -> Vec<Value> {
            std::str::from_utf8(d).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        };
        let (ma, mb) = (meta(da), meta(db));
        assert!(ma.iter().any(|m| m["language"].is_string()));
        for (x, y) in ma.iter().zip(&mb) {
            assert_eq!(y["language"], Value::Null, "{pb}");
            assert_eq!((&x["synth_id"], &x["exercise"]), (&y["synth_id"], &y["exercise"]));
        }
    }
}

#[test]
fn dictionary_encoded_string_columns_read_like_plain_ones() {
    let rows = fixture_rows(1, 60);
    let (plain, dict) = (tmpdir("dict-plain"), tmpdir("dict-dict"));
    write_synth_as(&plain.join("synth_001.parquet"), &rows, props(), Strings::Plain, &[]);
    write_synth_as(&dict.join("synth_001.parquet"), &rows, props(), Strings::Dictionary, &[]);
    let (out_plain, out_dict) = (tmpdir("dict-plain-out"), tmpdir("dict-dict-out"));
    let mut o = opts(vec![plain.to_path_buf()], &out_plain);
    o.seq_len = 256;
    let rep_plain = build_synth(&o).unwrap();
    o.inputs = vec![dict.to_path_buf()];
    o.out = out_dict.to_path_buf();
    o.batch_rows = 7;
    let rep_dict = build_synth(&o).unwrap();
    assert_eq!(
        (rep_dict.rows_written, rep_dict.rows_rejected, rep_dict.rows_dropped, rep_dict.tokens),
        (rep_plain.rows_written, rep_plain.rows_rejected, rep_plain.rows_dropped, rep_plain.tokens)
    );
    assert!(rep_plain.rows_rejected > 0 && rep_plain.rows_written > 0);
    assert_eq!(split_files(&out_dict), split_files(&out_plain));
    assert_eq!(
        std::fs::read(out_dict.join("rejected.jsonl")).unwrap(),
        std::fs::read(out_plain.join("rejected.jsonl")).unwrap()
    );
}

#[test]
fn a_build_that_writes_no_documents_fails_counting_the_reasons() {
    let dir = tmpdir("nodocs-in");
    let mut rows: Vec<Rec> =
        (0..9).map(|i| Rec::new(&format!("s{i}"), "en", "memorization", "Why?", "Because.", "So.")).collect();
    for (i, r) in rows.iter_mut().enumerate() {
        match i % 3 {
            0 => r.query = None,
            1 => r.synthetic_answer = Some(" ".into()),
            _ => r.synthetic_answer = Some("a long final answer ".repeat(80)),
        }
    }
    write_parquet(&dir.join("synth_001.parquet"), &rows, 50);
    let out = tmpdir("nodocs-out");
    let mut o = opts(vec![dir.to_path_buf()], &out);
    o.seq_len = 256;
    let err = format!("{:#}", build_synth(&o).unwrap_err());
    for needle in [
        "no documents written: all 9 rows read were skipped",
        "missing query: 3",
        "missing synthetic_answer: 3",
        "3 dropped (too long for --seq-len 256",
        "rejected.jsonl",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    assert!(!out.join("manifest.json").exists());
    assert_eq!(std::fs::read_to_string(out.join("rejected.jsonl")).unwrap().lines().count(), 9);
}

#[test]
fn a_failed_build_removes_what_it_created_and_nothing_else() {
    let dir = tmpdir("failed-in");
    let junk = dir.join("junk.parquet");
    std::fs::write(&junk, b"not parquet").unwrap();
    // A fresh output directory goes away entirely; an empty existing one is left empty.
    let parent = tmpdir("failed-out");
    let fresh = parent.join("dataset");
    assert!(build_synth(&opts(vec![junk.clone()], &fresh)).is_err());
    assert!(!fresh.exists());
    assert!(build_synth(&opts(vec![junk.clone()], &parent)).is_err());
    assert_eq!(std::fs::read_dir(&*parent).unwrap().count(), 0);
    // A failure while resuming keeps the shards that were finished before it (and its lock).
    std::fs::remove_file(&junk).unwrap();
    write_fixture_dir(&dir, 2, 30);
    let out = tmpdir("failed-resume");
    let mut o = opts(vec![dir.to_path_buf()], &out);
    build_synth(&o).unwrap();
    let before: Vec<(String, Vec<u8>)> = snapshot(&out).into_iter().filter(|(p, _)| p != "manifest.json").collect();
    let mut bad = fixture_rows(3, 30);
    bad[4].query = None;
    write_parquet(&dir.join("synth_003.parquet"), &bad, 50);
    o.strict = true;
    let err = format!("{:#}", build_synth(&o).unwrap_err());
    assert!(err.contains("--strict"), "{err}");
    let after: Vec<(String, Vec<u8>)> = snapshot(&out).into_iter().filter(|(p, _)| p != "manifest.json").collect();
    assert_eq!(after, before);
    std::fs::remove_file(dir.join("synth_003.parquet")).unwrap();
    let r = build_synth(&o).unwrap();
    assert_eq!((r.shards_built, r.shards_reused), (0, 2));
}

/// A dataset found clean is remembered (same set, same token files) and scanned again once its
/// files change or the set does; one holding a canary document is refused every time.
#[test]
fn a_clean_canary_check_is_remembered_until_the_files_or_the_set_change() {
    use vpmoe_data::canary::{Canary, Checked};
    let out = tmpdir("remember-out");
    build_synth(&opts(vec![sample()], &out)).unwrap();
    let cache = tmpdir("remember-cache");
    let builtin = Canary::load(None).unwrap();
    let check = |c: &Canary| c.check_dataset_remembered(&out, Some(&cache));
    assert_eq!(check(&builtin).unwrap(), Checked::Scanned);
    assert_eq!(check(&builtin).unwrap(), Checked::Remembered);
    // Another set is another check; one that the dataset contains is refused every time.
    let dir = tmpdir("remember-set");
    let hit = dir.join("canary.jsonl");
    std::fs::write(&hit, "{\"text\": \"why did they plan to take the eiffel tower down after 20 years\"}\n").unwrap();
    let hit = Canary::load(Some(&hit)).unwrap();
    for _ in 0..2 {
        let err = format!("{:#}", check(&hit).unwrap_err());
        assert!(err.contains("contains canary document"), "{err}");
    }
    // A token file that changes is scanned again.
    let bin = std::fs::read_dir(out.join("train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "bin"))
        .unwrap();
    let bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &bytes).unwrap(); // the same bytes, a new modification time
    let f = std::fs::File::options().write(true).open(&bin).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(check(&builtin).unwrap(), Checked::Scanned);
}
