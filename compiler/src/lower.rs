//! Lowering: architecture → forward graph, following the layer schedule of MODEL.md §2 and the
//! parameter inventory of §3 (names are Megatron state-dict names, layers 0-indexed; node names
//! are `blk<N>` with Megatron's 1-indexed layer numbers).

use crate::config::Arch;
use vpmoe_ir::{
    Attn, AttnKind, DType, Graph, GroupLimit, Init, InputKind, InputName, Op, OptGroup, OutputName, Role, TensorType,
    ValueId,
};

struct Lower<'a> {
    arch: &'a Arch,
    g: Graph,
}

impl Lower<'_> {
    #[allow(clippy::too_many_arguments)]
    fn param(
        &mut self,
        name: String,
        dtype: DType,
        dims: &[u64],
        init: Init,
        opt: OptGroup,
        wd: bool,
        role: Role,
    ) -> ValueId {
        self.g.param(name, TensorType::fixed(dtype, dims), init, opt, wd, role)
    }
    /// A 2-D weight: Normuon with weight decay.
    fn matrix(&mut self, name: String, dims: &[u64], std: f64) -> ValueId {
        self.param(name, DType::Bf16, dims, Init::Normal { std: std as f32 }, OptGroup::Normuon, true, Role::Other)
    }
    /// A bias or norm weight: AdamW without weight decay.
    fn vector(&mut self, name: String, dims: &[u64], init: Init) -> ValueId {
        self.param(name, DType::Bf16, dims, init, OptGroup::AdamW, false, Role::Other)
    }
    fn node(&mut self, name: String, op: Op, inputs: Vec<ValueId>) -> Vec<ValueId> {
        self.g.node(name, op, inputs)
    }
}

