#pragma once
// tpa_proj.cuh: the six TPA factor products of a token in one GEMM.
//
//   f[T, W] = x[T, H] · [W_aq; W_ak; W_av; W_bq; W_bk; W_bv]ᵀ      (W = HEADS·RQ + 2·GROUPS·R + RQ·D + 2·R·D)
//
// The six factor weights are separate parameters (each is orthogonalised on its own and sits in
// its own optimizer group), so the stacked weight is addressed as six row blocks (`RowBlocks`):
// one launch reads x once, instead of six launches of which three have under 40 columns. f's
// row layout is tpa_combine's. Launch: as gemm.cuh, grid (ceil(T/64), ceil(W/64)), block 128;
// a 64-column tile may span several blocks (rows of different weights), which only changes where
// its W rows are loaded from. tpa_dgrad.cuh and tpa_wgrad.cuh are the backward's two products.
#include "vp_common.cuh"
#include "gemm.cuh"

namespace vp {

// Row blocks of the stacked factor weight (or of its gradient), in tpa_combine's factor order.
template <int HEADS, int GROUPS, int D, int RQ, int R, typename T>
__device__ __forceinline__ RowBlocks<T> tpa_rows(T* aq, T* ak, T* av, T* bq, T* bk, T* bv, int ld) {
    constexpr int E0 = HEADS * RQ, E1 = E0 + GROUPS * R, E2 = E1 + GROUPS * R;
    constexpr int E3 = E2 + RQ * D, E4 = E3 + R * D, E5 = E4 + R * D;
    return RowBlocks<T>{{aq, ak, av, bq, bk, bv}, {E0, E1, E2, E3, E4, E5}, ld};
}
template <int HEADS, int GROUPS, int D, int RQ, int R>
__host__ __device__ constexpr int tpa_width() {
    return HEADS * RQ + 2 * GROUPS * R + RQ * D + 2 * R * D;
}

template <int HEADS, int GROUPS, int D, int RQ, int R, int H>
__device__ __forceinline__ void tpa_proj(const bf16* x, const bf16* w_aq, const bf16* w_ak, const bf16* w_av,
                                         const bf16* w_bq, const bf16* w_bk, const bf16* w_bv, bf16* f, int T) {
    constexpr int W = tpa_width<HEADS, GROUPS, D, RQ, R>();
    require_block(gemm_cfg::THREADS);
    const int row0 = blockIdx.x * gemm_cfg::BM;
    if (row0 >= T) return;  // whole block
    const auto w = tpa_rows<HEADS, GROUPS, D, RQ, R>(w_aq, w_ak, w_av, w_bq, w_bk, w_bv, H);
    gemm_tile<W, H, EPI_NONE, 0>(x, w, nullptr, nullptr, f, row0, T, blockIdx.y * gemm_cfg::BN, W);
}

}  // namespace vp
