//! Filetests: each `tests/filetests/*.vpir` is a small hand-written graph, the commands to run on
//! it and their expected output (docs/ir.md, "Filetests"):
//!
//! ```text
//! ; What the case is about.
//! test lower
//!
//! graph g
//!   input $x: bf16[T,8] data
//!   …
//! ; expect:
//! ; 0 norm
//! ;   vp_rmsnorm_D8 <<<T, 1, 1 | 256>>> (x=$x, w=@w, y=%0, rows=T, eps=1e-5)
//! ```
//!
//! Commands, each on the parsed graph: `verify` (`ok` or the verifier's errors), `autodiff` (the
//! graph with its backward nodes), `lower` (each node's launches and scratch) and `plan` (the
//! memory plan). Several commands print one section each, headed `[COMMAND]`. A mismatch prints
//! a unified diff; every file is checked before the test fails. `VPMOE_BLESS=1` rewrites each
//! file's expect block with the actual output.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use vpmoe_compiler::plan::schedule;
use vpmoe_ir::{parse_graph, verify, Graph};

const COMMANDS: [&str; 4] = ["verify", "autodiff", "lower", "plan"];
const EXPECT: &str = "; expect:";

struct Case {
    commands: Vec<String>,
    graph: Graph,
    /// The file up to its expect block: what blessing keeps.
    body: String,
    expect: String,
}

/// A filetest's header (`;` comments, `test COMMAND` lines), graph and expect block; an error
/// carries its 1-based line.
fn parse_case(text: &str) -> Result<Case, (usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let graph_at = lines.iter().position(|l| l.starts_with("graph ")).ok_or((1, "no 'graph NAME' line".into()))?;
    let expect_at = lines.iter().position(|l| l.trim_end() == EXPECT).unwrap_or(lines.len());
    let mut commands = Vec::new();
    for (i, l) in lines[..graph_at].iter().enumerate() {
        if let Some(cmd) = l.strip_prefix("test ") {
            if !COMMANDS.contains(&cmd) {
                return Err((i + 1, format!("unknown command '{cmd}' (expected one of {})", COMMANDS.join(", "))));
            }
            commands.push(cmd.to_string());
        } else if !(l.starts_with(';') || l.trim().is_empty()) {
            return Err((i + 1, format!("expected '; comment', 'test COMMAND' or 'graph NAME', found '{l}'")));
        }
    }
    if commands.is_empty() {
        return Err((1, "no 'test COMMAND' line".into()));
    }
    // Comments inside the graph become blank lines, so the parser's line numbers stay the file's.
    let graph_text: Vec<&str> =
        lines[graph_at..expect_at].iter().map(|l| if l.trim_start().starts_with(';') { "" } else { l }).collect();
    let graph = parse_graph(&graph_text.join("\n")).map_err(|e| (graph_at + e.line, e.msg))?;
    let mut expect = String::new();
    for (i, l) in lines.iter().enumerate().skip(expect_at + 1) {
        match l.strip_prefix("; ") {
            Some(rest) => expect.push_str(rest),
            None if *l == ";" => {}
            None => return Err((i + 1, format!("expected output lines start with '; ' (or are ';'), found '{l}'"))),
        }
        expect.push('\n');
    }
    let body = lines[..expect_at].join("\n").trim_end().to_string() + "\n";
    Ok(Case { commands, graph, body, expect })
}

/// One command's output on `g`. An error is a broken case (not output to bless).
fn run(cmd: &str, g: &Graph) -> Result<String, String> {
    let checked = || verify(g).map_err(|errs| format!("the graph fails verification:\n  {}", errs.join("\n  ")));
    match cmd {
        "verify" => Ok(verify(g).map_or_else(|errs| errs.join("\n") + "\n", |()| "ok\n".into())),
        "autodiff" => {
            checked()?;
            let mut g = g.clone();
            vpmoe_compiler::autodiff::autodiff(&mut g).map_err(|e| format!("autodiff: {e:#}"))?;
            verify(&g)
                .map_err(|errs| format!("the graph fails verification after autodiff:\n  {}", errs.join("\n  ")))?;
            Ok(g.to_text())
        }
        "lower" => checked().map(|()| schedule(g).steps_text(g)),
        "plan" => checked().map(|()| schedule(g).memory_text(g)),
        _ => unreachable!("commands are checked when parsed"),
    }
}

