#pragma once
// moe_scan.cuh: in-place inclusive prefix sum of offsets[1 ..= E] (per-expert counts from
// moe_count become row ranges; offsets[0] is already 0).
//
// Launch: 1 block of 1024. Chunks of 1024 entries, each a block-wide scan (warp shuffles + warp
// totals in shared memory) plus the running carry. Deterministic integer arithmetic.
#include "vp_common.cuh"

namespace vp {

template <int E>
__device__ __forceinline__ void moe_scan(int* offsets) {
    constexpr int NT = 1024;
    require_block(NT);
    int carry = 0;
    for (int base = 0; base < E; base += NT) {
        const int i = base + threadIdx.x;
        const int c = i < E ? offsets[1 + i] : 0;
        int total;
        const int before = block_exclusive_scan<NT>(c, total);
        if (i < E) offsets[1 + i] = carry + before + c;
        carry += total;
    }
}

}  // namespace vp
