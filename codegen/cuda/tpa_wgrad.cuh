#pragma once
// tpa_wgrad.cuh: the gradients of TPA's six factor weights in one GEMM.
//
//   [dW_aq; dW_ak; dW_av; dW_bq; dW_bk; dW_bv][W, H] = df[T, W]ᵀ · x[T, H]
//
// gemm_tn's body with the stacked gradient written as six row blocks (tpa_proj.cuh): each
// weight's rows go to its own gradient (a gradient sum: `accum` as gemm_tn; one flag serves all
// six, and the plan builder checks that all six are finalised by this node). Launch as gemm_tn
// with E = 0: grid (ceil(H/64), ceil(W/64), Z), block 128; Z > 1 splits the tokens into Z row
// ranges whose partials (`part`, [Z, W, H]) each tile's last block adds in range order (tickets:
// one per (x, y) tile). `part` and `tickets` are null when Z = 1. Z comes from `wgrad_split`
// (1 at the locked shape, 32 on the small test configs).
#include "vp_common.cuh"
#include "gemm_tn.cuh"
#include "tpa_proj.cuh"

namespace vp {

template <int HEADS, int GROUPS, int D, int RQ, int R, int H>
__device__ __forceinline__ void tpa_wgrad(const bf16* df, const bf16* x, float* part, float* dw_aq, float* dw_ak,
                                          float* dw_av, float* dw_bq, float* dw_bk, float* dw_bv, int T, int accum,
                                          int* tickets) {
    constexpr int W = tpa_width<HEADS, GROUPS, D, RQ, R>();
    const auto dst = tpa_rows<HEADS, GROUPS, D, RQ, R>(dw_aq, dw_ak, dw_av, dw_bq, dw_bk, dw_bv, H);
    gemm_tn_rows<W, H, 0, 0, 0, 0>(df, x, nullptr, nullptr, part, T, W, H, accum, dst, nullptr, tickets);
}

}  // namespace vp
