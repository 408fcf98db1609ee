#pragma once
// ce_lse.cuh: per-token cross-entropy from head_lse.cuh's logsumexp partials (head_ce forward).
//   mask[t] == 0: token_loss[t] = lse[t] = 0
//   else: lse = log Σ_j part[t, j].s·exp(part[t, j].m),  ce = lse − label_logit[t],
//         token_loss[t] = ce,  lse[t] = lse
//   (span_weight.cuh and sum.cuh turn token losses into the objective).
//
// Launch: grid T, block 256. Each thread merges a fixed strided subset of the row's ceil(V/64)
// partials, then a warp butterfly and the warps in order: a fixed tree, deterministic. lse and ce
// are finished in f64. Masked tokens return before reading their partials.
#include "vp_common.cuh"

namespace vp {

template <int V>
__device__ __forceinline__ void ce_lse(const float* __restrict__ part, const float* __restrict__ label_logit,
                                       const unsigned char* __restrict__ mask, float* __restrict__ token_loss,
                                       float* __restrict__ lse, int T) {
    constexpr int NT = CE_LSE_THREADS, NW = NT / 32, NTILE = (V + GEMM_TILE - 1) / GEMM_TILE;
    require_block(NT);
    const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (t >= T) return;  // whole block
    if (mask[t] == 0) {  // block-uniform
        if (tid == 0) token_loss[t] = lse[t] = 0.f;
        return;
    }
    const float* p = part + (size_t)t * NTILE * 2;
    LseAcc acc{LOWEST_F, 0.f};
    for (int i = tid; i < NTILE; i += NT) acc = lse_merge(acc, LseAcc{p[2 * i], p[2 * i + 1]});
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        acc = lse_merge(acc, LseAcc{__shfl_xor_sync(FULL_MASK, acc.m, o), __shfl_xor_sync(FULL_MASK, acc.s, o)});
    __shared__ LseAcc s_part[NW];
    if (lane == 0) s_part[warp] = acc;
    __syncthreads();
    if (tid == 0) {
        LseAcc a = s_part[0];
        for (int w = 1; w < NW; ++w) a = lse_merge(a, s_part[w]);
        const double l = (double)a.m + log((double)a.s);
        const float ce = (float)(l - (double)label_logit[t]);
        token_loss[t] = ce;
        lse[t] = (float)l;
    }
}

}  // namespace vp
