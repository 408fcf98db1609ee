//! `vpmoe-rt import hf`: a Hugging Face checkpoint of the Qwen3 family (`config.json` and
//! `*.safetensors`, sharded with `model.safetensors.index.json` or not) as a vpmoe checkpoint
//! with fresh optimizer state, for `train --init`. The mapping (docs/rungs.md) is one to one:
//! every shape and dtype is checked against the plan before anything is written.
//!
//! | vpmoe parameter | Hugging Face tensor |
//! |---|---|
//! | `embedding.word_embeddings.weight` | `model.embed_tokens.weight` |
//! | `decoder.layers.N.input_layernorm.weight` | `model.layers.N.input_layernorm.weight` |
//! | `decoder.layers.N.self_attention.linear_qkv.{weight,bias}` | `q_proj`, `k_proj`, `v_proj` rows packed per KV group: group g's query heads, then its key, then its value |
//! | `decoder.layers.N.self_attention.{q,k}_layernorm.weight` | `self_attn.{q,k}_norm.weight` |
//! | `decoder.layers.N.self_attention.linear_proj.weight` | `self_attn.o_proj.weight` (both `[hidden, heads·head_dim]`) |
//! | `decoder.layers.N.pre_mlp_layernorm.weight` | `post_attention_layernorm.weight` |
//! | `decoder.layers.N.mlp.linear_fc1.weight` | `mlp.up_proj.weight` (SwiGLU's `gate_proj` is dropped: vpmoe's MLP is ReLU²) |
//! | `decoder.layers.N.mlp.linear_fc2.weight` | `mlp.down_proj.weight` |
//! | `decoder.final_layernorm.weight` | `model.norm.weight` |
//! | `output_layer.weight` | `lm_head.weight`, or a copy of `model.embed_tokens.weight` when the checkpoint ties them |
//! | `rotary_pos_emb.log_freq` | none: RoPE's frequencies from `rope_theta`, which must equal `attention.rotary_base` |

use crate::checkpoint;
use crate::state::TrainState;
use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use vpmoe_compiler::Plan;

/// What an import did besides mapping tensors one to one.
pub struct Imported {
    pub state: TrainState,
    /// Hugging Face tensors not carried over, with why.
    pub dropped: Vec<(String, &'static str)>,
    /// vpmoe parameters not read from a tensor, with where they come from.
    pub derived: Vec<(String, &'static str)>,
    /// SHA-256 of `config.json` and of each safetensors file, by file name.
    pub sources: BTreeMap<String, String>,
}

/// The architecture fields of `config.json` an import reads.
struct HfConfig {
    model_type: String,
    hidden: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    ffn: u64,
    vocab: u64,
    eps: f64,
    theta: f64,
    tied: bool,
    attention_bias: bool,
}

fn read_config(dir: &Path) -> Result<(HfConfig, Vec<u8>)> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_slice(&bytes).with_context(|| format!("{}: not JSON", path.display()))?;
    let int = |k: &str| -> Result<u64> {
        v.get(k)
            .and_then(Value::as_u64)
            .with_context(|| format!("{}: `{k}` is missing or not an integer", path.display()))
    };
    let num = |k: &str, default: f64| -> Result<f64> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_f64().with_context(|| format!("{}: `{k}` is not a number", path.display())),
        }
    };
    let flag = |k: &str, default: bool| -> Result<bool> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_bool().with_context(|| format!("{}: `{k}` is not true/false", path.display())),
        }
    };
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
    ensure!(
        matches!(model_type.as_str(), "qwen3" | "qwen2"),
        "{}: model_type {model_type:?}; vpmoe imports the Qwen3 family (\"qwen3\", \"qwen2\")",
        path.display()
    );
    if let Some(s) = v.get("rope_scaling").filter(|s| !s.is_null()) {
        bail!("{}: rope_scaling {s} is set; vpmoe's RoPE has no scaling", path.display());
    }
    if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
        bail!(
            "{}: use_sliding_window is true; vpmoe imports models whose every layer attends globally",
            path.display()
        );
    }
    let (hidden, heads) = (int("hidden_size")?, int("num_attention_heads")?);
    let cfg = HfConfig {
        hidden,
        layers: int("num_hidden_layers")?,
        heads,
        kv_heads: int("num_key_value_heads").or_else(|_| int("num_attention_heads"))?,
        head_dim: match v.get("head_dim") {
            Some(x) if !x.is_null() => int("head_dim")?,
            _ => hidden / heads.max(1),
        },
        ffn: int("intermediate_size")?,
        vocab: int("vocab_size")?,
        eps: num("rms_norm_eps", 1e-6)?,
        theta: num("rope_theta", 10_000.0)?,
        tied: flag("tie_word_embeddings", false)?,
        // Qwen2 has q/k/v biases without saying so; Qwen3 says `attention_bias`.
        attention_bias: flag("attention_bias", model_type == "qwen2")?,
        model_type,
    };
    Ok((cfg, bytes))
}

