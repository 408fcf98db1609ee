//! `vpmoe-rt upcycle`: a checkpoint of one architecture as the step-0 checkpoint of a deeper
//! and/or mixture-of-experts one (docs/rungs.md), each transform deterministic and stating what it
//! preserves:
//!
//! - **Depth growth** (L → L′ layers): every source layer keeps its place in order and its kind
//!   (window or global), the first layer first, at the target position of that kind nearest
//!   `j·(L′−1)/(L−1)` from which the rest still fit ([`layer_map`]); each new
//!   layer copies the nearest earlier placed layer of its kind (the next one where there is none)
//!   with its attention output projection and MLP output projection zeroed, so it adds nothing to
//!   the residual stream: the grown model computes the same function.
//! - **Dense → MoE**: a dense MLP of width F becomes the shared expert (same width: F must equal
//!   `shared_expert_size`); routed expert e (width w, F divisible by w) starts from the dense
//!   MLP's hidden units `(e mod F/w)·w ..+w` (input projection and bias, plus seeded noise of
//!   10⁻³ of their rms so copies differ) with a zero output projection; the router weights are
//!   seeded N(0, init_method_std²) and its expert biases (or, without them, its logit biases)
//!   centred on seeded random tokens so that every expert is equally likely on average
//!   ([`balance_routers`]). The MoE layers compute what the dense ones did. A dense layer kept dense (`first_layer_dense`) but narrower keeps the w units with the
//!   largest output-projection norms (the reference's FFN surgery): that layer alone changes.
//!
//! Everything else is copied by name with its shape checked; a target parameter without a
//! source (a value-residual logit where the source layer had none) keeps the target's
//! initialisation, and is listed.

use crate::checkpoint;
use crate::state::TrainState;
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vpmoe_compiler::config::Arch;
use vpmoe_compiler::Plan;

/// What an upcycle did.
pub struct Upcycled {
    pub state: TrainState,
    /// Target layer → source layer it comes from, and whether it is new (an identity).
    pub layers: Vec<(usize, bool)>,
    /// Target parameters not copied one to one, with how they were made.
    pub made: Vec<(String, String)>,
}

/// Places the source layers (kinds `src`, true = window) among the target's (`dst`): order and
/// kind kept, the first layer first (the value residual reads its V), each source layer at the
/// slot of its kind nearest `j·(L′−1)/(L−1)` from which the rest still fit in order. Returns per
/// target layer (source layer, new).
pub fn layer_map(src: &[bool], dst: &[bool]) -> Result<Vec<(usize, bool)>> {
    let (l, lt) = (src.len(), dst.len());
    ensure!(lt >= l, "the target has {lt} layers, fewer than the source's {l}: upcycling never removes layers");
    ensure!(
        src.first() == dst.first(),
        "the first layer keeps its place and so its kind: the source's is {} and the target's {}",
        kind_name(src[0]),
        kind_name(dst[0])
    );
    // Whether src[j..] fits, in order and kind, into dst[from..].
    let fits = |j: usize, from: usize| {
        let mut p = from;
        for &kind in &src[j..] {
            match (p..lt).find(|&q| dst[q] == kind) {
                Some(q) => p = q + 1,
                None => return false,
            }
        }
        true
    };
    let mut at = vec![None; lt];
    let mut next = 0usize;
    for (j, &kind) in src.iter().enumerate() {
        let ideal = if l == 1 { 0 } else { (j * (lt - 1) + (l - 1) / 2) / (l - 1) };
        let p = (next..lt)
            .filter(|&p| dst[p] == kind && fits(j + 1, p + 1))
            .min_by_key(|&p| (p.abs_diff(ideal), p))
            .with_context(|| {
                format!(
                    "source layer {} ({}) has no place among the target's layers: the target's window/global \
                     pattern cannot hold the source's in order",
                    j + 1,
                    kind_name(kind)
                )
            })?;
        ensure!(j > 0 || p == 0, "internal: the first layer moved");
        at[p] = Some(j);
        next = p + 1;
    }
    let mut out = Vec::with_capacity(lt);
    for p in 0..lt {
        out.push(match at[p] {
            Some(j) => (j, false),
            None => {
                let earlier = (0..p).rev().find_map(|q| at[q].filter(|&j| src[j] == dst[p]));
                let later = (p + 1..lt).find_map(|q| at[q].filter(|&j| src[j] == dst[p]));
                let j = earlier.or(later).with_context(|| {
                    format!("target layer {} is {} and the source has no such layer", p + 1, kind_name(dst[p]))
                })?;
                (j, true)
            }
        });
    }
    Ok(out)
}

