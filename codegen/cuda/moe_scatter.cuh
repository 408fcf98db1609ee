#pragma once
// moe_scatter.cuh: the expert-major permutation of the routing slots. Block e walks the slots
// s = t·K + k in ascending order; the i-th slot with idx[s] == e gets row r = offsets[e] + i:
// row[s] = r and src[r] = t (the token the row reads; expert_ffn gathers x through it, so no
// permuted copy of the tokens is made). Ascending slot order makes the permutation (and so
// everything downstream) deterministic and equal to reference Dispatch.
//
// Launch: grid E, block 256. The slots are walked in passes of 256 × 16: thread i tests the 16
// consecutive slots [base + 16i, base + 16i + 16) (four int4 loads) and a block-wide exclusive
// scan of the per-thread match counts gives every match its rank (thread order = slot order).
// Every block reads all T·K routing ids (L2-resident): 16 passes at T·K = 65536. No atomics.
// Limits: a single counting-sort pass (one block per token chunk writing per-chunk counts, then a
// scan) would read each id once.
#include "vp_common.cuh"

namespace vp {

template <int E, int K>
__device__ __forceinline__ void moe_scatter(const int* __restrict__ idx, const int* __restrict__ offsets,
                                            int* __restrict__ src, int* __restrict__ row, int T) {
    constexpr int NT = MOE_SCATTER_THREADS, PT = 16, CHUNK = NT * PT;
    require_block(NT);
    const int e = blockIdx.x, tid = threadIdx.x;
    const int n = T * K;
    const bool vec_idx = aligned(idx, 16);
    int next = offsets[e];  // next free row of this expert (block-uniform)
    for (int base = 0; base < n; base += CHUNK) {
        const int s0 = base + tid * PT;
        unsigned int match = 0;  // bit j: slot s0 + j belongs to expert e
        if (vec_idx && s0 + PT <= n) {
#pragma unroll
            for (int q = 0; q < PT / 4; ++q) {
                const int4 v = reinterpret_cast<const int4*>(idx + s0)[q];
                match |= (v.x == e ? 1u : 0u) << (4 * q);
                match |= (v.y == e ? 1u : 0u) << (4 * q + 1);
                match |= (v.z == e ? 1u : 0u) << (4 * q + 2);
                match |= (v.w == e ? 1u : 0u) << (4 * q + 3);
            }
        } else {
#pragma unroll
            for (int j = 0; j < PT; ++j)
                if (s0 + j < n && idx[s0 + j] == e) match |= 1u << j;
        }
        int cnt;
        int r = block_exclusive_scan<NT>(__popc(match), cnt);
        if (cnt == 0) continue;  // block-uniform
#pragma unroll
        for (int j = 0; j < PT; ++j)
            if ((match >> j) & 1u) {
                row[s0 + j] = next + r;
                src[next + r] = (s0 + j) / K;
                ++r;
            }
        next += cnt;
    }
}

}  // namespace vp