/// Refuses an architecture that does not compute what the checkpoint's model computes, naming
/// each difference.
fn check_arch(cfg: &HfConfig, plan: &Plan) -> Result<()> {
    let a = &plan.arch;
    if cfg.vocab != a.vocab {
        bail!(
            "the checkpoint's vocabulary has {} rows and {} has {}: vpmoe models use the o200k vocabulary ({} rows after \
             padding); convert the checkpoint's vocabulary first (e.g. mergekit's tokensurgeon, padded to {})",
            cfg.vocab,
            a.name,
            a.vocab,
            vpmoe_data::tokenizer::VOCAB_SIZE,
            vpmoe_data::tokenizer::VOCAB_SIZE
        );
    }
    let mut d = Vec::new();
    let mut same = |what: &str, hf: u64, ours: u64| {
        if hf != ours {
            d.push(format!("{what}: checkpoint {hf}, {} {ours}", a.name));
        }
    };
    same("layers", cfg.layers, a.layers);
    same("hidden size", cfg.hidden, a.hidden);
    same("attention heads", cfg.heads, a.heads);
    same("KV groups", cfg.kv_heads, a.groups);
    same("head_dim", cfg.head_dim, a.head_dim);
    same("FFN width", cfg.ffn, a.ffn);
    let mut no = |what: &str, present: bool| {
        if present {
            d.push(format!("{} has {what}, which a {} model has not", a.name, cfg.model_type));
        }
    };
    no("mixture-of-experts layers", a.moe.is_some());
    no("TPA", a.tpa.is_some());
    no("windowed layers", a.window.is_some());
    no("a value residual", a.value_residual.is_some());
    no("sink logits (softmax_type = \"learnable\")", a.sinks);
    no("ALiBi layers", a.grape.alibi);
    no("biases on the output projection and MLP (add_bias_linear)", a.bias_linear);
    if a.tied_embeddings && !cfg.tied {
        d.push(format!(
            "the checkpoint's LM head is its own; {} ties it to the embedding (untied_embeddings = false)",
            a.name
        ));
    }
    if a.grape.learnable_freq || a.grape.base != cfg.theta {
        d.push(format!(
            "the checkpoint rotates with RoPE of base {}; {} needs position_embedding_type = \"rope\" and rotary_base = {}",
            cfg.theta, a.name, cfg.theta
        ));
    }
    if a.qkv_bias != cfg.attention_bias {
        d.push(format!("q/k/v biases: checkpoint {}, {} {} (add_qkv_bias)", cfg.attention_bias, a.name, a.qkv_bias));
    }
    if (a.norm_eps - cfg.eps).abs() > 1e-12 * cfg.eps.abs().max(1e-30) {
        d.push(format!("RMSNorm epsilon: checkpoint {}, {} {} (norm_epsilon)", cfg.eps, a.name, a.norm_eps));
    }
    if cfg.model_type == "qwen3" && !a.qk_norm {
        d.push(format!("Qwen3 normalises q and k per head; {} needs qk_layernorm = true", a.name));
    }
    if cfg.model_type == "qwen2" && a.qk_norm {
        d.push(format!("Qwen2 has no q/k norms; {} needs qk_layernorm = false", a.name));
    }
    ensure!(
        d.is_empty(),
        "{} cannot hold this {} checkpoint:\n  {}\n(configs/rungs/qwen3-0_6B-o200k.toml is Qwen3-0.6B-o200k's shape)",
        a.name,
        cfg.model_type,
        d.join("\n  ")
    );
    Ok(())
}

