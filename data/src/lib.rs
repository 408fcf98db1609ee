//! vpmoe data pipeline: SYNTH parquet → Harmony → tokens, loss masks and spans.
//!
//! * [`harmony`] — Harmony conversations (official JSON form) and the token-exact renderer
//!   (parity with openai-harmony 0.0.8), with per-token loss mask and span id; [`tools`] —
//!   tool namespaces; [`tokenizer`] — o200k_harmony and special ids.
//! * [`synth`] — SYNTH rows → conversations, validation, structured truncation (D8), label
//!   alignment (D7); streaming parquet reader.
//! * [`indexed`] — Megatron IndexedDataset writer/reader (MODEL.md §8.1 byte layout).
//! * [`build_synth`] — the `build-synth` pipeline (shards, split, manifest, atomic writes,
//!   resumability, determinism for any thread count).
//! * [`docs`] — per-document metadata (`synth_id`, language, exercise) beside each shard.
//! * [`reader`] — the training reader: [`reader::Reader::open`] with weighted datasets,
//!   [`reader::Reader::next_batch`] → [`reader::Batch`] (`tokens`, `labels`, `loss_mask`,
//!   `span`, `doc`, batch-major `t = b*S + s`), [`reader::Reader::cursor`] /
//!   [`reader::Reader::restore`] with a serde-serialisable [`reader::Cursor`].
//! * [`teacher`] — teacher-scored datasets: sidecar layout, subset selection (DISTILL 2A),
//!   teacher log-probability statistics.
//! * [`inspect`] — dataset statistics and a decoded sample.
//! * [`lock`] — the exclusive lock a command holds on the directory it writes.
//! * [`cli`] — `vpmoe-rt data render|build-synth|inspect` ([`cli::DataCmd`], [`cli::run`]).
pub mod build_synth;
pub mod canary;
pub mod cli;
pub mod completion;
pub mod docs;
pub mod harmony;
pub mod indexed;
pub mod inspect;
pub mod lock;
pub mod reader;
pub mod synth;
pub mod teacher;
pub mod tokenizer;
pub mod tools;

/// The progress bar of a long pass over `len` `unit`s (rows, tokens) on stderr, or a hidden one.
pub fn progress_bar(len: u64, unit: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let template = format!(
        "{{elapsed_precise}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} ({{per_sec}}) {{msg}} ETA {{eta}}"
    );
    indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr())
        .with_style(indicatif::ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "))
}
