//! Docs and source comments describe the present; history lives in git. Fails on changelog
//! phrasing in `docs/`, the READMEs and the comments of the Rust, CUDA and C++ sources.

use std::path::{Path, PathBuf};

/// Phrases that narrate a change instead of stating what is (lower case).
const CHANGELOG: &[&str] =
    &["no longer", "used to be", "down from", "previously", "(later)", "once wired", "earlier that day", "until 20"];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !name.starts_with('.') && name != "target" {
                files(&p, out);
            }
        } else if [".rs", ".cuh", ".cpp", ".h", ".md", ".sh"].iter().any(|x| name.ends_with(x)) {
            out.push(p);
        }
    }
}

/// The prose of a line: all of it in Markdown, the comment of a source line (`//` or `#`).
fn prose(path: &Path, line: &str) -> Option<String> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let text = match ext {
        "md" => Some(line),
        "sh" => line.find('#').map(|i| &line[i..]),
        _ => line.find("//").map(|i| &line[i..]),
    };
    text.map(str::to_lowercase)
}

#[test]
fn docs_and_comments_have_no_changelog_phrases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut all = Vec::new();
    for d in ["docs", "ir", "codegen", "compiler", "data", "runtime", "scripts"] {
        files(&root.join(d), &mut all);
    }
    all.push(root.join("README.md"));
    let me = Path::new(file!()).file_name().unwrap();
    let mut hits = Vec::new();
    for path in all.iter().filter(|p| p.file_name() != Some(me)) {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            let Some(p) = prose(path, line) else { continue };
            let numbered_session =
                p.match_indices("session ").any(|(i, m)| p[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()));
            let phrase = CHANGELOG.iter().copied().find(|c| p.contains(c)).or(numbered_session.then_some("session N"));
            if let Some(phrase) = phrase {
                hits.push(format!(
                    "{}:{}: \"{phrase}\": {}",
                    path.strip_prefix(root).unwrap().display(),
                    i + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(hits.is_empty(), "changelog phrasing (say what is, not what changed):\n{}", hits.join("\n"));
}
