//! Stand-alone driver for the `data` subcommands (the real binary is `vpmoe-rt data …`).
//!
//! `cargo run -p vpmoe-data --example vpmoe_data -- build-synth --input X --out Y`

use clap::Parser;
use vpmoe_data::cli::{run, DataCmd};

#[derive(Parser)]
#[command(name = "vpmoe-data", about = "vpmoe data pipeline (same as `vpmoe-rt data`)")]
struct Cli {
    #[command(subcommand)]
    cmd: DataCmd,
}

fn main() -> anyhow::Result<()> {
    run(Cli::parse().cmd)
}
