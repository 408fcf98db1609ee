//! The rung ladder (docs/rungs.md): every shipped rung compiles at full size and trains a few
//! steps shrunk; a Qwen3-shaped Hugging Face checkpoint written here imports into the matching
//! config and gives the logits of an independent forward of the same weights; bad checkpoints and
//! mismatched architectures are refused by name before anything is written.

mod common;

use common::{root, tmp};
use half::bf16;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use vpmoe_compiler::{compile_arch, config};
use vpmoe_ir::rng::Rng;
use vpmoe_runtime::cpu::CpuBackend;
use vpmoe_runtime::decode::{Decoder, Tok};
use vpmoe_runtime::import::import_to;
use vpmoe_runtime::state::TrainState;
use vpmoe_runtime::train;

const RUNGS: [&str; 4] = ["qwen3-0_6B-o200k", "vpDense0-5_28", "vpDense_28", "vpDense_80"];

/// `text` with the value of every `key = …` line replaced.
fn set(text: &str, key: &str, value: &str) -> String {
    text.lines()
        .map(
            |l| {
                if l.split('=').next().is_some_and(|k| k.trim() == key) {
                    format!("{key} = {value}")
                } else {
                    l.into()
                }
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// A rung's config with small shapes (its features kept).
fn shrunk(text: &str, vocab: u64) -> String {
    let mut t = text.to_string();
    for (k, v) in [
        ("num_layers", "4"),
        ("hidden_size", "32"),
        ("head_dim", "16"),
        ("ffn_hidden_size", "48"),
        ("max_sequence_length", "64"),
        ("window_size", "16"),
        ("vocab_size", &vocab.to_string()),
    ] {
        t = set(&t, k, v);
    }
    t
}

#[test]
fn every_rung_compiles_and_trains_a_few_steps_shrunk() {
    for rung in RUNGS {
        let text = std::fs::read_to_string(root().join(format!("configs/rungs/{rung}.toml"))).unwrap();
        let full = config::parse(&text, rung, Path::new(".")).unwrap();
        compile_arch(&full).unwrap_or_else(|e| panic!("{rung}: {e:#}"));
        let small = config::parse(&shrunk(&text, 512), rung, Path::new(".")).unwrap();
        let (g, plan) = compile_arch(&small).unwrap();
        let (c, o) = common::run_config(4, 2, 32, tmp(&format!("rung-{rung}")));
        let mut be = CpuBackend::new(&g, &plan, TrainState::init(&plan, c.seed));
        let out = train::train(&mut be, &plan, &common::sample_data_for(plan.arch.vocab), &c, &o).unwrap();
        let losses: Vec<f64> = out.records.iter().map(|r| r.loss).collect();
        assert!(losses.len() == 4 && losses.iter().all(|l| l.is_finite()), "{rung}: {losses:?}");
        assert!(losses[3] < losses[0], "{rung}: the loss does not fall: {losses:?}");
    }
}

/// A Qwen3 checkpoint's shape, as config.json says it.
struct Qwen {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    theta: f64,
    eps: f64,
}

const TINY: Qwen =
    Qwen { layers: 2, hidden: 32, heads: 4, kv: 2, head_dim: 16, ffn: 48, vocab: 201_088, theta: 1e6, eps: 1e-6 };

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Seeded bf16-exact weights of a tied Qwen3 checkpoint (gate included).
fn qwen_weights(q: &Qwen, seed: u64) -> Tensors {
    let mut r = Rng::new(seed);
    let mut w = Tensors::new();
    let mut put = |name: String, shape: Vec<usize>, center: f32, spread: f32| {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| bf16::from_f32(center + spread * (r.uniform() as f32 - 0.5)).to_f32()).collect();
        w.insert(name, (shape, v));
    };
    let (h, d) = (q.hidden, q.head_dim);
    put("model.embed_tokens.weight".into(), vec![q.vocab, h], 0.0, 2.0);
    put("model.norm.weight".into(), vec![h], 1.0, 0.4);
    let proj = 2.0 / (h as f32).sqrt();
    for l in 0..q.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        put(p("input_layernorm.weight"), vec![h], 1.0, 0.4);
        put(p("post_attention_layernorm.weight"), vec![h], 1.0, 0.4);
        put(p("self_attn.q_proj.weight"), vec![q.heads * d, h], 0.0, proj);
        put(p("self_attn.k_proj.weight"), vec![q.kv * d, h], 0.0, proj);
        put(p("self_attn.v_proj.weight"), vec![q.kv * d, h], 0.0, proj);
        put(p("self_attn.o_proj.weight"), vec![h, q.heads * d], 0.0, proj);
        put(p("self_attn.q_norm.weight"), vec![d], 1.0, 0.4);
        put(p("self_attn.k_norm.weight"), vec![d], 1.0, 0.4);
        put(p("mlp.gate_proj.weight"), vec![q.ffn, h], 0.0, proj);
        put(p("mlp.up_proj.weight"), vec![q.ffn, h], 0.0, proj);
        put(p("mlp.down_proj.weight"), vec![h, q.ffn], 0.0, 2.0 / (q.ffn as f32).sqrt());
    }
    w
}

/// Writes `w` as a Hugging Face checkpoint in two shards with an index.
fn write_hf(dir: &Path, q: &Qwen, w: &Tensors) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": false,
        "hidden_size": q.hidden, "num_hidden_layers": q.layers, "num_attention_heads": q.heads,
        "num_key_value_heads": q.kv, "head_dim": q.head_dim, "intermediate_size": q.ffn,
        "vocab_size": q.vocab, "rms_norm_eps": q.eps, "rope_theta": q.theta, "rope_scaling": null,
        "tie_word_embeddings": true, "hidden_act": "silu", "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut map = serde_json::Map::new();
    for (i, part) in [false, true].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = w
            .iter()
            .filter(|(n, _)| n.contains("embed") == part)
            .map(|(n, (s, v))| {
                (n.clone(), s.clone(), v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect())
            })
            .collect();
        let views: Vec<(String, TensorView)> =
            bytes.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::BF16, s.clone(), b).unwrap())).collect();
        std::fs::write(dir.join(&file), safetensors::serialize(views, None).unwrap()).unwrap();
        for (n, ..) in &bytes {
            map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// The rung-1 config at `q`'s shape.
fn qwen_arch(q: &Qwen) -> String {
    let text = std::fs::read_to_string(root().join("configs/rungs/qwen3-0_6B-o200k.toml")).unwrap();
    let mut t = text;
    for (k, v) in [
        ("num_layers", q.layers),
        ("hidden_size", q.hidden),
        ("num_attention_heads", q.heads),
        ("num_query_groups", q.kv),
        ("head_dim", q.head_dim),
        ("ffn_hidden_size", q.ffn),
        ("max_sequence_length", 1024),
    ] {
        t = set(&t, k, &v.to_string());
    }
    t
}

fn rms(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * inv * g as f64).collect()
}

