#pragma once
// qkv_colsum.cuh: the column sums of the group-interleaved row [T, (HEADS + 2·GROUPS)·D] that
// qkv_pack would build from dq [T, HEADS, D], dk, dv [T, GROUPS, D] (group g: q heads g·GS..,
// k_g, v_g), read straight from the three: TPA's packed-bias gradient without the packed copy.
// A null gradient sums to 0. `accum`: add into `out` (put_grad).
//
// Launch and order as colsum.cuh (whose body it shares): grid (P, ceil(N/256)), block 256, one
// column per thread summed over its block's row range in ascending order; the last of a column
// block's P blocks adds the P partial rows in order. Deterministic.
#include "colsum.cuh"

namespace vp {

template <int HEADS, int GROUPS, int D>
__device__ __forceinline__ void qkv_colsum(const bf16* __restrict__ dq, const bf16* __restrict__ dk,
                                           const bf16* __restrict__ dv, float* __restrict__ out, int rows,
                                           int accum, float* __restrict__ parts, int* __restrict__ tickets) {
    static_assert(GROUPS >= 1 && HEADS % GROUPS == 0, "heads must be a multiple of kv groups");
    constexpr int GS = HEADS / GROUPS, GW = (GS + 2) * D;
    colsum_body<GROUPS * GW>(
        [&](int c, int r0, int r1) {
            const int grp = c / GW, slot = c % GW / D, col = c % D;
            if (slot < GS) return dq ? colsum_bf16(dq + (grp * GS + slot) * D + col, HEADS * D, r0, r1) : 0.f;
            const bf16* g = slot == GS ? dk : dv;
            return g ? colsum_bf16(g + grp * D + col, GROUPS * D, r0, r1) : 0.f;
        },
        out, rows, accum, parts, tickets);
}

}  // namespace vp
