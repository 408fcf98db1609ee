#pragma once
// embed_sort.cuh: first stage of the deterministic embedding backward. The T token ids are cut
// into chunks of CHUNK = 2048 consecutive tokens; block c sorts its chunk by (id, token index)
// and writes the sorted pairs to sorted[2·i] = id, sorted[2·i + 1] = t for i in the chunk's slots
// [c·CHUNK, c·CHUNK + n_c). Within equal ids the token order is ascending, so embed_bwd can sum a
// vocabulary row's gradient in global token order by visiting the chunks in order.
//
// Launch: grid ceil(T/2048), block 1024. In-shared-memory bitonic sort of 2048 64-bit keys
// (id << 32 | t; padding keys are all-ones and sort last): a fixed compare-exchange network, so
// the result is unique (keys are distinct) and deterministic. 16 KB shared memory.
// Why a sort: a counting pass like moe_count/moe_scatter is too slow at V = 201,088, and float
// atomics are ruled out (docs/kernels.md, "Determinism").
#include "vp_common.cuh"

namespace vp {

__device__ __forceinline__ void embed_sort(const int* __restrict__ tokens, int* __restrict__ sorted, int T) {
    constexpr int NT = EMBED_SORT_THREADS, CH = EMBED_SORT_CHUNK;
    __shared__ unsigned long long s_key[CH];
    require_block(NT);
    const int c0 = blockIdx.x * CH, tid = threadIdx.x;
    const int n = min(CH, T - c0);
    for (int i = tid; i < CH; i += NT) {
        const int t = c0 + i;
        s_key[i] = i < n ? (((unsigned long long)(unsigned int)tokens[t] << 32) | (unsigned int)t) : ~0ull;
    }
    __syncthreads();
    for (int k = 2; k <= CH; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = tid; i < CH; i += NT) {
                const int p = i ^ j;
                if (p > i) {
                    const unsigned long long a = s_key[i], b = s_key[p];
                    const bool up = (i & k) == 0;
                    if ((a > b) == up) {
                        s_key[i] = b;
                        s_key[p] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (int i = tid; i < n; i += NT) {
        const unsigned long long key = s_key[i];
        sorted[2 * (size_t)(c0 + i)] = (int)(key >> 32);
        sorted[2 * (size_t)(c0 + i) + 1] = (int)(key & 0xffffffffull);
    }
}

}  // namespace vp