/// `y = W·x` for `W` `[n, k]`.
fn mv(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks(x.len()).map(|row| row.iter().zip(x).map(|(&a, b)| a as f64 * b).sum()).collect()
}

/// Qwen3 with the gate dropped (ReLU²(up·x)), in f64, straight from the Hugging Face tensors:
/// the logits after every token.
fn independent_forward(q: &Qwen, w: &Tensors, tokens: &[u32]) -> Vec<Vec<f64>> {
    let t_ = |n: &str| &w[n].1;
    let (h, d, nh, ng) = (q.hidden, q.head_dim, q.heads, q.kv);
    let emb = t_("model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> =
        tokens.iter().map(|&t| emb[t as usize * h..][..h].iter().map(|&v| v as f64).collect()).collect();
    let rope = |u: &mut [f64], pos: usize| {
        for i in 0..d / 2 {
            let th = pos as f64 * q.theta.powf(-2.0 * i as f64 / d as f64);
            let (a, b) = (u[i], u[i + d / 2]);
            u[i] = a * th.cos() - b * th.sin();
            u[i + d / 2] = b * th.cos() + a * th.sin();
        }
    };
    for l in 0..q.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (pos, xt) in x.iter().enumerate() {
            let a = rms(xt, t_(&p("input_layernorm.weight")), q.eps);
            let mut qq = mv(t_(&p("self_attn.q_proj.weight")), &a);
            let mut kk = mv(t_(&p("self_attn.k_proj.weight")), &a);
            for hh in qq.chunks_mut(d) {
                let n = rms(hh, t_(&p("self_attn.q_norm.weight")), q.eps);
                hh.copy_from_slice(&n);
                rope(hh, pos);
            }
            for g in kk.chunks_mut(d) {
                let n = rms(g, t_(&p("self_attn.k_norm.weight")), q.eps);
                g.copy_from_slice(&n);
                rope(g, pos);
            }
            qs.push(qq);
            ks.push(kk);
            vs.push(mv(t_(&p("self_attn.v_proj.weight")), &a));
        }
        for t in 0..x.len() {
            let mut o = vec![0f64; nh * d];
            for hh in 0..nh {
                let g = hh / (nh / ng);
                let s: Vec<f64> = (0..=t)
                    .map(|u| (0..d).map(|i| qs[t][hh * d + i] * ks[u][g * d + i]).sum::<f64>() / (d as f64).sqrt())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for (u, sv) in s.iter().enumerate() {
                    for i in 0..d {
                        o[hh * d + i] += (sv - m).exp() / z * vs[u][g * d + i];
                    }
                }
            }
            let y = mv(t_(&p("self_attn.o_proj.weight")), &o);
            x[t].iter_mut().zip(y).for_each(|(a, b)| *a += b);
            let b = rms(&x[t], t_(&p("post_attention_layernorm.weight")), q.eps);
            let up: Vec<f64> = mv(t_(&p("mlp.up_proj.weight")), &b).into_iter().map(|v| v.max(0.0).powi(2)).collect();
            let y = mv(t_(&p("mlp.down_proj.weight")), &up);
            x[t].iter_mut().zip(y).for_each(|(a, b)| *a += b);
        }
    }
    x.iter().map(|xt| mv(emb, &rms(xt, t_("model.norm.weight"), q.eps))).collect()
}

