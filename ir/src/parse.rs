//! Reads the canonical text form ([`crate::write`]) back into a [`Graph`], so IR can be written
//! and diffed as text (filetests, a plan's `ir.txt`): `parse_graph(&g.to_text())?.to_text()`
//! is `g.to_text()`.
//!
//! The text does not record how the builder interleaved inputs, parameters and nodes in the
//! value arena, so the parser numbers values in text order; the rebuilt graph is exactly
//! [`Graph::canonical`] of the printed one. Node output types follow from the op's attributes
//! ([`Op::signature`]); the printed `-> TYPES` are checked against them. Everything else about
//! well-formedness (input counts and types, dead nodes, unique names) is for
//! [`verify`](crate::verify()).

use crate::graph::{Graph, Init, InputKind, InputName, OptGroup, Role, ValueId};
use crate::op::{Attn, AttnKind, GroupLimit, Op, Vjp};
use crate::types::{DType, Dim, TensorType};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// A parse failure: the 1-based line and what is wrong there (quoting the offending text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub msg: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.msg)
    }
}

impl std::error::Error for ParseError {}

type Res<T> = Result<T, String>;

/// The graph part of a plan's `ir.txt`: the optimizer's section follows it after a blank line,
/// and the graph's own text has none.
pub fn split_graph_text(ir_txt: &str) -> &str {
    ir_txt.find("\n\n").map_or(ir_txt, |i| &ir_txt[..=i])
}

/// Parses one graph in the text form. Blank lines are ignored.
pub fn parse_graph(text: &str) -> Result<Graph, ParseError> {
    let mut lines = text.lines().map(str::trim_start).enumerate().filter(|(_, l)| !l.is_empty());
    let Some((i, first)) = lines.next() else {
        return Err(ParseError { line: 1, msg: "expected 'graph NAME'".into() });
    };
    let name = first
        .strip_prefix("graph ")
        .ok_or_else(|| ParseError { line: i + 1, msg: format!("expected 'graph NAME', found '{first}'") })?;
    let mut p = Parser { g: Graph::new(name), refs: HashMap::new(), node_values: 0 };
    for (i, l) in lines {
        p.line(l).map_err(|msg| ParseError { line: i + 1, msg })?;
    }
    Ok(p.g)
}

impl FromStr for Graph {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        parse_graph(s)
    }
}

impl Graph {
    /// This graph with its values renumbered in text order (inputs, parameters, node outputs):
    /// what parsing its text rebuilds.
    pub fn canonical(&self) -> Graph {
        let mut g = Graph::new(&self.name);
        let mut map = vec![ValueId(u32::MAX); self.values.len()];
        for i in &self.inputs {
            map[i.value.0 as usize] = g.input(i.name.clone(), i.kind, self.value(i.value).ty.clone());
        }
        for p in &self.params {
            map[p.value.0 as usize] = g.param(p.name.clone(), p.ty.clone(), p.init, p.opt, p.weight_decay, p.role);
        }
        for n in &self.nodes {
            let ins = n.inputs.iter().map(|v| map[v.0 as usize]).collect();
            for (old, new) in n.outputs.iter().zip(g.node(n.name.clone(), n.op.clone(), ins)) {
                map[old.0 as usize] = new;
            }
        }
        for (name, v) in &self.outputs {
            g.output(name.clone(), map[v.0 as usize]);
        }
        g
    }
}

struct Parser {
    g: Graph,
    /// `$input`, `@param` and `%n` references defined so far.
    refs: HashMap<String, ValueId>,
    /// Node outputs defined so far: the next one must be `%node_values`.
    node_values: usize,
}

impl Parser {
    fn line(&mut self, l: &str) -> Res<()> {
        if let Some(s) = l.strip_prefix("input ") {
            self.input(s)
        } else if let Some(s) = l.strip_prefix("param ") {
            self.param(s)
        } else if let Some(s) = l.strip_prefix("output ") {
            let (name, v) = s.split_once(" = ").ok_or("expected 'output NAME = VALUE'")?;
            let v = self.value(v)?;
            let name = self.g.parse_output_name(name);
            self.g.output(name, v);
            Ok(())
        } else {
            self.node(l)
        }
    }

    /// `$NAME: TYPE data|scalar`
    fn input(&mut self, s: &str) -> Res<()> {
        let (name, rest) =
            s.strip_prefix('$').and_then(|s| s.split_once(": ")).ok_or("expected 'input $NAME: TYPE KIND'")?;
        let (ty, kind) = rest.split_once(' ').ok_or("expected 'TYPE data|scalar' after the input's name")?;
        let kind = match kind {
            "data" => InputKind::Data,
            "scalar" => InputKind::Scalar,
            _ => return Err(format!("unknown input kind '{kind}' (expected data or scalar)")),
        };
        let v = self.g.input(InputName::parse(name), kind, ty.parse()?);
        self.define(format!("${name}"), v)
    }

