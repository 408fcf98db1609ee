//! vpmoe data pipeline: Harmony rendering, SYNTH → token datasets, readers.
pub mod harmony;
pub mod tokenizer;
pub mod tools;
