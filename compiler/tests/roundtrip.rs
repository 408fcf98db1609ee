//! The IR's text form is lossless: for every shipped config, parsing the printed forward and
//! training graphs rebuilds them (up to value numbering: `Graph::canonical`) and prints the same
//! text, and the graph part of a plan's `ir.txt` splits off its optimizer section.

mod common;

use common::configs;
use vpmoe_compiler::{compile_arch, config, lower};
use vpmoe_ir::{parse_graph, split_graph_text, Graph};

fn assert_round_trips(what: &str, g: &Graph) {
    let text = g.to_text();
    let back = parse_graph(&text).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(back.to_text(), text, "{what}");
    // Not assert_eq: the Debug dump of a whole graph would bury the message.
    assert!(back == g.canonical(), "{what}: the parsed graph differs from the printed one");
}

#[test]
fn print_parse_is_identity_for_every_config() {
    let paths = configs();
    assert!(paths.len() >= 11, "configs not found: {paths:?}");
    for path in paths {
        let name = path.display();
        let arch = config::load(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_round_trips(&format!("{name} (forward)"), &lower::lower(&arch));
        let (g, plan) = compile_arch(&arch).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_round_trips(&format!("{name} (training)"), &g);
        // As `write_plan_dir` writes `ir.txt`.
        let ir_txt = g.to_text() + "\n" + &plan.optimizer.to_text(&g);
        assert_eq!(split_graph_text(&ir_txt), g.to_text(), "{name}");
    }
}
