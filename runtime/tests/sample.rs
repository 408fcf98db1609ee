//! `vpmoe-rt sample` end to end: a checkpoint trained by `train` (which itself ends by answering
//! a question), Harmony prompts in both forms, JSONL records with parsed messages and verdicts,
//! and each kind of bad input refused by name without touching an existing output.

mod common;

use common::{root, sample_data, tmp};
use std::path::Path;
use std::process::{Command, Output};

fn rt<P: AsRef<std::ffi::OsStr>>(args: &[&str], extra: &[P]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpmoe-rt")).current_dir(root()).args(args).args(extra).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Held-out windows of 32 tokens: nine cover the sample's three held-out documents, with both
/// spans and documents that start inside a row.
const EVAL_BATCHES: usize = 9;
const EVAL_BATCHES_ARG: &str = "9";

#[test]
fn sample_continues_prompts_from_a_trained_checkpoint() {
    let dir = tmp("sample");
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "\"What is the capital of France?\"\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi.\"}]}\n",
    )
    .unwrap();
    let train = rt(
        &["train", "--backend", "cpu", "--steps", "1", "--warmup", "0", "--eval-every", "1", "--micro-batch", "1"],
        &[
            Path::new("--eval-batches"),
            Path::new(EVAL_BATCHES_ARG),
            Path::new("--grad-accum"),
            Path::new("1"),
            Path::new("--seq-len"),
            Path::new("32"),
            Path::new("--data"),
            &sample_data()[0].0,
            Path::new("--ckpt-dir"),
            &run,
            Path::new("--canary"),
            Path::new("data/canary.jsonl"),
            Path::new("--eval-prompts"),
            &prompts,
        ],
    );
    assert!(train.status.success(), "{}", text(&train));
    // Every evaluation also reports the canary loss and the greedy answers' validity.
    let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
    assert!(first["eval"]["canary_loss"].as_f64().unwrap() > 0.0 && first["eval"]["valid_rate"].is_number(), "{m}");
    assert!(text(&train).contains("sample (greedy, ≤ 48 tokens) \"What is 2 + 2?\" -> "), "{}", text(&train));

    // The run's picture: every panel drawn, with data.
    let plot = rt(&["plot"], &[&run]);
    assert!(plot.status.success() && text(&plot).contains("8 panels -> "), "{}", text(&plot));
    let page = std::fs::read_to_string(run.join("plot.html")).unwrap();
    let sections: Vec<&str> = page.split("<section").skip(1).collect();
    assert_eq!(sections.len(), 8);
    let data = |p: &str| p.contains("<polyline") || p.contains("<circle") || p.matches("<rect").count() > 2;
    assert!(sections.iter().all(|p| data(p)), "a panel without data");

    let out = dir.join("out.jsonl");
    let args = ["sample", "--backend", "cpu", "--max-new-tokens", "6", "--batch", "2", "--seed", "3"];
    let flags = |p: &Path| -> Vec<std::path::PathBuf> {
        ["--checkpoint".as_ref(), run.as_path(), "--prompts".as_ref(), p, "--out".as_ref(), out.as_path()]
            .iter()
            .map(|x: &&Path| x.to_path_buf())
            .collect()
    };
    let o = rt(&args, &flags(&prompts));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 samples: "), "{}", text(&o));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!((lines[0]["line"].as_u64(), lines[1]["line"].as_u64()), (Some(1), Some(3)));
    for l in &lines {
        let n = l["tokens"].as_array().unwrap().len();
        assert!((1..=6).contains(&n));
        assert_eq!(l["logprobs"].as_array().unwrap().len(), n);
        assert!(l["logprobs"].as_array().unwrap().iter().all(|x| x.as_f64().unwrap() <= 0.0));
        assert!(l["verdict"]["valid"].is_boolean() && l["finish"].is_string() && l["messages"].is_array());
    }
    let first = std::fs::read(&out).unwrap();
    // The same seed gives the same file.
    let o = rt(&args, &flags(&prompts));
    assert!(o.status.success());
    assert_eq!(std::fs::read(&out).unwrap(), first);

    // Bad input: each named, the existing output untouched.
    let bad = |content: &str, want: &str| {
        let p = dir.join("bad.jsonl");
        std::fs::write(&p, content).unwrap();
        let o = rt(&args, &flags(&p));
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains(want), "want {want:?} in {}", text(&o));
        assert!(!text(&o).contains("panicked"));
        assert_eq!(std::fs::read(&out).unwrap(), first, "a failed run left the output as it was");
    };
    bad("", "no prompts");
    bad("\"ok\"\n{not json\n", "bad.jsonl:2: not JSON");
    bad("\"ok\"\n[1, 2]\n", "bad.jsonl:2: a prompt is a JSON string");
    bad("{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n", "bad.jsonl:1: not a Harmony conversation");
    bad(&format!("{:?}\n", "word ".repeat(5000)), "the prompt on line 1 renders to");
    let o = rt(&["sample", "--backend", "cpu", "--arch", "tests/configs/tiny_moe.toml"], &flags(&prompts));
    assert!(text(&o).contains("trained with another architecture"), "{}", text(&o));
    if !vpmoe_runtime::cuda::gpu_available() {
        let o = rt(&["sample", "--backend", "cuda"], &flags(&prompts));
        assert!(
            text(&o).contains("the cuda backend needs an NVIDIA GPU") && text(&o).contains("--backend cpu"),
            "{}",
            text(&o)
        );
        assert_eq!(std::fs::read(&out).unwrap(), first, "nothing sampled on another backend");
    }
    let o = rt(&["sample", "--backend", "cpu", "--top-p", "0"], &flags(&prompts));
    assert!(text(&o).contains("--top-p 0 must be in (0, 1]"), "{}", text(&o));

    // score: token ids, text and a conversation; bad lines named.
    let input = dir.join("score.jsonl");
    std::fs::write(
        &input,
        "{\"tokens\": [1, 2, 3]}\n\"Hello there.\"\n{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"channel\": \"final\", \"content\": \"Hello\"}]}\n",
    )
    .unwrap();
    let scores = dir.join("scores.jsonl");
    let sflags = |i: &Path| -> Vec<std::path::PathBuf> {
        ["--checkpoint".as_ref(), run.as_path(), "--input".as_ref(), i, "--out".as_ref(), scores.as_path()]
            .iter()
            .map(|x: &&Path| x.to_path_buf())
            .collect()
    };
    let o = rt(&["score", "--backend", "cpu", "--top-k", "2"], &sflags(&input));
    assert!(o.status.success(), "{}", text(&o));
    let recs: Vec<serde_json::Value> =
        std::fs::read_to_string(&scores).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), 3);
    for r in &recs {
        let n = r["tokens"].as_array().unwrap().len();
        assert_eq!(r["logprobs"].as_array().unwrap().len(), n);
        assert!(r["logprobs"][0].is_null() && r["logprobs"][1].as_f64().unwrap() <= 0.0);
        assert_eq!(r["top"].as_array().unwrap().len(), n);
    }
    assert!(recs[2]["span_id"].as_array().unwrap().iter().any(|x| x == 2), "a conversation's final span");
    for (content, want) in [
        ("{\"tokens\": [1, 999999]}\n", "bad.jsonl:1: token 1 (999999) is not an id below the vocabulary size"),
        ("{\"tokens\": []}\n", "bad.jsonl:1: no tokens"),
        ("7\n", "bad.jsonl:1: a line is"),
    ] {
        let p = dir.join("bad.jsonl");
        std::fs::write(&p, content).unwrap();
        let o = rt(&["score", "--backend", "cpu"], &sflags(&p));
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains(want), "want {want:?} in {}", text(&o));
    }

    // eval: the held-out loss is the run's last evaluation; sampled validity; the tiny tasks.
    let report = dir.join("report.json");
    let o = rt(
        &[
            "eval",
            "--backend",
            "cpu",
            "--samples",
            "2",
            "--max-new-tokens",
            "4",
            "--tasks",
            "tests/tasks/tiny.jsonl",
            "--eval-batches",
            EVAL_BATCHES_ARG,
        ],
        &[
            Path::new("--checkpoint"),
            &run,
            Path::new("--data"),
            &sample_data()[0].0,
            Path::new("--prompts"),
            &prompts,
            Path::new("--out"),
            &report,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("held-out loss") && text(&o).contains("arithmetic"), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(r["held_out"][0]["loss"], last["eval"]["loss"], "eval's held-out loss is the run's");
    // score over the documents of the same held-out windows: the span-normalised mean of its
    // per-token log-probabilities is that loss. Training rotates a row's later documents by their
    // place in the row, a sequence scored alone from position 0; GRAPE is relative, so the two
    // agree to rounding (the first document of each row bit for bit).
    let ckpt = vpmoe_runtime::checkpoint::latest(&run).unwrap().unwrap();
    let cfg: vpmoe_runtime::train::TrainConfig =
        serde_json::from_value(vpmoe_runtime::checkpoint::read_meta(&ckpt).unwrap().train).unwrap();
    let valid = sample_data()[0].0.join("valid");
    let mut reader = vpmoe_data::reader::Reader::open(&[(valid.as_path(), 1.0)], cfg.seq_len, cfg.seed).unwrap();
    let (mut docs, mut targets) = (String::new(), Vec::new());
    for _ in 0..EVAL_BATCHES {
        let b = reader.next_batch(cfg.micro_batch);
        for row in 0..cfg.micro_batch {
            let mut at = row * cfg.seq_len;
            while at < (row + 1) * cfg.seq_len {
                let end =
                    (at..(row + 1) * cfg.seq_len).find(|&i| b.doc[i] != b.doc[at]).unwrap_or((row + 1) * cfg.seq_len);
                let mut toks = b.tokens[at..end].to_vec();
                if b.loss_mask[end - 1] != 0 {
                    toks.push(b.labels[end - 1]); // the document goes on in the next window
                }
                docs += &format!("{{\"tokens\": {toks:?}}}\n");
                targets.push((b.loss_mask[at..end].to_vec(), b.span[at..end].to_vec()));
                at = end;
            }
        }
    }
    let held = dir.join("held_out.jsonl");
    std::fs::write(&held, docs).unwrap();
    let scored = rt(&["score", "--backend", "cpu"], &sflags(&held));
    assert!(scored.status.success(), "{}", text(&scored));
    let (mut sums, mut counts) = ([0f64; 3], [0u64; 3]);
    for (line, (mask, span)) in std::fs::read_to_string(&scores).unwrap().lines().zip(&targets) {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        for (j, (&m, &s)) in mask.iter().zip(span).enumerate() {
            if m != 0 {
                sums[s as usize] -= rec["logprobs"][j + 1].as_f64().unwrap() as f32 as f64;
                counts[s as usize] += 1;
            }
        }
    }
    assert!(counts[1] > 0 && counts[2] > 0, "the held-out windows hold both spans: {counts:?}");
    assert_eq!(counts[1] + counts[2], r["held_out"][0]["tokens"].as_u64().unwrap());
    let (ce_r, ce_f) = (sums[1] / counts[1] as f64, sums[2] / counts[2] as f64);
    let loss = cfg.span_weights[0] as f64 * ce_r + cfg.span_weights[1] as f64 * ce_f;
    let held_out = &r["held_out"][0];
    for (got, want) in [(ce_r, &held_out["ce_reasoning"]), (ce_f, &held_out["ce_final"]), (loss, &held_out["loss"])] {
        let want = want.as_f64().unwrap();
        assert!((got - want).abs() <= 1e-6 * want.abs(), "score's span-normalised mean {got} vs held-out {want}");
    }
    assert_eq!(r["samples"].as_array().unwrap().len(), 2, "greedy and sampled");
    assert_eq!(r["samples"][1]["samples"], 4, "2 prompts × 2 samples");
    assert_eq!(r["tasks"]["arithmetic"]["questions"], 2);
    assert_eq!(r["tasks"]["capitals"]["questions"], 1);
    // The built-in canary set's loss, per document, with the set's hash.
    assert_eq!(r["canary"]["docs"].as_array().unwrap().len(), 8);
    assert!(r["canary"]["loss"].as_f64().unwrap().is_finite() && r["canary"]["sha256"].as_str().unwrap().len() == 64);
    assert!(text(&o).contains("canary loss "), "{}", text(&o));
    let bad = dir.join("bad_canary.jsonl");
    std::fs::write(&bad, "{\"text\": \"too short\"}\n").unwrap();
    let o = rt(&["eval", "--backend", "cpu"], &[Path::new("--checkpoint"), &run, Path::new("--canary"), &bad]);
    assert!(text(&o).contains("bad_canary.jsonl:1: too short to recognise"), "{}", text(&o));
    // A training dataset that contains a canary document is refused, the document named.
    let canary = dir.join("canary.jsonl");
    std::fs::write(&canary, "{\"text\": \"why did they plan to take the eiffel tower down after 20 years\"}\n")
        .unwrap();
    let o = rt(
        &["train", "--backend", "cpu", "--steps", "1", "--warmup", "0"],
        &[
            Path::new("--data"),
            &sample_data()[0].0,
            Path::new("--ckpt-dir"),
            &dir.join("refused"),
            Path::new("--canary"),
            &canary,
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("contains canary document ") && text(&o).contains("canary.jsonl:1"), "{}", text(&o));
    let o = rt(&["eval", "--backend", "cpu"], &[Path::new("--checkpoint"), &run]);
    assert!(text(&o).contains("nothing to evaluate"), "{}", text(&o));
    let p = dir.join("bad_tasks.jsonl");
    std::fs::write(&p, "{\"task\": \"t\", \"context\": \"c\", \"choices\": [\" a\", \" b\"], \"gold\": 2}\n").unwrap();
    let o = rt(&["eval", "--backend", "cpu"], &[Path::new("--checkpoint"), &run, Path::new("--tasks"), &p]);
    assert!(text(&o).contains("bad_tasks.jsonl:1: gold 2 is not one of the 2 choices"), "{}", text(&o));

    // chat: two turns from standard input, then end of input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpmoe-rt"))
        .current_dir(root())
        .args(["chat", "--backend", "cpu", "--max-new-tokens", "5", "--checkpoint"])
        .arg(&run)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"Hello!\n/reset\nWhat is 2 + 2?\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.starts_with("chat with ") && t.contains("(a new conversation)"), "{t}");
    assert!(!t.contains("\x1b["), "no colours when the output is not a terminal: {t}");
    let _ = std::fs::remove_dir_all(&dir);
}