    /// `@NAME: TYPE init=INIT opt=OPT [wd] [role=ROLE]`
    fn param(&mut self, s: &str) -> Res<()> {
        let (name, rest) =
            s.strip_prefix('@').and_then(|s| s.split_once(": ")).ok_or("expected 'param @NAME: TYPE …'")?;
        let mut words = rest.split(' ').peekable();
        let ty = words.next().unwrap_or_default().parse()?;
        let mut field = |key: &str| {
            let w = words.next().unwrap_or_default();
            w.strip_prefix(key).ok_or_else(|| format!("expected '{key}…' in param @{name}, found '{w}'"))
        };
        let init = init(field("init=")?)?;
        let opt = match field("opt=")? {
            "normuon" => OptGroup::Normuon,
            "adamw" => OptGroup::AdamW,
            "frozen" => OptGroup::Frozen,
            o => return Err(format!("unknown optimizer group '{o}'")),
        };
        let wd = words.next_if_eq(&"wd").is_some();
        let role = match words.next().map(|w| w.strip_prefix("role=").ok_or(w)) {
            None => Role::Other,
            Some(Ok(r)) => role(r)?,
            Some(Err(w)) => return Err(format!("unexpected '{w}' in param @{name}")),
        };
        if let Some(w) = words.next() {
            return Err(format!("unexpected '{w}' in param @{name}"));
        }
        let v = self.g.param(name.to_string(), ty, init, opt, wd, role);
        self.define(format!("@{name}"), v)
    }

    /// `NAME: %A, … = OP(ARGS) {KEY=VALUE …} -> TYPES`
    fn node(&mut self, s: &str) -> Res<()> {
        let shape = || format!("expected 'NAME: OUTPUTS = OP(ARGS) {{ATTRS}} -> TYPES', found '{s}'");
        let (name, rest) = s.split_once(": ").ok_or_else(shape)?;
        let (outs, rest) = rest.split_once(" = ").ok_or_else(shape)?;
        let (call, tys) = rest.rsplit_once(" -> ").ok_or_else(shape)?;
        let (op_name, rest) = call.split_once('(').ok_or_else(shape)?;
        let (args, attrs) = rest.split_once(')').ok_or_else(shape)?;
        let attrs = match attrs.trim_start() {
            "" => "",
            a => a.strip_prefix('{').and_then(|a| a.strip_suffix('}')).ok_or_else(shape)?,
        };
        let mut attrs = Attrs::new(attrs)?;
        let op = op(op_name, &mut attrs)?;
        if let Some(k) = attrs.unused() {
            return Err(format!("unknown attribute '{k}' for op {op_name}"));
        }
        let inputs = list(args).map(|a| self.value(a)).collect::<Res<Vec<_>>>()?;
        let (outs, tys): (Vec<&str>, Vec<&str>) = (list(outs).collect(), list(tys).collect());
        let want = op.signature().1;
        if outs.len() != want.len() || tys.len() != want.len() {
            return Err(format!(
                "op {op_name} has {} output(s), not {} with {} type(s)",
                want.len(),
                outs.len(),
                tys.len()
            ));
        }
        for (i, ((o, ty), (_, want))) in outs.iter().zip(&tys).zip(&want).enumerate() {
            // Node outputs are numbered in definition order, as the printer does.
            let next = format!("%{}", self.node_values + i);
            if *o != next {
                return Err(format!("expected output {next}, found '{o}'"));
            }
            // Output types are the op's: a printed type that differs would be silently dropped.
            if ty.parse::<TensorType>()? != *want {
                return Err(format!("output {o} of {op_name} is printed as {ty}, but the op gives {want}"));
            }
        }
        self.node_values += outs.len();
        for (o, v) in outs.into_iter().zip(self.g.node(name.to_string(), op, inputs)) {
            self.define(o.to_string(), v)?;
        }
        Ok(())
    }

    fn define(&mut self, r: String, v: ValueId) -> Res<()> {
        match self.refs.insert(r.clone(), v) {
            Some(_) => Err(format!("{r} is defined twice")),
            None => Ok(()),
        }
    }

    fn value(&self, r: &str) -> Res<ValueId> {
        if !r.starts_with(['$', '@', '%']) {
            return Err(format!("expected a value ($input, @param or %n), found '{r}'"));
        }
        self.refs.get(r).copied().ok_or_else(|| format!("value {r} used before definition"))
    }
}

/// A comma-separated list (the printer's `", "`; types use a bare `,` inside brackets).
fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(", ").filter(|x| !x.is_empty())
}

