//! The IR as MLIR (`vpmoec compile --emit-mlir`, the `mlir` feature): one `func.func` per graph
//! — the training step (forward and backward), `decode.prefill`, `decode.step` — each vpmoe op an
//! operation of an unregistered `vpmoe` dialect in MLIR's generic form, built with melior and
//! checked by MLIR's verifier (docs/ir.md).
//!
//! - Values are `tensor<…>`: a dimension `k·T` is dynamic (`?`), its multiplier in the op's
//!   `vpmoe.tokens` (one per result; 0 for a result without a token dimension). `u8` is `ui8`.
//! - A graph's inputs and parameters are the function's arguments, each with its declaration
//!   line of the text form as `vpmoe.decl`; the function returns the graph's outputs, named in
//!   its `vpmoe.outputs` (one per line).
//! - An op carries its node name (`vpmoe.node`), its attributes typed where the text form's
//!   value prints back the same (`i64`, `f32`, `bool`), as strings otherwise, and their order
//!   (`vpmoe.attrs`).
//! - The training function carries the optimizer program's text (`vpmoe.optimizer`).
//!
//! [`parse_module`] reads such a module back into the text form, so `ir.mlir` round-trips to the
//! same `ir.txt`.

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use melior::dialect::{func, DialectRegistry};
use melior::ir::attribute::{
    ArrayAttribute, BoolAttribute, DenseI64ArrayAttribute, FloatAttribute, IntegerAttribute, StringAttribute,
    TypeAttribute,
};
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::{FunctionType, IntegerType, RankedTensorType};
use melior::ir::{
    Attribute, AttributeLike, Block, BlockLike, Identifier, Location, Module, Region, RegionLike, ShapedTypeLike, Type,
    Value, ValueLike,
};
use melior::Context;
use std::collections::HashMap;
use vpmoe_ir::{DType, Dim, Graph, TensorType};

/// A context that knows `func` and accepts the `vpmoe` dialect's operations.
pub fn context() -> Context {
    let ctx = Context::new();
    let registry = DialectRegistry::new();
    melior::utility::register_all_dialects(&registry);
    ctx.append_dialect_registry(&registry);
    ctx.load_all_available_dialects();
    ctx.set_allow_unregistered_dialects(true);
    ctx
}

fn element(ctx: &Context, d: DType) -> Type<'_> {
    match d {
        DType::Bf16 => Type::bfloat16(ctx),
        DType::F32 => Type::float32(ctx),
        DType::I32 => IntegerType::new(ctx, 32).into(),
        DType::U8 => Type::parse(ctx, "ui8").expect("ui8 is a builtin type"),
    }
}

fn dtype_name(element: &str) -> Result<&'static str> {
    Ok(match element {
        "bf16" => "bf16",
        "f32" => "f32",
        "i32" => "i32",
        "ui8" => "u8",
        other => bail!("element type {other} is not a vpmoe dtype"),
    })
}

fn tensor<'c>(ctx: &'c Context, t: &TensorType) -> Type<'c> {
    let dims: Vec<u64> = t
        .dims
        .iter()
        .map(|d| match d {
            Dim::Tok(_) => i64::MIN as u64,
            Dim::Const(n) => *n,
        })
        .collect();
    RankedTensorType::new(&dims, element(ctx, t.dtype), None).into()
}

/// The `k` of a type's leading `k·T`, or 0.
fn token_mul(t: &TensorType) -> i64 {
    match t.dims.first() {
        Some(Dim::Tok(k)) => *k as i64,
        _ => 0,
    }
}

/// An op attribute's value, typed where it prints back the same.
fn typed<'c>(ctx: &'c Context, v: &str) -> Attribute<'c> {
    if let Ok(i) = v.parse::<i64>() {
        if i.to_string() == v {
            return IntegerAttribute::new(IntegerType::new(ctx, 64).into(), i).into();
        }
    }
    if let Ok(f) = v.parse::<f32>() {
        if format!("{f:?}") == v {
            return FloatAttribute::new(ctx, Type::float32(ctx), f as f64).into();
        }
    }
    match v {
        "true" | "false" => BoolAttribute::new(ctx, v == "true").into(),
        _ => StringAttribute::new(ctx, v).into(),
    }
}

