//! Config frontend: the reference's architecture TOML schema (MODEL.md D11), parsed strictly
//! (unknown keys, missing required keys and wrong types are errors naming the file and key), then
//! validated and resolved into [`Arch`], the normalised form everything downstream reads.
//! Keys with defaults are listed in docs/config.md; every other semantic key is required.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    /// Free-form metadata; never semantic.
    #[serde(default)]
    meta: Option<toml::Table>,
    tokenizer: RawTokenizer,
    model: RawModel,
    attention: RawAttention,
    #[serde(default)]
    tpa: Option<RawTpa>,
    #[serde(default)]
    grape: Option<RawGrape>,
    #[serde(default)]
    moe: Option<RawMoe>,
    #[serde(default)]
    optimizer: Option<RawOptimizer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenizer {
    vocab_size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    num_layers: u64,
    hidden_size: u64,
    num_attention_heads: u64,
    num_query_groups: u64,
    head_dim: u64,
    ffn_hidden_size: u64,
    value_residual: bool,
    #[serde(default = "one")]
    value_residual_init: f64,
    normalization: String,
    qk_layernorm: bool,
    softmax_type: String,
    add_bias_linear: bool,
    add_qkv_bias: bool,
    #[serde(default)]
    gated_linear_unit: bool,
    activation: String,
    untied_embeddings: bool,
    #[serde(default)]
    hidden_dropout: f64,
    #[serde(default = "init_std")]
    init_method_std: f64,
    #[serde(default = "norm_eps")]
    norm_epsilon: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttention {
    #[serde(default)]
    attention_dropout: f64,
    max_sequence_length: u64,
    position_embedding_type: String,
    /// The rotation base: RoPE's, or where GRAPE-M's log-frequencies start.
    #[serde(default)]
    rotary_base: Option<f64>,
    #[serde(default)]
    window_size: Option<i64>,
    #[serde(default)]
    window_attn_skip_freq: Option<SkipFreq>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SkipFreq {
    Every(i64),
    Pattern(Vec<i64>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTpa {
    use_tpa: bool,
    tpa_rank: u64,
    tpa_q_rank: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrape {
    grape_a: bool,
    grapem_learnable_freq: bool,
    grapem_share_across_heads: bool,
    #[serde(default = "sixteen")]
    grapem_log_freq_scale: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMoe {
    num_experts: u64,
    topk: u64,
    shared_expert: bool,
    #[serde(default)]
    shared_expert_size: u64,
    first_layer_dense: bool,
    router_load_balancing_type: String,
    #[serde(default)]
    aux_loss_coeff: f64,
    router_score_function: String,
    #[serde(default)]
    router_topk_scaling_factor: Option<f64>,
    #[serde(default)]
    router_pre_softmax: bool,
    #[serde(default)]
    router_num_groups: Option<u64>,
    #[serde(default)]
    router_group_topk: Option<u64>,
    #[serde(default)]
    router_enable_expert_bias: bool,
    #[serde(default = "bias_rate")]
    router_bias_update_rate: f64,
    #[serde(default)]
    router_dtype: Option<String>,
    // Megatron/TE performance toggles: accepted for compatibility, vpmoe always uses its own
    // fused kernels.
    #[serde(default)]
    grouped_gemm: bool,
    #[serde(default)]
    permute_fusion: bool,
    #[serde(default)]
    router_fusion: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptimizer {
    #[serde(default = "normuon")]
    name: String,
    #[serde(default = "p95")]
    normuon_momentum: f64,
    #[serde(default = "p95")]
    normuon_beta2: f64,
    #[serde(default = "eps10")]
    normuon_eps: f64,
    #[serde(default)]
    normuon_aux_lr: Option<f64>,
    #[serde(default)]
    normuon_aux_min_lr: Option<f64>,
    #[serde(default = "safety")]
    polar_express_safety_factor: f64,
    #[serde(default)]
    polar_express_coeffs_path: Option<String>,
}

fn one() -> f64 {
    1.0
}
fn init_std() -> f64 {
    0.02
}
fn norm_eps() -> f64 {
    1e-5
}
fn sixteen() -> f64 {
    16.0
}
fn bias_rate() -> f64 {
    1e-3
}
fn normuon() -> String {
    "normuon".into()
}
fn p95() -> f64 {
    0.95
}
fn eps10() -> f64 {
    1e-10
}
fn safety() -> f64 {
    vpmoe_ir::optim::DEFAULT_POLAR_EXPRESS_SAFETY
}

/// Validated, resolved architecture. Serialised (sorted, canonical JSON) it is the normalised
/// config that the plan fingerprint hashes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Arch {
    pub name: String,
    pub vocab: u64,
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    pub groups: u64,
    pub head_dim: u64,
    pub ffn: u64,
    /// `Some(init)` when value residual is on.
    pub value_residual: Option<f64>,
    pub qk_norm: bool,
    pub sinks: bool,
    pub bias_linear: bool,
    pub qkv_bias: bool,
    pub tied_embeddings: bool,
    pub init_std: f64,
    pub norm_eps: f64,
    pub max_seq: u64,
    /// Sliding-window length of local layers (keys incl. the query), if any layer is local.
    pub window: Option<u64>,
    /// Per layer (0-indexed): is it local (windowed)?
    pub local: Vec<bool>,
    /// TPA ranks (q, kv) on local layers.
    pub tpa: Option<(u64, u64)>,
    pub grape: Grape,
    pub moe: Option<Moe>,
    pub optimizer: Optimizer,
}

/// The rotation of q and k: GRAPE-M, or RoPE (`position_embedding_type = "rope"`), which is
/// GRAPE-M with its frequencies frozen at `base^(−2i/head_dim)` and no ALiBi layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grape {
    /// GRAPE-M rotation on local layers (on every layer when ALiBi is off).
    pub alibi: bool,
    pub learnable_freq: bool,
    pub log_freq_scale: f64,
    /// The frequencies at initialisation: `f_i = base^(−2i/head_dim)`.
    #[serde(default = "default_base", skip_serializing_if = "is_default_base")]
    pub base: f64,
}

/// GRAPE-M's base, as Megatron's `--rotary-base` default.
const GRAPE_BASE: f64 = 10_000.0;
/// RoPE's base when `attention.rotary_base` is absent: Qwen3's, for the rungs imported from it.
pub const ROPE_BASE: f64 = 1_000_000.0;

fn default_base() -> f64 {
    GRAPE_BASE
}
fn is_default_base(b: &f64) -> bool {
    *b == GRAPE_BASE
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moe {
    pub experts: u64,
    pub topk: u64,
    pub shared: Option<u64>,
    pub first_layer_dense: bool,
    /// Coefficient of the sequence aux loss (None: no aux loss).
    pub seq_aux_coeff: Option<f64>,
    pub scale: f64,
    pub group_limit: Option<(u64, u64)>,
    /// Expert-bias update rate when aux-loss-free balancing is on.
    pub expert_bias_rate: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    pub momentum: f64,
    pub beta2: f64,
    pub eps: f64,
    pub aux_lr: Option<f64>,
    pub aux_min_lr: Option<f64>,
    pub polar_express_safety: f64,
    pub polar_express: Vec<[f64; 3]>,
}

/// One layer's shape in the schedule (MODEL.md §2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerSpec {
    /// 1-indexed layer number.
    pub number: u64,
    pub local: bool,
    pub tpa: bool,
    pub rotate: bool,
    pub alibi: bool,
    pub moe: bool,
}

impl Arch {
    pub fn layer(&self, i: u64) -> LayerSpec {
        let local = self.local[i as usize];
        LayerSpec {
            number: i + 1,
            local,
            tpa: local && self.tpa.is_some(),
            rotate: local || !self.grape.alibi,
            alibi: !local && self.grape.alibi,
            moe: self.moe.as_ref().is_some_and(|m| !(i == 0 && m.first_layer_dense)),
        }
    }

    /// Canonical JSON (sorted keys) of the resolved config.
    /// What is valid but probably not meant, one line each (`vpmoec` prints them).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(Moe { experts, topk, group_limit: Some((groups, group_topk)), .. }) = &self.moe {
            if *topk == group_topk * (experts / groups) {
                w.push(format!(
                    "moe.router_group_topk: top-{topk} takes every expert of the {group_topk} chosen groups of \
                     {}, so routing only chooses groups, never experts within them",
                    experts / groups
                ));
            }
        }
        w
    }
    pub fn canonical_json(&self) -> String {
        let v = serde_json::to_value(self).expect("serialisable");
        serde_json::to_string(&v).expect("serialisable") // serde_json's Map is a BTreeMap: sorted keys
    }
}

/// Parses and validates an architecture file.
pub fn load(path: &Path) -> Result<Arch> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "arch".into());
    parse(&text, &name, path.parent().unwrap_or(Path::new("."))).with_context(|| format!("{}", path.display()))
}

/// Parses config text; `base` resolves relative paths (the Polar Express coefficient file).
pub fn parse(text: &str, name: &str, base: &Path) -> Result<Arch> {
    let raw: Raw = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
    resolve(raw, name, base)
}

macro_rules! ensure {
    ($cond:expr, $key:expr, $($msg:tt)+) => {
        let ok: bool = $cond;
        if !ok {
            bail!("{}: {}", $key, format!($($msg)+));
        }
    };
}

fn one_of(key: &str, got: &str, allowed: &[&str]) -> Result<()> {
    ensure!(allowed.contains(&got), key, "unsupported value {got:?}; supported: {}", allowed.join(", "));
    Ok(())
}

/// The largest value each size key takes (docs/config.md): token ids are int32, kernels index
/// with int, and every product the planner forms stays far inside u64.
pub const SIZE_LIMITS: &[(&str, u64)] = &[
    ("tokenizer.vocab_size", 1 << 24),
    ("model.num_layers", 1024),
    ("model.hidden_size", 1 << 16),
    ("model.num_attention_heads", 1024),
    ("model.num_query_groups", 1024),
    ("model.head_dim", 512),
    ("model.ffn_hidden_size", 1 << 18),
    ("attention.max_sequence_length", 1 << 20),
    ("tpa.tpa_rank", 64),
    ("tpa.tpa_q_rank", 64),
    ("moe.num_experts", 4096),
    ("moe.topk", 64),
    ("moe.shared_expert_size", 1 << 18),
];

fn in_range(key: &str, v: u64) -> Result<()> {
    let max = SIZE_LIMITS.iter().find(|(k, _)| *k == key).map(|l| l.1).expect("every size key has a limit");
    ensure!((1..=max).contains(&v), key, "must be in 1..={max}, got {v}");
    Ok(())
}

/// A float key: finite and in `lo..=hi` (`open_lo`: strictly above `lo`).
fn float(key: &str, v: f64, lo: f64, open_lo: bool, hi: f64) -> Result<()> {
    let ok = v.is_finite() && (if open_lo { v > lo } else { v >= lo }) && v <= hi;
    let lo = if open_lo { format!("({lo}") } else { format!("[{lo}") };
    ensure!(ok, key, "must be a finite number in {lo}, {hi}], got {v}");
    Ok(())
}

fn resolve(raw: Raw, name: &str, base: &Path) -> Result<Arch> {
    let _ = raw.meta;
    let m = &raw.model;
    let a = &raw.attention;
    for (key, v) in [
        ("tokenizer.vocab_size", raw.tokenizer.vocab_size),
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_query_groups", m.num_query_groups),
        ("model.head_dim", m.head_dim),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("attention.max_sequence_length", a.max_sequence_length),
    ] {
        in_range(key, v)?;
    }
    ensure!(
        m.num_attention_heads.is_multiple_of(m.num_query_groups),
        "model.num_query_groups",
        "{} query groups do not divide {} attention heads",
        m.num_query_groups,
        m.num_attention_heads
    );
    ensure!(m.head_dim.is_multiple_of(2), "model.head_dim", "must be even for the rotation, got {}", m.head_dim);
    one_of("model.normalization", &m.normalization, &["RMSNorm"])?;
    one_of("model.softmax_type", &m.softmax_type, &["learnable", "vanilla"])?;
    one_of("model.activation", &m.activation, &["squaredrelu"])?;
    ensure!(!m.gated_linear_unit, "model.gated_linear_unit", "gated linear units are not supported");
    ensure!(m.hidden_dropout == 0.0, "model.hidden_dropout", "only 0.0 is supported (D1), got {}", m.hidden_dropout);
    ensure!(
        a.attention_dropout == 0.0,
        "attention.attention_dropout",
        "only 0.0 is supported, got {}",
        a.attention_dropout
    );
    float("model.init_method_std", m.init_method_std, 0.0, true, 1.0)?;
    float("model.norm_epsilon", m.norm_epsilon, 0.0, true, 1.0)?;
    let value_residual = if m.value_residual {
        float("model.value_residual_init", m.value_residual_init, 0.0, true, 1.0)?;
        Some(m.value_residual_init)
    } else {
        None
    };

    // Attention schedule.
    one_of("attention.position_embedding_type", &a.position_embedding_type, &["grapem", "rope"])?;
    let rope = a.position_embedding_type == "rope";
    if let Some(b) = a.rotary_base {
        float("attention.rotary_base", b, 1.0, true, 1e12)?;
    }
    let layers = m.num_layers as usize;
    let window = match a.window_size {
        None | Some(0) => None,
        Some(w) if w < 1 => bail!("attention.window_size: must be at least 1 (or 0/absent for no window), got {w}"),
        Some(w) if w as u64 > a.max_sequence_length => bail!(
            "attention.window_size: {w} keys exceed attention.max_sequence_length {} (a window that long is global \
             attention: leave window_size out)",
            a.max_sequence_length
        ),
        Some(w) => Some(w as u64),
    };
    let local: Vec<bool> = match (window, &a.window_attn_skip_freq) {
        (None, None) => vec![false; layers],
        (None, Some(_)) => bail!("attention.window_attn_skip_freq: set without attention.window_size"),
        (Some(_), None) => vec![true; layers],
        (Some(_), Some(SkipFreq::Every(f))) => {
            ensure!(*f >= 1, "attention.window_attn_skip_freq", "must be at least 1, got {f}");
            (1..=layers as i64).map(|l| l % f != 0).collect()
        }
        (Some(_), Some(SkipFreq::Pattern(p))) => {
            ensure!(
                p.len() == layers,
                "attention.window_attn_skip_freq",
                "pattern has {} entries for {} layers",
                p.len(),
                layers
            );
            ensure!(
                p.iter().all(|&x| x == 0 || x == 1),
                "attention.window_attn_skip_freq",
                "pattern entries must be 0 or 1"
            );
            p.iter().map(|&x| x == 1).collect()
        }
    };
    let tpa = match &raw.tpa {
        Some(t) if t.use_tpa => {
            ensure!(window.is_some(), "tpa.use_tpa", "TPA runs on local layers and needs attention.window_size");
            in_range("tpa.tpa_rank", t.tpa_rank)?;
            in_range("tpa.tpa_q_rank", t.tpa_q_rank)?;
            Some((t.tpa_q_rank, t.tpa_rank))
        }
        _ => None,
    };
    let grape = match (&raw.grape, rope) {
        (Some(_), true) => {
            bail!("grape: a [grape] section goes with position_embedding_type = \"grapem\", not \"rope\"")
        }
        (None, true) => {
            Grape { alibi: false, learnable_freq: false, log_freq_scale: 1.0, base: a.rotary_base.unwrap_or(ROPE_BASE) }
        }
        (None, false) => bail!("grape: missing section [grape] (required for position_embedding_type = \"grapem\")"),
        (Some(g), false) => {
            ensure!(
                g.grapem_share_across_heads,
                "grape.grapem_share_across_heads",
                "only true is supported (per-head frequencies cannot broadcast onto GQA groups)"
            );
            float("grape.grapem_log_freq_scale", g.grapem_log_freq_scale, 0.0, true, 1e6)?;
            ensure!(
                !g.grape_a || a.window_attn_skip_freq.is_some(),
                "grape.grape_a",
                "ALiBi on global layers needs attention.window_attn_skip_freq to define them"
            );
            Grape {
                alibi: g.grape_a,
                learnable_freq: g.grapem_learnable_freq,
                log_freq_scale: g.grapem_log_freq_scale,
                base: a.rotary_base.unwrap_or(GRAPE_BASE),
            }
        }
    };

    let moe = match &raw.moe {
        None => None,
        Some(r) => {
            in_range("moe.num_experts", r.num_experts)?;
            in_range("moe.topk", r.topk)?;
            ensure!(r.topk <= r.num_experts, "moe.topk", "top-k {} exceeds {} experts", r.topk, r.num_experts);
            one_of("moe.router_score_function", &r.router_score_function, &["sigmoid"])?;
            one_of("moe.router_load_balancing_type", &r.router_load_balancing_type, &["seq_aux_loss", "none"])?;
            ensure!(!r.router_pre_softmax, "moe.router_pre_softmax", "only false is supported");
            if let Some(d) = &r.router_dtype {
                one_of("moe.router_dtype", d, &["fp32"])?;
            }
            if r.shared_expert {
                in_range("moe.shared_expert_size", r.shared_expert_size)?;
            }
            let group_limit = match (r.router_num_groups, r.router_group_topk) {
                (None, None) => None,
                (Some(_), None) => bail!("moe.router_group_topk: required when moe.router_num_groups is set"),
                (None, Some(_)) => bail!("moe.router_num_groups: required when moe.router_group_topk is set"),
                (Some(ng), Some(gk)) => {
                    ensure!(
                        ng >= 1 && r.num_experts % ng == 0,
                        "moe.router_num_groups",
                        "{ng} groups do not divide {} experts",
                        r.num_experts
                    );
                    ensure!(
                        gk >= 1 && gk <= ng,
                        "moe.router_group_topk",
                        "group top-k {gk} must be in 1..={ng} groups"
                    );
                    ensure!(r.topk % gk == 0, "moe.router_group_topk", "group top-k {gk} must divide top-k {}", r.topk);
                    ensure!(
                        gk * (r.num_experts / ng) >= r.topk,
                        "moe.router_group_topk",
                        "{gk} groups of {} experts cannot hold top-k {}",
                        r.num_experts / ng,
                        r.topk
                    );
                    Some((ng, gk))
                }
            };
            let scale = r.router_topk_scaling_factor.unwrap_or(1.0);
            float("moe.router_topk_scaling_factor", scale, 0.0, true, 1e6)?;
            float("moe.aux_loss_coeff", r.aux_loss_coeff, 0.0, false, 1e6)?;
            float("moe.router_bias_update_rate", r.router_bias_update_rate, 0.0, false, 1.0)?;
            let _ = (r.grouped_gemm, r.permute_fusion, r.router_fusion);
            Some(Moe {
                experts: r.num_experts,
                topk: r.topk,
                shared: r.shared_expert.then_some(r.shared_expert_size),
                first_layer_dense: r.first_layer_dense,
                seq_aux_coeff: (r.router_load_balancing_type == "seq_aux_loss").then_some(r.aux_loss_coeff),
                scale,
                group_limit,
                expert_bias_rate: r.router_enable_expert_bias.then_some(r.router_bias_update_rate),
            })
        }
    };

    let o = match raw.optimizer {
        Some(o) => o,
        None => toml::from_str("").expect("all optimizer keys have defaults"),
    };
    one_of("optimizer.name", &o.name, &["normuon"])?;
    float("optimizer.polar_express_safety_factor", o.polar_express_safety_factor, 0.0, false, 1.0)?;
    let polar_express = match &o.polar_express_coeffs_path {
        Some(p) => {
            let path = base.join(p);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("optimizer.polar_express_coeffs_path: reading {}", path.display()))?;
            let table: Vec<[f64; 3]> = serde_json::from_str(&text).with_context(|| {
                format!(
                    "optimizer.polar_express_coeffs_path: {} must be a JSON list of [a, b, c] triples",
                    path.display()
                )
            })?;
            ensure!(!table.is_empty(), "optimizer.polar_express_coeffs_path", "the coefficient table is empty");
            ensure!(
                table.iter().flatten().all(|x| x.is_finite()),
                "optimizer.polar_express_coeffs_path",
                "{}: every coefficient must be a finite number",
                path.display()
            );
            table
        }
        None => {
            ensure!(
                o.polar_express_safety_factor == 2e-2,
                "optimizer.polar_express_safety_factor",
                "{} needs optimizer.polar_express_coeffs_path (the built-in table is for 2e-2)",
                o.polar_express_safety_factor
            );
            vpmoe_ir::optim::DEFAULT_POLAR_EXPRESS.to_vec()
        }
    };
    for (key, v) in [("optimizer.normuon_momentum", o.normuon_momentum), ("optimizer.normuon_beta2", o.normuon_beta2)] {
        ensure!((0.0..1.0).contains(&v), key, "must be in [0, 1), got {v}");
    }
    float("optimizer.normuon_eps", o.normuon_eps, 0.0, true, 1.0)?;
    for (key, v) in
        [("optimizer.normuon_aux_lr", o.normuon_aux_lr), ("optimizer.normuon_aux_min_lr", o.normuon_aux_min_lr)]
    {
        if let Some(v) = v {
            float(key, v, 0.0, false, 10.0)?;
        }
    }

    Ok(Arch {
        name: name.to_string(),
        vocab: raw.tokenizer.vocab_size,
        layers: m.num_layers,
        hidden: m.hidden_size,
        heads: m.num_attention_heads,
        groups: m.num_query_groups,
        head_dim: m.head_dim,
        ffn: m.ffn_hidden_size,
        value_residual,
        qk_norm: m.qk_layernorm,
        sinks: m.softmax_type == "learnable",
        bias_linear: m.add_bias_linear,
        qkv_bias: m.add_qkv_bias,
        tied_embeddings: !m.untied_embeddings,
        init_std: m.init_method_std,
        norm_eps: m.norm_epsilon,
        max_seq: a.max_sequence_length,
        window,
        local,
        tpa,
        grape,
        moe,
        optimizer: Optimizer {
            momentum: o.normuon_momentum,
            beta2: o.normuon_beta2,
            eps: o.normuon_eps,
            aux_lr: o.normuon_aux_lr,
            aux_min_lr: o.normuon_aux_min_lr,
            polar_express_safety: o.polar_express_safety_factor,
            polar_express,
        },
    })
}