fn num<T: FromStr>(s: &str) -> Res<T> {
    s.parse().map_err(|_| format!("bad number '{s}'"))
}

/// `f(a,b,…)` as `("f", [a, b, …])`; a bare `f` has no arguments.
fn call(s: &str) -> Res<(&str, Vec<&str>)> {
    match s.split_once('(') {
        None => Ok((s, vec![])),
        Some((f, args)) => {
            let args = args.strip_suffix(')').ok_or_else(|| format!("missing ')' in '{s}'"))?;
            Ok((f, args.split(',').collect()))
        }
    }
}

fn init(s: &str) -> Res<Init> {
    Ok(match call(s)? {
        ("zeros", a) if a.is_empty() => Init::Zeros,
        ("ones", a) if a.is_empty() => Init::Ones,
        ("normal", a) if a.len() == 1 => Init::Normal { std: num(a[0])? },
        ("const", a) if a.len() == 1 => Init::Const { value: num(a[0])? },
        ("log_freq", a) if a.len() == 3 => Init::LogFreq { scale: num(a[0])?, base: num(a[1])?, head_dim: num(a[2])? },
        _ => return Err(format!("unknown init '{s}'")),
    })
}

fn role(s: &str) -> Res<Role> {
    Ok(match call(s)? {
        ("input_embedding", a) if a.is_empty() => Role::InputEmbedding,
        ("output_head", a) if a.is_empty() => Role::OutputHead,
        ("tied_embedding", a) if a.is_empty() => Role::TiedEmbedding,
        ("experts", a) if a.len() == 1 => {
            let (topk, experts) =
                a[0].split_once('/').ok_or_else(|| format!("expected experts(TOPK/EXPERTS), found '{s}'"))?;
            Role::Experts { experts: num(experts)?, topk: num(topk)? }
        }
        ("expert_bias", a) if a.len() == 1 => Role::ExpertBias { layer: num(a[0])? },
        _ => return Err(format!("unknown role '{s}'")),
    })
}

/// A node's `KEY=VALUE` attributes, taken by name. Taking the first unused one of a name lets a
/// `vjp` of a `vjp` repeat `of` and `seeds`, inner op first, as the printer nests them.
struct Attrs<'a> {
    items: Vec<Option<(&'a str, &'a str)>>,
    /// The op whose attributes are being taken, for error messages.
    op: &'a str,
}

impl<'a> Attrs<'a> {
    fn new(s: &'a str) -> Res<Self> {
        let items = s.split_whitespace().map(|kv| kv.split_once('=').map(Some).ok_or(kv));
        let items = items.collect::<Result<_, _>>().map_err(|kv| format!("expected KEY=VALUE, found '{kv}'"))?;
        Ok(Attrs { items, op: "" })
    }

