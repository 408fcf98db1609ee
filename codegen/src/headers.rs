//! The device-code templates, embedded so a plan can be compiled anywhere.

pub const HEADERS: &[(&str, &str)] = &[
    ("vp_common.cuh", include_str!("../cuda/vp_common.cuh")),
    ("vp_consts.cuh", include_str!("../cuda/vp_consts.cuh")),
    ("embed.cuh", include_str!("../cuda/embed.cuh")),
    ("rmsnorm.cuh", include_str!("../cuda/rmsnorm.cuh")),
    ("gemm.cuh", include_str!("../cuda/gemm.cuh")),
    ("qkv_split.cuh", include_str!("../cuda/qkv_split.cuh")),
    ("tpa_proj.cuh", include_str!("../cuda/tpa_proj.cuh")),
    ("tpa_combine.cuh", include_str!("../cuda/tpa_combine.cuh")),
    ("grape.cuh", include_str!("../cuda/grape.cuh")),
    ("vres.cuh", include_str!("../cuda/vres.cuh")),
    ("attention.cuh", include_str!("../cuda/attention.cuh")),
    ("cached_attention.cuh", include_str!("../cuda/cached_attention.cuh")),
    ("router.cuh", include_str!("../cuda/router.cuh")),
    ("moe_count.cuh", include_str!("../cuda/moe_count.cuh")),
    ("moe_scatter.cuh", include_str!("../cuda/moe_scatter.cuh")),
    ("grouped_gemm.cuh", include_str!("../cuda/grouped_gemm.cuh")),
    ("combine.cuh", include_str!("../cuda/combine.cuh")),
    ("seq_aux.cuh", include_str!("../cuda/seq_aux.cuh")),
    ("head_lse.cuh", include_str!("../cuda/head_lse.cuh")),
    ("ce_lse.cuh", include_str!("../cuda/ce_lse.cuh")),
    ("token_weight.cuh", include_str!("../cuda/token_weight.cuh")),
    ("span_weight.cuh", include_str!("../cuda/span_weight.cuh")),
    ("sum.cuh", include_str!("../cuda/sum.cuh")),
    ("add.cuh", include_str!("../cuda/add.cuh")),
    ("gemm_nn.cuh", include_str!("../cuda/gemm_nn.cuh")),
    ("gemm_tn.cuh", include_str!("../cuda/gemm_tn.cuh")),
    ("colsum.cuh", include_str!("../cuda/colsum.cuh")),
    ("qkv_colsum.cuh", include_str!("../cuda/qkv_colsum.cuh")),
    ("qk_norm.cuh", include_str!("../cuda/qk_norm.cuh")),
    ("qk_norm_bwd.cuh", include_str!("../cuda/qk_norm_bwd.cuh")),
    ("rmsnorm_bwd.cuh", include_str!("../cuda/rmsnorm_bwd.cuh")),
    ("qkv_pack.cuh", include_str!("../cuda/qkv_pack.cuh")),
    ("tpa_bwd.cuh", include_str!("../cuda/tpa_bwd.cuh")),
    ("tpa_dgrad.cuh", include_str!("../cuda/tpa_dgrad.cuh")),
    ("tpa_wgrad.cuh", include_str!("../cuda/tpa_wgrad.cuh")),
    ("grape_bwd.cuh", include_str!("../cuda/grape_bwd.cuh")),
    ("vres_bwd.cuh", include_str!("../cuda/vres_bwd.cuh")),
    ("attn_stats.cuh", include_str!("../cuda/attn_stats.cuh")),
    ("attn_bwd_dq.cuh", include_str!("../cuda/attn_bwd_dq.cuh")),
    ("attn_bwd_dkdv.cuh", include_str!("../cuda/attn_bwd_dkdv.cuh")),
    ("attn_dkdv_sum.cuh", include_str!("../cuda/attn_dkdv_sum.cuh")),
    ("router_bwd.cuh", include_str!("../cuda/router_bwd.cuh")),
    ("moe_gather.cuh", include_str!("../cuda/moe_gather.cuh")),
    ("combine_bwd.cuh", include_str!("../cuda/combine_bwd.cuh")),
    ("seq_aux_count.cuh", include_str!("../cuda/seq_aux_count.cuh")),
    ("seq_aux_bwd.cuh", include_str!("../cuda/seq_aux_bwd.cuh")),
    ("head_dl.cuh", include_str!("../cuda/head_dl.cuh")),
    ("embed_sort.cuh", include_str!("../cuda/embed_sort.cuh")),
    ("embed_bwd.cuh", include_str!("../cuda/embed_bwd.cuh")),
    ("optim.cuh", include_str!("../cuda/optim.cuh")),
];

/// SHA-256 over every embedded template (names and bodies): what a kernel's code depends on
/// beyond its shim. Part of the NVRTC cache key and recorded beside a plan's cubins.
pub fn digest() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (n, body) in HEADERS {
        h.update(n);
        h.update(body);
    }
    vpmoe_ir::hex(&h.finalize())
}
