#pragma once
// tpa_dgrad.cuh: the input gradient of TPA's six factor products in one GEMM.
//
//   dx[T, H] = df[T, W] · [W_aq; W_ak; W_av; W_bq; W_bk; W_bv]        (df: tpa_bwd's factor gradients)
//
// One f32 accumulation over all W factor columns, rounded once to bf16 (gemm_nn's tile with the
// stacked weight read as six row blocks, tpa_proj.cuh). Launch as gemm_nn with E = 0: grid
// (ceil(H/64), ceil(T/64)), block 128.
#include "vp_common.cuh"
#include "gemm_nn.cuh"
#include "tpa_proj.cuh"

namespace vp {

template <int HEADS, int GROUPS, int D, int RQ, int R, int H>
__device__ __forceinline__ void tpa_dgrad(const bf16* df, const bf16* w_aq, const bf16* w_ak, const bf16* w_av,
                                          const bf16* w_bq, const bf16* w_bk, const bf16* w_bv, bf16* dx, int T) {
    constexpr int W = tpa_width<HEADS, GROUPS, D, RQ, R>();
    require_block(gemm_nn_cfg::THREADS);
    const int row0 = blockIdx.y * gemm_nn_cfg::BM;
    if (row0 >= T) return;  // whole block
    const auto w = tpa_rows<HEADS, GROUPS, D, RQ, R>(w_aq, w_ak, w_av, w_bq, w_bk, w_bv, H);
    gemm_nn_tile<H, W, 0, EPI_NONE, 0>(df, w, nullptr, nullptr, dx, row0, T, blockIdx.x * gemm_nn_cfg::BN, W, H);
}

}  // namespace vp
