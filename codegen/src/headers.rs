//! The device-code templates, embedded so a plan can be compiled anywhere.

pub const HEADERS: &[(&str, &str)] = &[
    ("vp_common.cuh", include_str!("../cuda/vp_common.cuh")),
    ("embed.cuh", include_str!("../cuda/embed.cuh")),
    ("rmsnorm.cuh", include_str!("../cuda/rmsnorm.cuh")),
    ("gemm.cuh", include_str!("../cuda/gemm.cuh")),
    ("qkv_split.cuh", include_str!("../cuda/qkv_split.cuh")),
    ("tpa_combine.cuh", include_str!("../cuda/tpa_combine.cuh")),
    ("grape.cuh", include_str!("../cuda/grape.cuh")),
    ("vres.cuh", include_str!("../cuda/vres.cuh")),
    ("attention.cuh", include_str!("../cuda/attention.cuh")),
    ("router.cuh", include_str!("../cuda/router.cuh")),
    ("moe_count.cuh", include_str!("../cuda/moe_count.cuh")),
    ("moe_scan.cuh", include_str!("../cuda/moe_scan.cuh")),
    ("moe_scatter.cuh", include_str!("../cuda/moe_scatter.cuh")),
    ("grouped_gemm.cuh", include_str!("../cuda/grouped_gemm.cuh")),
    ("combine.cuh", include_str!("../cuda/combine.cuh")),
    ("seq_aux.cuh", include_str!("../cuda/seq_aux.cuh")),
    ("ce_rows.cuh", include_str!("../cuda/ce_rows.cuh")),
    ("sum.cuh", include_str!("../cuda/sum.cuh")),
];