#[test]
fn a_qwen3_checkpoint_imports_and_gives_the_independent_forwards_logits() {
    let dir = tmp("hf-qwen3");
    let w = qwen_weights(&TINY, 7);
    write_hf(&dir.join("hf"), &TINY, &w);
    let arch = config::parse(&qwen_arch(&TINY), "qwen3-tiny", Path::new(".")).unwrap();
    let (g, plan) = compile_arch(&arch).unwrap();
    let out = dir.join("ckpt");
    let _ = std::fs::remove_dir_all(&out);
    let (path, imported) = import_to(&dir.join("hf"), &plan, &out).unwrap();
    assert!(path.starts_with(&out));
    let dropped: Vec<&str> = imported.dropped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(dropped, ["model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate_proj.weight"]);
    let derived: Vec<&str> = imported.derived.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(derived, ["rotary_pos_emb.log_freq", "output_layer.weight"]);
    assert_eq!(imported.sources.len(), 3, "config.json and two shards");

    // The checkpoint loads as any other and its logits are the independent forward's.
    let (_, state) = vpmoe_runtime::decode::sample::load_checkpoint(&out, &plan).unwrap();
    let tokens: Vec<u32> = [3u32, 200_000, 17, 17, 99_001, 5, 42, 8].to_vec();
    let want = independent_forward(&TINY, &w, &tokens);
    let mut dec = Decoder::new(&g, &plan, &state, 1).unwrap();
    let toks: Vec<Tok> =
        tokens.iter().enumerate().map(|(pos, &token)| Tok { slot: 0, pos, token, logits: true }).collect();
    let got = dec.step(&toks).unwrap();
    let scale = want.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1.0, "logits of a real spread: {scale}");
    let mut worst = 0f64;
    for (row, w) in got.chunks(TINY.vocab).zip(&want) {
        for (a, b) in row.iter().zip(w) {
            worst = worst.max((*a as f64 - b).abs());
        }
    }
    assert!(worst <= 1e-4 * scale, "worst logit difference {worst:.3e} (largest logit {scale:.3})");
    eprintln!("import: worst |logit − independent| = {worst:.2e} of logits up to {scale:.2}");
}

