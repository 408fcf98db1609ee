#pragma once
// moe_count.cuh: tokens per expert, then their prefix sums. Block e counts the slots s in
// [0, T·K) with idx[s] == e and writes offsets[e + 1]; block 0 also writes offsets[0] = 0. The
// last block to finish (`last_block`, ticket 0) scans offsets[1 ..= E] in place (inclusive), so
// the counts leave the launch as row ranges: offsets[e] .. offsets[e + 1] are expert e's rows.
//
// Launch: grid E, block 256. Every block streams the whole idx array (T·K ints, L2-resident
// after the first block) and reduces its count with a fixed-order block sum; the scan runs in
// chunks of 256 with a carry, so any E works. No float atomics, no host read-back; integer
// arithmetic, so the result is exact whichever block scans.
#include "vp_common.cuh"

namespace vp {

template <int E, int K>
__device__ __forceinline__ void moe_count(const int* __restrict__ idx, int* __restrict__ offsets, int T,
                                          int* __restrict__ tickets) {
    constexpr int NT = MOE_COUNT_THREADS;
    require_block(NT);
    const int e = blockIdx.x;
    const int n = T * K;
    int c = 0;
    for (int s = threadIdx.x; s < n; s += NT) c += idx[s] == e ? 1 : 0;
    c = block_sum<NT>(c);
    if (threadIdx.x == 0) {
        offsets[e + 1] = c;
        if (e == 0) offsets[0] = 0;
    }
    if (!last_block(tickets, (int)gridDim.x)) return;
    int carry = 0;
    for (int base = 0; base < E; base += NT) {
        const int i = base + threadIdx.x;
        const int ci = i < E ? __ldcg(offsets + 1 + i) : 0;  // other blocks' counts: from L2
        int total;
        const int before = block_exclusive_scan<NT>(ci, total);
        if (i < E) offsets[1 + i] = carry + before + ci;
        carry += total;
    }
}

}  // namespace vp