/// The text form of an op attribute's value (see [`typed`]).
fn untyped(ctx: &Context, a: Attribute) -> Result<String> {
    // A bool is an `i1` integer attribute: tested first.
    for b in [true, false] {
        if a == Attribute::from(BoolAttribute::new(ctx, b)) {
            return Ok(b.to_string());
        }
    }
    if let Ok(i) = IntegerAttribute::try_from(a) {
        return Ok(i.value().to_string());
    }
    if let Ok(f) = FloatAttribute::try_from(a) {
        return Ok(format!("{:?}", f.value() as f32));
    }
    if a.is_string() {
        return text_of(a);
    }
    bail!("attribute {a} is not one vpmoe writes")
}

fn string_attr<'c>(ctx: &'c Context, s: &str) -> Attribute<'c> {
    StringAttribute::new(ctx, s).into()
}

/// Adds `g` to `module` as `func.func @name`; `extra` goes on the function.
fn add_graph<'c>(ctx: &'c Context, module: &Module<'c>, name: &str, g: &Graph, extra: &[(&str, String)]) -> Result<()> {
    let loc = Location::unknown(ctx);
    let text = g.to_text();
    let decls: Vec<&str> =
        text.lines().filter(|l| l.starts_with("  input ") || l.starts_with("  param ")).map(str::trim).collect();
    let arg_values: Vec<vpmoe_ir::ValueId> =
        g.inputs.iter().map(|i| i.value).chain(g.params.iter().map(|p| p.value)).collect();
    ensure!(
        decls.len() == arg_values.len(),
        "internal: {} declarations for {} arguments",
        decls.len(),
        arg_values.len()
    );
    let arg_types: Vec<Type> = arg_values.iter().map(|v| tensor(ctx, &g.value(*v).ty)).collect();
    let out_types: Vec<Type> = g.outputs.iter().map(|(_, v)| tensor(ctx, &g.value(*v).ty)).collect();
    let region = Region::new();
    let block = region.append_block(Block::new(&arg_types.iter().map(|t| (*t, loc)).collect::<Vec<_>>()));
    let mut vals: HashMap<u32, Value> = HashMap::new();
    for (i, v) in arg_values.iter().enumerate() {
        vals.insert(v.0, block.argument(i)?.into());
    }
    for node in &g.nodes {
        let operands: Vec<Value> = node
            .inputs
            .iter()
            .map(|v| {
                vals.get(&v.0).copied().ok_or_else(|| anyhow!("{}: an operand is used before it is defined", node.name))
            })
            .collect::<Result<_>>()?;
        let results: Vec<Type> = node.outputs.iter().map(|v| tensor(ctx, &g.value(*v).ty)).collect();
        let attrs = node.op.attrs();
        let mut named: Vec<(Identifier, Attribute)> = vec![
            (Identifier::new(ctx, "vpmoe.node"), string_attr(ctx, &node.name)),
            (
                Identifier::new(ctx, "vpmoe.tokens"),
                DenseI64ArrayAttribute::new(
                    ctx,
                    &node.outputs.iter().map(|v| token_mul(&g.value(*v).ty)).collect::<Vec<_>>(),
                )
                .into(),
            ),
            (
                Identifier::new(ctx, "vpmoe.attrs"),
                string_attr(ctx, &attrs.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(" ")),
            ),
        ];
        named.extend(attrs.iter().map(|(k, v)| (Identifier::new(ctx, k), typed(ctx, v))));
        let op = OperationBuilder::new(&format!("vpmoe.{}", node.op.name()), loc)
            .add_operands(&operands)
            .add_results(&results)
            .add_attributes(&named)
            .build()
            .map_err(|e| anyhow!("{}: {e}", node.name))?;
        let op = block.append_operation(op);
        for (i, v) in node.outputs.iter().enumerate() {
            vals.insert(v.0, op.result(i)?.into());
        }
    }
    let returned: Vec<Value> = g.outputs.iter().map(|(_, v)| vals[&v.0]).collect();
    block.append_operation(func::r#return(&returned, loc));
    let arg_attrs: Vec<Attribute> = decls
        .iter()
        .map(|d| {
            Attribute::parse(ctx, &format!("{{vpmoe.decl = {}}}", mlir_string(d)))
                .ok_or_else(|| anyhow!("internal: the declaration {d:?} does not parse as an attribute"))
        })
        .collect::<Result<_>>()?;
    let outputs: Vec<String> = g.outputs.iter().map(|(n, _)| g.output_text(n)).collect();
    let mut fattrs = vec![
        (Identifier::new(ctx, "arg_attrs"), ArrayAttribute::new(ctx, &arg_attrs).into()),
        (Identifier::new(ctx, "vpmoe.graph"), string_attr(ctx, &g.name)),
        (Identifier::new(ctx, "vpmoe.outputs"), string_attr(ctx, &outputs.join("\n"))),
    ];
    fattrs.extend(extra.iter().map(|(k, v)| (Identifier::new(ctx, k), string_attr(ctx, v))));
    module.body().append_operation(func::func(
        ctx,
        StringAttribute::new(ctx, name),
        TypeAttribute::new(FunctionType::new(ctx, &arg_types, &out_types).into()),
        region,
        &fattrs,
        loc,
    ));
    Ok(())
}