#[test]
fn mismatched_or_damaged_checkpoints_are_refused_before_anything_is_written() {
    let dir = tmp("hf-bad");
    let arch = config::parse(&qwen_arch(&TINY), "qwen3-tiny", Path::new(".")).unwrap();
    let (_, plan) = compile_arch(&arch).unwrap();
    let refuse = |q: &Qwen, w: &Tensors, want: &str| {
        let (hf, out) = (dir.join("hf"), dir.join("out"));
        write_hf(&hf, q, w);
        let _ = std::fs::remove_dir_all(&out);
        let err = format!("{:#}", import_to(&hf, &plan, &out).err().unwrap_or_else(|| panic!("{want}: imported")));
        assert!(err.contains(want), "want {want:?} in: {err}");
        assert!(!out.join("step_00000000").exists(), "{want}: a checkpoint was written");
    };
    let small_vocab = Qwen { vocab: 1000, ..TINY };
    refuse(&small_vocab, &qwen_weights(&small_vocab, 1), "vocabulary has 1000 rows");
    let wide = Qwen { ffn: 64, ..TINY };
    refuse(&wide, &qwen_weights(&wide, 1), "FFN width: checkpoint 64");
    let base = Qwen { theta: 10_000.0, ..TINY };
    refuse(&base, &qwen_weights(&base, 1), "rotary_base = 10000");
    let mut w = qwen_weights(&TINY, 1);
    w.get_mut("model.layers.1.self_attn.k_proj.weight").unwrap().0 = vec![16, 64];
    refuse(&TINY, &w, "model.layers.1.self_attn.k_proj.weight has shape [16, 64]");
    let mut w = qwen_weights(&TINY, 1);
    w.insert("model.layers.0.mlp.extra.weight".into(), (vec![2], vec![0.0, 1.0]));
    refuse(&TINY, &w, "model.layers.0.mlp.extra.weight has no place");
    let mut w = qwen_weights(&TINY, 1);
    w.remove("model.norm.weight");
    refuse(&TINY, &w, "no tensor model.norm.weight");
    let mut w = qwen_weights(&TINY, 1);
    w.get_mut("model.norm.weight").unwrap().1[3] = f32::NAN;
    refuse(&TINY, &w, "model.norm.weight holds a non-finite value");
    // Damaged files: another model type, a truncated shard.
    let (hf, out) = (dir.join("hf"), dir.join("out"));
    let damaged = |what: &str, want: &str, damage: &dyn Fn()| {
        write_hf(&hf, &TINY, &qwen_weights(&TINY, 1));
        damage();
        let _ = std::fs::remove_dir_all(&out);
        let err = format!("{:#}", import_to(&hf, &plan, &out).err().unwrap_or_else(|| panic!("{what}: imported")));
        assert!(err.contains(want), "{what}: want {want:?} in: {err}");
        assert!(!out.join("step_00000000").exists(), "{what}: a checkpoint was written");
    };
    damaged("llama", "model_type \"llama\"", &|| {
        let c = std::fs::read_to_string(hf.join("config.json")).unwrap();
        std::fs::write(hf.join("config.json"), c.replace("\"qwen3\"", "\"llama\"")).unwrap();
    });
    damaged("truncated", "model-00001-of-00002.safetensors: not safetensors", &|| {
        let f = hf.join("model-00001-of-00002.safetensors");
        let b = std::fs::read(&f).unwrap();
        std::fs::write(&f, &b[..b.len() / 2]).unwrap();
    });
    damaged("missing shard", "model-00002-of-00002.safetensors is listed but missing", &|| {
        std::fs::remove_file(hf.join("model-00002-of-00002.safetensors")).unwrap();
    });
    damaged("sliding window", "use_sliding_window is true", &|| {
        let c = std::fs::read_to_string(hf.join("config.json")).unwrap();
        std::fs::write(hf.join("config.json"), c.replacen("{", "{\"use_sliding_window\": true,", 1)).unwrap();
    });
    // An untied checkpoint into an architecture that ties its head.
    let tied = config::parse(&set(&qwen_arch(&TINY), "untied_embeddings", "false"), "qwen3-tied", Path::new("."));
    let (_, tied) = compile_arch(&tied.unwrap()).unwrap();
    let mut w = qwen_weights(&TINY, 1);
    let head = w["model.embed_tokens.weight"].clone();
    w.insert("lm_head.weight".into(), head);
    write_hf(&hf, &TINY, &w);
    let c = std::fs::read_to_string(hf.join("config.json")).unwrap();
    std::fs::write(
        hf.join("config.json"),
        c.replace("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false"),
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&out);
    let err = format!("{:#}", import_to(&hf, &tied, &out).err().expect("refused"));
    assert!(err.contains("ties it to the embedding") && !out.join("step_00000000").exists(), "{err}");
}