    fn str(&mut self, key: &str) -> Res<&'a str> {
        let slot = self.items.iter_mut().find(|a| matches!(a, Some((k, _)) if *k == key));
        slot.and_then(Option::take)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("attribute '{key}' missing for op {}", self.op))
    }

    fn get<T: FromStr>(&mut self, key: &str) -> Res<T> {
        let v = self.str(key)?;
        v.parse().map_err(|_| format!("bad value '{v}' for attribute '{key}' of op {}", self.op))
    }

    /// An attribute printed only when it applies.
    fn opt<T: FromStr>(&mut self, key: &str) -> Res<Option<T>> {
        if self.items.iter().flatten().any(|(k, _)| *k == key) {
            self.get(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn unused(&self) -> Option<&'a str> {
        self.items.iter().flatten().map(|(k, _)| *k).next()
    }
}

/// The op named `name`, from its attributes (those of [`Op::attrs`]).
fn op<'a>(name: &'a str, a: &mut Attrs<'a>) -> Res<Op> {
    let outer = std::mem::replace(&mut a.op, name);
    let op = match name {
        "embedding" => Op::Embedding { vocab: a.get("vocab")?, hidden: a.get("hidden")? },
        "rms_norm" => Op::RmsNorm { dim: a.get("dim")?, eps: a.get("eps")? },
        "qkv_proj" => Op::QkvProj {
            hidden: a.get("hidden")?,
            heads: a.get("heads")?,
            groups: a.get("groups")?,
            head_dim: a.get("head_dim")?,
            bias: a.get("bias")?,
        },
        "tpa_qkv" => Op::TpaQkv {
            hidden: a.get("hidden")?,
            heads: a.get("heads")?,
            groups: a.get("groups")?,
            head_dim: a.get("head_dim")?,
            q_rank: a.get("q_rank")?,
            kv_rank: a.get("kv_rank")?,
            bias: a.get("bias")?,
        },
        "qk_norm" => Op::QkNorm {
            heads: a.get("heads")?,
            groups: a.get("groups")?,
            head_dim: a.get("head_dim")?,
            eps: a.get("eps")?,
        },
        "grape_m" => Op::GrapeM {
            heads: a.get("heads")?,
            groups: a.get("groups")?,
            head_dim: a.get("head_dim")?,
            log_freq_scale: a.get("log_freq_scale")?,
        },
        "value_residual" => Op::ValueResidual { groups: a.get("groups")?, head_dim: a.get("head_dim")? },
        "grape_m_at" => Op::GrapeMAt {
            heads: a.get("heads")?,
            groups: a.get("groups")?,
            head_dim: a.get("head_dim")?,
            log_freq_scale: a.get("log_freq_scale")?,
        },
        "window_attention" | "global_attention" => Op::Attention(attn(name == "window_attention", a)?),
        "cached_window_attention" | "cached_global_attention" => {
            let layer = a.get("layer")?;
            Op::CachedAttention { attn: attn(name == "cached_window_attention", a)?, layer }
        }
        "logits" => Op::Logits { hidden: a.get("hidden")?, vocab: a.get("vocab")? },
        "out_proj" => Op::OutProj { in_dim: a.get("in")?, hidden: a.get("hidden")?, bias: a.get("bias")? },
        "mlp" => {
            Op::Mlp { hidden: a.get("hidden")?, ffn: a.get("ffn")?, bias: a.get("bias")?, residual: a.get("residual")? }
        }
        "router" => Op::Router {
            hidden: a.get("hidden")?,
            experts: a.get("experts")?,
            topk: a.get("topk")?,
            group_limit: match a.opt("groups")? {
                Some(groups) => Some(GroupLimit { groups, group_topk: a.get("group_topk")? }),
                None => None,
            },
            scale: a.get("scale")?,
            expert_bias: a.get("expert_bias")?,
            bias: a.get("bias")?,
        },
        "dispatch" => Op::Dispatch { experts: a.get("experts")?, topk: a.get("topk")? },
        "expert_ffn" => Op::ExpertFfn {
            hidden: a.get("hidden")?,
            ffn: a.get("ffn")?,
            experts: a.get("experts")?,
            topk: a.get("topk")?,
            bias: a.get("bias")?,
        },
        "combine" => Op::Combine { hidden: a.get("hidden")?, topk: a.get("topk")?, shared: a.get("shared")? },
        "seq_aux_loss" => Op::SeqAuxLoss { experts: a.get("experts")?, topk: a.get("topk")? },
        "head_ce" => Op::HeadCe { hidden: a.get("hidden")?, vocab: a.get("vocab")? },
        "token_weight" => Op::TokenWeight,
        "span_loss" => Op::SpanLoss,
        "add" => Op::Add { n: a.get("n")?, ty: a.get("ty")? },
        "vjp" => {
            let of = op(a.str("of")?, a)?;
            let s = a.str("seeds")?;
            let seeds = s.chars().map(|c| matches!(c, '0' | '1').then_some(c == '1')).collect::<Option<_>>();
            let seeds =
                seeds.ok_or_else(|| format!("bad value '{s}' for attribute 'seeds' of op vjp (expected 0s and 1s)"))?;
            let acc = a.opt("acc")?.unwrap_or(false);
            // `signature` asserts this; a parse error is kinder.
            if acc && !of.accumulates() {
                return Err(format!("acc=true on a vjp of {}, which cannot accumulate", of.name()));
            }
            Op::Vjp(Box::new(Vjp { of, seeds, acc }))
        }
        _ => return Err(format!("unknown op '{name}'")),
    };
    a.op = outer;
    Ok(op)
}

/// The attributes of an attention op (window or global).
fn attn(window: bool, a: &mut Attrs) -> Res<Attn> {
    Ok(Attn {
        heads: a.get("heads")?,
        groups: a.get("groups")?,
        head_dim: a.get("head_dim")?,
        kind: if window { AttnKind::Window(a.get("window")?) } else { AttnKind::Global { alibi: a.get("alibi")? } },
        sinks: a.get("sinks")?,
    })
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Res<Self> {
        [DType::F32, DType::Bf16, DType::I32, DType::U8]
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown dtype '{s}'"))
    }
}

