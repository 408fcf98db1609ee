//! Shared helpers for the integration tests: temp dirs and SYNTH parquet fixtures generated at
//! run time with the parquet crate's writer (real 14-column schema, nullable strings).
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow_array::types::{Int32Type, Int8Type};
use arrow_array::{ArrayRef, DictionaryArray, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use vpmoe_data::synth::SynthRow;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tmpdir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!(
        "vpmoe-data-test-{}-{}-{}",
        name,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// One full SYNTH row (all 14 columns).
#[derive(Debug, Clone, Default)]
pub struct Rec {
    pub synth_id: Option<String>,
    pub language: Option<String>,
    pub exercise: Option<String>,
    pub model: Option<String>,
    pub query: Option<String>,
    pub query_seed_url: Option<String>,
    pub query_seed_text: Option<String>,
    pub additional_seed_url: Option<String>,
    pub seed_license: Option<String>,
    pub constraints: Option<String>,
    pub script: Option<String>,
    pub synthetic_reasoning: Option<String>,
    pub synthetic_answer: Option<String>,
    pub words: Option<i64>,
}

impl Rec {
    pub fn new(id: &str, lang: &str, exercise: &str, q: &str, r: &str, a: &str) -> Rec {
        Rec {
            synth_id: Some(id.into()),
            language: Some(lang.into()),
            exercise: Some(exercise.into()),
            model: Some(format!("qwen-3-8b-{exercise}")),
            query: Some(q.into()),
            query_seed_url: Some("https://en.wikipedia.org/wiki/Test".into()),
            query_seed_text: Some("(seed passage) ".repeat(20)),
            additional_seed_url: Some(String::new()),
            seed_license: Some("CC-BY-SA 4.0".into()),
            constraints: Some(String::new()),
            script: Some(String::new()),
            synthetic_reasoning: Some(r.into()),
            synthetic_answer: Some(a.into()),
            words: Some(((q.len() + r.len() + a.len()) / 5) as i64),
        }
    }

    pub fn row(&self) -> SynthRow {
        SynthRow {
            synth_id: self.synth_id.clone(),
            language: self.language.clone(),
            exercise: self.exercise.clone(),
            query: self.query.clone(),
            constraints: self.constraints.clone(),
            synthetic_reasoning: self.synthetic_reasoning.clone(),
            synthetic_answer: self.synthetic_answer.clone(),
        }
    }
}

/// Write rows as a SYNTH parquet file (snappy, given row-group size, data pages of 16 rows so
/// that readers cross page boundaries inside a row group).
pub fn write_parquet(path: &Path, rows: &[Rec], row_group_rows: usize) {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_data_page_row_count_limit(16)
        .build();
    write_synth(path, rows, props);
}

/// Write rows as a SYNTH parquet file with the real 14-column schema and the given properties.
pub fn write_synth(path: &Path, rows: &[Rec], props: WriterProperties) {
    write_synth_as(path, rows, props, Strings::Plain, &[]);
}

/// How [`write_synth_as`] stores the string columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strings {
    /// Utf8 arrays.
    Plain,
    /// Dictionary arrays, as pyarrow writes categorical columns: int8 keys for `language` (a
    /// pandas categorical), int32 keys for the others.
    Dictionary,
}

/// [`write_synth`] with the string columns stored as `strings`, leaving out the `omit` columns.
pub fn write_synth_as(path: &Path, rows: &[Rec], props: WriterProperties, strings: Strings, omit: &[&str]) {
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
    let get = |r: &Rec, i: usize| -> Option<String> {
        match i {
            0 => r.synth_id.clone(),
            1 => r.language.clone(),
            2 => r.exercise.clone(),
            3 => r.model.clone(),
            4 => r.query.clone(),
            5 => r.query_seed_url.clone(),
            6 => r.query_seed_text.clone(),
            7 => r.additional_seed_url.clone(),
            8 => r.seed_license.clone(),
            9 => r.constraints.clone(),
            10 => r.script.clone(),
            11 => r.synthetic_reasoning.clone(),
            _ => r.synthetic_answer.clone(),
        }
    };
    let (mut fields, mut cols): (Vec<Field>, Vec<ArrayRef>) = (Vec::new(), Vec::new());
    for (i, name) in names.iter().enumerate().filter(|(_, n)| !omit.contains(n)) {
        let values: Vec<Option<String>> = rows.iter().map(|r| get(r, i)).collect();
        let values = values.iter().map(Option::as_deref);
        let col: ArrayRef = match strings {
            Strings::Plain => Arc::new(values.collect::<StringArray>()),
            Strings::Dictionary if *name == "language" => Arc::new(values.collect::<DictionaryArray<Int8Type>>()),
            Strings::Dictionary => Arc::new(values.collect::<DictionaryArray<Int32Type>>()),
        };
        fields.push(Field::new(*name, col.data_type().clone(), true));
        cols.push(col);
    }
    fields.push(Field::new("words", DataType::Int64, true));
    cols.push(Arc::new(Int64Array::from(rows.iter().map(|r| r.words).collect::<Vec<_>>())));
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A varied set of rows: multilingual, empty/null reasoning, rag with sources, overlong rows
/// (at seq_len 256), a row whose final alone cannot fit, invalid rows, null columns.
pub fn fixture_rows(shard: usize, n: usize) -> Vec<Rec> {
    let langs = [
        (
            "en",
            "Why is the sky blue?",
            "Rayleigh scattering → short λ scattered more.",
            "Because air molecules scatter blue light more than red.",
        ),
        (
            "fr",
            "Pourquoi la mer est-elle salée ?",
            "Érosion → ions → évaporation ∴ sel.",
            "L'eau de pluie dissout les minéraux des roches ; l'évaporation concentre le sel.",
        ),
        (
            "de",
            "Wie genau interagieren Wärmegradienten mit Kármán-Wirbeln?",
            "Gradient → Dichte → Wirbelablösung.",
            "Temperaturunterschiede verändern die Dichte und damit die Wirbelstraße.",
        ),
        (
            "es",
            "¿Qué es la fotosíntesis?",
            "Luz + CO₂ + H₂O → glucosa.",
            "Es el proceso por el cual las plantas convierten la luz en energía química.",
        ),
        ("pl", "Popraw błędy: 'Zażółć gęślą jaźń'", "Tekst poprawny → brak zmian.", "Zażółć gęślą jaźń."),
        ("ja", "日本の首都はどこですか？", "首都 → 東京。", "日本の首都は東京です。"),
        (
            "ru",
            "Что такое энтропия? 🤔",
            "Мера беспорядка ∴ 2-й закон.",
            "Энтропия — мера неупорядоченности системы. 🔥",
        ),
        ("la", "Quid est amor?", "Amor → affectus.", "Amor est affectus animi."),
    ];
    let mut rows = Vec::new();
    for i in 0..n {
        let id = format!("synth_{shard:02}_{i:05}");
        let (lang, q, r, a) = langs[i % langs.len()];
        let mut rec = Rec::new(&id, lang, "memorization", q, r, a);
        match i % 13 {
            1 => rec.synthetic_reasoning = Some(String::new()),
            2 => rec.synthetic_reasoning = None,
            3 => {
                rec.exercise = Some("rag".into());
                rec.constraints =
                    Some(format!("<source_1>\nSource one for {id}.\n</source_1>\n<source_2>\nMore text.\n</source_2>"));
                rec.synthetic_answer = Some(format!("Per the sources<ref name=\"source_1\">{id}</ref>."));
            }
            4 => {
                rec.language = None;
                rec.query_seed_url = None;
                rec.query_seed_text = None;
                rec.words = None;
                rec.model = None;
            }
            5 => {
                // Overlong: needs structured truncation at seq_len 256.
                rec.query = Some(format!("{q} {}", "context words here ".repeat(60)));
                rec.synthetic_reasoning = Some("step → step ∴ ".repeat(120));
            }
            6 => {
                rec.exercise = Some("math exercise".into());
                rec.constraints = Some("result:16020".into());
                rec.query_seed_url = None;
            }
            _ => {}
        }
        if i % 29 == 7 {
            rec.query = None; // invalid
        }
        if i % 31 == 8 {
            rec.synthetic_answer = Some("   ".into()); // invalid
        }
        if i % 37 == 9 {
            rec.synth_id = None; // invalid
        }
        if i % 41 == 10 {
            // Final alone cannot fit at seq_len 256: dropped.
            rec.synthetic_answer = Some("a long final answer ".repeat(80));
        }
        rows.push(rec);
    }
    rows
}

/// Write `files` fixture shards of `n` rows each into `dir`; returns their paths.
pub fn write_fixture_dir(dir: &Path, files: usize, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..files)
        .map(|k| {
            let p = dir.join(format!("synth_{:03}.parquet", k + 1));
            write_parquet(&p, &fixture_rows(k, n), 50);
            p
        })
        .collect()
}

/// Every file under `dir` (relative path → bytes), recursively, sorted.
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, d: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let mut es: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        es.sort();
        for p in es {
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}
