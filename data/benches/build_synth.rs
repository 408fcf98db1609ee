//! build-synth throughput vs raw tiktoken-rs `encode_ordinary` on the same text.
//!
//! `cargo bench -p vpmoe-data --bench build_synth` (env `BENCH_ROWS`, default 20000 rows of
//! SYNTH-like length: query ≈ 220, reasoning ≈ 2000, answer ≈ 1450 characters, 20 % non-English).
//! Prints, per thread count, tokens/s of the full pipeline (parquet decode, render, truncate,
//! split, write) next to the single-core `encode_ordinary` baseline over exactly the texts the
//! pipeline encodes, the ratio per core, thread scaling and peak RSS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use vpmoe_data::build_synth::{build_synth, BuildOptions};
use vpmoe_data::synth::SynthParquet;

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "that",
    "with",
    "as",
    "by",
    "on",
    "from",
    "tower",
    "permit",
    "years",
    "structure",
    "antenna",
    "radio",
    "military",
    "exposition",
    "because",
    "however",
    "therefore",
    "approximately",
    "constitution",
    "parliament",
    "photosynthesis",
    "atmosphere",
    "nitrogen",
    "oxygen",
    "Query:",
    "→",
    "∴",
    "?",
    "AND",
    "OR",
    "NOT",
    "IF",
    "THEN",
    "1889",
    "20",
    "16,020",
    "**bold**",
    "`code`",
    "(see",
    "above)",
    "—",
    "la",
    "le",
    "des",
    "est",
    "une",
    "différence",
    "être",
    "démontée",
    "après",
    "Wärme",
    "Gradienten",
    "über",
    "Kármán-Wirbel",
    "für",
    "die",
    "und",
    "qué",
    "proceso",
    "energía",
    "Zażółć",
    "gęślą",
    "jaźń",
    "amor",
    "est",
    "affectus",
    "Москва",
    "энтропия",
    "東京",
    "<ref",
    "name=\"source_1\">",
    "</ref>",
    "e.g.",
    "i.e.",
    "etc.",
    "x²",
    "≈",
    "78%",
];

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn text(rng: &mut u64, chars: usize) -> String {
    let mut s = String::with_capacity(chars + 16);
    while s.len() < chars {
        let r = splitmix(rng);
        s.push_str(WORDS[(r % WORDS.len() as u64) as usize]);
        s.push_str(match (r >> 32) % 23 {
            0 => ".\n\n",
            1 | 2 => ", ",
            3 => ".\n",
            _ => " ",
        });
    }
    s
}

