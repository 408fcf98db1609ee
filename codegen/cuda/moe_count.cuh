#pragma once
// moe_count.cuh: tokens per expert. Block e counts the slots s in [0, T·K) with idx[s] == e and
// writes offsets[e + 1]; block 0 also writes offsets[0] = 0 (moe_scan then makes them offsets).
//
// Launch: grid E, block 256. Every block streams the whole idx array (T·K ints, L2-resident
// after the first block) and reduces its count with a fixed-order block sum: no atomics, no
// host read-back.
#include "vp_common.cuh"

namespace vp {

template <int E, int K>
__device__ __forceinline__ void moe_count(const int* __restrict__ idx, int* __restrict__ offsets, int T) {
    constexpr int NT = 256;
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
}

}  // namespace vp