/// The checkpoint's safetensors files: `model.safetensors`, or those of its index.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: Value = serde_json::from_slice(&std::fs::read(&index)?)
            .with_context(|| format!("{}: not JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let files: BTreeSet<&str> = map.values().map(|f| f.as_str().unwrap_or("")).collect();
        ensure!(!files.is_empty(), "{}: the weight_map is empty", index.display());
        return files
            .into_iter()
            .map(|f| {
                ensure!(
                    !f.is_empty() && !f.contains('/') && !f.contains(".."),
                    "{}: bad file name {f:?}",
                    index.display()
                );
                let p = dir.join(f);
                ensure!(p.is_file(), "{}: {f} is listed but missing", index.display());
                Ok(p)
            })
            .collect();
    }
    let single = dir.join("model.safetensors");
    ensure!(single.is_file(), "{}: neither model.safetensors nor model.safetensors.index.json", dir.display());
    Ok(vec![single])
}

/// One tensor as f32 with its shape.
fn tensor_f32(file: &Path, name: &str, t: &safetensors::tensor::TensorView) -> Result<(Vec<usize>, Vec<f32>)> {
    let b = t.data();
    let v: Vec<f32> = match t.dtype() {
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        d => bail!("{}: {name} is {d:?}; vpmoe imports bf16, f16 and f32 weights", file.display()),
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!("{}: {name} holds a non-finite value ({} at element {i})", file.display(), v[i]);
    }
    Ok((t.shape().to_vec(), v))
}

/// Reads the checkpoint in `dir` into `plan`'s parameters (fresh optimizer state, step 0).
pub fn import_hf(dir: &Path, plan: &Plan) -> Result<Imported> {
    let (cfg, config_bytes) = read_config(dir)?;
    check_arch(&cfg, plan)?;
    let mut out = Imported {
        state: TrainState::init(plan, 0).restart(),
        dropped: Vec::new(),
        derived: Vec::new(),
        sources: BTreeMap::new(),
    };
    out.sources.insert("config.json".into(), checkpoint::sha256_hex(&config_bytes));
    // Every tensor of every shard, as f32, by name.
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for f in shard_files(dir)? {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.sources.insert(name, checkpoint::sha256_hex(&bytes));
        let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not safetensors", f.display()))?;
        for (n, t) in st.tensors() {
            ensure!(!tensors.contains_key(&n), "{}: tensor {n} is also in another shard", f.display());
            tensors.insert(n.clone(), tensor_f32(&f, &n, &t)?);
        }
    }
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let (s, v) = tensors.get(name).with_context(|| format!("the checkpoint has no tensor {name}"))?;
        ensure!(s == shape, "{name} has shape {s:?}; the mapping needs {shape:?}");
        used.insert(name.to_string());
        Ok(v.clone())
    };
    let (h, nh, ng, d, f, v) = (
        cfg.hidden as usize,
        cfg.heads as usize,
        cfg.kv_heads as usize,
        cfg.head_dim as usize,
        cfg.ffn as usize,
        cfg.vocab as usize,
    );
    let mut state = std::mem::take(&mut out.state.master);
    for (pi, p) in plan.params.iter().enumerate() {
        let name = p.name.as_str();
        let layer = name.strip_prefix("decoder.layers.").and_then(|r| r.split_once('.'));
        let value: Vec<f32> = match (name, layer) {
            ("embedding.word_embeddings.weight", _) => take("model.embed_tokens.weight", &[v, h])?,
            ("output_layer.weight", _) => {
                if tensors.contains_key("lm_head.weight") {
                    take("lm_head.weight", &[v, h])?
                } else {
                    ensure!(cfg.tied, "the checkpoint has no lm_head.weight and does not tie it to the embedding");
                    out.derived.push((name.into(), "a copy of model.embed_tokens.weight (the checkpoint ties them)"));
                    take("model.embed_tokens.weight", &[v, h])?
                }
            }
            ("decoder.final_layernorm.weight", _) => take("model.norm.weight", &[h])?,
            ("rotary_pos_emb.log_freq", _) => {
                out.derived.push((name.into(), "RoPE's frequencies from rope_theta (frozen)"));
                continue;
            }
            (_, Some((n, rest))) => {
                let hf = |s: &str| format!("model.layers.{n}.{s}");
                match rest {
                    "input_layernorm.weight" => take(&hf("input_layernorm.weight"), &[h])?,
                    "self_attention.linear_qkv.weight" => {
                        let q = take(&hf("self_attn.q_proj.weight"), &[nh * d, h])?;
                        let k = take(&hf("self_attn.k_proj.weight"), &[ng * d, h])?;
                        let vv = take(&hf("self_attn.v_proj.weight"), &[ng * d, h])?;
                        pack_qkv(&q, &k, &vv, nh, ng, d * h)
                    }
                    "self_attention.linear_qkv.bias" => {
                        let q = take(&hf("self_attn.q_proj.bias"), &[nh * d])?;
                        let k = take(&hf("self_attn.k_proj.bias"), &[ng * d])?;
                        let vv = take(&hf("self_attn.v_proj.bias"), &[ng * d])?;
                        pack_qkv(&q, &k, &vv, nh, ng, d)
                    }
                    "self_attention.q_layernorm.weight" => take(&hf("self_attn.q_norm.weight"), &[d])?,
                    "self_attention.k_layernorm.weight" => take(&hf("self_attn.k_norm.weight"), &[d])?,
                    "self_attention.linear_proj.weight" => take(&hf("self_attn.o_proj.weight"), &[h, nh * d])?,
                    "pre_mlp_layernorm.weight" => take(&hf("post_attention_layernorm.weight"), &[h])?,
                    "mlp.linear_fc1.weight" => take(&hf("mlp.up_proj.weight"), &[f, h])?,
                    "mlp.linear_fc2.weight" => take(&hf("mlp.down_proj.weight"), &[h, f])?,
                    _ => bail!("{} has parameter {name}, which no {} tensor maps to", plan.arch.name, cfg.model_type),
                }
            }
            _ => bail!("{} has parameter {name}, which no {} tensor maps to", plan.arch.name, cfg.model_type),
        };
        ensure!(
            value.len() as u64 == p.numel,
            "internal: {name} mapped to {} values, the plan has {}",
            value.len(),
            p.numel
        );
        // The masters of bf16 parameters are the checkpoint's values (exact in bf16 when it is bf16).
        state[pi] = value;
    }
    for n in tensors.keys().filter(|n| !used.contains(*n)) {
        let why = if n.ends_with(".mlp.gate_proj.weight") {
            "SwiGLU's gate: vpmoe's MLP is ReLU²(x·upᵀ)·downᵀ"
        } else if n.ends_with("rotary_emb.inv_freq") {
            "RoPE's frequencies, recomputed from rope_theta"
        } else if n == "lm_head.weight" {
            // A tied checkpoint that also stores its head, into a tied architecture.
            "the head, tied to model.embed_tokens.weight"
        } else {
            bail!("the checkpoint's tensor {n} has no place in {} (nothing maps to it)", plan.arch.name)
        };
        out.dropped.push((n.clone(), why));
    }
    out.state.master = state;
    Ok(out)
}