/// Builds the forward graph: embedding → layers → final norm → LM head fused with the
/// span-normalised CE. Outputs: `loss`, `token_loss`, `load.blkN` (expert row offsets) per MoE layer and
/// `aux.blkN` per MoE layer with a sequence aux loss.
pub fn lower(arch: &Arch) -> Graph {
    let mut l = Lower { arch, g: Graph::new(&arch.name) };
    let a = arch;
    let (h, nh, ng, d) = (a.hidden, a.heads, a.groups, a.head_dim);
    let eps = a.norm_eps as f32;
    let std0 = a.init_std;
    let std_out = a.init_std / (2.0 * a.layers as f64).sqrt();

    let tokens = l.g.input(InputName::Tokens, InputKind::Data, TensorType::tok(DType::I32, &[]));
    let doc = l.g.input(InputName::Doc, InputKind::Data, TensorType::tok(DType::I32, &[]));
    let labels = l.g.input(InputName::Labels, InputKind::Data, TensorType::tok(DType::I32, &[]));
    let loss_mask = l.g.input(InputName::LossMask, InputKind::Data, TensorType::tok(DType::U8, &[]));
    let span = l.g.input(InputName::Span, InputKind::Data, TensorType::tok(DType::U8, &[]));
    let span_scale = l.g.input(InputName::SpanScale, InputKind::Scalar, TensorType::fixed(DType::F32, &[3]));
    // Per-token loss weights (`Op::TokenWeight`): which mode each position is in, the teacher's
    // log-probabilities (stages 2 and 3), the sampler's (stage 3) and the modes' scalars.
    let teacher_logp = l.g.input(InputName::TeacherLogp, InputKind::Data, TensorType::tok(DType::F32, &[]));
    let sampler_logp = l.g.input(InputName::SamplerLogp, InputKind::Data, TensorType::tok(DType::F32, &[]));
    let teacher = l.g.input(InputName::Teacher, InputKind::Data, TensorType::tok(DType::U8, &[]));
    let kd = l.g.input(InputName::Kd, InputKind::Scalar, TensorType::fixed(DType::F32, &[5]));

    let embed_role = if a.tied_embeddings { Role::TiedEmbedding } else { Role::InputEmbedding };
    let table = l.param(
        "embedding.word_embeddings.weight".into(),
        DType::Bf16,
        &[a.vocab, h],
        Init::Normal { std: std0 as f32 },
        OptGroup::AdamW,
        true,
        embed_role,
    );
    let any_rotation = (0..a.layers).any(|i| a.layer(i).rotate);
    let log_freq = any_rotation.then(|| {
        let (opt, init) = (
            if a.grape.learnable_freq { OptGroup::AdamW } else { OptGroup::Frozen },
            Init::LogFreq { scale: a.grape.log_freq_scale as f32, base: a.grape.base as f32, head_dim: d },
        );
        l.param("rotary_pos_emb.log_freq".into(), DType::F32, &[d / 2], init, opt, false, Role::Other)
    });

    let mut hcur = l.node("embed".into(), Op::Embedding { vocab: a.vocab, hidden: h }, vec![tokens, table])[0];
    let mut v1: Option<ValueId> = None;
    let mut aux = Vec::new();

    for i in 0..a.layers {
        let spec = a.layer(i);
        let p = format!("decoder.layers.{i}");
        let n = format!("blk{}", spec.number);

        // Attention block.
        let w = l.vector(format!("{p}.input_layernorm.weight"), &[h], Init::Ones);
        let x = l.node(format!("{n}.attn.norm"), Op::RmsNorm { dim: h, eps }, vec![hcur, w])[0];
        let sa = format!("{p}.self_attention");
        let qkv_n = (nh + 2 * ng) * d;
        let qkv = if spec.tpa {
            let (rq, r) = a.tpa.expect("tpa layer");
            let mut ins = vec![x];
            for (f, rows) in
                [("a_q", nh * rq), ("a_k", ng * r), ("a_v", ng * r), ("b_q", rq * d), ("b_k", r * d), ("b_v", r * d)]
            {
                ins.push(l.matrix(format!("{sa}.linear_qkv.linear_{f}.weight"), &[rows, h], std0));
            }
            if a.qkv_bias {
                ins.push(l.vector(format!("{sa}.linear_qkv.bias"), &[qkv_n], Init::Zeros));
            }
            let op =
                Op::TpaQkv { hidden: h, heads: nh, groups: ng, head_dim: d, q_rank: rq, kv_rank: r, bias: a.qkv_bias };
            l.node(format!("{n}.attn.qkv"), op, ins)
        } else {
            let mut ins = vec![x, l.matrix(format!("{sa}.linear_qkv.weight"), &[qkv_n, h], std0)];
            if a.qkv_bias {
                ins.push(l.vector(format!("{sa}.linear_qkv.bias"), &[qkv_n], Init::Zeros));
            }
            let op = Op::QkvProj { hidden: h, heads: nh, groups: ng, head_dim: d, bias: a.qkv_bias };
            l.node(format!("{n}.attn.qkv"), op, ins)
        };
        let (mut q, mut k, mut v) = (qkv[0], qkv[1], qkv[2]);
        if a.qk_norm {
            let wq = l.vector(format!("{sa}.q_layernorm.weight"), &[d], Init::Ones);
            let wk = l.vector(format!("{sa}.k_layernorm.weight"), &[d], Init::Ones);
            let o = l.node(
                format!("{n}.attn.qk_norm"),
                Op::QkNorm { heads: nh, groups: ng, head_dim: d, eps },
                vec![q, k, wq, wk],
            );
            (q, k) = (o[0], o[1]);
        }
        if spec.rotate {
            let op = Op::GrapeM { heads: nh, groups: ng, head_dim: d, log_freq_scale: a.grape.log_freq_scale as f32 };
            let o = l.node(format!("{n}.attn.grape"), op, vec![q, k, log_freq.expect("rotation needs log_freq")]);
            (q, k) = (o[0], o[1]);
        }
        if let Some(init) = a.value_residual {
            match v1 {
                None => v1 = Some(v),
                Some(src) => {
                    let c = init.clamp(1e-4, 1.0 - 1e-4);
                    let logit = (c / (1.0 - c)).ln() as f32;
                    // D2: f32, trained, no weight decay.
                    let lp = l.param(
                        format!("{sa}.value_residual_logit"),
                        DType::F32,
                        &[],
                        Init::Const { value: logit },
                        OptGroup::AdamW,
                        false,
                        Role::Other,
                    );
                    v = l.node(
                        format!("{n}.attn.vres"),
                        Op::ValueResidual { groups: ng, head_dim: d },
                        vec![v, src, lp],
                    )[0];
                }
            }
        }
        let kind = if spec.local {
            AttnKind::Window(a.window.expect("local layer"))
        } else {
            AttnKind::Global { alibi: spec.alibi }
        };
        let mut ins = vec![q, k, v, doc];
        if a.sinks {
            ins.push(l.param(
                format!("{sa}.core_attention.softmax_offset"),
                DType::F32,
                &[nh],
                Init::Normal { std: std0 as f32 },
                OptGroup::AdamW,
                false,
                Role::Other,
            ));
        }
        let attn = Attn { heads: nh, groups: ng, head_dim: d, kind, sinks: a.sinks };
        let ctx = l.node(format!("{n}.attn.core"), Op::Attention(attn), ins)[0];
        let mut ins = vec![ctx, l.matrix(format!("{sa}.linear_proj.weight"), &[h, nh * d], std_out)];
        if a.bias_linear {
            ins.push(l.vector(format!("{sa}.linear_proj.bias"), &[h], Init::Zeros));
        }
        ins.push(hcur);
        hcur = l.node(format!("{n}.attn.proj"), Op::OutProj { in_dim: nh * d, hidden: h, bias: a.bias_linear }, ins)[0];

        // FFN block.
        let w = l.vector(format!("{p}.pre_mlp_layernorm.weight"), &[h], Init::Ones);
        let m = l.node(format!("{n}.ffn.norm"), Op::RmsNorm { dim: h, eps }, vec![hcur, w])[0];
        hcur = if spec.moe {
            let (out, aux_v) = moe_block(&mut l, &p, &n, spec.number as u32, m, hcur, std0, std_out);
            if let Some(x) = aux_v {
                aux.push((spec.number as u32, x));
            }
            out
        } else {
            let mut ins = mlp_params(&mut l, &format!("{p}.mlp"), m, a.ffn, std0, std_out);
            ins.push(hcur);
            l.node(format!("{n}.ffn.mlp"), Op::Mlp { hidden: h, ffn: a.ffn, bias: a.bias_linear, residual: true }, ins)
                [0]
        };
    }

    let w = l.vector("decoder.final_layernorm.weight".into(), &[h], Init::Ones);
    let z = l.node("final_norm".into(), Op::RmsNorm { dim: h, eps }, vec![hcur, w])[0];
    let head = if a.tied_embeddings {
        table
    } else {
        l.param(
            "output_layer.weight".into(),
            DType::Bf16,
            &[a.vocab, h],
            Init::Normal { std: std0 as f32 },
            OptGroup::AdamW,
            true,
            Role::OutputHead,
        )
    };
    let ce = l.node("lm_head".into(), Op::HeadCe { hidden: h, vocab: a.vocab }, vec![z, head, labels, loss_mask])[0];
    let weight = l.node("loss.weight".into(), Op::TokenWeight, vec![ce, teacher_logp, sampler_logp, teacher, kd])[0];
    let loss = l.node("loss".into(), Op::SpanLoss, vec![ce, span, span_scale, weight])[0];
    l.g.output(OutputName::Loss, loss);
    l.g.output(OutputName::TokenLoss, ce);
    for (layer, v) in aux {
        l.g.output(OutputName::AuxLoss { layer }, v);
    }
    l.g
}

