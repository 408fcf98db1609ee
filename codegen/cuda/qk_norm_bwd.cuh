#pragma once
// qk_norm_bwd.cuh: QK-norm backward, queries and keys in one launch: blockIdx.y = 0 runs
// rmsnorm_bwd over the q rows (weight wq, gradient dwq), blockIdx.y = 1 over the k rows, each
// with its own half of `partial` ([2, gridDim.x, D]) and its own ticket (blockIdx.y).
//
// Launch: grid (NB, 2), block 256. Everything else as rmsnorm_bwd.cuh (no running gradient:
// q and k have one reader each). `accum` applies to both weight gradients.
#include "rmsnorm_bwd.cuh"

static_assert(vp::QK_NORM_BWD_THREADS == vp::RMSNORM_BWD_THREADS, "qk_norm_bwd runs rmsnorm_bwd's body");

namespace vp {

template <int D>
__device__ __forceinline__ void qk_norm_bwd(const bf16* xq, const bf16* xk, const bf16* wq, const bf16* wk,
                                            const bf16* dyq, const bf16* dyk, bf16* dxq, bf16* dxk, float* partial,
                                            int rows_q, int rows_k, float eps, float* dwq, float* dwk, int* tickets,
                                            int accum) {
    const bool k = blockIdx.y == 1;
    rmsnorm_bwd<D>(k ? xk : xq, k ? wk : wq, k ? dyk : dyq, nullptr, k ? dxk : dxq,
                   partial + (k ? (size_t)gridDim.x * D : 0), k ? rows_k : rows_q, eps, k ? dwk : dwq,
                   tickets + blockIdx.y, accum);
}

}  // namespace vp