/// Rows of q (`heads` × `row`), k and v (`groups` × `row`) in the fused QKV layout: per KV group,
/// its query heads, then its key, then its value.
fn pack_qkv(q: &[f32], k: &[f32], v: &[f32], heads: usize, groups: usize, row: usize) -> Vec<f32> {
    let per = heads / groups;
    let mut out = Vec::with_capacity(q.len() + k.len() + v.len());
    for g in 0..groups {
        out.extend_from_slice(&q[g * per * row..(g + 1) * per * row]);
        out.extend_from_slice(&k[g * row..(g + 1) * row]);
        out.extend_from_slice(&v[g * row..(g + 1) * row]);
    }
    out
}

/// Imports `from` and writes it as the step-0 checkpoint of the new run directory `out` (which
/// must not hold checkpoints). Returns the checkpoint's path and what the import did.
pub fn import_to(from: &Path, plan: &Plan, out: &Path) -> Result<(PathBuf, Imported)> {
    ensure!(
        checkpoint::list(out).map(|l| l.is_empty()).unwrap_or(true),
        "{} already holds checkpoints; import into a new directory",
        out.display()
    );
    let imported = import_hf(from, plan)?;
    let train = serde_json::json!({
        "imported_from": from.display().to_string(),
        "sources_sha256": imported.sources,
        "dropped": imported.dropped.iter().map(|(n, _)| n).collect::<Vec<_>>(),
    });
    let meta = checkpoint::step0_meta(plan, train, 0, BTreeMap::new());
    let path = checkpoint::save(out, plan, &imported.state, meta, 1)?;
    Ok((path, imported))
}
