#pragma once
// qkv_pack.cuh: qkv_split backward: packs dq [T, HEADS, D], dk, dv [T, GROUPS, D] into the
// group-interleaved row [T, (HEADS + 2·GROUPS)·D] (group g: [q heads g·GS.., k_g, v_g]).
// A null gradient (its output was not seeded) packs as zeros.
//
// Launch: grid T, block 128, one token per block; 16-byte chunks when D % 8 == 0 and every
// pointer is aligned, element copies otherwise. Pure copy: deterministic.
#include "vp_common.cuh"

namespace vp {

template <int HEADS, int GROUPS, int D>
__device__ __forceinline__ void qkv_pack(const bf16* __restrict__ dq, const bf16* __restrict__ dk,
                                         const bf16* __restrict__ dv, bf16* __restrict__ mixed, int T) {
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int GS = HEADS / GROUPS, GW = (GS + 2) * D, W = GROUPS * GW;
    const int t = blockIdx.x;
    if (t >= T) return;
    bf16* dst = mixed + (size_t)t * W;
    // Source of packed element e (nullptr: zero).
    auto src_of = [&](int e) -> const bf16* {
        const int grp = e / GW, rem = e % GW, slot = rem / D, col = rem % D;
        if (slot < GS) return dq ? dq + ((size_t)t * HEADS + grp * GS + slot) * D + col : nullptr;
        if (slot == GS) return dk ? dk + ((size_t)t * GROUPS + grp) * D + col : nullptr;
        return dv ? dv + ((size_t)t * GROUPS + grp) * D + col : nullptr;
    };
    const bool vec = D % 8 == 0 && aligned(mixed, 16) && aligned(dq, 16) && aligned(dk, 16) && aligned(dv, 16);
    if (vec) {
        for (int c = threadIdx.x; c < W / 8; c += blockDim.x) {
            const bf16* s = src_of(c * 8);
            reinterpret_cast<uint4*>(dst)[c] = s ? *reinterpret_cast<const uint4*>(s) : make_uint4(0, 0, 0, 0);
        }
    } else {
        for (int e = threadIdx.x; e < W; e += blockDim.x) {
            const bf16* s = src_of(e);
            dst[e] = s ? *s : f2bf(0.f);
        }
    }
}

}  // namespace vp