/// `s` as an MLIR string literal.
fn mlir_string(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The functions of a module: (symbol, graph), in order.
pub struct Functions<'a> {
    pub train: &'a Graph,
    pub optimizer: String,
    pub prefill: &'a Graph,
    pub step: &'a Graph,
}

/// The module of `f`, verified, in MLIR's generic form.
pub fn emit(f: &Functions) -> Result<String> {
    let ctx = context();
    let module = Module::new(Location::unknown(&ctx));
    add_graph(&ctx, &module, "train", f.train, &[("vpmoe.optimizer", f.optimizer.clone())])?;
    add_graph(&ctx, &module, "decode_prefill", f.prefill, &[])?;
    add_graph(&ctx, &module, "decode_step", f.step, &[])?;
    ensure!(module.as_operation().verify(), "internal error: MLIR's verifier rejects the module");
    module
        .as_operation()
        .to_string_with_flags(melior::ir::operation::OperationPrintingFlags::new().print_generic_operation_form())
        .map_err(|e| anyhow!("printing the module: {e}"))
}

/// What [`parse_module`] reads back: each function's graph in the text form, and the optimizer
/// program's text.
pub struct Parsed {
    pub graphs: Vec<(String, String)>,
    pub optimizer: String,
}

/// Reads a module [`emit`] wrote (after MLIR's parser and verifier) back into the text form.
pub fn parse_module(text: &str) -> Result<Parsed> {
    let ctx = context();
    let module = Module::parse(&ctx, text).context("MLIR's parser rejects the module")?;
    ensure!(module.as_operation().verify(), "MLIR's verifier rejects the module");
    let mut out = Parsed { graphs: Vec::new(), optimizer: String::new() };
    let mut cur = module.body().first_operation();
    while let Some(f) = cur {
        let fname = f.name();
        let fname = fname.as_string_ref().as_str().map_err(|e| anyhow!("{e}"))?.to_string();
        ensure!(fname == "func.func", "a top-level {fname}: vpmoe modules hold func.func operations only");
        let sym = text_of(f.attribute("sym_name")?)?;
        let graph = text_of(f.attribute("vpmoe.graph")?)?;
        if let Ok(o) = f.attribute("vpmoe.optimizer") {
            out.optimizer = text_of(o)?;
        }
        let outputs = text_of(f.attribute("vpmoe.outputs")?)?;
        let arg_attrs = f.attribute("arg_attrs")?;
        let region = f.region(0)?;
        let entry = region.first_block().context("a function without a body")?;
        let mut text = format!("graph {graph}\n");
        // Value → its reference in the text form.
        let mut refs: HashMap<usize, String> = HashMap::new();
        let n_args = entry.argument_count();
        let listed = unsafe { mlir_sys::mlirAttributeIsAArray(arg_attrs.to_raw()) }
            .then(|| unsafe { mlir_sys::mlirArrayAttrGetNumElements(arg_attrs.to_raw()) });
        ensure!(listed == Some(n_args as isize), "@{sym}: arg_attrs is not an array of one dictionary per argument");
        for i in 0..n_args {
            let dict =
                unsafe { Attribute::from_raw(mlir_sys::mlirArrayAttrGetElement(arg_attrs.to_raw(), i as isize)) };
            let decl = dict_string(&ctx, dict, "vpmoe.decl").with_context(|| format!("@{sym} argument {i}"))?;
            let r = decl.split_whitespace().nth(1).context("a declaration without a name")?.trim_end_matches(':');
            let arg: Value = entry.argument(i)?.into();
            refs.insert(arg.to_raw().ptr as usize, r.to_string());
            text.push_str(&format!("  {decl}\n"));
        }
        let mut n = 0usize;
        let mut op = entry.first_operation();
        while let Some(o) = op {
            let name = o.name().as_string_ref().as_str().map_err(|e| anyhow!("{e}"))?.to_string();
            let args: Vec<String> = (0..o.operand_count())
                .map(|i| {
                    let v = o.operand(i)?;
                    refs.get(&(v.to_raw().ptr as usize)).cloned().ok_or_else(|| anyhow!("{name}: an unknown operand"))
                })
                .collect::<Result<_>>()?;
            if name == "func.return" {
                for (out_name, r) in outputs.lines().zip(&args) {
                    text.push_str(&format!("  output {out_name} = {r}\n"));
                }
                ensure!(
                    outputs.lines().count() == args.len(),
                    "@{sym}: {} outputs named, {} returned",
                    outputs.lines().count(),
                    args.len()
                );
                break;
            }
            let op_name = name.strip_prefix("vpmoe.").with_context(|| format!("@{sym}: {name} is not a vpmoe op"))?;
            let node = text_of(o.attribute("vpmoe.node")?)?;
            let order = text_of(o.attribute("vpmoe.attrs")?)?;
            let muls = DenseI64ArrayAttribute::try_from(o.attribute("vpmoe.tokens")?).map_err(|e| anyhow!("{e}"))?;
            let mut attrs = Vec::new();
            for k in order.split_whitespace() {
                attrs.push(format!("{k}={}", untyped(&ctx, o.attribute(k)?)?));
            }
            let mut outs = Vec::new();
            let mut tys = Vec::new();
            for i in 0..o.result_count() {
                let v: Value = o.result(i)?.into();
                refs.insert(v.to_raw().ptr as usize, format!("%{n}"));
                outs.push(format!("%{n}"));
                n += 1;
                let t = RankedTensorType::try_from(v.r#type()).map_err(|e| anyhow!("{e}"))?;
                let dims: Vec<String> = (0..t.rank())
                    .map(|d| {
                        let s = t.dim_size(d)?;
                        Ok(if s == i64::MIN as usize {
                            match muls.element(i)? {
                                1 => "T".to_string(),
                                k => format!("{k}T"),
                            }
                        } else {
                            s.to_string()
                        })
                    })
                    .collect::<Result<_>>()?;
                tys.push(format!("{}[{}]", dtype_name(&t.element().to_string())?, dims.join(",")));
            }
            let attrs = if attrs.is_empty() { String::new() } else { format!(" {{{}}}", attrs.join(" ")) };
            text.push_str(&format!(
                "  {node}: {} = {op_name}({}){attrs} -> {}\n",
                outs.join(", "),
                args.join(", "),
                tys.join(", ")
            ));
            op = unsafe { o.to_ref() }.next_in_block();
        }
        out.graphs.push((sym, text));
        cur = unsafe { f.to_ref() }.next_in_block();
    }
    Ok(out)
}

/// A string attribute's value (melior's `value()` cannot take an empty one).
fn text_of(a: Attribute) -> Result<String> {
    ensure!(a.is_string(), "attribute {a} is not a string");
    let r = unsafe { mlir_sys::mlirStringAttrGetValue(a.to_raw()) };
    if r.length == 0 {
        return Ok(String::new());
    }
    let bytes = unsafe { std::slice::from_raw_parts(r.data as *const u8, r.length) };
    Ok(std::str::from_utf8(bytes).context("a string attribute that is not UTF-8")?.to_string())
}

/// The string `key` of a dictionary attribute.
fn dict_string(ctx: &Context, dict: Attribute, key: &str) -> Result<String> {
    let _ = ctx;
    ensure!(unsafe { mlir_sys::mlirAttributeIsADictionary(dict.to_raw()) }, "{dict} is not a dictionary");
    let k = melior::StringRef::new(key);
    let a = unsafe { Attribute::from_raw(mlir_sys::mlirDictionaryAttrGetElementByName(dict.to_raw(), k.to_raw())) };
    ensure!(!a.to_raw().ptr.is_null(), "no {key}");
    text_of(a)
}

/// The ops [`emit_linalg`] lowers to upstream dialects; every other op stays custom.
pub const LOWERED: &[&str] = &["add", "out_proj", "mlp", "logits"];

/// The module of `f` with the plain tensor computations in upstream dialects (`linalg`, `arith`,
/// `tensor`): `add` is `arith.addf`; `out_proj`, `mlp` and `logits` are
/// `linalg.matmul_transpose_b` (the weights are `[out, in]`; `logits` accumulates into f32), bias
/// broadcasts, ReLU² as `arith.maximumf` and `arith.mulf`, and the residual `arith.addf`, in the
/// values' own element types. Every other op is a call of a
/// private function declared per node (`@"<op>:<node>"`, its attributes as `vpmoe.attrs`). MLIR
/// verifies it with no unregistered dialect allowed.
pub fn emit_linalg(f: &Functions) -> Result<String> {
    let mut text = String::from("module {\n");
    let mut decls = String::new();
    for (sym, g) in [("train", f.train), ("decode_prefill", f.prefill), ("decode_step", f.step)] {
        linalg_func(sym, g, &mut text, &mut decls)?;
    }
    text.push_str(&decls);
    text.push_str("}\n");
    let ctx = Context::new();
    let registry = DialectRegistry::new();
    melior::utility::register_all_dialects(&registry);
    ctx.append_dialect_registry(&registry);
    ctx.load_all_available_dialects();
    let module = Module::parse(&ctx, &text).context("internal error: MLIR's parser rejects the linalg module")?;
    ensure!(module.as_operation().verify(), "internal error: MLIR's verifier rejects the linalg module");
    Ok(module.as_operation().to_string())
}

/// The MLIR text of a tensor type.
fn tensor_text(t: &TensorType) -> String {
    let mut s = String::from("tensor<");
    for d in &t.dims {
        match d {
            Dim::Tok(_) => s.push_str("?x"),
            Dim::Const(n) => s.push_str(&format!("{n}x")),
        }
    }
    s.push_str(match t.dtype {
        DType::Bf16 => "bf16",
        DType::F32 => "f32",
        DType::I32 => "i32",
        DType::U8 => "ui8",
    });
    s.push('>');
    s
}

fn linalg_func(sym: &str, g: &Graph, out: &mut String, decls: &mut String) -> Result<()> {
    use std::fmt::Write;
    let v = |id: vpmoe_ir::ValueId| format!("%v{}", id.0);
    let ty = |id: vpmoe_ir::ValueId| tensor_text(&g.value(id).ty);
    let args: Vec<vpmoe_ir::ValueId> =
        g.inputs.iter().map(|i| i.value).chain(g.params.iter().map(|p| p.value)).collect();
    let params: Vec<String> = args.iter().map(|a| format!("{}: {}", v(*a), ty(*a))).collect();
    let results: Vec<String> = g.outputs.iter().map(|(_, o)| ty(*o)).collect();
    writeln!(out, "  func.func @{sym}({}) -> ({}) {{", params.join(", "), results.join(", "))?;
    writeln!(out, "    %c0 = arith.constant 0 : index")?;
    let mut tmp = 0usize;
    let mut fresh = || {
        tmp += 1;
        format!("%t{tmp}")
    };
    for (ni, node) in g.nodes.iter().enumerate() {
        let ins: Vec<String> = node.inputs.iter().map(|i| v(*i)).collect();
        match node.op {
            vpmoe_ir::Op::Add { .. } => {
                let t = ty(node.outputs[0]);
                let mut acc = ins[0].clone();
                for (k, x) in ins.iter().enumerate().skip(1) {
                    let to = if k + 1 == ins.len() { v(node.outputs[0]) } else { fresh() };
                    writeln!(out, "    {to} = arith.addf {acc}, {x} : {t}")?;
                    acc = to;
                }
                if ins.len() == 1 {
                    // A one-input add is its input.
                    writeln!(out, "    {} = tensor.cast {} : {t} to {t}", v(node.outputs[0]), ins[0])?;
                }
            }
            vpmoe_ir::Op::OutProj { bias, .. } => {
                let (x, w) = (node.inputs[0], node.inputs[1]);
                let y = dense(out, &mut fresh, g, x, w, bias.then(|| node.inputs[2]), &ty(node.outputs[0]), false)?;
                let r = ins.last().expect("a residual");
                writeln!(out, "    {} = arith.addf {y}, {r} : {}", v(node.outputs[0]), ty(node.outputs[0]))?;
            }
            vpmoe_ir::Op::Mlp { ffn, bias, residual, .. } => {
                let x = node.inputs[0];
                let (w1, b1) = (node.inputs[1], bias.then(|| node.inputs[2]));
                let (w2, b2) = (node.inputs[2 + bias as usize], bias.then(|| node.inputs[3 + bias as usize]));
                let out_ty = ty(node.outputs[0]);
                let dt = g.value(node.outputs[0]).ty.dtype;
                let hidden_ty = tensor_text(&TensorType::tok(dt, &[ffn]));
                let h = dense(out, &mut fresh, g, x, w1, b1, &hidden_ty, true)?;
                let y = dense_from(out, &mut fresh, g, &h, x, w2, b2, &out_ty)?;
                if residual {
                    let r = ins.last().expect("a residual");
                    writeln!(out, "    {} = arith.addf {y}, {r} : {out_ty}", v(node.outputs[0]))?;
                } else {
                    writeln!(out, "    {} = tensor.cast {y} : {out_ty} to {out_ty}", v(node.outputs[0]))?;
                }
            }
            vpmoe_ir::Op::Logits { .. } => {
                let t = ty(node.outputs[0]);
                let y = dense(out, &mut fresh, g, node.inputs[0], node.inputs[1], None, &t, false)?;
                writeln!(out, "    {} = tensor.cast {y} : {t} to {t}", v(node.outputs[0]))?;
            }
            ref op => {
                let callee = format!("\"{}:{}:{sym}.{ni}\"", op.name(), node.name);
                let in_tys: Vec<String> = node.inputs.iter().map(|i| ty(*i)).collect();
                let out_tys: Vec<String> = node.outputs.iter().map(|o| ty(*o)).collect();
                let attrs: Vec<String> = op.attrs().into_iter().map(|(k, x)| format!("{k}={x}")).collect();
                writeln!(
                    decls,
                    "  func.func private @{callee}({}) -> ({}) attributes {{vpmoe.op = {}, vpmoe.attrs = {}}}",
                    in_tys.join(", "),
                    out_tys.join(", "),
                    mlir_string(op.name()),
                    mlir_string(&attrs.join(" "))
                )?;
                let outs: Vec<String> = node.outputs.iter().map(|o| v(*o)).collect();
                writeln!(
                    out,
                    "    {} = func.call @{callee}({}) : ({}) -> ({})",
                    outs.join(", "),
                    ins.join(", "),
                    in_tys.join(", "),
                    out_tys.join(", ")
                )?;
            }
        }
    }
    let rets: Vec<String> = g.outputs.iter().map(|(_, o)| v(*o)).collect();
    if rets.is_empty() {
        writeln!(out, "    return")?;
    } else {
        writeln!(out, "    return {} : {}", rets.join(", "), results.join(", "))?;
    }
    writeln!(out, "  }}")?;
    Ok(())
}

/// `x·wᵀ (+ b)` of a token-rows `x` into a new tensor of type `y_ty` (ReLU² after when `relu2`);
/// returns its SSA name.
#[allow(clippy::too_many_arguments)]
fn dense(
    out: &mut String,
    fresh: &mut dyn FnMut() -> String,
    g: &Graph,
    x: vpmoe_ir::ValueId,
    w: vpmoe_ir::ValueId,
    b: Option<vpmoe_ir::ValueId>,
    y_ty: &str,
    relu2: bool,
) -> Result<String> {
    let y = dense_from(out, fresh, g, &format!("%v{}", x.0), x, w, b, y_ty)?;
    if !relu2 {
        return Ok(y);
    }
    use std::fmt::Write;
    let zeros = filled(out, fresh, x, &tensor_text(&g.value(x).ty), y_ty, element_of(y_ty))?;
    let (m, r) = (fresh(), fresh());
    writeln!(out, "    {m} = arith.maximumf {y}, {zeros} : {y_ty}")?;
    writeln!(out, "    {r} = arith.mulf {m}, {m} : {y_ty}")?;
    Ok(r)
}

/// `a·wᵀ (+ b)` for an SSA tensor `a` with as many rows as the value `rows` (of the graph).
#[allow(clippy::too_many_arguments)]
fn dense_from(
    out: &mut String,
    fresh: &mut dyn FnMut() -> String,
    g: &Graph,
    a: &str,
    rows: vpmoe_ir::ValueId,
    w: vpmoe_ir::ValueId,
    b: Option<vpmoe_ir::ValueId>,
    y_ty: &str,
) -> Result<String> {
    use std::fmt::Write;
    let rows_ty = tensor_text(&g.value(rows).ty);
    let elem = element_of(y_ty);
    let a_ty = if a == format!("%v{}", rows.0) {
        rows_ty.clone()
    } else {
        // The MLP's hidden activation: the rows of `rows`, the width of `w`'s input.
        let width = g.value(w).ty.dims.get(1).map(|d| d.eval(0)).unwrap_or(0);
        format!("tensor<?x{width}x{elem}>")
    };
    let zero = filled(out, fresh, rows, &rows_ty, y_ty, elem)?;
    let y = fresh();
    writeln!(
        out,
        "    {y} = linalg.matmul_transpose_b ins({a}, %v{} : {a_ty}, {}) outs({zero} : {y_ty}) -> {y_ty}",
        w.0,
        tensor_text(&g.value(w).ty)
    )?;
    let Some(b) = b else { return Ok(y) };
    let e = empty(out, fresh, rows, &rows_ty, y_ty)?;
    let (bb, s) = (fresh(), fresh());
    writeln!(
        out,
        "    {bb} = linalg.broadcast ins(%v{} : {}) outs({e} : {y_ty}) dimensions = [0]",
        b.0,
        tensor_text(&g.value(b).ty)
    )?;
    writeln!(out, "    {s} = arith.addf {y}, {bb} : {y_ty}")?;
    Ok(s)
}

/// `tensor.empty` of type `ty` with as many rows as the value `rows`.
fn empty(
    out: &mut String,
    fresh: &mut dyn FnMut() -> String,
    rows: vpmoe_ir::ValueId,
    rows_ty: &str,
    ty: &str,
) -> Result<String> {
    use std::fmt::Write;
    let (d, e) = (fresh(), fresh());
    writeln!(out, "    {d} = tensor.dim %v{}, %c0 : {rows_ty}", rows.0)?;
    writeln!(out, "    {e} = tensor.empty({d}) : {ty}")?;
    Ok(e)
}

/// A zero tensor of type `ty` with as many rows as the value `rows`.
fn filled(
    out: &mut String,
    fresh: &mut dyn FnMut() -> String,
    rows: vpmoe_ir::ValueId,
    rows_ty: &str,
    ty: &str,
    elem: &str,
) -> Result<String> {
    use std::fmt::Write;
    let e = empty(out, fresh, rows, rows_ty, ty)?;
    let (c, z) = (fresh(), fresh());
    writeln!(out, "    {c} = arith.constant 0.0 : {elem}")?;
    writeln!(out, "    {z} = linalg.fill ins({c} : {elem}) outs({e} : {ty}) -> {ty}")?;
    Ok(z)
}

/// The element type of a tensor type's text.
fn element_of(ty: &str) -> &str {
    ty.trim_end_matches('>').rsplit('x').next().unwrap_or(ty)
}