/// The command line: `import hf`, then `train --init` from its checkpoint; a second import
/// into the same directory is refused and leaves it as it was.
#[test]
fn import_hf_then_train_from_it() {
    let dir = tmp("hf-cli");
    write_hf(&dir.join("hf"), &TINY, &qwen_weights(&TINY, 3));
    let arch = dir.join("qwen3-tiny.toml");
    std::fs::write(&arch, qwen_arch(&TINY)).unwrap();
    let out = dir.join("ckpt");
    let _ = std::fs::remove_dir_all(&out);
    let rt = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_vpmoe-rt")).current_dir(root()).args(args).output().unwrap();
        (o.status.code(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    let s = |p: &Path| p.display().to_string();
    let import = ["import", "hf", "--from", &s(&dir.join("hf")), "--arch", &s(&arch), "--out", &s(&out)];
    let (code, text) = rt(&import);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("dropped model.layers.1.mlp.gate_proj.weight: SwiGLU's gate"), "{text}");
    let before = std::fs::read(out.join("step_00000000/state.safetensors")).unwrap();
    let (code, text) = rt(&import);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("already holds checkpoints") && !text.contains("panicked"), "{text}");
    assert_eq!(std::fs::read(out.join("step_00000000/state.safetensors")).unwrap(), before);
    // Upcycled into 4 layers of 8 experts (24 wide, top 2) with the 48-wide MLP as shared expert.
    let moe = dir.join("qwen3-tiny-moe.toml");
    let block =
        "[moe]\nnum_experts = 8\ntopk = 2\nshared_expert = true\nshared_expert_size = 48\nfirst_layer_dense = true\n\
                 router_score_function = \"sigmoid\"\nrouter_load_balancing_type = \"none\"\n\
                 router_enable_expert_bias = true\n\n[optimizer]";
    let moe_text = set(&qwen_arch(&TINY), "num_layers", "4").replace("[optimizer]", block);
    std::fs::write(&moe, set(&moe_text, "ffn_hidden_size", "24")).unwrap();
    let up = dir.join("moe");
    let _ = std::fs::remove_dir_all(&up);
    let (code, text) =
        rt(&["upcycle", "--from", &s(&out), "--from-arch", &s(&arch), "--arch", &s(&moe), "--out", &s(&up)]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("source layers placed: 1→1 2→4; 2 new identity layers"), "{text}");
    for (from, cfg) in [(&out, &arch), (&up, &moe)] {
        let run = dir.join("run");
        let _ = std::fs::remove_dir_all(&run);
        let init = s(from);
        let args = ["--init", &init, "--steps", "2", "--warmup", "0", "--micro-batch", "1", "--seq-len", "1024"];
        let (code, text) =
            rt(&[&["train", "--backend", "cpu", "--arch", &s(cfg), "--ckpt-dir", &s(&run)][..], &args[..]].concat());
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains(&format!("initialised from {}", from.join("step_00000000").display())), "{text}");
    }
}