fn write_corpus(path: &PathBuf, rows: usize) {
    let mut rng = 42u64;
    let names = [
        "synth_id",
        "language",
        "exercise",
        "model",
        "query",
        "query_seed_url",
        "query_seed_text",
        "additional_seed_url",
        "seed_license",
        "constraints",
        "script",
        "synthetic_reasoning",
        "synthetic_answer",
    ];
    let mut cols: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(rows); names.len()];
    let mut words = Vec::with_capacity(rows);
    for i in 0..rows {
        let r = splitmix(&mut rng);
        let lang = ["en", "en", "en", "en", "fr", "de", "es", "it", "pl", "en"][(r % 10) as usize];
        let rag = r.is_multiple_of(50);
        let (lq, lr, la) = (
            120 + (splitmix(&mut rng) % 200) as usize,
            800 + (splitmix(&mut rng) % 2400) as usize,
            600 + (splitmix(&mut rng) % 1700) as usize,
        );
        let q = text(&mut rng, lq);
        let reason = text(&mut rng, lr);
        let ans = text(&mut rng, la);
        let vals = [
            Some(format!("synth_{i:08}")),
            Some(lang.to_string()),
            Some(if rag { "rag" } else { "memorization" }.to_string()),
            Some("qwen-3-8b-memorization".to_string()),
            Some(q),
            Some("https://en.wikipedia.org/wiki/X".to_string()),
            Some(text(&mut rng, 300)),
            Some(String::new()),
            Some("CC-BY-SA 4.0".to_string()),
            Some(if rag { format!("<source_1>\n{}\n</source_1>", text(&mut rng, 800)) } else { String::new() }),
            Some(String::new()),
            Some(reason),
            Some(ans),
        ];
        for (c, v) in cols.iter_mut().zip(vals) {
            c.push(v);
        }
        words.push(Some(500i64));
    }
    let mut fields: Vec<Field> = names.iter().map(|n| Field::new(*n, DataType::Utf8, true)).collect();
    fields.push(Field::new("words", DataType::Int64, true));
    let schema = Arc::new(Schema::new(fields));
    let mut arrays: Vec<ArrayRef> = cols.into_iter().map(|c| Arc::new(StringArray::from(c)) as ArrayRef).collect();
    arrays.push(Arc::new(Int64Array::from(words)));
    let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(rows)) // one row group, like the real shards
        .build();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of the whole process so far, in seconds (from /proc, 10 ms ticks).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let rows: usize = std::env::var("BENCH_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(20000);
    let dir = std::env::temp_dir().join(format!("vpmoe-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("synth_001.parquet");
    write_corpus(&input, rows);
    let bytes = std::fs::metadata(&input).unwrap().len();
    let bpe = vpmoe_data::tokenizer::bpe();
    let _ = bpe.encode_ordinary("warm up");

    // Baseline: the exact texts the pipeline encodes, encode_ordinary on one core.
    let mut texts = Vec::new();
    let mut reader = SynthParquet::open(&input, 1024).unwrap();
    while let Some(batch) = reader.next_rows().unwrap() {
        for r in batch {
            let mut q = r.query.clone().unwrap_or_default();
            if r.exercise.as_deref() == Some("rag") {
                q.push_str("\n\n");
                q.push_str(r.constraints.as_deref().unwrap_or(""));
            }
            texts.push(q);
            texts.push(r.synthetic_reasoning.clone().unwrap_or_default());
            texts.push(r.synthetic_answer.clone().unwrap_or_default());
        }
    }
    let chars: usize = texts.iter().map(|t| t.chars().count()).sum();
    // Best of three (the machine is shared; the minimum is the least disturbed run).
    let mut content_tokens = 0u64;
    let mut base_s = f64::INFINITY;
    let mut base_cpu = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        let c0 = cpu_seconds();
        content_tokens = 0;
        for t in &texts {
            content_tokens += bpe.encode_ordinary(t).len() as u64;
        }
        base_s = base_s.min(t0.elapsed().as_secs_f64());
        base_cpu = base_cpu.min(cpu_seconds() - c0);
    }
    let base_tps = content_tokens as f64 / base_s;
    drop(texts);
    println!("corpus: {rows} rows, {bytes} parquet bytes, {chars} chars, {content_tokens} content tokens");
    let base_cpu_tps = content_tokens as f64 / base_cpu;
    println!(
        "baseline encode_ordinary (1 core, best of 3): {:.3} s wall, {:.0} tokens/s; {:.2} CPU-s, {:.0} tokens per CPU-second",
        base_s, base_tps, base_cpu, base_cpu_tps
    );

    // Fixed costs inside a build, measured alone.
    let t0 = Instant::now();
    let _ = vpmoe_data::tokenizer::vocabulary_sha256();
    let vocab_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut reader = SynthParquet::open(&input, 512).unwrap();
    let mut n = 0usize;
    while let Some(b) = reader.next_rows().unwrap() {
        n += b.len();
    }
    let decode_s = t0.elapsed().as_secs_f64();
    assert_eq!(n, rows);
    println!(
        "for reference: tokenizer vocabulary sha256 {:.3} s (not done per build); parquet decode of the needed columns {:.3} s",
        vocab_s, decode_s
    );

    let mut one_thread = None;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads_list = vec![1usize, 2, 4];
    threads_list.retain(|&t| t <= cores.max(2));
    for threads in threads_list {
        let out = dir.join(format!("out-{threads}"));
        let mut o = BuildOptions::new(vec![input.clone()], out.clone());
        o.threads = Some(threads);
        let mut s = f64::INFINITY;
        let mut cpu = f64::INFINITY;
        let mut peak = 0;
        let mut rep = None;
        for _ in 0..3 {
            let _ = std::fs::remove_dir_all(&out);
            reset_peak_rss();
            let t0 = Instant::now();
            let c0 = cpu_seconds();
            rep = Some(build_synth(&o).unwrap());
            s = s.min(t0.elapsed().as_secs_f64());
            cpu = cpu.min(cpu_seconds() - c0);
            peak = peak.max(peak_rss_kib());
        }
        let rep = rep.unwrap();
        // Same-text throughput: content tokens (what the baseline encodes) per second.
        let tps = content_tokens as f64 / s;
        let per_core = tps / threads as f64;
        let speedup = one_thread.map_or(1.0, |t1: f64| t1 / s);
        if threads == 1 {
            one_thread = Some(s);
        }
        println!(
            "build-synth threads={threads} (best of 3, from scratch): {:.3} s, {:.0} content tokens/s ({:.0} output tokens/s incl. system/wrappers/EOD), \
             per core {:.0} tok/s = {:.1}% of encode_ordinary, speedup vs 1 thread {:.2}x, peak RSS {} MiB",
            s,
            tps,
            rep.tokens as f64 / s,
            per_core,
            100.0 * per_core / base_tps,
            speedup,
            peak / 1024
        );
        let cpu_tps = content_tokens as f64 / cpu;
        println!(
            "    CPU time {:.2} CPU-s: {:.0} content tokens per CPU-second = {:.1}% of encode_ordinary per CPU-second",
            cpu,
            cpu_tps,
            100.0 * cpu_tps / base_cpu_tps
        );
    }
    println!("(machine: {cores} logical cores)");
    let _ = std::fs::remove_dir_all(&dir);
}
