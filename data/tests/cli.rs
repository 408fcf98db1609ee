//! `data render` and `data inspect` behaviour, and the clap definition of `DataCmd`.

mod common;

use clap::{CommandFactory, Parser};
use vpmoe_data::cli::{render_stream, DataCmd};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: DataCmd,
}

#[test]
fn render_writes_good_lines_and_names_bad_ones() {
    let golden: Vec<serde_json::Value> =
        include_str!("fixtures/harmony_golden.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let input = format!(
        "{}\n{{\"messages\": [\n\n{}\n{}\n{}\n",
        golden[0]["conversation"],
        golden[1]["conversation"],
        r#"{"messages":[{"role":"user","content":[{"type":"developer_content","instructions":"x"}]}]}"#,
        r#"{"messages":[{"role":"user","content":"hi","chanel":"final"}]}"#,
    );
    let mut out = Vec::new();
    let (ok, errors) = render_stream(input.as_bytes(), &mut out).unwrap();
    assert_eq!(ok, 2);
    let lines: Vec<usize> = errors.iter().map(|e| e.0).collect();
    assert_eq!(lines, vec![2, 5, 6]);
    assert!(errors[0].1.contains("invalid JSON"));
    assert!(errors[1].1.contains("developer_content may only appear"));
    assert!(errors[2].1.contains("chanel"));
    let text = String::from_utf8(out).unwrap();
    let outs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(outs.len(), 2);
    for (o, g) in outs.iter().zip([&golden[0], &golden[1]]) {
        for k in ["token_ids", "loss_mask", "span_id", "text"] {
            assert_eq!(o[k], g[k], "{k}");
        }
    }
    // Whole golden lines are accepted too (their `id` is echoed).
    let mut out = Vec::new();
    let line = golden[3].to_string();
    let (ok, errors) = render_stream(line.as_bytes(), &mut out).unwrap();
    assert_eq!((ok, errors.len()), (1, 0));
    let o: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(o["id"], golden[3]["id"]);
    assert_eq!(o["token_ids"], golden[3]["token_ids"]);
}

#[test]
fn render_reports_a_line_that_is_not_utf8_and_goes_on() {
    let golden: Vec<serde_json::Value> =
        include_str!("fixtures/harmony_golden.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let good = golden[0]["conversation"].to_string();
    let mut input = Vec::new();
    input.extend_from_slice(good.as_bytes());
    input.extend_from_slice(b"\n{\"messages\": \"caf\xe9\"}\r\n");
    input.extend_from_slice(good.as_bytes());
    input.extend_from_slice(b"\r\n");
    let mut out = Vec::new();
    let (ok, errors) = render_stream(&input[..], &mut out).unwrap();
    assert_eq!(ok, 2);
    assert_eq!(errors, vec![(2, "not UTF-8 (byte 18 of the line)".to_string())]);
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 2);
}

#[test]
fn every_flag_has_help_and_parses() {
    let cmd = Cli::command();
    for sub in cmd.get_subcommands() {
        assert!(sub.get_about().is_some(), "{}", sub.get_name());
        for arg in sub.get_arguments() {
            assert!(arg.get_help().is_some(), "{} {}", sub.get_name(), arg.get_id());
        }
    }
    let c = Cli::try_parse_from([
        "x",
        "build-synth",
        "--input",
        "a.parquet",
        "b",
        "--out",
        "o",
        "--valid-fraction",
        "0.01",
        "--seq-len",
        "1024",
        "--max-rows",
        "5",
        "--threads",
        "2",
        "--strict",
        "--reasoning-effort",
        "high",
    ])
    .unwrap();
    match c.cmd {
        DataCmd::BuildSynth(a) => {
            assert_eq!(a.input.len(), 2);
            assert_eq!(a.valid_fraction.text, "0.01");
            assert_eq!((a.seq_len, a.max_rows, a.threads, a.strict), (1024, Some(5), Some(2), true));
        }
        _ => panic!(),
    }
    assert!(Cli::try_parse_from(["x", "build-synth", "--input", "a", "--out", "o", "--valid-fraction", "2"]).is_err());
    assert!(
        Cli::try_parse_from(["x", "build-synth", "--input", "a", "--out", "o", "--reasoning-effort", "max"]).is_err()
    );
    assert!(matches!(Cli::try_parse_from(["x", "render"]).unwrap().cmd, DataCmd::Render(a) if a.input == "-"));
    assert!(matches!(Cli::try_parse_from(["x", "inspect", "d"]).unwrap().cmd, DataCmd::Inspect(_)));
}

#[test]
fn inspect_shows_counts_histogram_and_a_sample() {
    let out = common::tmpdir("inspect");
    let mut o = vpmoe_data::build_synth::BuildOptions::new(
        vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/synth_sample.parquet")],
        out.clone(),
    );
    o.valid_fraction = "0.2".parse().unwrap();
    vpmoe_data::build_synth::build_synth(&o).unwrap();
    let plain = vpmoe_data::inspect::describe(&out, false).unwrap();
    assert!(plain.contains("rows: 9 read, 9 written"), "{plain}");
    assert!(plain.contains("split train: 1 shards, 6 documents"), "{plain}");
    assert!(plain.contains("document length histogram"));
    assert!(plain.contains("«m1s1:<|start|>assistant<|channel|>analysis<|message|>"), "{plain}");
    assert!(plain.contains("<|return|>»«m0s0:<|endoftext|>»"), "{plain}");
    assert!(!plain.contains('\x1b'));
    let color = vpmoe_data::inspect::describe(&out, true).unwrap();
    assert!(color.contains("\x1b[33m"));
    // A split directory works too.
    let split = vpmoe_data::inspect::describe(&out.join("valid"), false).unwrap();
    assert!(split.contains("split valid: 1 shards, 3 documents"), "{split}");
}