/// tiny_moe's attention (TPA on window layers, ALiBi on global ones, value residual, sinks) with
/// `layers` layers: dense with an MLP of 16 when `moe` is None, else routed experts of width
/// `w` (8 of them, top-2) and a shared expert of 16.
fn tiny(layers: u64, moe: Option<u64>) -> (vpmoe_ir::Graph, vpmoe_compiler::Plan) {
    let text = std::fs::read_to_string(root().join("tests/configs/tiny_moe.toml")).unwrap();
    let (head, tail) = text.split_at(text.find("[moe]").unwrap());
    let optimizer = &tail[tail.find("[optimizer]").unwrap()..];
    let mut t = match moe {
        None => format!("{head}{optimizer}"),
        Some(w) => set(&set(&text, "ffn_hidden_size", &w.to_string()), "shared_expert_size", "16"),
    };
    t = set(&set(&t, "num_layers", &layers.to_string()), "max_sequence_length", "64");
    if moe.is_none() {
        t = set(&t, "ffn_hidden_size", "16");
    }
    compile_arch(&config::parse(&t, "tiny", Path::new(".")).unwrap()).unwrap()
}

/// The logits after each of `tokens` (one sequence) of a model.
fn logits(g: &vpmoe_ir::Graph, plan: &vpmoe_compiler::Plan, st: &TrainState, tokens: &[u32]) -> Vec<f32> {
    let mut dec = Decoder::new(g, plan, st, 1).unwrap();
    let toks: Vec<Tok> =
        tokens.iter().enumerate().map(|(pos, &token)| Tok { slot: 0, pos, token, logits: true }).collect();
    dec.step(&toks).unwrap()
}

/// A dense model with weights away from their initialisation (biases and all), so that every
/// part of it shows in the logits.
fn trained_like(plan: &vpmoe_compiler::Plan) -> TrainState {
    let mut st = TrainState::init(plan, 5);
    let mut r = Rng::new(9);
    for (p, w) in plan.params.iter().zip(&mut st.master) {
        let s = if p.name.contains("layernorm") { 0.3 } else { 0.2 };
        w.iter_mut().for_each(|x| *x += s * (r.uniform() as f32 - 0.5));
    }
    st
}

