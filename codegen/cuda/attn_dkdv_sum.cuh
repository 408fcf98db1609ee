#pragma once
// attn_dkdv_sum.cuh: finishes attn_bwd_dkdv's per-head split (HSPLIT = 1): for key u and KV group
// g, dk[u, g] = bf16(Σ_{hh < GS} part[u, g·GS + hh, 0, :]) and dv[u, g] likewise from slot 1, the
// heads added in order in f32 and rounded once (part: [T, HEADS, 2, D] f32, dk already scaled).
//
// Launch: grid T, block 128, one key per block. Deterministic.
#include "vp_common.cuh"

namespace vp {

template <int D, int HEADS, int GROUPS>
__device__ __forceinline__ void attn_dkdv_sum(const float* __restrict__ part, bf16* __restrict__ dk,
                                              bf16* __restrict__ dv, int T) {
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int GS = HEADS / GROUPS;
    const int u = blockIdx.x;
    if (u >= T) return;
    const float* pr = part + (size_t)u * HEADS * 2 * D;
    for (int c = threadIdx.x; c < GROUPS * 2 * D; c += blockDim.x) {
        const int g = c / (2 * D), slot = c % (2 * D) / D, d = c % D;
        float s = 0.f;
#pragma unroll
        for (int hh = 0; hh < GS; ++hh) s += pr[(size_t)(g * GS + hh) * 2 * D + slot * D + d];
        (slot ? dv : dk)[((size_t)u * GROUPS + g) * D + d] = f2bf(s);
    }
}

}  // namespace vp