/// `DTYPE[DIM,…]` with dims `N`, `T` or `kT`, as [`TensorType`]'s `Display` writes it.
impl FromStr for TensorType {
    type Err = String;
    fn from_str(s: &str) -> Res<Self> {
        let bad = || format!("bad type '{s}' (expected e.g. bf16[T,512])");
        let (dtype, dims) = s.strip_suffix(']').and_then(|s| s.split_once('[')).ok_or_else(bad)?;
        let dim = |d: &str| match d.strip_suffix('T') {
            Some("") => Some(Dim::Tok(1)),
            Some(k) => k.parse().ok().map(Dim::Tok),
            None => d.parse().ok().map(Dim::Const),
        };
        let dims = match dims {
            "" => vec![],
            _ => dims.split(',').map(dim).collect::<Option<_>>().ok_or_else(bad)?,
        };
        Ok(TensorType::new(dtype.parse()?, dims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::OutputName;
    use crate::types::DType::*;

    /// Every op, init, role, input kind and optimizer group once, built in text order.
    fn every_op() -> Graph {
        let (h, vocab, heads, groups, d, e, k, ffn) = (8, 16, 2, 1, 4, 4, 2, 6);
        let mut g = Graph::new("every_op");
        let data =
            |g: &mut Graph, name, dtype| g.input(InputName::parse(name), InputKind::Data, TensorType::tok(dtype, &[]));
        let scalar = |g: &mut Graph, name, dims: &[u64]| {
            g.input(InputName::parse(name), InputKind::Scalar, TensorType::fixed(F32, dims))
        };
        let tokens = data(&mut g, "tokens", I32);
        let doc = data(&mut g, "doc", I32);
        let labels = data(&mut g, "labels", I32);
        let mask = data(&mut g, "loss_mask", U8);
        let span = data(&mut g, "span", U8);
        let span_scale = scalar(&mut g, "span_scale", &[3]);
        let logp = data(&mut g, "teacher_logp", F32);
        let teacher = data(&mut g, "teacher", U8);
        let sampler_logp = data(&mut g, "sampler_logp", F32);
        let kd = scalar(&mut g, "kd", &[5]);
        let loss_grad = scalar(&mut g, "loss_grad", &[]);
        let pos = data(&mut g, "pos", I32);
        let slot = data(&mut g, "slot", I32);

        let normal = Init::Normal { std: 0.02 };
        let param = |g: &mut Graph, name: &str, dtype, dims: &[u64], init, opt, role| {
            g.param(name.into(), TensorType::fixed(dtype, dims), init, opt, opt == OptGroup::Normuon, role)
        };
        let table = param(&mut g, "table", Bf16, &[vocab, h], normal, OptGroup::AdamW, Role::InputEmbedding);
        let norm = param(&mut g, "norm", Bf16, &[h], Init::Ones, OptGroup::AdamW, Role::Other);
        let qkv_w = param(&mut g, "qkv", Bf16, &[(heads + 2 * groups) * d, h], normal, OptGroup::Normuon, Role::Other);
        let tpa: Vec<ValueId> =
            [("a_q", heads * 2), ("a_k", groups), ("a_v", groups), ("b_q", 2 * d), ("b_k", d), ("b_v", d)]
                .into_iter()
                .map(|(n, rows)| param(&mut g, n, Bf16, &[rows, h], normal, OptGroup::Normuon, Role::Other))
                .collect();
        let tpa_bias =
            param(&mut g, "tpa_bias", Bf16, &[(heads + 2 * groups) * d], Init::Zeros, OptGroup::AdamW, Role::Other);
        let qn = param(&mut g, "q_norm", Bf16, &[d], Init::Ones, OptGroup::AdamW, Role::Other);
        let kn = param(&mut g, "k_norm", Bf16, &[d], Init::Ones, OptGroup::AdamW, Role::Other);
        let freq = Init::LogFreq { scale: 16.0, base: 10000.0, head_dim: d };
        let log_freq = param(&mut g, "log_freq", F32, &[d / 2], freq, OptGroup::Frozen, Role::Other);
        let logit = param(&mut g, "logit", F32, &[], Init::Const { value: 9.21024 }, OptGroup::AdamW, Role::Other);
        let sinks = param(&mut g, "sinks", F32, &[heads], Init::Normal { std: 1e-7 }, OptGroup::AdamW, Role::Other);
        let small = Init::Normal { std: 0.0070710676 };
        let proj = param(&mut g, "proj", Bf16, &[h, heads * d], small, OptGroup::Normuon, Role::Other);
        let router = param(&mut g, "router", Bf16, &[e, h], normal, OptGroup::Normuon, Role::Other);
        let ebias = param(&mut g, "expert_bias", F32, &[e], Init::Zeros, OptGroup::Frozen, Role::Other);
        let experts = Role::Experts { experts: e, topk: k };
        let fc1 = param(&mut g, "fc1", Bf16, &[e, ffn, h], normal, OptGroup::Normuon, experts);
        let fc2 = param(&mut g, "fc2", Bf16, &[e, h, ffn], normal, OptGroup::Normuon, experts);
        let sfc1 = param(&mut g, "shared_fc1", Bf16, &[ffn, h], normal, OptGroup::Normuon, Role::Other);
        let sfc2 = param(&mut g, "shared_fc2", Bf16, &[h, ffn], normal, OptGroup::Normuon, Role::Other);
        let head = param(&mut g, "head", Bf16, &[vocab, h], normal, OptGroup::AdamW, Role::OutputHead);
        let tied = param(&mut g, "tied", Bf16, &[vocab, h], normal, OptGroup::AdamW, Role::TiedEmbedding);

        let mut node = |name: &str, op, ins| g.node(name.into(), op, ins);
        let h0 = node("embed", Op::Embedding { vocab, hidden: h }, vec![tokens, table])[0];
        let _ = node("embed_tied", Op::Embedding { vocab, hidden: h }, vec![tokens, tied]);
        let x = node("norm", Op::RmsNorm { dim: h, eps: 1e-5 }, vec![h0, norm])[0];
        let qkv = node("qkv", Op::QkvProj { hidden: h, heads, groups, head_dim: d, bias: false }, vec![x, qkv_w]);
        let tpa_op = Op::TpaQkv { hidden: h, heads, groups, head_dim: d, q_rank: 2, kv_rank: 1, bias: true };
        let v1 = node("tpa", tpa_op, [&[x][..], &tpa, &[tpa_bias]].concat())[2];
        let qk = node("qk_norm", Op::QkNorm { heads, groups, head_dim: d, eps: 1e-6 }, vec![qkv[0], qkv[1], qn, kn]);
        let qk = node(
            "grape",
            Op::GrapeM { heads, groups, head_dim: d, log_freq_scale: 16.0 },
            vec![qk[0], qk[1], log_freq],
        );
        let v = node("vres", Op::ValueResidual { groups, head_dim: d }, vec![qkv[2], v1, logit])[0];
        let attn = |kind, sinks| Op::Attention(Attn { heads, groups, head_dim: d, kind, sinks });
        let ctx = node("window", attn(AttnKind::Window(3), true), vec![qk[0], qk[1], v, doc, sinks])[0];
        let _ = node("global", attn(AttnKind::Global { alibi: true }, false), vec![qk[0], qk[1], v, doc]);
        // The decode program's ops.
        let grape_at = Op::GrapeMAt { heads, groups, head_dim: d, log_freq_scale: 16.0 };
        let qa = node("grape_at", grape_at, vec![qk[0], qk[1], log_freq, pos]);
        let cached =
            |kind, sinks, layer| Op::CachedAttention { attn: Attn { heads, groups, head_dim: d, kind, sinks }, layer };
        let _ = node("cached_window", cached(AttnKind::Window(3), true, 0), vec![qa[0], qa[1], v, pos, slot, sinks]);
        let _ = node(
            "cached_global",
            cached(AttnKind::Global { alibi: false }, false, 1),
            vec![qa[0], qa[1], v, pos, slot],
        );
        let h1 = node("proj", Op::OutProj { in_dim: heads * d, hidden: h, bias: false }, vec![ctx, proj, h0])[0];
        let limit = Some(GroupLimit { groups: 2, group_topk: 1 });
        let route = Op::Router {
            hidden: h,
            experts: e,
            topk: k,
            group_limit: limit,
            scale: 2.5,
            expert_bias: true,
            bias: false,
        };
        let r = node("router", route, vec![h1, router, ebias]);
        let _ = node("aux", Op::SeqAuxLoss { experts: e, topk: k }, vec![r[2]]);
        let dsp = node("dispatch", Op::Dispatch { experts: e, topk: k }, vec![r[0]]);
        let ffn_op = Op::ExpertFfn { hidden: h, ffn, experts: e, topk: k, bias: false };
        let yp = node("experts", ffn_op, vec![h1, dsp[0], dsp[1], dsp[2], fc1, fc2])[0];
        let sh = node("shared", Op::Mlp { hidden: h, ffn, bias: false, residual: false }, vec![h1, sfc1, sfc2])[0];
        let h2 = node("combine", Op::Combine { hidden: h, topk: k, shared: true }, vec![yp, dsp[1], r[1], h1, sh])[0];
        let ce_ins = vec![h2, head, labels, mask];
        let ce = node("head", Op::HeadCe { hidden: h, vocab }, ce_ins.clone());
        let w = node("weight", Op::TokenWeight, vec![ce[0], logp, sampler_logp, teacher, kd])[0];
        let loss_ins = vec![ce[0], span, span_scale, w];
        let loss = node("loss", Op::SpanLoss, loss_ins.clone());
        let vjp =
            |of, seeds: &str, acc| Op::Vjp(Box::new(Vjp { of, seeds: seeds.chars().map(|c| c == '1').collect(), acc }));
        let dtok = node("loss.bwd", vjp(Op::SpanLoss, "1", false), [loss_ins, loss.clone(), vec![loss_grad]].concat());
        let ce_bwd = [ce_ins, ce.clone(), dtok].concat();
        let dz = node("head.bwd", vjp(Op::HeadCe { hidden: h, vocab }, "10", false), ce_bwd);
        let rms = Op::RmsNorm { dim: h, eps: 1e-5 };
        let dn = node("norm.bwd", vjp(rms, "1", true), vec![h0, norm, x, dz[0], dz[0]]);
        let sum = node("sum", Op::Add { n: 2, ty: TensorType::fixed(F32, &[h]) }, vec![dn[1], dn[1]])[0];
        let logits = node("logits", Op::Logits { hidden: h, vocab }, vec![h2, head])[0];
        g.output(OutputName::Loss, loss[0]);
        g.output(OutputName::Logits, logits);
        let grad = g.parse_output_name("grad.norm");
        assert!(matches!(grad, OutputName::Grad(_)));
        g.output(grad, sum);
        g
    }

    #[test]
    fn every_op_round_trips() {
        let g = every_op();
        let text = g.to_text();
        let back = parse_graph(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back.to_text(), text);
        assert_eq!(back, g);
        assert_eq!(text.parse::<Graph>().unwrap(), g);
    }

    /// Values interleaved by the builder come back in text order: equal to `canonical`.
    #[test]
    fn interleaved_values_parse_to_the_canonical_graph() {
        let mut g = Graph::new("interleaved");
        let x = g.input(InputName::parse("x"), InputKind::Data, TensorType::tok(Bf16, &[8]));
        let w = g.param("w".into(), TensorType::fixed(Bf16, &[8]), Init::Ones, OptGroup::AdamW, false, Role::Other);
        let y = g.node("a".into(), Op::RmsNorm { dim: 8, eps: 1e-5 }, vec![x, w])[0];
        let w2 = g.param("w2".into(), TensorType::fixed(Bf16, &[8]), Init::Ones, OptGroup::AdamW, false, Role::Other);
        let z = g.node("b".into(), Op::RmsNorm { dim: 8, eps: 1e-5 }, vec![y, w2])[0];
        g.output(OutputName::Other("z".into()), z);
        let back = parse_graph(&g.to_text()).unwrap();
        assert_ne!(back, g);
        assert_eq!(back, g.canonical());
        assert_eq!(back.to_text(), g.to_text());
    }

    /// `{:?}` floats parse back to the same bits, tiny, huge and subnormal included.
    #[test]
    fn floats_round_trip_exactly() {
        for v in [0.1f32, 1e-5, 9.21024, 1.1920929e-7, f32::MAX, f32::MIN_POSITIVE / 3.0, -0.0, 3.0e38] {
            let mut g = Graph::new("f");
            let init = Init::LogFreq { scale: v, base: v, head_dim: 2 };
            g.param("p".into(), TensorType::scalar(F32), init, OptGroup::Frozen, false, Role::Other);
            let value = Init::Const { value: v };
            g.param("q".into(), TensorType::scalar(F32), value, OptGroup::Frozen, false, Role::Other);
            let back = parse_graph(&g.to_text()).unwrap();
            assert_eq!(back.params[1].init, Init::Const { value: v });
            assert!(matches!(back.params[0].init, Init::LogFreq { scale, .. } if scale.to_bits() == v.to_bits()));
        }
    }

    #[test]
    fn split_graph_text_drops_the_optimizer_section() {
        let text = every_op().to_text();
        let ir_txt = format!("{text}\noptimizer adamw\n  @norm\n");
        assert_eq!(split_graph_text(&ir_txt), text);
        assert_eq!(split_graph_text(&text), text);
    }

    const BASE: &str = "graph g
  input $x: bf16[T,8] data
  param @w: bf16[8] init=ones opt=adamw
  norm: %0 = rms_norm($x, @w) {dim=8 eps=1e-5} -> bf16[T,8]
  output y = %0
";
    const NORM: &str = "  norm: %0 = rms_norm($x, @w) {dim=8 eps=1e-5} -> bf16[T,8]";

    #[test]
    fn base_parses() {
        assert_eq!(parse_graph(BASE).unwrap().to_text(), BASE);
    }

    /// Each error names its line and what is wrong there: `(text in BASE, replacement, error)`.
    #[test]
    fn errors() {
        let attention =
            "  a: %1 = window_attention(%0, %0, %0, $x) {groups=1 head_dim=4 window=3 sinks=false} -> bf16[T,8]";
        let attention = format!("{attention}\n  output");
        let vjp = |attrs: &str| format!("  bwd: %0, %1 = vjp($x, @w, $x, $x) {{{attrs}}} -> bf16[T,8], f32[8]");
        let no_eps = vjp("of=rms_norm dim=8 seeds=1");
        let no_seeds = vjp("of=rms_norm dim=8 eps=1e-5");
        let bad_seeds = vjp("of=rms_norm dim=8 eps=1e-5 seeds=2");
        let bad_acc = vjp("of=embedding vocab=8 hidden=8 seeds=1 acc=true");
        let cases = [
            ("graph g", "grph g", "line 1: expected 'graph NAME', found 'grph g'"),
            ("graph g\n", "", "line 1: expected 'graph NAME', found 'input $x: bf16[T,8] data'"),
            ("bf16[T,8] data", "bf16[T,x] data", "line 2: bad type 'bf16[T,x]' (expected e.g. bf16[T,512])"),
            ("bf16[T,8] data", "f16[T,8] data", "line 2: unknown dtype 'f16'"),
            ("] data", "] weights", "line 2: unknown input kind 'weights' (expected data or scalar)"),
            ("x: bf16", "x bf16", "line 2: expected 'input $NAME: TYPE KIND'"),
            ("  param", "  input $x: i32[T] data\n  param", "line 3: $x is defined twice"),
            ("init=ones", "init=uniform(1)", "line 3: unknown init 'uniform(1)'"),
            ("init=ones", "init=normal(0.1", "line 3: missing ')' in 'normal(0.1'"),
            ("init=ones", "init=normal(x)", "line 3: bad number 'x'"),
            ("init=ones opt", "opt", "line 3: expected 'init=…' in param @w, found 'opt=adamw'"),
            ("opt=adamw", "opt=sgd", "line 3: unknown optimizer group 'sgd'"),
            ("opt=adamw", "opt=adamw role=router", "line 3: unknown role 'router'"),
            ("opt=adamw", "opt=adamw role=experts(2)", "line 3: expected experts(TOPK/EXPERTS), found 'experts(2)'"),
            ("opt=adamw", "opt=adamw wd wd", "line 3: unexpected 'wd' in param @w"),
            ("opt=adamw", "opt=adamw wd x", "line 3: unexpected 'x' in param @w"),
            (NORM, "  nonsense", "line 4: expected 'NAME: OUTPUTS = OP(ARGS) {ATTRS} -> TYPES', found 'nonsense'"),
            ("rms_norm($x", "foo($x", "line 4: unknown op 'foo'"),
            ("($x, @w)", "(%1, @w)", "line 4: value %1 used before definition"),
            ("($x, @w)", "($x, @v)", "line 4: value @v used before definition"),
            ("($x, @w)", "(x, @w)", "line 4: expected a value ($input, @param or %n), found 'x'"),
            (" eps=1e-5", "", "line 4: attribute 'eps' missing for op rms_norm"),
            ("eps=1e-5", "eps=1e-5 bias=true", "line 4: unknown attribute 'bias' for op rms_norm"),
            ("dim=8", "dim=eight", "line 4: bad value 'eight' for attribute 'dim' of op rms_norm"),
            ("dim=8", "dim", "line 4: expected KEY=VALUE, found 'dim'"),
            (
                "} -> bf16",
                "} -> f32",
                "line 4: output %0 of rms_norm is printed as f32[T,8], but the op gives bf16[T,8]",
            ),
            ("%0 = rms", "%0, %1 = rms", "line 4: op rms_norm has 1 output(s), not 2 with 1 type(s)"),
            ("%0 = rms", "%3 = rms", "line 4: expected output %0, found '%3'"),
            (NORM, &no_eps, "line 4: attribute 'eps' missing for op rms_norm"),
            (NORM, &no_seeds, "line 4: attribute 'seeds' missing for op vjp"),
            (NORM, &bad_seeds, "line 4: bad value '2' for attribute 'seeds' of op vjp (expected 0s and 1s)"),
            (NORM, &bad_acc, "line 4: acc=true on a vjp of embedding, which cannot accumulate"),
            ("  output", &attention, "line 5: attribute 'heads' missing for op window_attention"),
            ("y = %0", "y = %1", "line 5: value %1 used before definition"),
            ("output y = %0", "output y %0", "line 5: expected 'output NAME = VALUE'"),
        ];
        for (from, to, want) in cases {
            assert!(BASE.contains(from), "{from}");
            let got = parse_graph(&BASE.replacen(from, to, 1)).expect_err(want).to_string();
            assert_eq!(got, want);
        }
        assert_eq!(parse_graph("\n").unwrap_err().to_string(), "line 1: expected 'graph NAME'");
    }
}
