#pragma once
// moe_scatter.cuh: permutes token copies expert-major. Block e walks the routing slots
// s = t·K + k in ascending order; the i-th slot with idx[s] == e gets row r = offsets[e] + i:
// row[s] = r and xp[r, :] = x[s / K, :] (H bf16). Ascending slot order makes the permutation
// (and so everything downstream) deterministic and equal to reference Dispatch.
//
// Launch: grid E, block 256. The slots are walked in passes of 256 × 16: thread i tests the 16
// consecutive slots [base + 16i, base + 16i + 16) (four int4 loads), a block-wide exclusive scan
// of the per-thread match counts gives every match its rank (thread order = slot order), the
// matches are compacted into shared memory, and their rows are then copied by the whole block
// (16-byte chunks when H % 8 == 0 and aligned), so copies stay coalesced even when the expert
// owns few slots. Every block reads all T·K routing ids (L2-resident): 16 passes at T·K = 65536.
// No atomics.
#include "vp_common.cuh"

namespace vp {

template <int H, int E, int K>
__device__ __forceinline__ void moe_scatter(const bf16* __restrict__ x, const int* __restrict__ idx,
                                            const int* __restrict__ offsets, bf16* __restrict__ xp,
                                            int* __restrict__ row, int T) {
    constexpr int NT = 256, PT = 16, CHUNK = NT * PT;
    __shared__ int s_slot[CHUNK];
    require_block(NT);
    const int e = blockIdx.x, tid = threadIdx.x;
    const int n = T * K;
    const bool vec = (H % 8 == 0) && aligned(x, 16) && aligned(xp, 16);
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
                s_slot[r] = s0 + j;
                ++r;
            }
        __syncthreads();
        if (vec) {
            constexpr int H8 = H / 8;
            for (int c = tid; c < cnt * H8; c += NT) {
                const int i = c / H8, part = c % H8;
                const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)(s_slot[i] / K) * H) + part;
                reinterpret_cast<uint4*>(xp + (size_t)(next + i) * H)[part] = *src;
            }
        } else {
            for (int c = tid; c < cnt * H; c += NT) {
                const int i = c / H, j = c % H;
                xp[(size_t)(next + i) * H + j] = x[(size_t)(s_slot[i] / K) * H + j];
            }
        }
        next += cnt;
        __syncthreads();  // s_slot is rewritten by the next pass
    }
}

}  // namespace vp