/// The output of every command of the case, one `[COMMAND]` section each when there are several.
fn output(case: &Case) -> Result<String, String> {
    let mut out = String::new();
    for cmd in &case.commands {
        if case.commands.len() > 1 {
            out.push_str(&format!("[{cmd}]\n"));
        }
        let res = catch_unwind(AssertUnwindSafe(|| run(cmd, &case.graph)));
        let text = res.unwrap_or_else(|p| {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("{cmd} panicked: {}", msg.unwrap_or_default()))
        })?;
        out.push_str(&text);
    }
    Ok(out)
}

/// The case's file with `actual` as its expect block.
fn blessed(case: &Case, actual: &str) -> String {
    let mut s = format!("{}{EXPECT}\n", case.body);
    for l in actual.lines() {
        s.push_str(if l.is_empty() { ";" } else { "; " });
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// `None` when the file passes (or was blessed), else why not.
fn check(path: &Path, name: &str, bless: bool) -> Option<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let case = match parse_case(&text) {
        Ok(c) => c,
        Err((line, msg)) => return Some(format!("{name}:{line}: {msg}")),
    };
    let actual = match output(&case) {
        Ok(a) => a,
        Err(msg) => return Some(format!("{name}: {msg}")),
    };
    if actual == case.expect {
        return None;
    }
    if bless {
        std::fs::write(path, blessed(&case, &actual)).unwrap_or_else(|e| panic!("{name}: {e}"));
        return None;
    }
    let diff = similar::TextDiff::from_lines(&case.expect, &actual);
    Some(format!("{name}: output differs\n{}", diff.unified_diff().context_radius(3).header("expected", "actual")))
}

#[test]
fn filetests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = root.join("tests/filetests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "vpir"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no filetests in {}", dir.display());
    let bless = std::env::var_os("VPMOE_BLESS").is_some();
    let mut failed = Vec::new();
    for path in &files {
        let name = path.strip_prefix(root).unwrap().display().to_string();
        if let Some(msg) = check(path, &name, bless) {
            eprintln!("{msg}");
            failed.push(name);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} filetests failed (VPMOE_BLESS=1 cargo test -p vpmoe-compiler --test filetests accepts \
         the actual output):\n  {}",
        failed.len(),
        files.len(),
        failed.join("\n  ")
    );
}

#[test]
fn case_format_errors_name_their_line() {
    let good = "; comment\ntest verify\n\ngraph g\n  input $x: bf16[T,8] data\n  output x = $x\n; expect:\n; ok\n";
    let case = parse_case(good).unwrap();
    assert_eq!((case.commands, case.expect.as_str()), (vec!["verify".to_string()], "ok\n"));
    assert_eq!(blessed(&parse_case(good).unwrap(), "ok\n\nx\n"), good.replace("; ok\n", "; ok\n;\n; x\n"));
    let cases = [
        ("test verify", "test fold", 2, "unknown command 'fold' (expected one of verify, autodiff, lower, plan)"),
        ("test verify", "", 1, "no 'test COMMAND' line"),
        ("; comment", "comment", 1, "expected '; comment', 'test COMMAND' or 'graph NAME', found 'comment'"),
        ("bf16[T,8]", "bf16[T,y]", 5, "bad type 'bf16[T,y]' (expected e.g. bf16[T,512])"),
        ("  input $x: bf16[T,8] data\n", "  ; a comment\n\n", 7, "value $x used before definition"),
        ("; ok", "ok", 8, "expected output lines start with '; ' (or are ';'), found 'ok'"),
    ];
    for (from, to, line, msg) in cases {
        let text = good.replacen(from, to, 1);
        assert_eq!(parse_case(&text).err(), Some((line, msg.to_string())), "{text}");
    }
}