/// fc1 (+bias), fc2 (+bias) of a ReLU² MLP, inputs in `Op::Mlp` order after `x`.
fn mlp_params(l: &mut Lower, p: &str, x: ValueId, ffn: u64, std0: f64, std_out: f64) -> Vec<ValueId> {
    let h = l.arch.hidden;
    let bias = l.arch.bias_linear;
    let mut ins = vec![x, l.matrix(format!("{p}.linear_fc1.weight"), &[ffn, h], std0)];
    if bias {
        ins.push(l.vector(format!("{p}.linear_fc1.bias"), &[ffn], Init::Zeros));
    }
    ins.push(l.matrix(format!("{p}.linear_fc2.weight"), &[h, ffn], std_out));
    if bias {
        ins.push(l.vector(format!("{p}.linear_fc2.bias"), &[h], Init::Zeros));
    }
    ins
}

#[allow(clippy::too_many_arguments)]
fn moe_block(
    l: &mut Lower,
    p: &str,
    n: &str,
    layer: u32,
    m: ValueId,
    resid: ValueId,
    std0: f64,
    std_out: f64,
) -> (ValueId, Option<ValueId>) {
    let a = l.arch;
    let moe = a.moe.as_ref().expect("moe layer");
    let (h, e, k, f) = (a.hidden, moe.experts, moe.topk, a.ffn);
    let bias = a.bias_linear;

    let mut ins = vec![m, l.matrix(format!("{p}.mlp.router.weight"), &[e, h], std0)];
    if bias {
        // The router bias starts random, not zero (MODEL.md §3.5).
        ins.push(l.vector(format!("{p}.mlp.router.bias"), &[e], Init::Normal { std: std0 as f32 }));
    }
    if moe.expert_bias_rate.is_some() {
        ins.push(l.param(
            format!("{p}.mlp.router.expert_bias"),
            DType::F32,
            &[e],
            Init::Zeros,
            OptGroup::Frozen,
            false,
            Role::ExpertBias { layer },
        ));
    }
    let op = Op::Router {
        hidden: h,
        experts: e,
        topk: k,
        group_limit: moe.group_limit.map(|(groups, group_topk)| GroupLimit { groups, group_topk }),
        scale: moe.scale as f32,
        expert_bias: moe.expert_bias_rate.is_some(),
        bias,
    };
    let r = l.node(format!("{n}.moe.router"), op, ins);
    let (idx, gate, scores) = (r[0], r[1], r[2]);
    let aux = moe
        .seq_aux_coeff
        .map(|_| l.node(format!("{n}.moe.aux"), Op::SeqAuxLoss { experts: e, topk: k }, vec![scores])[0]);
    let dsp = l.node(format!("{n}.moe.dispatch"), Op::Dispatch { experts: e, topk: k }, vec![idx]);
    let (src, row, offsets) = (dsp[0], dsp[1], dsp[2]);
    // Per-expert row ranges: the step's expert loads (bias update §4.11, router health).
    l.g.output(OutputName::RouterLoad { layer }, offsets);

    let role = Role::Experts { experts: e, topk: k };
    let ep = format!("{p}.mlp.experts");
    let mut ins = vec![m, src, row, offsets];
    let w = |l: &mut Lower, name: String, dims: &[u64], init: Init, opt: OptGroup, wd: bool| {
        l.param(name, DType::Bf16, dims, init, opt, wd, role)
    };
    ins.push(w(
        l,
        format!("{ep}.linear_fc1.weight"),
        &[e, f, h],
        Init::Normal { std: std0 as f32 },
        OptGroup::Normuon,
        true,
    ));
    if bias {
        ins.push(w(l, format!("{ep}.linear_fc1.bias"), &[e, f], Init::Zeros, OptGroup::AdamW, false));
    }
    ins.push(w(
        l,
        format!("{ep}.linear_fc2.weight"),
        &[e, h, f],
        Init::Normal { std: std_out as f32 },
        OptGroup::Normuon,
        true,
    ));
    if bias {
        ins.push(w(l, format!("{ep}.linear_fc2.bias"), &[e, h], Init::Zeros, OptGroup::AdamW, false));
    }
    let yp = l.node(format!("{n}.moe.experts"), Op::ExpertFfn { hidden: h, ffn: f, experts: e, topk: k, bias }, ins)[0];

    let shared = moe.shared.map(|fs| {
        let ins = mlp_params(l, &format!("{p}.mlp.shared_experts"), m, fs, std0, std_out);
        // D3: the shared expert's fc2 bias is applied.
        l.node(format!("{n}.moe.shared"), Op::Mlp { hidden: h, ffn: fs, bias, residual: false }, ins)[0]
    });
    let mut ins = vec![yp, row, gate, resid];
    ins.extend(shared);
    let out = l.node(format!("{n}.moe.combine"), Op::Combine { hidden: h, topk: k, shared: shared.is_some() }, ins)[0];
    (out, aux)
}
