//! build-synth throughput vs raw tiktoken-rs `encode_ordinary` on the same text.
//!
//! `cargo bench -p vpmoe-data --bench build_synth` (env `BENCH_ROWS`, default 20000 rows of
//! SYNTH-like length: query ≈ 220, reasoning ≈ 2000, answer ≈ 1450 characters, 20 % non-English).
//! Prints, per thread count, tokens/s of the full pipeline (parquet decode, render, truncate,
//! split, write) next to the single-core `encode_ordinary` baseline over exactly the texts the
//! pipeline encodes, the ratio per core, thread scaling and peak RSS.

use std::path::{Path, PathBuf};
use std::time::Instant;

use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use vpmoe_data::build_synth::{build_synth, BuildOptions};
use vpmoe_data::synth::SynthParquet;
use vpmoe_ir::rng::Rng;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{write_synth, Rec};

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

fn text(rng: &mut Rng, chars: usize) -> String {
    let mut s = String::with_capacity(chars + 16);
    while s.len() < chars {
        let r = rng.next_u64();
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

/// The synthetic corpus as one row group, like the real shards (written with the tests' SYNTH
/// parquet writer, so both share one 14-column schema).
fn write_corpus(path: &Path, rows: usize) {
    let mut rng = Rng::new(42);
    let recs: Vec<Rec> = (0..rows)
        .map(|i| {
            let r = rng.next_u64();
            let lang = ["en", "en", "en", "en", "fr", "de", "es", "it", "pl", "en"][(r % 10) as usize];
            let rag = r.is_multiple_of(50);
            let (lq, lr, la) = (
                120 + (rng.next_u64() % 200) as usize,
                800 + (rng.next_u64() % 2400) as usize,
                600 + (rng.next_u64() % 1700) as usize,
            );
            let q = text(&mut rng, lq);
            let reason = text(&mut rng, lr);
            let ans = text(&mut rng, la);
            Rec {
                synth_id: Some(format!("synth_{i:08}")),
                language: Some(lang.to_string()),
                exercise: Some(if rag { "rag" } else { "memorization" }.to_string()),
                model: Some("qwen-3-8b-memorization".to_string()),
                query: Some(q),
                query_seed_url: Some("https://en.wikipedia.org/wiki/X".to_string()),
                query_seed_text: Some(text(&mut rng, 300)),
                additional_seed_url: Some(String::new()),
                seed_license: Some("CC-BY-SA 4.0".to_string()),
                constraints: Some(if rag {
                    format!("<source_1>\n{}\n</source_1>", text(&mut rng, 800))
                } else {
                    String::new()
                }),
                script: Some(String::new()),
                synthetic_reasoning: Some(reason),
                synthetic_answer: Some(ans),
                words: Some(500),
            }
        })
        .collect();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(rows.max(1))) // one row group, like the real shards
        .build();
    write_synth(path, &recs, props);
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

/// Raw `encode_ordinary` over the texts on `n` threads, each with its own tokenizer (built
/// before timing): the hardware's scaling limit for the same work. Returns seconds.
fn parallel_encode(texts: &[String], bpes: &[tiktoken_rs::CoreBPE]) -> f64 {
    let n = bpes.len();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for (k, bpe) in bpes.iter().enumerate() {
            s.spawn(move || {
                let mut c = 0usize;
                for t in texts.iter().skip(k).step_by(n) {
                    c += bpe.encode_ordinary(t).len();
                }
                c
            });
        }
    });
    t0.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // Child mode: one build, then report the peak RSS of this process (see the end of main).
    if let Ok(spec) = std::env::var("BENCH_CHILD_BUILD") {
        let (threads, rest) = spec.split_once(':').unwrap();
        let (input, out) = rest.split_once('|').unwrap();
        let mut o = BuildOptions::new(vec![PathBuf::from(input)], PathBuf::from(out));
        o.threads = Some(threads.parse().unwrap());
        build_synth(&o).unwrap();
        println!("{}", peak_rss_kib());
        return;
    }
    let rows: usize = std::env::var("BENCH_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(20000);
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("vpmoe-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("synth_001.parquet");
    write_corpus(&input, rows);
    let bytes = std::fs::metadata(&input).unwrap().len();
    let bpe = vpmoe_data::tokenizer::bpe();
    let _ = bpe.encode_ordinary("warm up");

    // Baseline texts: exactly what the pipeline encodes.
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
    let content_tokens: u64 = texts.iter().map(|t| bpe.encode_ordinary(t).len() as u64).sum();
    println!("corpus: {rows} rows, {bytes} parquet bytes, {chars} chars, {content_tokens} content tokens");

    // Fixed costs inside a build, measured alone.
    let t0 = Instant::now();
    let mut reader = SynthParquet::open(&input, 512).unwrap();
    let mut n = 0usize;
    while let Some(b) = reader.next_rows().unwrap() {
        n += b.len();
    }
    let decode_s = t0.elapsed().as_secs_f64();
    assert_eq!(n, rows);
    let t0 = Instant::now();
    let _ = tiktoken_rs::o200k_harmony().unwrap();
    let load_s = t0.elapsed().as_secs_f64();
    println!(
        "fixed costs inside a build: parquet decode of the needed columns {decode_s:.3} s; tokenizer construction {load_s:.3} s per worker thread"
    );

    // Interleaved rounds: baseline, then a build per thread count, so that the VM's speed
    // drift affects both sides of each ratio alike. Ratios are per round; medians reported.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads_list = vec![1usize, 2, 4, 8, 16];
    threads_list.retain(|&t| t <= cores.max(2));
    let mut base_wall = Vec::new();
    let mut base_cpu = Vec::new();
    let mut wall: Vec<Vec<f64>> = vec![Vec::new(); threads_list.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); threads_list.len()];
    let mut ratio: Vec<Vec<f64>> = vec![Vec::new(); threads_list.len()];
    let mut cpu_ratio: Vec<Vec<f64>> = vec![Vec::new(); threads_list.len()];
    let mut raw_par: Vec<Vec<f64>> = vec![Vec::new(); threads_list.len()];
    let bpes: Vec<Vec<tiktoken_rs::CoreBPE>> =
        threads_list.iter().map(|&n| (0..n).map(|_| tiktoken_rs::o200k_harmony().unwrap()).collect()).collect();
    let mut out_tokens = 0u64;
    for round in 0..rounds {
        let t0 = Instant::now();
        let c0 = cpu_seconds();
        let mut k = 0u64;
        for t in &texts {
            k += bpe.encode_ordinary(t).len() as u64;
        }
        assert_eq!(k, content_tokens);
        let (bw, bc) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        base_wall.push(bw);
        base_cpu.push(bc);
        let mut line = format!("round {round}: baseline {bw:.3} s");
        for (ti, &threads) in threads_list.iter().enumerate() {
            let out = dir.join(format!("out-{threads}"));
            let _ = std::fs::remove_dir_all(&out);
            let mut o = BuildOptions::new(vec![input.clone()], out);
            o.threads = Some(threads);
            let t0 = Instant::now();
            let c0 = cpu_seconds();
            out_tokens = build_synth(&o).unwrap().tokens;
            let (w, c) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
            wall[ti].push(w);
            cpu[ti].push(c);
            ratio[ti].push(bw / (w * threads as f64));
            cpu_ratio[ti].push(bc / c);
            line.push_str(&format!(", threads={threads} {w:.3} s"));
            if threads > 1 {
                let r = parallel_encode(&texts, &bpes[ti]);
                raw_par[ti].push(r);
                line.push_str(&format!(" (raw encode on {threads} threads {r:.3} s)"));
            }
        }
        println!("{line}");
    }
    let bw = median(&mut base_wall.clone());
    let bc = median(&mut base_cpu.clone());
    println!(
        "baseline encode_ordinary, 1 core (median of {rounds}): {bw:.3} s, {:.0} tokens/s",
        content_tokens as f64 / bw
    );
    let w1 = median(&mut wall[0].clone());
    for (ti, &threads) in threads_list.iter().enumerate() {
        let w = median(&mut wall[ti].clone());
        let c = median(&mut cpu[ti].clone());
        println!(
            "build-synth threads={threads} (median of {rounds}, from scratch): {w:.3} s, {:.0} content tokens/s ({:.0} output tokens/s incl. system/wrappers/EOD); \
             per core {:.1}% of encode_ordinary (median of per-round ratios); {c:.2} CPU-s = {:.1}% of the baseline's tokens per CPU-second; speed-up vs 1 thread {:.2}x",
            content_tokens as f64 / w,
            out_tokens as f64 / w,
            100.0 * median(&mut ratio[ti]),
            100.0 * median(&mut cpu_ratio[ti]),
            w1 / w
        );
    }
    for (ti, &threads) in threads_list.iter().enumerate().skip(1) {
        let r = median(&mut raw_par[ti].clone());
        let w = median(&mut wall[ti].clone());
        println!(
            "reference: raw encode_ordinary on {threads} threads (own tokenizer each): {r:.3} s = {:.2}x of one core; build-synth threads={threads} reaches {:.1}% of it",
            bw / r,
            100.0 * r / w
        );
    }
    let _ = bc;
    drop(texts);

    // Peak memory of one build per thread count, each in a fresh process.
    for &threads in &threads_list {
        let out = dir.join(format!("mem-{threads}"));
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .env("BENCH_CHILD_BUILD", format!("{threads}:{}|{}", input.display(), out.display()))
            .output()
            .unwrap();
        let kib: u64 = String::from_utf8_lossy(&child.stdout).trim().parse().unwrap_or(0);
        println!("peak RSS of a build-synth process with threads={threads}: {} MiB", kib / 1024);
    }
    println!("(machine: {cores} logical cores)");
    let _ = std::fs::remove_dir_all(&dir);
}