fn kind_name(window: bool) -> &'static str {
    if window {
        "a window layer"
    } else {
        "a global layer"
    }
}

/// Deterministic N(0, 1) draws (SplitMix64 + Box–Muller) for a named tensor.
fn normals(seed: u64, name: &str, n: usize) -> Vec<f32> {
    let mut x = seed ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut uni = || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n).map(|_| ((-2.0 * (uni() + 1e-300).ln()).sqrt() * (std::f64::consts::TAU * uni()).cos()) as f32).collect()
}

/// The rows `keep` of a row-major `[rows, cols]` matrix.
fn rows_of(m: &[f32], cols: usize, keep: &[usize]) -> Vec<f32> {
    keep.iter().flat_map(|&r| m[r * cols..(r + 1) * cols].iter().copied()).collect()
}

/// The columns `keep` of a row-major `[rows, cols]` matrix.
fn cols_of(m: &[f32], cols: usize, keep: &[usize]) -> Vec<f32> {
    m.chunks(cols).flat_map(|row| keep.iter().map(move |&c| row[c])).collect()
}

/// Upcycles `src` (trained under `src_plan`) into `plan`'s architecture.
pub fn upcycle(src_plan: &Plan, src: &TrainState, plan: &Plan, seed: u64) -> Result<Upcycled> {
    let (sa, ta) = (&src_plan.arch, &plan.arch);
    ensure!(sa.moe.is_none(), "{} is a mixture-of-experts model: upcycling starts from a dense one", sa.name);
    check_same_attention(sa, ta)?;
    let layers = layer_map(&sa.local, &ta.local)?;
    let by_name: BTreeMap<&str, (&[f32], &vpmoe_ir::TensorType)> =
        src_plan.params.iter().zip(&src.master).map(|(p, w)| (p.name.as_str(), (w.as_slice(), &p.ty))).collect();
    let mut state = TrainState::init(plan, seed).restart();
    let mut made = Vec::new();
    let f = sa.ffn as usize;
    let h = ta.hidden as usize;
    for (pi, p) in plan.params.iter().enumerate() {
        let name = p.name.as_str();
        let copy = |src_name: &str| -> Result<Vec<f32>> {
            let (w, ty) = by_name.get(src_name).with_context(|| format!("the source has no {src_name}"))?;
            ensure!(
                ty.dims == p.ty.dims,
                "{src_name} is {:?} in the source and {name} is {:?}",
                ty.shape(0),
                p.ty.shape(0)
            );
            Ok(w.to_vec())
        };
        let Some((i, rest)) = name.strip_prefix("decoder.layers.").and_then(|r| r.split_once('.')) else {
            state.master[pi] = copy(name)?;
            continue;
        };
        let ti: usize = i.parse().context("layer number")?;
        let (s, new) = layers[ti];
        let src_name = |r: &str| format!("decoder.layers.{s}.{r}");
        let zero = || vec![0f32; p.numel as usize];
        let value: Vec<f32> = match rest {
            // A new layer adds nothing to the residual stream.
            "self_attention.linear_proj.weight" | "self_attention.linear_proj.bias" | "mlp.linear_fc2.bias" if new => {
                zero()
            }
            "mlp.linear_fc2.weight" if new => zero(),
            "mlp.linear_fc1.weight" | "mlp.linear_fc1.bias" | "mlp.linear_fc2.weight" | "mlp.linear_fc2.bias" => {
                let w = ta.ffn as usize;
                if w == f {
                    copy(&src_name(rest))?
                } else {
                    ensure!(w < f, "{name}: the dense MLP grows from {f} to {w} units; upcycling only narrows it");
                    let keep = widest_units(&by_name, &src_name("mlp.linear_fc2.weight"), h, f, w)?;
                    made.push((
                        name.into(),
                        format!("the {w} of {f} units of source layer {} with the largest output norms", s + 1),
                    ));
                    narrow(&by_name, &src_name(rest), rest, h, f, &keep)?
                }
            }
            r if r.starts_with("mlp.shared_experts.") => {
                let shared = ta.moe.as_ref().and_then(|m| m.shared).unwrap_or(0) as usize;
                ensure!(
                    shared == f,
                    "the shared expert ({shared} wide) takes the dense MLP ({f} wide): set moe.shared_expert_size = {f}"
                );
                let dense = r.replace("mlp.shared_experts.", "mlp.");
                if new && dense.starts_with("mlp.linear_fc2.") {
                    zero()
                } else {
                    copy(&src_name(&dense))?
                }
            }
            "mlp.experts.linear_fc1.weight" | "mlp.experts.linear_fc1.bias" => {
                let (e, w) = (p.ty.shape(0)[0], p.ty.shape(0)[1]);
                ensure!(f.is_multiple_of(w), "{name}: experts of {w} units cannot split the dense MLP's {f}");
                let dense = src_name(&rest.replace("mlp.experts.", "mlp."));
                let (src_w, _) = by_name.get(dense.as_str()).with_context(|| format!("the source has no {dense}"))?;
                let cols = if rest.ends_with("weight") { h } else { 1 };
                let mut out = Vec::with_capacity(p.numel as usize);
                for x in 0..e {
                    let c = x % (f / w);
                    out.extend_from_slice(&src_w[c * w * cols..(c + 1) * w * cols]);
                }
                let rms = (out.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / out.len().max(1) as f64).sqrt();
                let noise = normals(seed, name, out.len());
                out.iter_mut().zip(noise).for_each(|(v, z)| *v += (1e-3 * rms) as f32 * z);
                made.push((
                    name.into(),
                    format!(
                        "{e} experts from the {} chunks of {w} units of source layer {}'s MLP, plus noise",
                        f / w,
                        s + 1
                    ),
                ));
                out
            }
            "mlp.experts.linear_fc2.weight" | "mlp.experts.linear_fc2.bias" => {
                made.push((name.into(), "zeros".into()));
                zero()
            }
            // Zero, then centred by `balance_routers`.
            "mlp.router.bias" | "mlp.router.expert_bias" => zero(),
            "mlp.router.weight" => {
                made.push((name.into(), format!("seeded N(0, {}²)", ta.init_std)));
                normals(seed, name, p.numel as usize).into_iter().map(|z| z * ta.init_std as f32).collect()
            }
            _ => match copy(&src_name(rest)) {
                Ok(v) => v,
                Err(_) if !by_name.contains_key(src_name(rest).as_str()) => {
                    made.push((name.into(), format!("its initialisation (source layer {} has none)", s + 1)));
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        ensure!(
            value.len() as u64 == p.numel,
            "internal: {name} made of {} values, the plan has {}",
            value.len(),
            p.numel
        );
        state.master[pi] = value;
    }
    if ta.moe.is_some() {
        balance_routers(plan, &mut state, seed, &mut made)?;
    }
    Ok(Upcycled { state, layers, made })
}

/// Calibration tokens of [`balance_routers`]: rows of this many seeded random tokens.
const CALIBRATION: (usize, usize) = (4, 128);

/// Centres each router's selection: runs the upcycled model (whose routed experts add nothing
/// yet, so every router sees what it will see at step 0) on seeded random tokens and sets each
/// expert's bias (selection only) to minus its mean score there, so no expert is favoured across
/// tokens — without it, the hidden states' common direction makes every token pick the same
/// experts. A router without expert biases gets the shift in its logit bias instead.
fn balance_routers(plan: &Plan, state: &mut TrainState, seed: u64, made: &mut Vec<(String, String)>) -> Result<()> {
    let graph = vpmoe_compiler::lower::lower(&plan.arch);
    let (rows, len) = CALIBRATION;
    let batch = crate::synthetic_batch(plan.arch.vocab, len.min(plan.arch.max_seq as usize), rows, seed);
    let be = crate::cpu::CpuBackend::new(&graph, plan, state.clone());
    // Per router: the parameter it shifts and the shift per expert.
    let mut shifts: Vec<(String, Vec<f32>, bool)> = Vec::new();
    let mut seen =
        |node: &vpmoe_ir::Node, _ins: &[&vpmoe_ir::reference::Tensor], outs: &[vpmoe_ir::reference::Tensor]| {
            let vpmoe_ir::Op::Router { experts, expert_bias, bias, .. } = node.op else { return };
            let e = experts as usize;
            let scores = outs[2].f();
            let t = scores.len() / e;
            let mean = |f: &dyn Fn(f64) -> f64| -> Vec<f64> {
                (0..e).map(|x| (0..t).map(|r| f(scores[r * e + x] as f64)).sum::<f64>() / t as f64).collect()
            };
            let param = |k: usize| match graph.value(node.inputs[k]).def {
                vpmoe_ir::ValueDef::Param(p) => Some(graph.params[p.0 as usize].name.clone()),
                _ => None,
            };
            if expert_bias {
                let m = mean(&|s| s);
                let avg = m.iter().sum::<f64>() / e as f64;
                if let Some(name) = param(2 + bias as usize) {
                    shifts.push((name, m.iter().map(|x| (avg - x) as f32).collect(), false));
                }
            } else if bias {
                // Logits from the scores, clamped away from a saturated sigmoid.
                let m = mean(&|s| {
                    let s = s.clamp(1e-7, 1.0 - 1e-7);
                    (s / (1.0 - s)).ln()
                });
                let avg = m.iter().sum::<f64>() / e as f64;
                if let Some(name) = param(2) {
                    shifts.push((name, m.iter().map(|x| (avg - x) as f32).collect(), true));
                }
            }
        };
    be.observe(&batch, &mut seen)?;
    for (name, shift, add) in shifts {
        let pi = plan.params.iter().position(|p| p.name == name).context("a router parameter of the plan")?;
        let w = &mut state.master[pi];
        if add {
            w.iter_mut().zip(&shift).for_each(|(x, s)| *x += s);
        } else {
            w.copy_from_slice(&shift);
        }
        made.push((
            name,
            format!("centred on {rows}×{len} seeded random tokens, so each expert's mean selection score is the same"),
        ));
    }
    Ok(())
}

/// The `w` of `f` hidden units with the largest output-projection column norms (in unit order).
fn widest_units(
    by_name: &BTreeMap<&str, (&[f32], &vpmoe_ir::TensorType)>,
    fc2: &str,
    h: usize,
    f: usize,
    w: usize,
) -> Result<Vec<usize>> {
    let (m, _) = by_name.get(fc2).with_context(|| format!("the source has no {fc2}"))?;
    let norm = |j: usize| (0..h).map(|r| (m[r * f + j] as f64).powi(2)).sum::<f64>();
    let mut idx: Vec<usize> = (0..f).collect();
    idx.sort_by(|&a, &b| norm(b).total_cmp(&norm(a)).then(a.cmp(&b)));
    let mut keep = idx[..w].to_vec();
    keep.sort_unstable();
    Ok(keep)
}

/// A dense MLP tensor restricted to the hidden units `keep`.
fn narrow(
    by_name: &BTreeMap<&str, (&[f32], &vpmoe_ir::TensorType)>,
    src: &str,
    rest: &str,
    h: usize,
    f: usize,
    keep: &[usize],
) -> Result<Vec<f32>> {
    let (m, _) = by_name.get(src).with_context(|| format!("the source has no {src}"))?;
    Ok(match rest {
        "mlp.linear_fc1.weight" => rows_of(m, h, keep),
        "mlp.linear_fc1.bias" => rows_of(m, 1, keep),
        "mlp.linear_fc2.weight" => cols_of(m, f, keep),
        _ => m.to_vec(), // the output bias is per hidden size
    })
}

/// Upcycling keeps every layer's attention: the two architectures must agree on it.
fn check_same_attention(s: &Arch, t: &Arch) -> Result<()> {
    let mut d = Vec::new();
    let mut same = |what: &str, a: String, b: String| {
        if a != b {
            d.push(format!("{what}: {} {a}, {} {b}", s.name, t.name));
        }
    };
    same("vocabulary", s.vocab.to_string(), t.vocab.to_string());
    same("hidden size", s.hidden.to_string(), t.hidden.to_string());
    same("heads", s.heads.to_string(), t.heads.to_string());
    same("KV groups", s.groups.to_string(), t.groups.to_string());
    same("head_dim", s.head_dim.to_string(), t.head_dim.to_string());
    same("window", format!("{:?}", s.window), format!("{:?}", t.window));
    same("TPA ranks", format!("{:?}", s.tpa), format!("{:?}", t.tpa));
    same("rotation", format!("{:?}", s.grape), format!("{:?}", t.grape));
    same("value residual", format!("{:?}", s.value_residual), format!("{:?}", t.value_residual));
    same("QK-norm", s.qk_norm.to_string(), t.qk_norm.to_string());
    same("sinks", s.sinks.to_string(), t.sinks.to_string());
    same("biases", format!("{} {}", s.bias_linear, s.qkv_bias), format!("{} {}", t.bias_linear, t.qkv_bias));
    same("tied embeddings", s.tied_embeddings.to_string(), t.tied_embeddings.to_string());
    same("RMSNorm epsilon", s.norm_eps.to_string(), t.norm_eps.to_string());
    ensure!(
        d.is_empty(),
        "upcycling keeps the attention and embeddings; the architectures differ:\n  {}",
        d.join("\n  ")
    );
    Ok(())
}

/// Upcycles the checkpoint `from` (of `src_plan`) and writes it as the step-0 checkpoint of the
/// new run directory `out`.
pub fn upcycle_to(from: &Path, src_plan: &Plan, plan: &Plan, out: &Path, seed: u64) -> Result<(PathBuf, Upcycled)> {
    ensure!(
        checkpoint::list(out).map(|l| l.is_empty()).unwrap_or(true),
        "{} already holds checkpoints; upcycle into a new directory",
        out.display()
    );
    let (dir, src) = crate::decode::sample::load_checkpoint(from, src_plan).context("--from")?;
    let up = upcycle(src_plan, &src, plan, seed)?;
    let train = serde_json::json!({
        "upcycled_from": dir.display().to_string(),
        "source_master_sha256": src.checksum(),
        "source_config_hash": checkpoint::sha256_hex(src_plan.arch.canonical_json().as_bytes()),
        "seed": seed,
        "layers": up.layers.iter().map(|(s, new)| serde_json::json!({"from": s + 1, "new": new})).collect::<Vec<_>>(),
        "made": up.made.iter().cloned().collect::<BTreeMap<String, String>>(),
    });
    let expert_bias = plan
        .params
        .iter()
        .zip(&up.state.master)
        .filter(|(p, _)| matches!(p.role, vpmoe_ir::Role::ExpertBias { .. }))
        .map(|(p, w)| (p.name.clone(), w.clone()))
        .collect();
    let meta = checkpoint::step0_meta(plan, train, seed, expert_bias);
    let path = checkpoint::save(out, plan, &up.state, meta, 1)?;
    Ok((path, up))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Window (true) / global (false) per layer, global every `f`-th.
    fn pattern(layers: usize, f: usize) -> Vec<bool> {
        (1..=layers).map(|l| l % f != 0).collect()
    }

    #[test]
    fn layers_keep_order_and_kind_wherever_the_target_can_hold_them() {
        for (from, to) in [(4, 6), (28, 30), (28, 80), (7, 7), (5, 9), (8, 9)] {
            let (s, t) = (pattern(from, 4), pattern(to, 4));
            let m = layer_map(&s, &t).unwrap_or_else(|e| panic!("{from} → {to}: {e:#}"));
            let placed: Vec<usize> = m.iter().filter(|x| !x.1).map(|x| x.0).collect();
            assert_eq!(placed, (0..from).collect::<Vec<_>>(), "{from} → {to}: every source layer once, in order");
            assert_eq!(m[0], (0, false), "{from} → {to}: the first layer first");
            assert!(m.iter().enumerate().all(|(p, &(j, _))| s[j] == t[p]), "{from} → {to}: kinds kept");
        }
        // 28 → 80 spreads the source over the whole depth.
        let m = layer_map(&pattern(28, 4), &pattern(80, 4)).unwrap();
        assert_eq!(m.iter().rposition(|x| !x.1), Some(79));
        // Refused: fewer layers, a first layer of another kind, more global layers than fit.
        assert!(layer_map(&pattern(8, 4), &pattern(4, 4)).is_err());
        assert!(format!("{:#}", layer_map(&[false, true], &[true, false, true]).unwrap_err()).contains("first layer"));
        assert!(layer_map(&pattern(8, 2), &pattern(9, 4)).is_err());
    }
}