#[test]
fn upcycling_grows_depth_and_turns_mlps_into_experts_computing_the_same_function() {
    let (gs, src) = tiny(4, None);
    let st = trained_like(&src);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 512).collect();
    let want = logits(&gs, &src, &st, &tokens);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();

    // 4 → 10 layers: the same logits, bit for bit.
    let (gt, grown) = tiny(10, None);
    let up = vpmoe_runtime::upcycle::upcycle(&src, &st, &grown, 1).unwrap();
    let placed: Vec<usize> = up.layers.iter().enumerate().filter(|(_, l)| !l.1).map(|(t, _)| t).collect();
    assert_eq!(placed.len(), 4, "{:?}", up.layers);
    for (t, &(s, _)) in up.layers.iter().enumerate() {
        assert_eq!(grown.arch.local[t], src.arch.local[s], "target layer {} keeps its source's kind", t + 1);
    }
    assert_eq!(
        bits(&logits(&gt, &grown, &up.state, &tokens)),
        bits(&want),
        "the grown model computes the same function"
    );

    // Dense → MoE with whole-width experts: the same logits.
    let (gm, moe) = tiny(4, Some(16));
    let up = vpmoe_runtime::upcycle::upcycle(&src, &st, &moe, 1).unwrap();
    let got = logits(&gm, &moe, &up.state, &tokens);
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst == 0.0, "the MoE model computes the dense one's function: worst difference {worst:e}");

    // Experts of half the width: each holds one half of the dense MLP's units (plus noise), and
    // the first, dense layer keeps the 8 units with the largest output norms.
    let (gm, moe) = tiny(4, Some(8));
    let up = vpmoe_runtime::upcycle::upcycle(&src, &st, &moe, 1).unwrap();
    let at = |plan: &vpmoe_compiler::Plan, st: &TrainState, n: &str| {
        st.master[plan.params.iter().position(|p| p.name == n).unwrap_or_else(|| panic!("{n}"))].clone()
    };
    let dense = at(&src, &st, "decoder.layers.2.mlp.linear_fc1.weight");
    let experts = at(&moe, &up.state, "decoder.layers.2.mlp.experts.linear_fc1.weight");
    for (e, chunk) in experts.chunks(8 * 32).enumerate() {
        let part = &dense[(e % 2) * 8 * 32..][..8 * 32];
        let off = chunk.iter().zip(part).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(off > 0.0 && off < 1e-3, "expert {e}: {off}");
    }
    assert!(at(&moe, &up.state, "decoder.layers.2.mlp.experts.linear_fc2.weight").iter().all(|&x| x == 0.0));
    assert_eq!(at(&moe, &up.state, "decoder.layers.2.mlp.shared_experts.linear_fc1.weight"), dense);
    assert_eq!(at(&moe, &up.state, "decoder.layers.0.mlp.linear_fc1.weight").len(), 8 * 32);
    assert!(up.made.iter().any(|(n, how)| n == "decoder.layers.0.mlp.linear_fc1.weight" && how.contains("largest")));

    // Routing starts balanced: one training step's loads spread over every expert (the same
    // model with a zero router sends every token to experts 0 and 1).
    let entropy = |st: TrainState| {
        let (c, o) = common::run_config(3, 2, 32, tmp("upcycle-route"));
        let mut be = CpuBackend::new(&gm, &moe, st);
        let out = train::train(&mut be, &moe, &common::sample_data_for(512), &c, &o).unwrap();
        out.records[0].router_layers.iter().map(|(_, h)| h.entropy).fold(1f64, f64::min)
    };
    let mut flat = up.state.clone();
    for (p, w) in moe.params.iter().zip(&mut flat.master) {
        if p.name.ends_with("mlp.router.weight") {
            w.fill(0.0);
        }
    }
    let (balanced, control) = (entropy(up.state.clone()), entropy(flat));
    assert!(balanced > 0.9 && control < 0.5, "load entropy {balanced:.3} upcycled, {control:.3} with a zero router");
    eprintln!("upcycle: lowest layer's load entropy {balanced:.3} (1 = uniform), {control:.3} with a zero router");

    // Refused: a source that is already MoE, a shrinking depth, an attention that differs.
    let err = |r: anyhow::Result<vpmoe_runtime::upcycle::Upcycled>| format!("{:#}", r.err().expect("refused"));
    assert!(err(vpmoe_runtime::upcycle::upcycle(&moe, &up.state, &src, 1)).contains("starts from a dense one"));
    assert!(err(vpmoe_runtime::upcycle::upcycle(&grown, &TrainState::init(&grown, 1), &src, 1))
        .contains("never removes layers"));
    let (_, other) = compile_arch(&config::parse(&qwen_arch(&TINY), "qwen", Path::new(".")).unwrap()).unwrap();
    assert!(err(vpmoe_runtime::upcycle::upcycle(&src, &st, &other, 1)).contains("architectures differ"));
}
