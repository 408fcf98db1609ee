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
    let run = dir.join("run");
    let (code, text) = rt(&[
        "train",
        "--backend",
        "cpu",
        "--arch",
        &s(&arch),
        "--init",
        &s(&out),
        "--steps",
        "2",
        "--warmup",
        "0",
        "--micro-batch",
        "1",
        "--seq-len",
        "1024",
        "--ckpt-dir",
        &s(&run),
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("initialised from {}", out.join("step_00000000").display())), "{text}");
}
