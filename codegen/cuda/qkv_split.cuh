#pragma once
// qkv_split.cuh: splits the packed, group-interleaved QKV row into q [T, HEADS, D],
// k [T, GROUPS, D], v [T, GROUPS, D]. Group g's block of (HEADS/GROUPS + 2)·D elements is
// [q heads g·GS .. g·GS+GS-1, k_g, v_g] (GS = HEADS/GROUPS).
//
// Launch: grid T, block 128: one token per block; 16-byte chunks (never straddling a head since
// D % 8 == 0 on that path), element copies when D % 8 != 0 or a pointer is unaligned. Pure copy.
// Limits: a scatter epilogue in the QKV GEMM (writing q, k and v directly) would remove this pass.
#include "vp_common.cuh"

namespace vp {

template <int HEADS, int GROUPS, int D>
__device__ __forceinline__ void qkv_split(const bf16* __restrict__ mixed, bf16* __restrict__ q, bf16* __restrict__ k,
                                          bf16* __restrict__ v, int T) {
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int GS = HEADS / GROUPS, GW = (GS + 2) * D, W = GROUPS * GW;
    const int t = blockIdx.x;
    if (t >= T) return;
    const bf16* src = mixed + (size_t)t * W;
    // Destination of packed element e (e and the 7 after it when e % 8 == 0 and D % 8 == 0).
    auto dst_of = [&](int e) -> bf16* {
        const int grp = e / GW, rem = e % GW, slot = rem / D, col = rem % D;
        if (slot < GS) return q + ((size_t)t * HEADS + grp * GS + slot) * D + col;
        if (slot == GS) return k + ((size_t)t * GROUPS + grp) * D + col;
        return v + ((size_t)t * GROUPS + grp) * D + col;
    };
    if (D % 8 == 0 && aligned(mixed, 16) && aligned(q, 16) && aligned(k, 16) && aligned(v, 16)) {
        for (int c = threadIdx.x; c < W / 8; c += blockDim.x)
            *reinterpret_cast<uint4*>(dst_of(c * 8)) = reinterpret_cast<const uint4*>(src)[c];
    } else {
        for (int e = threadIdx.x; e < W; e += blockDim.x) *dst_of(e) = src[e];
    }
}

}  // namespace vp
